"""minideep export: a Hugging Face folder computes minideep's function in transformers (logits,
greedy tokens, tokenizer ids); configurations without an exact class are refused; a safetensors
folder loads back into minideep with no pickle; OUT_DIR is written atomically."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import HOSTILE, assert_clean_error, invoke, leftovers, scale_up_weights, tiny_model_cfg

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: `pip install -e '.[test]'` to check exports against it")

from minideep_cli.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from minideep_cli.config import Config  # noqa: E402
from minideep_cli.errors import UserError  # noqa: E402
from minideep_cli.export import export_checkpoint  # noqa: E402
from minideep_cli.generate import generate  # noqa: E402
from minideep_cli.models import build_model  # noqa: E402
from minideep_cli.tokenizer import EOT, load_tokenizer, train_tokenizer  # noqa: E402

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def tok_json(corpus_text):
    return train_tokenizer([corpus_text[:20000]], 300).to_str()


def make_ckpt(path: Path, tok_json: str, arch: str, router_bias: bool = False, **kw):
    """A tiny random model (weights scaled up so that routing, gates and every term matter) saved
    with the keys train.py writes; router_bias: a nonzero selection bias, as aux-loss-free
    balancing leaves it. Returns (model in eval mode, checkpoint path)."""
    cfg = Config()
    cfg.model = tiny_model_cfg(arch, vocab_size=load_tokenizer(tok_json).get_vocab_size(), **kw)
    model = build_model(cfg.model)
    scale_up_weights(model, 0.3, router_bias)
    save_checkpoint({"model": model.state_dict(), "optimizer": None, "config": cfg.to_dict(), "tokenizer": tok_json,
                     "data": {}, "loop": {"step": 7, "tokens": 1000}}, path)
    return model.eval(), path


def load_hf(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ---------------------------------------------------------------- hf: equal in transformers

MLA = dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, rope_theta=500.0)
HF_CASES = {
    "gpt2": ("gpt2", {}, "GPT2LMHeadModel"),
    "gpt2-no-bias": ("gpt2", dict(bias=False), "GPT2LMHeadModel"),
    # training-only settings (learned router noise, training capacity, gate drop policy) do not block
    "mixtral": ("moe", dict(norm_topk=True, rope_theta=500.0, router_noise="noisy_topk", drop_policy="gate"),
                "MixtralForCausalLM"),
    "mixtral-untied-mha": ("moe", dict(norm_topk=True, tie_embeddings=False, n_kv_head=0), "MixtralForCausalLM"),
    "raw-gates": ("moe", dict(norm_topk=False, rope_theta=500.0), "Qwen2MoeForCausalLM"),
    "k1": ("moe", dict(top_k=1, norm_topk=True), "Qwen2MoeForCausalLM"),
    "shared-experts": ("moe", dict(norm_topk=True, n_shared_experts=2), "Qwen2MoeForCausalLM"),
    "dense-first-untied": ("moe", dict(norm_topk=True, first_k_dense=1, ffn_hidden=48, tie_embeddings=False),
                           "Qwen2MoeForCausalLM"),
    "moe-every-2-shared": ("moe", dict(n_layer=3, moe_every=2, n_shared_experts=1, top_k=3, norm_topk=True),
                           "Qwen2MoeForCausalLM"),
    "qwen3-qk-norm": ("moe", dict(qk_norm=True, rope_theta=500.0), "Qwen3MoeForCausalLM"),  # the cpu preset's
    "qwen3-qk-norm-renormalised": ("moe", dict(qk_norm=True, norm_topk=True), "Qwen3MoeForCausalLM"),
    "qwen3-qk-norm-dense-first-k1": ("moe", dict(qk_norm=True, top_k=1, first_k_dense=1, ffn_hidden=48,
                                                 tie_embeddings=False), "Qwen3MoeForCausalLM"),
    "mla-softmax": ("moe", dict(**MLA, norm_topk=False, n_shared_experts=1, first_k_dense=1), "DeepseekV2ForCausalLM"),
    "mla-softmax-k1-qlora": ("moe", dict(**MLA, top_k=1, norm_topk=True, q_lora_rank=16), "DeepseekV2ForCausalLM"),
    "mla-sigmoid-bias": ("moe", dict(**MLA, router="sigmoid", norm_topk=True, q_lora_rank=16, tie_embeddings=False,
                                     router_bias=True), "DeepseekV3ForCausalLM"),
    "mla-sigmoid-raw-shared": ("moe", dict(**MLA, router="sigmoid", norm_topk=False, n_shared_experts=1,
                                           first_k_dense=1, router_bias=True), "DeepseekV3ForCausalLM"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_export_equals_minideep_in_transformers(case, tmp_path, tok_json):
    arch, kw, expected = HF_CASES[case]
    model, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, arch, **kw)
    res = export_checkpoint(ckpt, tmp_path / "hf", "hf")
    assert res.target == expected
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == expected
    V = model.cfg.vocab_size

    x = torch.randint(0, V, (2, model.cfg.block_size))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    assert ours.abs().max() > 0.5  # logits large enough for the tolerance to mean something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    prompt = x[0, :6].tolist()
    greedy = list(generate(model, prompt, NEW_TOKENS, temperature=0.0))
    eot = load_tokenizer(tok_json).token_to_id(EOT)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):].tolist()
    assert out == greedy[: len(out)]
    assert len(out) == NEW_TOKENS or out[-1] == eot  # transformers stops early only at <|endoftext|>

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = load_tokenizer(tok_json).encode(HOSTILE).ids
    assert hf_tok.encode(HOSTILE) == ids  # a literal <|endoftext|> in the text stays text, as in minideep
    assert hf_tok.decode(ids) == HOSTILE
    assert hf_tok.eos_token_id == eot and hf.config.eos_token_id == eot


@pytest.mark.parametrize("kw,changes", [
    (dict(norm_topk=False, rope_theta=500.0), [dict(norm_topk_prob=True), dict(rope_theta=10000.0)]),
    (dict(MLA, router="sigmoid", router_bias=True), [dict(rope_interleave=False), dict(norm_topk_prob=True)]),
])
def test_the_logit_comparison_has_teeth(kw, changes, tmp_path, tok_json):
    """The same folder with one semantic setting changed no longer matches: the tolerance above
    catches a wrong gate normalisation, RoPE base or RoPE pair order (mla's row reordering)."""
    model, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "moe", **kw)
    export_checkpoint(ckpt, tmp_path / "hf", "hf")
    x = torch.randint(0, model.cfg.vocab_size, (2, 32))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    with torch.no_grad():
        ours = model(x).logits
        torch.testing.assert_close(load_hf(tmp_path / "hf")(x).logits, ours, rtol=1e-5, atol=1e-5)
        for change in changes:
            (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **change}))
            assert (load_hf(tmp_path / "hf")(x).logits - ours).abs().max() > 1e-3, change


def test_hf_export_writes_per_expert_hub_layout(tmp_path, tok_json):
    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "moe", norm_topk=True)
    export_checkpoint(ckpt, tmp_path / "hf", "hf")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for e in range(4):  # every expert of every layer, under Mixtral's hub names
        for w in ("w1", "w2", "w3"):
            assert {f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight" for i in range(2)} <= keys
    assert "lm_head.weight" not in keys  # tied: written once
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["tie_word_embeddings"] is True


# ---------------------------------------------------------------- hf: refusals

REFUSED = {
    "sigmoid-router-gqa": (dict(router="sigmoid", norm_topk=True, router_bias=True), ["sigmoid router with gqa"]),
    "selection-bias-softmax": (dict(router_bias=True), ["selection bias"]),
    "eval-capacity": (dict(eval_capacity_factor=1.0, drop_policy="gate"), ["eval_capacity_factor=1", "gate"]),
    "latent": (dict(attention="latent", n_latents=4, norm_topk=True), ["latent attention"]),
    "mla-renormalised-softmax": (dict(MLA, norm_topk=True), ["renormalised softmax gates"]),
    "mla-moe-every": (dict(MLA, router="sigmoid", n_layer=3, moe_every=2), ["moe_every=2"]),
    "relu2": (dict(activation="relu2", norm_topk=True), ["relu2 activation"]),
    "softcap": (dict(logit_softcap=15.0, norm_topk=True), ["logit_softcap=15"]),
    "qk-norm-shared": (dict(qk_norm=True, n_shared_experts=1), ["shared experts with model.qk_norm"]),
    "several": (dict(MLA, norm_topk=True, router_bias=True, eval_capacity_factor=2.0),
                ["selection bias", "renormalised", "eval_capacity_factor=2"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_configs_refuse_hf_but_export_safetensors(case, tmp_path, tok_json):
    kw, needles = REFUSED[case]
    model, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "moe", **kw)
    r = invoke("export", ckpt, tmp_path / "hf")
    assert_clean_error(r, "cannot export to --format hf", *needles, "--format safetensors")
    assert not (tmp_path / "hf").exists() and not leftovers(tmp_path)

    r = invoke("export", ckpt, tmp_path / "st", "--format", "safetensors")
    assert r.exit_code == 0, r.output
    back, _ = model_from_checkpoint(load_checkpoint(tmp_path / "st"))
    x = torch.randint(0, model.cfg.vocab_size, (4, 32))
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


# ---------------------------------------------------------------- safetensors: round trip, no pickle


@pytest.mark.parametrize("arch,kw", [
    ("gpt2", {}),
    ("moe", dict(router="sigmoid", router_bias=True, n_shared_experts=1, first_k_dense=1, router_noise="noisy_topk")),
    ("moe", dict(tie_embeddings=False, eval_capacity_factor=0.5)),
    ("moe", dict(attention="latent", n_latents=4)),
])
def test_safetensors_round_trip_is_exact_and_pickle_free(arch, kw, tmp_path, tok_json, monkeypatch):
    model, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, arch, **kw)
    res = export_checkpoint(ckpt, tmp_path / "st", "safetensors")
    assert res.target == "minideep"
    files = {p.name for p in (tmp_path / "st").iterdir()}
    assert files == {"model.safetensors", "minideep_config.json", "tokenizer.json"}
    meta = json.loads((tmp_path / "st" / "minideep_config.json").read_text())
    assert Config.from_dict(meta["config"]).model == model.cfg and meta["loop"]["step"] == 7
    tied = arch == "gpt2" or model.cfg.tie_embeddings
    assert ("lm_head.weight" in meta["aliases"]) == tied

    def no_pickle(*a, **k):
        raise AssertionError("torch.load (pickle) used to read a safetensors export")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    state = load_checkpoint(tmp_path / "st")
    assert state["tokenizer"] == tok_json and state["optimizer"] is None
    back, cfg = model_from_checkpoint(state)
    assert cfg.model == model.cfg
    ref = model.state_dict()
    assert set(back.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())
    x = torch.randint(0, model.cfg.vocab_size, (3, 32))
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    if tied:  # still one tensor after loading
        assert back.lm_head.weight.data_ptr() == back.token_embedding.weight.data_ptr()


def test_eval_sample_routing_and_export_accept_the_safetensors_folder(tmp_path, tok_json):
    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "moe", n_shared_experts=1)
    r = invoke("export", ckpt, tmp_path / "st", "--format", "safetensors")
    assert r.exit_code == 0 and "minideep safetensors export" in r.output, r.output
    (tmp_path / "held.txt").write_text(HOSTILE)
    results = []
    for src in (ckpt, tmp_path / "st", tmp_path / "st" / "model.safetensors"):
        r = invoke("eval", src, "--text", tmp_path / "held.txt", "--json", "--device", "cpu")
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        res.pop("checkpoint")
        results.append(res)
    assert results[0] == results[1] == results[2] and results[0]["step"] == 7
    outs = []
    for src in (ckpt, tmp_path / "st"):
        r = invoke("sample", src, "--prompt", "KING:", "--max-new-tokens", 15, "--temperature", 0, "--device", "cpu")
        assert r.exit_code == 0, r.output
        outs.append(r.stdout)
    assert outs[0] == outs[1] and outs[0].startswith("KING:")
    reports = []
    for i, src in enumerate((ckpt, tmp_path / "st")):
        r = invoke("inspect-routing", src, "--prompt", HOSTILE, "--json", tmp_path / f"r{i}.json", "--device", "cpu")
        assert r.exit_code == 0, r.output
        report = json.loads((tmp_path / f"r{i}.json").read_text())
        assert report.pop("source")["checkpoint"] == str(src)
        reports.append(report)
    assert reports[0] == reports[1] and reports[0]["layers"]
    # the safetensors folder is itself a source for an hf export
    r = invoke("export", tmp_path / "st", tmp_path / "hf")
    assert r.exit_code == 0 and "Qwen2MoeForCausalLM" in r.output, r.output


def test_damaged_safetensors_export_is_one_clear_line(tmp_path, tok_json):
    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "gpt2")
    export_checkpoint(ckpt, tmp_path / "st", "safetensors")
    (tmp_path / "st" / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_clean_error(invoke("eval", tmp_path / "st", "--text", tmp_path / "st" / "tokenizer.json"),
                       "model.safetensors", "checksum")
    meta = json.loads((tmp_path / "st" / "minideep_config.json").read_text())
    del meta["weights_sha256"]  # as an export older than its checksum
    (tmp_path / "st" / "minideep_config.json").write_text(json.dumps(meta))
    assert_clean_error(invoke("eval", tmp_path / "st", "--text", tmp_path / "st" / "tokenizer.json"),
                       "not a readable safetensors file")
    (tmp_path / "st" / "minideep_config.json").write_text("{not json")
    assert_clean_error(invoke("sample", tmp_path / "st"), "minideep_config.json")


# ---------------------------------------------------------------- writing: atomic, no overwrite, weights_only


def test_out_dir_is_never_overwritten_without_force(tmp_path, tok_json):
    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(invoke("export", ckpt, out), "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    r = invoke("export", ckpt, out, "--force")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not leftovers(tmp_path)
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    assert invoke("export", ckpt, tmp_path / "empty", "--format", "safetensors").exit_code == 0
    (tmp_path / "afile").write_text("x")
    assert_clean_error(invoke("export", ckpt, tmp_path / "afile"), "not a folder")
    # --force never replaces the folder the checkpoint lives in
    assert_clean_error(invoke("export", ckpt, tmp_path, "--force"), "holds the checkpoint")
    assert_clean_error(invoke("export", tmp_path / "empty", tmp_path / "empty", "--force"), "holds the checkpoint")
    assert ckpt.is_file() and (tmp_path / "empty" / "model.safetensors").is_file()


def test_exports_and_checkpoints_get_the_permissions_of_any_new_file(tmp_path, tok_json):
    import os
    import stat

    mask = os.umask(0o022)  # a shared machine's usual umask, whatever this one's is
    try:
        _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "gpt2")
        r = invoke("export", ckpt, tmp_path / "shared", "--format", "safetensors")
    finally:
        os.umask(mask)
    assert r.exit_code == 0, r.output
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(ckpt) == 0o644 and mode(tmp_path / "shared") == 0o755  # not mkstemp's 0600, mkdtemp's 0700
    assert {mode(p) for p in (tmp_path / "shared").iterdir()} == {0o644}


def test_a_failed_write_leaves_nothing_half_written(tmp_path, tok_json, monkeypatch):
    import safetensors.torch

    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "moe")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # hf folders
    monkeypatch.setattr(Path, "write_bytes", disk_full)  # safetensors folders: their weights' bytes, hashed first
    with pytest.raises(UserError, match="No space left"):
        export_checkpoint(ckpt, tmp_path / "new", "safetensors")
    assert not (tmp_path / "new").exists() and not leftovers(tmp_path)

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    r = invoke("export", ckpt, old, "--force")
    assert_clean_error(r, "No space left")
    assert [p.name for p in old.iterdir()] == ["keep.txt"] and not leftovers(tmp_path)


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_export_reads_checkpoints_weights_only(tmp_path, tok_json):
    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "gpt2")
    state = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "code-ran"
    state["loop"]["evil"] = Payload(marker)
    torch.save(state, tmp_path / "evil.pt")
    assert_clean_error(invoke("export", tmp_path / "evil.pt", tmp_path / "out"), "evil.pt", "refused")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_export_help_and_bad_format(tmp_path, tok_json):
    r = invoke("export", "--help")
    assert r.exit_code == 0 and "Example" in r.output and "lm_eval" in r.output
    _, ckpt = make_ckpt(tmp_path / "ckpt.pt", tok_json, "gpt2")
    assert_clean_error(invoke("export", ckpt, tmp_path / "o", "--format", "onnx"), "unknown export format")
    assert_clean_error(invoke("export", tmp_path / "missing.pt", tmp_path / "o"), "not found")
    with pytest.raises(UserError):
        export_checkpoint(ckpt, tmp_path / "o", "ggml")
