"""The products section: what the training step's matrix products and fused attention kernels
cost on their own, and so the highest share of the square matmul's rate the train section could
show for this model on this machine.

One step runs under a recorder (a TorchDispatchMode) that notes every matrix product (mm, addmm,
bmm, baddbmm, grouped_mm) and fused attention kernel the step dispatches, in the forward and
backward passes and, apart from them, in the optimizer (Muon's Newton-Schulz). Each distinct
call (operator, shapes, strides, dtype) is then run alone on fresh random inputs of the same
layout, interleaved with the step itself and the square matmul, and its median time counted as
often as the step made it. Were everything else free (norms, dropout, routing, the loss, the
optimizer's elementwise work), the step would take the forward and backward products' time:
the model's FLOPs over that time, against the square rate, is the ceiling of the step's share."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.optim.optimizer as optim_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import Config
from ..models import build_model
from .peak import matmul_fn
from .timing import BenchOptions, median_times, syncer
from .train import train_step_fn

PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm")
ATTENTION = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention")


def product_flops(name: str, args: tuple, out: torch.Tensor) -> int:
    """Multiply-adds x 2 of one product from its operands and result. grouped_mm of two 2-D
    operands splits the shared dimension among the groups (a weight gradient): out (E, m, n)."""
    a = args[1] if name == "addmm" or name == "baddbmm" else args[0]
    if name == "_grouped_mm" and a.dim() == 2 and args[1].dim() == 2:
        return 2 * out[0].numel() * a.size(1)
    return 2 * out.numel() * a.size(-1)


def out_tensor(out) -> torch.Tensor:
    """The first tensor of an operator's result (attention kernels return several)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _spec(x):
    """A call's argument as a hashable key: float tensors by layout (their values do not change
    the time), others (group offsets, masks) by value."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return ("t", tuple(x.shape), tuple(x.stride()), x.dtype, x.device.type)
        return ("v", tuple(x.shape), x.dtype, tuple(x.flatten().tolist()))
    if isinstance(x, (list, tuple)):
        return tuple(_spec(y) for y in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _spec(v)) for k, v in x.items()))
    return x


class Recorder(TorchDispatchMode):
    """Counts the distinct products and attention kernels a step dispatches, by phase: "step"
    (forward and backward) or "optimizer" (while an optimizer's step runs)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, dict] = {}
        self.depth = 0  # optimizer steps in progress (MuonAdamW's step runs its parts' steps)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        kind = "product" if name in PRODUCTS else "attention" if name.startswith(ATTENTION) else None
        if kind is not None and "out" not in kwargs:
            phase = "optimizer" if self.depth else "step"
            key = (func, _spec(args), _spec(kwargs), phase)
            if key not in self.calls:
                self.calls[key] = {"func": func, "args": _layouts(args), "kwargs": _layouts(kwargs), "kind": kind,
                                   "phase": phase, "count": 0,
                                   "flops": product_flops(name, args, out) if kind == "product" else 0,
                                   "dtype": str(out_tensor(out).dtype).replace("torch.", "")}
            self.calls[key]["count"] += 1
        return out


def _layouts(x):
    """The argument with float tensors replaced by their layout (shape, stride, dtype, device);
    other tensors kept as they are (small: offsets, masks)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return (tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_layouts(y) for y in x)
    if isinstance(x, dict):
        return {k: _layouts(v) for k, v in x.items()}
    return x


def _fresh(x, g: torch.Generator):
    """A recorded argument made again: random normal values in the recorded layout."""
    if isinstance(x, tuple) and len(x) == 4 and isinstance(x[2], torch.dtype):
        shape, stride, dtype, device = x
        size = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
        base = torch.randn(size, generator=g).to(device=device, dtype=dtype)
        return base.as_strided(shape, stride)
    if isinstance(x, (list, tuple)):
        return type(x)(_fresh(y, g) for y in x)
    if isinstance(x, dict):
        return {k: _fresh(v, g) for k, v in x.items()}
    return x


def replay(call: dict) -> Callable[[], object]:
    """The recorded call, run again on inputs made once (outside the timing)."""
    g = torch.Generator().manual_seed(0)
    func, args, kwargs = call["func"], _fresh(call["args"], g), _fresh(call["kwargs"], g)
    return lambda: func(*args, **kwargs)


def record_step(step: Callable[[], None]) -> list[dict]:
    """The distinct products and attention kernels of one call of step, each with its count."""
    rec = Recorder()

    def enter(*_):
        rec.depth += 1

    def leave(*_):
        rec.depth -= 1

    hooks = [optim_hooks.register_optimizer_step_pre_hook(enter),
             optim_hooks.register_optimizer_step_post_hook(leave)]
    try:
        with rec:
            step()
    finally:
        for h in hooks:
            h.remove()
    return list(rec.calls.values())


def bench_products(cfg: Config, opts: BenchOptions, device: str, dtype) -> dict:
    """Step time, and the time of its products and attention alone, timed interleaved with the
    step and the square matmul; shares of the square rate for the step and for the ceiling."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    step = train_step_fn(model, cfg, device, dtype)
    for _ in range(max(1, opts.warmup)):
        step()  # optimizer state made, routing settled past its first step
    calls = record_step(step)
    square, square_flops = matmul_fn(device, dtype, opts.matmul_size(device))
    fns = {"step": step, "square": square, **{f"call {i}": replay(c) for i, c in enumerate(calls)}}
    times = median_times(fns, opts.repeats, opts.warmup, syncer(device))
    rate = square_flops / times["square"]  # FLOPs a second
    tokens = cfg.train.batch_size * cfg.model.block_size
    model_flops = model.flops_per_token(cfg.model.block_size) * tokens
    rows = []
    for kind, phase, what in (("product", "step", "matrix products, forward and backward"),
                              ("attention", "step", "fused attention kernels, forward and backward"),
                              ("product", "optimizer", "the optimizer's matrix products")):
        mine = [(i, c) for i, c in enumerate(calls) if c["kind"] == kind and c["phase"] == phase]
        sec = sum(times[f"call {i}"] * c["count"] for i, c in mine)
        flops = sum(c["flops"] * c["count"] for _, c in mine)
        rows.append({"what": what, "kind": kind, "phase": phase, "calls": sum(c["count"] for _, c in mine),
                     "distinct": len(mine), "ms": sec * 1e3, "flops": flops,
                     "dtypes": sorted({c["dtype"] for _, c in mine}),
                     "flops_share": flops / sec / rate if sec and flops else None})
    alone = sum(r["ms"] for r in rows if r["phase"] == "step") / 1e3
    return {"step_ms": times["step"] * 1e3, "matmul_tflops": rate / 1e12, "model_flops": model_flops,
            "rows": rows, "alone_ms": alone * 1e3, "alone_of_step": alone / times["step"],
            "step_share": model_flops / times["step"] / rate,
            "ceiling_share": model_flops / alone / rate if alone else math.nan}
