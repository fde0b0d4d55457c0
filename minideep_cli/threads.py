"""How many threads torch computes with on the CPU: as many as the cores that other work leaves
free, measured when a run starts and again while it runs (docs/design.md, Threads).

Torch's OpenMP threads wait for one another at the end of every parallel region, so a step runs
at the pace of its slowest thread: when another busy process takes one of two cores, a step on two
threads keeps stopping for the thread that the kernel took off its core, and is slower than the
same step on the one core that is still free (docs/results/2026-12-07-threads.md). So the count
follows the free cores. They are read from /proc/stat: the time every CPU this process may run on
was busy, minus this process's own CPU time, is the work of others. Linux only; elsewhere, and
with train.threads set, the count stays fixed."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

CHECK_SECONDS = 10.0  # how often a run looks again: a few dozen steps, so one slow step decides nothing
FIRST_LOOK_SECONDS = 0.3  # the look before the first step


@dataclass
class CpuTimes:
    """Seconds of CPU time: busy on the CPUs we may run on (all processes), and this process's own."""
    wall: float
    busy: float
    own: float


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (taskset, cgroups), else all of them."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def read_cpu_times(cpus: list[int], stat_path: str = "/proc/stat") -> Optional[CpuTimes]:
    """Now's totals, or None where /proc/stat is missing. A CPU's line is `cpuN user nice system
    idle iowait irq softirq steal ...` in clock ticks; busy is everything but idle and iowait (time
    the hypervisor stole is not ours to use either)."""
    try:
        with open(stat_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted, busy = {f"cpu{c}" for c in cpus}, 0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in wanted:
            values = [int(v) for v in parts[1:9]]
            busy += sum(values) - values[3] - values[4]
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return CpuTimes(time.perf_counter(), busy / tick, time.process_time())


def others_cores(before: CpuTimes, after: CpuTimes) -> float:
    """How many cores other processes kept busy between two readings, on average."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / wall


def threads_for(free_cores: float, cpus: int, most: int) -> int:
    """Threads for this many free cores: torch's own count (`most`: one per physical core) scaled
    by the share of CPUs that are free, rounded half up, from 1 to `most`."""
    return max(1, min(most, math.floor(most * free_cores / cpus + 0.5)))


class ThreadPolicy:
    """The thread count of one run. `setting` 0 follows the free cores (look at `start`, then at
    most every CHECK_SECONDS at `check`); N > 0 is N threads throughout."""

    def __init__(self, setting: int = 0, read: Callable[[], Optional[CpuTimes]] | None = None,
                 set_threads: Callable[[int], None] = torch.set_num_threads, most: Optional[int] = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.cpus = allowed_cpus()
        self.clock = clock  # the clock CpuTimes.wall reads: checked first, so a step reads /proc/stat only to look
        self.read = read or (lambda: read_cpu_times(self.cpus))
        self.set_threads = set_threads
        self.most = most or torch.get_num_threads()  # torch's choice for this machine
        self.setting = setting
        self.threads = setting or self.most
        self.last: Optional[CpuTimes] = None
        self.others = 0.0

    @property
    def follows(self) -> bool:
        """Whether the count follows the machine (auto and measurable)."""
        return self.setting == 0 and self.last is not None

    def start(self, look: float = FIRST_LOOK_SECONDS) -> dict:
        """Choose before the first step: a short look at the machine; what was chosen, for the
        run's header."""
        if self.setting:
            self.set_threads(self.setting)
            return self.describe("set")
        first = self.read()
        if first is not None:
            time.sleep(look)
            self.last = first
            self._decide(self.read())
        self.set_threads(self.threads)
        return self.describe("auto" if self.follows else "fixed")

    def check(self) -> Optional[dict]:
        """Between steps: at most every CHECK_SECONDS, look again; returns what changed, or None."""
        if not self.follows:
            return None
        if self.clock() - self.last.wall < CHECK_SECONDS:
            return None
        now = self.read()
        if now is None:
            return None
        before = self.threads
        self._decide(now)
        if self.threads == before:
            return None
        self.set_threads(self.threads)
        return self.describe("auto")

    def _decide(self, now: Optional[CpuTimes]) -> None:
        if now is None:
            return
        self.others = others_cores(self.last, now)
        self.threads = threads_for(len(self.cpus) - self.others, len(self.cpus), self.most)
        self.last = now

    def describe(self, how: str) -> dict:
        """threads: the count; how: auto (follows the free cores), set (train.threads), fixed
        (auto, but the free cores cannot be read here); cpus: CPUs we may run on; others_busy: cores
        other work kept busy at the last look."""
        return {"threads": self.threads, "how": how, "cpus": len(self.cpus), "others_busy": round(self.others, 2)}
