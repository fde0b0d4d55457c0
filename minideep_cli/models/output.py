"""What every model's forward returns."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class Output(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab)
    loss: Optional[torch.Tensor]  # mean token cross-entropy in nats, when targets are given
    aux: dict  # "loss": weighted balancing losses to add in training; "routing": per-layer stats


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
