"""Loss, perplexity and bits per byte (docs/design.md, Definitions):

    bpb = sum of token NLL in nats / (ln 2 * UTF-8 bytes of the tokens predicted)

Evaluation covers a token array in non-overlapping windows of block_size, so every token but
the first is predicted exactly once.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


def bits_per_byte(nll: float, n_bytes: float) -> float:
    """Summed token NLL in nats over the UTF-8 bytes of those tokens, in bits (nan for no bytes)."""
    return nll / (math.log(2) * n_bytes) if n_bytes else float("nan")


def autocast_for(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def nll_and_bytes(model, x: torch.Tensor, y: torch.Tensor, byte_len: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed NLL (nats), summed target bytes and target count for a batch; targets < 0 ignored."""
    with ctx:
        logits = model(x).logits  # (B, T, V)
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
    valid = y >= 0
    return nll, byte_len[y.clamp_min(0)][valid].sum(), valid.sum()


@torch.no_grad()
def evaluate_tokens(
    model,
    tokens: np.ndarray,
    byte_lengths: list[int],
    block_size: int,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Every token after the first predicted once -> {loss, perplexity, bpb, tokens, bytes}."""
    n = len(tokens)
    if n < 2:
        raise ValueError("need at least 2 tokens to evaluate")
    was_training = model.training
    model.eval()
    byte_len = torch.tensor(byte_lengths, dtype=torch.float64, device=device)
    ctx = autocast_for(device, dtype)
    starts = list(range(0, n - 1, block_size))
    nll = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for b in range(0, len(starts), batch_size):
        chunk = starts[b : b + batch_size]
        x = torch.zeros(len(chunk), block_size, dtype=torch.long)
        y = torch.full((len(chunk), block_size), -1, dtype=torch.long)
        for r, s in enumerate(chunk):
            window = torch.from_numpy(np.asarray(tokens[s : s + block_size + 1], dtype=np.int64))
            x[r, : len(window) - 1] = window[:-1]
            y[r, : len(window) - 1] = window[1:]
        a, c, d = nll_and_bytes(model, x.to(device), y.to(device), byte_len, ctx)
        nll += a
        nbytes += c
        count += d
        if progress:
            progress(min(b + batch_size, len(starts)), len(starts))
    model.train(was_training)
    nll_f, bytes_f, count_i = nll.item(), nbytes.item(), int(count.item())
    loss = nll_f / count_i
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpb": bits_per_byte(nll_f, bytes_f),
        "tokens": count_i,
        "bytes": int(bytes_f),
    }
