"""What every bench section shares: the options and the interleaved timing of several functions."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

SECTIONS = ("train", "busy", "products", "moe", "decode", "memory", "tokenizer", "peers")
DEFAULT_SECTIONS = ("train", "busy", "moe", "decode", "memory", "tokenizer")
MOE_REFERENCE = dict(n_embd=256, n_experts=8, top_k=2, tokens=4096)  # the reference point of issue 3
Event = Callable[[str], None]  # progress lines for the terminal


@dataclass
class BenchOptions:
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    quick: bool = False
    warmup: int = 2
    repeats: int = 7
    moe_repeats: int = 31  # the MoE/dense ratio moves from run to run (docs/results/2026-11-29-cpu-changes.md): more samples
    decode_contexts: tuple[int, ...] = (128, 512, 1024)
    decode_tokens: int = 24  # timed tokens per context (cached); recomputing times a third of them
    moe_tokens: int = MOE_REFERENCE["tokens"]
    device_memory: Optional[int] = None  # bytes; --device-memory
    measure_memory: bool = True  # compare the estimate with a measured peak (memory section)
    matmul_n: Optional[int] = None  # side of the timed square matmul; None: 2,048 on CPU, 8,192 on GPU

    def matmul_size(self, device: str) -> int:
        return self.matmul_n or (2048 if device == "cpu" else 8192)

    @classmethod
    def for_run(cls, quick: bool, sections: tuple[str, ...], **kw) -> "BenchOptions":
        if quick:
            base = dict(warmup=1, repeats=3, moe_repeats=11, decode_contexts=(128, 512), decode_tokens=12)
        else:
            base = {}
        base.update(kw)
        return cls(sections=sections, quick=quick, **base)


def median_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, sync=lambda: None) -> dict[str, float]:
    """Median seconds per call of each function. Repetitions are interleaved, and the rounds run
    the rotations of the order forwards, then backwards (a b c, b c a, c a b, c b a, b a c, a c b):
    each function starts a round equally often and, for up to three functions, runs right after
    each other one equally often, so neither drift in the machine's speed nor what one call leaves
    behind (freed memory, a cold cache) falls on one of them only."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync()
    names, back = list(fns), list(fns)[::-1]
    orders = [names[i:] + names[:i] for i in range(len(names))] + [back[i:] + back[:i] for i in range(len(back))]
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in orders[r % len(orders)]:
            start = time.perf_counter()
            fns[k]()
            sync()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def syncer(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
