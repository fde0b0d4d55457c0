"""The products section: what the training step's matrix products and fused attention kernels
cost on their own, and so the highest share of the square matmul's rate the train section could
show for this model on this machine.

One eager step (train.compile off: compiled code calls its own kernels) runs under a recorder (a
TorchDispatchMode) that notes every matrix product (mm, addmm, bmm, baddbmm, grouped_mm) and
fused attention kernel the step dispatches, in the forward and backward passes and, apart from
them, in the optimizer (Muon's Newton-Schulz). Each distinct call (operator, shapes, strides,
dtype; group offsets by value) is then run alone on random inputs of the same layout,
interleaved with the step itself and the square matmul, and its median time counted as often as
the step made it. Were everything else free (norms, dropout, routing, the loss, the whole
optimizer, its Newton-Schulz products included), the step would take the forward and backward
products' and kernels' time: the model's FLOPs over that time, against the square rate, is the
ceiling of the step's share."""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple, Optional

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
LAUNCHES = {"cpu": 1, "cuda": 10}  # calls per timing on a GPU: one launch and sync alone would be mostly overhead


class Layout(NamedTuple):
    """A recorded floating-point argument: what its replay needs (values do not change the time)."""
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device

    def storage(self) -> int:
        """Elements its strides reach."""
        return 1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride)) if all(self.shape) else 0


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
    """A call's argument as a hashable key: float tensors by layout, others (group offsets,
    masks) by value."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return ("t", tuple(x.shape), tuple(x.stride()), x.dtype, x.device.type)
        return ("v", tuple(x.shape), x.dtype, tuple(x.flatten().tolist()))
    if isinstance(x, (list, tuple)):
        return tuple(_spec(y) for y in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _spec(v)) for k, v in x.items()))
    return x


def out_tensor(out) -> torch.Tensor:
    """The first tensor of an operator's result (attention kernels return several)."""
    return out[0] if isinstance(out, (tuple, list)) else out


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
        if kind is not None:
            phase = "optimizer" if self.depth else "step"
            key = (func, _spec(args), _spec(kwargs), phase)
            if key not in self.calls:
                first = out_tensor(out)
                self.calls[key] = {"func": func, "args": _layouts(args), "kwargs": _layouts(kwargs), "kind": kind,
                                   "phase": phase, "count": 0, "out_shape": tuple(first.shape),
                                   "flops": product_flops(name, args, out) if kind == "product" else 0,
                                   "dtype": str(first.dtype).replace("torch.", "")}
            self.calls[key]["count"] += 1
        return out


def _layouts(x):
    """The argument with float tensors replaced by their Layout; other tensors kept (small:
    offsets, masks)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return Layout(tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_layouts(y) for y in x)
    if isinstance(x, dict):
        return {k: _layouts(v) for k, v in x.items()}
    return x


def _each_layout(x):
    if isinstance(x, Layout):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _each_layout(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _each_layout(y)


class Inputs:
    """Random normal inputs for every recorded call from one buffer per dtype and device, as large
    as the largest call's inputs together: each call's arguments are disjoint views of it, so the
    replays hold no more memory than the largest call needs (a step's calls together would hold
    its activations again)."""

    def __init__(self, calls: list[dict], seed: int = 0):
        need: dict[tuple, int] = {}
        for call in calls:
            mine: dict[tuple, int] = {}
            for lay in _each_layout((call["args"], call["kwargs"])):
                mine[(lay.dtype, lay.device)] = mine.get((lay.dtype, lay.device), 0) + lay.storage()
            for k, n in mine.items():
                need[k] = max(need.get(k, 0), n)
        self.buffers = {}
        for (dtype, device), n in need.items():
            g = torch.Generator(device=device).manual_seed(seed)
            self.buffers[(dtype, device)] = torch.randn(n, generator=g, device=device, dtype=dtype)

    def args_for(self, call: dict) -> tuple:
        used: dict[tuple, int] = {}

        def view(x):
            if isinstance(x, Layout):
                at = used.get((x.dtype, x.device), 0)
                used[(x.dtype, x.device)] = at + x.storage()
                return self.buffers[(x.dtype, x.device)].as_strided(x.shape, x.stride, at)
            if isinstance(x, (list, tuple)):
                return type(x)(view(y) for y in x)
            if isinstance(x, dict):
                return {k: view(v) for k, v in x.items()}
            return x

        kwargs = {k: (torch.empty_strided(v.shape, v.stride, dtype=v.dtype, device=v.device)
                      if k == "out" and isinstance(v, Layout) else v) for k, v in call["kwargs"].items()}
        return view(call["args"]), view(kwargs)  # a result written into the shared inputs would change them


def replay(call: dict, inputs: Optional[Inputs] = None, launches: int = 1) -> Callable[[], object]:
    """The recorded call, run `launches` times on random inputs of its layout (made beforehand)."""
    args, kwargs = (inputs or Inputs([call])).args_for(call)
    func = call["func"]
    if launches == 1:
        return lambda: func(*args, **kwargs)

    def run():
        for _ in range(launches):
            out = func(*args, **kwargs)
        return out

    return run


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


ROWS = (("product", "step", "matrix products, forward and backward"),
        ("attention", "step", "fused attention kernels, forward and backward"),
        ("product", "optimizer", "the optimizer's matrix products"))


def bench_products(cfg: Config, opts: BenchOptions, device: str, dtype) -> dict:
    """Step time, and the time of its products and attention alone, timed interleaved with the
    step and the square matmul; shares of the square rate for the step and for the ceiling."""
    cfg = copy.deepcopy(cfg)
    cfg.train.compile = False
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    model.grad_checkpointing = cfg.train.grad_checkpointing
    step = train_step_fn(model, cfg, device, dtype)
    for _ in range(max(1, opts.warmup)):
        step()  # optimizer state made, routing settled past its first step
    calls = record_step(step)
    inputs, launches = Inputs(calls), LAUNCHES.get(torch.device(device).type, 1)
    square, square_flops = matmul_fn(device, dtype, opts.matmul_size(device))
    fns = {"step": step, "square": square, **{f"call {i}": replay(c, inputs, launches) for i, c in enumerate(calls)}}
    times = median_times(fns, opts.repeats, opts.warmup, syncer(device))
    rate = square_flops / times["square"]  # FLOPs a second
    tokens = cfg.train.batch_size * cfg.model.block_size
    model_flops = model.flops_per_token(cfg.model.block_size) * tokens
    rows = []
    for kind, phase, what in ROWS:
        mine = [(i, c) for i, c in enumerate(calls) if c["kind"] == kind and c["phase"] == phase]
        sec = sum(times[f"call {i}"] / launches * c["count"] for i, c in mine)
        flops = sum(c["flops"] * c["count"] for _, c in mine)
        rows.append({"what": what, "kind": kind, "phase": phase, "calls": sum(c["count"] for _, c in mine),
                     "distinct": len(mine), "ms": sec * 1e3, "flops": flops,
                     "dtypes": sorted({c["dtype"] for _, c in mine}),
                     "flops_share": flops / sec / rate if sec and flops else None})
    alone = sum(r["ms"] for r in rows if r["phase"] == "step") / 1e3
    return {"step_ms": times["step"] * 1e3, "matmul_tflops": rate / 1e12, "model_flops": model_flops,
            "rows": rows, "alone_ms": alone * 1e3, "alone_of_step": alone / times["step"],
            "step_share": model_flops / times["step"] / rate,
            "ceiling_share": model_flops / alone / rate if alone else None}
