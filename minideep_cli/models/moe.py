"""Sparse Mixture-of-Experts feed-forward: router, capacity, dispatch, balancing.

One MoE layer, for N tokens of width d, E experts and top-k routing:

  router   logits = x W_r^T in fp32 (N, E); training-only noise; top-k selection
  gates    softmax probabilities read at the chosen k (raw for k = 1, as Switch; renormalised
           over the k only with norm_topk), or sigmoid scores (DeepSeek-V3); a selection-only
           bias shifts which experts are chosen but never weights them
  capacity ceil(capacity_factor * N * k / E) assignments per expert; overflow decided in
           position-major order (all sequences' position 0, then 1, ...), so a token's fate never
           depends on later tokens of its own sequence
  dispatch sort the N*k assignments by expert, run each expert on its contiguous slice
           (Experts.loop; fast.py runs grouped matmuls where available, and a single token
           at inference on CPU, a decoding step, through its k experts directly), weight by
           gates, sum a token's k outputs
  balance  Switch aux loss E * sum_i f_i P_i (1.0 when uniform) and router z-loss
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast import one_token, run_experts
from .layers import feed_forward
from .moe_arch import MoEConfig

def switch_aux_loss(probs: torch.Tensor, counts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E * sum_i f_i * P_i, f_i = share of the N*k assignments given to expert i, P_i = mean router
    probability of expert i; exactly 1.0 when routing is uniform, for any k. probs (N, E), counts (E,)."""
    f = counts.float() / counts.sum().clamp_min(1)
    return n_experts * (f * probs.mean(dim=0)).sum()


def capacity_for(capacity_factor: float | None, n_tokens: int, k: int, n_experts: int) -> int | None:
    return None if capacity_factor is None else math.ceil(capacity_factor * n_tokens * k / n_experts)


class Router(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.n_embd))
        if cfg.router_noise == "noisy_topk":  # learned per-expert noise scale (Shazeer et al. 2017)
            self.noise_weight = nn.Parameter(torch.zeros(cfg.n_experts, cfg.n_embd))
        # selection-only bias for auxiliary-loss-free balancing; updated by the training loop
        self.register_buffer("bias", torch.zeros(cfg.n_experts))

    def forward(self, x: torch.Tensor):
        """x (N, d) -> top-k expert ids (N, k), gates (N, k), probs (N, E), clean logits (N, E); fp32."""
        cfg = self.cfg
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            logits = F.linear(x32, self.weight.float())  # (N, E)
            noisy = logits
            if self.training and cfg.router_noise == "jitter":
                noisy = logits + torch.randn_like(logits) * cfg.router_noise_std
            elif self.training and cfg.router_noise == "noisy_topk":
                noisy = logits + torch.randn_like(logits) * F.softplus(F.linear(x32, self.noise_weight.float()))
            if cfg.router == "softmax":
                scores = probs = noisy.softmax(dim=-1)  # (N, E)
            else:
                scores = noisy.sigmoid()
                probs = scores / scores.sum(dim=-1, keepdim=True)
            expert_ids = (scores + self.bias).topk(cfg.top_k, dim=-1).indices  # (N, k)
            gates = scores.gather(1, expert_ids)  # (N, k)
            if cfg.norm_topk and cfg.top_k > 1:
                gates = gates / gates.sum(dim=-1, keepdim=True)
        return expert_ids, gates, probs, logits


class Experts(nn.Module):
    """E experts as stacked weights, used as x @ w[e]: w1 (E, d, h), w2 (E, h, d), and for
    SwiGLU the gate's w3 (E, d, h)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        if activation == "swiglu":
            self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def weights(self) -> list[torch.Tensor]:
        """The stacked matrices in the order the grouped function takes them."""
        return [self.w1, self.w3, self.w2] if self.activation == "swiglu" else [self.w1, self.w2]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, d) sorted by expert, counts (E,) rows per expert -> (M, d): fast.run_experts, which
        runs grouped matmuls where they pay and the loop below elsewhere."""
        return run_experts(self, x, counts)

    def loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The reference: each expert that received rows on its own slice (a loop over experts,
        never tokens). x (M, d), counts (E,) -> (M, d)."""
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                out.append(self.one(e, x[start : start + n]))
            start += n
        return torch.cat(out) if out else x.new_zeros(0, self.w2.size(-1))

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x (n, d) -> (n, d)."""
        if self.activation == "relu2":
            return F.relu(x @ self.w1[e]).square() @ self.w2[e]
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig, expert_hidden: int):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg.n_experts, cfg.n_embd, expert_hidden, cfg.activation)
        shared = cfg.n_shared_experts * expert_hidden
        self.shared = feed_forward(cfg.activation, cfg.n_embd, shared) if shared else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x (B, T, d) -> y (B, T, d), routing stats (tensors; no host sync on CUDA)."""
        cfg = self.cfg
        B, T, d = x.shape
        N, k, E = B * T, cfg.top_k, cfg.n_experts
        flat = x.reshape(N, d)
        expert_ids, gates, probs, logits = self.router(flat)  # (N, k), (N, k), (N, E), (N, E)
        if N == 1 and not self.training and x.device.type == "cpu":  # a decoding step
            return one_token(self, x, expert_ids, gates, probs, logits)  # fast.py: same result, no sort

        # Order the N*k assignments by expert, and within an expert by priority.
        a = torch.arange(N * k, device=x.device)
        token = a // k  # assignment -> token (b * T + t)
        if cfg.drop_policy == "gate":  # batch-prioritised: higher gate first (leaks the future!)
            prio = torch.empty_like(a).scatter_(0, gates.flatten().argsort(descending=True, stable=True), a)
        else:  # position-major: (t, b, choice)
            prio = ((token % T) * B + token // T) * k + a % k
        e_flat = expert_ids.flatten()  # (N*k,)
        order = (e_flat * (N * k) + prio).argsort()  # (N*k,) grouped by expert, priority within
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, e_flat, torch.ones_like(e_flat))  # (E,)
        starts = counts.cumsum(0) - counts
        rank = a - starts[e_flat[order]]  # place in its expert's queue
        capacity = capacity_for(cfg.capacity_factor if self.training else cfg.eval_capacity_factor, N, k, E)
        keep = rank < capacity if capacity is not None else torch.ones_like(rank, dtype=torch.bool)

        # index_select, not x[idx]: its backward is an index_add, where indexing's is an accumulating
        # index_put, several times slower on CPU (docs/results/2026-11-29-cpu-changes.md)
        token_sorted = order // k  # (N*k,) = token[order]
        h = self.experts(flat.index_select(0, token_sorted), counts)  # (N*k, d), expert-sorted
        keep_tc = torch.empty_like(keep).index_copy_(0, order, keep).view(N, k)
        w = (gates.flatten().index_select(0, order) * keep).to(h.dtype)  # dropped assignments weigh 0: only the residual stays
        y = h.new_zeros(N, d).index_add_(0, token_sorted, h * w.unsqueeze(-1))  # (N, d): add each token's k outputs
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, T, d).to(x.dtype), self.stats(expert_ids, gates, probs, logits, counts, keep_tc)

    def stats(self, expert_ids, gates, probs, logits, counts, kept) -> dict:
        """Routing statistics (tensors, no host sync) and the weighted balancing losses."""
        cfg = self.cfg
        aux = switch_aux_loss(probs, counts, cfg.n_experts)
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
        return {
            "tokens_per_expert": counts.detach(),
            "dropped": (~kept).sum().detach(),
            "assignments": kept.numel(),
            "expert_ids": expert_ids.detach(),  # (N, k), tokens in (b, t) order
            "gates": gates.detach(),  # (N, k) weights of the chosen experts
            "probs": probs.detach(),  # (N, E) router probabilities (normalised scores for sigmoid)
            "kept": kept.detach(),  # (N, k) False where capacity dropped the assignment
            "entropy": entropy.detach(),
            "aux": aux.detach(),
            "z": z.detach(),
            "loss": cfg.aux_loss_coef * aux + cfg.z_loss_coef * z,
        }
