"""The busy section: the training step alone, and beside a busy process that bench starts itself
(one core's worth of work, like a second program on a laptop): with torch's thread count, and
with the count `minideep train` picks for the cores left free (minideep_cli/threads.py)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch

from ..config import Config
from ..models import build_model
from ..threads import ThreadPolicy
from .timing import BenchOptions, syncer
from .train import train_step_fn

BUSY_LOOP = "while True: pass"
SETTLE_SECONDS = 0.2  # for the busy process to start spinning before the thread count is chosen


def start_busy() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(SETTLE_SECONDS)
    return proc


def stop_busy(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def bench_busy(cfg: Config, opts: BenchOptions, device: str, dtype) -> dict:
    """Median step seconds alone, beside a busy process with torch's count, and beside it with the
    count the thread policy picks. Rounds alternate alone and beside, so the machine's drift falls
    on all three alike; each beside-round starts a fresh busy process and looks at the machine
    again, as a run would."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    step, sync = train_step_fn(model, cfg, device, dtype), syncer(device)
    most = torch.get_num_threads()

    def timed() -> float:
        start = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - start

    for _ in range(opts.warmup):
        step()
    times: dict[str, list[float]] = {"alone": [], "busy": [], "busy_policy": []}
    chosen: list[int] = []
    try:
        for _ in range(opts.repeats):
            times["alone"].append(timed())
            proc = start_busy()
            try:
                times["busy"].append(timed())
                policy = ThreadPolicy(0, most=most)
                choice = policy.start()
                chosen.append(choice["threads"])
                times["busy_policy"].append(timed())
            finally:
                stop_busy(proc)
                torch.set_num_threads(most)
    finally:
        torch.set_num_threads(most)
    alone, busy, policy = (statistics.median(times[k]) for k in ("alone", "busy", "busy_policy"))
    return {"threads": most, "policy_threads": statistics.median_low(chosen), "alone_ms": alone * 1e3,
            "busy_ms": busy * 1e3, "busy_policy_ms": policy * 1e3,
            "busy_ratio": busy / alone, "busy_policy_ratio": policy / alone}
