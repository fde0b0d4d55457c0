"""The commands end to end through typer's CliRunner, and what bad input gets back."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, invoke

TINY = ["-o", "model.n_layer=1", "-o", "model.n_embd=32", "-o", "model.block_size=32", "-o", "train.batch_size=4",
        "-o", "train.max_minutes=0", "-o", "train.max_steps=6", "-o", "train.eval_interval=3",
        "-o", "train.eval_iters=1", "-o", "train.sample_tokens=8", "-o", "model.n_experts=4"]


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tokenize -> train (moe) through the CLI, once for the module."""
    root = tmp_path_factory.mktemp("cli")
    text = root / "in.txt"
    from minideep_cli.data import bundled_corpus
    text.write_text(bundled_corpus().read_text()[:60000])
    r = invoke("tokenize", text, "--vocab-size", 300, "--out", root / "data")
    assert r.exit_code == 0, r.output
    r = invoke("train", "--preset", "cpu", "--data", root / "data", "--out", root / "run", *TINY)
    assert r.exit_code == 0, r.output
    return root, r


def test_help_lists_every_command_and_examples():
    r = invoke("--help")
    for cmd in ["tokenize", "train", "eval", "sample", "inspect-routing", "bench"]:
        assert cmd in r.output
    assert "not yet available" not in r.output  # every command is implemented
    for cmd in ["tokenize", "train", "eval", "sample"]:
        assert "Example" in invoke(cmd, "--help").output
    assert invoke("--version").output.startswith("minideep ")


def test_train_prints_bpb_and_sample_and_saves_config(trained):
    root, r = trained
    assert "val bits per byte" in r.output and "sample:" in r.output
    assert {"best.pt", "last.pt", "config.yaml", "samples.txt"} <= {p.name for p in (root / "run").iterdir()}
    assert any((root / "run" / "tb").iterdir())


def test_eval_json_and_text(trained):
    root, _ = trained
    r = invoke("eval", root / "run", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["bpb"] > 0 and res["tokens"] > 0
    (root / "held.txt").write_text("To be, or not to be: that is the question.\n")
    r = invoke("eval", root / "run" / "last.pt", "--text", root / "held.txt")
    assert r.exit_code == 0 and "bits per byte" in r.output


def test_sample_streams_with_and_without_cache(trained):
    root, _ = trained
    a = invoke("sample", root / "run", "--prompt", "KING:", "--max-new-tokens", 20, "--temperature", 0)
    b = invoke("sample", root / "run", "--prompt", "KING:", "--max-new-tokens", 20, "--temperature", 0, "--no-cache")
    assert a.exit_code == 0 and a.stdout.startswith("KING:") and a.stdout == b.stdout
    c = invoke("sample", root / "run", "--num-samples", 2, "--max-new-tokens", 5, "--top-p", 0.9, "--top-k", 10)
    assert c.exit_code == 0 and c.stdout.count("--- sample") == 2


def test_resume_through_the_cli(trained, tmp_path):
    import shutil
    root, _ = trained
    shutil.copytree(root / "run", tmp_path / "run")
    r = invoke("train", "--resume", "--out", tmp_path / "run", "-o", "train.max_steps=9")
    assert r.exit_code == 0, r.output
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["loop"]["step"] == 9


def test_bad_input_files(tmp_path):
    assert_clean_error(invoke("tokenize", tmp_path / "missing.txt"), "not found")
    (tmp_path / "empty.txt").write_text("")
    assert_clean_error(invoke("tokenize", tmp_path / "empty.txt"), "empty")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)) * 10)
    assert_clean_error(invoke("tokenize", tmp_path / "bin.dat"), "binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert_clean_error(invoke("tokenize", tmp_path / "latin1.txt"), "UTF-8")


def test_bad_options(tmp_path):
    assert_clean_error(invoke("train", "--preset", "laptop"), "unknown preset")
    assert_clean_error(invoke("train", "-o", "train.lrr=1"), "did you mean 'train.lr'")
    assert_clean_error(invoke("train", "--arch", "rnn"), "unknown arch")
    assert_clean_error(invoke("train", "-o", "model.top_k=9", "-o", "model.n_experts=4"), "top_k")
    assert_clean_error(invoke("train", "--config", tmp_path / "nope.yaml"), "not found")
    assert_clean_error(invoke("inspect-routing"), "no checkpoint given")


def test_bad_checkpoints_leave_files_untouched(trained, tmp_path):
    root, _ = trained
    good = (root / "run" / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01garbage" * 100)
    (tmp_path / "notes.txt").write_text("just text\n")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    before = digest(tmp_path)
    for name in ["truncated.pt", "garbage.pt", "notes.txt", "other.pt"]:
        for cmd in (["eval"], ["sample", "--max-new-tokens", "3"]):
            assert_clean_error(invoke(*cmd[:1], tmp_path / name, *cmd[1:]), name)
    assert_clean_error(invoke("eval", tmp_path / "missing.pt"), "not found")
    assert digest(tmp_path) == before


def test_checkpoints_with_missing_or_damaged_parts_are_one_line_errors(trained, tmp_path):
    root, _ = trained
    good = torch.load(root / "run" / "last.pt", weights_only=True)
    bad = {"noloop": ({**good, "loop": None}, "loop should be a mapping"),
           "nomodel": ({**good, "model": "x"}, "model should be a mapping"),
           "badtok": ({**good, "tokenizer": "garbage"}, "tokenizer in"),
           "nokey": ({**good, "model": dict(list(good["model"].items())[1:])}, "tok_emb.weight is missing"),
           "badcfg": ({**good, "config": {**good["config"], "model": {**good["config"]["model"], "n_head": 0}}},
                      "n_head must be positive")}
    for name, (state, needle) in bad.items():
        torch.save(state, tmp_path / f"{name}.pt")
        for cmd in (["eval"], ["sample", "--max-new-tokens", "3"], ["export", "--format", "safetensors"]):
            extra = [tmp_path / f"out-{name}"] if cmd[0] == "export" else []
            assert_clean_error(invoke(cmd[0], tmp_path / f"{name}.pt", *extra, *cmd[1:]), needle)
    flipped = bytearray((root / "run" / "last.pt").read_bytes())  # silent corruption: a few bytes in the weights
    for i in range(len(flipped) // 2, len(flipped) // 2 + 16):
        flipped[i] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(flipped)
    assert_clean_error(invoke("eval", tmp_path / "flipped.pt"), "does not match its checksum")
    data = tmp_path / "data"
    import shutil
    shutil.copytree(root / "data", data)
    (data / "tokenizer.json").write_text("garbage")
    assert_clean_error(invoke("train", "--data", data, "--out", tmp_path / "r", *TINY), "tokenizer.json is damaged")


def test_out_of_range_settings_and_resume_flags_are_refused(trained, tmp_path):
    root, _ = trained
    for o, needle in [("model.n_head=0", "n_head must be positive"), ("model.moe_every=0", "moe_every"),
                      ("model.rope_theta=0", "rope_theta"), ("train.warmup=2", "warmup"), ("train.lr=-1", "train.lr"),
                      ("model.n_kv_head=-1", "n_kv_head"), ("sample.top_p=0", "top_p")]:
        assert_clean_error(invoke("train", "-o", o, "--out", tmp_path / "r"), needle)
    assert_clean_error(invoke("train", "--preset", "", "--out", tmp_path / "r"), "unknown preset ''")
    assert_clean_error(invoke("sample", root / "run", "--temperature", "-1"), "--temperature")
    assert_clean_error(invoke("sample", root / "run", "--device", "tpu"), "--device: unknown device 'tpu'")
    assert_clean_error(invoke("train", "--resume", "--out", root / "run", "--arch", "gpt2"), "--arch cannot change it")
    assert not (tmp_path / "r").exists()


def test_a_diverging_run_exits_1_with_its_own_message_only(trained, tmp_path):
    root, _ = trained
    r = invoke("train", "--preset", "cpu", "--data", root / "data", "--out", tmp_path / "r", *TINY, "-o", "train.lr=1e12", "-o", "train.muon_lr=1e12",
               "-o", "train.grad_clip=0", "-o", "train.log_interval=1", "-o", "train.max_steps=30",
               "-o", "train.eval_interval=100")  # no checkpoint before it diverges, at whichever step it does
    assert r.exit_code == 1 and "loss became" in r.output and "No checkpoint had been saved yet" in r.output
    assert "error:" not in r.stderr


def test_failed_train_leaves_an_existing_run_untouched(trained):
    root, _ = trained
    before = digest(root / "run")
    assert_clean_error(invoke("train", "--out", root / "run", "-o", "train.nope=1"), "unknown key")
    assert_clean_error(invoke("train", "--out", root / "run"), "already holds a run")
    assert digest(root / "run") == before
    assert_clean_error(invoke("train", "--out", root / "new", "--data", root / "missing"), "not a tokenized data dir")
    assert not (root / "new").exists()
    (root / "short.txt").write_text("too short for a block of 32 tokens. " * 3)
    assert invoke("tokenize", root / "short.txt", "--vocab-size", 300, "--out", root / "short").exit_code == 0
    assert_clean_error(invoke("train", "--out", root / "new", "--data", root / "short", *TINY), "fewer than model.block_size")
    assert not (root / "new").exists()


def test_tokenize_never_replaces_other_data_or_files_without_force(trained, tmp_path):
    root, _ = trained
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the same small text, again and again. " * 100)
    b.write_text("quite another text, word after word. " * 100)
    out = tmp_path / "data"
    assert invoke("tokenize", a, "--vocab-size", 300, "--out", out).exit_code == 0
    before = digest(out)
    assert invoke("tokenize", a, "--vocab-size", 300, "--out", out).exit_code == 0  # the same command again
    assert digest(out) == before
    for args in ([b, "--vocab-size", 300], [a, "--vocab-size", 290], [a, "--vocab-size", 300, "--val-fraction", 0.2]):
        assert_clean_error(invoke("tokenize", *args, "--out", out), "other text or with other settings", "--force")
    assert digest(out) == before
    run = digest(root / "run")
    assert_clean_error(invoke("tokenize", b, "--vocab-size", 300, "--out", root / "run"), "other files")
    assert_clean_error(invoke("tokenize", b, "--vocab-size", 300, "--out", a), "is a file")
    assert digest(root / "run") == run
    assert invoke("tokenize", b, "--vocab-size", 300, "--out", out, "--force").exit_code == 0
    assert digest(out) != before


def test_tokenize_failure_leaves_existing_data_untouched(trained):
    root, _ = trained
    before = digest(root / "data")
    assert_clean_error(invoke("tokenize", root / "nothing.txt", "--out", root / "data"), "not found")
    assert digest(root / "data") == before


def test_a_muon_checkpoint_of_the_default_recipe_routes_evaluates_and_exports(trained, tmp_path):
    """The cpu preset trains with Muon + AdamW and QK-norm: its checkpoint holds both optimizers'
    state in one dict, and every reader takes it (eval and sample: the tests above)."""
    from minideep_cli.checkpoint import load_checkpoint

    root, _ = trained
    ckpt = load_checkpoint(root / "run" / "last.pt")
    kinds = {g["kind"] for g in ckpt["optimizer"]["param_groups"]}
    assert kinds == {"muon", "muon_experts", "adamw"} and ckpt["config"]["model"]["qk_norm"]
    r = invoke("inspect-routing", root / "run" / "last.pt", "--prompt", "ROMEO:", "--json", tmp_path / "r.json",
               "--device", "cpu")
    assert r.exit_code == 0 and json.loads((tmp_path / "r.json").read_text())["layers"], r.output
    pytest.importorskip("transformers")
    r = invoke("export", root / "run", tmp_path / "hf")
    assert r.exit_code == 0 and "Qwen3MoeForCausalLM" in r.output, r.output
