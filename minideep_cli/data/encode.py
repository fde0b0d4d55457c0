"""Text to token arrays: one text in chunks with progress, or batches of documents, each
preceded by <|endoftext|>, in worker processes with a bounded number of batches in flight."""

from __future__ import annotations

import collections
import multiprocessing
from typing import Callable, Iterator, Optional

import numpy as np

from ..errors import UserError
from ..schema import kind, repair_text
from ..tokenizer import load_tokenizer, split_chunks

Progress = Callable[[int, int], None]  # (done, total) in characters
CHUNK_CHARS = 1 << 20  # text per call to the tokenizer
BATCH_CHARS = 1 << 20  # text per task sent to a worker
_worker_tokenizer: dict = {}  # per worker process: the tokenizer its initializer loaded


def encode_text(tok, text: str, dtype: np.dtype, progress: Optional[Progress], done: int, total: int) -> np.ndarray:
    """text -> (n,) token ids, reporting (done + characters encoded so far, total) after each chunk."""
    parts = []
    for chunk in split_chunks(text, CHUNK_CHARS):
        parts.append(np.asarray(tok.encode(repair_text(chunk)).ids, dtype=dtype))
        done += len(chunk)
        if progress:
            progress(done, total)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def encode_documents(tok, texts: list[str], eot: int, dtype: np.dtype) -> list[np.ndarray]:
    """Each non-empty document -> [<|endoftext|>, its tokens...]; an empty one -> no tokens."""
    out = []
    for text in texts:
        if not isinstance(text, (str, type(None))):  # a dataset column of lists or numbers
            raise UserError(f"a document is {kind(text)}, not text; choose the text column with --text-column")
        if not text:
            out.append(np.zeros(0, dtype=dtype))
            continue
        ids = [eot]
        for chunk in split_chunks(text, CHUNK_CHARS):
            ids.extend(tok.encode(repair_text(chunk)).ids)
        out.append(np.asarray(ids, dtype=dtype))
    return out


def _init_worker(tok_json: str) -> None:
    _worker_tokenizer["tok"] = load_tokenizer(tok_json)


def _encode_in_worker(texts: list[str], eot: int, dtype_name: str) -> list[np.ndarray]:
    return encode_documents(_worker_tokenizer["tok"], texts, eot, np.dtype(dtype_name))


def _batches(records: Iterator[tuple[str, Optional[float]]]) -> Iterator[tuple[list[str], Optional[float]]]:
    texts, chars, frac = [], 0, None
    for text, frac in records:
        texts.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS or len(texts) >= 4096:
            yield texts, frac
            texts, chars = [], 0
    if texts:
        yield texts, frac


def encoded_batches(records: Iterator[tuple[str, Optional[float]]], tok, tok_json: str, eot: int,
                    dtype: np.dtype, workers: int) -> Iterator[tuple[list[np.ndarray], Optional[float]]]:
    """(token arrays of a batch of records, source fraction) in order, encoded by `workers`
    processes with a bounded number of batches in flight (never the whole source in memory)."""
    batches = _batches(records)
    if workers <= 1:
        for texts, frac in batches:
            yield encode_documents(tok, texts, eot, dtype), frac
        return
    ctx = multiprocessing.get_context("spawn")  # no fork after the tokenizer's threads ran
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok_json,)) as pool:
        pending: collections.deque = collections.deque()
        for texts, frac in batches:
            pending.append((pool.apply_async(_encode_in_worker, (texts, eot, dtype.name)), frac))
            if len(pending) >= 2 * workers:
                res, f = pending.popleft()
                yield res.get(), f
        while pending:
            res, f = pending.popleft()
            yield res.get(), f
