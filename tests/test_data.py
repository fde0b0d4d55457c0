"""Sharded tokenization (text files, JSONL, parquet, a streamed dataset folder), its resume,
and the sequential shard reader training uses."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import HOSTILE, tiny_train_cfg
from typer.testing import CliRunner

from minideep_cli.checkpoint import load_checkpoint
from minideep_cli.cli import app
from minideep_cli.data import encode as encode_mod
from minideep_cli.data import shards as shards_mod
from minideep_cli.data import ShardReader, ShuffledWindows, Source, TokenData, find_files, plan_split, tokenize_source
from minideep_cli.errors import UserError
from minideep_cli.tokenizer import EOT
from minideep_cli.train import train

OPTS = dict(vocab_size=300, shard_tokens=4000, val_tokens=2500, tokenizer_sample_bytes=30000)


@pytest.fixture(scope="module")
def docs(corpus_text):
    """Documents of uneven length, with hostile text, an empty one and a literal <|endoftext|>."""
    parts = corpus_text[:90000].split("\n\n")
    out = ["\n\n".join(parts[i : i + 1 + i % 7]) for i in range(0, len(parts), 4)]
    out[3:3] = [HOSTILE, "", "a literal <|endoftext|> is text", "x"]
    return out


def write_sources(root: Path, docs) -> dict:
    (root / "txt").mkdir(parents=True)
    for i, d in enumerate(docs):
        (root / "txt" / f"{i:05d}.txt").write_text(d, encoding="utf-8")
    (root / "ds").mkdir()
    half = len(docs) // 2
    for k, part in enumerate([docs[:half], docs[half:]]):  # a dataset folder of two JSONL files
        with open(root / "ds" / f"part-{k}.jsonl", "w", encoding="utf-8") as f:
            for d in part:
                f.write(json.dumps({"id": 7, "text": d}) + "\n")
    pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), root / "docs.parquet", row_group_size=50)
    with gzip.open(root / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return {"txt": [root / "txt"], "jsonl": [root / "ds"], "parquet": [root / "docs.parquet"],
            "gz": [root / "docs.jsonl.gz"]}


def all_tokens(d: TokenData) -> np.ndarray:
    return np.concatenate([d.val, *d.train_shards]).astype(np.int64)


def digest(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_text_jsonl_and_parquet_give_exactly_the_same_tokens(tmp_path, docs):
    paths = write_sources(tmp_path, docs)
    tokenize_source(Source(find_files(paths["txt"])), tmp_path / "a", workers=1, **OPTS)
    tokenize_source(Source(find_files(paths["jsonl"])), tmp_path / "b", workers=2, **OPTS)
    tokenize_source(Source(find_files(paths["parquet"]), text_column="body"), tmp_path / "c", workers=1, **OPTS)
    tokenize_source(Source(find_files(paths["gz"])), tmp_path / "g", workers=1, **OPTS)
    a, b, c, g = (TokenData.open(tmp_path / n) for n in "abcg")
    assert a.tokenizer_json == b.tokenizer_json == c.tokenizer_json == g.tokenizer_json
    for other in (b, c, g):
        assert np.array_equal(all_tokens(a), all_tokens(other))
    for name in ("val_000000.bin", "train_000000.bin", "train_000003.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()

    # the stream is <|endoftext|> + document, for every non-empty document, in order
    tok = a.tokenizer()
    eot = tok.token_to_id(EOT)
    expected = [i for d in docs if d for i in [eot] + tok.encode(d).ids]
    assert all_tokens(a).tolist() == expected
    assert a.meta["documents"] == sum(1 for d in docs if d)
    # fixed-size shards, the validation one first, and the bytes each holds (bits per byte)
    sizes = [s["tokens"] for s in a.meta["shards"]]
    assert a.meta["shards"][0]["split"] == "val" and sizes[0] == 2500
    assert set(sizes[1:-1]) == {4000} and 0 < sizes[-1] <= 4000
    assert a.meta["val_bytes"] + a.meta["train_bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    pieces = a.byte_lengths()
    assert a.meta["val_bytes"] == sum(pieces[i] for i in a.val.tolist())


def test_finished_shards_are_replaced_only_with_force(tmp_path, docs):
    src = Source(find_files(write_sources(tmp_path, docs)["jsonl"]))
    out = tmp_path / "out"
    first = tokenize_source(src, out, workers=1, **OPTS)
    assert tokenize_source(src, out, workers=1, **OPTS) == first  # the same command: already done
    other = {**OPTS, "shard_tokens": OPTS["shard_tokens"] * 2}
    with pytest.raises(UserError, match="other settings"):
        tokenize_source(src, out, workers=1, **other)
    assert TokenData.open(out).meta == first
    assert tokenize_source(src, out, workers=1, force=True, **other)["settings"]["shard_tokens"] == other["shard_tokens"]


def test_killed_tokenize_resumes_to_identical_shards(tmp_path, docs):
    src = Source(find_files(write_sources(tmp_path, docs)["jsonl"]))
    tokenize_source(src, tmp_path / "ref", workers=1, **OPTS)

    class Killed(Exception):
        pass

    def kill_after_3(info):
        if info["phase"] == "shard" and info["shards"] == 3:
            raise Killed
    with pytest.raises(Killed):
        tokenize_source(src, tmp_path / "out", workers=2, progress=kill_after_3, **OPTS)
    out = tmp_path / "out"
    state = json.loads((out / "progress.json").read_text())
    assert len(state["shards"]) == 3 and state["skip_tokens"] > 0  # stopped inside a document
    assert not (out / "meta.json").exists()
    with pytest.raises(UserError, match="no meta.json"):
        TokenData.open(out)
    # what a kill can leave besides: a temp file half written, a renamed shard progress.json
    # does not list yet (here: garbage). Neither may end up in the data.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".train_000002.bin.minideep-{dead.pid}-0123abcd.tmp").write_bytes(b"\x01\x02" * 100)
    (out / "train_000002.bin").write_bytes(b"\xff" * 10)
    with pytest.raises(UserError, match="other inputs or options"):
        tokenize_source(src, out, workers=1, **{**OPTS, "shard_tokens": 5000})
    tokenize_source(src, out, workers=1, **OPTS)
    assert digest(out) == digest(tmp_path / "ref")
    assert not list(out.glob(".*.tmp")) and not (out / "progress.json").exists()
    assert tokenize_source(src, out, workers=1, **OPTS) == json.loads((out / "meta.json").read_text())  # done


def test_max_tokens_stops_exactly(tmp_path, docs):
    src = Source(find_files(write_sources(tmp_path, docs)["parquet"]), text_column="body")
    meta = tokenize_source(src, tmp_path / "m", max_tokens=11000, **OPTS)
    assert meta["val_tokens"] + meta["train_tokens"] == 11000
    assert [s["tokens"] for s in meta["shards"]] == [2500, 4000, 4000, 500]
    full = TokenData.open(tmp_path / "m")
    tokenize_source(src, tmp_path / "all", **OPTS)
    assert np.array_equal(all_tokens(full), all_tokens(TokenData.open(tmp_path / "all"))[:11000])


def test_bad_sources_get_one_clear_line(tmp_path, docs):
    paths = write_sources(tmp_path, docs)
    with pytest.raises(UserError, match="no column 'text'.*body"):
        tokenize_source(Source(find_files(paths["parquet"])), tmp_path / "x", **OPTS)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match="bad.jsonl:2 is not valid JSON"):
        tokenize_source(Source(find_files([tmp_path / "bad.jsonl"])), tmp_path / "x", **OPTS)
    with pytest.raises(UserError, match="too few"):
        tokenize_source(Source(find_files(paths["txt"])), tmp_path / "x", **{**OPTS, "val_tokens": 10**7})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no text, JSONL or parquet files"):
        find_files([tmp_path / "empty"])


def test_hugging_face_streaming_path_on_a_local_dataset_folder(tmp_path, docs):
    pytest.importorskip("datasets", reason="the optional `datasets` package (pip install 'minideep[hf]') is not installed")
    paths = write_sources(tmp_path, docs)
    tokenize_source(Source(find_files(paths["jsonl"])), tmp_path / "files", **OPTS)
    hf = Source(dataset=str(tmp_path / "ds"), split="train")

    def kill_after_2(info):
        if info["phase"] == "shard" and info["shards"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tokenize_source(hf, tmp_path / "hf", progress=kill_after_2, **OPTS)
    tokenize_source(hf, tmp_path / "hf", **OPTS)  # resumes: the stream skips the records done
    a, b = TokenData.open(tmp_path / "files"), TokenData.open(tmp_path / "hf")
    assert a.tokenizer_json == b.tokenizer_json and np.array_equal(all_tokens(a), all_tokens(b))
    with pytest.raises(UserError, match="no column 'body'"):
        tokenize_source(Source(dataset=str(tmp_path / "ds"), text_column="body"), tmp_path / "y", **OPTS)


def test_tokenize_command_shards_and_clean_errors(tmp_path, docs):
    paths = write_sources(tmp_path, docs)
    runner = CliRunner()
    r = runner.invoke(app, ["tokenize", str(paths["parquet"][0]), "--text-column", "body", "--out", str(tmp_path / "d"),
                            "--vocab-size", "300", "--shard-tokens", "4000", "--val-tokens", "2500",
                            "--tokenizer-sample-bytes", "30000", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "shards" in r.stdout and TokenData.open(tmp_path / "d").layout == "shards"
    r = runner.invoke(app, ["tokenize", str(paths["parquet"][0]), "--dataset", "x/y"])
    assert r.exit_code == 1 and r.stderr.strip() == "error: give input files or --dataset, not both"
    r = runner.invoke(app, ["tokenize", str(paths["parquet"][0]), "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "no column 'text'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_shard_reader_resumes_exactly_and_ranks_read_disjoint_parts(tmp_path):
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 500, n).astype(np.uint16) for n in (700, 130, 1000)]  # 1830 tokens
    straight = ShardReader(shards, 4, 16)
    want = [straight.next_batch() for _ in range(70)]  # 70 * 64 tokens: several epochs
    assert straight.epoch >= 2
    first = ShardReader(shards, 4, 16)
    got = [first.next_batch() for _ in range(31)]
    torch.save({"loop": first.state()}, tmp_path / "s.pt")
    second = ShardReader(shards, 4, 16)
    second.load_state(torch.load(tmp_path / "s.pt", weights_only=True)["loop"])
    got += [second.next_batch() for _ in range(39)]
    for (x, y), (x2, y2) in zip(want, got):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # sequential: a batch is a contiguous window, y is x shifted by one
    stream = np.concatenate(shards).astype(np.int64)
    x, y = want[0]
    assert torch.equal(x.flatten(), torch.from_numpy(stream[:64])) and torch.equal(y.flatten(), torch.from_numpy(stream[1:65]))
    # two ranks with B rows each read what one process reads in two consecutive micro-steps
    r0, r1, one = ShardReader(shards, 4, 16, 0, 2), ShardReader(shards, 4, 16, 1, 2), ShardReader(shards, 4, 16)
    for _ in range(5):
        a, b, c, d = r0.next_batch(), r1.next_batch(), one.next_batch(), one.next_batch()
        assert torch.equal(a[0], c[0]) and torch.equal(b[0], d[0]) and torch.equal(b[1], d[1])
    assert r0.state() == r1.state() == one.state()


def test_shuffled_windows_visit_each_window_at_most_once_an_epoch_and_resume_exactly(tmp_path):
    T, B = 16, 4
    data = np.arange(1000, dtype=np.uint16)  # a token is its position: x[:, 0] is the window's start
    sampler = ShuffledWindows(data, B, T, seed=0)
    epochs, starts = [], []
    for _ in range(100):
        if sampler.pos + B > len(sampler.rows):  # the next batch opens a new epoch
            epochs.append(starts)
            starts = []
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (B, T) and torch.equal(y, x + 1)  # windows of consecutive tokens
        assert torch.equal(x[:, 1:], x[:, :1] + torch.arange(1, T))
        starts += x[:, 0].tolist()
    assert len(epochs) >= 3
    for seen in epochs:
        offset = min(seen) % T  # window 0 may be among the few an epoch leaves over
        n = (999 - offset) // T  # whole windows (T + 1 tokens) from the offset: 62 or 61
        assert len(seen) == n // B * B and len(set(seen)) == len(seen)  # none twice in an epoch
        assert set(seen) <= {offset + k * T for k in range(n)}
    assert len({min(seen) for seen in epochs}) > 1  # the offset moves from epoch to epoch
    # resume: the state mid-epoch, saved as a checkpoint does, continues with the same batches
    straight = ShuffledWindows(data, B, T, seed=3)
    want = [straight.next_batch() for _ in range(40)]
    first = ShuffledWindows(data, B, T, seed=3)
    got = [first.next_batch() for _ in range(17)]
    torch.save({"loop": first.state()}, tmp_path / "s.pt")
    second = ShuffledWindows(data, B, T, seed=99)
    second.load_state(torch.load(tmp_path / "s.pt", weights_only=True)["loop"])
    got += [second.next_batch() for _ in range(23)]
    for (x, y), (x2, y2) in zip(want, got):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # two ranks with B rows each read the two halves of what one process with 2B rows reads
    r0, r1, one = (ShuffledWindows(data, B, T, 5, 0, 2), ShuffledWindows(data, B, T, 5, 1, 2),
                   ShuffledWindows(data, 2 * B, T, 5))
    for _ in range(20):
        assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), one.next_batch()[0])
    small = np.arange(60, dtype=np.uint16)  # 2 or 3 windows, fewer than the 2B a step of both ranks takes
    r0, r1, one = (ShuffledWindows(small, B, T, 5, 0, 2), ShuffledWindows(small, B, T, 5, 1, 2),
                   ShuffledWindows(small, 2 * B, T, 5))
    for _ in range(5):
        assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), one.next_batch()[0])
    # a split of fewer windows than a batch repeats them
    x, _ = ShuffledWindows(np.arange(40, dtype=np.uint16), B, T, 0).next_batch()
    starts = x[:, 0].tolist()
    assert x.shape == (B, T) and len(set(starts)) <= 2 < B and len({i % T for i in starts}) == 1
    # a checkpoint of another sampler: one clear line, not a KeyError
    for loop, says in (({"data_pos": {"shard": 0, "offset": 0, "epoch": 0}}, "data.order=sequential"),
                       ({"rng_data": torch.Generator().get_state()}, "0.1.0")):
        with pytest.raises(UserError, match=says):
            ShuffledWindows(data, B, T, 0).load_state(loop)


@pytest.mark.parametrize("order", ["shuffled", "sequential"])
def test_training_on_shards_resumes_with_exactly_the_batches_it_would_have_read(tmp_path, docs, monkeypatch, order):
    paths = write_sources(tmp_path, docs)
    small_val = {**OPTS, "val_tokens": 300}  # the final full validation pass stays short
    tokenize_source(Source(find_files(paths["parquet"]), text_column="body"), tmp_path / "d", **small_val)
    seen: list = []
    sampler = ShuffledWindows if order == "shuffled" else ShardReader
    real = sampler.next_batch

    def recording(self):
        x, y = real(self)
        seen.append(x.clone())
        return x, y
    monkeypatch.setattr(sampler, "next_batch", recording)
    cfg = tiny_train_cfg(tmp_path / "d", "moe", max_steps=8, eval_interval=4, batch_size=4, grad_accum=2)
    cfg.data.order = order
    cfg.model.bias_update_rate = 0.01
    losses_a: list = []
    train(cfg, tmp_path / "a", on_event=lambda k, i: losses_a.append(i["loss"]) if k == "step" else None)
    straight, seen[:] = list(seen), []

    losses_b: list = []

    def stop_at_3(kind, info):
        if kind == "step":
            losses_b.append(info["loss"])
            return info["step"] == 3
    assert train(cfg, tmp_path / "b", on_event=stop_at_3).stopped == "interrupted"
    loop = load_checkpoint(tmp_path / "b" / "last.pt")["loop"]
    if order == "sequential":
        assert loop["data_pos"] == {"shard": 0, "offset": 3 * 2 * 4 * 32, "epoch": 0}  # no RNG for data
    else:
        assert (loop["epoch_group"], loop["epoch_pos"]) == (0, 3 * 2 * 4) and "data_pos" not in loop
    train(cfg, tmp_path / "b", resume=True, on_event=lambda k, i: losses_b.append(i["loss"]) if k == "step" else None)
    assert len(seen) == len(straight) == 16
    assert all(torch.equal(a, b) for a, b in zip(straight, seen))
    assert losses_a == losses_b


def test_plan_split_scales_with_the_corpus():
    n = 50
    # the whole corpus read: 10% of its tokens in whole documents, the rest in four shards
    assert plan_split([n] * 40, None, True) == (4 * n, 9 * n)
    # whole documents until 10% (101 of 1,010) is reached, the one crossing it included
    assert plan_split([30, 30, 50] + [100] * 9, None, True) == (110, 225)
    # a document longer than twice the split (three books) is cut at 10%, as one text file is
    assert plan_split([5000, 5000, 5000], None, True) == (1500, 3375)
    # documents are held (to be shuffled and sampled) until the source ends or HOLD_TOKENS
    # (100M) are held, whatever share of a source of known size that is; then the caps apply
    assert plan_split([n] * 2, 0.05, False) is None
    assert plan_split([0] * 9, 0.5, False) is None
    assert plan_split([n] * 4, 0.1, False) is None
    assert plan_split([n] * 40, None, False) is None
    assert plan_split([10**6] * 99, None, False) is None
    assert plan_split([10**6] * 100, None, False) == (10**7, 22_500_000)
    assert plan_split([10**6] * 100, 0.1, False) == (10**7, 10**8)  # a billion tokens: both caps
    # given sizes win (once the documents are in); --max-tokens is the total
    assert plan_split([n] * 2, None, False, val_tokens=2500, shard_tokens=4000) is None
    assert plan_split([n] * 2, None, True, val_tokens=2500, shard_tokens=4000) == (2500, 4000)
    assert plan_split([n] * 40, None, True, val_tokens=7) == (7, 499)
    assert plan_split([n] * 40, None, True, shard_tokens=123) == (4 * n, 123)
    assert plan_split([n] * 40, None, False, max_tokens=1000) == (2 * n, 225)


SMALL = dict(vocab_size=300, tokenizer_sample_bytes=30000)


def test_default_split_is_the_first_tenth_in_whole_documents_for_every_source(tmp_path, corpus_text):
    doc = corpus_text[:700]
    paths = write_sources(tmp_path, [doc] * 40)
    metas = {k: tokenize_source(Source(find_files(v), text_column="body" if k == "parquet" else "text"),
                                tmp_path / "out" / k, **SMALL) for k, v in paths.items()}
    metas["stream"] = tokenize_source(Source(dataset=str(tmp_path / "ds")), tmp_path / "out" / "stream", **SMALL)
    d = TokenData.open(tmp_path / "out" / "txt")
    n = 1 + len(d.tokenizer().encode(doc).ids)  # <|endoftext|> + the document
    for k, meta in metas.items():
        assert (meta["val_tokens"], meta["val_documents"], meta["documents"]) == (4 * n, 4, 40), k
        assert [s["tokens"] for s in meta["shards"]] == [4 * n] + [9 * n] * 4, k
        assert not meta["val_cut"] and meta["shard_tokens"] == 9 * n
    eot = d.tokenizer().token_to_id(EOT)
    assert d.val[0] == eot and d.train_shards[0][0] == eot  # both splits start at a document


def test_a_large_source_is_split_after_holding_hold_tokens_not_all_of_it(tmp_path, corpus_text, monkeypatch):
    doc = corpus_text[:500]
    root = tmp_path / "ds"
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for _ in range(100)))
    monkeypatch.setattr(encode_mod, "BATCH_CHARS", 7 * len(doc))  # 7 documents a batch
    tokenize_source(Source(find_files([root])), tmp_path / "all", seed=1, **SMALL)  # all held at once
    n = 1 + len(TokenData.open(tmp_path / "all").tokenizer().encode(doc).ids)
    monkeypatch.setattr(shards_mod, "HOLD_TOKENS", 12 * n)  # memory holds 12 documents, not 100
    events: list = []
    meta = tokenize_source(Source(find_files([root])), tmp_path / "out", progress=events.append, seed=1, **SMALL)
    # decided after 14 documents (the first batch past 12): 100 estimated, 10 for validation
    assert (meta["val_tokens"], meta["val_documents"], meta["shard_tokens"]) == (10 * n, 10, -(-90 * n // 4))
    assert meta["train_tokens"] == 90 * n
    first_shard = next(i for i, e in enumerate(events) if e["phase"] == "shard")
    assert [e["documents"] for e in events[:first_shard] if e["phase"] == "encode"] == [7]
    after = next(e for e in events[first_shard:] if e["phase"] == "encode")  # the validation shard was
    assert after["documents"] == 14 and after["fraction"] == pytest.approx(0.14)  # written with 14 of 100 read


def test_a_killed_tokenize_with_default_sizes_resumes_to_identical_files(tmp_path, docs, monkeypatch):
    monkeypatch.setattr(encode_mod, "BATCH_CHARS", 5000)  # the split is decided after a few batches
    src = Source(find_files(write_sources(tmp_path, docs)["jsonl"]))
    ref = tokenize_source(src, tmp_path / "ref", **SMALL)
    assert len(ref["shards"]) in (5, 6) and ref["val_documents"] < ref["documents"]  # 4 estimated
    assert 0.1 <= ref["val_tokens"] / (ref["val_tokens"] + ref["train_tokens"]) < 0.15

    class Killed(Exception):
        pass

    def kill_at(phase, count):
        seen = []

        def hook(info):
            seen.append(info["phase"])
            if seen.count(phase) == count:
                raise Killed
        return hook
    for phase, count in (("encode", 1), ("shard", 3)):  # before the split is decided, then after
        out = tmp_path / f"out-{phase}"
        with pytest.raises(Killed):
            tokenize_source(src, out, progress=kill_at(phase, count), **SMALL)
        assert not (out / "meta.json").exists()
        assert len(json.loads((out / "progress.json").read_text())["shards"]) == (0 if phase == "encode" else 3)
        tokenize_source(src, out, workers=2, **SMALL)
        assert digest(out) == digest(tmp_path / "ref"), phase


def test_small_corpora_tokenize_and_train_with_no_flags(tmp_path, monkeypatch):
    import os

    from minideep_cli.data import bundled_corpus

    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # one encoding process: no pool to start
    text = bundled_corpus().read_text()[:200_000]
    paras = [p for p in text.split("\n\n") if p.strip()]
    pq.write_table(pa.table({"text": paras}), tmp_path / "docs.parquet")
    (tmp_path / "jsonl").mkdir()
    for k in range(3):
        with open(tmp_path / "jsonl" / f"part-{k}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": p}) + "\n" for p in paras[k::3])
    books = [tmp_path / f"book{k}.txt" for k in range(3)]
    for k, b in enumerate(books):
        b.write_text(text[k * 60_000 : (k + 1) * 60_000], encoding="utf-8")
    runner = CliRunner()
    tiny = ["-o", "model.n_layer=1", "-o", "model.n_embd=32", "-o", "model.block_size=32", "-o", "model.n_experts=4",
            "-o", "train.batch_size=4", "-o", "train.max_steps=20", "-o", "train.max_minutes=0",
            "-o", "train.eval_interval=20", "-o", "train.eval_iters=1", "-o", "train.sample_tokens=0"]
    for name, inputs in (("parquet", [tmp_path / "docs.parquet"]), ("jsonl", [tmp_path / "jsonl"]), ("txt", books)):
        out = tmp_path / "data" / name
        r = runner.invoke(app, ["tokenize", *map(str, inputs), "--out", str(out)])
        assert r.exit_code == 0, r.output
        meta = TokenData.open(out).meta
        docs = len(paras) if name != "txt" else 3
        assert meta["documents"] == docs and meta["vocab_size"] == 2048
        val_docs = f"{meta['val_documents']:,} document" + ("s" if meta["val_documents"] != 1 else "")
        assert f"validation: {val_docs}, {meta['val_tokens']:,} tokens" in r.stdout
        total = meta["val_tokens"] + meta["train_tokens"]
        assert total // 10 <= meta["val_tokens"] < (0.11 * total if name != "txt" else total // 10 + 1), name
        assert meta["val_cut"] == (name == "txt")  # three books: the first one is cut at 10%
        assert len(meta["shards"]) == 5
        r = runner.invoke(app, ["train", "--data", str(out), "--out", str(tmp_path / f"run-{name}"), *tiny])
        assert r.exit_code == 0, r.output
        assert (tmp_path / f"run-{name}" / "last.pt").is_file()


def test_a_corpus_too_small_to_split_gets_one_line_before_any_work(tmp_path):
    files = [tmp_path / f"{k}.txt" for k in range(3)]
    for f in files:
        f.write_text("a hundred bytes or so of text, " * 3)
    r = CliRunner().invoke(app, ["tokenize", *map(str, files), "--out", str(tmp_path / "d")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [
        f"error: {files[0]} and 2 more holds 279 bytes of text, too little to split into training and validation "
        "(at least 1,000)"]
    assert not (tmp_path / "d").exists()
