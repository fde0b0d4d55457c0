"""One text to a data dir in the single layout, and what both layouts share: the token dtype,
the format version, and the check that the output folder may be written.

The single layout (`minideep tokenize FILE`, the bundled corpus): tokenizer.json, train.bin,
val.bin. Validation = the last val_fraction of the text; the tokenizer is trained on the rest.
The text's SHA-256 (in meta.json) tells a rerun of the same command from other text.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import UserError
from ..files import write_file
from ..tokenizer import split_chunks, train_tokenizer
from .encode import Progress, encode_text
from .integrity import read_meta, read_progress
from .sources import bundled_corpus

FORMAT_VERSION = 1


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Validation = the last val_fraction of the text by characters (nanoGPT's split)."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def check_data_out_dir(out: Path, same: Callable[[dict], bool], force: bool) -> None:
    """out may be written: missing, empty, or a data dir whose meta.json `same` accepts (a rerun of
    the same command); anything else (another corpus or settings, a run dir) only with force, so
    that no data runs were trained on, and nothing else, is replaced by accident."""
    if force or not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    meta = out / "meta.json"
    if meta.is_file():
        if not same(read_meta(out, "choose another --out, or --force to replace it")):
            raise UserError(f"{out} holds data tokenized from other text or with other settings; "
                            "choose another --out, or --force to replace it")
    else:  # an unfinished data dir is fine: tokenize writes progress.json first and removes it last
        unfinished = is_progress_file(out / "progress.json") and read_progress(out, "--force starts over") is not None
        others = sorted(p.name for p in out.iterdir()
                        if not p.name.startswith(".") and not (unfinished and is_data_file(p.name)))
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise UserError(f"{out} holds other files than a data dir's ({shown}); choose another --out, "
                            "or --force to write there")


def is_progress_file(path: Path) -> bool:
    """path is the progress.json tokenize writes first (one text: the source's hash; documents:
    the settings), not a file of the same name of the user's."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and (isinstance(state.get("source_sha256"), str)
                                        or isinstance(state.get("settings"), dict))


def is_data_file(name: str) -> bool:
    """A name tokenize writes (temporary files included)."""
    return name.startswith(".") or name in ("meta.json", "progress.json", "tokenizer.json", "train.bin", "val.bin") or (
        name.endswith(".bin") and name.startswith(("train_", "val_")))


def tokenize_text(
    text: str,
    out_dir: str | os.PathLike,
    vocab_size: int = 2048,
    val_fraction: float = 0.1,
    source: str = "",
    progress: Optional[Progress] = None,
    force: bool = False,
) -> dict:
    """Train a BPE on the train split, encode both splits, write the data dir; return meta."""
    if not text:
        raise UserError("the corpus is empty")
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    check_data_out_dir(Path(out_dir), lambda m: (m.get("source_sha256"), m.get("val_fraction"),
                                                 m.get("vocab_size_asked", m.get("vocab_size")))
                       == (sha, val_fraction, vocab_size), force)
    train_text, val_text = split_text(text, val_fraction)
    if not val_text or not train_text:
        raise UserError("the corpus is too short to split into train and validation")
    tok = train_tokenizer(split_chunks(train_text, 1 << 16), vocab_size)
    dtype = dtype_for(tok.get_vocab_size())
    total = len(text)
    train_ids = encode_text(tok, train_text, dtype, progress, 0, total)
    val_ids = encode_text(tok, val_text, dtype, progress, len(train_text), total)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten last
    write_file(out / "progress.json", json.dumps({"source_sha256": sha}).encode())  # marks an unfinished data dir
    write_file(out / "tokenizer.json", tok.to_str().encode())
    write_file(out / "train.bin", train_ids.tobytes())
    write_file(out / "val.bin", val_ids.tobytes())
    meta = {
        "format": FORMAT_VERSION,
        "vocab_size": tok.get_vocab_size(),
        "vocab_size_asked": vocab_size,  # a small text may give fewer merges than asked
        "dtype": dtype.name,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "train_bytes": len(train_text.encode("utf-8")),
        "val_bytes": len(val_text.encode("utf-8")),
        "val_fraction": val_fraction,
        "source": source,
        "source_sha256": sha,
    }
    write_file(out / "meta.json", json.dumps(meta, indent=2).encode())
    (out / "progress.json").unlink(missing_ok=True)
    return meta


def cache_root() -> Path:
    return Path(os.environ.get("MINIDEEP_CACHE", Path.home() / ".cache" / "minideep"))


def bundled_data_dir(vocab_size: int, val_fraction: float, progress: Optional[Progress] = None) -> Path:
    """The bundled corpus, tokenized once and cached (keyed by corpus hash, vocab and split)."""
    raw = bundled_corpus().read_bytes()
    key = hashlib.sha256(raw + f"|{vocab_size}|{val_fraction}|{FORMAT_VERSION}".encode()).hexdigest()[:12]
    out = cache_root() / f"tinyshakespeare-{vocab_size}-{key}"
    if not (out / "meta.json").is_file():
        tokenize_text(raw.decode("utf-8"), out, vocab_size, val_fraction, "tinyshakespeare", progress)
    return out

