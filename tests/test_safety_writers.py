"""Issue 35: every output goes through one writer that knows special files; only minideep's own
temporaries are ever removed, only from its own folders; one process writes a run dir; a full
disk, a signal during validation and a spent budget each get one clear line."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import minideep_cli.files as files

from test_cli import TINY, assert_clean_error, digest, invoke, trained  # noqa: F401  (trained: a fixture)

ESTIMATE = ["bench", "--estimate-memory", "--preset", "cpu"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's code


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def cli(*args, **kw):
    """The command in a fresh process (real stdin/stdout/stderr file descriptors)."""
    return subprocess.run([sys.executable, "-m", "minideep_cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


# ---------------------------------------------------------------- 1. one writer for every output


def device_node(path: Path, minor: int) -> Path:
    """A character device like /dev/null (minor 3) or /dev/full (minor 7), made at path: code that
    wrongly replaces its output replaces this one, never the machine's. Needs root (CAP_MKNOD),
    as the report's `--json /dev/null` did."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except OSError as e:
        pytest.skip(f"cannot make a device node here: {e}")
    return path


@pytest.fixture
def null_device(tmp_path):
    return device_node(tmp_path / "null", 3)


def test_bench_json_onto_a_device_writes_through_it(null_device):
    r = invoke(*ESTIMATE, "--json", null_device)
    assert r.exit_code == 0, r.output
    assert stat.S_ISCHR(os.lstat(null_device).st_mode)  # still the device, not a regular file
    assert [p.name for p in null_device.parent.iterdir()] == ["null"]  # no temporary left beside it


def test_inspect_routing_json_and_html_onto_a_device(trained, null_device):  # noqa: F811
    root, _ = trained
    r = invoke("inspect-routing", root / "run", "--max-tokens", 64, "--json", null_device, "--html", null_device)
    assert r.exit_code == 0, r.output
    assert stat.S_ISCHR(os.lstat(null_device).st_mode)
    assert ": 1 layer, MoE at 0; 4 experts" in r.output  # TINY: one layer, singular


def test_json_into_a_fifo_is_read_by_its_reader(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)  # never holds up pytest
    reader.start()
    r = invoke(*ESTIMATE, "--json", fifo)
    reader.join(timeout=60)
    assert r.exit_code == 0, r.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and got, "the FIFO was replaced, its reader got nothing"
    assert json.loads(got[0])["schema_version"] == 1


def test_json_dash_prints_only_json_on_stdout():
    r = invoke(*ESTIMATE, "--json", "-")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)  # the whole of stdout is the JSON; the table went to stderr
    assert report["memory"] and "predicted peak" in r.stderr


def test_json_onto_dev_stdout_prints_json(tmp_path):
    # /dev/stdout is a link to /proc/self/fd/1; this test's own copy of it is what a wrong writer
    # would replace (the machine's /dev/stdout is left alone)
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/proc/self/fd/1")
    for path in (stdout, "/dev/fd/1"):
        r = cli(*ESTIMATE, "--json", path, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["schema_version"] == 1
        assert "wrote" not in r.stdout + r.stderr
    assert stdout.is_symlink()


def test_json_onto_a_symlink_keeps_the_link_and_updates_its_target(tmp_path):
    (tmp_path / "results").mkdir()
    target = tmp_path / "results" / "bench.json"
    target.write_text("old")
    os.chmod(target, 0o600)  # the user's permissions stay
    link = tmp_path / "link.json"
    link.symlink_to(target)
    r = invoke(*ESTIMATE, "--json", link)
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["schema_version"] == 1
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["bench.json"]


def test_json_onto_dev_full_is_one_line_and_a_failure(tmp_path):
    full = device_node(tmp_path / "full", 7)  # a /dev/full of this test's own
    r = invoke(*ESTIMATE, "--json", full)
    assert_clean_error(r, str(full), "No space left")
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_routing_history_json_dash(trained):  # noqa: F811
    root, _ = trained
    r = invoke("inspect-routing", root / "run", "--history", "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["run_dir"] == str(root / "run")


def test_write_output_replaces_a_regular_file_atomically(tmp_path, monkeypatch):
    f = tmp_path / "out.json"
    f.write_text("old")

    def fail(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)  # the disk fills while the new file is written
    with pytest.raises(Exception, match="No space left"):
        files.write_output(f, "new")
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    monkeypatch.undo()
    files.write_output(f, "new")
    assert f.read_text() == "new" and not f.is_symlink()


# ---------------------------------------------------------------- 2. only our own temporaries, only in our folders


def test_temporary_names_are_ours_and_only_ours(tmp_path):
    name = files.temp_name(tmp_path / "last.pt").name
    assert name.startswith(".last.pt.minideep-") and name.endswith(".tmp")
    pid = dead_pid()
    own = lambda n: n == "last.pt"  # noqa: E731
    assert files.stale_temp(f".last.pt.minideep-{pid}-0123abcd.tmp", own)
    assert files.stale_temp(f".last.pt.{pid}.0123abcd.tmp", own)  # what earlier versions named it
    assert not files.stale_temp(f".last.pt.minideep-{os.getpid()}-0123abcd.tmp", own)  # its writer is alive
    for users in (".important.tmp", ".thesis.99999.v2.tmp", f".notes.minideep-{pid}-0123abcd.tmp",
                  f".last.pt.{pid}.v2.tmp", f".last.pt.minideep-{pid}-XYZ.tmp"):
        assert not files.stale_temp(users, own), users


def test_tokenize_keeps_a_users_hidden_tmp_file(tmp_path, corpus_text):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(corpus_text[i * 20000:(i + 1) * 20000])
    out = tmp_path / "hid"
    out.mkdir()
    (out / ".important.tmp").write_text("mine")
    r = invoke("tokenize", docs, "--vocab-size", 300, "--out", out, "--tokenizer-sample-bytes", 20000)
    assert r.exit_code == 0, r.output
    assert (out / ".important.tmp").read_text() == "mine" and (out / "meta.json").is_file()


def test_train_keeps_a_users_hidden_file_and_refuses_the_folder(tmp_path, small_data):
    out = tmp_path / "userhid"
    out.mkdir()
    (out / ".thesis.99999.v2.tmp").write_text("chapter 1")
    r = invoke("train", "--preset", "cpu", "--data", small_data, "--out", out, *TINY)
    assert_clean_error(r, str(out), ".thesis.99999.v2.tmp")
    assert digest(out) == {".thesis.99999.v2.tmp": digest(out)[".thesis.99999.v2.tmp"]}
    assert (out / ".thesis.99999.v2.tmp").read_text() == "chapter 1"


def test_a_users_progress_json_does_not_make_a_folder_ours(tmp_path, corpus_text):
    text = tmp_path / "in.txt"
    text.write_text(corpus_text[:30000])
    for content in ('{"step": 3, "notes": "my experiment"}', "[1, 2]", "not json"):
        out = tmp_path / "mine"
        out.mkdir(exist_ok=True)
        (out / "progress.json").write_text(content)
        r = invoke("tokenize", text, "--vocab-size", 300, "--out", out)
        assert_clean_error(r, str(out), "progress.json", "--force")
        assert [p.name for p in out.iterdir()] == ["progress.json"] and (out / "progress.json").read_text() == content


def test_export_removes_what_a_killed_export_left_and_nothing_else(trained, tmp_path):  # noqa: F811
    root, _ = trained
    pid = dead_pid()
    out = tmp_path / "exp"
    ours = [tmp_path / f".exp.minideep-{pid}-0123abcd.tmp", tmp_path / f".exp.{pid}.89abcdef.tmp"]
    for d in ours:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half" * 1000)
    users = [tmp_path / ".exp.tmp", tmp_path / f".other.minideep-{pid}-0123abcd.tmp"]
    for d in users:
        d.mkdir()
        (d / "keep").write_text("mine")
    r = invoke("export", root / "run", out, "--format", "safetensors")
    assert r.exit_code == 0, r.output
    assert not any(d.exists() for d in ours)
    assert all((d / "keep").read_text() == "mine" for d in users)


def test_export_killed_while_replacing_puts_the_previous_folder_back(trained, tmp_path):  # noqa: F811
    root, _ = trained
    out = tmp_path / "exp"
    old = tmp_path / f".exp.minideep-{dead_pid()}-0123abcd.old"  # kill -9 after moving out aside
    (old / "replaced").mkdir(parents=True)
    (old / "replaced" / "config.json").write_text("the previous export")
    r = invoke("export", root / "run", out, "--format", "safetensors")
    assert_clean_error(r, str(out), "--force")  # it is back, so replacing it needs --force again
    assert (out / "config.json").read_text() == "the previous export" and not old.exists()


# ---------------------------------------------------------------- 2b. one writer per run dir


def test_two_trainings_of_one_run_dir_exactly_one_runs(tmp_path, small_data):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "minideep_cli", "train", "--preset", "cpu", "--data", str(small_data), "--out", str(run),
         *TINY, "-o", "train.max_steps=100000", "-o", "train.eval_interval=2", "-o", "train.sample_tokens=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 120
        while not (run / "last.pt").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (run / "last.pt").is_file(), first.stderr.read() if first.poll() is not None else "no last.pt"
        assert (run / files.LOCK).read_text() == str(first.pid)
        for extra in (["--resume"], ["--force"], []):
            r = invoke("train", "--out", run, *extra, *(["--preset", "cpu", "--data", small_data] if not extra or
                                                       extra == ["--force"] else []), "-o", "train.max_steps=200000")  # a budget ahead of the run
            assert_clean_error(r, str(run), f"PID {first.pid}", "in use")
        assert first.poll() is None  # the first still runs
    finally:
        first.send_signal(signal.SIGKILL)  # kill -9: the lock must not stay stuck
        first.wait(timeout=60)
    files.lock_folder(run).close()  # free again


def test_lock_names_the_holder(tmp_path):
    from minideep_cli.errors import UserError

    held = files.lock_folder(tmp_path / "run")
    with pytest.raises(UserError, match=f"PID {os.getpid()}"):
        files.lock_folder(tmp_path / "run")  # a second open file description: flock refuses it too
    held.close()
    files.lock_folder(tmp_path / "run").close()


# ---------------------------------------------------------------- 3. a full disk on --resume


def test_resume_on_a_full_disk_is_one_line_and_keeps_the_checkpoint(tmp_path, small_data, monkeypatch, capfd):
    run = tmp_path / "run"
    r = invoke("train", "--preset", "cpu", "--data", small_data, "--out", run, *TINY, "-o", "train.sample_tokens=0")
    assert r.exit_code == 0, r.output
    before = (run / "last.pt").read_bytes()
    from tensorboard.compat.tensorflow_stub.io import gfile

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gfile.LocalFileSystem, "write", full)  # what TensorBoard's writer thread calls
    monkeypatch.setattr(gfile.LocalFileSystem, "append", full)
    r = invoke("train", "--resume", "--out", run, "-o", "train.max_steps=12")
    assert_clean_error(r, "disk", "full", "last.pt", "intact")
    assert "Traceback" not in capfd.readouterr().err  # nor from TensorBoard's thread
    assert (run / "last.pt").read_bytes() == before


# ---------------------------------------------------------------- 7d. signals during validation, a budget behind the run


def test_sigterm_during_a_long_validation_saves_and_exits_143_promptly(tmp_path, small_data):
    from minideep_cli.checkpoint import load_checkpoint

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "minideep_cli", "train", "--preset", "cpu", "--data", str(small_data), "--out", str(run),
           *TINY, "-o", "train.max_steps=1000", "-o", "train.ckpt_interval=1", "-o", "train.eval_interval=2",
           "-o", "train.eval_iters=10000"]  # step 2's validation would take minutes
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 120
        while not (run / "last.pt").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)  # step 1 saved: step 2 follows in milliseconds, then its validation
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "stopped at step 2" in out and "Traceback" not in err
    assert load_checkpoint(run / "last.pt")["loop"]["step"] == 2


def _interrupt_at(monkeypatch, method: str, step: int):
    """A second Ctrl-C arriving inside Trainer.method once the run reaches step."""
    from minideep_cli import train as train_mod

    real = getattr(train_mod.Trainer, method)

    def second_signal(self, *a, **k):
        if self.state.step >= step:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(train_mod.Trainer, method, second_signal)


def test_a_second_signal_between_steps_still_saves(tmp_path, small_data, monkeypatch):
    from conftest import tiny_train_cfg
    from minideep_cli.checkpoint import load_checkpoint
    from minideep_cli.train import train

    _interrupt_at(monkeypatch, "log", 4)
    try:
        res = train(tiny_train_cfg(small_data, max_steps=20, grad_accum=1), tmp_path / "run")
    except KeyboardInterrupt:  # (not raised: pytest would stop the whole session)
        pytest.fail("the second signal stopped the run without saving")
    assert res.stopped == "interrupted" and res.step == 4
    assert load_checkpoint(tmp_path / "run" / "last.pt")["loop"]["step"] == 4


def test_a_second_signal_inside_a_step_says_nothing_was_saved(tmp_path, small_data, monkeypatch):
    from conftest import tiny_train_cfg
    from minideep_cli.checkpoint import load_checkpoint
    from minideep_cli.errors import UserError
    from minideep_cli.train import train

    _interrupt_at(monkeypatch, "train_step", 4)  # step 4 validated and saved, step 5 half done
    with pytest.raises(UserError, match=r"second signal during step 5, without saving it; .*last\.pt .*intact"):
        try:
            train(tiny_train_cfg(small_data, max_steps=20, grad_accum=1, eval_interval=2), tmp_path / "run")
        except KeyboardInterrupt:
            pytest.fail("the second signal escaped as KeyboardInterrupt, with no word of what was saved")
    assert load_checkpoint(tmp_path / "run" / "last.pt")["loop"]["step"] == 4
    files.lock_folder(tmp_path / "run").close()  # and the run dir is free again


def test_resume_with_a_budget_behind_the_run_is_refused(trained):  # noqa: F811
    root, _ = trained
    before = digest(root / "run")
    r = invoke("train", "--resume", "--out", root / "run", "-o", "train.max_steps=3")
    assert_clean_error(r, "already at step 6", "train.max_steps=3")
    r = invoke("train", "--resume", "--out", root / "run", "-o", "train.max_minutes=0.0001", "-o", "train.max_steps=0")
    assert_clean_error(r, "already at step 6", "train.max_minutes=0.0001")
    assert digest(root / "run") == before


# ---------------------------------------------------------------- 11. gpu-check without the test extra


def test_gpu_check_without_pytest_says_which_install_it_needs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    hide = ("import sys, runpy; sys.modules['pytest'] = None; "  # as if the test extra were not installed
            f"sys.argv = ['gpu_check.py', {str(tmp_path / 'out')!r}, '--cpu']; "
            f"runpy.run_path({str(root / 'scripts' / 'gpu_check.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.count("\n") == 1 and "pip install -e '.[test]'" in r.stdout


# ---------------------------------------------------------------- cosmetics: plurals, durations, help, whole messages


def test_counts_and_durations_read_as_english():
    from minideep_cli.views import count, duration

    assert [count(n, "document") for n in (0, 1, 2, 1200)] == ["0 documents", "1 document", "2 documents",
                                                                 "1,200 documents"]
    assert [duration(s) for s in (8.2, 45, 150, 9000)] == ["8.2 s", "45 s", "2.5 min", "2.5 h"]


def test_a_short_run_reports_seconds_and_one_step(tmp_path):
    from rich.console import Console

    from minideep_cli.train import TrainResult
    from minideep_cli.views.train import render_result

    console = Console(record=True, width=200)
    val = {"bpb": 2.5, "loss": 1.7, "perplexity": 5.5, "tokens": 100}
    render_result(console, TrainResult(tmp_path, step=1, tokens=128, elapsed=8.2, stopped="done", val=val, val_step=1))
    assert "done: 1 step, 128 tokens in 8.2 s" in console.export_text()


def test_one_document_tokenize_summary_is_singular(tmp_path):
    from minideep_cli.views.tokenize import split_summary

    meta = {"settings": {"val_tokens": 10, "shard_tokens": 20, "shuffle_seed": None}, "vocab_size": 300,
            "documents": 2, "val_documents": 1, "train_tokens": 20, "val_tokens": 10, "val_bytes": 40,
            "train_bytes": 80, "shards": [{"split": "val"}, {"split": "train"}], "shard_tokens": 20}
    text = split_summary(tmp_path, meta)
    assert "2 documents" in text and "validation: 1 document," in text and "train: 1 document," in text
    assert "in 1 shard of up to" in text


def test_sample_help_shows_every_default_on_its_line():
    r = invoke("sample", "--help")
    assert r.exit_code == 0
    assert all(line.count("[default:") == line.count("]") or "[default:" not in line for line in r.output.splitlines())
    assert "[default: (a newline)]" in r.output


def test_long_reasons_are_not_cut(tmp_path, monkeypatch):
    import torch

    from minideep_cli.checkpoint import load_checkpoint
    from minideep_cli.errors import UserError, first_line

    reason = "the file ends inside the record of tensor " + "model.blocks.0.mlp.experts.w1 " * 8 + "(offset 123456)"
    assert len(reason) > 200 and first_line(RuntimeError(f"\n{reason}\nmore")) == reason
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(ValueError("word " * 1000)).endswith("word …") and len(first_line(ValueError("word " * 1000))) < 1010
    path = tmp_path / "c.pt"
    torch.save({"kind": "minideep-checkpoint"}, path)

    def damaged(*a, **k):
        raise RuntimeError(reason)

    monkeypatch.setattr(torch, "load", damaged)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(e.value).endswith(reason)


def test_export_into_a_symlinked_folder_keeps_the_link(trained, tmp_path):  # noqa: F811
    root, _ = trained
    real = tmp_path / "exports" / "v1"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("an older export")
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    r = invoke("export", root / "run", link, "--format", "safetensors", "--force")
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "minideep_config.json").is_file() and not (real / "old.txt").exists()
    assert sorted(p.name for p in real.parent.iterdir()) == ["v1"]  # nothing left beside it
