"""Ctrl-C during training saves a checkpoint at a step boundary and exits cleanly (130, as a shell
reports an interrupted command, so scripts can tell it from a finished run)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from minideep_cli.checkpoint import load_checkpoint


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, small_data):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "minideep_cli", "train", "--preset", "cpu", "--data", str(small_data),
           "--out", str(run), "-o", "model.n_layer=1", "-o", "model.n_embd=32", "-o", "model.block_size=32",
           "-o", "train.batch_size=4", "-o", "train.max_minutes=0", "-o", "train.max_steps=100000",
           "-o", "train.eval_interval=100000", "-o", "train.log_interval=1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's code
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not (run / "tb").exists() and time.time() < deadline:  # training has started
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopped at step" in out
    state = load_checkpoint(run / "last.pt")
    assert state["loop"]["step"] > 0
    assert not list(run.glob(".*.tmp"))  # no half-written checkpoint left behind
