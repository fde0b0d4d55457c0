"""The MoE layer against a plain reference, and the routing rules of docs/design.md, The models."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_cfg

import minideep_cli.models.fast as fast_mod
from minideep_cli.models import build_model
from minideep_cli.models.moe import MoE, capacity_for, switch_aux_loss


def reference_moe(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Readable oracle: walk assignments in position-major order, give each expert at most
    `capacity` of them, then loop over experts and add gate * expert(token) per kept assignment."""
    cfg = layer.cfg
    B, T, d = x.shape
    flat = x.reshape(B * T, d)
    ids, gates, _, _ = layer.router(flat)
    cap = capacity_for(cfg.capacity_factor if layer.training else cfg.eval_capacity_factor, B * T, cfg.top_k, cfg.n_experts)
    used = [0] * cfg.n_experts
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for t in range(T):
        for b in range(B):
            for j in range(cfg.top_k):
                n, e = b * T + t, int(ids[b * T + t, j])
                if cap is None or used[e] < cap:
                    keep[n, j] = True
                    used[e] += 1
    w = layer.experts
    y = torch.zeros_like(flat)
    for e in range(cfg.n_experts):
        for n, j in ((ids == e) & keep).nonzero().tolist():
            h = (F.silu(flat[n] @ w.w1[e]) * (flat[n] @ w.w3[e])) @ w.w2[e]
            y[n] = y[n] + gates[n, j] * h
    if layer.shared is not None:
        y = y + layer.shared(flat)
    return y.view(B, T, d), int((~keep).sum())


def make_layer(**kw) -> MoE:
    cfg = tiny_model_cfg("moe", **kw)
    layer = MoE(cfg, 24)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return layer


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity", [None, 0.5, 1.0])
@pytest.mark.parametrize("shared", [0, 1])
def test_dispatch_equals_reference(monkeypatch, grouped, top_k, capacity, shared):
    if grouped and not fast_mod.HAS_GROUPED_MM:
        pytest.skip("this torch has no grouped_mm; the loop path is tested instead")
    monkeypatch.setattr(fast_mod, "HAS_GROUPED_MM", grouped)
    layer = make_layer(top_k=top_k, capacity_factor=capacity, n_shared_experts=shared).train()
    x = torch.randn(3, 7, 32, requires_grad=True)
    y, stats = layer(x)
    ref_layer = make_layer(top_k=top_k, capacity_factor=capacity, n_shared_experts=shared).train()
    ref_layer.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, dropped = reference_moe(ref_layer, x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert int(stats["dropped"]) == dropped
    if capacity == 0.5:
        assert dropped > 0
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for (n, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.skipif(not fast_mod.HAS_GROUPED_MM, reason="this torch has no grouped_mm: nothing to keep out of the graph")
def test_moe_layer_traces_under_torch_compile_in_fp32():
    """torch.compile's shape rule for grouped_mm takes bf16 only; fp32 experts run outside the graph."""
    layer = make_layer(top_k=2, capacity_factor=1.0).train()
    x = torch.randn(3, 7, 32)
    compiled = torch.compile(layer, backend="eager", fullgraph=False)  # tracing only: no C++ build
    y, _ = layer(x)
    y_c, _ = compiled(x)
    torch.testing.assert_close(y_c, y, rtol=1e-6, atol=1e-6)


def test_aux_loss_is_one_when_uniform_and_larger_when_skewed():
    E = 4
    for k in (1, 2):
        N = 8
        probs = torch.full((N, E), 1 / E)
        counts = torch.full((E,), N * k // E)
        assert switch_aux_loss(probs, counts, E).item() == pytest.approx(1.0, abs=1e-7)
        skew_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(N, 1)
        skew_counts = torch.tensor([N * k - 3, 1, 1, 1])
        assert switch_aux_loss(skew_probs, skew_counts, E).item() > 1.5


def hand_routed_layer(capacity_factor, E=2, top_k=1):
    """Router that sends a token to expert i when its feature i is large: routing by construction."""
    layer = make_layer(n_experts=E, top_k=top_k, capacity_factor=capacity_factor)
    with torch.no_grad():
        layer.router.weight.zero_()
        for e in range(E):
            layer.router.weight[e, e] = 10.0
    return layer.train()


def test_exact_drops_on_hand_built_routing():
    layer = hand_routed_layer(capacity_factor=1.0)
    x = torch.zeros(2, 3, 32)
    x[..., 0] = 1.0  # all 6 tokens choose expert 0; capacity = ceil(1.0 * 6 * 1 / 2) = 3
    x[..., 5] = torch.arange(6.0).view(2, 3)  # make tokens distinct
    y, stats = layer(x)
    assert int(stats["dropped"]) == 3
    assert stats["tokens_per_expert"].tolist() == [6, 0]
    # position-major: (t0,b0), (t0,b1), (t1,b0) keep their expert; the rest are dropped
    kept = stats["kept"].view(2, 3)
    assert kept.tolist() == [[True, True, False], [True, False, False]]
    assert torch.all(y[0, 2] == 0) and torch.all(y[1, 1:] == 0)  # dropped: residual only
    assert torch.all(y[0, :2] != 0) and torch.all(y[1, 0] != 0)


def test_dropless_drops_nothing_and_eval_is_dropless_by_default():
    layer = hand_routed_layer(capacity_factor=None)
    x = torch.zeros(2, 3, 32)
    x[..., 0] = 1.0
    _, stats = layer(x)
    assert int(stats["dropped"]) == 0
    layer = hand_routed_layer(capacity_factor=0.5).eval()
    _, stats = layer(x)
    assert int(stats["dropped"]) == 0  # eval_capacity_factor is null


def test_balancing_losses_by_hand_with_noise_in_training():
    """z-loss on the clean router logits, aux on the counts and the (noisy, as routed) probabilities,
    each with its own coefficient; jitter noise changes the choices but not what the z-loss sees."""
    layer = make_layer(n_experts=4, top_k=2, router_noise="jitter", router_noise_std=1.0, capacity_factor=None,
                       aux_loss_coef=0.3, z_loss_coef=0.007).train()
    x = torch.randn(2, 5, 32)
    torch.manual_seed(3)
    _, stats = layer(x)
    logits = x.reshape(10, 32) @ layer.router.weight.T  # (N, E), clean
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    counts = torch.bincount(stats["expert_ids"].flatten(), minlength=4).float()
    aux = 4 * ((counts / counts.sum()) * stats["probs"].mean(0)).sum()
    assert not torch.allclose(stats["probs"], logits.softmax(-1))  # noisy
    torch.testing.assert_close(stats["z"], z)
    torch.testing.assert_close(stats["aux"], aux)
    torch.testing.assert_close(stats["loss"], 0.3 * aux + 0.007 * z)
    assert not torch.equal(stats["expert_ids"], logits.topk(2, -1).indices)  # the noise did change choices


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("norm_topk", [False, True])
def test_router_learns_from_the_lm_loss_alone(top_k, norm_topk):
    cfg = tiny_model_cfg("moe", top_k=top_k, norm_topk=norm_topk, aux_loss_coef=0.0, z_loss_coef=0.0)
    model = build_model(cfg).train()
    x = torch.randint(0, 97, (2, 16))
    out = model(x, x.roll(-1, 1))
    out.loss.backward()  # no auxiliary loss at all
    for block in model.blocks:
        g = block.ffn.router.weight.grad
        assert g is not None and g.abs().sum() > 0


def test_sigmoid_router_and_fine_grained_experts_match_reference():
    layer = make_layer(router="sigmoid", n_experts=16, top_k=4, norm_topk=True, capacity_factor=1.0).train()
    x = torch.randn(2, 9, 32)
    y, stats = layer(x)
    y_ref, dropped = reference_moe(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert int(stats["dropped"]) == dropped


@pytest.mark.parametrize("noise", ["jitter", "noisy_topk"])
def test_router_noise_only_in_training(noise):
    layer = make_layer(router_noise=noise)
    x = torch.randn(64, 32)
    layer.eval()
    a, b = layer.router(x), layer.router(x)
    assert torch.equal(a[1], b[1])
    clean = F.linear(x, layer.router.weight).softmax(-1)
    torch.testing.assert_close(a[2], clean)
    layer.train()
    c, d = layer.router(x), layer.router(x)
    assert not torch.equal(c[2], d[2])


def test_selection_bias_chooses_but_does_not_weight():
    layer = make_layer(top_k=1).eval()
    x = torch.randn(50, 32)
    ids0, gates0, probs0, _ = layer.router(x)
    layer.router.bias[3] = 100.0  # expert 3 is now always chosen
    ids1, gates1, probs1, _ = layer.router(x)
    assert torch.all(ids1 == 3)
    torch.testing.assert_close(probs1, probs0)
    torch.testing.assert_close(gates1[:, 0], probs0[:, 3])  # gate = its unbiased probability


def test_bias_balancing_moves_skewed_load_toward_uniform():
    cfg = tiny_model_cfg("moe", n_layer=1, top_k=1, bias_update_rate=0.01, capacity_factor=None)
    model = build_model(cfg).eval()
    moe = model.blocks[0].ffn
    u = torch.ones(32) / 32**0.5
    with torch.no_grad():
        moe.router.weight[0] += 2 * u  # skew: expert 0 wins for inputs near u
    x = torch.randn(1, 512, 32) + u

    def imbalance():
        load = moe(x)[1]["tokens_per_expert"].float()
        return (load.max() / load.mean()).item(), load

    start, load = imbalance()
    assert start > 3.0
    history = []
    for _ in range(100):
        model.update_router_bias([load])
        end, load = imbalance()
        history.append(end)
    # sign updates settle into a small oscillation around balance
    assert sum(history[-10:]) / 10 < 1.6
    assert moe.router.bias[0] < 0  # the over-loaded expert was pushed down


def test_causal_in_training_mode_with_tight_capacity():
    cfg = tiny_model_cfg("moe", capacity_factor=0.5, router_noise="none", dropout=0.0)
    model = build_model(cfg).train()
    x = torch.randint(0, 97, (4, 32))
    t = 11
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 97, (4, 32 - t - 1))
    a, b = model(x), model(y)
    assert torch.equal(a.logits[:, : t + 1], b.logits[:, : t + 1])
    for sa, sb in zip(a.aux["routing"], b.aux["routing"]):
        assert int(sa["dropped"]) > 0
        ka, kb = sa["kept"].view(4, 32, -1), sb["kept"].view(4, 32, -1)
        assert torch.equal(ka[:, : t + 1], kb[:, : t + 1])  # same drops for tokens <= t
        assert not torch.equal(ka, kb) or not torch.equal(a.logits, b.logits)


def test_gate_priority_dropping_is_offered_and_leaks_the_future():
    """The documented alternative: higher gates keep their expert, so later tokens can evict earlier ones."""
    layer = hand_routed_layer(capacity_factor=0.5)
    layer.cfg.drop_policy = "gate"
    x = torch.zeros(1, 4, 32)
    x[..., 0] = torch.tensor([1.0, 1.0, 1.0, 5.0])  # last token has the largest gate
    _, stats = layer(x)
    assert stats["kept"].view(-1).tolist() == [False, False, False, True]  # capacity 1: t3 evicts t0
    layer.cfg.drop_policy = "position"
    _, stats = layer(x)
    assert stats["kept"].view(-1).tolist() == [True, False, False, False]


def test_active_params_and_flops_count_only_top_k_experts():
    cfg = tiny_model_cfg("moe", n_experts=4, top_k=1, n_layer=2)
    model = build_model(cfg)
    per_expert = 3 * 32 * model.blocks[0].ffn.experts.w1.size(-1)
    assert model.num_params() - model.num_params(active=True) == 2 * 3 * per_expert
    assert math.isfinite(model.flops_per_token(32))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("top_k,router,shared",
                         [(1, "softmax", 0), (2, "softmax", 1), (3, "sigmoid", 0), (4, "softmax", 0)])
def test_one_token_path_equals_the_sorted_path(top_k, router, shared, autocast):
    """A decoding step (one token, eval, CPU) skips the sort and gather; with no noise and no
    capacity, training mode takes the general path on the same token and must give the same stats
    and, while that path also loops over experts (top_k < n_experts = 4), the same bits, in fp32
    and under bf16 autocast; with top_k = n_experts it uses a grouped matmul: equal up to rounding."""
    layer = make_layer(top_k=top_k, router=router, norm_topk=router == "sigmoid", n_shared_experts=shared,
                       capacity_factor=None, router_noise="none")
    assert layer.cfg.n_experts == 4
    for seed in range(5):
        x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y_one, s_one = layer.eval()(x)
            y_all, s_all = layer.train()(x)
        if top_k < 4:
            assert torch.equal(y_one, y_all)
        else:
            torch.testing.assert_close(y_one, y_all, rtol=1e-5, atol=1e-6)
        assert s_one.keys() == s_all.keys()
        for key, value in s_all.items():
            assert torch.equal(torch.as_tensor(s_one[key]), torch.as_tensor(value)), key
