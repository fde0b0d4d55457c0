"""The 2026 recipe's pieces, each against a hand-written reference: Muon (torch's on 2-D matrices,
ours batched over stacked experts), the one optimizer that holds Muon and AdamW, the WSD schedule,
QK-norm, ReLU², logit soft-capping and zero-initialised output projections."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_cfg, tiny_train_cfg, unigram_nats

from minideep_cli.config import Config
from minideep_cli.models import build_model
from minideep_cli.models.layers import ReLU2, apply_rope, rope_tables
from minideep_cli.models.moe import Experts
from minideep_cli.optim import ExpertMuon, MuonAdamW, lr_at, make_optimizer, param_names

RECIPE = dict(qk_norm=True, activation="relu2", logit_softcap=15.0, zero_init_out=True)


# ---------------------------------------------------------------- Muon


@pytest.mark.parametrize("adjust,ns_steps", [("match_rms_adamw", 5), ("original", 5), ("match_rms_adamw", 3)])
@pytest.mark.parametrize("shape", [(4, 24, 40), (3, 40, 24), (2, 16, 16)], ids=["wide", "tall", "square"])
def test_batched_muon_equals_torch_muon_on_each_expert_slice(shape, adjust, ns_steps):
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(shape))
    slices = [torch.nn.Parameter(stacked[e].detach().clone()) for e in range(shape[0])]
    ours = ExpertMuon([stacked], lr=0.01, weight_decay=0.1, adjust_lr_fn=adjust, ns_steps=ns_steps)
    theirs = torch.optim.Muon(slices, lr=0.01, weight_decay=0.1, adjust_lr_fn=adjust, ns_steps=ns_steps)
    before = stacked.detach().clone()
    for _ in range(3):  # momentum carries across steps
        g = torch.randn(shape)
        stacked.grad = g.clone()
        for e, s in enumerate(slices):
            s.grad = g[e].clone()
        ours.step()
        theirs.step()
    for e, s in enumerate(slices):  # bit for bit where the bf16 kernels agree; always within 1% of the change
        moved = (s.detach() - before[e]).abs().max()
        assert moved > 0.01 and (stacked[e].detach() - s.detach()).abs().max() <= 0.01 * moved


def test_muon_ns_steps_reaches_both_muon_parts():
    cfg = Config()
    cfg.model = tiny_model_cfg("moe")
    cfg.train.optimizer, cfg.train.muon_ns_steps = "muon", 3
    opt = make_optimizer(build_model(cfg.model), cfg, "cpu")
    steps = {g["kind"]: g["ns_steps"] for g in opt.param_groups if g["kind"] != "adamw"}
    assert steps == {"muon": 3, "muon_experts": 3}


def test_expert_muon_refuses_matrices_it_was_not_made_for():
    with pytest.raises(ValueError, match="stacked"):
        ExpertMuon([torch.nn.Parameter(torch.zeros(3, 3))])


@pytest.mark.parametrize("arch", ["moe", "gpt2"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(arch):
    cfg = Config()
    cfg.model = tiny_model_cfg(arch, **(dict(n_shared_experts=1, first_k_dense=1) if arch == "moe" else {}))
    cfg.train.optimizer = "muon"
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg, "cpu")
    kind = {n: g["kind"] for g in opt.param_groups for n in g["param_names"]}
    assert sorted(kind) == sorted(n for n, _ in model.named_parameters())  # each parameter once
    params = dict(model.named_parameters())
    for name, k in kind.items():
        hidden = (name.startswith(("blocks.", "transformer.h.")) and params[name].dim() >= 2
                  and "router" not in name)
        assert k == ("muon_experts" if hidden and params[name].dim() == 3 else "muon" if hidden else "adamw"), name
    decayed = {n for g in opt.param_groups if g["weight_decay"] > 0 for n in g["param_names"]}
    assert decayed == {n for n, p in params.items() if p.dim() >= 2}  # norms and biases never decay
    assert param_names(opt) == [n for g in opt.state_dict()["param_groups"] for n in g["param_names"]]


def test_muon_and_adamw_state_round_trips_through_one_state_dict():
    """Two optimizers stepped alike, one of them reloaded from the other's state dict halfway:
    the same weights afterwards, bit for bit."""
    cfg = Config()
    cfg.model = tiny_model_cfg("moe")
    cfg.train.optimizer = "muon"
    torch.manual_seed(0)
    a = build_model(cfg.model)
    b = build_model(cfg.model)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = make_optimizer(a, cfg, "cpu"), make_optimizer(b, cfg, "cpu")
    x = torch.randint(0, 97, (4, 32))

    def step(model, opt):
        out = model(x, x)
        (out.loss + out.aux["loss"]).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step(a, opt_a)
        step(b, opt_b)
    opt_b = make_optimizer(b, cfg, "cpu")  # a fresh object, as a resumed run builds
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # a copy, as from a file: no shared tensors
    assert isinstance(opt_b, MuonAdamW) and opt_b.parts["muon"].state is opt_b.state
    for _ in range(2):
        step(a, opt_a)
        step(b, opt_b)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_wsd_schedule_is_flat_then_decays_linearly_over_the_cooldown():
    cfg = Config()
    cfg.train.schedule, cfg.train.warmup, cfg.train.cooldown, cfg.train.min_lr_ratio = "wsd", 0.1, 0.4, 0.1
    assert lr_at(0.0, cfg) < 0.02
    assert lr_at(0.1, cfg) == pytest.approx(1.0)
    assert lr_at(0.6, cfg) == pytest.approx(1.0)
    assert lr_at(0.8, cfg) == pytest.approx(0.55)  # halfway down the cooldown
    assert lr_at(1.0, cfg) == pytest.approx(0.1)


# ---------------------------------------------------------------- the block


def test_qk_norm_attention_matches_a_written_out_reference():
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg("moe", qk_norm=True, n_kv_head=2)).eval()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    B, T, H, Hkv, D = 2, 10, 4, 2, 8
    x = torch.randn(B, T, 32)
    cos, sin = rope_tables(D, T, model.cfg.rope_theta)

    def rms(v, w):  # v / sqrt(mean(v^2) + eps) * w over each head's D numbers
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    q = (x @ attn.wq.weight.T).view(B, T, H, D).transpose(1, 2)
    kv = (x @ attn.wkv.weight.T).view(B, T, 2 * Hkv, D).transpose(1, 2)
    k, v = kv[:, :Hkv], kv[:, Hkv:]
    q, k = apply_rope(rms(q, attn.q_norm.weight), cos, sin), apply_rope(rms(k, attn.k_norm.weight), cos, sin)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D) @ attn.wo.weight.T
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


def test_relu2_feed_forward_and_experts_match_the_formula():
    torch.manual_seed(0)
    ffn = ReLU2(16, 24)
    x = torch.randn(5, 16)
    expected = F.relu(x @ ffn.w1.weight.T).pow(2) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), expected)

    experts = Experts(3, 16, 24, "relu2")
    assert not hasattr(experts, "w3") and experts.weights() == [experts.w1, experts.w2]
    for w in experts.weights():
        torch.nn.init.normal_(w, 0, 0.3)
    counts = torch.tensor([4, 0, 6])
    rows = torch.randn(10, 16, requires_grad=True)
    grouped = experts(rows, counts)
    by_hand = torch.cat([F.relu(rows[:4] @ experts.w1[0]).pow(2) @ experts.w2[0],
                         F.relu(rows[4:] @ experts.w1[2]).pow(2) @ experts.w2[2]])
    torch.testing.assert_close(grouped, by_hand, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(grouped.square().sum(), [rows, experts.w1, experts.w2])
    looped = experts.loop(rows, counts)  # the reference loop over experts gives the same, gradients too
    torch.testing.assert_close(looped, grouped, rtol=1e-5, atol=1e-5)
    g2 = torch.autograd.grad(looped.square().sum(), [rows, experts.w1, experts.w2])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_relu2_gives_the_same_parameter_count_as_swiglu():
    swiglu = build_model(tiny_model_cfg("moe", n_embd=48, first_k_dense=1))  # 8/3 of 48 is a multiple of 16
    relu2 = build_model(tiny_model_cfg("moe", n_embd=48, first_k_dense=1, activation="relu2"))
    assert relu2.num_params() == swiglu.num_params()


def test_soft_capped_logits_are_cap_tanh_of_the_plain_ones():
    torch.manual_seed(0)
    plain = build_model(tiny_model_cfg("moe")).eval()
    capped = build_model(tiny_model_cfg("moe", logit_softcap=0.5)).eval()
    capped.load_state_dict(plain.state_dict())
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        raw, soft = plain(x).logits, capped(x).logits
    assert raw.abs().max() > 0.5  # some logits are past the cap, so the cap matters
    torch.testing.assert_close(soft, 0.5 * torch.tanh(raw / 0.5))
    assert soft.abs().max() < 0.5


def test_zero_initialised_output_projections_make_every_block_the_identity():
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg("moe", zero_init_out=True, first_k_dense=1)).eval()
    zeroed = [n for n, p in model.named_parameters() if n.endswith(("wo.weight", "w2.weight", "experts.w2"))]
    assert len(zeroed) == 4 and all(model.get_parameter(n).abs().max() == 0 for n in zeroed)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        expected = model.lm_head(model.norm(model.tok_emb(x)))
        torch.testing.assert_close(model(x).logits, expected)


@pytest.mark.parametrize("t", [5, 20])
def test_recipe_model_is_causal_and_its_cache_equals_the_full_forward(t):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg("moe", block_size=32, **RECIPE))
    for p in model.parameters():  # away from the zero init, so every part computes something
        if p.abs().max() == 0:
            torch.nn.init.normal_(p, 0, 0.1)
    model.eval()
    x = torch.randint(0, 97, (2, 32))
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 97, (2, 31 - t))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
        cache = model.new_cache(2)
        parts = [model(x[:, i:j], cache=cache).logits for i, j in [(0, t), (t, t + 1), (t + 1, 32)]]
    assert torch.equal(a[:, : t + 1], b[:, : t + 1]) and not torch.equal(a[:, t + 1 :], b[:, t + 1 :])
    torch.testing.assert_close(torch.cat(parts, 1), a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,model_kw", [("moe", RECIPE), ("gpt2", {})], ids=["moe-recipe", "gpt2"])
def test_muon_trains_a_tiny_model_below_the_unigram_entropy(tmp_path, small_data, arch, model_kw):
    from minideep_cli.train import train

    cfg = tiny_train_cfg(small_data, arch, max_steps=150, lr=1e-2, optimizer="muon", muon_lr=1e-2, schedule="wsd",
                         eval_interval=150)
    cfg.model.n_embd, cfg.model.block_size = 64, 64  # as the AdamW test in test_train.py
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    result = train(cfg, tmp_path / "run")
    assert result.stopped == "done" and result.val["loss"] < unigram_nats(small_data) - 0.4, result.val


def test_memory_estimate_counts_one_momentum_for_muon_and_two_states_for_adamw():
    from minideep_cli.bench import estimate_memory

    cfg = Config()
    cfg.model = tiny_model_cfg("moe")
    model = build_model(cfg.model)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    linear = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    total = model.num_params()
    assert estimate_memory(cfg)["adamw_bytes"] == 8 * total
    cfg.train.optimizer = "muon"
    assert estimate_memory(cfg)["adamw_bytes"] == 4 * (expert + linear) + 8 * (total - expert - linear)
