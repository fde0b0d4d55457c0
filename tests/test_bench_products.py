"""`minideep bench -s products`: the recorder sees every product of a training step, exactly the
FLOPs the model counts; the optimizer's products apart; each call replays on fresh inputs. No
timings are asserted."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_cfg

from minideep_cli.bench import BenchOptions, run_bench
from minideep_cli.bench.plan import bench_plan
from minideep_cli.bench.products import Inputs, product_flops, record_step, replay
from minideep_cli.bench.train import train_step_fn
from minideep_cli.config import Config
from minideep_cli.models import build_model


def tiny(arch: str, optimizer: str = "adamw", **model) -> Config:
    cfg = Config()
    extra = dict(capacity_factor=None, dropout=0.0) if arch == "moe" else {}
    cfg.model = tiny_model_cfg(arch, **{**extra, **model})
    cfg.train.batch_size, cfg.train.device, cfg.train.optimizer = 3, "cpu", optimizer
    return cfg


def recorded(cfg: Config) -> tuple:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    calls = record_step(train_step_fn(model, cfg, "cpu", torch.float32))
    return model, calls


def total(calls, kind: str, phase: str, what: str = "flops") -> int:
    return sum(c[what] * c["count"] if what == "flops" else c["count"]
               for c in calls if c["kind"] == kind and c["phase"] == phase)


def score_flops(model, T: int) -> int:
    if model.cfg.arch == "moe":
        return sum(b.attn.score_flops_per_token(T) for b in model.blocks)
    return 12 * model.cfg.n_layer * model.cfg.n_embd * T


@pytest.mark.parametrize("arch", ["gpt2", "moe"])
def test_a_steps_products_are_exactly_the_flops_the_model_counts(arch):
    # 6 FLOPs per matmul weight and token (forward, input gradient, weight gradient), the experts'
    # at top_k of n_experts (dropless: every assignment runs), lm head included; attention scores
    # are the fused kernel's, not products
    cfg = tiny(arch)
    model, calls = recorded(cfg)
    T = cfg.model.block_size
    tokens = cfg.train.batch_size * T
    assert total(calls, "product", "step") == (model.flops_per_token(T) - score_flops(model, T)) * tokens
    assert total(calls, "product", "optimizer", "count") == 0  # AdamW multiplies no matrices


def test_attention_kernels_are_recorded_forward_and_backward():
    cfg = tiny("moe")
    _, calls = recorded(cfg)
    assert total(calls, "attention", "step", "count") == 2 * cfg.model.n_layer


def test_muons_newton_schulz_is_recorded_as_the_optimizers():
    cfg = tiny("moe", optimizer="muon")
    cfg.train.muon_ns_steps = 3
    model, calls = recorded(cfg)
    hidden = [n for n, role in model.param_roles().items() if role == "hidden"]
    # each hidden matrix (a stack of experts counts once: one batched iteration) takes three
    # products per Newton-Schulz step: x x^T, then b gram + c gram gram, then a x + poly x
    assert total(calls, "product", "optimizer", "count") == 3 * 3 * len(hidden)
    assert {c["dtype"] for c in calls if c["phase"] == "optimizer"} == {"bfloat16"}  # as torch's Muon iterates
    T = cfg.model.block_size
    tokens = cfg.train.batch_size * T
    assert total(calls, "product", "step") == (model.flops_per_token(T) - score_flops(model, T)) * tokens


def test_grouped_products_flops_by_hand():
    # (rows of 4 floats: grouped_mm wants 16-byte strides)
    a, w = torch.randn(6, 4), torch.randn(2, 4, 4)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    out = F.grouped_mm(a, w, offs=offs)  # rows 0-1 through expert 0, 2-5 through expert 1
    assert product_flops("_grouped_mm", (a, w), out) == 2 * 6 * 4 * 4
    x, dy = torch.randn(12, 4).t(), torch.randn(12, 4)
    offs = torch.tensor([4, 12], dtype=torch.int32)
    dw = F.grouped_mm(x, dy, offs=offs)  # a weight gradient: (2, 4, 4), the 12 rows split 4 + 8
    assert dw.shape == (2, 4, 4) and product_flops("_grouped_mm", (x, dy), dw) == 2 * 4 * 4 * 12
    m1, m2 = torch.randn(5, 7), torch.randn(7, 2)
    assert product_flops("addmm", (torch.zeros(2), m1, m2), torch.addmm(torch.zeros(2), m1, m2)) == 2 * 5 * 7 * 2


def test_every_recorded_call_replays_on_fresh_inputs_of_its_layout():
    _, calls = recorded(tiny("moe", optimizer="muon"))
    inputs = Inputs(calls)
    for call in calls:
        for out in (replay(call)(), replay(call, inputs, launches=3)()):
            first = out[0] if isinstance(out, (tuple, list)) else out
            assert tuple(first.shape) == call["out_shape"] and torch.isfinite(first).all(), call["func"]


def test_shared_inputs_are_disjoint_within_a_call_and_as_large_as_the_largest_call():
    _, calls = recorded(tiny("moe", optimizer="muon"))
    inputs = Inputs(calls)
    for call in calls:
        args, _ = inputs.args_for(call)
        spans = sorted((t.storage_offset(), t.storage_offset() + t.as_strided((t.numel(),), (1,)).numel())
                       for t in args if isinstance(t, torch.Tensor) and t.is_floating_point())
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), call["func"]
    fp32 = inputs.buffers[(torch.float32, torch.device("cpu"))].numel()
    per_call = [sum(t.numel() for t in inputs.args_for(c)[0] if isinstance(t, torch.Tensor)
                    and t.dtype == torch.float32 and t.is_contiguous()) for c in calls]
    assert max(per_call) <= fp32 < sum(per_call)  # the largest call fits; the calls share it


@pytest.mark.parametrize("arch", ["gpt2", "moe"])
def test_layers_of_one_shape_are_timed_once_and_counted_per_layer(arch):
    two, three = (recorded(tiny(arch, n_layer=n))[1] for n in (2, 3))
    step = lambda calls: [c for c in calls if c["phase"] == "step"]  # noqa: E731
    if arch == "gpt2":  # every layer's products have the same shapes
        assert len(step(two)) == len(step(three))
    else:  # the experts' grouped products differ by their group offsets, layer to layer
        plain = lambda calls: [c for c in step(calls) if "grouped" not in str(c["func"])]  # noqa: E731
        assert len(plain(two)) == len(plain(three))
    per_layer = sum(c["count"] for c in step(three)) - sum(c["count"] for c in step(two))
    assert per_layer > 0 and sum(c["count"] for c in step(two)) - per_layer * 2 > 0  # the lm head's, once


def test_the_section_follows_gradient_checkpointing():
    # recomputing each block's forward in the backward pass adds the blocks' forward products
    # (2 FLOPs per weight and token) but its last: torch's non-reentrant checkpoint stops
    # recomputing once the last tensor the backward saved is back, and nothing saves the output
    # of the block's final product (the MLP's c_proj, before the residual add)
    opts = BenchOptions.for_run(True, ("products",), warmup=0, repeats=1, matmul_n=64)
    plain, ckpt = tiny("gpt2"), tiny("gpt2")
    ckpt.train.grad_checkpointing = True
    p0, p1 = (run_bench(c, opts)["products"]["rows"][0]["flops"] for c in (plain, ckpt))
    model = build_model(plain.model)
    recomputed = sum(p.numel() for n, p in model.transformer.h.named_parameters()
                     if p.dim() == 2 and not n.endswith("mlp.c_proj.weight"))
    assert p1 - p0 == 2 * recomputed * plain.train.batch_size * plain.model.block_size


def test_products_and_peers_are_not_default_sections():
    chosen = bench_plan(preset="cpu").opts.sections
    assert "products" not in chosen and "peers" not in chosen and "train" in chosen


def test_the_section_through_run_bench():
    opts = BenchOptions.for_run(True, ("products",), warmup=0, repeats=1, matmul_n=64)
    p = run_bench(tiny("moe", optimizer="muon"), opts)["products"]
    assert [(r["kind"], r["phase"]) for r in p["rows"]] == [("product", "step"), ("attention", "step"),
                                                            ("product", "optimizer")]
    step_rows = [r for r in p["rows"] if r["phase"] == "step"]
    assert p["alone_ms"] == pytest.approx(sum(r["ms"] for r in step_rows))
    assert p["alone_of_step"] == pytest.approx(p["alone_ms"] / p["step_ms"])
    assert p["ceiling_share"] == pytest.approx(p["step_share"] * p["step_ms"] / p["alone_ms"])
