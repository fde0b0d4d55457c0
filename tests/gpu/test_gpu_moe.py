"""The experts' grouped matmul against the loop over experts, on the device, under bf16 autocast
at the rtx3060 moe shapes: outputs and gradients (input and every weight) equal within bf16
rounding, and the grouped path really runs grouped_mm where fast.grouped_mm_ok allows it."""

import copy
import functools

import torch
from gpu_env import count_grouped, pytestmark, rig  # noqa: F401

import minideep_cli.models.fast as fast_mod
from minideep_cli.evaluate import autocast_for
from minideep_cli.models.moe import MoE
from minideep_cli.models.transformer import expert_hidden

TOL = 2e-2  # bf16 keeps 8 bits of mantissa; both paths accumulate in fp32: a few roundings apart


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def run(layer: MoE, x: torch.Tensor, g: torch.Tensor, grouped: bool, device: str):
    experts = layer.experts
    experts.forward = functools.partial(fast_mod.run_experts, experts) if grouped else experts.loop
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with autocast_for(device, torch.bfloat16):
        y, stats = layer(x)
    (y.float() * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}, stats


def test_grouped_mm_equals_loop_over_experts(rig, monkeypatch, record_property):
    cfg = copy.deepcopy(rig.config("rtx3060", "moe").model)
    cfg.router_noise = "none"  # the same routing in both runs
    tokens = 256 if rig.cpu_mode else 8192
    torch.manual_seed(0)
    layer = MoE(cfg, expert_hidden(cfg)).to(rig.device).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.05)
    x = torch.randn(2, tokens // 2, cfg.n_embd, device=rig.device)
    g = torch.randn(2, tokens // 2, cfg.n_embd, device=rig.device)

    calls = count_grouped(monkeypatch)
    y_g, dx_g, dw_g, s_g = run(layer, x, g, True, rig.device)
    expected = fast_mod.grouped_mm_ok(x, torch.bfloat16, *layer.experts.w1.shape[1:])
    assert (calls[0] > 0) == expected, (calls[0], expected)
    used = calls[0]
    y_l, dx_l, dw_l, s_l = run(layer, x, g, False, rig.device)
    assert calls[0] == used  # the loop never calls it
    assert torch.equal(s_g["expert_ids"], s_l["expert_ids"]) and torch.equal(s_g["kept"], s_l["kept"])
    errs = {"y": rel_err(y_g, y_l), "dx": rel_err(dx_g, dx_l)}
    errs.update({f"d{n}": rel_err(dw_g[n], dw_l[n]) for n in dw_l if dw_l[n] is not None})
    record_property("grouped_mm_used", expected)
    record_property("tokens", tokens)
    record_property("max_rel_err", round(max(errs.values()), 5))
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, bad
