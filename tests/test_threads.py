"""The CPU thread policy (minideep_cli/threads.py): free cores read from /proc/stat minus our own
CPU time, the count chosen from them, looked at again while a run runs, and shown in its header."""

import os
import subprocess
import sys
import time

import pytest
import torch

from minideep_cli import threads as th
from minideep_cli.threads import CpuTimes, ThreadPolicy, others_cores, read_cpu_times, threads_for

STAT = """cpu  900 0 300 5000 100 0 0 0 0 0
cpu0 {a} 0 {b} 2500 50 0 0 {steal} 0 0
cpu1 400 10 100 2500 50 5 5 0 0 0
intr 12345
"""


def write_stat(tmp_path, a=500, b=200, steal=0):
    p = tmp_path / "stat"
    p.write_text(STAT.format(a=a, b=b, steal=steal))
    return str(p)


def test_busy_ticks_are_everything_but_idle_and_iowait_on_our_cpus_only(tmp_path):
    tick = os.sysconf("SC_CLK_TCK")
    t = read_cpu_times([0], write_stat(tmp_path, a=500, b=200, steal=30))
    assert t.busy == pytest.approx((500 + 200 + 30) / tick)  # user + system + steal; idle 2500, iowait 50 left out
    both = read_cpu_times([0, 1], write_stat(tmp_path, a=500, b=200))
    assert both.busy == pytest.approx((500 + 200 + 400 + 10 + 100 + 5 + 5) / tick)  # the aggregate line is not added
    assert read_cpu_times([0], str(tmp_path / "missing")) is None


def test_others_are_the_busy_time_that_is_not_ours():
    before = CpuTimes(wall=10.0, busy=100.0, own=5.0)
    # in 2 s, the CPUs were busy 3.5 s, of which 1.5 s were this process: others kept 1 core busy
    assert others_cores(before, CpuTimes(12.0, 103.5, 6.5)) == pytest.approx(1.0)
    assert others_cores(before, CpuTimes(12.0, 101.0, 7.0)) == 0.0  # clocks that disagree never go below 0
    assert others_cores(before, before) == 0.0


@pytest.mark.parametrize("free,cpus,most,want", [
    (2.0, 2, 2, 2), (1.0, 2, 2, 1), (0.0, 2, 2, 1), (1.4, 2, 2, 1), (1.5, 2, 2, 2),  # half up
    (8.0, 8, 4, 4), (6.0, 8, 4, 3), (3.0, 8, 4, 2), (0.5, 8, 4, 1),  # two logical CPUs a core: torch's 4
])
def test_threads_follow_the_free_share_of_torchs_count(free, cpus, most, want):
    assert threads_for(free, cpus, most) == want


class FakeMachine:
    """A /proc/stat reader whose clock the test moves: other work keeps `others` cores busy."""

    def __init__(self):
        self.wall = self.busy = self.own = 0.0
        self.others = 0.0
        self.reads = 0

    def advance(self, seconds: float, own_cores: float = 1.0):
        self.wall += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + self.others) * seconds

    def read(self):
        self.reads += 1
        return CpuTimes(self.wall, self.busy, self.own)


def policy_on(machine: FakeMachine, setting=0):
    chosen = []
    p = ThreadPolicy(setting, read=machine.read, set_threads=chosen.append, most=2, clock=lambda: machine.wall)
    p.cpus = [0, 1]
    return p, chosen


def test_the_count_follows_the_machine_while_a_run_runs(monkeypatch):
    m = FakeMachine()
    monkeypatch.setattr(th.time, "sleep", lambda s: m.advance(s, own_cores=0.0))
    p, chosen = policy_on(m)
    assert p.start() == {"threads": 2, "how": "auto", "cpus": 2, "others_busy": 0.0} and chosen == [2]
    m.others = 1.0  # another program starts
    m.advance(th.CHECK_SECONDS / 2)
    reads = m.reads
    assert p.check() is None and m.reads == reads  # too soon to look again: /proc/stat not even read
    m.advance(th.CHECK_SECONDS / 2)
    assert p.check() == {"threads": 1, "how": "auto", "cpus": 2, "others_busy": 1.0} and chosen == [2, 1]
    m.advance(th.CHECK_SECONDS)
    assert p.check() is None and p.threads == 1  # still busy: nothing changes
    m.others = 0.1  # it ended
    m.advance(th.CHECK_SECONDS)
    assert p.check()["threads"] == 2 and chosen == [2, 1, 2]


def test_a_busy_machine_at_the_start_gets_fewer_threads_from_the_first_step(monkeypatch):
    m = FakeMachine()
    m.others = 1.0
    monkeypatch.setattr(th.time, "sleep", lambda s: m.advance(s, own_cores=0.0))
    p, chosen = policy_on(m)
    assert p.start()["threads"] == 1 and chosen == [1]


def test_a_set_count_and_an_unreadable_machine_stay_fixed(monkeypatch):
    m = FakeMachine()
    m.others = 1.0
    monkeypatch.setattr(th.time, "sleep", lambda s: m.advance(s, own_cores=0.0))
    p, chosen = policy_on(m, setting=2)
    assert p.start() == {"threads": 2, "how": "set", "cpus": 2, "others_busy": 0.0}
    m.advance(10 * th.CHECK_SECONDS)
    assert p.check() is None and chosen == [2]
    blind = ThreadPolicy(0, read=lambda: None, set_threads=lambda n: None, most=2)
    assert blind.start()["how"] == "fixed" and blind.threads == 2 and blind.check() is None


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) != 2,
                    reason="measures a real busy process on a 2-CPU Linux machine (as CI's)")
def test_a_real_busy_process_takes_one_of_two_cores():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        p = ThreadPolicy(0, set_threads=lambda n: None, most=2)
        info = p.start(look=1.0)
    finally:
        busy.kill()
        busy.wait()
    assert info["how"] == "auto" and info["others_busy"] >= 0.7 and info["threads"] == 1


def test_train_shows_its_threads_and_a_set_count_is_kept(tmp_path, small_data):
    from conftest import assert_clean_error, invoke

    before = torch.get_num_threads()
    try:
        r = invoke("train", "--preset", "cpu", "--data", small_data, "--out", tmp_path / "run",
                   "-o", "train.max_minutes=0", "-o", "train.max_steps=2", "-o", "train.threads=1",
                   "-o", "model.n_layer=1", "-o", "model.n_embd=32", "-o", "model.block_size=32",
                   "-o", "train.batch_size=2", "-o", "train.eval_iters=1", "-o", "train.sample_tokens=0")
        assert r.exit_code == 0, r.output
        assert "threads 1 of" in r.output and "(train.threads)" in r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert_clean_error(invoke("train", "--out", tmp_path / "bad", "-o", "train.threads=100000"),
                       "train.threads must be from 0")
