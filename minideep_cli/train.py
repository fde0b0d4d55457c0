"""The training loop: AdamW or Muon (optim.py), warmup + cosine or WSD (over steps or a time budget), accumulation,
clipping, BF16 autocast on CUDA, periodic validation, TensorBoard, atomic checkpoints, exact
resume. Reports progress through a callback; never prints.

Under torchrun (distributed.py) every rank runs this loop on its own part of each batch; the
model is wrapped in DDP or FSDP2, gradients are synced on the last micro-step, and only rank 0
reports events, writes TensorBoard and saves checkpoints (full state dicts, the same file one
process writes). Values that decide control flow (elapsed time, stop requests, the logged loss)
are reduced across ranks so that every rank takes the same branch."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import check_weights, load_checkpoint, save_checkpoint
from .config import Config, to_yaml
from .data import TokenData, bundled_data_dir, get_batch, make_sampler
from .distributed import (Dist, all_reduce, barrier, full_state, gather_objects, load_optimizer, setup,
                          sync_context, teardown, wrap)
from .errors import UserError
from .evaluate import autocast_for, evaluate_tokens, nll_and_bytes
from .files import remove_stale_temps
from .generate import generate
from .models import build_model
from .optim import lr_at, make_optimizer, run_progress, set_lr

Event = Callable[[str, dict], Optional[bool]]  # (kind, info) -> True to stop after this step
EVAL_SEED = 4242  # periodic validation always reads the same batches


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed: float
    stopped: str  # "done", "interrupted", "diverged"
    signal: int = 0  # when interrupted by SIGINT or SIGTERM: which one
    val: dict = field(default_factory=dict)  # final full-split evaluation
    sample: str = ""
    best_val_loss: float = float("inf")
    val_step: int = 0  # the step whose weights `val` measures (the best checkpoint's, if earlier)
    main: bool = True  # False on torchrun ranks other than 0 (they report nothing)


def pick_device(name: str, option: str = "train.device") -> str:
    """auto (CUDA when there is one, else CPU), or the device named; `option` names the setting
    in messages."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError:
        raise UserError(f"{option}: unknown device '{name}'; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{option}={name} but CUDA is not available")
    return name


def cpu_info() -> dict[str, str]:
    """The first CPU's fields as Linux lists them in /proc/cpuinfo ("flags", "vendor_id", "cpu
    family", ...); empty elsewhere."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():  # the end of the first CPU's block
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_flags(info: dict[str, str] | None = None) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing)."""
    return set((cpu_info() if info is None else info).get("flags", "").split())


def cpu_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16): there bf16 matrix
    products are faster than fp32; elsewhere bf16 is emulated and slower."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def pick_dtype(name: str, device: str) -> torch.dtype:
    """auto: bf16 autocast on CUDA, fp32 on CPU. Even with native bf16 the cpu preset's moe model
    trained worse in bf16 (2.161 against 2.144 bits per byte in the same 9.5 minutes)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def open_data(cfg: Config, progress=None) -> TokenData:
    if cfg.data.dir:
        return TokenData.open(cfg.data.dir)
    return TokenData.open(bundled_data_dir(cfg.data.vocab_size, cfg.data.val_fraction, progress))


class _StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) asks the loop to stop at the next
    step boundary and save, instead of dying mid-step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = 0  # the signal that asked (0: the caller asked)
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _NullWriter:
    """TensorBoard for ranks other than 0: writes nothing."""

    def add_scalar(self, *a, **k):
        pass

    add_histogram = add_scalar
    flush = add_scalar
    close = add_scalar


def routing_summary(loads: list[torch.Tensor]) -> float:
    """Worst-layer load imbalance, max/mean of tokens per expert (1.0 = perfectly balanced)."""
    return max((l.max() / l.float().mean().clamp_min(1e-9)).item() for l in loads) if loads else 0.0


def train(cfg: Config, run_dir: str | Path, resume: bool = False, on_event: Optional[Event] = None,
          force: bool = False) -> TrainResult:
    """Train (or with resume, continue the run in run_dir exactly); one process, or one rank of
    a torchrun job. A new run needs an empty or missing run_dir (any folder with force)."""
    d, device = setup(pick_device(cfg.train.device), cfg.train.distributed)
    try:
        return _train(cfg, Path(run_dir), resume, on_event, d, device, force)
    finally:
        teardown(d)


def _open_data_once(cfg: Config, d: Dist, emit: Event) -> TokenData:
    """Rank 0 tokenizes the bundled corpus if it is not cached yet; the other ranks wait."""
    progress = lambda done, total: emit("tokenize", {"done": done, "total": total})  # noqa: E731
    if d.active and not cfg.data.dir:
        if d.main:
            open_data(cfg, progress)
        barrier(d)
    return open_data(cfg, progress)


def _train(cfg: Config, run_dir: Path, resume: bool, on_event: Optional[Event], d: Dist, device: str,
           force: bool = False) -> TrainResult:
    emit = (on_event or (lambda kind, info: None)) if d.main else (lambda kind, info: None)
    t = cfg.train
    dtype = pick_dtype(t.dtype, device)
    if dtype == torch.bfloat16 and device == "cpu" and not cpu_native_bf16():
        emit("note", {"text": "this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 runs slower than fp32 here"})

    ckpt = None
    if d.main and run_dir.is_dir():
        remove_stale_temps(run_dir)  # checkpoints a killed process was writing
    if not resume and (run_dir / "last.pt").exists() and not force:
        raise UserError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
    if not resume and not force and run_dir.is_dir() and any(run_dir.iterdir()):
        names = sorted(p.name for p in run_dir.iterdir())
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"{run_dir} is not empty (it holds {shown}); choose another --out, or --force to write there")
    if resume:
        ckpt_path = run_dir / "last.pt"
        if not ckpt_path.is_file():
            raise UserError(f"--resume: no last.pt in {run_dir}")
        ckpt = load_checkpoint(ckpt_path)
    barrier(d)  # every rank has checked run_dir before rank 0 writes into it

    data = _open_data_once(cfg, d, emit)
    if ckpt is not None and ckpt["tokenizer"] != data.tokenizer_json:
        raise UserError("--resume: the data's tokenizer differs from the checkpoint's")
    cfg.model.vocab_size = data.meta["vocab_size"]
    byte_lengths = data.byte_lengths()
    B, T, A = t.batch_size, cfg.model.block_size, t.grad_accum
    for split, n in (("train", sum(len(s) for s in data.train_shards)), ("val", len(data.val))):
        if n < T + 2:  # checked before anything is written into the run dir
            raise UserError(f"the data's {split} split holds {n} tokens, fewer than model.block_size + 2 = {T + 2}; "
                            "use more text or a smaller model.block_size")

    if ckpt is not None:
        check_weights(cfg.model, ckpt["model"], f"--resume: {run_dir / 'last.pt'}")
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    step, tokens_seen, elapsed_before, best_val = 0, 0, 0.0, float("inf")
    last_val = float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model = model.to(device)
    model.grad_checkpointing = t.grad_checkpointing
    wrapped = wrap(model, d, device)
    optimizer = make_optimizer(model, cfg, device)
    sampler = make_sampler(data, B, T, t.seed, d.rank, d.world)
    if ckpt is not None:
        try:
            load_optimizer(wrapped, optimizer, ckpt["optimizer"], d)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"--resume: checkpoint does not match the config: {str(e).splitlines()[0]}")
        loop = ckpt["loop"]
        step, tokens_seen, elapsed_before, best_val = loop["step"], loop["tokens"], loop["elapsed"], loop["best_val_loss"]
        sampler.load_state(loop)
        ranks = loop.get("rng_cpu_ranks")
        same_world = ranks is not None and len(ranks) == d.world
        torch.set_rng_state(ranks[d.rank] if same_world else loop["rng_cpu"])
        if d.rank and not same_world:
            torch.manual_seed(t.seed + 1000 * step + d.rank)
        cuda_ranks = loop.get("rng_cuda_ranks")
        if device.startswith("cuda") and loop.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(cuda_ranks[d.rank] if same_world and cuda_ranks else loop["rng_cuda"])
    elif d.rank:
        torch.manual_seed(t.seed + d.rank)  # dropout and router noise differ between ranks

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    fwd_model = torch.compile(wrapped) if t.compile else wrapped
    eval_model = model if d.mode == "ddp" else fwd_model  # validation needs no DDP gradient hooks
    ctx = autocast_for(device, dtype)
    tokens_per_step = B * T * A * d.world
    moe = cfg.model.arch == "moe"

    if d.main:
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when training

        # on resume, hide what an earlier process logged after the checkpoint's step (kept: that step)
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=step + 1 if resume else None)
    else:
        writer = _NullWriter()

    def save(best: float, names: list[str]) -> None:
        """Every rank calls this (gathering FSDP shards is collective); rank 0 writes."""
        model_sd, optim_sd = full_state(wrapped, optimizer, d)
        rng_cpu = gather_objects(torch.get_rng_state(), d)
        rng_cuda = gather_objects(torch.cuda.get_rng_state() if device.startswith("cuda") else None, d)
        if not d.main:
            return
        loop = {
            "step": step, "tokens": tokens_seen, "elapsed": elapsed, "best_val_loss": best,
            "rng_cpu": rng_cpu[0], "rng_cuda": rng_cuda[0], **sampler.state(),
        }
        if d.active:
            loop.update(world=d.world, rng_cpu_ranks=rng_cpu, rng_cuda_ranks=rng_cuda)
        state = {"model": model_sd, "optimizer": optim_sd, "config": cfg.to_dict(),
                 "tokenizer": data.tokenizer_json, "data": dict(data.meta), "loop": loop}
        for name in names:
            save_checkpoint(state, run_dir / name)

    @torch.no_grad()
    def quick_val() -> dict:
        """Validation on eval_iters fixed batches: loss and bits per byte (the same on every rank)."""
        model.eval()
        g = torch.Generator().manual_seed(EVAL_SEED)
        blen = torch.tensor(byte_lengths, dtype=torch.float64, device=device)
        nll = nbytes = count = 0.0
        for _ in range(t.eval_iters):
            x, y = get_batch(data.val, B, T, g)
            a, b, c = nll_and_bytes(eval_model, x.to(device), y.to(device), blen, ctx)
            nll, nbytes, count = nll + a.item(), nbytes + b.item(), count + c.item()
        model.train()
        return {"loss": nll / count, "bpb": nll / (math.log(2) * nbytes)}

    emit("start", {"run_dir": str(run_dir), "device": device, "dtype": str(dtype).replace("torch.", ""),
                   "params": model.num_params(), "active_params": model.num_params(active=True),
                   "step": step, "max_steps": t.max_steps, "max_minutes": t.max_minutes,
                   "tokens_per_step": tokens_per_step, "train_tokens": data.meta["train_tokens"],
                   "world": d.world, "distributed": d.mode, "sampler": type(sampler).__name__})

    model.train()
    start = time.perf_counter()
    elapsed = elapsed_before
    stopped = "done"
    last_log_time, last_log_tokens = start, tokens_seen
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    with _StopFlag() as stop:
        while run_progress(step, elapsed, cfg) < 1.0:
            multiplier = lr_at(run_progress(step, elapsed, cfg), cfg)
            set_lr(optimizer, multiplier, cfg)
            lr = t.lr * multiplier  # AdamW's, as logged; Muon's follows the same schedule
            loads = None
            aux_sum = torch.zeros((), device=device)
            for micro in range(A):
                x, y = sampler.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with sync_context(wrapped, d, micro == A - 1):
                    with ctx:
                        out = fwd_model(x, y)
                    aux_loss = out.aux.get("loss", torch.zeros((), device=device))
                    ((out.loss + aux_loss) / A).backward()
                loss_sum += out.loss.detach() / A
                aux_sum += aux_loss.detach() / A
                if moe:
                    step_loads = [s["tokens_per_expert"] for s in out.aux["routing"]]
                    loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads)]
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if moe and d.active:  # the loads of all ranks: router biases stay equal everywhere
                loads = list(all_reduce(torch.stack(loads), d))
            if moe and cfg.model.bias_update_rate > 0:
                model.update_router_bias(loads)
            step += 1
            loss_count += 1
            tokens_seen += tokens_per_step
            elapsed = elapsed_before + time.perf_counter() - start
            if d.active:  # one clock for all ranks, so they agree on the schedule and the budget
                elapsed = all_reduce(torch.tensor([elapsed], dtype=torch.float64, device=device), d, "max").item()

            if step % t.log_interval == 0 or run_progress(step, elapsed, cfg) >= 1.0:
                train_loss = (all_reduce(loss_sum, d) / (loss_count * d.world)).item()  # one host sync per log
                loss_sum.zero_()
                loss_count = 0
                if not math.isfinite(train_loss) or not math.isfinite(grad_norm.item()):
                    stopped = "diverged"
                    emit("diverged", {"step": step, "loss": train_loss, "saved": (run_dir / "last.pt").is_file()})
                    break
                now = time.perf_counter()
                tps = (tokens_seen - last_log_tokens) / max(1e-9, now - last_log_time)
                last_log_time, last_log_tokens = now, tokens_seen
                info = {"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                        "tokens_per_sec": tps, "progress": run_progress(step, elapsed, cfg), "elapsed": elapsed}
                writer.add_scalar("train/loss", train_loss, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", info["grad_norm"], step)
                writer.add_scalar("train/tokens_per_sec", tps, step)
                if moe and d.main:
                    info["imbalance"] = routing_summary(loads)
                    log_routing(writer, out.aux, loads, aux_sum, step)
                if emit("step", info):
                    stop.requested = True

            finished = run_progress(step, elapsed, cfg) >= 1.0
            if step % t.eval_interval == 0 or finished:
                val = quick_val()
                if not math.isfinite(val["loss"]):
                    stopped = "diverged"
                    emit("diverged", {"step": step, "loss": val["loss"], "saved": (run_dir / "last.pt").is_file()})
                    break
                writer.add_scalar("val/loss", val["loss"], step)
                writer.add_scalar("val/bpb", val["bpb"], step)
                improved = val["loss"] < best_val
                last_val = val["loss"]
                best_val = min(best_val, val["loss"])
                save(best_val, ["last.pt", "best.pt"] if improved else ["last.pt"])
                emit("eval", {"step": step, **val, "best": improved})
            elif t.ckpt_interval and step % t.ckpt_interval == 0:
                save(best_val, ["last.pt"])
            if d.active:  # a stop asked on any rank (a signal, or rank 0's caller) stops them all
                flag = torch.tensor([float(stop.requested)], device=device)
                stop.requested = bool(all_reduce(flag, d, "max").item())
            if stop.requested:
                stopped = "interrupted"
                save(best_val, ["last.pt"])
                break
    writer.flush()

    result = TrainResult(run_dir, step, tokens_seen, elapsed, stopped, signal=stop.signum, best_val_loss=best_val,
                         main=d.main)
    if stopped != "done":
        writer.close()
        return result
    result.val_step = step
    if not d.active and best_val < last_val and (run_dir / "best.pt").is_file():
        # report the best model, as early stopping would keep it; last.pt still resumes the run
        best = load_checkpoint(run_dir / "best.pt")
        model.load_state_dict(best["model"])
        result.val_step = best["loop"]["step"]
    emit("final_eval", {"step": result.val_step})
    result.val = evaluate_tokens(model, data.val, byte_lengths, T, batch_size=B, device=device, dtype=dtype)
    writer.add_scalar("val/final_bpb", result.val["bpb"], step)
    writer.close()
    if t.sample_tokens > 0 and (d.main or d.mode == "fsdp"):  # FSDP: every rank takes part in forward
        tok = data.tokenizer()
        s = cfg.sample
        g = torch.Generator(device=device).manual_seed(s.seed)
        ids = list(generate(model, tok.encode(s.prompt).ids, t.sample_tokens, s.temperature, s.top_k, s.top_p,
                            generator=g, device=device))
        result.sample = s.prompt + tok.decode(ids)
        if d.main:
            with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"--- step {step}, val bpb {result.val['bpb']:.4f}\n{result.sample}\n")
    return result


def log_routing(writer, aux: dict, loads: list[torch.Tensor], aux_sum: torch.Tensor, step: int) -> None:
    """Per-layer routing scalars and load histograms (from the last micro-batch and the step's loads)."""
    writer.add_scalar("moe/aux_total", aux_sum.item(), step)
    for layer, stats, load in zip(aux["moe_layers"], aux["routing"], loads):
        load = load.float()
        tag = f"moe/layer{layer}"
        writer.add_scalar(f"{tag}/imbalance", (load.max() / load.mean().clamp_min(1e-9)).item(), step)
        writer.add_scalar(f"{tag}/dropped_frac", stats["dropped"].item() / stats["assignments"], step)
        writer.add_scalar(f"{tag}/entropy", stats["entropy"].item(), step)
        writer.add_scalar(f"{tag}/aux", stats["aux"].item(), step)
        writer.add_scalar(f"{tag}/z", stats["z"].item(), step)
        writer.add_histogram(f"{tag}/tokens_per_expert", load.cpu(), step)
