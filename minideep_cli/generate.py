"""Sampling, with a KV cache (or recomputing everything, for checking).

`generate_steps` yields, for every new token, the token and what produced it: the logits it was
sampled from and each MoE layer's routing of the position that predicted it (the live routing
view reads these). `generate` yields only the ids.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class Step:
    token: int  # the id generation chose
    logits: torch.Tensor  # (V,) fp32 logits it was chosen from (before temperature and filtering)
    aux: dict  # the model's aux of the forward that produced it ("routing", "moe_layers")

    @property
    def moe_layers(self) -> list[int]:
        return list(self.aux.get("moe_layers", []))

    def routing(self) -> dict:
        """The MoE layers' choices at the position that predicted this token: expert_ids (L, k),
        gates (L, k), probs (L, E), L = len(moe_layers); {} for a dense model. Computed on demand,
        so plain sampling never pays for it."""
        stats = self.aux.get("routing", [])
        if not stats:
            return {}
        return {key: torch.stack([s[key][-1] for s in stats]) for key in ("expert_ids", "gates", "probs")}


def is_sharded(model) -> bool:
    """True when FSDP2 has sharded the model's parameters (DTensors)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def generate_steps(model, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, generator: Optional[torch.Generator] = None, use_cache: bool = True,
                   device: str = "cpu") -> Iterator[Step]:
    """Yield a Step per new token. With the cache, each step feeds only the newest token. When the
    context fills block_size it restarts from its last half (positions from 0 again; the cache is
    rebuilt), and use_cache=False recomputes that same context, so both give the same tokens.
    Runs under inference_mode (less overhead per token than no_grad), or no_grad for an
    FSDP-sharded model, which older torch cannot run in inference mode. The mode applies inside
    each step only: the caller's code between tokens keeps its own."""
    mode = torch.no_grad if is_sharded(model) else torch.inference_mode
    return mode()(_steps)(model, prompt, max_new_tokens, temperature, top_k, top_p, generator, use_cache, device)


def _steps(model, prompt, max_new_tokens, temperature, top_k, top_p, generator, use_cache, device) -> Iterator[Step]:
    model.eval()
    block = model.cfg.block_size
    ids = list(prompt) or [0]
    start = max(0, len(ids) - block)  # the model sees ids[start:], with or without the cache
    cache = None
    for _ in range(max_new_tokens):
        if len(ids) - start > block:  # the context is full: start again from its last half
            start, cache = len(ids) - max(1, block // 2), None
        if not use_cache:
            out = model(torch.tensor([ids[start:]], device=device))
        elif cache is None:
            cache = model.new_cache(1, block, device=device)
            out = model(torch.tensor([ids[start:]], device=device), cache=cache)
        else:
            out = model(torch.tensor([ids[-1:]], device=device), cache=cache)
        logits = out.logits[:, -1]  # (1, V)
        nxt = int(sample_next(logits, temperature, top_k, top_p, generator)[0])
        ids.append(nxt)
        yield Step(nxt, logits[0].float(), out.aux)


def generate(model, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: Optional[torch.Generator] = None, use_cache: bool = True,
             device: str = "cpu") -> Iterator[int]:
    """Yield new token ids one at a time (see generate_steps)."""
    for step in generate_steps(model, prompt, max_new_tokens, temperature, top_k, top_p, generator, use_cache, device):
        yield step.token
