"""Issue 35 (part B): damaged or hostile metadata, unbounded inputs and settings, texts the
tokenizer cannot take. Every case is one line naming the file or setting, never a traceback;
the fuzz tests at the end mutate meta.json, config YAML and a checkpoint's config and loop state
and require a UserError (or success) every time."""

import copy
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from minideep_cli.errors import UserError
from minideep_cli.schema import NAT, MapOf, OneOf, check, json_text, read_yaml, repair_text

from test_cli import TINY, assert_clean_error, digest, invoke, trained  # noqa: F401


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(fn(value)))


# ---------------------------------------------------------------- the schema helper itself


def test_check_names_the_first_part_that_differs():
    spec = {"a": NAT, "b?": [OneOf("x", "y")], "c": MapOf(int)}
    assert check({"a": 3, "c": {"k": 1}, "extra": None}, spec, "f.json") == {"a": 3, "c": {"k": 1}, "extra": None}
    cases = [
        ([], "f.json is damaged: it should be a mapping, got a list"),
        ({"c": {}}, "f.json is damaged: a is missing"),
        ({"a": "3", "c": {}}, "f.json is damaged: a should be a non-negative integer, got the string '3'"),
        ({"a": True, "c": {}}, "a should be a non-negative integer, got true"),  # a bool is no integer
        ({"a": -1, "c": {}}, "a should be a non-negative integer, got -1"),
        ({"a": 1, "b": ["x", "z"], "c": {}}, "b[1] should be one of 'x', 'y', got the string 'z'"),
        ({"a": 1, "c": {"k": 1.5}}, "c.k should be an integer, got 1.5"),
    ]
    for value, message in cases:
        with pytest.raises(UserError) as e:
            check(value, spec, "f.json")
        assert message in str(e.value)


def test_json_out_never_holds_non_finite_numbers():
    text = json_text({"loss": float("inf"), "xs": [float("nan"), 1.5, np.float32("-inf")], "n": 3})
    assert json.loads(text) == {"loss": None, "xs": [None, 1.5, None], "n": 3}
    assert "Infinity" not in text and "NaN" not in text


def test_repair_text_replaces_each_lone_surrogate_and_keeps_valid_text():
    assert repair_text("a\ud800b\udfffc") == "a\ufffdb\ufffdc"
    assert repair_text("Héllo 🎉") == "Héllo 🎉"


# ---------------------------------------------------------------- 4. data dirs: meta.json and progress.json


META_BREAKS = [
    lambda m: [m],  # a list
    lambda m: {**m, "train_tokens": "38552"},
    lambda m: {**m, "dtype": "float99"},  # an unknown dtype name: TypeError in numpy before
    lambda m: {**m, "vocab_size": None},
    lambda m: {k: v for k, v in m.items() if k != "val_tokens"},
]


@pytest.mark.parametrize("i", range(len(META_BREAKS)))
def test_meta_json_of_the_wrong_shape_is_one_line_in_train_eval_and_tokenize(trained, tmp_path, i):
    root, _ = trained
    data = _copy(root / "data", tmp_path / "data")
    _edit_json(data / "meta.json", META_BREAKS[i])
    before = digest(data)
    assert_clean_error(invoke("train", "--preset", "cpu", "--data", data, "--out", tmp_path / "run", *TINY),
                       "meta.json", "damaged")
    assert_clean_error(invoke("eval", root / "run", "--data", data), "meta.json", "damaged")
    assert_clean_error(invoke("tokenize", root / "in.txt", "--vocab-size", 300, "--out", data), "meta.json",
                       "damaged", "--force")
    assert digest(data) == before and not (tmp_path / "run").exists()
    r = invoke("tokenize", root / "in.txt", "--vocab-size", 300, "--out", data, "--force")  # replaces it
    assert r.exit_code == 0, r.output
    assert json.loads((data / "meta.json").read_text())["train_tokens"] > 0


def _sharded(tmp_path: Path, text: str) -> tuple[Path, Path]:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text[i : i + 3000]}) + "\n" for i in range(0, 60000, 3000)))
    return docs, tmp_path / "shards"


@pytest.mark.parametrize("progress", [[1, 2], {"settings": {}, "shards": "none", "records": 0, "skip_tokens": 0,
                                               "documents": 0}])
def test_progress_json_of_the_wrong_shape_is_one_line_and_force_starts_over(tmp_path, corpus_text, progress):
    docs, out = _sharded(tmp_path, corpus_text)
    out.mkdir()
    (out / "progress.json").write_text(json.dumps(progress))
    args = ("tokenize", docs, "--vocab-size", 300, "--val-tokens", 2000, "--out", out)
    assert_clean_error(invoke(*args), "progress.json", "--force")  # damaged, or not ours: nothing deleted either way
    r = invoke(*args, "--force")
    assert r.exit_code == 0, r.output
    assert (out / "meta.json").is_file() and not (out / "progress.json").exists()


def test_sharded_meta_with_a_path_for_a_shard_name_is_refused(tmp_path, corpus_text):
    docs, out = _sharded(tmp_path, corpus_text)
    assert invoke("tokenize", docs, "--vocab-size", 300, "--val-tokens", 2000, "--out", out).exit_code == 0
    _edit_json(out / "meta.json", lambda m: {**m, "shards": [{**m["shards"][0], "file": "../../etc/passwd"},
                                                               *m["shards"][1:]]})
    from minideep_cli.data import TokenData

    with pytest.raises(UserError, match=r"meta\.json is damaged: shards\[0\]\.file should be a shard name"):
        TokenData.open(out)


# ---------------------------------------------------------------- 5. token ids beyond the vocabulary


@pytest.mark.parametrize("name", ["val.bin", "train.bin"])
def test_a_token_id_beyond_the_vocabulary_names_the_file(trained, tmp_path, name):
    root, _ = trained
    data = _copy(root / "data", tmp_path / "data")
    ids = np.memmap(data / name, dtype=np.uint16, mode="r+")
    ids[1234] = 300  # the vocabulary is 300 ids: 0..299
    ids.flush()
    del ids
    r = invoke("train", "--preset", "cpu", "--data", data, "--out", tmp_path / "run", *TINY)
    assert_clean_error(r, f"{name} holds token id 300 at token 1,234", "vocabulary of 300")
    if name == "val.bin":
        assert_clean_error(invoke("eval", root / "run", "--data", data), "val.bin holds token id 300")


def test_token_ids_are_checked_in_every_shard(tmp_path, corpus_text):
    from minideep_cli.data import TokenData, make_sampler

    docs, out = _sharded(tmp_path, corpus_text)
    assert invoke("tokenize", docs, "--vocab-size", 300, "--val-tokens", 2000, "--shard-tokens", 5000,
                  "--out", out).exit_code == 0
    last = sorted(out.glob("train_*.bin"))[-1]
    ids = np.memmap(last, dtype=np.uint16, mode="r+")
    ids[-1] = 65535
    ids.flush()
    del ids
    data = TokenData.open(out)  # validation is fine; the train shards are checked for a sampler
    with pytest.raises(UserError, match=rf"{last.name} holds token id 65,535"):
        make_sampler(data, 2, 16, 0)


def test_meta_vocab_larger_than_the_tokenizer_is_refused(trained, tmp_path):
    root, _ = trained
    data = _copy(root / "data", tmp_path / "data")
    _edit_json(data / "meta.json", lambda m: {**m, "vocab_size": 50000})
    assert_clean_error(invoke("eval", root / "run", "--data", data), "meta.json says 50,000 ids",
                       "tokenizer.json holds 300")


# ---------------------------------------------------------------- 6. checkpoints and exports


def _tweak(trained, tmp_path, fn, name="last.pt") -> Path:
    from minideep_cli.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained[0] / "run" / "last.pt")
    fn(state)
    for k in ("kind", "format"):
        state.pop(k, None)
    return save_checkpoint(state, tmp_path / "run" / name)


def _pop(d, key):
    d.pop(key)


CHECKPOINT_BREAKS = {
    "rng_cpu": lambda s: _pop(s["loop"], "rng_cpu"),
    "loop.step": lambda s: s["loop"].update(step="185"),
    "optimizer": lambda s: s.update(optimizer=None),
    "loop.rng_epoch": lambda s: s["loop"].update(rng_epoch=torch.zeros(7, dtype=torch.uint8)),
    "train.dtype": lambda s: s["config"]["train"].update(dtype="float99"),
    "model": lambda s: s["config"].update(model=[1, 2]),
    "loop.elapsed": lambda s: s["loop"].update(elapsed=float("nan")),
}


@pytest.mark.parametrize("what", sorted(CHECKPOINT_BREAKS))
def test_checkpoint_parts_of_the_wrong_shape_are_one_line_naming_the_file(trained, tmp_path, what):
    path = _tweak(trained, tmp_path, CHECKPOINT_BREAKS[what])
    shutil.copy(trained[0] / "run" / "config.yaml", tmp_path / "run")
    before = digest(tmp_path / "run")
    r = invoke("train", "--resume", "--out", tmp_path / "run", "--data", trained[0] / "data")
    assert_clean_error(r, str(path), what.split(".")[-1])
    assert digest(tmp_path / "run") == before
    if what not in ("rng_cpu", "optimizer"):  # what --resume alone reads: eval does not need it
        assert_clean_error(invoke("eval", path, "--data", trained[0] / "data"), str(path), "damaged")


def _export(trained, tmp_path) -> Path:
    out = tmp_path / "exp"
    r = invoke("export", trained[0] / "run", out, "--format", "safetensors")
    assert r.exit_code == 0, r.output
    return out


EXPORT_BREAKS = {
    "aliases": lambda m: m.update(aliases=["a"]),  # a list where a mapping belongs
    "loop": lambda m: m.update(loop=[1]),
    "data": lambda m: m.update(data="x"),
    "model": lambda m: m["config"].update(model=None or []),
    "dtype": lambda m: m["config"]["train"].update(dtype="int3"),
    "weights_sha256": lambda m: m.update(weights_sha256=5),
}


@pytest.mark.parametrize("what", sorted(EXPORT_BREAKS))
def test_export_config_of_the_wrong_shape_is_one_line(trained, tmp_path, what):
    out = _export(trained, tmp_path)
    _edit_json(out / "minideep_config.json", lambda m: (EXPORT_BREAKS[what](m), m)[1])
    assert_clean_error(invoke("eval", out, "--data", trained[0] / "data"), what)


# ---------------------------------------------------------------- 7c. damaged exports, JSON out


def test_a_damaged_export_is_refused_by_its_checksum_and_an_old_one_by_its_numbers(trained, tmp_path):
    out = _export(trained, tmp_path)
    assert "weights_sha256" in json.loads((out / "minideep_config.json").read_text())
    raw = bytearray((out / "model.safetensors").read_bytes())
    raw[-3] ^= 0x7F  # a weight's exponent bits: a huge or non-finite number, the file still parses
    (out / "model.safetensors").write_bytes(raw)
    assert_clean_error(invoke("eval", out, "--data", trained[0] / "data"), "model.safetensors", "checksum")
    _edit_json(out / "minideep_config.json", lambda m: {k: v for k, v in m.items() if k != "weights_sha256"})
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("inf")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    assert_clean_error(invoke("eval", out, "--data", trained[0] / "data"), name, "not finite")


def test_eval_json_is_strict_json(trained, monkeypatch):
    import minideep_cli.inference as inference

    real = inference.evaluate_tokens

    def worst(*a, **k):
        return {**real(*a, **k), "loss": float("inf"), "perplexity": float("inf"), "bpb": float("nan")}

    monkeypatch.setattr(inference, "evaluate_tokens", worst)
    r = invoke("eval", trained[0] / "run", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert res["loss"] is None and res["perplexity"] is None and res["bpb"] is None and res["tokens"] > 0


# ---------------------------------------------------------------- 7. YAML


@pytest.mark.parametrize("value, words", [("[1, 2]", "a list"), ("{a: 1}", "a mapping"), ("2020-01-01", "a date")])
def test_yaml_containers_where_a_number_belongs_are_refused_by_name(tmp_path, value, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train:\n  lr: {value}\n")
    assert_clean_error(invoke("train", "--config", cfg, "--out", tmp_path / "run"), "train.lr", words)


def test_yaml_alias_bomb_is_refused_before_it_is_built(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\ntrain:\n  lr: *i\n")
    assert_clean_error(invoke("train", "--config", tmp_path / "bomb.yaml"), "bomb.yaml", "10,000 values")
    (tmp_path / "ok.yaml").write_text("base: &b {lr: 0.002}\ntrain: *b\n")  # a small alias is fine
    assert read_yaml(tmp_path / "ok.yaml", "config")["train"] == {"lr": 0.002}


def test_yaml_too_large_or_too_deep_is_one_line(tmp_path):
    (tmp_path / "big.yaml").write_text("# " + "x" * (1 << 20) + "\n")
    assert_clean_error(invoke("train", "--config", tmp_path / "big.yaml"), "big.yaml", "1,048,576")
    (tmp_path / "deep.yaml").write_text("train: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert_clean_error(invoke("train", "--config", tmp_path / "deep.yaml"), "deep.yaml")


# ---------------------------------------------------------------- 7b. resume on other data


def _retokenized(data: Path, text: str, out: Path) -> Path:
    """data's tokenizer on other text: a data dir as `tokenize` with that tokenizer writes it."""
    from minideep_cli.data import split_text
    from minideep_cli.tokenizer import load_tokenizer

    shutil.copytree(data, out)
    tok = load_tokenizer((data / "tokenizer.json").read_text())
    meta = json.loads((data / "meta.json").read_text())
    for split, part in zip(("train", "val"), split_text(text, 0.1)):
        ids = np.asarray(tok.encode(part).ids, dtype=np.uint16)
        ids.tofile(out / f"{split}.bin")
        meta.update({f"{split}_tokens": len(ids), f"{split}_bytes": len(part.encode())})
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_resume_refuses_data_tokenized_again_from_other_text_unless_new_data(trained, tmp_path):
    root, _ = trained
    run = _copy(root / "run", tmp_path / "run")
    other = _retokenized(root / "data", (root / "in.txt").read_text()[:30000], tmp_path / "other")
    before = digest(run)
    r = invoke("train", "--resume", "--out", run, "--data", other, "-o", "train.max_steps=9")
    assert_clean_error(r, "not the data", "--new-data")
    assert digest(run) == before
    r = invoke("train", "--resume", "--out", run, "--data", other, "--new-data", "-o", "train.max_steps=9")
    assert r.exit_code == 0, r.output
    from minideep_cli.checkpoint import load_checkpoint
    from minideep_cli.data import TokenData
    from minideep_cli.data.integrity import fingerprint

    last = load_checkpoint(run / "last.pt")
    assert last["loop"]["step"] == 9 and last["data_fingerprint"] == fingerprint(TokenData.open(other))
    assert load_checkpoint(run / "best.pt")["loop"]["step"] == 9  # best starts over on the new data


def test_resume_of_a_checkpoint_without_a_fingerprint_still_works(trained, tmp_path):
    from minideep_cli.checkpoint import load_checkpoint, save_checkpoint

    root, _ = trained
    run = _copy(root / "run", tmp_path / "run")
    state = load_checkpoint(run / "last.pt")
    state.pop("data_fingerprint")
    save_checkpoint({k: v for k, v in state.items() if k not in ("kind", "format")}, run / "last.pt")
    r = invoke("train", "--resume", "--out", run, "--data", root / "data", "-o", "train.max_steps=7")
    assert r.exit_code == 0, r.output


def test_new_data_needs_resume(tmp_path):
    assert_clean_error(invoke("train", "--new-data", "--out", tmp_path / "r"), "--new-data", "--resume")


# ---------------------------------------------------------------- 7d. overrides kept exact


def test_override_integers_stay_exact_and_strings_keep_their_spaces():
    from minideep_cli.config import resolve_config

    cfg = resolve_config(None, None, ["train.seed=9007199254740993", "sample.prompt=  ROMEO:  ",
                                      "train.max_steps= 1_000 ", "train.eval_interval=1e3"])
    assert cfg.train.seed == 9007199254740993 and cfg.sample.prompt == "  ROMEO:  "
    assert cfg.train.max_steps == 1000 and cfg.train.eval_interval == 1000
    with pytest.raises(UserError, match=r"train\.seed must be an integer, got the string '1\.5'"):
        resolve_config(None, None, ["train.seed=1.5"])


# ---------------------------------------------------------------- 8. what is not a regular file


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_devices_and_fifos_are_refused_without_reading(trained, tmp_path, fifo):
    root, _ = trained
    for special in ("/dev/zero", "/dev/urandom", fifo):
        assert_clean_error(invoke("eval", root / "run", "--text", special), str(special), "not a regular file")
        assert_clean_error(invoke("inspect-routing", root / "run", "--text", special), "not a regular file")
        assert_clean_error(invoke("tokenize", special, "--out", tmp_path / "d"), "not a regular file")
        assert_clean_error(invoke("tokenize", root / "in.txt", special, "--out", tmp_path / "d"), "not a regular file")
        assert_clean_error(invoke("train", "--config", special, "--out", tmp_path / "r"), "not a regular file")
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()


def test_eval_text_beyond_the_limit_is_refused(trained, tmp_path, monkeypatch):
    import minideep_cli.inference as inference

    monkeypatch.setattr(inference, "TEXT_LIMIT", 1000)
    big = tmp_path / "big.txt"
    big.write_text("x" * 1001)
    assert_clean_error(invoke("eval", trained[0] / "run", "--text", big), "1,001 bytes", "1,000")


# ---------------------------------------------------------------- 9. bounds


@pytest.mark.parametrize("args, needle", [
    (("sample", "RUN", "--max-new-tokens", 10**12), "--max-new-tokens"),
    (("sample", "RUN", "--num-samples", 10**9), "--num-samples"),
    (("train", "-o", f"train.eval_iters={10**12}"), "train.eval_iters"),
    (("train", "-o", f"train.sample_tokens={10**12}"), "train.sample_tokens"),
    (("bench", "--estimate-memory", "-o", f"model.n_layer={10**9}"), "model.n_layer"),
    (("bench", "--estimate-memory", "-o", f"model.n_embd={10**7}"), "model.n_embd"),
    (("bench", "--threads", 1000000), "--threads"),
    (("tokenize", "IN", "--vocab-size", 2**64), "--vocab-size"),
    (("tokenize", "IN", "--workers", 10**6), "--workers"),
    (("tokenize", "IN", "--shard-tokens", 10**12), "--shard-tokens"),
    (("tokenize", "IN", "--tokenizer-sample-bytes", 10**15), "--tokenizer-sample-bytes"),
    (("train", "-o", f"data.vocab_size={2**40}"), "data.vocab_size"),
])
def test_settings_beyond_what_the_machine_can_do_are_refused_by_name(trained, tmp_path, args, needle):
    root, _ = trained
    args = [{"RUN": root / "run", "IN": root / "in.txt"}.get(a, a) for a in args]
    r = invoke(*args, *(["--out", tmp_path / "out"] if args[0] in ("train", "tokenize") else []))
    assert_clean_error(r, needle)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 10. text into the tokenizer


def test_invalid_prompt_bytes_are_one_line_in_inspect_routing(trained):
    assert_clean_error(invoke("inspect-routing", trained[0] / "run", "--prompt", "\udcffabc"), "--prompt",
                       "not valid UTF-8")


def test_jsonl_with_lone_surrogates_is_tokenized_with_replacement_characters(tmp_path, corpus_text):
    docs = tmp_path / "docs.jsonl"
    rows = [{"text": corpus_text[i : i + 3000]} for i in range(0, 60000, 3000)]
    rows[-1]["text"] += " cut emoji \ud83d and \udc00 end"  # after the tokenizer's sample (the first bytes)
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json escapes them as \\ud83d
    r = invoke("tokenize", docs, "--vocab-size", 300, "--val-tokens", 2000, "--tokenizer-sample-bytes", 5000,
               "--out", tmp_path / "d")
    assert r.exit_code == 0, r.output
    from minideep_cli.data import TokenData

    d = TokenData.open(tmp_path / "d")
    tok = d.tokenizer()
    text = tok.decode(np.concatenate([d.val, *d.train_shards]).tolist())  # documents in a shuffled order
    assert " cut emoji \ufffd and \ufffd end" in text


def test_a_dataset_column_that_is_not_text_is_one_line():
    from minideep_cli.data.encode import encode_documents
    from minideep_cli.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello world"], 300)
    with pytest.raises(UserError, match="a document is a list, not text"):
        encode_documents(tok, ["ok", [1, 2]], 0, np.dtype(np.uint16))


# ---------------------------------------------------------------- fuzz: no traceback, ever


def _mutate(value, rng: random.Random, depth: int = 0):
    """One random structural change somewhere in value (a JSON-like tree)."""
    odd = [None, [], {}, "x", "", -1, 0, 2**70, 1.5, float("inf"), float("nan"), True, [1, 2], {"a": 1},
           "float99", "\ud800", 10**9]
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value, key=str))
        out = dict(value)
        choice = rng.random()
        if choice < 0.15:
            out.pop(key)
        elif choice < 0.6 and isinstance(value[key], (dict, list)) and depth < 4:
            out[key] = _mutate(value[key], rng, depth + 1)
        else:
            out[key] = rng.choice(odd)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = _mutate(out[i], rng, depth + 1) if rng.random() < 0.5 else rng.choice(odd)
        return out
    return rng.choice(odd)


def _clean(fn, *args):
    """fn(*args) either works or raises UserError (one line); anything else fails the test."""
    try:
        fn(*args)
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(e)


def test_fuzz_meta_json_never_gives_a_traceback(trained, tmp_path):
    from minideep_cli.data import TokenData, make_sampler
    from minideep_cli.data.prepare import check_data_out_dir

    root, _ = trained
    data = _copy(root / "data", tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    rng = random.Random(35)
    for _ in range(150):
        (data / "meta.json").write_text(json.dumps(_mutate(meta, rng)))

        def open_and_sample():
            make_sampler(TokenData.open(data), 2, 16, 0)

        _clean(open_and_sample)
        _clean(check_data_out_dir, data, lambda m: False, False)


def test_fuzz_config_yaml_never_gives_a_traceback(tmp_path):
    import yaml

    from minideep_cli.config import Config, resolve_config

    base = Config().to_dict()
    rng = random.Random(36)
    path = tmp_path / "c.yaml"
    for _ in range(200):
        path.write_text(yaml.safe_dump(_mutate(base, rng), allow_unicode=True))
        _clean(resolve_config, None, str(path), [], None)


def test_fuzz_checkpoint_config_and_loop_never_give_a_traceback(trained, tmp_path):
    """The engine-level loaders directly (no subprocess per mutation): load, rebuild the model,
    and what --resume checks."""
    from minideep_cli.checkpoint import check_resumable, complete, model_from_checkpoint
    from minideep_cli.checkpoint import load_checkpoint

    state = load_checkpoint(trained[0] / "run" / "last.pt")
    rng = random.Random(37)
    p = Path("fuzzed.pt")
    for i in range(200):
        fuzzed = copy.copy(state)
        part = "config" if i % 2 else "loop"
        fuzzed[part] = _mutate(state[part], rng)

        def load():
            model_from_checkpoint(complete(fuzzed, p), "cpu", p)
            check_resumable(fuzzed, p)

        _clean(load)


def test_fuzz_a_few_through_the_cli(trained, tmp_path):
    """A handful of mutated checkpoints and data dirs through the real commands: one line each."""
    from minideep_cli.checkpoint import load_checkpoint, save_checkpoint

    root, _ = trained
    state = load_checkpoint(root / "run" / "last.pt")
    rng = random.Random(38)
    for i in range(4):
        fuzzed = {k: v for k, v in state.items() if k not in ("kind", "format")}
        part = ("config", "loop")[i % 2]
        fuzzed[part] = _mutate(state[part], rng)
        run = tmp_path / f"run{i}"
        save_checkpoint(fuzzed, run / "last.pt")
        for r in (invoke("eval", run / "last.pt", "--data", root / "data"),
                  invoke("train", "--resume", "--out", run, "--data", root / "data", "-o", "train.max_steps=7")):
            assert "Traceback" not in r.output
            if r.exit_code:
                assert_clean_error(r)
    meta = json.loads((root / "data" / "meta.json").read_text())
    data = _copy(root / "data", tmp_path / "data")
    for _ in range(3):
        (data / "meta.json").write_text(json.dumps(_mutate(meta, rng)))
        r = invoke("eval", root / "run", "--data", data)
        assert "Traceback" not in r.output and (r.exit_code == 0 or assert_clean_error(r) is None)
