"""Corpora to token files, and batches from token files.

A data dir holds tokenizer.json, train.bin, val.bin (raw uint16/uint32 tokens, memory-mapped,
never loaded whole) and meta.json (vocab size, dtype, token and byte counts, source hash).
meta.json is written last, so a data dir without it is incomplete and is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import UserError
from .tokenizer import load_tokenizer, split_chunks, token_byte_lengths, train_tokenizer

Progress = Callable[[int, int], None]  # (done, total) in characters
FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 20


def bundled_corpus() -> Path:
    return Path(str(resources.files("minideep_cli") / "assets" / "tinyshakespeare.txt"))


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 text corpus, refusing missing, empty and binary files with one clear line."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"file not found: {p}")
    if p.is_dir():
        raise UserError(f"expected a text file, got a directory: {p}")
    raw = p.read_bytes()
    if not raw.strip():
        raise UserError(f"file is empty: {p}")
    if b"\x00" in raw[:1 << 20]:
        raise UserError(f"{p} looks like a binary file, not UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not valid UTF-8 text (byte {e.start})")


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Validation = the last val_fraction of the text by characters (nanoGPT's split)."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _encode(tok, text: str, dtype: np.dtype, progress: Optional[Progress], done: int, total: int) -> np.ndarray:
    parts = []
    for chunk in split_chunks(text, CHUNK_CHARS):
        parts.append(np.asarray(tok.encode(chunk).ids, dtype=dtype))
        done += len(chunk)
        if progress:
            progress(done, total)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tokenize_text(
    text: str,
    out_dir: str | os.PathLike,
    vocab_size: int = 2048,
    val_fraction: float = 0.1,
    source: str = "",
    progress: Optional[Progress] = None,
) -> dict:
    """Train a BPE on the train split, encode both splits, write the data dir; return meta."""
    if not text:
        raise UserError("the corpus is empty")
    train_text, val_text = split_text(text, val_fraction)
    if not val_text or not train_text:
        raise UserError("the corpus is too short to split into train and validation")
    tok = train_tokenizer(split_chunks(train_text, 1 << 16), vocab_size)
    dtype = dtype_for(tok.get_vocab_size())
    total = len(text)
    train_ids = _encode(tok, train_text, dtype, progress, 0, total)
    val_ids = _encode(tok, val_text, dtype, progress, len(train_text), total)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten last
    _write_atomic(out / "tokenizer.json", tok.to_str().encode())
    _write_atomic(out / "train.bin", train_ids.tobytes())
    _write_atomic(out / "val.bin", val_ids.tobytes())
    meta = {
        "format": FORMAT_VERSION,
        "vocab_size": tok.get_vocab_size(),
        "dtype": dtype.name,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "train_bytes": len(train_text.encode("utf-8")),
        "val_bytes": len(val_text.encode("utf-8")),
        "val_fraction": val_fraction,
        "source": source,
        "source_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    _write_atomic(out / "meta.json", json.dumps(meta, indent=2).encode())
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


@dataclass
class TokenData:
    """A tokenized data dir: memory-mapped splits, the tokenizer and the byte counts."""

    dir: Path
    meta: dict
    tokenizer_json: str
    train: np.ndarray
    val: np.ndarray

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenData":
        d = Path(path)
        if not (d / "meta.json").is_file():
            raise UserError(f"{d} is not a tokenized data dir (no meta.json); run `minideep tokenize` first")
        try:
            meta = json.loads((d / "meta.json").read_text())
            dtype = np.dtype(meta["dtype"])
            tok_json = (d / "tokenizer.json").read_text()
            train = np.memmap(d / "train.bin", dtype=dtype, mode="r")
            val = np.memmap(d / "val.bin", dtype=dtype, mode="r")
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"data dir {d} is damaged: {e}")
        if train.size != meta["train_tokens"] or val.size != meta["val_tokens"]:
            raise UserError(f"data dir {d} is damaged: token counts differ from meta.json")
        return cls(d, meta, tok_json, train, val)

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_json)

    def byte_lengths(self) -> list[int]:
        return token_byte_lengths(self.tokenizer())


def get_batch(data: np.ndarray, batch_size: int, block_size: int, generator) -> tuple:
    """Random windows (nanoGPT): x = data[i:i+T], y = data[i+1:i+T+1]. -> (B, T) int64 each."""
    import torch

    n = len(data) - block_size - 1
    if n <= 0:
        raise UserError(f"split has {len(data)} tokens, fewer than block_size + 2 = {block_size + 2}")
    starts = torch.randint(n, (batch_size,), generator=generator).tolist()
    xy = np.stack([np.asarray(data[i : i + block_size + 1], dtype=np.int64) for i in starts])
    xy = torch.from_numpy(xy)  # (B, T+1)
    return xy[:, :-1], xy[:, 1:]


def open_or_none(cfg) -> Optional[TokenData]:
    """The data a config trained on, if it is on this machine (the bundled corpus always is)."""
    if not cfg.data.dir:
        return TokenData.open(bundled_data_dir(cfg.data.vocab_size, cfg.data.val_fraction))
    return TokenData.open(cfg.data.dir) if (Path(cfg.data.dir) / "meta.json").is_file() else None
