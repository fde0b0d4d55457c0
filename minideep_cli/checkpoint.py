"""Checkpoints: one self-contained file, written atomically, read without running code.

A checkpoint is a dict of plain tensors, numbers, strings, lists and dicts:
  kind, format, model (state dict), optimizer (state dict or None), config (resolved, as a dict),
  tokenizer (the tokenizer JSON), loop (step, tokens, elapsed seconds, best val loss, RNG states,
  data position), data (meta.json of the data it trained on).
It is loaded with torch.load(weights_only=True), so a file can never execute code. A folder
written by `minideep export --format safetensors` loads into the same dict, with no optimizer
state: model.safetensors (every weight, tied ones once), minideep_config.json (kind, format, the
resolved config, the weight aliases, step and data meta) and tokenizer.json. Both formats are
read here; export/ writes them.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Optional

from .errors import UserError, first_line
from .files import atomic_file, sha256_file
from .schema import FINITE, NAT, POSITIVE, MapOf, Where, check, kind, read_json

KIND = "minideep-checkpoint"
FORMAT = 1
EXPORT_KIND = "minideep-export"
EXPORT_FORMAT = 1
EXPORT_CONFIG = "minideep_config.json"  # marks a safetensors export folder
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
INSTALL_HINT = "pip install safetensors (the export extra: pip install 'minideep[export]')"


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write to a temporary file in the same folder, flush, fsync, then rename over `path`."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
    try:
        with atomic_file(path) as f:
            torch.save({"kind": KIND, "format": FORMAT, **state}, f)
    except (OSError, RuntimeError, KeyboardInterrupt) as e:
        cause = e.__context__ if isinstance(e, RuntimeError) and e.__context__ else e  # torch wraps the writer's error
        if isinstance(cause, KeyboardInterrupt):
            raise UserError(f"saving {path} was interrupted; {kept}")
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            raise UserError(f"cannot save {path}: no space left on {_mount_point(path)}; {kept}")
        if isinstance(cause, OSError):
            raise UserError(f"cannot save {path}: {cause.strerror or cause}; {kept}")
        raise
    return path


def _mount_point(path: Path) -> Path:
    """The file system (mount point) holding path: the disk that is full."""
    p = path.parent.resolve()
    while not os.path.ismount(p):
        p = p.parent
    return p


def load_checkpoint(path: str | os.PathLike) -> dict:
    import torch

    p = Path(path)
    if p.is_dir():
        if is_export_dir(p):  # a `minideep export --format safetensors` folder: JSON + safetensors
            return complete(load_export(p), p)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise UserError(f"{p} is not a checkpoint file")
    with open(p, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save's zip container; never the legacy pickle format
            raise UserError(f"{p} is not a minideep checkpoint")
    try:  # the zip stores a CRC-32 of every part, which torch.load does not check: a flipped bit loads
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
        # RuntimeError: "encrypted", NotImplementedError: "zip file version", ValueError: a name's bad UTF-8
        first = first_line(e)
        raise UserError(f"{p} is damaged: its zip headers cannot be read ({first})")
    if bad is not None:
        raise UserError(f"{p} is damaged: its part {bad} does not match its checksum")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(f"{p} holds Python objects{what} that only running code could load: refused "
                        "(a minideep checkpoint holds tensors, numbers and strings only)")
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        first = first_line(e)
        raise UserError(f"{p} is not a readable minideep checkpoint (damaged or another format): {first}")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        raise UserError(f"{p} is not a minideep checkpoint")
    if ckpt.get("format") != FORMAT:
        raise UserError(f"{p} has checkpoint format {ckpt.get('format')}; this minideep reads {FORMAT}")
    return complete(ckpt, p)


def _specs():
    """The shapes (schema.py) of a checkpoint's parts, as every reader relies on them; RESUME
    adds what --resume reads. Built on call: torch is imported only where checkpoints are read."""
    import torch

    def rng_state(size=None):  # a generator's state: bytes (a CPU generator's are always 5056)
        return Where(torch.Tensor, lambda t: t.dtype == torch.uint8 and t.dim() == 1 and size in (None, t.numel()),
                     "a random generator state")

    rng, cpu = rng_state(), rng_state(torch.get_rng_state().numel())
    loop = {"step": NAT, "tokens": NAT, "elapsed?": Where(FINITE, lambda v: v >= 0, "a number of seconds"),
            "best_val_loss?": float, "rng_cpu?": cpu, "rng_cuda?": (rng, None), "rng_epoch?": cpu,
            "epoch_pos?": NAT, "data_pos?": {"shard": NAT, "offset": NAT, "epoch": NAT}, "world?": POSITIVE,
            "rng_cpu_ranks?": [cpu], "rng_cuda_ranks?": [(rng, None)]}
    optimizer = {"state": MapOf(MapOf((torch.Tensor, float))), "param_groups": [{"params": [int]}]}
    parts = {"model": MapOf(torch.Tensor), "optimizer": (optimizer, None), "config": dict, "tokenizer": str,
             "loop": loop, "data?": dict, "data_fingerprint?": str}
    resume = {"optimizer": optimizer, "loop": {"elapsed": object, "best_val_loss": object, "rng_cpu": object}}
    return parts, resume


def complete(ckpt: dict, p: Path) -> dict:
    """The checkpoint, once every part has the shape its readers rely on (schema.py) and its
    config and tokenizer are valid (a damaged one: one UserError naming p)."""
    from .config import DTYPES, Config, validate_model, validate_numbers
    from .tokenizer import load_tokenizer

    parts, _ = _specs()
    check(ckpt, parts, str(p))
    try:
        cfg = Config.from_dict(ckpt["config"])
        validate_numbers(cfg)
        validate_model(cfg.model)
        if cfg.train.dtype not in DTYPES:
            raise UserError(f"train.dtype must be one of {', '.join(DTYPES)}, got {cfg.train.dtype!r}"[:200])
    except UserError as e:
        raise UserError(f"{p} is damaged: its config is invalid: {e}")
    tok = load_tokenizer(ckpt["tokenizer"], f"the tokenizer in {p}")
    if tok.get_vocab_size() > cfg.model.vocab_size:
        raise UserError(f"{p} is damaged: its tokenizer holds {tok.get_vocab_size():,} ids, its model "
                        f"{cfg.model.vocab_size:,}")
    return ckpt


def check_resumable(ckpt: dict, p: Path) -> dict:
    """What --resume reads beyond what every reader does: the optimizer state and the loop's
    clock, best loss and random state (an export, or a damaged file, has none)."""
    _, resume = _specs()
    check(ckpt, resume, f"--resume: {p}")
    if ("rng_epoch" in ckpt["loop"]) != ("epoch_pos" in ckpt["loop"]):
        raise UserError(f"--resume: {p} is damaged: its loop holds only one of rng_epoch and epoch_pos")
    return ckpt


def newest_run(runs_dir: str | os.PathLike = "runs") -> Optional[Path]:
    runs = [d for d in Path(runs_dir).glob("*") if (d / "last.pt").is_file() or (d / "best.pt").is_file()]
    return max(runs, key=lambda d: max(f.stat().st_mtime for f in d.glob("*.pt"))) if runs else None


def resolve_checkpoint(path: Optional[str], prefer: str = "best") -> Path:
    """A checkpoint file, or a run dir (its best.pt, else last.pt), or a safetensors export folder
    (or its model.safetensors), or None = newest run in runs/."""
    if path is None:
        run = newest_run()
        if run is None:
            raise UserError("no checkpoint given and no runs under ./runs; train one with `minideep train`")
        p = run
    else:
        p = Path(path)
    if p.is_file() and p.suffix == ".safetensors" and is_export_dir(p.parent):
        p = p.parent
    if p.is_dir() and is_export_dir(p):
        return p
    if p.is_dir():
        order = ["best.pt", "last.pt"] if prefer == "best" else ["last.pt", "best.pt"]
        for name in order:
            if (p / name).is_file():
                return p / name
        raise UserError(f"no checkpoint (best.pt or last.pt) in {p}")
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    return p


def model_from_checkpoint(ckpt: dict, device: str = "cpu", path: Optional[os.PathLike] = None):
    """Rebuild the model a checkpoint describes and load its weights; returns (model, config).
    path names the checkpoint in messages."""
    from .config import Config, validate_model
    from .models import build_model

    cfg = Config.from_dict(ckpt["config"])
    try:
        validate_model(cfg.model)  # only what the model needs: training settings play no part here
    except UserError as e:
        raise UserError(f"{path or 'the checkpoint'}: its config is invalid: {e}")
    check_weights(cfg.model, ckpt["model"], str(path or "the checkpoint"))  # (before building it)
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def check_weights(m, weights: dict, where: str) -> None:
    """The weights have the names and shapes of the model config m gives, checked before that
    model is built: the layer count first, then every shape on the meta device (which allocates
    nothing), so a config claiming a huge model cannot exhaust memory."""
    import torch

    from .models import build_model, spec_of

    layer = re.compile(rf"{re.escape(spec_of(m).layer_prefix)}\.(\d+)\.")  # the arch's name for layer i's weights
    layers = {int(x.group(1)) for k in weights if (x := layer.match(k))}
    if len(layers) != m.n_layer:
        raise UserError(f"{where}'s weights hold {len(layers)} layers, model.n_layer is {m.n_layer}")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
        expected = {k: tuple(v.shape) for k, v in build_model(m).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    for k in sorted(expected.keys() | got.keys()):
        if k not in got:
            raise UserError(f"{where}'s weights do not match the model config ({m.arch}): {k} is missing")
        if k not in expected:
            raise UserError(f"{where}'s weights do not match the model config ({m.arch}): {k} is unexpected")
        if got[k] != expected[k]:
            raise UserError(f"{where}'s weights do not match the model config ({m.arch}): {k} has shape "
                            f"{list(got[k])}, the config gives {list(expected[k])}")


# ---------------------------------------------------------------- safetensors export folders


def safetensors_module(what: str):
    try:
        import safetensors.torch
    except ImportError:
        raise UserError(f"{what} needs the safetensors package: {INSTALL_HINT}")
    return safetensors.torch


def plain_weights(state: dict) -> tuple[dict, dict]:
    """A state dict as separate contiguous tensors, each storage once: a tensor that is the same
    as an earlier one (tied embeddings) becomes an alias {name: name it equals}."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().clone()
    return tensors, aliases


EXPORT_META = {"config": dict, "aliases?": MapOf(str), "loop?": {"step?": NAT, "tokens?": NAT}, "data?": dict,
               "weights_sha256?": Where(str, lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None, "a SHA-256")}


def is_export_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / EXPORT_CONFIG).is_file()


def load_export(folder: str | os.PathLike) -> dict:
    """A safetensors export folder as a checkpoint dict (model, config, tokenizer, loop, data;
    no optimizer). JSON and safetensors only: nothing here can run code."""
    folder = Path(folder)
    config = folder / EXPORT_CONFIG
    meta = read_json(config, dict)
    if meta.get("kind") != EXPORT_KIND:
        raise UserError(f"{folder} is not a minideep safetensors export")
    if meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{folder} has export format {kind(meta.get('format'))}; this minideep reads {EXPORT_FORMAT}")
    check(meta, EXPORT_META, str(config))
    for name in (WEIGHTS, TOKENIZER):
        if not (folder / name).is_file():
            raise UserError(f"{folder} is an incomplete export: {name} is missing")
    if "weights_sha256" in meta and sha256_file(folder / WEIGHTS) != meta["weights_sha256"]:
        raise UserError(f"{folder / WEIGHTS} is damaged: it does not match the checksum in {EXPORT_CONFIG}")
    safetensors_torch = safetensors_module("reading a safetensors export")
    try:
        state = safetensors_torch.load_file(str(folder / WEIGHTS), device="cpu")
    except Exception as e:  # safetensors raises its own error types for damaged files
        first = first_line(e)
        raise UserError(f"{folder / WEIGHTS} is not a readable safetensors file: {first}")
    for name, t in state.items():  # an export older than its checksum: at least every number finite
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise UserError(f"{folder / WEIGHTS} is damaged: weight {name[:80]} holds values that are not finite")
    for name, target in meta.get("aliases", {}).items():
        if target not in state:
            raise UserError(f"{folder / EXPORT_CONFIG}: alias {name} points to missing weight {target}")
        state[name] = state[target]
    try:
        tokenizer = (folder / TOKENIZER).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / TOKENIZER} is not readable: {e}")
    loop = {"step": 0, "tokens": 0, **meta.get("loop", {})}
    return {"kind": KIND, "format": FORMAT, "model": state, "optimizer": None, "config": meta["config"],
            "tokenizer": tokenizer, "data": meta.get("data", {}), "loop": loop}
