"""tokenize's engine: which layout a corpus gets, with the sharded layout's defaults, over
data.tokenize_text (one text: train.bin, val.bin) and data.tokenize_source (documents: shards).
Returns the data dir's meta; reports progress through a callback; never prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..config import MAX_VOCAB, check_limit
from ..errors import UserError
from .prepare import tokenize_text
from .shards import tokenize_source
from .sources import FileScan, Source, bundled_corpus, read_text_file, scan_paths

DOCUMENT_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet")  # files of records, not one text
MAX_SHARD_TOKENS = 1_000_000_000  # --shard-tokens, --val-tokens: a shard is built in memory (2-4 GB at this size)


def check_tokenize_limits(vocab_size: int, workers: Optional[int], shard_tokens: Optional[int],
                          val_tokens: Optional[int], sample_bytes: Optional[int]) -> None:
    """Each size within what this machine can do, refused by name before anything is read."""
    check_limit(vocab_size, MAX_VOCAB, "--vocab-size")
    cores = os.cpu_count() or 1
    if workers is not None and workers > cores:
        raise UserError(f"--workers is {workers:,}, more than this machine's {cores} CPU cores "
                        "(more processes than cores encode no faster)")
    for opt, v in (("--shard-tokens", shard_tokens), ("--val-tokens", val_tokens)):
        if v is not None:
            check_limit(v, MAX_SHARD_TOKENS, opt)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if sample_bytes is not None and sample_bytes > memory // 4:  # the sample is held in memory while the BPE trains
        raise UserError(f"--tokenizer-sample-bytes is {sample_bytes:,}, more than a quarter of this machine's "
                        f"memory ({memory:,} bytes)")


def tokenize_corpus(out: Path, files: Optional[list[Path]] = None, dataset: Optional[str] = None,
                    vocab_size: int = 2048, val_fraction: float = 0.1,
                    on_event: Callable[[str, dict], None] = lambda kind, info: None, *, name: Optional[str] = None,
                    split: str = "train", text_column: str = "text", shard_tokens: Optional[int] = None,
                    val_tokens: Optional[int] = None, tokenizer_sample_bytes: Optional[int] = None,
                    max_tokens: Optional[int] = None, workers: Optional[int] = None, force: bool = False,
                    include: tuple = (), exclude: tuple = (), seed: int = 1337, shuffle: bool = True) -> dict:
    """One text file (default: the bundled corpus) and no sharding option: its last val_fraction
    is validation. Otherwise documents (files, folders, records, a dataset) into shards, the files
    in a seeded random order unless shuffle is off (data.tokenize_source shuffles the documents
    themselves and samples validation). Events: ("text", {done, total}) for one text,
    ("documents", info) for documents (data.tokenize_source). The returned meta also says what a
    folder held that was left out ("skipped": reason -> count)."""
    if vocab_size < 257:
        raise UserError("--vocab-size must be at least 257 (256 bytes + <|endoftext|>)")
    check_tokenize_limits(vocab_size, workers, shard_tokens, val_tokens, tokenizer_sample_bytes)
    if not 0 < val_fraction < 1:
        raise UserError("--val-fraction must be between 0 and 1")
    if dataset and files:
        raise UserError("give input files or --dataset, not both")
    sharding = (shard_tokens, val_tokens, tokenizer_sample_bytes, max_tokens)
    scan = scan_paths(files, tuple(include), tuple(exclude), text_column) if files else FileScan()
    paths = scan.files
    single = not dataset and len(paths) <= 1 and all(v is None for v in sharding) and not (
        paths and (files[0].is_dir() or paths[0].name.lower().endswith(DOCUMENT_SUFFIXES)))
    if single:
        src = paths[0] if paths else bundled_corpus()
        text = read_text_file(src)
        on_event("text", {"done": 0, "total": len(text)})
        return tokenize_text(text, out, vocab_size, val_fraction, str(src),
                             progress=lambda done, total: on_event("text", {"done": done, "total": total}), force=force)

    if shuffle and len(paths) > 1:  # related files (one folder, one project) no longer sit together
        paths = [paths[i] for i in np.random.default_rng([seed, 0]).permutation(len(paths))]
    source = Source(files=paths, dataset=dataset or "", name=name, split=split, text_column=text_column,
                    as_text=scan.as_text)
    if workers is not None and workers < 1:
        raise UserError("--workers must be at least 1")
    for opt, v in (("--shard-tokens", shard_tokens), ("--val-tokens", val_tokens),
                   ("--tokenizer-sample-bytes", tokenizer_sample_bytes), ("--max-tokens", max_tokens)):
        if v is not None and v <= 0:
            raise UserError(f"{opt} must be positive")
    on_event("documents", {"phase": "reading"})
    meta = tokenize_source(
        source, out, vocab_size, seed=seed if shuffle else None,
        shard_tokens=shard_tokens, val_tokens=val_tokens,
        tokenizer_sample_bytes=tokenizer_sample_bytes or 100_000_000, max_tokens=max_tokens or 0,
        workers=workers or max(1, (os.cpu_count() or 2) - 1), progress=lambda info: on_event("documents", info),
        force=force)
    return {**meta, "skipped": scan.skipped}
