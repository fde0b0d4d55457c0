"""minideep export --format gguf: llama.cpp (through llama-cpp-python) computes minideep's function
from the file: the same token ids, logits within 1e-4 of the largest, the same greedy tokens, and
q8_0 within 2% of f32 in bits per byte; configurations no llama.cpp graph computes are refused;
OUT is written atomically. The llama.cpp tests skip only where llama_cpp cannot be imported."""

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import HOSTILE, assert_clean_error, invoke, leftovers, scale_up_weights, tiny_model_cfg

gguf = pytest.importorskip("gguf", reason="gguf is not installed: `pip install -e '.[test]'`")

from minideep_cli.checkpoint import save_checkpoint  # noqa: E402
from minideep_cli.config import Config  # noqa: E402
from minideep_cli.errors import UserError  # noqa: E402
from minideep_cli.evaluate import evaluate_tokens  # noqa: E402
from minideep_cli.export import export_checkpoint  # noqa: E402
from minideep_cli.export.gguf import gguf_plan, tokenizer_keys, write_gguf  # noqa: E402
from minideep_cli.generate import generate_steps  # noqa: E402
from minideep_cli.models import build_model  # noqa: E402
from minideep_cli.tokenizer import load_tokenizer, token_byte_lengths, train_tokenizer  # noqa: E402


BATTERY = [
    HOSTILE,
    "plain words, then  two spaces,   three,    four and a tab\there",
    "runs of newlines\n\n\n\nand spaces at the end    ",
    "   leading spaces and \n \n  mixed \t\n whitespace \r\n",
    "digits 0 12 345 6789 3.14159 1,000,000 2026-12-07 x86_64",
    "contractions: don't, I'll, we've, she's, they're, I'm, he'd, DON'T, O'Brien's",
    "emoji 😀🎉 👍🏽 🏳️‍🌈 and symbols ©®™ §¶ ½ ¾",
    "<|endoftext|>",
    "a <|endoftext|> in the middle<|endoftext|><|endoftext|> and <|endoftext",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "",
    " ",
    "\n",
]
TEXT_64 = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the "
           "sun. Arise, fair sun, and kill the envious moon, who is already sick and pale with grief.")


@pytest.fixture(scope="module")
def tok_json(corpus_text):
    # trained on the battery too, so that its merges cover spaces, digits, tabs and non-ASCII runs
    return train_tokenizer([corpus_text[:30000], *BATTERY * 3], 600).to_str()


MLA = dict(attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
# the cpu preset's moe (gqa, n_kv_head < n_head, qk_norm, raw top-2 softmax gates, dropless, tied) and
# mla variants, at small widths that q8_0 can take (rows of 64)
CASES = {
    "gpt2": ("gpt2", dict(n_embd=64)),
    "moe-default": ("moe", dict(n_embd=64, qk_norm=True, capacity_factor=None, expert_hidden=64, rope_theta=500.0)),
    "mla": ("moe", dict(MLA, n_embd=64, capacity_factor=None, expert_hidden=64)),
}
# settings the mappings handle beyond the default (checked for logits and tokens only)
MORE = {
    "gpt2-no-bias": ("gpt2", dict(n_embd=64, bias=False)),
    "moe-renormalised-sigmoid-bias-shared-dense-untied": (
        "moe", dict(n_embd=64, router="sigmoid", norm_topk=True, router_bias=True, n_shared_experts=1,
                    first_k_dense=1, ffn_hidden=96, tie_embeddings=False, n_kv_head=0, n_layer=3)),
    "mla-qlora-sigmoid-bias-shared-dense": (
        "moe", dict(MLA, n_embd=64, q_lora_rank=32, router="sigmoid", router_bias=True, n_shared_experts=1,
                    first_k_dense=1, n_layer=3, top_k=1)),
}


def make_ckpt(path: Path, tok_json: str, arch: str, router_bias: bool = False, **kw):
    """A random model with weights scaled up so routing, gates and every term matter (as
    test_export's), saved as train.py saves one. Returns (model in eval mode, path)."""
    cfg = Config()
    cfg.model = tiny_model_cfg(arch, vocab_size=load_tokenizer(tok_json).get_vocab_size(), block_size=128, **kw)
    model = build_model(cfg.model)
    scale_up_weights(model, 0.5, router_bias)
    save(path, model, cfg, tok_json)
    return model.eval(), path


def save(path, model, cfg, tok_json):
    save_checkpoint({"model": model.state_dict(), "optimizer": None, "config": cfg.to_dict(), "tokenizer": tok_json,
                     "data": {"source": "tests"}, "loop": {"step": 7, "tokens": 1000}}, path)


# ---------------------------------------------------------------- llama.cpp computes our function


def test_tokenization_battery_equals_minideeps(tmp_path, tok_json):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from minideep_cli import llamacpp

    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "gpt2", n_embd=64)
    export_checkpoint(ckpt, tmp_path / "m.gguf", "gguf")
    llm = llamacpp.open_gguf(tmp_path / "m.gguf", 128)
    tok = load_tokenizer(tok_json)
    for text in BATTERY:
        ids = tok.encode(text).ids
        assert llamacpp.tokenize(llm, text) == ids, text
        assert llm.detokenize(ids).decode("utf-8") == text  # every byte back, no space clean-up
    eot = tok.token_to_id("<|endoftext|>")
    assert eot not in tok.encode(BATTERY[8]).ids  # the literal stays text on both sides
    assert llm.token_eos() == llm.token_bos() == eot


def decisive_prompt(model, ids: list[int], margin: float) -> tuple[list[int], list[int]]:
    """An 8-token prompt from ids and minideep's 32 greedy tokens after it, where every step's
    best logit leads the next by more than margin: logits that differ by less than margin / 2
    must then choose the same tokens (a near tie would flip on rounding alone, either way)."""
    for start in range(0, len(ids) - 8, 4):
        prompt = ids[start : start + 8]
        steps = list(generate_steps(model, prompt, 32, temperature=0.0))
        if all(float(torch.diff(-s.logits.topk(2).values)[0]) > margin for s in steps):
            return prompt, [s.token for s in steps]
    pytest.fail(f"no prompt whose greedy steps all lead by more than {margin:.2e}")


@contextmanager
def fp16_table_gelu():
    """torch's GELU computed as llama.cpp's CPU build does: tanh GELU of the input rounded to
    fp16, the result rounded to fp16 (inputs beyond +-10 pass through or give 0)."""
    exact = F.gelu

    def table(x, approximate="none"):
        y = exact(x.half().float(), approximate=approximate).half().float()
        return torch.where(x >= 10, x, torch.where(x <= -10, torch.zeros_like(x), y))

    F.gelu = table
    try:
        yield
    finally:
        F.gelu = exact


@pytest.mark.parametrize("case", [*CASES, *MORE])
def test_f32_logits_and_greedy_tokens_equal_minideeps(case, tmp_path, tok_json):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from minideep_cli import llamacpp

    arch, kw = {**CASES, **MORE}[case]
    model, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, arch, **kw)
    res = export_checkpoint(ckpt, tmp_path / "m.gguf", "gguf")
    assert res.target == {"gpt2": "gpt2", "gqa": "glm4moe", "mla": "deepseek2"}[
        "gpt2" if arch == "gpt2" else model.cfg.attention]
    llm = llamacpp.open_gguf(tmp_path / "m.gguf", model.cfg.block_size)

    ids = load_tokenizer(tok_json).encode(TEXT_64 * 2).ids[:64]
    assert len(ids) == 64
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()  # (64, V)
    theirs = llamacpp.logits(llm, ids)
    scale = np.abs(ours).max()
    assert scale > 1.0  # logits large enough for the tolerance to mean something
    tol = 1e-4
    if arch == "gpt2":
        # llama.cpp's CPU GELU reads a table of fp16 results at the fp16-rounded input (ggml-cpu
        # vec.h, GGML_GELU_FP16): with that GELU, minideep's gpt2 is llama.cpp's within 1e-4; with
        # its own exact one, within 1e-3 (docs/export.md)
        tol = 1e-3
        with torch.no_grad(), fp16_table_gelu():
            as_llama = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(theirs - as_llama).max() <= 1e-4 * scale
    assert np.abs(theirs - ours).max() <= tol * scale

    prompt, tokens = decisive_prompt(model, ids, 2 * tol * scale)
    assert llamacpp.greedy(llm, prompt, 32) == tokens


@pytest.mark.parametrize("case,change", [
    ("moe-default", {"glm4moe.expert_weights_norm": True}),  # qwen3moe's renormalised gates
    ("moe-default", {"glm4moe.rope.freq_base": 10000.0}),
    ("mla", "no RoPE row reordering"),
])
def test_the_logit_comparison_has_teeth(case, change, tmp_path, tok_json, monkeypatch):
    """A file with one semantic setting changed no longer matches: the tolerance above catches
    renormalised gates, a wrong RoPE base and deepseek2's RoPE pair order."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from minideep_cli import llamacpp
    from minideep_cli.export import gguf as gguf_export

    arch, kw = CASES[case]
    model, _ = make_ckpt(tmp_path / "ckpt.pt", tok_json, arch, **kw)
    if change == "no RoPE row reordering":
        monkeypatch.setattr(gguf_export, "_rope_pair_order", lambda d: torch.arange(d))
    plan = gguf_plan(model)
    if isinstance(change, dict):
        plan.keys.update({k.split(".", 1)[1]: v for k, v in change.items()})
    write_gguf(tmp_path / "m.gguf", plan, tokenizer_keys(tok_json), "f32")
    ids = load_tokenizer(tok_json).encode(TEXT_64).ids[:48]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    theirs = llamacpp.logits(llamacpp.open_gguf(tmp_path / "m.gguf", 128), ids)
    assert np.abs(theirs - ours).max() > 1e-2 * np.abs(ours).max()


def train_briefly(model, tokens: torch.Tensor, steps: int = 60) -> None:
    """A few AdamW steps on random windows: enough for bits per byte to mean something."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    T = model.cfg.block_size
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - T - 1, (8,), generator=g)
        x = torch.stack([tokens[s : s + T] for s in starts])
        y = torch.stack([tokens[s + 1 : s + T + 1] for s in starts])
        out = model(x, y)
        loss = out.loss + out.aux.get("loss", 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_q8_0_bits_per_byte_within_2_percent_of_f32(case, tmp_path, tok_json, corpus_text):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from minideep_cli import llamacpp

    arch, kw = CASES[case]
    tok = load_tokenizer(tok_json)
    cfg = Config()
    cfg.model = tiny_model_cfg(arch, vocab_size=tok.get_vocab_size(), block_size=64, **kw)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    train_briefly(model, torch.tensor(tok.encode(corpus_text[:60000]).ids))
    save(tmp_path / "ckpt.pt", model, cfg, tok_json)
    held_out = tok.encode(corpus_text[100000:104000]).ids
    lengths = token_byte_lengths(tok)
    ours = evaluate_tokens(model, np.array(held_out), lengths, cfg.model.block_size)["bpb"]
    bpb = {}
    for dtype in ("f32", "q8_0"):
        export_checkpoint(tmp_path / "ckpt.pt", tmp_path / f"{dtype}.gguf", "gguf", dtype=dtype)
        llm = llamacpp.open_gguf(tmp_path / f"{dtype}.gguf", cfg.model.block_size)
        bpb[dtype] = llamacpp.bits_per_byte(llm, held_out, lengths, cfg.model.block_size)
    uniform = np.log2(tok.get_vocab_size()) * len(held_out) / sum(lengths[t] for t in held_out)
    assert ours < 0.85 * uniform  # it learned something: 4.46 bits per byte before training, ~3.6 after
    assert abs(bpb["f32"] - ours) < 1e-4
    assert abs(bpb["q8_0"] - bpb["f32"]) <= 0.02 * bpb["f32"]
    assert (tmp_path / "q8_0.gguf").stat().st_size < 0.5 * (tmp_path / "f32.gguf").stat().st_size


# ---------------------------------------------------------------- the file: contents, dtypes


def read(path: Path):
    return gguf.GGUFReader(str(path))


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_file_holds_tokenizer_metadata_and_dtypes(tmp_path, tok_json):
    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "moe", **CASES["moe-default"][1])
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        r = invoke("export", ckpt, tmp_path / f"{dtype}.gguf", "--format", "gguf", "--dtype", dtype)
        assert r.exit_code == 0 and "glm4moe" in r.output, r.output
    rd = read(tmp_path / "q8_0.gguf")
    tok = load_tokenizer(tok_json)
    assert field(rd, "general.architecture") == "glm4moe"
    assert field(rd, "tokenizer.ggml.model") == "gpt2" and field(rd, "tokenizer.ggml.pre") == "gpt-2"
    assert field(rd, "tokenizer.ggml.tokens") == [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    assert field(rd, "tokenizer.ggml.add_bos_token") is False
    assert field(rd, "tokenizer.ggml.eos_token_id") == tok.token_to_id("<|endoftext|>")
    assert field(rd, "minideep.step") == 7 and "tests" in field(rd, "general.description")
    assert field(rd, "glm4moe.expert_weights_norm") is False and field(rd, "glm4moe.expert_gating_func") == 1
    types = {t.name: t.tensor_type.name for t in rd.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.ffn_down_exps.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_q_norm.weight"] == "F32"
    assert {t.name: t.tensor_type.name for t in read(tmp_path / "bf16.gguf").tensors}["token_embd.weight"] == "BF16"
    assert "output.weight" not in types  # tied: llama.cpp reads token_embd


def test_q8_0_keeps_rows_that_do_not_divide_by_32_in_f16(tmp_path, tok_json):
    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "moe", n_embd=48, expert_hidden=64)
    export_checkpoint(ckpt, tmp_path / "m.gguf", "gguf", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in read(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "F16"  # rows of 48
    assert types["blk.0.ffn_down_exps.weight"] == "Q8_0"  # rows of 64


# ---------------------------------------------------------------- refusals and writing


REFUSED = {
    "latent": (dict(attention="latent", n_latents=4), ["latent attention"]),
    "relu2": (dict(activation="relu2"), ["relu2 activation"]),
    "softcap": (dict(logit_softcap=15.0), ["logit_softcap=15"]),
    "moe-every": (dict(n_layer=3, moe_every=2), ["moe_every=2"]),
    "eval-capacity": (dict(eval_capacity_factor=1.0), ["eval_capacity_factor=1"]),
    "mla-lite-depth": (dict(MLA, q_lora_rank=16, n_layer=26), ["q_lora_rank", "26 layers"]),
    "several": (dict(activation="relu2", logit_softcap=15.0), ["relu2", "logit_softcap"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_configs_are_refused_before_anything_is_written(case, tmp_path, tok_json):
    kw, needles = REFUSED[case]
    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "moe", **kw)
    r = invoke("export", ckpt, tmp_path / "m.gguf", "--format", "gguf")
    assert_clean_error(r, "cannot export to --format gguf", *needles, "--format safetensors")
    assert not (tmp_path / "m.gguf").exists() and not leftovers(tmp_path)


def test_out_file_rules(tmp_path, tok_json):
    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "gpt2", n_embd=64)
    out = tmp_path / "m.gguf"
    out.write_text("mine")
    assert_clean_error(invoke("export", ckpt, out, "--format", "gguf"), "exists", "--force")
    assert out.read_text() == "mine"
    r = invoke("export", ckpt, out, "--format", "gguf", "--force")
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:4] == b"GGUF" and not leftovers(tmp_path)
    assert_clean_error(invoke("export", ckpt, tmp_path, "--format", "gguf"), "is a folder")
    assert_clean_error(invoke("export", ckpt, ckpt, "--format", "gguf", "--force"), "checkpoint being exported")
    assert_clean_error(invoke("export", ckpt, tmp_path / "x.gguf", "--format", "gguf", "--dtype", "q4_0"),
                       "unknown --dtype", "q8_0")
    assert_clean_error(invoke("export", ckpt, tmp_path / "hf", "--dtype", "f16"), "--dtype is for --format gguf")
    r = invoke("export", ckpt, tmp_path / "new" / "deeper" / "m.gguf", "--format", "gguf")  # folders are made
    assert r.exit_code == 0, r.output


def test_a_failed_write_leaves_the_old_file(tmp_path, tok_json, monkeypatch):
    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "gpt2", n_embd=64)
    out = tmp_path / "m.gguf"
    out.write_text("mine")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    assert_clean_error(invoke("export", ckpt, out, "--format", "gguf", "--force"), "No space left")
    assert out.read_text() == "mine" and not leftovers(tmp_path)
    with pytest.raises(UserError, match="No space left"):
        export_checkpoint(ckpt, tmp_path / "new.gguf", "gguf")
    assert not (tmp_path / "new.gguf").exists() and not leftovers(tmp_path)


def test_missing_packages_are_one_line(tmp_path, tok_json, monkeypatch):
    import sys

    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "gpt2", n_embd=64)
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails
    assert_clean_error(invoke("export", ckpt, tmp_path / "m.gguf", "--format", "gguf"), "pip install", "minideep[gguf]")
    assert not (tmp_path / "m.gguf").exists()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    from minideep_cli import llamacpp

    with pytest.raises(UserError, match="llama-cpp-python==0.3.36"):
        llamacpp.open_gguf(tmp_path / "m.gguf", 64)
