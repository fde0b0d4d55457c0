"""`inspect-routing` and `sample --show-routing` end to end on tiny trained checkpoints."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import tiny_train_cfg
from typer.testing import CliRunner

from minideep_cli.checkpoint import load_checkpoint, model_from_checkpoint
from minideep_cli.cli import app
from minideep_cli.routing_report import read_history
from minideep_cli.tokenizer import load_tokenizer
from minideep_cli.train import train

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "160"})


def assert_clean_error(result, *needles):
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    """A tiny MoE run (3 layers, the middle one dense) and a tiny gpt2 run, a few steps each."""
    root = tmp_path_factory.mktemp("routing")
    cfg = tiny_train_cfg(small_data, "moe", max_steps=4, eval_interval=4)
    cfg.model.n_layer, cfg.model.moe_every, cfg.model.capacity_factor = 3, 2, 1.0  # MoE at blocks 0 and 2
    imbalance = []
    train(cfg, root / "moe", on_event=lambda k, i: imbalance.append(i["imbalance"]) if k == "step" else None)
    train(tiny_train_cfg(small_data, "gpt2", max_steps=2, eval_interval=2), root / "gpt2")
    return root, imbalance


def direct_routing(ckpt, ids):
    """Each MoE layer's expert ids (T, k) from plain forward passes over ids, window by window."""
    model, cfg = model_from_checkpoint(load_checkpoint(ckpt))
    T = cfg.model.block_size
    with torch.no_grad():
        outs = [model(torch.tensor([ids[i : i + T]])).aux for i in range(0, len(ids), T)]
    return outs[0]["moe_layers"], [np.concatenate([o["routing"][j]["expert_ids"].numpy() for o in outs])
                                   for j in range(len(outs[0]["routing"]))]


def test_inspect_routing_terminal_json_and_html(runs, tmp_path):
    root, _ = runs
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 3
    r = invoke("inspect-routing", root / "moe", "--prompt", text, "--layer", 2,
               "--json", tmp_path / "r.json", "--html", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    for needle in ["Per layer", "Layer 2: experts", "text coloured by top-1 expert at layer 2", "experts chosen together",
                   "Most common expert paths", "Consecutive tokens"]:
        assert needle in r.stdout, needle
    rep = json.loads((tmp_path / "r.json").read_text())
    tok = load_tokenizer(load_checkpoint(root / "moe" / "best.pt")["tokenizer"])
    ids = tok.encode(text).ids
    assert rep["source"]["tokens"] == len(ids) and rep["text"]["ids"] == ids and rep["text"]["layer"] == 2
    layers, routing = direct_routing(root / "moe" / "best.pt", ids)
    assert rep["model"]["moe_layers"] == layers == [0, 2]
    for lay, ex in zip(rep["layers"], routing):  # the numbers reported are the model's own routing
        assert lay["loads"] == np.bincount(ex.reshape(-1), minlength=4).tolist()
        assert [t[layers.index(lay["layer"])] for t in rep["text"]["experts"]] == ex.tolist()
    html = (tmp_path / "r.html").read_text()
    assert "Routing report" in html and "http://" not in html and "https://" not in html


def test_inspect_routing_defaults_to_the_validation_data(runs):
    root, _ = runs
    r = invoke("inspect-routing", root / "moe" / "last.pt", "--max-tokens", 300)
    assert r.exit_code == 0, r.output
    assert "(validation split), first 300 tokens: 300 tokens" in r.stdout.replace("\n", " ")


def test_inspect_routing_bad_input(runs, tmp_path):
    root, _ = runs
    assert_clean_error(invoke("inspect-routing", root / "moe", "--layer", 1), "not an MoE layer", "0, 2")
    assert_clean_error(invoke("inspect-routing", root / "moe", "--prompt", "a", "--text", tmp_path / "t.txt"), "not both")
    assert_clean_error(invoke("inspect-routing", root / "moe", "--text", tmp_path / "missing.txt"), "not found")
    assert_clean_error(invoke("inspect-routing", root / "moe", "--prompt", ""), "empty")
    assert_clean_error(invoke("inspect-routing", root / "moe", "--html", tmp_path / "no" / "r.html"), "does not exist")
    assert_clean_error(invoke("inspect-routing", root / "gpt2"), "dense gpt2", "no experts")
    assert_clean_error(invoke("inspect-routing", root / "gpt2", "--history"), "no routing scalars")
    assert_clean_error(invoke("inspect-routing", tmp_path, "--history"), "no TensorBoard log")
    assert not list(tmp_path.iterdir())


def test_history_reads_what_training_logged(runs, tmp_path):
    root, imbalance = runs
    h = read_history(root / "moe")
    assert [l.layer for l in h.layers] == [0, 2] and h.n_experts == 4
    assert all(l.steps == [1, 2, 3, 4] for l in h.layers)
    worst_per_step = [max(l.imbalance[i] for l in h.layers) for i in range(4)]
    assert worst_per_step == pytest.approx(imbalance, rel=1e-6)  # train's own worst-layer figure
    assert all(0 < e <= 1 for l in h.layers for e in l.router_entropy)
    assert all(m is not None and m >= 0 for l in h.layers for m in l.min_load)
    r = invoke("inspect-routing", root / "moe", "--history", "--json", tmp_path / "h.json")
    assert r.exit_code == 0, r.output
    assert "→" in r.stdout and f"worst layer at the end: {h.worst_layer}" in r.stdout
    assert json.loads((tmp_path / "h.json").read_text())["layers"][0]["steps"] == [1, 2, 3, 4]


def parse_plain(stdout):
    rows = []
    for line in stdout.strip().splitlines():
        f = line.split("\t")
        row = {"index": int(f[0]), "id": int(f[1][3:]), "text": json.loads(f[2]), "p": float(f[3][2:])}
        row["layers"] = {int(x[1:x.index("=")]): [int(e.split(":")[0]) for e in x[x.index("=") + 1:].split(",")]
                         for x in f if re.match(r"L\d+=", x)}
        rows.append(row)
    return rows


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_plain_reports_the_experts_that_produced_each_token(runs, temperature):
    root, _ = runs
    ckpt = root / "moe" / "best.pt"
    args = ["sample", ckpt, "--prompt", "KING:", "--max-new-tokens", 12, "--temperature", temperature, "--seed", 7]
    r = invoke(*args, "--plain")
    assert r.exit_code == 0, r.output
    rows = parse_plain(r.stdout)
    assert [x["index"] for x in rows] == list(range(1, 13))
    plain = invoke(*args)  # the same tokens as sampling without the view: the token actually chosen
    assert "KING:" + "".join(x["text"] for x in rows) + "\n" == plain.stdout
    prompt = load_tokenizer(load_checkpoint(ckpt)["tokenizer"]).encode("KING:").ids
    seq = prompt + [x["id"] for x in rows]
    layers, routing = direct_routing(ckpt, seq[:-1])  # position t's routing produced token t + 1
    for i, x in enumerate(rows):
        pos = len(prompt) - 1 + i
        assert x["layers"] == {l: ex[pos].tolist() for l, ex in zip(layers, routing)}, i


def test_live_view_and_dense_models(runs):
    root, _ = runs
    r = invoke("sample", root / "moe", "--max-new-tokens", 6, "--show-routing", "--num-samples", 2)
    assert r.exit_code == 0, r.output
    for needle in ["chosen token and the model's top predictions", "expert path of this token", "running load",
                   "token 6/6", "--- sample 2"]:
        assert needle in r.stdout, needle
    r = invoke("sample", root / "gpt2", "--max-new-tokens", 5, "--show-routing")
    assert r.exit_code == 0, r.output
    assert "dense model" in r.stdout and "top predictions" in r.stdout and "expert path" not in r.stdout
    r = invoke("sample", root / "gpt2", "--max-new-tokens", 5, "--plain")
    assert r.exit_code == 0 and "dense model" in r.stderr
    rows = parse_plain(r.stdout)
    assert len(rows) == 5 and all(x["layers"] == {} for x in rows)
