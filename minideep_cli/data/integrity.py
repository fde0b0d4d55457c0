"""What a data dir must hold before anything reads it: meta.json and progress.json of the right
shape (schema.py), token ids inside the vocabulary, and the fingerprint that tells a resumed run
whether its data is still the data it trained on.

The readers (loader.py, prepare.py, shards.py) call these in one line each, so a damaged file
is one line naming it, never a KeyError or an IndexError deep in the model."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from ..schema import NAT, POSITIVE, OneOf, Where, check, read_json

ID_CHUNK = 1 << 24  # tokens per vectorised max: 32 MB of uint16, bounded memory for any file size

SHARD = {
    "split": OneOf("train", "val"),
    "file": Where(str, lambda v: re.fullmatch(r"(train|val)_\d{6}\.bin", v) is not None,
                  "a shard name such as train_000000.bin"),
    "tokens": NAT,
    "bytes?": NAT,
}
META = {  # what the readers rely on; other keys are allowed (newer versions may write more)
    "vocab_size": Where(int, lambda v: 257 <= v <= 1 << 32, "an integer from 257 to 2**32"),
    "dtype": OneOf("uint16", "uint32"),
    "train_tokens": NAT,
    "val_tokens": NAT,
    "train_bytes": NAT,
    "val_bytes": NAT,
    "layout?": OneOf("single", "shards"),
    "format?": int,
}
SHARDED_META = {"shards": [SHARD], "documents": NAT, "settings": dict, "val_documents?": NAT, "val_cut?": bool,
                "shard_tokens?": POSITIVE}
PROGRESS = {  # a sharded tokenize run's state (single-text runs write a bare marker: {"source_sha256": ...})
    "settings": dict, "shards": [SHARD], "records": NAT, "skip_tokens": NAT, "documents": NAT,
    "val_documents?": NAT, "val_cut?": bool, "plan?": [POSITIVE],
}


def read_meta(d: str | Path, hint: str = "", damaged_as_missing: bool = False) -> Optional[dict]:
    """d's meta.json, checked (None when there is none). A damaged one is a UserError naming it
    (hint appended), or with damaged_as_missing, None: what --force replaces anyway."""
    path = Path(d) / "meta.json"
    if not path.exists():
        return None
    try:
        meta = read_json(path, META)
        if meta.get("layout") == "shards":
            check(meta, SHARDED_META, str(path))
        if (meta["dtype"] == "uint16") != (meta["vocab_size"] <= 65536):
            raise UserError(f"{path} is damaged: dtype {meta['dtype']} cannot hold {meta['vocab_size']:,} ids")
    except UserError as e:
        if damaged_as_missing:
            return None
        raise UserError(f"{e}{'; ' + hint if hint else ''}")
    return meta


def read_progress(d: str | Path, hint: str = "", damaged_as_missing: bool = False) -> Optional[dict]:
    """d's progress.json (an unfinished tokenize run), checked like read_meta: a mapping, and one
    with settings (a sharded run's) holds everything a resume reads."""
    path = Path(d) / "progress.json"
    if not path.exists():
        return None
    try:
        state = read_json(path, dict)
        if "settings" in state:
            check(state, PROGRESS, str(path))
    except UserError as e:
        if damaged_as_missing:
            return None
        raise UserError(f"{e}{'; ' + hint if hint else ''}")
    return state


def split_files(data) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{"train": [(file name, tokens)], "val": [...]} of an opened TokenData."""
    if data.meta.get("layout") == "shards":
        names = {s: [x["file"] for x in data.meta["shards"] if x["split"] == s] for s in ("train", "val")}
    else:
        names = {"train": ["train.bin"], "val": ["val.bin"]}
    return {"train": list(zip(names["train"], data.train_shards)), "val": list(zip(names["val"], [data.val]))}


def check_token_ids(data, split: str) -> None:
    """Every token id of the split's files is below the vocabulary (one flipped value would
    otherwise be an IndexError deep in the model, or a device assert on a GPU). A vectorised max
    over chunks: about 0.1 s per billion tokens of a file in the page cache, the first read from
    disk what reading the file costs (docs/results/2026-12-07-token-id-check.md). Opening checks
    the validation split (at most 10M tokens); the training split is checked once, when a
    training sampler is made."""
    vocab = data.meta["vocab_size"]
    if split == "val":
        n = data.tokenizer().get_vocab_size()
        if n != vocab:
            raise UserError(f"data dir {data.dir} is damaged: meta.json says {vocab:,} ids, "
                            f"tokenizer.json holds {n:,}")
    for name, arr in split_files(data)[split]:
        for start in range(0, len(arr), ID_CHUNK):
            chunk = np.asarray(arr[start : start + ID_CHUNK])
            if len(chunk) and int(chunk.max()) >= vocab:
                pos = int(np.argmax(chunk >= vocab))
                raise UserError(f"data dir {data.dir} is damaged: {name} holds token id {int(chunk[pos]):,} "
                                f"at token {start + pos:,}, beyond the vocabulary of {vocab:,} ids")


# ---------------------------------------------------------------- fingerprint


def fingerprint(data) -> str:
    """The data's identity for --resume: the split sizes in tokens and bytes, the tokenizer and
    the validation tokens themselves (SHA-256; at most 10M tokens, a few tens of ms). Text
    tokenized again from other text, or split differently, gives another fingerprint."""
    m = data.meta
    h = hashlib.sha256()
    h.update(json.dumps([m["train_tokens"], m["val_tokens"], m["train_bytes"], m["val_bytes"]]).encode())
    h.update(hashlib.sha256(data.tokenizer_json.encode("utf-8")).digest())
    for start in range(0, len(data.val), ID_CHUNK):
        h.update(np.ascontiguousarray(data.val[start : start + ID_CHUNK]).tobytes())
    return h.hexdigest()


def check_same_data(ckpt: dict, data, where: str) -> Optional[str]:
    """--resume reads the data the checkpoint trained on: its fingerprint (or, from a checkpoint
    written before fingerprints, the split sizes of its meta.json) must match. Returns the
    data's fingerprint; a mismatch is a UserError that names --new-data."""
    now = fingerprint(data)
    saved = ckpt.get("data_fingerprint")
    if saved is not None:
        same = saved == now
    else:  # an older checkpoint: the sizes it recorded
        keys = ("train_tokens", "val_tokens", "train_bytes", "val_bytes")
        old = ckpt.get("data") or {}
        same = all(old.get(k) == data.meta.get(k) for k in keys if k in old)
    if not same:
        old = (ckpt.get("data") or {})
        was = f" ({old['train_tokens']:,} train tokens then, {data.meta['train_tokens']:,} now)" if isinstance(
            old.get("train_tokens"), int) else ""
        raise UserError(f"--resume: {data.dir} is not the data {where} trained on{was}; pass --new-data to go on "
                        "training on it (the best checkpoint then starts over), or give the old data with --data")
    return now

