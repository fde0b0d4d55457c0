"""Cached decoding against recomputing the whole context, on the device: the same greedy tokens
for gpt2 and the moe arch with gqa, mla and latent attention (fp32 weights, so that rounding
cannot flip a near-tie), also past block_size where the context restarts."""

import pytest
import torch
from gpu_env import pytestmark, rig  # noqa: F401

from minideep_cli.generate import generate
from minideep_cli.models import build_model

VARIANTS = [("gpt2", None), ("moe", "gqa"), ("moe", "mla"), ("moe", "latent")]


@pytest.mark.parametrize("arch,attention", VARIANTS, ids=[a if b is None else f"{a}-{b}" for a, b in VARIANTS])
def test_cached_tokens_equal_full_forward(rig, record_property, arch, attention):
    cfg = rig.config("rtx3060", arch, attention)
    m = cfg.model
    m.dropout, m.block_size = 0.0, min(m.block_size, 16 if rig.cpu_mode else 128)
    m.vocab_size = 300 if rig.cpu_mode else cfg.data.vocab_size
    torch.manual_seed(0)
    model = build_model(m).to(rig.device).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, m.vocab_size, (m.block_size // 2,), generator=g).tolist()
    n = m.block_size // 2 + 8  # runs past block_size: the context restarts from its last half
    cached = list(generate(model, prompt, n, temperature=0.0, use_cache=True, device=rig.device))
    full = list(generate(model, prompt, n, temperature=0.0, use_cache=False, device=rig.device))
    same = next((i for i, (a, b) in enumerate(zip(cached, full)) if a != b), len(full))
    record_property("tokens", n)
    record_property("first_difference", same if same < n else None)
    assert cached == full, f"first difference at token {same}"
