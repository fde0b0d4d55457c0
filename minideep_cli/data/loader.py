"""Batches back out of a data dir: open it (checking every file against meta.json) and read
training batches, as epochs of shuffled windows over every train shard (whose state is a
torch.Generator's and a position in the epoch), or, asked for, as one stream through the train
shards in order (whose state is a position: shard, offset, epoch)."""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from ..tokenizer import load_tokenizer, token_byte_lengths
from .integrity import check_token_ids, read_meta
from .prepare import bundled_data_dir


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
            meta = read_meta(d)  # its shape checked (integrity.py)
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
        data = cls(d, meta, tok_json, shards[0], val, shards)
        check_token_ids(data, "val")  # the training split when a sampler is made (make_sampler)
        return data

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_json)

    def byte_lengths(self) -> list[int]:
        return token_byte_lengths(self.tokenizer())


def check_split(data: np.ndarray, block_size: int) -> None:
    if len(data) < block_size + 2:
        raise UserError(f"split has {len(data)} tokens, fewer than block_size + 2 = {block_size + 2}")


def windows(data: np.ndarray, starts, block_size: int) -> tuple:
    """The windows at these starts: x = data[i:i+T], y = data[i+1:i+T+1]. -> (B, T) int64 each."""
    return shard_windows([data], [(0, i) for i in starts], block_size)


def shard_windows(shards: list, rows, block_size: int) -> tuple:
    """The windows at these (shard, start) rows: x = shard[i:i+T], y = shard[i+1:i+T+1].
    -> (B, T) int64 each."""
    import torch

    xy = np.stack([np.asarray(shards[k][i : i + block_size + 1], dtype=np.int64) for k, i in rows])
    xy = torch.from_numpy(xy)  # (B, T+1)
    return xy[:, :-1], xy[:, 1:]


def get_batch(data: np.ndarray, batch_size: int, block_size: int, generator) -> tuple:
    """Random windows (nanoGPT), as validation draws them. -> (B, T) int64 each."""
    import torch

    check_split(data, block_size)
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator).tolist()
    return windows(data, starts, block_size)


GROUP_TOKENS = 400_000_000  # an epoch shuffles the windows of shards together in groups of at least this many tokens


class ShuffledWindows:
    """The training sampler: epochs of shuffled windows over every train shard (one in the
    single-file layout). Each epoch takes the shards in a random order and cuts each into windows
    of T tokens (and the token after each, for the last target) from a random offset in [0, T);
    the shards are taken in groups of at least GROUP_TOKENS tokens (one group for any corpus
    below twice that; tens of FineWeb shards make several), and each group's windows are visited in a random
    order, so the rows of a batch come from all over the group, every token is trained on at
    most once an epoch, and memory holds one group's window list, not the corpus's. The last
    fewer than world * B windows of a group's order, a random few, wait for the next epoch. A
    split too short for one step repeats its windows in fresh orders. Why shuffled windows rather
    than reading the stream in order: docs/results/2026-12-06-epochs.md (one text read eleven
    times) and docs/results/2026-12-07-corpus.md (a folder of files read about once).

    Under torchrun every rank walks the same order, and a step of all ranks takes world * B
    windows of it, rank r the rows [r*B, (r+1)*B). The state is the generator's at the start of
    the epoch, the group and the position in it; one shard draws exactly what the single-file
    sampler always drew (no shard order), so its runs and checkpoints are unchanged."""

    def __init__(self, shards, batch_size: int, block_size: int, seed: int, rank: int = 0, world: int = 1,
                 group_tokens: int = GROUP_TOKENS):
        import torch

        self.shards = list(shards) if isinstance(shards, (list, tuple)) else [shards]
        self.B, self.T, self.rank, self.world, self.group_tokens = batch_size, block_size, rank, world, group_tokens
        if not any(len(s) >= block_size + 2 for s in self.shards):
            total = sum(len(s) for s in self.shards)
            raise UserError(f"split has {total} tokens, fewer than block_size + 2 = {block_size + 2}")
        self.generator = torch.Generator().manual_seed(seed)
        self.new_epoch()

    def new_epoch(self) -> None:
        import torch

        self.epoch_rng = self.generator.get_state()
        n = len(self.shards)
        order = torch.randperm(n, generator=self.generator).tolist() if n > 1 else [0]
        self.groups, size = [[]], 0  # consecutive shards of the order, at least group_tokens each
        for k in order:
            if size >= self.group_tokens:
                self.groups.append([])
                size = 0
            self.groups[-1].append(k)
            size += len(self.shards[k])
        if len(self.groups) > 1 and size < self.group_tokens:  # a short last group joins the one before
            last = self.groups.pop()
            self.groups[-1] += last
        self.group = -1
        self.next_group()

    def next_group(self) -> None:
        """The next group's windows, (shard, start) rows in visiting order."""
        import torch

        self.group, self.pos = self.group + 1, 0
        T, need, found = self.T, self.world * self.B, []
        for k in self.groups[self.group]:
            size = len(self.shards[k])
            offset = int(torch.randint(T, (1,), generator=self.generator))
            if size - 1 - offset < T:  # no whole window after this offset
                offset = 0
            starts = offset + T * np.arange(max(0, (size - 1 - offset) // T), dtype=np.int64)
            found.append(np.stack([np.full_like(starts, k), starts], axis=1))  # (n_k, 2)
        rows = np.concatenate(found)  # (n, 2): shard, start
        if not len(rows):  # a group of shards all shorter than a window: on to the next
            return self.next_group() if self.group + 1 < len(self.groups) else self.new_epoch()
        orders = [torch.randperm(len(rows), generator=self.generator) for _ in range(-(-need // len(rows)))]
        self.rows = rows[torch.cat(orders).numpy()]  # in visiting order

    def next_batch(self) -> tuple:
        need = self.world * self.B
        if self.pos + need > len(self.rows):
            self.next_group() if self.group + 1 < len(self.groups) else self.new_epoch()
        rows = self.rows[self.pos + self.rank * self.B : self.pos + (self.rank + 1) * self.B]
        self.pos += need
        return shard_windows(self.shards, rows, self.T)  # (B, T) each

    def state(self) -> dict:
        return {"rng_epoch": self.epoch_rng, "epoch_group": self.group, "epoch_pos": self.pos}

    def load_state(self, loop: dict) -> None:
        if "data_pos" in loop:
            raise UserError("--resume: the checkpoint read its shards in order (minideep 0.1); "
                            "continue it with -o data.order=sequential")
        if "rng_epoch" not in loop:
            raise UserError("--resume: the checkpoint comes from a minideep that drew its windows at random "
                            "(0.1.0, or a build before shuffled epochs); finish that run with that version, "
                            "or start a new one")
        self.generator.set_state(loop["rng_epoch"])
        self.new_epoch()  # the epoch's draws again, up to the group the checkpoint was in
        for _ in range(int(loop.get("epoch_group", 0))):
            self.next_group()
        self.pos = int(loop["epoch_pos"])


class ShardReader:
    """The train shards read in order as one token stream (`data.order: sequential`, as minideep
    0.1 read a sharded data dir; kept to compare against and to finish such runs).

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
            raise UserError("--resume: the checkpoint read shuffled windows; continue it with -o data.order=shuffled")
        if not 0 <= p["shard"] < len(self.shards) or not 0 <= p["offset"] <= len(self.shards[p["shard"]]):
            raise UserError(f"--resume: the checkpoint's data position {p} is outside this data dir's shards")
        self.pos, self.epoch = self.starts[p["shard"]] + p["offset"], p["epoch"]


def make_sampler(data: TokenData, batch_size: int, block_size: int, seed: int, rank: int = 0, world: int = 1,
                 order: str = "shuffled"):
    """Shuffled epochs of windows over every train shard, or (order "sequential") the shards read in order."""
    check_token_ids(data, "train")
    if order == "sequential":
        return ShardReader(data.train_shards, batch_size, block_size, rank, world)
    return ShuffledWindows(data.train_shards, batch_size, block_size, seed, rank, world)


def open_or_none(cfg) -> Optional[TokenData]:
    """The data a config trained on, if it is on this machine (the bundled corpus always is)."""
    if not cfg.data.dir:
        return TokenData.open(bundled_data_dir(cfg.data.vocab_size, cfg.data.val_fraction))
    return TokenData.open(cfg.data.dir) if (Path(cfg.data.dir) / "meta.json").is_file() else None
