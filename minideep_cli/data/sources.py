"""Where documents come from: a text file, the bundled corpus, folders of text, JSONL and
parquet files, or a Hugging Face dataset streamed, all read as (text, fraction read) records."""

from __future__ import annotations

import codecs
import gzip
import json
import os
from dataclasses import dataclass, field
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

from ..errors import UserError
from ..files import sha256_file
from ..schema import regular_file


def bundled_corpus() -> Path:
    return Path(str(resources.files("minideep_cli") / "assets" / "tinyshakespeare.txt"))


def read_text_file(path: str | os.PathLike, limit: Optional[int] = None) -> str:
    """Read a UTF-8 text corpus, refusing missing, empty and binary files, and what is not a
    regular file (/dev/zero, a FIFO) or is larger than limit bytes, with one clear line."""
    p = regular_file(path, "text file", limit)
    raw = p.read_bytes()
    if not raw.strip():
        raise UserError(f"file is empty: {p}")
    return _text_document(p, raw)


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
RECORD_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES  # files of records (one document each), not one text


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


@dataclass
class FileScan:
    """The files behind the paths given to tokenize, and what a folder held that was left out,
    by reason (binary, not UTF-8, unreadable, hidden, excluded by --include/--exclude)."""

    files: list[Path] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # reason -> count
    as_text: set = field(default_factory=set)  # .json files in a folder that hold one text, not records

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def scan_paths(paths: list, include: tuple = (), exclude: tuple = (), text_column: str = "text") -> FileScan:
    """The files behind the given paths. A file given by name is taken as it is. A folder stands
    for every file below it whose content is UTF-8 text (whatever its extension: code, markdown,
    files without one), plus its JSONL and parquet files (a .json file only if its first line is a
    record with the text column), in sorted order; binary and undecodable
    files, unreadable ones and hidden files and folders (a name starting with '.') are left out and
    counted. --include and --exclude globs (fnmatch, against the path inside the folder, so
    '*.py' matches at any depth) narrow a folder further: with any --include a file must match one,
    and --exclude always wins. Missing paths and folders with nothing to read are errors."""
    scan = FileScan()
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"file not found: {p}")
        if not p.is_dir():
            scan.files.append(regular_file(p, "input file"))  # never a device or a FIFO (reading it never ends)
            continue
        before = len(scan.files)
        for f in _walk(p, scan):
            rel = f.relative_to(p).as_posix()
            if (include and not any(fnmatch(rel, g) for g in include)) or any(fnmatch(rel, g) for g in exclude):
                scan.skip("excluded by --include/--exclude")
                continue
            kind = _kind(f)
            if kind == "jsonl" and f.name.lower().endswith(".json") and not _holds_records(f, text_column):
                kind = "text"  # package.json and the like: a document like any other
                scan.as_text.add(f)
            reason = _not_text(f) if kind == "text" else None
            if reason:
                scan.skip(reason)
            else:
                scan.files.append(f)
        if len(scan.files) == before:
            left = "; ".join(f"{n} {why}" for why, n in scan.skipped.items())
            raise UserError(f"{p} holds no text, JSONL or parquet files" + (f" (left out: {left})" if left else ""))
    if not scan.files:
        raise UserError("no input files given")
    return scan


def find_files(paths: list, include: tuple = (), exclude: tuple = ()) -> list[Path]:
    """scan_paths' files alone."""
    return scan_paths(paths, include, exclude).files


def _holds_records(f: Path, column: str) -> bool:
    """Whether a .json file's first line is a JSON object with the text column (JSON Lines)."""
    try:
        with open(f, "rb") as fh:
            row = json.loads(fh.readline(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and column in row


def _walk(folder: Path, scan: FileScan) -> list[Path]:
    """Every regular file below folder, sorted, hidden names and unreadable folders counted, not followed."""
    found = []
    for root, dirs, names in os.walk(folder, onerror=lambda e: scan.skip("unreadable folders")):
        hidden = [d for d in dirs if d.startswith(".")]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for _ in hidden:
            scan.skip("hidden files or folders")
        for n in names:
            f = Path(root) / n
            if n.startswith("."):
                scan.skip("hidden files or folders")
            elif f.is_file():
                found.append(f)
    return sorted(found)


def _not_text(f: Path) -> Optional[str]:
    """Why a file is not UTF-8 text (it holds a NUL byte or does not decode), or None if it is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                if b"\x00" in chunk:
                    return "binary"
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8"
    except OSError:
        return "unreadable"
    return None


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
    as_text: set = field(default_factory=set)  # .json files to read as one text (FileScan.as_text)

    def describe(self) -> dict:
        if self.dataset:
            return {"dataset": self.dataset, "name": self.name, "split": self.split, "text_column": self.text_column}
        return {"files": [[str(f.resolve()), f.stat().st_size, sha256_file(f)] for f in self.files],
                "text_column": self.text_column}

    def label(self) -> str:
        if self.dataset:
            return self.dataset + (f" ({self.name})" if self.name else "")
        first = min(self.files)  # the same name whatever order the files are read in
        return str(first) + (f" and {len(self.files) - 1} more" if len(self.files) > 1 else "")

    def records(self, skip: int = 0) -> Iterator[tuple[str, Optional[float]]]:
        """(text, fraction of the source read so far or None) for every record after `skip`."""
        if self.dataset:
            yield from self._hf_records(skip)
            return
        sizes = [max(1, f.stat().st_size) for f in self.files]
        total, before, seen = sum(sizes), 0, 0  # seen: records passed over while skipping
        for f, size in zip(self.files, sizes):
            kind = "text" if f in self.as_text else _kind(f)
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

