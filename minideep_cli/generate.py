"""Sampling, with a KV cache (or recomputing everything, for checking)."""

from __future__ import annotations

from typing import Iterator, Optional

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 = greedy; top_k 0 and top_p 1 = off."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: Optional[torch.Generator] = None, use_cache: bool = True,
             device: str = "cpu") -> Iterator[int]:
    """Yield new token ids one at a time. With the cache, each step feeds only the newest token;
    when the context fills block_size, the cache is rebuilt from the last half of the context."""
    model.eval()
    block = model.cfg.block_size
    ids = list(prompt) or [0]
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache:
            x = torch.tensor([ids[-block:]], device=device)
            logits = model(x).logits[:, -1]
        else:
            if cache is None or cache.pos >= block:
                ctx = ids[-(block // 2):] if cache is not None else ids[-block:]
                cache = model.new_cache(1, block, device=device)
                logits = model(torch.tensor([ctx], device=device), cache=cache).logits[:, -1]
            else:
                logits = model(torch.tensor([ids[-1:]], device=device), cache=cache).logits[:, -1]
        nxt = int(sample_next(logits, temperature, top_k, top_p, generator)[0])
        ids.append(nxt)
        yield nxt
