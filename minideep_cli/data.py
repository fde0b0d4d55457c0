"""Corpora to token files, and batches from token files.

A data dir comes in one of two layouts; meta.json (written last, so a data dir without it is
incomplete and never used) says which:

- single (`minideep tokenize FILE`): tokenizer.json, train.bin, val.bin (raw uint16/uint32 tokens,
  memory-mapped, never loaded whole). Validation = the last val_fraction of the text. Training
  reads random windows (nanoGPT), the sampler state is a torch.Generator's.
- shards (many documents: text files, JSONL, parquet, a Hugging Face dataset): tokenizer.json,
  val_000000.bin, then train_000000.bin, train_000001.bin, ... of shard_tokens tokens each (the
  last one shorter). Every document is preceded by <|endoftext|>. Validation = the first
  val_tokens tokens of the stream (by default its first whole documents, about 10%: plan_split).
  Training reads the train shards sequentially as one stream,
  the sampler state is a position (shard, offset, epoch).
"""

from __future__ import annotations

import bisect
import collections
import gzip
import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from .errors import UserError
from .files import write_file
from .tokenizer import EOT, load_tokenizer, split_chunks, token_byte_lengths, train_tokenizer

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
    return _text_document(p, raw)


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


def check_out_dir(out: Path, same: Callable[[dict], bool], force: bool) -> None:
    """out may be written: missing, empty, or a data dir whose meta.json `same` accepts (a rerun of
    the same command); anything else (another corpus or settings, a run dir) only with force, so
    that no data runs were trained on, and nothing else, is replaced by accident."""
    if force or not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    meta = out / "meta.json"
    if meta.is_file():
        try:
            ok = same(json.loads(meta.read_text()))
        except (ValueError, OSError):
            ok = False
        if not ok:
            raise UserError(f"{out} holds data tokenized from other text or with other settings; "
                            "choose another --out, or --force to replace it")
    else:  # an unfinished data dir is fine: tokenize writes progress.json first and removes it last
        unfinished = (out / "progress.json").is_file()
        others = sorted(p.name for p in out.iterdir()
                        if not p.name.startswith(".") and not (unfinished and is_data_file(p.name)))
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise UserError(f"{out} holds other files than a data dir's ({shown}); choose another --out, "
                            "or --force to write there")


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
    check_out_dir(Path(out_dir), lambda m: (m.get("source_sha256"), m.get("val_fraction"),
                                            m.get("vocab_size_asked", m.get("vocab_size")))
                  == (sha, val_fraction, vocab_size), force)
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


# ---------------------------------------------------------------- document sources

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def find_files(paths: list) -> list[Path]:
    """The files behind the given paths; a folder stands for its text, JSONL and parquet files
    (recursively, in sorted order). Missing paths and folders with nothing to read are errors."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"file not found: {p}")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and f.name.lower().endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES))
            if not found:
                raise UserError(f"{p} holds no .txt, .jsonl or .parquet files")
            files.extend(found)
        else:
            files.append(p)
    if not files:
        raise UserError("no input files given")
    return files


def _sha256(p: Path) -> str:
    """A file's content fingerprint: an edit that keeps its size changes it."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _text_document(p: Path, raw: Optional[bytes] = None) -> str:
    """The UTF-8 text of a file, refusing binary files and invalid UTF-8 with one clear line."""
    raw = p.read_bytes() if raw is None else raw
    if b"\x00" in raw[:1 << 20]:
        raise UserError(f"{p} looks like a binary file, not UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not valid UTF-8 text (byte {e.start})")


def _jsonl_records(p: Path, column: str, skip: int) -> Iterator[tuple[str, float]]:
    size = max(1, p.stat().st_size)
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    with opener(p, "rb") as f:
        n = 0
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            n += 1
            if n <= skip:
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"{p}:{line_no} is not valid JSON: {e}")
            if not isinstance(row, dict) or column not in row:
                raise UserError(f"{p}:{line_no} has no '{column}' field (choose one with --text-column)")
            text = row[column]
            if text is not None and not isinstance(text, str):
                raise UserError(f"{p}:{line_no}: '{column}' is not a string")
            pos = f.tell() if opener is open else f.fileobj.tell()  # compressed offset for .gz
            yield text or "", min(1.0, pos / size)


def _parquet_records(p: Path, column: str, skip: int) -> Iterator[tuple[str, float]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet needs pyarrow: pip install 'minideep[data]'")
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise UserError(f"{p} is not a readable parquet file: {str(e).splitlines()[0]}")
    if column not in pf.schema_arrow.names:
        raise UserError(f"{p} has no column '{column}' (columns: {', '.join(pf.schema_arrow.names)}); "
                        "choose one with --text-column")
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise UserError(f"{p}: column '{column}' holds {kind}, not text; choose another with --text-column")
    total = max(1, pf.metadata.num_rows)
    done = 0
    for g in range(pf.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if done + rows <= skip:  # resume: whole row groups are skipped without reading them
            done += rows
            continue
        for batch in pf.iter_batches(batch_size=1024, row_groups=[g], columns=[column]):
            for text in batch.column(0).to_pylist():
                done += 1
                if done > skip:
                    yield text or "", done / total


@dataclass
class Source:
    """Where documents come from: local files (a text file is one document, a JSONL line or a
    parquet row is one) or a Hugging Face dataset, streamed. Records are counted, empty ones
    included, so a position in the stream is a record count."""

    files: list[Path] = field(default_factory=list)
    dataset: str = ""  # a Hugging Face dataset name or a local dataset folder
    name: Optional[str] = None  # the dataset's configuration, e.g. sample-10BT
    split: str = "train"
    text_column: str = "text"

    def describe(self) -> dict:
        if self.dataset:
            return {"dataset": self.dataset, "name": self.name, "split": self.split, "text_column": self.text_column}
        return {"files": [[str(f.resolve()), f.stat().st_size, _sha256(f)] for f in self.files],
                "text_column": self.text_column}

    def label(self) -> str:
        if self.dataset:
            return self.dataset + (f" ({self.name})" if self.name else "")
        return str(self.files[0]) + (f" and {len(self.files) - 1} more" if len(self.files) > 1 else "")

    def records(self, skip: int = 0) -> Iterator[tuple[str, Optional[float]]]:
        """(text, fraction of the source read so far or None) for every record after `skip`."""
        if self.dataset:
            yield from self._hf_records(skip)
            return
        sizes = [max(1, f.stat().st_size) for f in self.files]
        total, before, seen = sum(sizes), 0, 0  # seen: records passed over while skipping
        for f, size in zip(self.files, sizes):
            kind = _kind(f)
            if seen < skip:
                n = 1 if kind == "text" else _count_records(f, kind, self.text_column)
                if seen + n <= skip:  # the whole file lies before the resume point
                    seen, before = seen + n, before + size
                    continue
            local_skip, seen = max(0, skip - seen), max(seen, skip)
            if kind == "text":
                yield _text_document(f), (before + size) / total
            else:
                reader = _parquet_records if kind == "parquet" else _jsonl_records
                for text, frac in reader(f, self.text_column, local_skip):
                    yield text, (before + size * frac) / total
            before += size

    def _hf_records(self, skip: int) -> Iterator[tuple[str, Optional[float]]]:
        try:
            import datasets
        except ImportError:
            raise UserError("--dataset needs the optional `datasets` package: pip install 'minideep[hf]'")
        try:
            ds = datasets.load_dataset(self.dataset, name=self.name, split=self.split, streaming=True)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"cannot open dataset {self.dataset}: {str(e).splitlines()[0]}")
        total = None
        try:
            total = ds.info.splits[self.split].num_examples or None
        except (AttributeError, KeyError, TypeError):
            pass
        if skip:
            ds = ds.skip(skip)
        n = skip
        for row in ds:
            if self.text_column not in row:
                raise UserError(f"dataset {self.dataset} has no column '{self.text_column}' "
                                f"(columns: {', '.join(row)}); choose one with --text-column")
            n += 1
            yield row[self.text_column] or "", (n / total if total else None)


def _count_records(path: Path, kind: str, column: str) -> int:
    """Records in a JSONL or parquet file (used when a resume skips the whole file)."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# ---------------------------------------------------------------- sharded tokenization

ShardProgress = Callable[[dict], None]
SHARD_PREFIX = {"val": "val", "train": "train"}
BATCH_CHARS = 1 << 20  # text per task sent to a worker
_worker_tokenizer: dict = {}  # per worker process: the tokenizer its initializer loaded


def _init_worker(tok_json: str) -> None:
    _worker_tokenizer["tok"] = load_tokenizer(tok_json)


def encode_documents(tok, texts: list[str], eot: int, dtype: np.dtype) -> list[np.ndarray]:
    """Each non-empty document -> [<|endoftext|>, its tokens...]; an empty one -> no tokens."""
    out = []
    for text in texts:
        if not text:
            out.append(np.zeros(0, dtype=dtype))
            continue
        ids = [eot]
        for chunk in split_chunks(text, CHUNK_CHARS):
            ids.extend(tok.encode(chunk).ids)
        out.append(np.asarray(ids, dtype=dtype))
    return out


def _encode_in_worker(texts: list[str], eot: int, dtype_name: str) -> list[np.ndarray]:
    return encode_documents(_worker_tokenizer["tok"], texts, eot, np.dtype(dtype_name))


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


def _encoded(source: Source, skip: int, tok, tok_json: str, eot: int, dtype: np.dtype, workers: int):
    """(token arrays of a batch of records, source fraction) in order, encoded by `workers`
    processes with a bounded number of batches in flight (never the whole source in memory)."""
    batches = _batches(source.records(skip))
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


def _remove_data_files(out: Path) -> None:
    for pattern in ("val_*.bin", "train_*.bin", "train.bin", "val.bin", ".*.tmp"):
        for f in out.glob(pattern):
            f.unlink()


VAL_SHARE = 0.1  # default validation: about this share of the corpus's tokens...
VAL_CAP = 10_000_000  # ...but at most this many (FineWeb's)
SHARD_CAP = 100_000_000  # default train shard size: at most this many tokens...
FEW_SHARDS = 4  # ...and small enough that the training split makes about this many shards
MIN_TEXT_BYTES = 1_000  # less text than this is too little to split into training and validation


def plan_split(doc_tokens: list[int], read: Optional[float], ended: bool, val_tokens: Optional[int] = None,
               shard_tokens: Optional[int] = None, max_tokens: int = 0) -> Optional[tuple[int, int]]:
    """(validation tokens, train shard tokens) for a stream whose first documents have
    doc_tokens tokens each, or None while that cannot be decided yet (read more documents).

    read: the share of the source those documents make up (None: a stream of unknown length);
    ended: there are no more documents. Given sizes win. Otherwise validation takes the first
    whole documents until it holds about VAL_SHARE of the total tokens, at most VAL_CAP (a
    document that would make it more than twice that is cut, as one text file is), and a train
    shard is the training split / FEW_SHARDS, at most SHARD_CAP. The total is known at the end,
    estimated from `read` once that reaches VAL_SHARE, or at least VAL_CAP / VAL_SHARE tokens
    (the caps apply whatever follows). So before the first shard is written, a source of known
    size holds about its validation split in memory, a stream of unknown length up to
    VAL_CAP / VAL_SHARE tokens.
    """
    if val_tokens and shard_tokens:
        return val_tokens, shard_tokens
    held = sum(doc_tokens)
    if not held and not ended:  # nothing to estimate from yet (empty documents only)
        return None
    if max_tokens and held >= max_tokens:
        held, ended = max_tokens, True
    if ended:
        total = held
    elif read and read >= VAL_SHARE:
        total = round(held / read)
    elif held >= VAL_CAP / VAL_SHARE or (read and held >= VAL_CAP):
        total = max(held, round(held / read) if read else 0)
    else:
        return None
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
) -> dict:
    """Train a BPE on the first tokenizer_sample_bytes of the source, then encode every document
    into token shards: the first val_tokens tokens into val_000000.bin, the rest into train
    shards of shard_tokens (stopping after max_tokens tokens in all, if set); sizes not given
    scale with the corpus (plan_split). Each shard is written to a temporary name and renamed;
    progress.json records the shards done and where the stream stands, so calling this again
    with the same arguments resumes at the last complete shard and gives exactly the files an
    uninterrupted run gives. Returns meta."""
    if (shard_tokens is not None and shard_tokens <= 0) or (val_tokens is not None and val_tokens <= 0):
        raise UserError("--shard-tokens and --val-tokens must be positive")
    if max_tokens and val_tokens and max_tokens <= val_tokens:
        raise UserError(f"--max-tokens ({max_tokens:,}) must be larger than --val-tokens ({val_tokens:,})")
    if tokenizer_sample_bytes <= 0:
        raise UserError("--tokenizer-sample-bytes must be positive")
    report = progress or (lambda info: None)
    out = Path(out_dir)
    settings = {"source": source.describe(), "vocab_size": vocab_size, "shard_tokens": shard_tokens,
                "val_tokens": val_tokens, "tokenizer_sample_bytes": tokenizer_sample_bytes, "max_tokens": max_tokens}
    settings = json.loads(json.dumps(settings))  # as it reads back from disk (tuples -> lists)
    check_out_dir(out, lambda m: m.get("settings") == settings, force)

    state = None
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("settings") == settings:
            return meta  # already done
    elif (out / "progress.json").is_file():
        state = json.loads((out / "progress.json").read_text())
        if state.get("settings") != settings:
            raise UserError(f"{out} holds an unfinished tokenize run with other inputs or options; "
                            "rerun that command to finish it, or choose another --out")
        if not (out / "tokenizer.json").is_file():  # stopped before the tokenizer was written: start over
            state = None

    if state is None:
        sample = sample_for_tokenizer(source, tokenizer_sample_bytes)
        report({"phase": "tokenizer", "bytes": tokenizer_sample_bytes})
        tok = train_tokenizer(sample, vocab_size)
        tok_json = tok.to_str()
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten last
        _remove_data_files(out)
        state = {"settings": settings, "shards": [], "records": 0, "skip_tokens": 0, "documents": 0}
        write_file(out / "progress.json", json.dumps(state).encode())  # first: marks an unfinished data dir
        write_file(out / "tokenizer.json", tok_json.encode())
    else:
        for f in out.glob(".*.tmp"):  # a shard a killed run was writing: never used
            f.unlink()
        tok_json = (out / "tokenizer.json").read_text()
        tok = load_tokenizer(tok_json)

    eot = tok.token_to_id(EOT)
    dtype = dtype_for(tok.get_vocab_size())
    blen = np.asarray(token_byte_lengths(tok), dtype=np.int64)

    def writer_for(plan: tuple[int, int], held: list) -> _ShardWriter:
        w = _ShardWriter(out, state, plan, max_tokens, dtype, blen, report)
        for record, ids in enumerate(held):  # documents read before the plan was decided
            w.add(ids, record)
        return w

    plan = plan_split([], None, False, val_tokens, shard_tokens) or (state.get("plan") if state["shards"] else None)
    writer = writer_for(tuple(plan), []) if plan else None
    held: list = []  # documents waiting for the plan (none was written yet: records start at 0)
    held_sizes, held_docs, held_bytes = [], 0, 0
    records, skip_tokens = state["records"], state["skip_tokens"]
    start = time.perf_counter()
    tokens_before = writer.total if writer else 0
    for arrays, frac in ([] if writer and writer.done else _encoded(source, records, tok, tok_json, eot, dtype, workers)):
        for ids in arrays:
            base, skip_tokens = skip_tokens, 0
            if writer:
                writer.add(ids, records, base)
            else:
                held.append(ids)
                held_sizes.append(len(ids))
                held_docs, held_bytes = held_docs + bool(len(ids)), held_bytes + int(blen[ids].sum())
            records += 1
            if writer and writer.done:
                break
        if writer is None:
            plan = plan_split(held_sizes, frac, False, val_tokens, shard_tokens, max_tokens)
            writer, held = (writer_for(plan, held), []) if plan else (None, held)
        total = writer.total if writer else sum(held_sizes)
        fractions = [f for f in (frac, total / max_tokens if max_tokens else None) if f is not None]
        report({"phase": "encode", "documents": writer.documents if writer else held_docs, "tokens": total,
                "bytes": writer.bytes_this_run if writer else held_bytes, "tokens_this_run": total - tokens_before,
                "elapsed": time.perf_counter() - start, "fraction": max(fractions) if fractions else None})
        if writer and writer.done:
            break
    if writer is None:
        writer = writer_for(plan_split(held_sizes, None, True, val_tokens, shard_tokens, max_tokens), held)
    if writer.fill:
        writer.write(records, 0)
    return _finish(out, source, settings, writer, tok, dtype)


def _finish(out: Path, source: Source, settings: dict, writer: _ShardWriter, tok, dtype: np.dtype) -> dict:
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


@dataclass
class TokenData:
    """A tokenized data dir: memory-mapped splits, the tokenizer and the byte counts.

    `train_shards` holds every train file in order (one in the single-file layout); `train` is
    the first of them, which in the single-file layout is the whole split."""

    dir: Path
    meta: dict
    tokenizer_json: str
    train: np.ndarray
    val: np.ndarray
    train_shards: list = field(default_factory=list)

    @property
    def layout(self) -> str:
        return self.meta.get("layout", "single")

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenData":
        d = Path(path)
        if not (d / "meta.json").is_file():
            raise UserError(f"{d} is not a tokenized data dir (no meta.json); run `minideep tokenize` first")
        try:
            meta = json.loads((d / "meta.json").read_text())
            dtype = np.dtype(meta["dtype"])
            tok_json = (d / "tokenizer.json").read_text()
            load_tokenizer(tok_json, str(d / "tokenizer.json"))  # a damaged one: one clear line now, not later
            if meta.get("layout", "single") == "shards":
                files = {"val": [], "train": []}
                for s in meta["shards"]:
                    arr = np.memmap(d / s["file"], dtype=dtype, mode="r")
                    if arr.size != s["tokens"]:
                        raise UserError(f"data dir {d} is damaged: {s['file']} holds {arr.size} tokens, "
                                        f"meta.json says {s['tokens']}")
                    files[s["split"]].append(arr)
                if len(files["val"]) != 1 or not files["train"]:
                    raise KeyError("shards")
                val, shards = files["val"][0], files["train"]
            else:
                shards = [np.memmap(d / "train.bin", dtype=dtype, mode="r")]
                val = np.memmap(d / "val.bin", dtype=dtype, mode="r")
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"data dir {d} is damaged: {e}")
        if sum(a.size for a in shards) != meta["train_tokens"] or val.size != meta["val_tokens"]:
            raise UserError(f"data dir {d} is damaged: token counts differ from meta.json")
        return cls(d, meta, tok_json, shards[0], val, shards)

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


class RandomWindows:
    """The single-file layout's sampler: random windows from one torch.Generator. Under torchrun
    every rank draws the same world * B windows and keeps its own B rows, so the generator state
    is the same on every rank and one saved state resumes them all."""

    def __init__(self, data: np.ndarray, batch_size: int, block_size: int, seed: int, rank: int = 0, world: int = 1):
        import torch

        self.data, self.B, self.T, self.rank, self.world = data, batch_size, block_size, rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple:
        if self.world == 1:
            return get_batch(self.data, self.B, self.T, self.generator)
        x, y = get_batch(self.data, self.world * self.B, self.T, self.generator)
        rows = slice(self.rank * self.B, (self.rank + 1) * self.B)
        return x[rows], y[rows]

    def state(self) -> dict:
        return {"rng_data": self.generator.get_state()}

    def load_state(self, loop: dict) -> None:
        if "rng_data" not in loop:
            raise UserError("--resume: the checkpoint read sharded data sequentially; this data dir is a single file")
        self.generator.set_state(loop["rng_data"])


class ShardReader:
    """The sharded layout's sampler: the train shards read in order as one token stream.

    A micro-step of all ranks takes world * B * T consecutive tokens from the position; rank r
    reads rows [r*B, (r+1)*B) of it (plus one token for the last target), so the ranks read
    disjoint parts and together read the stream once, whatever the world size. When what is
    left of the stream is too short for a micro-step, the epoch ends and reading starts again
    at the first shard. The position (shard, offset, epoch) is the whole state."""

    def __init__(self, shards: list, batch_size: int, block_size: int, rank: int = 0, world: int = 1):
        self.shards, self.B, self.T, self.rank, self.world = shards, batch_size, block_size, rank, world
        self.starts = np.cumsum([0] + [len(s) for s in shards]).tolist()  # global offset of each shard
        self.total = self.starts[-1]
        need = world * batch_size * block_size + 1
        if self.total < need:
            raise UserError(f"the train split has {self.total:,} tokens, fewer than one micro-step of all ranks "
                            f"needs ({world} x {batch_size} x {block_size} + 1 = {need:,})")
        self.pos, self.epoch = 0, 0

    def read(self, start: int, n: int) -> np.ndarray:
        """n tokens of the stream from global offset `start`, across shard boundaries."""
        out = np.empty(n, dtype=np.int64)
        k, got = bisect.bisect_right(self.starts, start) - 1, 0
        while got < n:
            off = start + got - self.starts[k]
            piece = self.shards[k][off : off + n - got]
            out[got : got + len(piece)] = piece
            got, k = got + len(piece), k + 1
        return out

    def next_batch(self) -> tuple:
        import torch

        span = self.B * self.T
        if self.pos + self.world * span + 1 > self.total:
            self.pos, self.epoch = 0, self.epoch + 1
        xy = torch.from_numpy(self.read(self.pos + self.rank * span, span + 1))
        self.pos += self.world * span
        return xy[:-1].view(self.B, self.T), xy[1:].view(self.B, self.T)

    def state(self) -> dict:
        k = bisect.bisect_right(self.starts, self.pos) - 1
        return {"data_pos": {"shard": k, "offset": self.pos - self.starts[k], "epoch": self.epoch}}

    def load_state(self, loop: dict) -> None:
        p = loop.get("data_pos")
        if p is None:
            raise UserError("--resume: the checkpoint was trained with random windows (single-file data), "
                            "this data dir is sharded")
        if not 0 <= p["shard"] < len(self.shards) or not 0 <= p["offset"] <= len(self.shards[p["shard"]]):
            raise UserError(f"--resume: the checkpoint's data position {p} is outside this data dir's shards")
        self.pos, self.epoch = self.starts[p["shard"]] + p["offset"], p["epoch"]


def make_sampler(data: TokenData, batch_size: int, block_size: int, seed: int, rank: int = 0, world: int = 1):
    """Random windows for the single-file layout, sequential reading for the sharded one."""
    if data.layout == "shards":
        return ShardReader(data.train_shards, batch_size, block_size, rank, world)
    return RandomWindows(data.train, batch_size, block_size, seed, rank, world)


def open_or_none(cfg) -> Optional[TokenData]:
    """The data a config trained on, if it is on this machine (the bundled corpus always is)."""
    if not cfg.data.dir:
        return TokenData.open(bundled_data_dir(cfg.data.vocab_size, cfg.data.val_fraction))
    return TokenData.open(cfg.data.dir) if (Path(cfg.data.dir) / "meta.json").is_file() else None
