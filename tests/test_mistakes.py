"""Issue 16: every user mistake is one line naming the file or setting, and nothing on disk is lost."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minideep_cli.config import resolve_config
from minideep_cli.errors import UserError

from test_cli import TINY, assert_clean_error, digest, invoke


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("override, name", [
    ("train.max_minutes=nan", "train.max_minutes"),
    ("model.capacity_factor=nan", "model.capacity_factor"),
    ("train.lr=1e300", "train.lr"),
    ("train.lr=inf", "train.lr"),
    ("model.router_noise_std=-inf", "model.router_noise_std"),
    ("train.seed=1180591620717411303424", "train.seed"),  # 2**70
])
def test_non_finite_or_huge_numbers_are_refused_by_name(override, name):
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        resolve_config(None, None, [override, "train.max_steps=0", "train.max_minutes=1"][::-1])


def test_negative_max_steps_is_called_negative():
    with pytest.raises(UserError, match=r"train\.max_steps cannot be negative"):
        resolve_config(None, None, ["train.max_steps=-5"])


def test_every_moe_only_key_is_refused_under_gpt2_but_presets_keep_working():
    for override in ("model.n_kv_head=2", "model.n_experts=4", "model.attention=mla", "model.rope_theta=500"):
        with pytest.raises(UserError, match=r"moe-arch setting"):
            resolve_config(None, None, [override], arch="gpt2")
    for preset in ("cpu", "rtx3060", "a100", "seed"):  # their moe: sections do not apply to gpt2
        assert resolve_config(preset, None, [], arch="gpt2").model.arch == "gpt2"
    assert resolve_config(None, None, ["model.n_kv_head=2"], arch="moe").model.n_kv_head == 2


def test_invalid_utf8_prompt_is_refused_before_training(small_data, tmp_path):
    with pytest.raises(UserError, match=r"sample\.prompt is not valid UTF-8"):
        resolve_config(None, None, ["sample.prompt=\udcffabc"])
    r = invoke("train", "--preset", "cpu", "--data", small_data, "--out", tmp_path / "run", *TINY,
               "-o", "sample.prompt=\udcffabc")
    assert_clean_error(r, "sample.prompt")
    assert not (tmp_path / "run").exists()


def test_sample_refuses_invalid_utf8_prompt_and_huge_seed(tmp_path):
    assert_clean_error(invoke("sample", tmp_path, "--prompt", "\udcffabc"), "--prompt")
    assert_clean_error(invoke("sample", tmp_path, "--seed", 2**70), "--seed")


# ---------------------------------------------------------------- train: run dirs, signals, checkpoints

from test_cli import trained  # noqa: E402,F401  (a tokenized data dir and a short moe run)


@pytest.mark.parametrize("name", ["best.pt", "config.yaml"])
def test_train_refuses_a_non_empty_out_and_changes_nothing(tmp_path, small_data, name):
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_bytes(b"the user's own file")
    r = invoke("train", "--preset", "cpu", "--data", small_data, "--out", out, *TINY)
    assert_clean_error(r, str(out), name, "--force")
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_bytes() == b"the user's own file"


def test_stale_checkpoint_temporaries_of_dead_writers_are_removed(tmp_path, small_data):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".last.pt.minideep-{dead.pid}-0123abcd.tmp"
    live = out / f".last.pt.minideep-{os.getpid()}-0123abcd.tmp"  # a writer still at work: kept
    stale.write_bytes(b"x" * 1000)
    from minideep_cli.files import remove_stale_temps

    live.write_bytes(b"x")
    remove_stale_temps(out, lambda name: name == "last.pt")
    assert not stale.exists() and live.exists()
    live.unlink()
    stale.write_bytes(b"x" * 1000)  # a run dir holding only such leftovers is a fresh one
    r = invoke("train", "--preset", "cpu", "--data", small_data, "--out", out, *TINY, "-o", "train.sample_tokens=0")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and (out / "last.pt").is_file()


def test_sigterm_saves_and_exits_143(tmp_path, small_data):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "minideep_cli", "train", "--preset", "cpu", "--data", str(small_data),
           "--out", str(run), *TINY, "-o", "train.max_steps=100000", "-o", "train.eval_interval=100000"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's code
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not (run / "tb").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped at step" in out and (run / "last.pt").is_file()


def _enforce_fail(exc):
    def save(obj, f):  # what torch.save raises when its writer fails: the cause is the context
        f.write(b"partial")
        try:
            raise exc
        except BaseException:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    return save


@pytest.mark.parametrize("exc, needle", [(OSError(errno.ENOSPC, "No space left on device"), "no space left on /"),
                                         (KeyboardInterrupt(), "was interrupted")])
def test_failed_checkpoint_save_says_why_and_keeps_the_previous(tmp_path, monkeypatch, exc, needle):
    from minideep_cli.checkpoint import save_checkpoint

    path = tmp_path / "last.pt"
    path.write_bytes(b"previous")
    monkeypatch.setattr(torch, "save", _enforce_fail(exc))
    with pytest.raises(UserError, match="intact") as e:
        save_checkpoint({"model": {}}, path)
    assert needle in str(e.value) and str(path) in str(e.value)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_resume_with_another_model_shape_names_the_weight(trained):
    root, _ = trained
    r = invoke("train", "--resume", "--out", root / "run", "-o", "model.n_embd=64")
    assert_clean_error(r, "last.pt", "has shape", "the config gives")


def _tweaked_checkpoint(trained, tmp_path, **model):
    from minideep_cli.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained[0] / "run" / "best.pt")
    state["config"]["model"].update(model)
    for k in ("kind", "format"):
        state.pop(k)
    return save_checkpoint(state, tmp_path / "tweaked.pt")


def test_huge_model_claim_is_refused_before_building(trained, tmp_path, monkeypatch):
    path = _tweaked_checkpoint(trained, tmp_path, n_layer=10**6)
    import minideep_cli.models

    monkeypatch.setattr(minideep_cli.models, "build_model", lambda cfg: pytest.fail("built the model"))
    assert_clean_error(invoke("eval", path), "tweaked.pt", "n_layer is 1,000,000")
    monkeypatch.undo()
    assert_clean_error(invoke("eval", _tweaked_checkpoint(trained, tmp_path, n_embd=64)), "tweaked.pt", "has shape")


def test_checkpoint_with_code_is_refused_in_one_whole_sentence(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"kind": "minideep-checkpoint", "x": Path("p")}, path)
    r = invoke("eval", path)
    assert_clean_error(r, "code.pt", "refused", "pathlib")
    assert "option" not in r.stderr


def _edit_central_directory(src: Path, dst: Path, offset: int, value: bytes) -> Path:
    data = bytearray(src.read_bytes())
    at = data.index(b"PK\x01\x02") + offset  # the first central directory entry
    data[at:at + len(value)] = value
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("offset, value", [(6, b"\x80\x00"),  # "zip file version 12.8"
                                           (8, b"\x01\x00"),  # "encrypted, password required"
                                           (8, b"\x00\x08")])  # names are UTF-8 ... with a bad byte below
def test_damaged_zip_headers_name_the_file(trained, tmp_path, offset, value):
    path = _edit_central_directory(trained[0] / "run" / "best.pt", tmp_path / "bad.pt", offset, value)
    if value == b"\x00\x08":
        data = bytearray(path.read_bytes())
        data[data.index(b"PK\x01\x02") + 46] = 0xFF  # the first byte of its name
        path.write_bytes(bytes(data))
    assert_clean_error(invoke("eval", path), "bad.pt", "is damaged")


def test_eval_of_a_device_file_is_not_called_missing():
    assert_clean_error(invoke("eval", "/dev/zero"), "/dev/zero", "not a checkpoint file")


# ---------------------------------------------------------------- tokenize

from test_data import OPTS, docs  # noqa: E402,F401


@pytest.mark.parametrize("name", ["train.bin", "val.bin", "tokenizer.json"])
def test_tokenize_keeps_a_users_own_token_file(tmp_path, name):
    text = tmp_path / "in.txt"
    text.write_text("hello world, " * 400)
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_bytes(b"the user's own")
    assert_clean_error(invoke("tokenize", text, "--vocab-size", 300, "--out", out), str(out), name, "--force")
    assert digest(out) == {name: digest(out)[name]} and (out / name).read_bytes() == b"the user's own"
    assert invoke("tokenize", text, "--vocab-size", 300, "--out", out, "--force").exit_code == 0


def test_sharded_tokenize_notices_an_edit_that_keeps_the_size(tmp_path):
    from minideep_cli.data import Source, tokenize_source

    files = []
    for i in range(3):
        f = tmp_path / f"doc{i}.txt"
        f.write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 300)
        files.append(f)
    opts = dict(vocab_size=300, shard_tokens=2000, val_tokens=500, tokenizer_sample_bytes=30000, workers=1)
    tokenize_source(Source(files), tmp_path / "d", **opts)
    before = digest(tmp_path / "d")
    files[1].write_text(files[1].read_text().replace("quick", "QUICK"))  # same size, other text
    with pytest.raises(UserError, match="other text or with other settings"):
        tokenize_source(Source(files), tmp_path / "d", **opts)
    assert digest(tmp_path / "d") == before
    assert tokenize_source(Source(files), tmp_path / "d", force=True, **opts)["documents"] == 3


def test_parquet_with_a_non_text_column_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": list(range(10))}), tmp_path / "n.parquet")
    assert_clean_error(invoke("tokenize", tmp_path / "n.parquet", "--out", tmp_path / "d"), "n.parquet", "'text'",
                       "not text")


# ---------------------------------------------------------------- export, bench, inspect-routing


def test_export_force_into_the_current_folder_is_refused(trained, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    r = invoke("export", trained[0] / "run", ".", "--format", "safetensors", "--force")
    assert_clean_error(r, "current folder")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in here.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("where", ["tensors", "rename"])
def test_export_that_cannot_write_says_so_and_leaves_out_dir_as_it_was(tmp_path, monkeypatch, where):
    import minideep_cli.export as export

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("before")

    class SafetensorError(Exception):
        pass

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    real_replace = os.replace

    def busy(src, dst):
        if Path(src) == out:
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_replace(src, dst)

    if where == "rename":
        monkeypatch.setattr(export.os, "replace", busy)
    with pytest.raises(UserError, match="cannot write .*out: (Error while serializing|Device or resource busy)"):
        export.write_folder(out, {"a.txt": "x", "model.safetensors": {"w": torch.zeros(2)}}, True,
                            full if where == "tensors" else (lambda t, p, metadata: Path(p).write_bytes(b"1")))
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "before"


def test_bench_compare_hf_without_transformers_fails_first(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    import minideep_cli.bench as bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("ran the other sections first"))
    assert_clean_error(invoke("bench", "--quick", "--compare-hf"), "--compare-hf", "transformers")


def test_reports_into_an_unwritable_place_fail_before_the_work(trained, monkeypatch, tmp_path):
    import minideep_cli.bench as bench

    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = Path.open

    def no_write(self, mode="r", *a, **k):  # a folder we may not write in (tests run as root)
        if self.parent == ro and "x" in mode:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(self, mode, *a, **k)

    monkeypatch.setattr(Path, "open", no_write)
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("benchmarked first"))
    assert_clean_error(invoke("bench", "--quick", "--json", ro / "b.json"), "b.json", "Permission denied")
    for opt in ("--json", "--html"):
        assert_clean_error(invoke("inspect-routing", trained[0] / "run", opt, ro / "r.out"), "r.out",
                           "Permission denied")


def test_resume_of_a_gpt2_run_refuses_a_moe_only_override(trained, tmp_path):
    from minideep_cli.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained[0] / "run" / "last.pt")
    state["config"]["model"]["arch"] = "gpt2"  # only the config is read before the refusal
    save_checkpoint({k: v for k, v in state.items() if k not in ("kind", "format")}, tmp_path / "g" / "last.pt")
    before = digest(tmp_path / "g")
    r = invoke("train", "--resume", "--out", tmp_path / "g", "-o", "model.n_kv_head=2")
    assert_clean_error(r, "model.n_kv_head", "moe-arch setting")
    assert digest(tmp_path / "g") == before
