"""Routing statistics against numbers worked out by hand on a fixed routing, against the MoE
layer itself (drops, aux), and the JSON schema."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model_cfg

from minideep_cli.errors import UserError
from minideep_cli.models import build_model
from minideep_cli.models.moe import MoE
from minideep_cli.routing_report import (LayerTrace, ModelInfo, ReportInputs, RoutingTrace, analyze,
                                         collect_routing, simulate_drops, summarize_step, token_texts)

# Six tokens in two windows of three; four experts, top-2; two MoE layers (blocks 0 and 1).
TOKENS = np.array([5, 7, 5, 9, 5, 7])
IDS_A = np.array([[0, 1], [0, 2], [1, 0], [3, 2], [0, 1], [2, 3]])
IDS_B = np.array([[1, 0], [1, 2], [1, 3], [2, 0], [1, 0], [3, 2]])
GATES = np.array([[0.65, 0.35], [0.75, 0.25], [0.55, 0.45], [0.85, 0.15], [0.42, 0.58], [0.95, 0.05]], dtype=np.float32)
UNIFORM, HALF = [0.25] * 4, [0.5, 0.5, 0.0, 0.0]
PROBS = np.array([UNIFORM, HALF, UNIFORM, HALF, UNIFORM, HALF], dtype=np.float32)
VOCAB = [bytes([65 + i]) for i in range(10)]  # id i is the letter chr(65 + i)


def hand_trace() -> RoutingTrace:
    return RoutingTrace(TOKENS, window=3, n_experts=4, top_k=2,
                        layers=[LayerTrace(0, IDS_A, GATES, PROBS), LayerTrace(1, IDS_B, GATES, PROBS)])


def hand_report(capacity_factor=1.0, policy="position", top_n=5):
    info = ModelInfo("moe", 2, [0, 1], 4, 2, "softmax", capacity_factor, policy, 2, 3)
    return analyze(hand_trace(), VOCAB, info, ReportInputs("hand.pt", "hand-built", 6), layer=0, top_n=top_n)


def test_loads_imbalance_entropy_by_hand():
    a = hand_report().layer(0)
    assert a.loads == [4, 3, 3, 2] and a.assignments == 12
    assert a.load_share == pytest.approx([4 / 12, 3 / 12, 3 / 12, 2 / 12])
    assert a.imbalance_max_mean == pytest.approx(4 / 3)
    assert a.imbalance_cv == pytest.approx(math.sqrt(0.5) / 3)  # loads 4,3,3,2: variance 0.5
    assert a.router_entropy == pytest.approx((1.0 + 0.5) / 2)  # uniform rows 1, half rows ln2/ln4
    share = np.array([4, 3, 3, 2]) / 12
    assert a.load_entropy == pytest.approx(float(-(share * np.log(share)).sum() / math.log(4)))
    assert a.aux == pytest.approx(4 * float((share * PROBS.mean(0)).sum()))
    assert a.gates.mean == pytest.approx(GATES.mean())
    assert a.gates.mean_by_rank == pytest.approx(GATES.mean(0).tolist())
    assert a.gates.hist == [1, 1, 1, 1, 2, 2, 1, 1, 1, 1]  # tenths: .05 .15 .25 .35 .42 .45 .55 .58 .65 ...


def test_coselection_and_pairs_by_hand():
    a = hand_report().layer(0)
    # sets: {0,1} x3, {0,2} x1, {2,3} x2
    assert a.coselect == [[0, 3, 1, 0], [3, 0, 0, 0], [1, 0, 0, 2], [0, 0, 2, 0]]
    assert [p.experts for p in a.top_pairs] == [[0, 1], [2, 3], [0, 2]]
    assert [p.count for p in a.top_pairs] == [3, 2, 1]
    assert a.top_pairs[0].share == pytest.approx(3 / 6)
    assert a.top_pairs[0].lift == pytest.approx(3 / (6 * (4 / 6) * (3 / 6)))  # 1.5


def test_consecutive_sharing_by_hand():
    c = hand_report().layer(0).consecutive
    # pairs inside a window: (0,1) (1,2) (3,4) (4,5); (2,3) crosses windows
    assert c.pairs == 4
    assert c.top1_same == pytest.approx(1 / 4)  # top-1: 0 0 1 | 3 0 2
    assert c.top1_same_chance == pytest.approx((3 / 6) ** 2 + 3 * (1 / 6) ** 2)
    assert c.any_shared == pytest.approx(2 / 4)
    # P(sets of two independent tokens meet): {0,1} 1/2, {0,2} 1/6, {2,3} 1/3; only {0,1} vs {2,3} miss
    assert c.any_shared_chance == pytest.approx(1 - 2 * (1 / 2) * (1 / 3))


def test_paths_by_hand():
    p = hand_report().paths
    assert p.layers == [0, 1] and p.n_tokens == 6 and p.n_distinct == 4
    assert [(x.path, x.count) for x in p.top] == [([0, 1], 3), ([1, 1], 1), ([2, 3], 1), ([3, 2], 1)]
    assert p.top[0].share == pytest.approx(0.5)


def test_expert_specialisation_by_hand():
    e0 = hand_report(top_n=1).layer(0).experts[0]  # receives tokens 5, 7, 5, 5
    assert e0.load == 4 and e0.share == pytest.approx(4 / 12)
    assert [(t.id, t.text, t.count) for t in e0.top_tokens] == [(5, "F", 3)]
    assert e0.top_tokens[0].share == pytest.approx(3 / 4) and e0.top_tokens[0].affinity == pytest.approx(1.0)
    assert e0.concentration == pytest.approx(3 / 4)
    kl = 0.75 * math.log2(0.75 / 0.5) + 0.25 * math.log2(0.25 / (2 / 6))
    assert e0.specialisation_bits == pytest.approx(kl)
    e3 = hand_report().layer(0).experts[3]  # tokens 9 and 7
    assert {t.id: t.affinity for t in e3.top_tokens} == pytest.approx({9: 1.0, 7: 0.5})


def test_drops_by_hand_for_both_policies():
    # one batch of 2 windows x 3 positions, capacity ceil(1.0 * 6 * 2 / 4) = 3
    kept = simulate_drops(IDS_A, GATES, 3, 2, 1.0, 4, "position")
    # expert 0's queue in position-major order: t0, t1, t4 (positions 0, 1, 1), then t2 (position 2) dropped
    assert np.argwhere(~kept).tolist() == [[2, 1]]
    kept = simulate_drops(IDS_A, GATES, 3, 2, 1.0, 4, "gate")
    assert np.argwhere(~kept).tolist() == [[4, 0]]  # the lowest gate of expert 0's four (.65 .75 .45 .42)
    assert simulate_drops(IDS_A, GATES, 3, 2, None, 4).all()
    r = hand_report(capacity_factor=1.0).layer(0)
    assert (r.dropped, r.capacity) == (1, 3) and r.dropped_frac == pytest.approx(1 / 12)
    # one window per batch: capacity ceil(3 * 2 / 4) = 2 per expert and per window
    kept = simulate_drops(IDS_A, GATES, 3, 1, 1.0, 4)
    assert np.argwhere(~kept).tolist() == [[2, 1]]  # window 0: e0 gets t0, t1, t2 -> t2 dropped


@pytest.mark.parametrize("policy", ["position", "gate"])
def test_simulated_drops_equal_the_moe_layers_own(policy):
    cfg = tiny_model_cfg("moe", capacity_factor=0.7, drop_policy=policy, n_experts=4, top_k=2)
    torch.manual_seed(3)
    moe = MoE(cfg, 16)
    torch.nn.init.normal_(moe.router.weight, std=1.0)
    torch.nn.init.normal_(moe.experts.w1, std=0.1)
    torch.nn.init.normal_(moe.experts.w2, std=0.1)
    torch.nn.init.normal_(moe.experts.w3, std=0.1)
    moe.train()
    B, T = 3, 7
    _, s = moe(torch.randn(B, T, cfg.n_embd))
    kept = simulate_drops(s["expert_ids"].numpy(), s["gates"].numpy(), T, B, 0.7, 4, policy)
    assert (~kept).sum() > 0
    assert np.array_equal(kept, s["kept"].numpy())


@pytest.mark.parametrize("policy", ["position", "gate"])
def test_simulated_drops_equal_the_moe_layers_own_on_hand_built_routing(policy, monkeypatch):
    # the layer's router is made to choose IDS_A with GATES (two windows of three, one batch), so
    # both capacity steps see the same choices; the report's twin must drop exactly what the layer drops
    cfg = tiny_model_cfg("moe", capacity_factor=1.0, drop_policy=policy, n_experts=4, top_k=2)
    moe = MoE(cfg, 16).train()
    routed = (torch.from_numpy(IDS_A), torch.from_numpy(GATES), torch.from_numpy(PROBS), torch.zeros(6, 4))
    monkeypatch.setattr(moe.router, "forward", lambda x: routed)
    _, s = moe(torch.randn(2, 3, cfg.n_embd))
    kept = simulate_drops(IDS_A, GATES, 3, 2, 1.0, 4, policy)
    assert (~kept).sum() == 1 and np.array_equal(kept, s["kept"].numpy())


def test_collect_routing_equals_a_direct_forward_and_its_aux():
    cfg = tiny_model_cfg("moe", block_size=8, n_layer=2)
    model = build_model(cfg).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 8 * 5 + 3)
    done = []
    trace = collect_routing(model, tokens, batch_windows=2, progress=lambda d, n: done.append((d, n)))
    assert done[-1] == (43, 43) and [lt.layer for lt in trace.layers] == [0, 1]
    with torch.no_grad():
        for start in range(0, 43, 8):
            x = torch.tensor(tokens[start : start + 8])[None]
            aux = model(x).aux
            for lt, s in zip(trace.layers, aux["routing"]):
                assert np.array_equal(lt.expert_ids[start : start + 8], s["expert_ids"].numpy())
                assert np.allclose(lt.probs[start : start + 8], s["probs"].numpy(), atol=1e-6)
    # one window: the statistic "aux" is the model's own Switch loss
    one = RoutingTrace(tokens[:8], 8, 4, 2, [LayerTrace(lt.layer, lt.expert_ids[:8], lt.gates[:8], lt.probs[:8])
                                              for lt in trace.layers])
    info = ModelInfo("moe", 2, [0, 1], 4, 2, "softmax", None, "position", 1, 8)
    r = analyze(one, [b"x"] * cfg.vocab_size, info, ReportInputs("", "", 8))
    with torch.no_grad():
        aux = model(torch.tensor(tokens[:8])[None]).aux
    assert [l.aux for l in r.layers] == pytest.approx([s["aux"].item() for s in aux["routing"]], rel=1e-5)
    assert r.summary.dropped_frac == 0.0 and r.layers[0].capacity is None


SCHEMA_KEYS = {
    "schema", "source", "source.checkpoint", "source.text", "source.tokens",
    "model", *(f"model.{k}" for k in ["arch", "n_layer", "moe_layers", "n_experts", "top_k", "router",
                                       "capacity_factor", "drop_policy", "train_batch_size", "block_size"]),
    "summary", *(f"summary.{k}" for k in ["worst_layer", "worst_imbalance", "mean_router_entropy", "dropped_frac",
                                           "dead_experts"]),
    "layers", *(f"layers[].{k}" for k in ["layer", "loads", "load_share", "imbalance_max_mean", "imbalance_cv",
                                           "router_entropy", "load_entropy", "aux", "capacity_factor", "capacity",
                                           "dropped", "assignments", "dropped_frac", "gates", "coselect",
                                           "top_pairs", "consecutive", "experts"]),
    *(f"layers[].gates.{k}" for k in ["mean", "mean_by_rank", "hist_edges", "hist"]),
    *(f"layers[].top_pairs[].{k}" for k in ["experts", "count", "share", "lift"]),
    *(f"layers[].consecutive.{k}" for k in ["pairs", "top1_same", "top1_same_chance", "any_shared",
                                             "any_shared_chance"]),
    *(f"layers[].experts[].{k}" for k in ["expert", "load", "share", "mean_prob", "top_tokens", "concentration",
                                           "specialisation_bits"]),
    *(f"layers[].experts[].top_tokens[].{k}" for k in ["id", "text", "count", "share", "affinity"]),
    "paths", *(f"paths.{k}" for k in ["layers", "n_tokens", "n_distinct", "top"]),
    *(f"paths.top[].{k}" for k in ["path", "count", "share"]),
    "text", *(f"text.{k}" for k in ["layer", "ids", "tokens", "experts", "probs"]),
}


def key_paths(obj, prefix="") -> set:
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{prefix}.{k}" if prefix else k
            out |= {p} | key_paths(v, p)
    elif isinstance(obj, list) and obj and isinstance(obj[0], dict):
        for v in obj:
            out |= key_paths(v, prefix + "[]")
    return out


def test_json_schema_is_stable():
    d = json.loads(json.dumps(hand_report().to_dict()))
    assert d["schema"] == "minideep.routing/1"
    assert key_paths(d) == SCHEMA_KEYS
    t = d["text"]
    assert t["tokens"] == ["F", "H", "F", "J", "F", "H"] and t["experts"][3] == [[3, 2], [2, 0]]
    assert t["probs"][1][0] == [0.5, 0.5, 0.0, 0.0]


def test_bad_layer_and_dense_models_are_user_errors():
    with pytest.raises(UserError, match="not an MoE layer"):
        analyze(hand_trace(), VOCAB, ModelInfo("moe", 3, [0, 1], 4, 2, "softmax", 1.0, "position", 2, 3),
                ReportInputs("", "", 6), layer=2)
    dense = RoutingTrace(TOKENS, 3, 0, 0, [])
    with pytest.raises(UserError, match="no MoE layers"):
        analyze(dense, VOCAB, ModelInfo("gpt2", 2, [], 0, 0, "softmax", None, "position", 2, 3), ReportInputs("", "", 6))


def test_token_texts_give_a_split_character_to_the_token_that_completes_it():
    vocab = [b"a", "é".encode()[:1], "é".encode()[1:], b"b"]
    assert token_texts([0, 1, 2, 3], vocab) == ["a", "", "é", "b"]
    assert "".join(token_texts([1, 3], vocab)) == "\ufffdb"


def test_summarize_step():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    routing = {"expert_ids": torch.tensor([[2, 0]]), "gates": torch.tensor([[0.7, 0.2]]),
               "probs": torch.tensor([[0.2, 0.1, 0.7, 0.0]])}
    sv = summarize_step(3, 2, logits, routing, [1], "c", 4, top_n=2)
    assert (sv.index, sv.token, sv.rank) == (3, 2, 2) and sv.prob == pytest.approx(0.3)
    assert [t for t, _ in sv.top] == [1, 2] and sv.top[0][1] == pytest.approx(0.6)
    lc = sv.layers[0]
    assert (lc.layer, lc.experts) == (1, [2, 0]) and lc.gates == pytest.approx([0.7, 0.2])
    p = np.array([0.2, 0.1, 0.7])
    assert lc.entropy == pytest.approx(float(-(p * np.log(p)).sum() / math.log(4)), rel=1e-5)
    assert summarize_step(1, 0, logits, {}, [], "a", 0).layers == []  # a dense model
