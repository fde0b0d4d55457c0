"""Rendering `tokenize`: a transient progress bar (one text: the encoding; documents: the phase,
documents, tokens, speed and ETA) and the summary of what was written."""

from __future__ import annotations

import time
from pathlib import Path

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from . import count


class TokenizeView:
    """Fed prepare.tokenize_corpus's events: ("text", {done, total}) while one text is encoded,
    ("documents", info) while documents are tokenized into shards."""

    def __init__(self):
        self.bar = None
        self.task = None
        self.first: dict = {}  # the first progress seen, which the ETA is measured from

    def __call__(self, kind: str, info: dict) -> None:
        if self.bar is None:
            if kind == "text":
                self.bar = Progress("[progress.description]{task.description}", BarColumn(), TaskProgressColumn(),
                                    TimeRemainingColumn(), transient=True)
                self.task = self.bar.add_task("encoding", total=info["total"])
            else:
                self.bar = Progress(TextColumn("[bold]tokenize"), BarColumn(), TextColumn("{task.fields[info]}"),
                                    transient=True)
                self.task = self.bar.add_task("tokenize", total=1000, info="reading")
            self.bar.start()
        if kind == "text":
            self.bar.update(self.task, completed=info["done"])
        elif info.get("phase") == "tokenizer":
            self.bar.update(self.task, info=f"training the tokenizer on up to {info['bytes'] / 1e6:,.0f} MB of text")
        elif info.get("phase") == "encode":
            self.bar.update(self.task, completed=1000 * info["fraction"] if info["fraction"] else 0,
                            info=self.encode_text(info))

    def encode_text(self, info: dict) -> str:
        el, f = info["elapsed"], info["fraction"]
        text = f"{info['documents']:,} docs  {info['tokens']:,} tokens  {info['bytes'] / 1e6 / max(el, 1e-9):,.1f} MB/s"
        self.first.setdefault("f", f or 0.0)
        self.first.setdefault("t", el)
        if f and f > self.first["f"] and el > self.first["t"]:
            eta = (1 - f) * (el - self.first["t"]) / (f - self.first["f"])
            text += f"  ETA {time.strftime('%H:%M:%S', time.gmtime(eta)) if eta < 86400 else f'{eta / 86400:.1f} days'}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def tokenize_summary(out: Path, meta: dict) -> str:
    """What tokenize wrote: one text's two splits, or a sharded data dir (split_summary)."""
    if meta.get("layout") == "shards":
        return split_summary(out, meta)
    return (f"wrote {out}: vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens "
            f"({meta['train_bytes']:,} bytes), val {meta['val_tokens']:,} tokens ({meta['val_bytes']:,} bytes)")


def split_summary(out: Path, meta: dict) -> str:
    """What a sharded tokenize wrote, and how its split and shard size were chosen."""
    settings, total = meta["settings"], meta["train_tokens"] + meta["val_tokens"]
    n_train = sum(1 for s in meta["shards"] if s["split"] == "train")
    val_docs = meta.get("val_documents", 0)
    which = "random" if settings.get("shuffle_seed") is not None else "the first"
    how = (f"--val-tokens, {which} whole documents" if settings["val_tokens"] else
           f"the default: {which} whole documents, about 10% of the tokens, at most 10,000,000")
    if meta.get("val_cut"):
        how += "; its last document is cut and goes on in train"
    shard_how = "--shard-tokens" if settings["shard_tokens"] else "the default: a quarter of train, at most 100,000,000"
    return (f"wrote {out}: vocab {meta['vocab_size']}, {count(meta['documents'], 'document')}, {total:,} tokens\n"
            f"  validation: {count(val_docs, 'document')}, {meta['val_tokens']:,} tokens ({meta['val_bytes']:,} bytes), "
            f"{meta['val_tokens'] / total:.1%} ({how})\n"
            f"  train: {count(meta['documents'] - val_docs, 'document')}, {meta['train_tokens']:,} tokens "
            f"({meta['train_bytes']:,} bytes) in {count(n_train, 'shard')} of up to "
            f"{meta.get('shard_tokens', settings['shard_tokens']):,} ({shard_how})" + skipped_line(meta))


def skipped_line(meta: dict) -> str:
    """What the folders held that was left out, if anything."""
    skipped = meta.get("skipped") or {}
    if not skipped:
        return ""
    return "\n  skipped: " + ", ".join(f"{n:,} {why}" for why, n in sorted(skipped.items()))
