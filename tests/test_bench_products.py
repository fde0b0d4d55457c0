"""`minideep bench -s products`: the recorder sees every product of a training step, exactly the
FLOPs the model counts; the optimizer's products apart; each call replays on fresh inputs. No
timings are asserted."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_cfg

from minideep_cli.bench import BenchOptions, run_bench
from minideep_cli.bench.products import product_flops, record_step, replay
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
    for call in calls:
        out = replay(call)()
        first = out[0] if isinstance(out, (tuple, list)) else out
        assert torch.isfinite(first).all(), call["func"]


def test_the_section_through_run_bench():
    opts = BenchOptions.for_run(True, ("products",), warmup=0, repeats=1, matmul_n=64)
    p = run_bench(tiny("moe", optimizer="muon"), opts)["products"]
    assert [(r["kind"], r["phase"]) for r in p["rows"]] == [("product", "step"), ("attention", "step"),
                                                            ("product", "optimizer")]
    step_rows = [r for r in p["rows"] if r["phase"] == "step"]
    assert p["alone_ms"] == pytest.approx(sum(r["ms"] for r in step_rows))
    assert p["alone_of_step"] == pytest.approx(p["alone_ms"] / p["step_ms"])
    assert p["ceiling_share"] == pytest.approx(p["step_share"] * p["step_ms"] / p["alone_ms"])
