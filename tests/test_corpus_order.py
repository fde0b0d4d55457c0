"""A person's own corpus: a folder of mixed text files read by content, documents in a seeded
random order with a random validation sample, and training batches of shuffled windows over
every train shard (each window at most once an epoch, exact resume, disjoint ranks)."""

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from minideep_cli.cli import app
from minideep_cli.data import ShardReader, ShuffledWindows, TokenData, tokenize_corpus
from minideep_cli.data import encode as encode_mod
from minideep_cli.data import shards as shards_mod

LOREM = ("the quick brown fox jumps over the lazy dog while seven wizards quietly hex "
         "a jovial sphinx of black quartz; pack my box with five dozen liquor jugs. ")


def write_project(root, n=60):
    """A folder as people have one: code, markdown, files without an extension, a package.json,
    nested folders, plus what must be left out: a binary, a Latin-1 file, a hidden folder."""
    for i in range(n):
        sub = root / ("src" if i % 3 == 0 else "docs" if i % 3 == 1 else "misc/deep")
        sub.mkdir(parents=True, exist_ok=True)
        name = f"f{i:03d}" + (".py" if i % 3 == 0 else ".md" if i % 3 == 1 else "")
        (sub / name).write_text(f"document {i:03d}\n" + LOREM * (2 + i % 5), encoding="utf-8")
    (root / "package.json").write_text('{"name": "demo", "version": "1.0.0"}\n')
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)) * 4)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def doc_ids(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"document (\d{3})", text)]


def test_a_folder_of_mixed_text_files_tokenizes_with_no_flags_and_says_what_it_skipped(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # one encoding process
    root = write_project(tmp_path / "project")
    r = CliRunner().invoke(app, ["tokenize", str(root), "--out", str(tmp_path / "d"), "--vocab-size", "300"])
    assert r.exit_code == 0, r.output
    meta = TokenData.open(tmp_path / "d").meta
    assert meta["documents"] == 61  # 60 files and package.json, read as one text
    assert "skipped: 1 binary, 1 hidden files or folders, 1 not UTF-8" in r.stdout
    files = [f for f, _, _ in meta["settings"]["source"]["files"]]
    assert any(f.endswith("package.json") for f in files) and any(f.endswith("f002") for f in files)
    # --include narrows a folder to matching files at any depth, --exclude wins over it
    r = CliRunner().invoke(app, ["tokenize", str(root), "--out", str(tmp_path / "py"), "--vocab-size", "300",
                                 "--include", "*.py", "--include", "*.md", "--exclude", "docs/*"])
    assert r.exit_code == 0, r.output
    files = [f for f, _, _ in TokenData.open(tmp_path / "py").meta["settings"]["source"]["files"]]
    assert len(files) == 20 and all(f.endswith(".py") for f in files)
    assert "excluded by --include/--exclude" in r.stdout


def test_document_order_and_validation_sample_come_from_the_seed_not_the_paths(tmp_path):
    root = write_project(tmp_path / "project")

    def tokenize(out, **kw):
        meta = tokenize_corpus(tmp_path / out, [root], vocab_size=300, workers=1, **kw)
        d = TokenData.open(tmp_path / out)
        tok = d.tokenizer()
        val = doc_ids(tok.decode(d.val.tolist()))
        train = doc_ids(tok.decode(np.concatenate(d.train_shards).tolist()))
        return meta, val, train

    meta, val, train = tokenize("a", seed=5)
    assert sorted(val + train) == list(range(60)) and not set(val) & set(train)  # whole documents
    assert meta["settings"]["shuffle_seed"] == 5
    assert 4 <= len(val) <= 8 and max(val) >= 12  # about 10%, and not the first files in path order
    assert val + train != sorted(val + train)  # the stream is not in path order
    # the seed decides: the same seed gives the same files, byte for byte; another seed another order
    again = tokenize("b", seed=5)
    for f in ("val_000000.bin", "train_000000.bin", "train_000003.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert again[1:] == (val, train)
    _, val7, train7 = tokenize("c", seed=7)
    assert val7 != val and train7 != train
    # --no-shuffle keeps the order given: files sorted in their folders, validation the first
    _, val_plain, train_plain = tokenize("p", shuffle=False)
    folders = ([i for i in range(60) if i % 3 == r] for r in (1, 2, 0))  # docs/, misc/deep/, src/
    assert val_plain + train_plain == sum(folders, [])


def test_a_tokenize_killed_among_the_shuffled_documents_resumes_to_identical_files(tmp_path, monkeypatch):
    root = write_project(tmp_path / "project")
    monkeypatch.setattr(encode_mod, "BATCH_CHARS", 3000)
    ref = tokenize_corpus(tmp_path / "ref", [root], vocab_size=300, workers=1, seed=3, shard_tokens=700)

    class Killed(Exception):
        pass

    def kill_at_shard(n):
        seen = []

        def hook(kind, info):
            seen.append(info.get("phase"))
            if seen.count("shard") == n:
                raise Killed
        return hook
    with pytest.raises(Killed):
        tokenize_corpus(tmp_path / "out", [root], vocab_size=300, workers=1, seed=3, shard_tokens=700,
                        on_event=kill_at_shard(3))
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert len(progress["shards"]) == 3 and progress["records"] < progress["held"] == 61
    meta = tokenize_corpus(tmp_path / "out", [root], vocab_size=300, workers=1, seed=3, shard_tokens=700)
    assert meta == ref
    for f in sorted((tmp_path / "ref").iterdir()):
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes(), f.name


def document_shards(n_docs=40, doc_len=200, per_shard=7):
    """Shards of documents whose every token is the document's number (plus 1000 x its shard)."""
    docs = [np.full(doc_len + 13 * (i % 4), i, dtype=np.uint16) for i in range(n_docs)]
    return [np.concatenate(docs[k : k + per_shard]) for k in range(0, n_docs, per_shard)]


def test_the_rows_of_a_batch_come_from_all_over_the_corpus(tmp_path):
    shards = document_shards()
    B, T = 8, 16
    shuffled, in_order = ShuffledWindows(shards, B, T, seed=0), ShardReader(shards, B, T)
    for _ in range(20):
        x, _ = shuffled.next_batch()
        assert len(set(x[:, 0].tolist())) >= 6  # rows from (nearly) as many documents as rows
        x, _ = in_order.next_batch()
        assert len(set(x.flatten().tolist())) <= 2  # what reading the stream in order gives


def positions(sizes):
    """Shards whose tokens are their (shard, position) codes: shard k holds 10000 * k + i."""
    return [(10000 * k + np.arange(n)).astype(np.int64) for k, n in enumerate(sizes)]


@pytest.mark.parametrize("group_tokens", [10**9, 300])  # every shard in one group, and several groups
def test_every_window_of_every_shard_at_most_once_an_epoch(group_tokens, monkeypatch):
    shards, B, T = positions([330, 700, 45, 512, 260, 17]), 4, 16
    sampler = ShuffledWindows(shards, B, T, seed=1, group_tokens=group_tokens)
    epoch = [0]
    real = ShuffledWindows.new_epoch

    def counting(self):
        epoch[0] += 1
        real(self)
    monkeypatch.setattr(ShuffledWindows, "new_epoch", counting)
    seen: dict = {}
    for _ in range(400):
        x, y = sampler.next_batch()
        assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :1] + torch.arange(1, T))  # within a shard
        for start in x[:, 0].tolist():
            seen.setdefault(epoch[0], []).append(start)
    epochs = [v for k, v in sorted(seen.items())][:-1]  # whole epochs only
    assert len(epochs) >= 3
    for starts in epochs:
        assert len(starts) == len(set(starts))  # no window twice in an epoch
        by_shard: dict = {}
        for s in starts:
            by_shard.setdefault(s // 10000, []).append(s % 10000)
        for k, offs in by_shard.items():
            assert len({o % T for o in offs}) == 1  # one offset per shard and epoch
        windows = sum((n - 1) // T for n in (330, 700, 45, 512, 260, 17))
        assert len(starts) >= windows - len(sampler.groups) * (B + 1) - 6  # all but a few left over
        assert set(by_shard) >= {0, 1, 3, 4}  # every shard long enough is visited
    if group_tokens < 1000:
        assert len(sampler.groups) >= 3


def test_shuffled_windows_over_shards_resume_mid_group_and_split_across_ranks(tmp_path):
    shards, B, T = positions([330, 700, 45, 512, 260]), 4, 16
    make = lambda seed=2, b=B, rank=0, world=1: ShuffledWindows(shards, b, T, seed, rank, world, group_tokens=300)
    straight = make()
    want = [straight.next_batch() for _ in range(150)]
    first = make()
    got = [first.next_batch() for _ in range(35)]
    assert first.group > 0  # the checkpoint is taken past the first group of an epoch
    torch.save({"loop": first.state()}, tmp_path / "s.pt")
    second = make(seed=99)
    second.load_state(torch.load(tmp_path / "s.pt", weights_only=True)["loop"])
    got += [second.next_batch() for _ in range(115)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(want, got))
    r0, r1, one = make(rank=0, world=2), make(rank=1, world=2), make(b=2 * B)
    for _ in range(60):
        a, b = r0.next_batch()[0], r1.next_batch()[0]
        assert not set(a[:, 0].tolist()) & set(b[:, 0].tolist())  # disjoint rows
        assert torch.equal(torch.cat([a, b]), one.next_batch()[0])


def reference_single_file_batches(data, B, T, seed, steps):
    """The single-file sampler as minideep 0.1 shipped it (the 2026-12-06 epochs record):
    per epoch one offset in [0, T) and a permutation of the windows from it."""
    g = torch.Generator().manual_seed(seed)
    out, starts, pos = [], np.zeros(0, dtype=np.int64), 0
    for _ in range(steps):
        if pos + B > len(starts):
            offset = int(torch.randint(T, (1,), generator=g))
            offset = 0 if len(data) - 1 - offset < T else offset
            n = (len(data) - 1 - offset) // T
            starts = (offset + T * torch.cat([torch.randperm(n, generator=g) for _ in range(-(-B // n))])).numpy()
            pos = 0
        out.append(np.stack([data[i : i + T + 1] for i in starts[pos : pos + B]]))
        pos += B
    return out


def test_one_shard_reads_exactly_what_the_single_file_sampler_always_read():
    data = np.random.default_rng(0).integers(0, 300, 2000)
    B, T = 8, 32
    sampler = ShuffledWindows(data, B, T, seed=1337)
    for ref in reference_single_file_batches(data, B, T, 1337, 50):  # several epochs
        x, y = sampler.next_batch()
        assert np.array_equal(x.numpy(), ref[:, :-1]) and np.array_equal(y.numpy(), ref[:, 1:])


@pytest.mark.parametrize("arch", ["moe", "gpt2"])
def test_set_dropout_turns_every_rate_off_and_back_on(arch):
    from conftest import tiny_model_cfg

    from minideep_cli.models import build_model, set_dropout

    model = build_model(tiny_model_cfg(arch, dropout=0.3, attention_dropout=0.1)).train()
    x = torch.randint(0, 97, (2, 32))

    def logits(seed):
        torch.manual_seed(seed)
        return model(x).logits

    set_dropout(model, False)
    assert torch.equal(logits(1), logits(2))  # no mask drawn anywhere
    assert set(model.built_dropout.values()) == {0.3, 0.1} and len(model.built_dropout) >= 2 * 2 + 1
    set_dropout(model, True)
    assert not torch.equal(logits(1), logits(2))
    modules = dict(model.named_modules())
    assert all(getattr(modules[n], a) == r for (n, a), r in model.built_dropout.items())  # the built rates


def test_dropout_starts_once_the_training_split_is_read_and_resume_agrees(small_data, tmp_path, monkeypatch):
    from conftest import tiny_train_cfg

    from minideep_cli import train as train_mod
    from minideep_cli.train import train

    calls = []
    real = train_mod.set_dropout
    monkeypatch.setattr(train_mod, "set_dropout", lambda model, active: (calls.append(active), real(model, active)))
    train_tokens = TokenData.open(small_data).meta["train_tokens"]
    cfg = tiny_train_cfg(small_data, "moe", max_steps=6, dropout_after_epochs=2.5 * 8 * 32 / train_tokens)
    cfg.model.dropout = 0.2  # 2.5 steps' tokens: off for steps 1 to 3, on from step 4

    def on_event(kind, info):
        if kind == "step":
            return info["step"] == 1  # stop after step 1, with dropout still off
    assert train(cfg, tmp_path / "run", on_event=on_event).stopped == "interrupted"
    assert calls == [False]
    train(cfg, tmp_path / "run", resume=True)
    assert calls == [False, False, True]  # off again on resume (its tokens say so), then on
