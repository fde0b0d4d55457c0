"""Optimizers and the learning-rate schedule.

train.optimizer = adamw: torch's AdamW on every parameter (weight decay on matrices and
embeddings, none on norms and biases).

train.optimizer = muon: Muon (momentum, then the update orthogonalised by a Newton-Schulz
iteration) on the hidden matrices the model names (its param_roles(): for both archs every Linear
weight inside the blocks, and the experts' stacked (E, d, h) weights, which are orthogonalised one
expert at a time in one batched iteration). AdamW on the rest: embeddings, the output head, norms,
biases, the router, latent attention's slots. One optimizer object (MuonAdamW) holds both, so
checkpoints, resume and the distributed code see one state dict.

Muon's step size follows torch's adjust_lr_fn="match_rms_adamw": the orthogonalised update is
scaled by 0.2 * sqrt(max(rows, cols)), which gives it about the RMS of an AdamW update, so
train.muon_lr is on AdamW's scale and weight decay means the same in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

ADJUST_LR = "match_rms_adamw"


# ---------------------------------------------------------------- schedule


def run_progress(step: int, elapsed: float, cfg) -> float:
    """Fraction of the run done: by steps, by time, or whichever budget is nearer its end."""
    t = cfg.train
    p = 0.0
    if t.max_steps > 0:
        p = max(p, step / t.max_steps)
    if t.max_minutes > 0:
        p = max(p, elapsed / (60.0 * t.max_minutes))
    return p


def lr_at(progress: float, cfg) -> float:
    """The schedule's multiplier of the base learning rates at this fraction of the run: a linear
    warmup over the first `warmup`, then cosine to min_lr_ratio, or (wsd) flat at 1 until the last
    `cooldown` of the run, and linear to min_lr_ratio over it."""
    t = cfg.train
    if progress < t.warmup:
        return (progress + 1e-3) / (t.warmup + 1e-3)
    if t.schedule == "wsd":
        frac = min(1.0, max(0.0, (progress - (1.0 - t.cooldown)) / max(1e-9, t.cooldown)))
        return 1.0 - (1.0 - t.min_lr_ratio) * frac
    frac = min(1.0, (progress - t.warmup) / max(1e-9, 1.0 - t.warmup))
    return t.min_lr_ratio + 0.5 * (1.0 - t.min_lr_ratio) * (1.0 + math.cos(math.pi * frac))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float, cfg) -> None:
    """Each group's learning rate: its kind's base rate (train.lr or train.muon_lr) x multiplier."""
    for group in optimizer.param_groups:
        base = cfg.train.muon_lr if group.get("kind", "adamw") != "adamw" else cfg.train.lr
        group["lr"] = base * multiplier


# ---------------------------------------------------------------- Muon for stacked experts


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """The quintic Newton-Schulz iteration torch.optim.Muon runs on one matrix, on a batch of
    them: g (E, m, n) -> about U V^T of each g[e] = U S V^T, in bf16. Each matrix is divided by
    its Frobenius norm (so every singular value is at most 1) and iterated in its wide
    orientation, as torch does."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT  # (E, n, m): rows <= columns
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT  # (E, r, r)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a)  # a * x + poly @ x
    return x.mT if tall else x


class ExpertMuon(torch.optim.Optimizer):
    """torch.optim.Muon's update for 3-D (E, m, n) parameters: each of the E matrices is treated
    as torch's Muon treats a 2-D one (its own momentum, Newton-Schulz, learning-rate adjustment by
    its (m, n) shape, decoupled weight decay), all E in one batched iteration. Tested equal to
    torch.optim.Muon run on each expert's slice on its own."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=(3.4445, -4.775, 2.0315), eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: str | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 3:
                    raise ValueError(f"ExpertMuon takes stacked (E, m, n) parameters, not {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape[1:]))


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape) -> float:
    """torch.optim.Muon's step size for one (m, n) matrix."""
    m, n = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(m, n))
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, m / n))
    return lr


# ---------------------------------------------------------------- one optimizer for both


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon (2-D hidden matrices), ExpertMuon (stacked experts) and torch.optim.AdamW
    (everything else) as one optimizer: one list of param groups, each with a `kind`, and one
    state dict. Each part steps its own groups; the parts share this object's group dicts and
    state, so torch's state_dict / load_state_dict see a single ordinary optimizer."""

    def __init__(self, groups: list[dict], adamw: dict, muon: dict):
        kinds = {"muon": lambda gs: torch.optim.Muon(gs, **muon),
                 "muon_experts": lambda gs: ExpertMuon(gs, **muon),
                 "adamw": lambda gs: torch.optim.AdamW(gs, **adamw)}
        self.parts = {}
        for kind, build in kinds.items():
            mine = [g for g in groups if g["kind"] == kind and g["params"]]
            if mine:
                self.parts[kind] = build(mine)  # fills in the part's defaults, in these same dicts
        super().__init__([g for part in self.parts.values() for g in part.param_groups], {})
        self._link()

    def _link(self) -> None:
        for kind, part in self.parts.items():
            part.param_groups = [g for g in self.param_groups if g["kind"] == kind]
            part.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts and a new state: share them again
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        for part in self.parts.values():
            part.step()


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """The optimizer's groups of (name, parameter), each with its kind and weight decay, from the
    roles the model gives its parameters (model.param_roles(), docs/design.md, Model interface):
    under Muon its "hidden" matrices go to Muon (2-D) or ExpertMuon (stacked 3-D); AdamW takes
    the rest, decaying "decay" ones (matrices, embeddings; "hidden" too under AdamW alone), never
    "plain" ones (norms, biases)."""
    t = cfg.train
    # a transformers model (bench's peers section, AdamW only) names no roles: matrices decay
    roles = model.param_roles() if hasattr(model, "param_roles") else {}
    named = [(n, p, roles.get(n) or ("decay" if p.dim() >= 2 else "plain"))
             for n, p in model.named_parameters() if p.requires_grad]
    muon = t.optimizer == "muon"
    return [
        {"kind": "muon", "params": [(n, p) for n, p, r in named if muon and r == "hidden" and p.dim() == 2],
         "weight_decay": t.weight_decay},
        {"kind": "muon_experts", "params": [(n, p) for n, p, r in named if muon and r == "hidden" and p.dim() == 3],
         "weight_decay": t.weight_decay},
        {"kind": "adamw", "params": [(n, p) for n, p, r in named if r == "decay" or (r == "hidden" and not muon)],
         "weight_decay": t.weight_decay},
        {"kind": "adamw", "params": [(n, p) for n, p, r in named if r == "plain"], "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg, device: str) -> torch.optim.Optimizer:
    """AdamW, or Muon + AdamW (train.optimizer); learning rates are set each step by set_lr."""
    t = cfg.train
    adamw = dict(lr=t.lr, betas=(t.beta1, t.beta2), fused=device.startswith("cuda"))
    groups = param_groups(model, cfg)
    if t.optimizer == "adamw":
        return torch.optim.AdamW([g for g in groups if g["params"]], **adamw)
    muon = dict(lr=t.muon_lr, momentum=t.muon_momentum, ns_steps=t.muon_ns_steps, adjust_lr_fn=ADJUST_LR)
    return MuonAdamW(groups, adamw, muon)


def param_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameter names in its index order (torch's index-keyed state dict)."""
    return [n for g in optimizer.param_groups for n in g["param_names"]]
