"""The attention variants (docs/design.md, The models): gqa, mla (DeepSeek-V2 latent KV) and latent (causal
latent slots). Causality, cached == full, mla absorbed == naive, latent parallel == recurrent,
cache sizes, config and presets."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_cfg

from minideep_cli.config import Config, resolve_config
from minideep_cli.errors import UserError
from minideep_cli.generate import generate
from minideep_cli.models import attention_name, build_model
from minideep_cli.models.attention import (LatentAttention, MLAttention, SlotCache, slot_attention_parallel,
                                           slot_attention_step)
from minideep_cli.models.fast import attend, attention_with_dropout, keep_scale
from minideep_cli.models.layers import causal_attention
from minideep_cli.models.layers import apply_rope, rope_tables

VARIANTS = ["gqa", "mla", "latent"]
# tiny widths: n_embd 32, 4 heads of 8, 2 KV heads
EXTRA = {"gqa": {}, "mla": dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                v_head_dim=8),
         "latent": dict(n_latents=4)}


def model_for(variant: str, **kw):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg("moe", attention=variant, **{**EXTRA[variant], **kw})).eval()
    if variant == "latent":  # sharpen the slots so they are far from plain means
        with torch.no_grad():
            for b in model.blocks:
                b.attn.latents.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("t", [13, 37])  # in the first and in the second 32-position latent chunk
@pytest.mark.parametrize("variant", VARIANTS)
def test_later_tokens_never_change_earlier_logits(variant, t):
    model = model_for(variant, block_size=48)
    x = torch.randint(0, 97, (3, 48))
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 97, (3, 48 - t - 1))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])  # bit-identical up to t
    assert not torch.equal(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_forward_equals_full_forward(variant):
    model = model_for(variant, block_size=64)
    x = torch.randint(0, 97, (2, 60))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2)
        cuts = [(0, 11), (11, 12), (12, 13), (13, 43), (43, 60)]  # prefill, two steps, two long chunks
        parts = [model(x[:, a:b], cache=cache).logits for a, b in cuts]
    assert cache.pos == 60
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_cached_decoding_equals_uncached(variant):
    model = model_for(variant, block_size=64)
    prompt = torch.randint(0, 97, (9,)).tolist()
    cached = list(generate(model, prompt, 40, temperature=0.0, use_cache=True))
    plain = list(generate(model, prompt, 40, temperature=0.0, use_cache=False))
    assert cached == plain and len(cached) == 40


# ---------------------------------------------------------------- mla


def mla_module(q_lora_rank: int) -> MLAttention:
    torch.manual_seed(1)
    attn = MLAttention(32, 4, q_lora_rank, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return attn.eval()


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_mla_absorbed_equals_naive(q_lora_rank):
    attn = mla_module(q_lora_rank)
    cos, sin = rope_tables(4, 20, 10000.0)
    q_nope, q_pe, c, k_pe = attn.project(torch.randn(2, 20, 32), cos, sin)
    with torch.no_grad():
        naive = attn.naive(q_nope, q_pe, c, k_pe)  # (B, nh, 20, dv)
        for tq in (20, 5, 1):  # the whole sequence; the last tq queries over every key (decoding)
            absorbed = attn.absorbed(q_nope[:, :, -tq:], q_pe[:, :, -tq:], torch.cat([c, k_pe], -1))
            torch.testing.assert_close(absorbed, naive[:, :, -tq:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_mla_matches_the_published_formulas(q_lora_rank):
    """DeepSeek-V2 MLA written out per head: c = RMSNorm(x W_dkv), k_R = RoPE(x W_kr) shared by
    heads, k_h = [c W_uk_h, k_R], v_h = c W_uv_h, q_h = [q_C_h, RoPE(q_R_h)], softmax over i <= t."""
    attn = mla_module(q_lora_rank)
    B, T, H, dn, dr, dv, r = 2, 9, 4, 6, 4, 5, 12
    x = torch.randn(B, T, 32)
    cos, sin = rope_tables(dr, T, 10000.0)
    if q_lora_rank:
        cq = x @ attn.wq_a.weight.T
        cq = cq * torch.rsqrt(cq.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.q_norm.weight
        q = cq @ attn.wq_b.weight.T
    else:
        q = x @ attn.wq.weight.T
    q = q.view(B, T, H, dn + dr)
    ckv = x @ attn.wkv_a.weight[:r].T
    c = ckv * torch.rsqrt(ckv.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.kv_norm.weight  # (B, T, r)
    k_rope = apply_rope(x @ attn.wkv_a.weight[r:].T, cos, sin)  # (B, T, dr)
    w_up = attn.wkv_b.weight.view(H, dn + dv, r)
    heads = []
    for h in range(H):
        k = torch.cat([c @ w_up[h, :dn].T, k_rope], -1)  # (B, T, dn+dr)
        v = c @ w_up[h, dn:].T  # (B, T, dv)
        qh = torch.cat([q[:, :, h, :dn], apply_rope(q[:, :, h, dn:], cos, sin)], -1)
        att = (qh @ k.transpose(1, 2)) / math.sqrt(dn + dr)
        att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
        heads.append(att @ v)
    expected = torch.cat(heads, -1) @ attn.wo.weight.T
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-5)
        cache = attn.new_cache(B, T, torch.float32, "cpu")
        stepped = [attn(x[:, t : t + 1], cos[t : t + 1], sin[t : t + 1], cache, t) for t in range(T)]
        torch.testing.assert_close(torch.cat(stepped, 1), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- latent


def slot_reference(q, k, v, s):
    """Readable float64 definition: slot j at t holds softmax_{i<=t}(s_ij)-weighted k_i and v_i."""
    q, k, v, s = (t.double() for t in (q, k, v, s))
    T = q.size(2)
    later = torch.ones(T, T, dtype=torch.bool).triu(1).unsqueeze(-1)  # (t, i, 1)
    w = s.unsqueeze(2).expand(*s.shape[:2], T, *s.shape[2:]).masked_fill(later, float("-inf")).softmax(3)
    slot_k = torch.einsum("bhtil,bhid->bhtld", w, k)  # (B, nh, T, L, hs)
    slot_v = torch.einsum("bhtil,bhid->bhtld", w, v)
    p = torch.einsum("bhtd,bhtld->bhtl", q, slot_k).softmax(-1)
    return torch.einsum("bhtl,bhtld->bhtd", p, slot_v)


def slot_inputs(T: int, logit_scale: float):
    g = torch.Generator().manual_seed(3)
    B, H, D, L = 2, 3, 8, 5
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    rates = torch.tensor([2.0, -2.0, 0.5, 0.0, 0.01])  # recency terms up to +-600 over 300 positions
    s = logit_scale * torch.randn(B, H, T, L, generator=g) + torch.arange(T)[:, None] * rates
    return q, k, v, s


@pytest.mark.parametrize("logit_scale", [1.0, 1000.0])
def test_latent_parallel_equals_recurrent_and_the_definition(logit_scale):
    T = 300  # not a multiple of the 32-position chunk
    q, k, v, s = slot_inputs(T, logit_scale)
    start = SlotCache(2, 3, 5, 8, "cpu").read()
    y, final = slot_attention_parallel(q, k, v, s, start, chunk=32)
    state, steps = start, []
    for t in range(T):
        yt, state = slot_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], s[:, :, t], state)
        steps.append(yt)
    assert (y - torch.stack(steps, 2)).abs().max() < 1e-5
    for a, b in zip(final, state):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max())
    assert (y.double() - slot_reference(q, k, v, s)).abs().max() < 1e-5
    y2, _ = slot_attention_parallel(q, k, v, s, start, chunk=7)  # the chunk size is only a schedule
    assert (y2 - y).abs().max() < 1e-5


def test_latent_module_parallel_equals_recurrent_with_large_slot_logits():
    torch.manual_seed(2)
    attn = LatentAttention(32, 4, 6).eval()
    with torch.no_grad():
        for p in attn.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)
        attn.latents.mul_(300.0)  # content logits in the hundreds
        attn.slot_decay.copy_(torch.linspace(-1.5, 1.5, attn.slot_decay.numel()))
    T = 260
    x = torch.randn(1, T, 32)
    cos, sin = rope_tables(8, T, 10000.0)
    with torch.no_grad():
        full = attn(x, cos, sin)
        cache = attn.new_cache(1, T, torch.float32, "cpu")
        stepped = torch.cat([attn(x[:, t : t + 1], cos[t : t + 1], sin[t : t + 1], cache, t) for t in range(T)], 1)
    assert torch.isfinite(full).all()
    # relative to the output's scale: logits of ~300 are themselves rounded (fp32 spacing 3e-5)
    # differently by the T=260 and T=1 matmuls; with identical logits the forms agree to 1e-5 above
    assert (full - stepped).abs().max() < 2e-5 * full.abs().max()


def test_latent_state_stays_the_same_size_while_decoding_1000_tokens():
    model = model_for("latent", block_size=1024, n_layer=1, first_k_dense=1)
    x = torch.randint(0, 97, (1, 1001))
    cache = model.new_cache(1)
    size = cache.nbytes()
    assert size == model.cache_state_bytes() == 4 * 4 * 4 * (2 * 8 + 2)  # nh * L * (2 hs + 2) fp32
    ptrs = [t.data_ptr() for t in cache.layers[0].read()]
    with torch.no_grad():
        model(x[:, :1], cache=cache)
        for t in range(1, 1001):
            last = model(x[:, t : t + 1], cache=cache).logits
            assert cache.nbytes() == size
        full = model(x).logits[:, -1:]
    assert cache.pos == 1001 and [t.data_ptr() for t in cache.layers[0].read()] == ptrs
    torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- all variants


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_sizes_match_their_formulas(variant):
    model = model_for(variant)
    per_layer = {"gqa": 2 * 2 * 8, "mla": 16 + 4, "latent": 0}[variant]  # 2 nkv hs | r + dr | 0
    state = {"gqa": 0, "mla": 0, "latent": 4 * 4 * (2 * 8 + 2) * 4}[variant]  # fp32 bytes per layer
    for attn in (b.attn for b in model.blocks):
        assert attn.cache_numbers_per_token() == per_layer
    for dtype in (torch.float32, torch.bfloat16):
        assert model.cache_bytes_per_token(dtype) == 2 * per_layer * dtype.itemsize  # 2 layers
        assert model.cache_state_bytes(dtype) == 2 * state
        cache = model.new_cache(3, 50, dtype=dtype)
        assert cache.nbytes() == 3 * (50 * model.cache_bytes_per_token(dtype) + model.cache_state_bytes(dtype))


def test_gpt2_reports_its_cache_size_too():
    model = build_model(tiny_model_cfg("gpt2"))
    assert model.cache_bytes_per_token() == 2 * 2 * 32 * 4 and model.cache_state_bytes() == 0
    assert model.new_cache(3, 20).nbytes() == 3 * 20 * model.cache_bytes_per_token()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_finite_gradient(variant):
    model = model_for(variant, block_size=48).train()
    x = torch.randint(0, 97, (2, 48))
    out = model(x, torch.roll(x, -1, 1))
    (out.loss + out.aux["loss"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if ".attn." in name:
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["mla", "latent"])
def test_tiny_model_overfits_one_batch(variant):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg("moe", attention=variant, capacity_factor=None, **EXTRA[variant]))
    x = torch.randint(0, 97, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        out = model(x, y)
        opt.zero_grad()
        (out.loss + out.aux["loss"]).backward()
        opt.step()
    assert out.loss.item() < 0.2


def test_gqa_score_flops_are_the_usual_formula():
    model = model_for("gqa")
    c = model.cfg
    assert sum(b.attn.score_flops_per_token(32) for b in model.blocks) == 12 * c.n_layer * c.n_embd * 32


# ---------------------------------------------------------------- config and presets


def test_config_accepts_the_variants_and_rejects_mistakes():
    for variant in VARIANTS:
        assert resolve_config(None, None, [f"model.attention={variant}"], arch="moe").model.attention == variant
    with pytest.raises(UserError, match="model.attention must be"):
        resolve_config(None, None, ["model.attention=flash"], arch="moe")
    with pytest.raises(UserError, match=r"moe-arch setting \(the gpt2 arch does not have it\)"):  # gpt2: always MHA
        resolve_config(None, None, ["model.attention=mla"], arch="gpt2")
    with pytest.raises(UserError, match="even"):
        resolve_config(None, None, ["model.attention=mla", "model.qk_rope_head_dim=5"], arch="moe")
    with pytest.raises(UserError, match="kv_lora_rank"):
        resolve_config(None, None, ["model.attention=mla", "model.kv_lora_rank=0"], arch="moe")
    with pytest.raises(UserError, match="n_latents"):
        resolve_config(None, None, ["model.attention=latent", "model.n_latents=0"], arch="moe")
    saved = Config.from_dict(resolve_config(None, None, ["model.attention=mla"], arch="moe").to_dict())
    assert saved.model.attention == "mla" and saved.model.kv_lora_rank == 64


def numbers_per_token(cfg) -> int:
    with torch.device("meta"):
        return build_model(cfg.model).blocks[0].attn.cache_numbers_per_token()


@pytest.mark.parametrize("preset,gqa,mla", [("cpu", 192, 112), ("rtx3060", 640, 288), ("a100", 512, 288)])
def test_preset_mla_ranks_cache_less_than_gqa(preset, gqa, mla):
    assert numbers_per_token(resolve_config(preset, None, [], arch="moe")) == gqa
    assert numbers_per_token(resolve_config(preset, None, ["model.attention=mla"], arch="moe")) == mla < gqa
    assert numbers_per_token(resolve_config(preset, None, ["model.attention=latent"], arch="moe")) == 0


def test_seed_preset_uses_latent_attention_with_16_slots():
    cfg = resolve_config("seed", None, [], arch="moe")
    assert cfg.model.attention == "latent" and cfg.model.n_latents == 16
    assert attention_name(resolve_config("seed", None, [], arch="gpt2").model) == "mha"  # the moe: section only


# ---------------------------------------------------------------- slow: no variant beats chance


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_uniform_random_text_cannot_be_predicted_below_log2_k(tmp_path, variant):
    """Independent uniform characters from k letters carry log2(k) bits each: a model that reads
    the future would get below that on validation; a causal one can only approach it."""
    from minideep_cli.data import tokenize_text
    from minideep_cli.train import train

    k = 8
    g = torch.Generator().manual_seed(11)
    text = "".join("abcdefgh"[i] for i in torch.randint(0, k, (100_000,), generator=g).tolist())
    tokenize_text(text, tmp_path / "data", vocab_size=264, source="uniform")
    cfg = Config()
    cfg.model = tiny_model_cfg("moe", attention=variant, n_embd=64, block_size=64, capacity_factor=None,
                               **EXTRA[variant])
    cfg.data.dir = str(tmp_path / "data")
    for key, value in dict(batch_size=16, max_steps=300, max_minutes=0.0, lr=1e-2, eval_interval=300,
                           eval_iters=5, log_interval=50, sample_tokens=0).items():
        setattr(cfg.train, key, value)
    result = train(cfg, tmp_path / "run")
    bpb = result.val["bpb"]
    print(f"{variant}: val bpb {bpb:.4f} after {result.step} steps (log2 k = {math.log2(k):.4f})")
    assert bpb > math.log2(k) - 0.01  # sampling noise of the validation text is ~1e-3
    assert bpb < math.log2(k) + 0.25  # and it learned the alphabet (untrained: ~5): the run is not vacuous


@pytest.mark.parametrize("q_len", [16, 1])  # training / prefill, and one decoded token over the cache
def test_low_precision_attention_on_cpu_runs_in_fp32(q_len):
    """torch's CPU attention kernel is slow in bf16, so bf16 inputs are attended in fp32 and the
    result rounded once, also under autocast (which would otherwise cast the inputs back down)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, q_len, 8).bfloat16()
    k, v = torch.randn(2, 2, 4, 16, 8).bfloat16().unbind(0)
    for dropout, scale in [(0.0, None), (0.0, 0.3), (0.5, 0.3)]:  # both reach the fp32 call
        torch.manual_seed(1)
        want = attend(q.float(), k.float(), v.float(), dropout, scale).bfloat16()
        torch.manual_seed(1)
        got = attend(q, k, v, dropout, scale)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(attend(q, k, v, dropout, scale), want)
    # the reference, which is how a GPU attends (the memory estimate's trace): bf16 stays bf16
    got = causal_attention(q, k, v, 0.0, 0.3)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, scale=0.3))


def test_keep_scale_drops_p_in_every_lane_and_keeps_the_mean():
    """Four 16-bit masks come from each 64-bit random number: every quarter (the one holding the
    sign bit too) must drop at rate p, and the kept values restore the mean."""
    for p in (0.1, 0.5, 0.9):
        torch.manual_seed(0)
        m = keep_scale((250_001,), p)  # odd length: the last random number is partly unused
        p_used = round(p * 65536) / 65536
        dropped = m == 0
        assert torch.equal(m[~dropped], torch.full_like(m[~dropped], 1 / (1 - p_used)))
        assert abs(dropped.float().mean().item() - p) < 0.003
        for lane in range(4):
            assert abs(dropped[lane::4].float().mean().item() - p) < 0.006, (p, lane)
        assert abs(m.mean().item() - 1) < 0.02
        torch.manual_seed(0)
        assert torch.equal(keep_scale((250_001,), p), m)  # replayed from the generator (checkpointing recomputes it)
    m = keep_scale((3, 5, 7), 0.25, dtype=torch.bfloat16)  # any shape and dtype: the scale rounded once
    assert m.shape == (3, 5, 7) and m.dtype == torch.bfloat16
    assert set(m.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).bfloat16().item()}
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError):
            keep_scale((4,), bad)


@pytest.mark.parametrize("hkv", [4, 2])  # one key/value head per query head, and grouped (2 per group)
@pytest.mark.parametrize("tq", [16, 5])  # training, and a prefix of queries over a longer cache
def test_attention_dropout_drops_weights_after_the_softmax(tq, hkv):
    """fast.attend with dropout on CPU (attention_with_dropout) against attention written per
    query with the same mask: softmax over the keys the query may see, then drop and rescale.
    Query head h reads key/value head h // (H / Hkv)."""
    torch.manual_seed(0)
    B, H, Tk, D = 2, 4, 16, 8
    q = torch.randn(B, H, tq, D, requires_grad=True)
    k, v = (t.requires_grad_() for t in torch.randn(2, B, hkv, Tk, D).unbind(0))
    torch.manual_seed(1)
    got = attend(q, k, v, 0.3, 0.4)
    torch.manual_seed(1)
    mask = keep_scale((B, H, tq, Tk), 0.3)
    kh, vh = k.repeat_interleave(H // hkv, 1), v.repeat_interleave(H // hkv, 1)  # (B, H, Tk, D)
    rows = []
    for i in range(tq):
        seen = Tk - tq + i + 1  # query i sits at position Tk - tq + i
        w = (q[:, :, i : i + 1] @ kh[:, :, :seen].transpose(-2, -1) * 0.4).softmax(-1)  # (B, H, 1, seen)
        rows.append((w * mask[:, :, i : i + 1, :seen]) @ vh[:, :, :seen])
    want = torch.cat(rows, 2)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), g)
    for a, b in zip(grads, torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b)
    # nothing dropped: torch's attention
    causal = torch.ones(tq, Tk, dtype=torch.bool).tril(Tk - tq)
    torch.testing.assert_close(attention_with_dropout(q, k, v, 0.0, 0.4),
                               F.scaled_dot_product_attention(q, kh, vh, attn_mask=causal, scale=0.4))


@pytest.mark.parametrize("tq", [16, 5, 1])  # training, a prefix over a cache, one decoded token
def test_grouped_heads_attend_without_copies_as_with_them(tq):
    """On CPU fast.attend takes grouped keys and values as they are (Hkv < H); the result and the
    gradients equal attention over keys and values copied per query head."""
    torch.manual_seed(0)
    B, H, hkv, Tk, D = 2, 6, 2, 16, 8
    q = torch.randn(B, H, tq, D, requires_grad=True)
    k, v = (t.requires_grad_() for t in torch.randn(2, B, hkv, Tk, D).unbind(0))
    want = causal_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for kernel in (attend, causal_attention):  # in place (CPU), and copied per query head (the reference, a GPU's way)
        got = kernel(q, k, v)
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), g), want_grads):
            torch.testing.assert_close(a, b)
