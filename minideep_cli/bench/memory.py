"""The memory section: peak training memory predicted from a trace on fake tensors (nothing
allocated) and, when asked, measured on a small model (CPU: peak RSS in a subprocess; CUDA: max
allocated)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import Config, validate
from ..errors import UserError
from ..evaluate import autocast_for
from ..models import build_model
from ..models.fast import attend
from ..models.layers import causal_attention
from ..models import spec_of
from ..optim import param_groups
from ..device import pick_dtype
from .timing import BenchOptions
from .train import train_step_fn

FIT_FRACTION = 0.9  # a run "fits" a device when its predicted peak is at most this fraction of it


def parse_bytes(text: str) -> int:
    """'12GB' -> 12e9, '12GiB' -> 12 * 2**30, '800MB', '40G' (G = GB); a bare number is bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]i?[bB]?)?\s*", text or "")
    if not m:
        raise UserError(f"cannot read '{text}' as a memory size; write e.g. 12GB or 40GiB")
    unit = (m.group(2) or "").lower().rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise UserError(f"a memory size must be above 0, got '{text}'")
    return n


def experts_stand_in(experts):
    """A forward for fake tensors with the grouped path's saved tensors (x, the stacked weights, the
    two halves of the up projection, silu, their product): fake tensors cannot run grouped_mm in
    fp32 nor the loop (its slice sizes are data)."""
    def forward(x, counts):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        x = x.to(dtype)
        w13 = torch.cat([experts.w1, experts.w3], dim=2).to(dtype)
        g, u = (x @ w13[0]).chunk(2, dim=-1)
        return (F.silu(g) * u) @ experts.w2.to(dtype)[0]

    return forward


def traced_activations(cfg: Config, dtype, batch: int, device: str = "cpu") -> dict:
    """Bytes of the tensors autograd saves for backward, counted by running the forward on fake
    tensors (shapes only, no memory): all of them, those of each block, and each block's input.
    The fake tensors are CPU tensors; attention follows `device`'s way of attending (on a GPU: no
    fp32 copies of bf16 inputs, grouped keys and values copied per query head). Dropout is still
    CPU dropout: with it, the masks and attention weights kept are more than a GPU keeps."""


    saved: list[tuple] = []  # (weak reference to a saved tensor, index of the block saving it or -1)
    inputs: list[int] = []  # bytes of each block's input
    current = [-1]

    def enter(i: int):
        def hook(module, args):
            current[0] = i
            inputs.append(args[0].nbytes)
        return hook

    def leave(module, args, out):
        current[0] = -1

    def pack(t):
        saved.append((weakref.ref(t), current[0]))
        return t

    with FakeTensorMode():
        model = build_model(cfg.model).train()
        blocks = model.blocks
        as_target = attend if device.split(":")[0] == "cpu" else causal_attention  # the reference: a GPU's way
        for m in model.modules():
            if hasattr(m, "attend"):  # every attention module attends as the target device would
                m.attend = as_target
        for i, b in enumerate(blocks):
            b.register_forward_pre_hook(enter(i))
            b.register_forward_hook(leave)
            if getattr(b, "is_moe", False):
                b.ffn.experts.forward = experts_stand_in(b.ffn.experts)
        idx = torch.zeros(batch, cfg.model.block_size, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_for("cpu", dtype):
            out = model(idx, idx)
        logits = out.logits.nbytes
        # what the graph still holds at the end of the forward (graphs of detached statistics are
        # gone), each storage once, weights and buffers excluded (counted as weights)
        own = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
        storages: dict[int, tuple[int, int]] = {}
        for ref, blk in saved:
            t = ref()
            if t is not None and t.untyped_storage()._cdata not in own:
                storages.setdefault(t.untyped_storage()._cdata, (t.untyped_storage().nbytes(), blk))
    per_block = [0] * len(blocks)
    outside = 0
    for nbytes, blk in storages.values():
        if blk < 0:
            outside += nbytes
        else:
            per_block[blk] += nbytes
    return {"all": outside + sum(per_block), "outside": outside, "per_block": per_block, "inputs": inputs, "logits": logits}


def estimate_memory(cfg: Config, device_memory: Optional[int] = None) -> dict:
    """Peak training memory of one micro-batch step, predicted without allocating anything.

    weights, grads: fp32 (autocast keeps fp32 master weights); optimizer state (the JSON's
    adamw_bytes): two fp32 numbers a weight under AdamW, one (the momentum) under Muon.
    activations: what autograd saves, traced on fake tensors at the preset's precision; with
    gradient checkpointing, each block keeps only its input and one block is recomputed at a time.
    The peak is the larger of (a) the start of backward: weights + AdamW + activations + the logits
    and their two fp32 gradients (loss and log-softmax) + the tied embedding's gradient, and (b) the
    optimizer step: weights + grads + AdamW + one weight-sized temporary (foreach AdamW)."""
    m, t = cfg.model, cfg.train
    device = t.device if t.device != "auto" else "cpu"
    dtype = pick_dtype(t.dtype, device)
    with torch.device("meta"):
        model = build_model(m)
    n = model.num_params()
    weights = 4 * n
    adam = sum((4 if g["kind"] != "adamw" else 8) * p.numel() for g in param_groups(model, cfg) for _, p in g["params"])
    acts = traced_activations(cfg, dtype, t.batch_size, device)
    ckpt_acts = acts["outside"] + sum(acts["inputs"]) + max(acts["per_block"])
    tokens = t.batch_size * m.block_size
    transient = 2 * 4 * tokens * m.vocab_size  # fp32 gradients of the loss w.r.t. log-softmax and logits
    head = acts["logits"] + 4 * m.vocab_size * m.n_embd  # logits held by the caller; the head's gradient
    temp = 0 if device.startswith("cuda") else weights  # fused AdamW on CUDA needs no temporaries
    step_peak = weights + weights + adam + temp
    full = max(weights + adam + acts["all"] + head + transient, step_peak)
    # checkpointed: the start of backward holds the block inputs only; later one block is rebuilt
    # at a time, once the loss gradients and the saved log-softmax (fp32, logits-sized) are gone
    kept = acts["outside"] + sum(acts["inputs"])
    rebuild = kept - 4 * tokens * m.vocab_size + max(acts["per_block"]) + head
    ckpt = max(weights + adam + kept + head + transient, weights + adam + rebuild, step_peak)

    res = {
        "dtype": str(dtype).replace("torch.", ""), "batch_size": t.batch_size, "block_size": m.block_size,
        "params": n, "weights_bytes": weights, "grads_bytes": weights, "adamw_bytes": adam,
        "activations_bytes": acts["all"], "activations_checkpointed_bytes": ckpt_acts,
        "logits_bytes": head + transient, "peak_bytes": full, "peak_checkpointed_bytes": ckpt,
        "grad_checkpointing": t.grad_checkpointing,
    }
    res["predicted_bytes"] = res["peak_checkpointed_bytes" if t.grad_checkpointing else "peak_bytes"]
    res["device_memory_bytes"] = device_memory
    # fits: the prediction within 90% of the device (the rest for the CUDA context, kernel
    # workspaces and allocator fragmentation)
    res["fits"] = None if device_memory is None else res["predicted_bytes"] <= FIT_FRACTION * device_memory
    res["margin_bytes"] = None if device_memory is None else device_memory - res["predicted_bytes"]
    return res


MEASURE_SCRIPT = r"""
import json, resource, sys, torch
from minideep_cli.bench import train_step_fn
from minideep_cli.config import Config
from minideep_cli.models import build_model
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
def run(cfg, steps):
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.grad_checkpointing = cfg.train.grad_checkpointing
    step = train_step_fn(model, cfg, "cpu", torch.float32)
    for _ in range(steps):
        step()
cfg = Config.from_dict(spec["config"])
tiny = Config.from_dict(spec["config"])
tiny.model.n_layer, tiny.model.block_size, tiny.train.batch_size = 1, 8, 1
run(tiny, 2)  # load every kernel's code before the baseline
def high_water():
    # Linux: VmHWM is this process's own; ru_maxrss would start from the parent's peak (kept across exec)
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
base = high_water()
run(cfg, spec["steps"])
print(json.dumps({"peak_bytes": high_water() - base}))
"""


def measure_cpu_peak(cfg: Config, steps: int = 3) -> int:
    """Peak RSS growth of a few training steps, in a fresh process (after a tiny warm-up run, so
    library code paged in on first use is not counted). Large blocks are mmapped so freed tensors
    leave the RSS (MALLOC_MMAP_THRESHOLD_), which makes the high-water mark track live tensors."""
    c = copy.deepcopy(cfg)
    c.train.device, c.train.dtype, c.train.compile = "cpu", "float32", False
    spec = json.dumps({"config": c.to_dict(), "steps": steps, "threads": torch.get_num_threads()})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, "-c", MEASURE_SCRIPT, spec], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"]


def measure_cuda_peak(cfg: Config, device: str, dtype, steps: int = 3) -> int:

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model = build_model(cfg.model).to(device)
    model.grad_checkpointing = cfg.train.grad_checkpointing
    step = train_step_fn(model, cfg, device, dtype)
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del model, step
    torch.cuda.empty_cache()
    return peak


SMALL_MODEL = {"n_layer": 2, "n_embd": 128, "n_head": 4, "block_size": 128, "vocab_size": 1024, "n_kv_head": 2,
               "ffn_hidden": 0, "expert_hidden": 0, "kv_lora_rank": 64, "q_lora_rank": 0, "qk_nope_head_dim": 32,
               "qk_rope_head_dim": 16, "v_head_dim": 32}


def small_memory_config(cfg: Config) -> Config:
    """The preset's model shrunk to a few layers of width 128 (CPU measurement in seconds)."""
    c = copy.deepcopy(cfg)
    m = c.model
    keys = spec_of(m).keys()
    for key, value in SMALL_MODEL.items():
        if key in keys:  # grouped key/value heads, mla's widths, ... where the arch has them
            setattr(m, key, value)
    if "first_k_dense" in keys:
        m.first_k_dense = min(m.first_k_dense, 1)
    c.train.batch_size = 16
    c.train.device, c.train.dtype, c.train.compile = "cpu", "float32", False
    validate(c)
    return c


def bench_memory(cfg: Config, opts: BenchOptions, device: Optional[str], dtype) -> dict:
    est = estimate_memory(cfg, opts.device_memory)
    checks = []
    if opts.measure_memory and device is not None:
        on_cuda = device.startswith("cuda")
        target = cfg if on_cuda else small_memory_config(cfg)
        for ckpt in (False, True):
            c = copy.deepcopy(target)
            c.train.grad_checkpointing = ckpt
            e = estimate_memory(c)["predicted_bytes"]
            got = measure_cuda_peak(c, device, dtype) if on_cuda else measure_cpu_peak(c)
            checks.append({"model": f"{c.model.arch} {c.model.n_layer}x{c.model.n_embd}, batch {c.train.batch_size}x"
                                    f"{c.model.block_size}", "grad_checkpointing": ckpt, "estimated_bytes": e,
                           "measured_bytes": got, "error": (e - got) / got if got > 0 else None,
                           "method": "torch.cuda.max_memory_allocated" if on_cuda else "peak RSS growth"})
    return {"estimate": est, "checks": checks}
