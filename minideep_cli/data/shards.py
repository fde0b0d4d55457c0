"""Many documents to a data dir in the sharded layout.

Text files, JSONL, parquet or a Hugging Face dataset (sources.py) become one token stream, every
document preceded by <|endoftext|>, cut into val_000000.bin, then train_000000.bin,
train_000001.bin, ... The first documents of the source (all of it, up to HOLD_TOKENS) are held
and written in a seeded random order, so validation, the first val_tokens tokens of the stream
(by default whole documents, about 10%: plan_split), is a random sample of documents and no
shard holds one corner of the corpus; training reads shuffled windows of all train shards
(loader.py). tokenize_source runs in named steps:

  _finished, _unfinished  a rerun of a finished command returns its meta.json; an unfinished run
                          with the same settings goes on from progress.json
  _start_or_resume        otherwise the tokenizer is trained on the source's first bytes and
                          progress.json (which marks an unfinished data dir) written first
  _feed                   encoded records go into a _SplitStream, which holds the first documents
                          until plan_split decides the sizes, then hands them, shuffled, and every
                          later one to a _ShardWriter:
                          each shard is written whole, then progress.json says where the stream
                          stands
  _finish                 both splits checked, meta.json written (last), progress.json removed

The settings (the options, the shuffle seed, and the source's fingerprint: every file's path, size
and SHA-256 in the order read, or the dataset's name) are kept in progress.json and meta.json, so
a rerun knows its own work and writes the same files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from tokenizers import Tokenizer

from ..errors import UserError
from ..files import remove_stale_temps, write_file
from ..tokenizer import EOT, load_tokenizer, token_byte_lengths, train_tokenizer
from .encode import encoded_batches
from .integrity import read_meta, read_progress
from .prepare import FORMAT_VERSION, check_data_out_dir, dtype_for, is_data_file
from .sources import Source

ShardProgress = Callable[[dict], None]
VAL_SHARE = 0.1  # default validation: about this share of the corpus's tokens...
VAL_CAP = 10_000_000  # ...but at most this many (FineWeb's)
SHARD_CAP = 100_000_000  # default train shard size: at most this many tokens...
FEW_SHARDS = 4  # ...and small enough that the training split makes about this many shards
MIN_TEXT_BYTES = 1_000  # less text than this is too little to split into training and validation
HOLD_TOKENS = VAL_CAP * 10  # documents held (shuffled, validation sampled) before the first shard is written


def tokenize_source(
    source: Source,
    out_dir: str | os.PathLike,
    vocab_size: int = 2048,
    shard_tokens: Optional[int] = None,
    val_tokens: Optional[int] = None,
    tokenizer_sample_bytes: int = 100_000_000,
    max_tokens: int = 0,
    workers: int = 1,
    progress: Optional[ShardProgress] = None,
    force: bool = False,
    seed: Optional[int] = None,
) -> dict:
    """Train a BPE on the first tokenizer_sample_bytes of the source, then encode every document
    into token shards: the first val_tokens tokens into val_000000.bin, the rest into train
    shards of shard_tokens (stopping after max_tokens tokens in all, if set); sizes not given
    scale with the corpus (plan_split). With a seed, the held first documents (all of a corpus of
    up to HOLD_TOKENS) are written in a random order drawn from it, so validation is a random
    sample of whole documents; without one, in the source's order. Each shard is written to a
    temporary name and renamed;
    progress.json records the shards done and where the stream stands, so calling this again
    with the same arguments resumes at the last complete shard and gives exactly the files an
    uninterrupted run gives. Returns meta."""
    _check_sizes(shard_tokens, val_tokens, tokenizer_sample_bytes, max_tokens)
    report = progress or (lambda info: None)
    out = Path(out_dir)
    settings = {"source": source.describe(), "vocab_size": vocab_size, "shard_tokens": shard_tokens,
                "val_tokens": val_tokens, "tokenizer_sample_bytes": tokenizer_sample_bytes, "max_tokens": max_tokens,
                "shuffle_seed": seed}
    settings = json.loads(json.dumps(settings))  # as it reads back from disk (tuples -> lists)
    check_data_out_dir(out, lambda m: m.get("settings") == settings, force)
    meta = _finished(out, settings)
    if meta is not None:
        return meta  # already done
    state, tok, tok_json = _start_or_resume(out, source, settings, report)
    dtype = dtype_for(tok.get_vocab_size())
    blen = np.asarray(token_byte_lengths(tok), dtype=np.int64)  # UTF-8 bytes of each token id
    stream = _SplitStream(lambda plan: _ShardWriter(out, state, plan, max_tokens, dtype, blen, report),
                          state, blen, (val_tokens, shard_tokens, max_tokens), seed)
    batches = encoded_batches(source.records(state["records"]), tok, tok_json, tok.token_to_id(EOT), dtype, workers)
    _feed(stream, batches, report)
    return _finish(out, source, settings, stream.close(), tok, dtype)


def _check_sizes(shard_tokens: Optional[int], val_tokens: Optional[int], tokenizer_sample_bytes: int,
                 max_tokens: int) -> None:
    if (shard_tokens is not None and shard_tokens <= 0) or (val_tokens is not None and val_tokens <= 0):
        raise UserError("--shard-tokens and --val-tokens must be positive")
    if max_tokens and val_tokens and max_tokens <= val_tokens:
        raise UserError(f"--max-tokens ({max_tokens:,}) must be larger than --val-tokens ({val_tokens:,})")
    if tokenizer_sample_bytes <= 0:
        raise UserError("--tokenizer-sample-bytes must be positive")


def _finished(out: Path, settings: dict) -> Optional[dict]:
    """The meta.json of a finished run with these settings, if out holds one."""
    meta = read_meta(out, damaged_as_missing=True)  # damaged: refused before, unless --force replaces it
    return meta if meta is not None and meta.get("settings") == settings else None


def _unfinished(out: Path, settings: dict) -> Optional[dict]:
    """The progress.json of an unfinished run with these settings, to resume; None to start over."""
    if (out / "meta.json").is_file() or not (out / "progress.json").is_file():
        return None
    state = read_progress(out, damaged_as_missing=True)  # damaged: refused before, unless --force starts over
    if state is None:
        return None
    if state.get("settings") != settings:
        raise UserError(f"{out} holds an unfinished tokenize run with other inputs or options; "
                        "rerun that command to finish it, or choose another --out")
    if not (out / "tokenizer.json").is_file():  # stopped before the tokenizer was written: start over
        return None
    return state


def _start_or_resume(out: Path, source: Source, settings: dict, report: ShardProgress) -> tuple[dict, Tokenizer, str]:
    """(progress state, tokenizer, its JSON) of an unfinished run, or of a new one: the tokenizer
    trained on the source's first bytes, out cleared of old token files and meta.json, and
    progress.json written first (it marks an unfinished data dir), then tokenizer.json."""
    state = _unfinished(out, settings)
    if state is not None:
        remove_stale_temps(out, is_data_file)  # a shard a killed run was writing: never used
        tok_json = (out / "tokenizer.json").read_text()
        if state["records"] < state.get("held", 0):  # killed among the shuffled first documents:
            _remove_data_files(out)  # they are read and shuffled again, to the same files
            state = _fresh_state(settings)
            write_file(out / "progress.json", json.dumps(state).encode())
        return state, load_tokenizer(tok_json), tok_json
    sample = sample_for_tokenizer(source, settings["tokenizer_sample_bytes"])
    report({"phase": "tokenizer", "bytes": settings["tokenizer_sample_bytes"]})
    tok = train_tokenizer(sample, settings["vocab_size"])
    tok_json = tok.to_str()
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten last
    _remove_data_files(out)
    state = _fresh_state(settings)
    write_file(out / "progress.json", json.dumps(state).encode())  # first: marks an unfinished data dir
    write_file(out / "tokenizer.json", tok_json.encode())
    return state, tok, tok_json


def _fresh_state(settings: dict) -> dict:
    """progress.json of a run that has written no shard."""
    return {"settings": settings, "shards": [], "records": 0, "skip_tokens": 0, "documents": 0}


def _feed(stream: _SplitStream, batches: Iterator[tuple[list[np.ndarray], Optional[float]]],
          report: ShardProgress) -> None:
    """Every encoded record into the stream, batch by batch, reporting progress after each; stops
    once max_tokens are written (a resumed run that had written them reads nothing)."""
    start, before = time.perf_counter(), stream.tokens
    if stream.done:
        return
    for arrays, read in batches:
        for ids in arrays:
            stream.add(ids)
            if stream.done:
                break
        stream.plan(read)
        documents, tokens, nbytes = stream.counts()
        fractions = [f for f in (read, tokens / stream.max_tokens if stream.max_tokens else None) if f is not None]
        report({"phase": "encode", "documents": documents, "tokens": tokens, "bytes": nbytes,
                "tokens_this_run": tokens - before, "elapsed": time.perf_counter() - start,
                "fraction": max(fractions) if fractions else None})
        if stream.done:
            break


class _SplitStream:
    """The records' token arrays on their way to the shards. Until plan_split can decide the
    validation and shard sizes (at the end of the source, or once HOLD_TOKENS are held), documents
    are held (none was written yet, so records count from 0); then they go to a _ShardWriter in a
    random order drawn from the seed (validation is the first of them), and every later record
    after them, so a record's place in the written stream is its place in the source once past
    the held ones. A resumed run (always past the held documents) starts with a writer, its first
    record had its first skip_tokens tokens written already."""

    def __init__(self, new_writer: Callable[[tuple[int, int]], _ShardWriter], state: dict, blen: np.ndarray,
                 sizes: tuple[Optional[int], Optional[int], int], seed: Optional[int]):
        self.new_writer, self.state, self.blen, self.sizes, self.seed = new_writer, state, blen, sizes, seed
        self.max_tokens = sizes[2]  # sizes: val, shard, max tokens
        self.records, self.skip_tokens = state["records"], state["skip_tokens"]
        self.writer = new_writer(tuple(state["plan"])) if state["shards"] else None
        self.held: list = []  # documents waiting for the plan
        self.held_sizes: list[int] = []
        self.held_docs = self.held_bytes = 0

    @property
    def done(self) -> bool:
        return self.writer is not None and self.writer.done

    @property
    def tokens(self) -> int:
        return self.writer.total if self.writer else sum(self.held_sizes)

    def counts(self) -> tuple[int, int, int]:
        """Documents, tokens, and UTF-8 bytes read this run."""
        if self.writer:
            return self.writer.documents, self.writer.total, self.writer.bytes_this_run
        return self.held_docs, sum(self.held_sizes), self.held_bytes

    def add(self, ids: np.ndarray) -> None:
        """The next record's tokens."""
        base, self.skip_tokens = self.skip_tokens, 0
        if self.writer:
            self.writer.add(ids, self.records, base)
        else:
            self.held.append(ids)
            self.held_sizes.append(len(ids))
            self.held_docs += bool(len(ids))
            self.held_bytes += int(self.blen[ids].sum())
        self.records += 1

    def plan(self, read: Optional[float], ended: bool = False) -> None:
        """Hand the held documents, shuffled, to a writer once plan_split decides the sizes (at the
        end, it does); validation is the first of them in that order."""
        if self.writer is None and plan_split(self.held_sizes, read, ended, *self.sizes):
            n = len(self.held)
            order = np.random.default_rng([self.seed, 1]).permutation(n) if self.seed is not None else range(n)
            plan = plan_split([self.held_sizes[i] for i in order], read, ended, *self.sizes)
            self.state["held"] = n
            self.writer = self.new_writer(plan)
            for place, i in enumerate(order):
                self.writer.add(self.held[i], place)
            self.held = []

    def close(self) -> _ShardWriter:
        """After the last record: plan if not done yet, write the last shard; return the writer."""
        self.plan(None, ended=True)
        if self.writer.fill:
            self.writer.write(self.records, 0)
        return self.writer


def sample_for_tokenizer(source: Source, max_bytes: int) -> list[str]:
    """The first max_bytes of UTF-8 text of the source (the last document cut to fit). A source
    with no text, or one that ends before MIN_TEXT_BYTES, is refused before any work."""
    docs, used, cut = [], 0, False
    for text, _ in source.records():
        if not text:
            continue
        b = text.encode("utf-8")
        if used + len(b) >= max_bytes:
            docs.append(b[: max_bytes - used].decode("utf-8", errors="ignore"))
            cut = True
            break
        docs.append(text)
        used += len(b)
    if not docs or not any(docs):
        raise UserError(f"{source.label()} holds no text")
    if not cut and used < MIN_TEXT_BYTES:
        raise UserError(f"{source.label()} holds {used:,} bytes of text, too little to split into training "
                        f"and validation (at least {MIN_TEXT_BYTES:,})")
    return docs


def _remove_data_files(out: Path) -> None:
    for pattern in ("val_*.bin", "train_*.bin", "train.bin", "val.bin"):
        for f in out.glob(pattern):
            f.unlink()
    remove_stale_temps(out, is_data_file)  # only minideep's own temporaries, of dead writers


def plan_split(doc_tokens: list[int], read: Optional[float], ended: bool, val_tokens: Optional[int] = None,
               shard_tokens: Optional[int] = None, max_tokens: int = 0) -> Optional[tuple[int, int]]:
    """(validation tokens, train shard tokens) for a stream whose first documents, in the order
    they will be written, have doc_tokens tokens each, or None while the documents are still
    held (read more).

    read: the share of the source those documents make up (None: a stream of unknown length);
    ended: there are no more documents. Documents are held until the source ends, max_tokens
    are held, or HOLD_TOKENS are (then VAL_SHARE of the total is past VAL_CAP, whatever follows),
    so the held ones are all of a corpus up to HOLD_TOKENS. Given sizes win. Otherwise
    validation takes the first whole documents until it holds about VAL_SHARE of the total
    tokens, at most VAL_CAP (a document that would make it more than twice that is cut, as one
    text file is), and a train shard is the training split / FEW_SHARDS, at most SHARD_CAP; the
    total is the held tokens at the end, else estimated from `read`.
    """
    held = sum(doc_tokens)
    if max_tokens and held >= max_tokens:
        held, ended = max_tokens, True
    if not ended and held < HOLD_TOKENS:
        return None
    if val_tokens and shard_tokens:
        return val_tokens, shard_tokens
    total = held if ended else max(held, round(held / read) if read else 0)
    if max_tokens:
        total = min(total, max_tokens)
    if not val_tokens:
        target = max(1, min(VAL_CAP, int(total * VAL_SHARE)))
        val_tokens = 0
        for n in doc_tokens:
            if val_tokens >= target:
                break
            val_tokens += n
        if val_tokens > 2 * target:
            val_tokens = target
    if not shard_tokens:
        shard_tokens = min(SHARD_CAP, max(1, -(-(total - val_tokens) // FEW_SHARDS)))
    return val_tokens, shard_tokens


class _ShardWriter:
    """Cuts the token stream into val_000000.bin (plan[0] tokens), then train shards of plan[1]
    (stopping after max_tokens in all, if set), each written whole and recorded in `state`
    (progress.json) with the record and token to resume from."""

    def __init__(self, out: Path, state: dict, plan: tuple[int, int], max_tokens: int, dtype: np.dtype,
                 blen: np.ndarray, report: ShardProgress):
        self.out, self.state, self.plan, self.max_tokens, self.blen, self.report = out, state, plan, max_tokens, blen, report
        self.shards = list(state["shards"])
        self.documents, self.val_documents = state["documents"], state.get("val_documents", 0)
        self.total = sum(s["tokens"] for s in self.shards)
        self.buf = np.zeros(max(plan), dtype=dtype)
        self.fill = self.bytes_this_run = 0

    def target(self, k: int) -> tuple[str, str, int]:
        """Split, file name and size of the k-th shard of the stream."""
        val, shard = self.plan
        if k == 0:
            return "val", "val_000000.bin", val
        size = shard if not self.max_tokens else min(shard, self.max_tokens - val - (k - 1) * shard)
        return "train", f"train_{k - 1:06d}.bin", size

    @property
    def done(self) -> bool:
        return bool(self.max_tokens) and self.total >= self.max_tokens

    def add(self, ids: np.ndarray, record: int, base: int = 0) -> None:
        """Record `record`'s tokens from `base` on (a resumed run skips those already written)."""
        if self.done:
            return
        ids = ids[base:]
        if len(ids) and base == 0:
            self.documents += 1
            self.val_documents += not self.shards
        pos = 0
        while pos < len(ids) and not self.done:
            size = self.target(len(self.shards))[2]
            take = min(size - self.fill, len(ids) - pos)
            self.buf[self.fill : self.fill + take] = ids[pos : pos + take]
            self.bytes_this_run += int(self.blen[ids[pos : pos + take]].sum())
            self.fill, pos, self.total = self.fill + take, pos + take, self.total + take
            if self.fill == size:  # resume point: the next record, or this one past `pos`
                self.write(record + 1, 0) if pos == len(ids) else self.write(record, base + pos)

    def write(self, resume_records: int, resume_offset: int) -> None:
        split, name, _ = self.target(len(self.shards))
        arr = self.buf[: self.fill]
        write_file(self.out / name, arr.tobytes())
        self.shards.append({"split": split, "file": name, "tokens": int(self.fill), "bytes": int(self.blen[arr].sum())})
        if split == "val":
            self.state["val_cut"] = resume_offset > 0  # the last validation document goes on in train
        self.state.update(shards=self.shards, records=resume_records, skip_tokens=resume_offset,
                          documents=self.documents, val_documents=self.val_documents, plan=list(self.plan))
        write_file(self.out / "progress.json", json.dumps(self.state).encode())
        self.fill = 0
        self.report({"phase": "shard", "split": split, "file": name, "shards": len(self.shards)})


def _finish(out: Path, source: Source, settings: dict, writer: _ShardWriter, tok: Tokenizer,
            dtype: np.dtype) -> dict:
    """Check both splits are there, write meta.json (last) and drop progress.json; return meta."""
    shards = writer.shards
    val = [s for s in shards if s["split"] == "val"]
    train = [s for s in shards if s["split"] == "train"]
    if not val or val[0]["tokens"] < writer.plan[0] or not train:
        have = sum(s["tokens"] for s in shards)
        (out / "progress.json").unlink(missing_ok=True)
        _remove_data_files(out)
        if settings["val_tokens"]:
            raise UserError(f"{source.label()} gives {have:,} tokens, too few for --val-tokens "
                            f"{settings['val_tokens']:,} plus a training split; lower --val-tokens")
        raise UserError(f"{source.label()} gives {have:,} tokens, too few to split into training and validation")
    meta = {
        "format": FORMAT_VERSION,
        "layout": "shards",
        "vocab_size": tok.get_vocab_size(),
        "dtype": dtype.name,
        "train_tokens": sum(s["tokens"] for s in train),
        "val_tokens": val[0]["tokens"],
        "train_bytes": sum(s["bytes"] for s in train),
        "val_bytes": val[0]["bytes"],
        "documents": writer.documents,
        "val_documents": writer.val_documents,  # documents that start in validation
        "val_cut": writer.state.get("val_cut", False),  # the last of them goes on in train
        "shard_tokens": writer.plan[1],
        "shards": shards,
        "source": source.label(),
        "settings": settings,
    }
    write_file(out / "meta.json", json.dumps(meta, indent=2).encode())
    (out / "progress.json").unlink(missing_ok=True)
    return meta
