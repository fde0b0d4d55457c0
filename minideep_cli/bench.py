"""`minideep bench`: speed, memory and cache sizes, measured on this machine (docs/design.md, Tests and measurements).

Every timed figure is the median of several repetitions after warm-up; comparisons (MoE against
dense, minideep against transformers, cached against recomputed decoding) are ratios of timings
taken in the same process with the repetitions interleaved, so a change in machine load hits both
sides alike. The engine returns plain data (the JSON `minideep bench --json` writes); cli.py
renders it. Sections:

  train      tokens/s, step time, model FLOPs per token, MFU against the device's peak
  moe        one MoE layer forward+backward against a dense SwiGLU of the same active
             parameters and against the plain loop over experts
  decode     generation tokens/s with and without the KV cache at several context lengths;
             cache bytes per token and per sequence for every attention variant
  memory     predicted peak training memory (traced, nothing allocated) and, when asked, the
             measured peak of a small model (CPU: peak RSS in a subprocess; CUDA: max allocated)
  tokenizer  BPE training time and encode throughput on the bundled corpus
  peers      (--compare-hf) the same models trained and decoded by Hugging Face transformers
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import __version__
from .config import ATTENTIONS, Config, validate
from .errors import UserError

SCHEMA_VERSION = 1
SECTIONS = ("train", "moe", "decode", "memory", "tokenizer", "peers")
DEFAULT_SECTIONS = ("train", "moe", "decode", "memory", "tokenizer")
MOE_REFERENCE = dict(n_embd=256, n_experts=8, top_k=2, tokens=4096)  # the reference point of issue 3

# Dense BF16 tensor-core peaks with FP32 accumulation, TFLOPS (vendor specifications, no sparsity).
# Matched against torch.cuda.get_device_name(), longest name first.
GPU_PEAK_TFLOPS = {
    "RTX 3060": 25.6,
    "RTX 3090": 71.0,
    "RTX 4090": 165.2,
    "A100": 312.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM
    "H200": 989.4,
}
FIT_FRACTION = 0.9  # a run "fits" a device when its predicted peak is at most this fraction of it
FMA_UNITS = 2  # fused multiply-add pipes per core assumed for the CPU estimate
Event = Callable[[str], None]  # progress lines for the terminal


@dataclass
class BenchOptions:
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    quick: bool = False
    warmup: int = 2
    repeats: int = 7
    moe_repeats: int = 31  # the MoE/dense ratio moves by several percent from run to run: more samples
    decode_contexts: tuple[int, ...] = (128, 512, 1024)
    decode_tokens: int = 24  # timed tokens per context (cached); recomputing times a third of them
    moe_tokens: int = MOE_REFERENCE["tokens"]
    device_memory: Optional[int] = None  # bytes; --device-memory
    measure_memory: bool = True  # compare the estimate with a measured peak (memory section)
    matmul_n: Optional[int] = None  # side of the timed square matmul; None: 2,048 on CPU (~0.1 s), 8,192 on GPU

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


# ---------------------------------------------------------------- peak FLOPs


def cpu_ghz() -> tuple[float, str]:
    """Maximum clock in GHz and where it came from (Linux sysfs, /proc/cpuinfo, else 3.0 assumed)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1e6, "cpufreq max"
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", f.read())]
        if mhz:
            return max(mhz) / 1e3, "/proc/cpuinfo"
    except OSError:
        pass
    return 3.0, "assumed"


def simd_datapath(cap: str, info: dict[str, str]) -> tuple[int, str]:
    """Bits of fp32 work per FMA pipe per cycle: the vector width torch dispatches to (AVX-512: 512,
    AVX2: 256, else 128), except on AMD Zen 4 (vendor AuthenticAMD, family 25 with AVX-512; Zen 3,
    also family 25, has none), which runs each 512-bit instruction as two 256-bit halves. Laptop
    Zen 5 parts (family 26) split it too but are not told apart from desktop and server Zen 5,
    which do not: there the estimate is twice what the CPU can do."""
    simd = 512 if "AVX512" in cap else 256 if "AVX2" in cap else 128
    if simd == 512 and info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25":
        return 256, f"{cap} on 256-bit halves (AMD Zen 4)"
    return simd, cap


def cpu_peak(threads: int, dtype=torch.float32, info: Optional[dict] = None) -> dict:
    """FP32 peak = threads x GHz x FMA pipes (2) x 2 FLOPs per FMA x fp32 lanes (datapath / 32 bits;
    see simd_datapath). The clock is the one Linux reports, on a VM often the base clock: a CPU
    boosting above it can exceed the estimate, so bench also times a matmul (`matmul_tflops`).
    bf16 on a CPU with AVX512-BF16 doubles the peak (each 32-bit lane takes a pair of bf16
    products); with AMX, 1,024 bf16 FLOPs per cycle per core (one tile unit); without either,
    bf16 is emulated and the fp32 peak stays the bound."""
    from .train import cpu_flags, cpu_info

    info = cpu_info() if info is None else info
    flags = cpu_flags(info)
    simd, simd_how = simd_datapath(torch.backends.cpu.get_cpu_capability(), info)
    ghz, ghz_source = cpu_ghz()
    per_cycle, how = FMA_UNITS * 2 * (simd // 32), f"{FMA_UNITS} FMA x 2 x {simd // 32} fp32 lanes ({simd_how})"
    if dtype == torch.bfloat16 and "amx_bf16" in flags:
        per_cycle, how = 1024, "1,024 bf16 FLOPs per cycle (AMX)"
    elif dtype == torch.bfloat16 and "avx512_bf16" in flags:
        per_cycle, how = 2 * per_cycle, f"{how} x 2 bf16 per lane (AVX512-BF16)"
    flops = threads * ghz * 1e9 * per_cycle
    return {"name": f"{platform.processor() or platform.machine()} ({threads} threads)", "tflops": flops / 1e12,
            "source": f"{threads} threads x {ghz:.2f} GHz ({ghz_source}) x {how}"}


def gpu_peak(name: str) -> dict:
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return {"name": name, "tflops": GPU_PEAK_TFLOPS[key], "source": f"{key} dense bf16 (table)"}
    return {"name": name, "tflops": None, "source": "not in the table: MFU unknown"}


def device_peak(device: str, dtype=torch.float32) -> dict:
    if device.startswith("cuda"):
        return gpu_peak(torch.cuda.get_device_name(torch.device(device)))
    return cpu_peak(torch.get_num_threads(), dtype)


def matmul_fn(device: str, dtype, n: int) -> tuple[Callable[[], object], float]:
    """One n x n x n matrix product in the step's precision, and its FLOPs: timed next to a step,
    the rate this machine's matrix unit delivers in practice, where the peak is a specification
    (GPU) or an estimate (CPU)."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=c)), 2.0 * n**3


def matmul_tflops(device: str, dtype, opts: "BenchOptions") -> float:
    fn, flops = matmul_fn(device, dtype, opts.matmul_size(device))
    return flops / median_times({"mm": fn}, opts.repeats, opts.warmup, syncer(device))["mm"] / 1e12


# ---------------------------------------------------------------- train


def bench_config(cfg: Config) -> Config:
    """The config as training would run it: the model's vocabulary is the tokenizer's, i.e. the data
    dir's (meta.json) or data.vocab_size for the bundled corpus."""
    c = copy.deepcopy(cfg)
    meta = os.path.join(c.data.dir, "meta.json") if c.data.dir else None
    if meta and os.path.isfile(meta):
        with open(meta) as f:
            c.model.vocab_size = int(json.load(f)["vocab_size"])
    elif not c.data.dir:
        c.model.vocab_size = c.data.vocab_size
    return c


def random_batch(cfg: Config, device: str, batch: Optional[int] = None, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    B, T, V = batch or cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size
    x = torch.randint(0, V, (B, T + 1), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


def step_fn(model, cfg: Config, device: str, dtype, forward: Callable, loss_of: Callable,
            batch: Optional[int] = None) -> Callable[[], None]:
    """One training step as `minideep train` runs it (one micro-batch): out = forward(x, y) with
    the preset's autocast, loss_of(out).backward() while out (the logits) is still held, clipping,
    minideep's AdamW step, zero_grad."""
    from .evaluate import autocast_for
    from .optim import make_optimizer

    model.train()
    opt = make_optimizer(model, cfg, device)
    ctx = autocast_for(device, dtype)
    x, y = random_batch(cfg, device, batch)
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")

    def step():
        with ctx:
            out = forward(x, y)
        loss_of(out).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_step_fn(model, cfg: Config, device: str, dtype, batch: Optional[int] = None) -> Callable[[], None]:
    """minideep's step: language-model loss + balancing loss, through torch.compile if asked."""
    fwd = torch.compile(model) if cfg.train.compile else model

    def loss_of(out):
        return out.loss + out.aux["loss"] if "loss" in out.aux else out.loss

    return step_fn(model, cfg, device, dtype, fwd, loss_of, batch)


def bench_train(cfg: Config, opts: BenchOptions, device: str, dtype,
                variants: Optional[dict[str, Config]] = None) -> dict:
    """The training step of this config; with variants (`--vs`: label -> this config with more
    overrides), each variant's step is timed interleaved with it and compared by tokens/s."""
    from .models import build_model
    from .train import pick_dtype

    def step_for(c: Config, dt) -> tuple:
        torch.manual_seed(c.train.seed)
        model = build_model(c.model).to(device)
        model.grad_checkpointing = c.train.grad_checkpointing
        return model, train_step_fn(model, c, device, dt)

    model, step = step_for(cfg, dtype)
    steps, vs = {"base": step}, {}
    for label, c in (variants or {}).items():
        vs[label] = c, pick_dtype(c.train.dtype, device)
        steps[f"vs {label}"] = step_for(*vs[label])[1]
    times = median_times(steps, opts.repeats, opts.warmup, syncer(device))
    sec = times["base"]
    B, T = cfg.train.batch_size, cfg.model.block_size
    tps = B * T / sec
    fpt = model.flops_per_token(T)
    peak = device_peak(device, dtype)
    achieved = tps * fpt
    matmul_rate = matmul_tflops(device, dtype, opts)
    rows = []
    for label, (c, dt) in vs.items():
        v_sec = times[f"vs {label}"]
        v_tps = c.train.batch_size * c.model.block_size / v_sec
        rows.append({"overrides": label.split(), "dtype": str(dt).replace("torch.", ""), "step_ms": v_sec * 1e3,
                     "tokens_per_sec": v_tps, "vs_base": v_tps / tps})
    return {
        "device": peak["name"], "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "params": model.num_params(), "active_params": model.num_params(active=True),
        "batch_size": B, "block_size": T, "step_ms": sec * 1e3, "tokens_per_sec": tps,
        "flops_per_token": fpt, "achieved_tflops": achieved / 1e12, "peak_tflops": peak["tflops"],
        "peak_source": peak["source"], "mfu": achieved / (peak["tflops"] * 1e12) if peak["tflops"] else None,
        "matmul_tflops": matmul_rate, "matmul_fraction": achieved / (matmul_rate * 1e12), "variants": rows,
    }


# ---------------------------------------------------------------- moe


def moe_layer_row(name: str, mcfg, tokens: int, opts: BenchOptions, device: str, dtype) -> dict:
    """One MoE layer forward+backward against a dense SwiGLU of the same active parameters (hidden
    = top_k x expert_hidden, plus shared experts) and against the loop over experts."""
    from .evaluate import autocast_for
    from .models.layers import SwiGLU
    from .models.moe import MoE
    from .models.transformer import expert_hidden

    h = expert_hidden(mcfg)
    moe = MoE(mcfg, h).to(device).train()
    dense_hidden = (mcfg.top_k + mcfg.n_shared_experts) * h
    dense = SwiGLU(mcfg.n_embd, dense_hidden).to(device)
    for p in [*moe.parameters(), *dense.parameters()]:
        torch.nn.init.normal_(p, 0.0, 0.02)
    x = torch.randn(1, tokens, mcfg.n_embd, device=device, requires_grad=True)
    ctx = autocast_for(device, dtype)

    def run_moe(grouped: bool):
        moe.experts.grouped = grouped
        with ctx:
            y, stats = moe(x)
        (y.float().square().mean() + stats["loss"]).backward()

    def run_dense():
        with ctx:
            y = dense(x)
        y.float().square().mean().backward()

    t = median_times({"moe": lambda: run_moe(True), "dense": run_dense, "loop": lambda: run_moe(False)},
                     opts.moe_repeats, opts.warmup, syncer(device))
    return {"name": name, "tokens": tokens, "n_embd": mcfg.n_embd, "n_experts": mcfg.n_experts, "top_k": mcfg.top_k,
            "expert_hidden": h, "dense_hidden": dense_hidden, "moe_ms": t["moe"] * 1e3, "dense_ms": t["dense"] * 1e3,
            "loop_ms": t["loop"] * 1e3, "moe_vs_dense": t["moe"] / t["dense"], "moe_vs_loop": t["moe"] / t["loop"]}


def bench_moe(cfg: Config, opts: BenchOptions, device: str, dtype) -> dict:
    ref = copy.deepcopy(cfg.model)
    ref.arch, ref.n_embd, ref.n_experts, ref.top_k = "moe", MOE_REFERENCE["n_embd"], MOE_REFERENCE["n_experts"], MOE_REFERENCE["top_k"]
    ref.expert_hidden = ref.ffn_hidden = ref.n_shared_experts = 0
    ref.router_noise = "none"
    rows = [moe_layer_row("reference", ref, MOE_REFERENCE["tokens"], opts, device, dtype)]
    m = cfg.model
    if m.arch == "moe" and not opts.quick:
        own = copy.deepcopy(m)
        own.router_noise = "none"  # timing only; noise is a few elementwise ops
        rows.append(moe_layer_row("model", own, opts.moe_tokens, opts, device, dtype))
    return {"rows": rows}


# ---------------------------------------------------------------- decode


def attention_variants(cfg: Config) -> list[str]:
    """The attention variants this config accepts (gpt2: its multi-head attention only)."""
    if cfg.model.arch == "gpt2":
        return ["mha"]
    out = []
    for v in ATTENTIONS:
        c = copy.deepcopy(cfg)
        c.model.attention = v
        try:
            validate(c)
        except UserError:
            continue
        out.append(v)
    return out


def variant_config(cfg: Config, variant: str) -> Config:
    c = copy.deepcopy(cfg)
    if variant != "mha":
        c.model.attention = variant
    return c


def cache_rows(cfg: Config, dtype) -> list[dict]:
    """Cache bytes per token and per sequence (block_size tokens) for each attention variant, read
    from the models (built on the meta device: nothing is allocated)."""
    from .models import build_model

    rows = []
    for v in attention_variants(cfg):
        with torch.device("meta"):
            model = build_model(variant_config(cfg, v).model)
        per_token, state = model.cache_bytes_per_token(dtype), model.cache_state_bytes(dtype)
        rows.append({"attention": v, "bytes_per_token": per_token, "state_bytes": state,
                     "bytes_per_sequence": cfg.model.block_size * per_token + state, "block_size": cfg.model.block_size})
    base = next((r["bytes_per_sequence"] for r in rows if r["attention"] in ("gqa", "mha")), None)
    for r in rows:
        r["vs_gqa"] = r["bytes_per_sequence"] / base if base else None
    return rows


def per_token_seconds(model, prompt: list[int], n: int, use_cache: bool, device: str, warmup: int) -> float:
    """Median seconds per generated token after the prompt (its prefill and `warmup` tokens are not timed)."""
    from .generate import generate

    sync = syncer(device)
    gen = generate(model, prompt, n + warmup + 1, temperature=0.0, use_cache=use_cache, device=device)
    times = []
    next(gen)  # prefill + first token
    for i in range(n + warmup):
        start = time.perf_counter()
        next(gen)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_decode(cfg: Config, opts: BenchOptions, device: str, dtype) -> dict:
    from .models import build_model

    speed = []
    longest = max(opts.decode_contexts)
    for v in attention_variants(cfg):
        c = variant_config(cfg, v)
        c.model.block_size = max(c.model.block_size, longest + opts.decode_tokens + opts.warmup + 2)
        c.model.dropout = 0.0
        torch.manual_seed(0)
        model = build_model(c.model).to(device=device, dtype=dtype).eval()
        g = torch.Generator().manual_seed(1)
        for ctx_len in opts.decode_contexts:
            prompt = torch.randint(0, c.model.vocab_size, (ctx_len,), generator=g).tolist()
            with torch.no_grad():
                cached = per_token_seconds(model, prompt, opts.decode_tokens, True, device, opts.warmup)
                full = per_token_seconds(model, prompt, max(3, opts.decode_tokens // 3), False, device, 1)
            speed.append({"attention": v, "context": ctx_len, "cached_tokens_per_sec": 1 / cached,
                          "recompute_tokens_per_sec": 1 / full, "speedup": full / cached})
    return {"dtype": str(dtype).replace("torch.", ""), "speed": speed, "cache": cache_rows(cfg, dtype)}


# ---------------------------------------------------------------- memory


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
    import torch.nn.functional as F

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
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .evaluate import autocast_for
    from .models.attention import Attention
    from .models.gpt2 import GPT2Attention
    from .models import build_model

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
        blocks = model.transformer.h if cfg.model.arch == "gpt2" else model.blocks
        for m in model.modules():
            if isinstance(m, (Attention, GPT2Attention)):
                m.kernels = device.split(":")[0]
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
    from .train import pick_dtype

    m, t = cfg.model, cfg.train
    device = t.device if t.device != "auto" else "cpu"
    dtype = pick_dtype(t.dtype, device)
    with torch.device("meta"):
        from .models import build_model

        model = build_model(m)
    n = model.num_params()
    weights = 4 * n
    from .optim import param_groups

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
    from .models import build_model

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


def small_memory_config(cfg: Config) -> Config:
    """The preset's model shrunk to a few layers of width 128 (CPU measurement in seconds)."""
    c = copy.deepcopy(cfg)
    m = c.model
    m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size = 2, 128, 4, 128, 1024
    m.n_kv_head = 2 if m.arch == "moe" else 0
    m.ffn_hidden = m.expert_hidden = 0
    m.kv_lora_rank, m.q_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 64, 0, 32, 16, 32
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


# ---------------------------------------------------------------- tokenizer


def bench_tokenizer(cfg: Config, opts: BenchOptions) -> dict:
    from .data import bundled_corpus
    from .tokenizer import split_chunks, train_tokenizer

    text = bundled_corpus().read_text(encoding="utf-8")
    nbytes = len(text.encode("utf-8"))
    vocab = cfg.data.vocab_size
    start = time.perf_counter()
    tok = train_tokenizer([text], vocab)
    train_s = time.perf_counter() - start
    chunks = list(split_chunks(text, 1 << 16))
    sec = median_times({"encode": lambda: [tok.encode(c) for c in chunks]}, max(1, opts.repeats // 2), 1)["encode"]
    n_tokens = sum(len(tok.encode(c).ids) for c in chunks)
    return {"corpus_bytes": nbytes, "vocab_size": vocab, "train_sec": train_s, "encode_mb_per_sec": nbytes / sec / 1e6,
            "tokens": n_tokens, "bytes_per_token": nbytes / n_tokens}


# ---------------------------------------------------------------- peers (Hugging Face transformers)


def hf_twin(cfg: Config):
    """(minideep config, transformers model) of the same architecture, or a reason why not."""
    import transformers

    m = cfg.model
    if m.arch == "gpt2":
        hc = transformers.GPT2Config(vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.n_embd,
                                     n_layer=m.n_layer, n_head=m.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, layer_norm_epsilon=1e-5)
        c = copy.deepcopy(cfg)
        c.model.dropout, c.model.attention_dropout = 0.0, None  # as its twin: no dropout on either side
        return c, transformers.GPT2LMHeadModel(hc)
    from .models.transformer import expert_hidden

    c = copy.deepcopy(cfg)
    mm = c.model
    # Mixtral: gqa, every block sparse, softmax router renormalised over the top k, dropless, no z-loss
    mm.attention, mm.first_k_dense, mm.moe_every, mm.n_shared_experts = "gqa", 0, 1, 0
    mm.router, mm.norm_topk, mm.router_noise, mm.capacity_factor, mm.z_loss_coef = "softmax", True, "none", None, 0.0
    mm.dropout, mm.attention_dropout = 0.0, None
    hc = transformers.MixtralConfig(
        vocab_size=mm.vocab_size, hidden_size=mm.n_embd, intermediate_size=expert_hidden(mm), num_hidden_layers=mm.n_layer,
        num_attention_heads=mm.n_head, num_key_value_heads=mm.n_kv_head or mm.n_head, num_local_experts=mm.n_experts,
        num_experts_per_tok=mm.top_k, max_position_embeddings=mm.block_size, rope_theta=mm.rope_theta,
        tie_word_embeddings=mm.tie_embeddings, output_router_logits=True, router_aux_loss_coef=mm.aux_loss_coef,
        rms_norm_eps=1e-6)
    return c, transformers.MixtralForCausalLM(hc)


def hf_step_fn(model, cfg: Config, device: str, dtype):
    """The transformers model's step, otherwise the same (batch, autocast, clipping, AdamW)."""
    model.to(device)
    # transformers shifts the labels itself: it gets the inputs as labels
    return step_fn(model, cfg, device, dtype, lambda x, y: model(input_ids=x, labels=x), lambda out: out.loss)


def decode_seconds(ours, hf, prompt: list[int], n: int, device: str, repeats: int) -> tuple[float, float]:
    """Seconds per new token of minideep's `generate` and of transformers' `generate` (greedy, each
    with its KV cache), prefill excluded: (time for n + 1 tokens - time for 1 token) / n. The four
    timings are interleaved repetitions, so drift in the machine's speed falls on both alike."""
    from .generate import generate

    hf.eval()
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)

    def ours_gen(k):
        return lambda: sum(1 for _ in generate(ours, prompt, k, temperature=0.0, use_cache=True, device=device))

    def hf_gen(k):
        return lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                   use_cache=True, pad_token_id=0, eos_token_id=None)

    with torch.no_grad():
        t = median_times({"ours1": ours_gen(1), "ours": ours_gen(n + 1), "hf1": hf_gen(1), "hf": hf_gen(n + 1)},
                         repeats, 1, syncer(device))
    return (t["ours"] - t["ours1"]) / n, (t["hf"] - t["hf1"]) / n


def bench_peers(cfgs: dict[str, Config], opts: BenchOptions, device: str, dtype) -> dict:
    """minideep against transformers on the same architectures, same batch, same AdamW."""
    try:
        import transformers
    except ImportError:
        raise UserError("--compare-hf needs Hugging Face transformers: pip install transformers")
    from .models import build_model

    train_rows, decode_rows = [], []
    for arch, cfg in cfgs.items():
        torch.manual_seed(0)
        mcfg, hf = hf_twin(cfg)
        ours = build_model(mcfg.model).to(device)
        matmul, matmul_flops = matmul_fn(device, dtype, opts.matmul_size(device))  # the reference, timed alongside
        t = median_times({"minideep": train_step_fn(ours, mcfg, device, dtype), "transformers": hf_step_fn(hf, mcfg, device, dtype),
                          "matmul": matmul}, opts.repeats, opts.warmup, syncer(device))
        fpt = ours.flops_per_token(mcfg.model.block_size)
        tokens = mcfg.train.batch_size * mcfg.model.block_size

        def share(sec: float) -> float:  # achieved FLOPs per second over the matmul's
            return tokens / sec * fpt * t["matmul"] / matmul_flops

        train_rows.append({"arch": arch, "hf_class": type(hf).__name__, "n_layer": mcfg.model.n_layer, "n_embd": mcfg.model.n_embd,
                           "tokens_per_step": tokens, "minideep_tokens_per_sec": tokens / t["minideep"],
                           "hf_tokens_per_sec": tokens / t["transformers"], "speedup": t["transformers"] / t["minideep"],
                           "flops_per_token": fpt, "matmul_tflops": matmul_flops / t["matmul"] / 1e12,
                           "minideep_matmul_fraction": share(t["minideep"]), "hf_matmul_fraction": share(t["transformers"])})
        if arch == "gpt2":  # transformers' generate with its cache, on the same GPT-2 at 512 tokens of context
            ctx_len, n = 512, opts.decode_tokens
            d = copy.deepcopy(mcfg)
            d.model.block_size = ctx_len + n + 4
            torch.manual_seed(0)
            _, hf_d = hf_twin(d)
            ours_d = build_model(d.model).to(device=device).eval()
            hf_d.to(device)
            prompt = torch.randint(0, d.model.vocab_size, (ctx_len,), generator=torch.Generator().manual_seed(1)).tolist()
            reps = 3 * opts.repeats  # a decode is ~50 ms: cheap to repeat, and noisy
            ours_s, hf_s = decode_seconds(ours_d, hf_d, prompt, n, device, reps)
            decode_rows.append({"arch": arch, "context": ctx_len, "minideep_tokens_per_sec": 1 / ours_s,
                                "hf_tokens_per_sec": 1 / hf_s, "speedup": hf_s / ours_s})
    return {"transformers": transformers.__version__, "train": train_rows, "decode": decode_rows}


# ---------------------------------------------------------------- the whole run


def run_bench(cfg: Config, opts: BenchOptions, preset: Optional[str] = None, peer_cfgs: Optional[dict] = None,
              on_event: Optional[Event] = None, variants: Optional[dict[str, Config]] = None) -> dict:
    """Run the chosen sections; returns the JSON-ready result (every section key present, None when
    not run). variants: configs whose training steps the train section times alongside cfg's."""
    from .train import pick_device, pick_dtype

    say = on_event or (lambda text: None)
    unknown = [s for s in opts.sections if s not in SECTIONS]
    if unknown:
        raise UserError(f"unknown bench section '{unknown[0]}'; choose from: {', '.join(SECTIONS)}")
    needs_device = [s for s in opts.sections if s not in ("memory", "tokenizer")] or (
        ["memory"] if "memory" in opts.sections and opts.measure_memory else [])
    device = dtype = None
    try:
        device = pick_device(cfg.train.device)
    except UserError as e:
        if needs_device:
            raise UserError(f"{e}; bench sections {', '.join(needs_device)} need it "
                            "(use -o train.device=cpu, or --estimate-memory for the memory prediction alone)")
    if device is not None:
        dtype = pick_dtype(cfg.train.dtype, device)
    if any(c.train.device != cfg.train.device for c in (variants or {}).values()):
        raise UserError("--vs compares steps on one device: set train.device for all of them, not in --vs")
    result: dict = {
        "schema_version": SCHEMA_VERSION, "minideep": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "preset": preset, "arch": cfg.model.arch,
        "attention": cfg.model.attention if cfg.model.arch == "moe" else "mha", "quick": opts.quick,
        "device": device, "threads": torch.get_num_threads(), "sections": list(opts.sections),
        **{s: None for s in SECTIONS},
    }
    start = time.perf_counter()
    for section in SECTIONS:
        if section not in opts.sections:
            continue
        say(f"{section} ... ({time.perf_counter() - start:.0f} s)")
        if section == "train":
            result["train"] = bench_train(cfg, opts, device, dtype, variants)
        elif section == "moe":
            result["moe"] = bench_moe(cfg, opts, device, dtype)
        elif section == "decode":
            result["decode"] = bench_decode(cfg, opts, device, dtype)
        elif section == "memory":
            result["memory"] = bench_memory(cfg, opts, device, dtype)
        elif section == "tokenizer":
            result["tokenizer"] = bench_tokenizer(cfg, opts)
        elif section == "peers":
            result["peers"] = bench_peers(peer_cfgs or {cfg.model.arch: cfg}, opts, device, dtype)
    result["elapsed_sec"] = time.perf_counter() - start
    return result


def json_safe(result: dict) -> str:
    return json.dumps(result, indent=2, allow_nan=False, default=float) + "\n"

