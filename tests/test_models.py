import pytest
import torch
from conftest import tiny_model_cfg

from minideep_cli.generate import generate, generate_steps, sample_next
from minideep_cli.models import build_model

ARCHES = ["gpt2", "moe"]


@pytest.mark.parametrize("arch", ARCHES)
def test_causal_later_tokens_never_change_earlier_logits(arch):
    model = build_model(tiny_model_cfg(arch)).eval()
    x = torch.randint(0, 97, (3, 32))
    t = 13
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 97, (3, 32 - t - 1))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])  # bit-identical up to t
    assert not torch.equal(a[:, t + 1 :], b[:, t + 1 :])  # and the perturbation did reach later ones


@pytest.mark.parametrize("arch", ARCHES)
def test_cached_forward_equals_full_forward(arch):
    model = build_model(tiny_model_cfg(arch)).eval()
    x = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2)
        parts = [model(x[:, :11], cache=cache).logits, model(x[:, 11:12], cache=cache).logits,
                 model(x[:, 12:30], cache=cache).logits]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHES)
def test_cached_sampling_equals_uncached(arch):
    model = build_model(tiny_model_cfg(arch, block_size=64)).eval()
    prompt = torch.randint(0, 97, (9,)).tolist()
    cached = list(generate(model, prompt, 40, temperature=0.0, use_cache=True))
    plain = list(generate(model, prompt, 40, temperature=0.0, use_cache=False))
    assert cached == plain and len(cached) == 40
    # and with sampling, the same generator seed gives the same tokens
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert list(generate(model, prompt, 30, 1.0, top_k=20, generator=g1)) == \
        list(generate(model, prompt, 30, 1.0, top_k=20, generator=g2, use_cache=False))


@pytest.mark.parametrize("arch", ARCHES)
def test_generation_past_block_size_restarts_from_the_last_half_with_or_without_cache(arch):
    model = build_model(tiny_model_cfg(arch, block_size=16)).eval()
    prompt = torch.randint(0, 97, (20,)).tolist()  # longer than the block: its last 16 tokens
    cached = list(generate_steps(model, prompt, 30, temperature=0.0))
    plain = list(generate_steps(model, prompt, 30, temperature=0.0, use_cache=False))
    assert [s.token for s in cached] == [s.token for s in plain]
    window = ([16] + list(range(8, 17)) * 4)[:30]  # 16 tokens, then 8 (the last half) growing back to 16, ...
    seq = list(prompt)
    for i, (c, p) in enumerate(zip(cached, plain)):
        with torch.no_grad():
            want = model(torch.tensor([seq[-window[i]:]])).logits[0, -1]
        torch.testing.assert_close(c.logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.logits, want, rtol=1e-5, atol=1e-5)
        seq.append(c.token)


def test_top_p_and_top_k_keep_exactly_the_tokens_they_should():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)  # probabilities, best first
    g = torch.Generator().manual_seed(0)

    def kept(**kw):
        return set(sample_next(logits, 1.0, generator=g, **kw).tolist())
    assert kept(top_p=0.6) == {0, 1}  # 0.5 < 0.6: the token crossing the threshold stays
    assert kept(top_p=0.45) == {0} and kept(top_p=0.81) == {0, 1, 2}
    assert kept(top_k=3) == {0, 1, 2} and kept() == {0, 1, 2, 3}
    assert sample_next(logits[:1], 0.0).item() == 0  # greedy


def test_generation_runs_without_autograd_but_leaves_the_callers_mode_alone():
    model = build_model(tiny_model_cfg("gpt2", block_size=64)).eval()
    modes = []
    model.register_forward_hook(lambda m, a, o: modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled())))
    gen = generate(model, list(range(10)), 3, temperature=0.0)
    next(gen)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # between tokens: the caller's mode
    list(gen)
    assert modes == [(False, True)] * 3  # each forward: no autograd at all


@pytest.mark.parametrize("arch", ARCHES)
def test_tiny_model_overfits_one_batch(arch):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(arch, capacity_factor=None))
    x = torch.randint(0, 97, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        out = model(x, y)
        loss = out.loss + out.aux.get("loss", 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    assert first > 4.0 and out.loss.item() < 0.2


def test_gpt2_uses_hugging_face_names_and_ties_embeddings():
    model = build_model(tiny_model_cfg("gpt2"))
    names = set(model.state_dict())
    for n in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
              "transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.weight",
              "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.bias", "lm_head.weight"]:
        assert n in names
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_gpt2_block_matches_the_published_formula():
    """One GPT-2 block written out by hand: x + attn(ln1(x)); x + W2 gelu_tanh(W1 ln2(x))."""
    import math

    import torch.nn.functional as F

    cfg = tiny_model_cfg("gpt2")
    model = build_model(cfg).eval()
    blk = model.transformer.h[0]
    x = torch.randn(2, 10, cfg.n_embd)
    h = F.layer_norm(x, (cfg.n_embd,), blk.ln_1.weight, blk.ln_1.bias, 1e-5)
    q, k, v = (h @ blk.attn.c_attn.weight.T + blk.attn.c_attn.bias).split(cfg.n_embd, dim=-1)
    heads = lambda t: t.view(2, 10, cfg.n_head, -1).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    att = att.masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf")).softmax(-1)
    a = (att @ v).transpose(1, 2).reshape(2, 10, cfg.n_embd) @ blk.attn.c_proj.weight.T + blk.attn.c_proj.bias
    x1 = x + a
    h2 = F.layer_norm(x1, (cfg.n_embd,), blk.ln_2.weight, blk.ln_2.bias, 1e-5)
    m = F.gelu(h2 @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias, approximate="tanh")
    expected = x1 + m @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    with torch.no_grad():
        torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHES)
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    cfg = tiny_model_cfg(arch, dropout=0.1, router_noise="jitter") if arch == "moe" else tiny_model_cfg(arch, dropout=0.1)
    model = build_model(cfg).train()
    x = torch.randint(0, 97, (2, 32))
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        torch.manual_seed(7)  # same dropout masks and router noise; recomputation must replay them
        out = model(x, x.roll(-1, 1))
        (out.loss + out.aux.get("loss", 0)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_dropout_keeps_1_minus_p_and_rescales():
    from minideep_cli.models.fast import dropout

    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, 0.25, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))  # inverted: the mean is kept
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient = mask / (1 - p)
    assert dropout(x, 0.25, False) is x and dropout(x, 0.0, True) is x  # eval and p = 0 skip it


MLA = dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)


@pytest.mark.parametrize("arch,extra", [("gpt2", {}), ("moe", {}), ("moe", MLA)], ids=["gpt2", "moe-gqa", "moe-mla"])
def test_attention_dropout_is_its_own_knob(arch, extra):
    x = torch.randint(0, 97, (2, 32))

    def two_training_forwards(**kw):
        torch.manual_seed(0)
        model = build_model(tiny_model_cfg(arch, **extra, **kw)).train()
        with torch.no_grad():
            return model(x).logits, model(x).logits

    a, b = two_training_forwards(dropout=0.0, attention_dropout=0.5)
    assert not torch.equal(a, b)  # attention weights dropped, although dropout is 0
    a, b = two_training_forwards(dropout=0.0)  # unset: follows dropout (0)
    assert torch.equal(a, b)
    a, b = two_training_forwards(dropout=0.3, attention_dropout=0.0)
    assert not torch.equal(a, b)  # residual and embedding dropout still on

    def attention_rates(**kw):
        model = build_model(tiny_model_cfg(arch, **extra, **kw))
        return {getattr(m, "attn_dropout", getattr(m, "dropout", None)) for n, m in model.named_modules()
                if n.endswith(".attn")}

    assert attention_rates(dropout=0.3) == {0.3} and attention_rates(dropout=0.3, attention_dropout=0.0) == {0.0}


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "head-view"])
def test_fast_rmsnorm_equals_the_reference_forward_and_backward(transposed):
    from minideep_cli.models import fast, layers

    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 16) * 3 + 0.5
    if transposed:  # as qk_norm sees queries: (B, T, H, D) viewed as (B, H, T, D)
        x = x.transpose(1, 2)
    g = torch.randn(x.shape)
    ref, new = layers.RMSNorm(16), fast.RMSNorm(16)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(16))
        new.weight.copy_(ref.weight)

    def run(norm):
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(g)
        return y.detach(), xi.grad, norm.weight.grad, y.grad_fn

    y0, gx0, gw0, _ = run(ref)
    y1, gx1, gw1, fn = run(new)
    assert type(fn).__name__ == "RMSNormFunctionBackward"  # the speed path ran, not the reference
    assert torch.allclose(y1, y0, atol=1e-6, rtol=1e-5)
    assert torch.allclose(gx1, gx0, atol=1e-5, rtol=1e-4)
    assert torch.allclose(gw1, gw0, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # evaluation and decoding take the reference itself
        assert torch.equal(new(x), ref(x))


def test_fast_rmsnorm_backward_is_the_derivative():
    from minideep_cli.models.fast import RMSNormFunction

    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))
