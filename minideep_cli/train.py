"""The training loop: AdamW or Muon (optim.py), warmup + cosine or WSD (over steps or a time budget), accumulation,
clipping, BF16 autocast on CUDA, periodic validation, TensorBoard, atomic checkpoints, exact
resume. Reports progress through a callback; never prints.

Under torchrun (distributed.py) every rank runs this loop on its own part of each batch; the
model is wrapped in DDP or FSDP2, gradients are synced on the last micro-step, and only rank 0
reports events, writes TensorBoard and saves checkpoints (full state dicts, the same file one
process writes). Values that decide control flow (elapsed time, stop requests, the logged loss)
are reduced across ranks so that every rank takes the same branch."""

from __future__ import annotations

import errno
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import check_resumable, check_weights, load_checkpoint, newest_run, save_checkpoint
from .config import Config, parse_override, set_value, to_yaml, validate
from .data import TokenData, bundled_data_dir, get_batch, make_sampler
from .data.integrity import check_same_data, fingerprint
from .device import cpu_native_bf16, keep_cpu_memory, pick_device, pick_dtype
from .distributed import (Dist, all_reduce, barrier, full_state, gather_objects, load_optimizer, setup,
                          sync_context, teardown, wrap)
from .errors import UserError, first_line
from .evaluate import autocast_for, bits_per_byte, evaluate_tokens, nll_and_bytes
from .files import LOCK, lock_folder, remove_stale_temps, stale_temp, write_file
from .generate import generate
from .models import build_model, set_dropout
from .models import has_experts
from .optim import lr_at, make_optimizer, run_progress, set_lr
from .threads import ThreadPolicy

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


class StoppedUnsaved(UserError):
    """A second Ctrl-C or SIGTERM in the middle of a step: stopped at once, nothing saved (the
    step's state is half-updated); the last checkpoint is as it was."""

    def __init__(self, signum: int, run_dir: Path, step: int):
        last = run_dir / "last.pt"
        kept = f"{last} (the last checkpoint) is intact" if last.is_file() else "no checkpoint had been saved yet"
        super().__init__(f"stopped at once by a second signal during step {step + 1}, without saving it; {kept}")
        self.signum = int(signum)


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


@dataclass
class RunState:
    """Where the run stands: what each step changes, and what a checkpoint's `loop` records."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds of training, those of the processes before a resume included
    best_val: float = float("inf")  # the lowest periodic validation loss (best.pt's)
    last_val: float = float("inf")  # the latest periodic validation loss
    stopped: str = "done"  # "done", "interrupted", "diverged"


@dataclass
class StepOutput:
    """What one optimizer step leaves for logging."""

    lr: float  # AdamW's, as logged; Muon's follows the same schedule
    grad_norm: torch.Tensor  # before clipping
    aux: dict  # the model's aux of the step's last micro-batch
    aux_loss: torch.Tensor  # the balancing loss, mean over the micro-batches
    loads: Optional[list[torch.Tensor]]  # tokens per expert of each MoE layer, summed over the step (and ranks)


def resume_config(run_dir: Optional[Path], overrides: list[str], data_dir: Optional[Path] = None
                  ) -> tuple[Path, Config, dict]:
    """--resume: the run dir (default: the newest run), its saved config with the -o overrides
    applied, and its last.pt, read once here and handed to train(checkpoint=...)."""
    run_dir = run_dir or newest_run()
    if run_dir is None:
        raise UserError("--resume: no run to resume under ./runs; give --out RUN_DIR")
    run_dir = Path(run_dir)
    if not (run_dir / "last.pt").is_file():
        raise UserError(f"--resume: no last.pt in {run_dir}")
    ckpt = load_checkpoint(run_dir / "last.pt")
    cfg = Config.from_dict(ckpt["config"])
    for o in overrides:
        k, v = parse_override(o)
        set_value(cfg, k, v, "overrides")  # a setting this run's arch lacks is refused by name
    if data_dir:
        cfg.data.dir = str(data_dir)
    validate(cfg)
    _check_budget_ahead(run_dir, cfg, ckpt.get("loop"), [parse_override(o)[0] for o in overrides])
    return run_dir, cfg, ckpt


def _check_budget_ahead(run_dir: Path, cfg: Config, loop, changed: list[str]) -> None:
    """A budget given with --resume must lie ahead of where the run stands: a run at step 185
    told -o train.max_steps=60 would start, do nothing and report 185 steps done."""
    budget = [k for k in ("train.max_steps", "train.max_minutes") if k in changed]
    if not budget or not isinstance(loop, dict):
        return
    step, elapsed = loop.get("step"), loop.get("elapsed")
    if not isinstance(step, int) or not isinstance(elapsed, (int, float)) or run_progress(step, elapsed, cfg) < 1.0:
        return
    t = cfg.train
    given = " and ".join(f"{k}={getattr(t, k.split('.')[1]):g}" for k in budget)
    raise UserError(f"--resume: {run_dir} is already at step {step} ({elapsed / 60:.1f} min trained), past {given}; "
                    f"give a larger budget to continue it")


def train(cfg: Config, run_dir: str | Path, resume: bool = False, on_event: Optional[Event] = None,
          force: bool = False, checkpoint: Optional[dict] = None, new_data: bool = False) -> TrainResult:
    """Train (or with resume, continue the run in run_dir exactly); one process, or one rank of
    a torchrun job. A new run needs an empty or missing run_dir (any folder with force). On
    resume, `checkpoint` is run_dir's last.pt when the caller has read it already; the data must
    be the data it trained on, unless new_data (then reading starts at the new data's beginning
    and the best validation loss starts over)."""
    d, device = setup(pick_device(cfg.train.device), cfg.train.distributed)
    if device == "cpu":
        keep_cpu_memory()
    try:
        return _train(cfg, Path(run_dir), resume, on_event, d, device, force, checkpoint, new_data)
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


CHECKPOINTS = ("last.pt", "best.pt")


def _is_run_dir(run_dir: Path) -> bool:
    """run_dir is minideep's: a run's config.yaml beside its checkpoints or logs, or nothing but
    minideep's own leftovers (its lock, temporaries of dead writers)."""
    if (run_dir / "config.yaml").is_file() and any((run_dir / n).exists() for n in (*CHECKPOINTS, "tb")):
        return True
    return all(p.name == LOCK or stale_temp(p.name, _own_name) for p in run_dir.iterdir())


def _own_name(name: str) -> bool:
    return name in (*CHECKPOINTS, "config.yaml")


def _check_run_dir(run_dir: Path, resume: bool, force: bool, d: Dist, checkpoint: Optional[dict]) -> Optional[dict]:
    """A new run needs an empty run dir (any with force); a resumed one, its last.pt, returned.
    A run dir another process is training into is refused, naming its PID."""
    if d.main and (run_dir / LOCK).is_file():
        lock_folder(run_dir, "minideep train").close()  # refuses while another process holds it
    if d.main and run_dir.is_dir() and _is_run_dir(run_dir):
        remove_stale_temps(run_dir, _own_name)  # checkpoints a killed process was writing
    _check_new_run_dir(run_dir, resume, force)
    ckpt = None
    if resume:
        if checkpoint is None and not (run_dir / "last.pt").is_file():
            raise UserError(f"--resume: no last.pt in {run_dir}")
        ckpt = checkpoint if checkpoint is not None else load_checkpoint(run_dir / "last.pt")
        check_resumable(ckpt, run_dir / "last.pt")
    barrier(d)  # every rank has checked run_dir before rank 0 writes into it
    return ckpt


def _check_new_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    if resume or force:
        return
    if (run_dir / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
    names = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"{run_dir} is not empty (it holds {shown}); choose another --out, or --force to write there")


def _fit_data(cfg: Config, data: TokenData, ckpt: Optional[dict]) -> None:
    """The model's vocabulary is the data's; both splits must hold a window (checked before
    anything is written into the run dir); a resumed run must read the same tokenizer."""
    if ckpt is not None and ckpt["tokenizer"] != data.tokenizer_json:
        raise UserError("--resume: the data's tokenizer differs from the checkpoint's")
    cfg.model.vocab_size = data.meta["vocab_size"]
    T = cfg.model.block_size
    for split, n in (("train", sum(len(s) for s in data.train_shards)), ("val", len(data.val))):
        if n < T + 2:
            raise UserError(f"the data's {split} split holds {n} tokens, fewer than model.block_size + 2 = {T + 2}; "
                            "use more text or a smaller model.block_size")


def _train(cfg: Config, run_dir: Path, resume: bool, on_event: Optional[Event], d: Dist, device: str,
           force: bool = False, checkpoint: Optional[dict] = None, new_data: bool = False) -> TrainResult:
    emit = (on_event or (lambda kind, info: None)) if d.main else (lambda kind, info: None)
    if pick_dtype(cfg.train.dtype, device) == torch.bfloat16 and device == "cpu" and not cpu_native_bf16():
        emit("note", {"text": "this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 runs slower than fp32 here"})
    ckpt = _check_run_dir(run_dir, resume, force, d, checkpoint)
    resumed_from = _file_id(run_dir / "last.pt") if resume and d.main else None
    data = _open_data_once(cfg, d, emit)
    _fit_data(cfg, data, ckpt)
    lock = None
    if d.main:  # one process writes a run dir: held until this one ends (the kernel frees it on kill -9)
        lock = lock_folder(run_dir, "minideep train")
    try:
        if d.main:  # again, now that no other process can start here
            _check_new_run_dir(run_dir, resume, force)
            if resume and _file_id(run_dir / "last.pt") != resumed_from:
                raise UserError(f"{run_dir / 'last.pt'} changed while this run was starting (another process "
                                "trained this run meanwhile); run the command again to continue from it")
        with _logger_errors_raised_here():
            return Trainer(cfg, run_dir, data, d, device, emit, ckpt, new_data).train()
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        last = run_dir / "last.pt"
        kept = (f"the last checkpoint, {last}, is intact (free some space, then continue with: minideep train "
                f"--resume --out {run_dir})") if last.is_file() else "no checkpoint had been saved yet"
        raise UserError(f"the disk holding {run_dir} is full ({e.strerror}); {kept}")
    finally:
        if lock is not None:
            lock.close()


def _file_id(path: Path) -> Optional[tuple]:
    """What changes when a checkpoint is saved again (a new file is renamed over it)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@contextmanager
def _logger_errors_raised_here():
    """TensorBoard writes its events from a thread; when a write fails (a full disk) the thread
    prints a traceback, and the writer raises the same error on its next call in this thread,
    which is where we report it. While training, that thread's print is silenced; every other
    thread's error prints as before."""
    previous = threading.excepthook

    def hook(args):
        if type(args.thread).__name__ != "_AsyncWriterThread" or not isinstance(args.exc_value, OSError):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


class Trainer:
    """One run: the model, optimizer, sampler and TensorBoard writer, and the steps its loop is
    made of (`train`): restore, train_step, log, evaluate_and_save, save, finish."""

    def __init__(self, cfg: Config, run_dir: Path, data: TokenData, d: Dist, device: str, emit: Event,
                 ckpt: Optional[dict], new_data: bool = False):
        t = cfg.train
        self.cfg, self.run_dir, self.data, self.d, self.device, self.emit = cfg, run_dir, data, d, device, emit
        self.dtype = pick_dtype(t.dtype, device)
        self.byte_lengths = data.byte_lengths()
        self.new_data, self.fingerprint = new_data, fingerprint(data)  # recorded in checkpoints (--resume checks it)
        if ckpt is not None:
            check_weights(cfg.model, ckpt["model"], f"--resume: {run_dir / 'last.pt'}")
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
        self.model = self.model.to(device)
        self.model.grad_checkpointing = t.grad_checkpointing
        self.wrapped = wrap(self.model, d, device)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.sampler = make_sampler(data, t.batch_size, cfg.model.block_size, t.seed, d.rank, d.world,
                                    cfg.data.order)
        self.state = RunState()
        self.restore(ckpt)
        if d.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_file(run_dir / "config.yaml", to_yaml(cfg))
        self.fwd_model = torch.compile(self.wrapped) if t.compile else self.wrapped
        self.eval_model = self.model if d.mode == "ddp" else self.fwd_model  # validation needs no DDP gradient hooks
        self.ctx = autocast_for(device, self.dtype)
        self.tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accum * d.world
        self.moe = has_experts(cfg.model)
        self.dropout_active = True  # as built (train.dropout_after_epochs turns it off until then)
        self.writer = self._open_writer(resumed=ckpt is not None)
        self.loss_sum, self.loss_count = torch.zeros((), device=device), 0  # the training loss since the last log
        self.last_log = (0.0, 0)  # (clock, tokens) at the last log, set when the loop starts
        # CPU threads follow the cores other work leaves free (threads.py); under torchrun each rank's
        # count stays as torchrun set it, since the other ranks are the "other work"
        self.threads = ThreadPolicy(t.threads if device == "cpu" and not d.active else torch.get_num_threads())

    def _open_writer(self, resumed: bool):
        if not self.d.main:
            return _NullWriter()
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when training

        # on resume, hide what an earlier process logged after the checkpoint's step (kept: that step)
        return SummaryWriter(str(self.run_dir / "tb"), purge_step=self.state.step + 1 if resumed else None)

    def restore(self, ckpt: Optional[dict]) -> None:
        """Resume: the optimizer, the counters, the sampler's position and the RNG states of last.pt
        (per rank when the world size is the same). A new run: ranks other than 0 reseed."""
        d, t = self.d, self.cfg.train
        if ckpt is None:
            if d.rank:
                torch.manual_seed(t.seed + d.rank)  # dropout and router noise differ between ranks
            return
        try:
            load_optimizer(self.wrapped, self.optimizer, ckpt["optimizer"], d)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"--resume: checkpoint does not match the config: {first_line(e)}")
        loop = ckpt["loop"]
        self.state = RunState(loop["step"], loop["tokens"], loop["elapsed"], loop["best_val_loss"])
        if self.new_data:  # --new-data: another validation split, so no best loss to beat yet
            self.state.best_val = float("inf")
        else:
            check_same_data(ckpt, self.data, str(self.run_dir / "last.pt"))
            self.sampler.load_state(loop)
        ranks = loop.get("rng_cpu_ranks")
        same_world = ranks is not None and len(ranks) == d.world
        torch.set_rng_state(ranks[d.rank] if same_world else loop["rng_cpu"])
        if d.rank and not same_world:
            torch.manual_seed(t.seed + 1000 * self.state.step + d.rank)
        cuda_ranks = loop.get("rng_cuda_ranks")
        if self.device.startswith("cuda") and loop.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(cuda_ranks[d.rank] if same_world and cuda_ranks else loop["rng_cuda"])

    def train(self) -> TrainResult:
        """The loop: steps until the budget is spent, a stop is asked (saved first) or the loss
        diverges; then finish."""
        s, t, cfg = self.state, self.cfg.train, self.cfg
        self.emit("start", {**self.start_info(), "threads": self.threads.start()})
        self.model.train()
        start, elapsed_before = time.perf_counter(), s.elapsed
        self.last_log = (start, s.tokens)
        with _StopFlag() as stop:
            while run_progress(s.step, s.elapsed, cfg) < 1.0:
                try:
                    out = self.train_step()
                except KeyboardInterrupt:  # a second signal inside a step: its state is half-updated
                    raise StoppedUnsaved(stop.signum or signal.SIGINT, self.run_dir, s.step)
                s.step += 1
                s.tokens += self.tokens_per_step
                s.elapsed = self.agreed(elapsed_before + time.perf_counter() - start, "max")
                finished = run_progress(s.step, s.elapsed, cfg) >= 1.0
                try:
                    if not self.after_step(out, stop, finished):
                        break
                except KeyboardInterrupt:  # a second signal between steps: the state is whole, save it
                    if self.d.active:
                        raise
                    stop.requested = True
                stop.requested = bool(self.agreed(float(stop.requested), "max"))  # a stop on any rank stops all
                if stop.requested:
                    s.stopped = "interrupted"
                    self.save(["last.pt"])
                    break
        self.writer.flush()
        return self.finish(stop.signum)

    def after_step(self, out: StepOutput, stop: _StopFlag, finished: bool) -> bool:
        """Log, validate and save as the step's number asks; False when the run diverged."""
        s, t = self.state, self.cfg.train
        changed = self.threads.check()
        if changed is not None:
            self.writer.add_scalar("train/threads", changed["threads"], s.step)
            self.emit("threads", {"step": s.step, **changed})
        if (s.step % t.log_interval == 0 or finished) and not self.log(out, stop):
            return False
        if s.step % t.eval_interval == 0 or finished:
            return self.evaluate_and_save(stop)
        if t.ckpt_interval and s.step % t.ckpt_interval == 0:
            self.save(["last.pt"])
        return True

    def start_info(self) -> dict:
        m, t, d = self.model, self.cfg.train, self.d
        return {"run_dir": str(self.run_dir), "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                "params": m.num_params(), "active_params": m.num_params(active=True),
                "step": self.state.step, "max_steps": t.max_steps, "max_minutes": t.max_minutes,
                "tokens_per_step": self.tokens_per_step, "train_tokens": self.data.meta["train_tokens"],
                "world": d.world, "distributed": d.mode, "sampler": type(self.sampler).__name__}

    def agreed(self, value: float, op: str) -> float:
        """Under torchrun, value reduced over the ranks (one clock, one stop request), so that
        every rank takes the same branch; in one process, value."""
        if not self.d.active:
            return value
        return all_reduce(torch.tensor([value], dtype=torch.float64, device=self.device), self.d, op).item()

    def follow_epochs(self) -> None:
        """train.dropout_after_epochs: dropout off until the run has read the training split that
        many times (counted from the tokens trained, so a resumed run agrees), then at its rates."""
        after = self.cfg.train.dropout_after_epochs
        if after > 0:
            active = self.state.tokens >= after * self.data.meta["train_tokens"]
            if active != self.dropout_active:
                set_dropout(self.model, active)
                self.dropout_active = active

    def train_step(self) -> StepOutput:
        """One optimizer step (docs/design.md, Training): grad_accum micro-batches of (LM loss +
        balancing loss) / grad_accum, gradients synced on the last; clipping; the step; then the
        router bias update from the step's loads."""
        cfg, t, d, dev = self.cfg, self.cfg.train, self.d, self.device
        A = t.grad_accum
        multiplier = lr_at(run_progress(self.state.step, self.state.elapsed, cfg), cfg)
        set_lr(self.optimizer, multiplier, cfg)
        self.follow_epochs()
        loads = None
        aux_sum = torch.zeros((), device=dev)
        for micro in range(A):
            x, y = self.sampler.next_batch()  # (B, T) each
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with sync_context(self.wrapped, d, micro == A - 1):
                with self.ctx:
                    out = self.fwd_model(x, y)
                aux_loss = out.aux.get("loss", torch.zeros((), device=dev))
                ((out.loss + aux_loss) / A).backward()
            self.loss_sum += out.loss.detach() / A
            aux_sum += aux_loss.detach() / A
            if self.moe:
                step_loads = [r["tokens_per_expert"] for r in out.aux["routing"]]  # (E,) per MoE layer
                loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads)]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.moe and d.active:  # the loads of all ranks: router biases stay equal everywhere
            loads = list(all_reduce(torch.stack(loads), d))
        if self.moe and cfg.model.bias_update_rate > 0:
            self.model.update_router_bias(loads)
        self.loss_count += 1
        return StepOutput(t.lr * multiplier, grad_norm, out.aux, aux_sum, loads)

    def log(self, out: StepOutput, stop: _StopFlag) -> bool:
        """The mean training loss since the last log (one host sync), to TensorBoard and the
        caller, who may ask to stop; False when it or the gradient norm is not finite."""
        s, d = self.state, self.d
        train_loss = (all_reduce(self.loss_sum, d) / (self.loss_count * d.world)).item()
        self.loss_sum.zero_()
        self.loss_count = 0
        if not math.isfinite(train_loss) or not math.isfinite(out.grad_norm.item()):
            return self.diverged(train_loss)
        now = time.perf_counter()
        tps = (s.tokens - self.last_log[1]) / max(1e-9, now - self.last_log[0])
        self.last_log = (now, s.tokens)
        info = {"step": s.step, "loss": train_loss, "lr": out.lr, "grad_norm": out.grad_norm.item(),
                "tokens_per_sec": tps, "progress": run_progress(s.step, s.elapsed, self.cfg), "elapsed": s.elapsed}
        for name in ("loss", "lr", "grad_norm", "tokens_per_sec"):
            self.writer.add_scalar(f"train/{name}", info[name], s.step)
        if self.moe and d.main:
            info["imbalance"] = routing_summary(out.loads)
            log_routing(self.writer, out.aux, out.loads, out.aux_loss, s.step)
        if self.emit("step", info):
            stop.requested = True
        return True

    def diverged(self, loss: float) -> bool:
        """A non-finite loss stops the run; the last good checkpoint is kept. Returns False."""
        self.state.stopped = "diverged"
        self.emit("diverged", {"step": self.state.step, "loss": loss, "saved": (self.run_dir / "last.pt").is_file()})
        return False

    @torch.no_grad()
    def quick_val(self, stop: Optional[_StopFlag] = None) -> Optional[dict]:
        """Validation on eval_iters fixed batches: loss and bits per byte (the same on every rank).
        None when a stop is asked meanwhile (checked between batches: a long validation must not
        hold up a scheduler's SIGTERM); the weights are those of the step, so the caller saves."""
        t, dev = self.cfg.train, self.device
        self.model.eval()
        g = torch.Generator().manual_seed(EVAL_SEED)
        blen = torch.tensor(self.byte_lengths, dtype=torch.float64, device=dev)
        nll = nbytes = count = 0.0
        try:
            for _ in range(t.eval_iters):
                if stop is not None and self.agreed(float(stop.requested), "max"):
                    return None
                x, y = get_batch(self.data.val, t.batch_size, self.cfg.model.block_size, g)
                a, b, c = nll_and_bytes(self.eval_model, x.to(dev), y.to(dev), blen, self.ctx)
                nll, nbytes, count = nll + a.item(), nbytes + b.item(), count + c.item()
        except KeyboardInterrupt:  # a second signal: validation changes no state, so saving is still right
            if stop is None or self.d.active:
                raise
            return None
        finally:
            self.model.train()
        return {"loss": nll / count, "bpb": bits_per_byte(nll, nbytes)}

    def evaluate_and_save(self, stop: Optional[_StopFlag] = None) -> bool:
        """Periodic validation; saves last.pt, and best.pt when the loss is the lowest yet. False
        when the loss is not finite. A stop asked during validation skips it (the loop saves)."""
        s = self.state
        val = self.quick_val(stop)
        if val is None:
            stop.requested = True
            return True
        if not math.isfinite(val["loss"]):
            return self.diverged(val["loss"])
        self.writer.add_scalar("val/loss", val["loss"], s.step)
        self.writer.add_scalar("val/bpb", val["bpb"], s.step)
        improved = val["loss"] < s.best_val
        s.last_val = val["loss"]
        s.best_val = min(s.best_val, val["loss"])
        self.save(["last.pt", "best.pt"] if improved else ["last.pt"])
        self.emit("eval", {"step": s.step, **val, "best": improved})
        return True

    def save(self, names: list[str]) -> None:
        """Every rank calls this (gathering FSDP shards is collective); rank 0 writes."""
        d, s = self.d, self.state
        model_sd, optim_sd = full_state(self.wrapped, self.optimizer, d)
        rng_cpu = gather_objects(torch.get_rng_state(), d)
        rng_cuda = gather_objects(torch.cuda.get_rng_state() if self.device.startswith("cuda") else None, d)
        if not d.main:
            return
        loop = {
            "step": s.step, "tokens": s.tokens, "elapsed": s.elapsed, "best_val_loss": s.best_val,
            "rng_cpu": rng_cpu[0], "rng_cuda": rng_cuda[0], **self.sampler.state(),
        }
        if d.active:
            loop.update(world=d.world, rng_cpu_ranks=rng_cpu, rng_cuda_ranks=rng_cuda)
        state = {"model": model_sd, "optimizer": optim_sd, "config": self.cfg.to_dict(),
                 "tokenizer": self.data.tokenizer_json, "data": dict(self.data.meta), "loop": loop,
                 "data_fingerprint": self.fingerprint}
        for name in names:
            save_checkpoint(state, self.run_dir / name)

    def finish(self, signum: int) -> TrainResult:
        """The result. A run that spent its budget also evaluates its best weights (under torchrun,
        the last step's) on the whole validation split and appends a sample to samples.txt."""
        s, d, t = self.state, self.d, self.cfg.train
        result = TrainResult(self.run_dir, s.step, s.tokens, s.elapsed, s.stopped, signal=signum,
                             best_val_loss=s.best_val, main=d.main)
        if s.stopped != "done":
            self.writer.close()
            return result
        result.val_step = s.step
        if not d.active and s.best_val < s.last_val and (self.run_dir / "best.pt").is_file():
            # report the best model, as early stopping would keep it; last.pt still resumes the run
            best = load_checkpoint(self.run_dir / "best.pt")
            self.model.load_state_dict(best["model"])
            result.val_step = best["loop"]["step"]
        self.emit("final_eval", {"step": result.val_step})
        result.val = evaluate_tokens(self.model, self.data.val, self.byte_lengths, self.cfg.model.block_size,
                                     batch_size=t.batch_size, device=self.device, dtype=self.dtype)
        self.writer.add_scalar("val/final_bpb", result.val["bpb"], s.step)
        self.writer.close()
        if t.sample_tokens > 0 and (d.main or d.mode == "fsdp"):  # FSDP: every rank takes part in forward
            result.sample = self.sample()
            if d.main:
                with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
                    f.write(f"--- step {s.step}, val bpb {result.val['bpb']:.4f}\n{result.sample}\n")
        return result

    def sample(self) -> str:
        """The prompt and train.sample_tokens generated after it, with the sample settings."""
        tok, s = self.data.tokenizer(), self.cfg.sample
        g = torch.Generator(device=self.device).manual_seed(s.seed)
        ids = list(generate(self.model, tok.encode(s.prompt).ids, self.cfg.train.sample_tokens, s.temperature,
                            s.top_k, s.top_p, generator=g, device=self.device))
        return s.prompt + tok.decode(ids)


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
