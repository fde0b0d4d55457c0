"""Routing statistics: what the routers of an MoE model did over a text, as plain data.

Three steps, each a plain function:

  collect_routing(model, tokens)  -> RoutingTrace   run the model (eval mode, dropless, in windows
                                                    of block_size) and keep every MoE layer's choices
  analyze(trace, vocab, ...)      -> RoutingReport  numbers only: numpy, no torch, no rich
  read_history(run_dir)           -> History        what training logged to TensorBoard

The report is a tree of dataclasses; `report.to_dict()` is the JSON that `inspect-routing --json`
writes. Its keys are the dataclass field names below and are stable within a schema version
(`schema`, now "minideep.routing/1"); a change of key set means a new version.

Definitions (N tokens, E experts, top-k routing, L MoE layers):

  loads               assignments per expert, N*k in all (before any capacity drop)
  imbalance_max_mean  max(loads) / mean(loads): 1.0 = perfectly balanced, E*... = collapsed
  imbalance_cv        population std(loads) / mean(loads)
  router_entropy      mean over tokens of -sum_e p_e ln p_e, divided by ln E (1 = uniform router)
  load_entropy        entropy of load_share, divided by ln E (1 = every expert equally used)
  aux                 the Switch balancing loss E * sum_e f_e P_e on this text (1.0 when uniform)
  dropped             assignments that the training capacity (capacity_factor, train batch_size
                      windows of block_size per batch, the model's drop_policy) would drop; the
                      model itself ran as in evaluation (dropless unless eval_capacity_factor is set)
  gates               the weights given to the chosen experts: mean, mean per choice rank, and a
                      10-bin histogram over [0, 1]
  experts[e]          top_tokens: the ids it receives most (count, share of its assignments,
                      affinity = share of that token's occurrences routed to e); concentration =
                      share of its assignments taken by those top tokens; specialisation_bits =
                      KL(P(token | e) || P(token)) in bits, 0 when e sees the text's own mix
  coselect            (k >= 2) E x E counts of tokens that chose both experts (diagonal 0);
                      top_pairs adds lift = count / (N * r_i * r_j), r = loads / N
  consecutive         over adjacent tokens of the same window: top1_same = share whose top-1
                      experts are equal, chance = sum_e q_e^2 (q = top-1 shares); any_shared =
                      share whose chosen sets intersect, chance = the same for two tokens drawn
                      independently from the text
  paths               a token's path = its top-1 expert at every MoE layer; the most common ones
"""

from __future__ import annotations

import codecs
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import UserError

SCHEMA = "minideep.routing/1"
Progress = Callable[[int, int], None]  # (tokens done, total)


# ---------------------------------------------------------------- trace


@dataclass
class LayerTrace:
    layer: int  # block index of this MoE layer
    expert_ids: np.ndarray  # (N, k) chosen experts, best first
    gates: np.ndarray  # (N, k) their weights
    probs: np.ndarray  # (N, E) router probabilities


@dataclass
class RoutingTrace:
    """What every MoE layer chose for N tokens, in text order. The text was run in windows of
    `window` tokens (token i sits at position i % window of window i // window)."""

    tokens: np.ndarray  # (N,) token ids
    window: int
    n_experts: int
    top_k: int
    layers: list[LayerTrace]


def collect_routing(model, tokens: np.ndarray, device: str = "cpu", batch_windows: int = 16, dtype=None,
                    progress: Optional[Progress] = None) -> RoutingTrace:
    """Run the model over consecutive windows of block_size tokens and keep each MoE layer's
    expert ids, gates and router probabilities, in eval mode as evaluation runs it (no router noise;
    no capacity drops unless model.eval_capacity_factor is set)."""
    import torch

    from .evaluate import autocast_for

    cfg = model.cfg
    T, n = cfg.block_size, len(tokens)
    ctx = autocast_for(device, dtype or torch.float32)
    model.eval()
    parts: dict[int, list] = {}
    chunk = T * batch_windows
    done = 0
    with torch.no_grad():
        while done < n:
            size = min(chunk, n - done)
            rows = size // T if size >= T else 1  # full windows, or the final partial one alone
            size = rows * T if size >= T else size
            x = torch.from_numpy(np.asarray(tokens[done : done + size], dtype=np.int64)).view(rows, -1).to(device)
            with ctx:
                aux = model(x).aux
            for layer, s in zip(aux.get("moe_layers", []), aux.get("routing", [])):
                parts.setdefault(layer, []).append(
                    (s["expert_ids"].cpu().numpy(), s["gates"].float().cpu().numpy(), s["probs"].float().cpu().numpy()))
            done += size
            if progress:
                progress(done, n)
    layers = [LayerTrace(layer, *(np.concatenate([p[j] for p in ps]) for j in range(3))) for layer, ps in parts.items()]
    return RoutingTrace(np.asarray(tokens, dtype=np.int64), T, getattr(cfg, "n_experts", 0), getattr(cfg, "top_k", 0), layers)


def expert_capacity(capacity_factor: float, n_tokens: int, k: int, n_experts: int) -> int:
    """Places per expert for n_tokens tokens: ceil(capacity_factor * n_tokens * k / E). The numpy
    side's copy of models.moe.capacity_for (this module imports no torch)."""
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


def simulate_drops(expert_ids: np.ndarray, gates: np.ndarray, window: int, batch_size: int,
                   capacity_factor: Optional[float], n_experts: int, policy: str = "position") -> np.ndarray:
    """(N, k) True where the assignment would be kept in training: consecutive windows form
    batches of batch_size (the last one maybe shorter), and each batch is one MoE forward."""
    N, k = expert_ids.shape
    kept = np.ones((N, k), dtype=bool)
    if capacity_factor is None:
        return kept
    per_batch = window * batch_size
    for s in range(0, N, per_batch):
        rows = slice(s, s + per_batch)
        kept[rows] = kept_in_batch(expert_ids[rows], gates[rows], window, capacity_factor, n_experts, policy)
    return kept


def kept_in_batch(expert_ids: np.ndarray, gates: np.ndarray, window: int, capacity_factor: float,
                  n_experts: int, policy: str = "position") -> np.ndarray:
    """(n, k) True where an assignment of one batch is kept: each expert takes expert_capacity()
    of them, in position-major order (all windows' position 0 first, then 1, ...; one token's
    choices in rank order) or, with policy "gate", highest gate first."""
    # the numpy twin of MoE.forward's capacity step (models/moe.py); tests/test_routing.py checks they agree
    n, k = expert_ids.shape
    a = np.arange(n * k)
    token = a // k  # assignment -> token: its window * window length + its position
    if policy == "gate":
        prio = np.empty_like(a)
        prio[np.argsort(-gates.reshape(-1), kind="stable")] = a
    else:  # position-major: (position, window, choice)
        prio = ((token % window) * -(-n // window) + token // window) * k + a % k
    e_flat = expert_ids.reshape(-1).astype(np.int64)  # (n*k,)
    order = np.lexsort((prio, e_flat))  # (n*k,) grouped by expert, priority within
    counts = np.bincount(e_flat, minlength=n_experts)  # (E,)
    starts = np.cumsum(counts) - counts
    rank = a - starts[e_flat[order]]  # place in its expert's queue
    keep = np.empty(n * k, dtype=bool)
    keep[order] = rank < expert_capacity(capacity_factor, n, k, n_experts)
    return keep.reshape(n, k)


# ---------------------------------------------------------------- report


@dataclass
class TokenCount:
    id: int
    text: str
    count: int  # assignments of this token to the expert
    share: float  # of the expert's assignments
    affinity: float  # of this token's occurrences, the share routed to the expert


@dataclass
class ExpertStats:
    expert: int
    load: int
    share: float  # of all assignments
    mean_prob: float  # mean router probability over all tokens
    top_tokens: list[TokenCount]
    concentration: float  # share of its assignments taken by top_tokens
    specialisation_bits: float  # KL(P(token | expert) || P(token)), bits


@dataclass
class PairCount:
    experts: list[int]  # [i, j], i < j
    count: int  # tokens that chose both
    share: float  # of all tokens
    lift: float  # count / (N * r_i * r_j), r = loads / N


@dataclass
class GateStats:
    mean: float
    mean_by_rank: list[float]  # mean gate of the 1st, 2nd, ... choice
    hist_edges: list[float]  # 11 edges over [0, 1]
    hist: list[int]  # 10 counts


@dataclass
class Consecutive:
    pairs: int  # adjacent token pairs inside a window
    top1_same: float
    top1_same_chance: float
    any_shared: float
    any_shared_chance: float


@dataclass
class LayerStats:
    layer: int  # block index
    loads: list[int]
    load_share: list[float]
    imbalance_max_mean: float
    imbalance_cv: float
    router_entropy: float
    load_entropy: float
    aux: float
    capacity_factor: Optional[float]
    capacity: Optional[int]  # places per expert in a full training batch
    dropped: int
    assignments: int
    dropped_frac: float
    gates: GateStats
    coselect: Optional[list[list[int]]]
    top_pairs: list[PairCount]
    consecutive: Consecutive
    experts: list[ExpertStats]


@dataclass
class PathCount:
    path: list[int]  # top-1 expert at each MoE layer
    count: int
    share: float


@dataclass
class PathStats:
    layers: list[int]
    n_tokens: int
    n_distinct: int
    top: list[PathCount]


@dataclass
class TextView:
    """The first tokens of the text with their routing, for coloured text and hover details."""

    layer: int  # the layer chosen for colouring (--layer)
    ids: list[int]
    tokens: list[str]  # the text each token completes
    experts: list[list[list[int]]]  # [token][moe layer][choice]
    probs: list[list[list[float]]]  # [token][moe layer][expert], 4 decimals


@dataclass
class Summary:
    worst_layer: int
    worst_imbalance: float
    mean_router_entropy: float
    dropped_frac: float
    dead_experts: int  # (layer, expert) pairs that received no token


@dataclass
class ModelInfo:
    arch: str
    n_layer: int
    moe_layers: list[int]
    n_experts: int
    top_k: int
    router: str
    capacity_factor: Optional[float]
    drop_policy: str
    train_batch_size: int
    block_size: int


@dataclass
class ReportInputs:
    """What a report was computed from (its JSON key is `source`)."""

    checkpoint: str
    text: str  # where the tokens came from
    tokens: int


@dataclass
class RoutingReport:
    schema: str
    source: ReportInputs
    model: ModelInfo
    summary: Summary
    layers: list[LayerStats]
    paths: PathStats
    text: TextView

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def layer(self, block: int) -> LayerStats:
        return next(l for l in self.layers if l.layer == block)


def model_info(cfg, moe_layers: list[int]) -> ModelInfo:
    m = cfg.model
    return ModelInfo(m.arch, m.n_layer, list(moe_layers), m.n_experts, m.top_k, m.router, m.capacity_factor,
                     m.drop_policy, cfg.train.batch_size, m.block_size)


def _norm_entropy(p: np.ndarray, n: int) -> np.ndarray:
    """Entropy along the last axis divided by ln n (0 where n < 2)."""
    p = np.asarray(p, dtype=np.float64)
    h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)
    return h / math.log(n) if n > 1 else h * 0.0


def _onehot(expert_ids: np.ndarray, n_experts: int) -> np.ndarray:
    m = np.zeros((len(expert_ids), n_experts), dtype=bool)
    m[np.arange(len(expert_ids))[:, None], expert_ids] = True
    return m


def _chance_any_shared(onehot: np.ndarray) -> float:
    """P(two tokens drawn independently from the text chose intersecting sets of experts)."""
    sets, counts = np.unique(onehot, axis=0, return_counts=True)
    f = counts / counts.sum()
    sets = sets.astype(np.float32)
    total = 0.0
    for i in range(0, len(sets), 1024):
        meets = (sets[i : i + 1024] @ sets.T) > 0  # (chunk, U)
        total += float(f[i : i + 1024] @ meets @ f)
    return total


def consecutive_stats(expert_ids: np.ndarray, window: int, n_experts: int) -> Consecutive:
    N = len(expert_ids)
    valid = (np.arange(N - 1) + 1) % window != 0 if N > 1 else np.zeros(0, dtype=bool)
    top1 = expert_ids[:, 0]
    onehot = _onehot(expert_ids, n_experts)
    q = np.bincount(top1, minlength=n_experts) / max(1, N)
    same = (top1[:-1] == top1[1:])[valid]
    shared = (onehot[:-1] & onehot[1:]).any(1)[valid]
    pairs = int(valid.sum())
    return Consecutive(
        pairs=pairs,
        top1_same=float(same.mean()) if pairs else 0.0,
        top1_same_chance=float((q * q).sum()),
        any_shared=float(shared.mean()) if pairs else 0.0,
        any_shared_chance=_chance_any_shared(onehot) if N else 0.0,
    )


def expert_stats(expert_ids: np.ndarray, probs: np.ndarray, tokens: np.ndarray, n_experts: int,
                 vocab_text: Sequence[str], top_n: int = 5) -> list[ExpertStats]:
    N, k = expert_ids.shape
    V = int(max(len(vocab_text), tokens.max() + 1 if N else 1))
    tok_counts = np.bincount(tokens, minlength=V).astype(np.float64)
    p_tok = tok_counts / max(1.0, tok_counts.sum())
    per = np.bincount(expert_ids.reshape(-1).astype(np.int64) * V + np.repeat(tokens, k),
                      minlength=n_experts * V).reshape(n_experts, V)  # (E, V)
    total = max(1, N * k)
    mean_prob = probs.mean(0) if N else np.zeros(n_experts)
    out = []
    for e in range(n_experts):
        row = per[e]
        load = int(row.sum())
        top = [int(t) for t in np.argsort(-row, kind="stable")[:top_n] if row[t] > 0]
        if load:
            p = row / load
            nz = p > 0
            kl = float((p[nz] * np.log2(p[nz] / p_tok[nz])).sum())
        else:
            kl = 0.0
        out.append(ExpertStats(
            expert=e, load=load, share=load / total, mean_prob=float(mean_prob[e]),
            top_tokens=[TokenCount(t, vocab_text[t] if t < len(vocab_text) else "", int(row[t]), row[t] / load,
                                   row[t] / tok_counts[t]) for t in top],
            concentration=float(row[top].sum() / load) if load else 0.0,
            specialisation_bits=kl,
        ))
    return out


def layer_stats(lt: LayerTrace, tokens: np.ndarray, window: int, n_experts: int, vocab_text: Sequence[str],
                capacity_factor: Optional[float], batch_size: int, drop_policy: str = "position",
                top_n: int = 5) -> LayerStats:
    ids, gates, probs = lt.expert_ids.astype(np.int64), lt.gates, lt.probs
    N, k = ids.shape
    E = n_experts
    loads = np.bincount(ids.reshape(-1), minlength=E)
    mean = loads.mean()
    share = loads / max(1, loads.sum())
    kept = simulate_drops(ids, gates, window, batch_size, capacity_factor, E, drop_policy)
    hist, edges = np.histogram(gates, bins=10, range=(0.0, 1.0))
    coselect, pairs = None, []
    if k >= 2:
        onehot = _onehot(ids, E).astype(np.int64)
        c = onehot.T @ onehot
        np.fill_diagonal(c, 0)
        coselect = c.tolist()
        r = loads / max(1, N)
        cand = [(int(c[i, j]), i, j) for i in range(E) for j in range(i + 1, E) if c[i, j] > 0]
        cand.sort(key=lambda t: (-t[0], t[1], t[2]))
        pairs = [PairCount([i, j], n, n / N, n / (N * r[i] * r[j])) for n, i, j in cand[:10]]
    full_tokens = window * batch_size
    return LayerStats(
        layer=lt.layer,
        loads=loads.tolist(),
        load_share=share.tolist(),
        imbalance_max_mean=float(loads.max() / mean) if mean > 0 else 0.0,
        imbalance_cv=float(loads.std() / mean) if mean > 0 else 0.0,
        router_entropy=float(_norm_entropy(probs, E).mean()) if N else 0.0,
        load_entropy=float(_norm_entropy(share, E)),
        aux=float(E * (share * probs.mean(0)).sum()) if N else 0.0,
        capacity_factor=capacity_factor,
        capacity=None if capacity_factor is None else expert_capacity(capacity_factor, full_tokens, k, E),
        dropped=int((~kept).sum()),
        assignments=N * k,
        dropped_frac=float((~kept).sum() / max(1, N * k)),
        gates=GateStats(float(gates.mean()) if N else 0.0, gates.mean(0).tolist() if N else [0.0] * k,
                        edges.tolist(), hist.tolist()),
        coselect=coselect,
        top_pairs=pairs,
        consecutive=consecutive_stats(ids, window, E),
        experts=expert_stats(ids, probs, tokens, E, vocab_text, top_n),
    )


def path_stats(trace: RoutingTrace, top_n: int = 10) -> PathStats:
    layers = [lt.layer for lt in trace.layers]
    N = len(trace.tokens)
    if not layers or N == 0:
        return PathStats(layers, N, 0, [])
    paths = np.stack([lt.expert_ids[:, 0] for lt in trace.layers], axis=1).astype(np.int64)  # (N, L)
    uniq, counts = np.unique(paths, axis=0, return_counts=True)
    order = np.lexsort((*uniq.T[::-1], -counts))  # most common first, ties by path
    return PathStats(layers, N, len(uniq),
                     [PathCount(uniq[i].tolist(), int(counts[i]), counts[i] / N) for i in order[:top_n]])


def token_texts(ids: Sequence[int], vocab: Sequence[bytes]) -> list[str]:
    """The text each token completes: a character split over tokens belongs to the one finishing it."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [dec.decode(vocab[i] if i < len(vocab) else b"") for i in ids]
    if out:
        out[-1] += dec.decode(b"", final=True)
    return out


def vocab_texts(vocab: Sequence[bytes]) -> list[str]:
    """Each id's text on its own; bytes that are part of a longer character show as \\xNN."""
    return [b.decode("utf-8", errors="backslashreplace") for b in vocab]


def text_view(trace: RoutingTrace, vocab: Sequence[bytes], layer: int, max_tokens: int) -> TextView:
    n = min(len(trace.tokens), max_tokens)
    ids = trace.tokens[:n].tolist()
    experts = np.stack([lt.expert_ids[:n] for lt in trace.layers], axis=1)  # (n, L, k)
    probs = np.stack([lt.probs[:n] for lt in trace.layers], axis=1)  # (n, L, E)
    return TextView(layer, ids, token_texts(ids, vocab), experts.astype(int).tolist(),
                    np.round(probs.astype(np.float64), 4).tolist())


def analyze(trace: RoutingTrace, vocab: Sequence[bytes], model: ModelInfo, source: ReportInputs,
            layer: Optional[int] = None, text_tokens: int = 1000, top_n: int = 5) -> RoutingReport:
    """Every statistic of a trace. `layer` (a block index of an MoE layer; default the last one)
    is the layer the text view is coloured by. The text view keeps the first `text_tokens`
    tokens (fewer for big models, so a report stays a few MB)."""
    blocks = [lt.layer for lt in trace.layers]
    if not blocks:
        raise UserError(f"this {model.arch} model has no MoE layers: there is no routing to inspect")
    if layer is None:
        layer = blocks[-1]
    elif layer not in blocks:
        raise UserError(f"--layer {layer} is not an MoE layer; the MoE layers are {', '.join(map(str, blocks))}")
    texts = vocab_texts(vocab)
    layers = [layer_stats(lt, trace.tokens, trace.window, trace.n_experts, texts, model.capacity_factor,
                          model.train_batch_size, model.drop_policy, top_n) for lt in trace.layers]
    worst = max(layers, key=lambda l: l.imbalance_max_mean)
    dropped = sum(l.dropped for l in layers)
    summary = Summary(
        worst_layer=worst.layer,
        worst_imbalance=worst.imbalance_max_mean,
        mean_router_entropy=float(np.mean([l.router_entropy for l in layers])),
        dropped_frac=dropped / max(1, sum(l.assignments for l in layers)),
        dead_experts=sum(int(x == 0) for l in layers for x in l.loads),
    )
    text_tokens = max(50, min(text_tokens, 200_000 // max(1, len(blocks) * trace.n_experts)))
    return RoutingReport(SCHEMA, source, model, summary, layers, path_stats(trace),
                         text_view(trace, vocab, layer, text_tokens))


# ---------------------------------------------------------------- history


@dataclass
class LayerHistory:
    layer: int
    steps: list[int]  # the logged training steps
    imbalance: list[float]  # max/mean tokens per expert
    router_entropy: list[float]  # normalised by ln E
    dropped_frac: list[float]
    aux: list[float]
    min_load: list[Optional[float]]  # fewest tokens any expert got (0 = a dead expert); None if not logged


@dataclass
class History:
    run_dir: str
    n_experts: int
    layers: list[LayerHistory]
    worst_layer: int  # highest imbalance at the last logged step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_history(run_dir: str | Path) -> History:
    """Per-layer balance over a run, from the scalars and load histograms train.py logs to tb/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from .schema import POSITIVE, check, read_yaml

    run = Path(run_dir)
    if run.is_file():
        run = run.parent
    tb = run / "tb"
    if not tb.is_dir():
        raise UserError(f"--history: no TensorBoard log (tb/) in {run}")
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars, hists = set(acc.Tags().get("scalars", [])), set(acc.Tags().get("histograms", []))
    layer_ids = sorted(int(t.split("/")[1][len("layer"):]) for t in scalars
                       if t.startswith("moe/layer") and t.endswith("/imbalance"))
    if not layer_ids:  # before the config: a dense arch's has no n_experts
        raise UserError(f"--history: {tb} holds no routing scalars (a dense run, or no step logged yet)")
    try:
        cfg = read_yaml(run / "config.yaml", "config.yaml")
    except UserError as e:
        raise UserError(f"--history: {run} has no readable config.yaml (needed for the number of experts): {e}")
    n_experts = check(cfg, {"model": {"n_experts": POSITIVE}}, f"--history: {run / 'config.yaml'}")["model"]["n_experts"]
    norm = math.log(n_experts) if n_experts > 1 else 1.0

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in acc.Scalars(tag)} if tag in scalars else {}

    layers = []
    for i in layer_ids:
        tag = f"moe/layer{i}"
        imb, ent, drop, aux = (series(f"{tag}/{n}") for n in ("imbalance", "entropy", "dropped_frac", "aux"))
        low = {e.step: e.histogram_value.min for e in acc.Histograms(f"{tag}/tokens_per_expert")} \
            if f"{tag}/tokens_per_expert" in hists else {}
        steps = sorted(imb)
        layers.append(LayerHistory(i, steps, [imb[s] for s in steps], [ent.get(s, 0.0) / norm for s in steps],
                                   [drop.get(s, 0.0) for s in steps], [aux.get(s, 0.0) for s in steps],
                                   [low.get(s) for s in steps]))
    worst = max(layers, key=lambda l: l.imbalance[-1]).layer
    return History(str(run), n_experts, layers, worst)


# ---------------------------------------------------------------- one generation step


@dataclass
class LayerChoice:
    layer: int
    experts: list[int]  # chosen, best first
    gates: list[float]
    probs: list[float]  # (E,) router probabilities
    entropy: float  # normalised by ln E


@dataclass
class StepView:
    """One generated token as the live view shows it."""

    index: int  # 1 for the first generated token
    token: int
    text: str
    prob: float  # the model's probability of this token (temperature 1)
    rank: int  # 1 = the model's top prediction
    top: list[tuple[int, float]]  # the model's top predictions (id, prob)
    layers: list[LayerChoice]


def summarize_step(index: int, token: int, logits, routing: dict, moe_layers: Sequence[int], text: str,
                   n_experts: int, top_n: int = 5) -> StepView:
    """From one step's logits (a tensor (V,)) and the routing of the position that produced the token
    (expert_ids (L, k), gates (L, k), probs (L, E) for the L MoE layers; {} if dense) to numbers."""
    p = logits.detach().float().softmax(-1)  # tensor methods: no torch import here
    top_p, top_i = p.topk(min(top_n, p.numel()))
    p_token = p[token]
    rank = int((p > p_token).sum()) + 1
    layers = []
    if routing:
        probs = routing["probs"].detach().float()  # (L, E)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / (math.log(n_experts) if n_experts > 1 else 1.0)
        rows = zip(moe_layers, routing["expert_ids"].tolist(), routing["gates"].float().tolist(), probs.tolist(),
                   entropy.tolist())
        layers = [LayerChoice(layer, ids, gates, pr, h) for layer, ids, gates, pr, h in rows]
    return StepView(index, token, text, float(p_token), rank, list(zip(top_i.tolist(), top_p.tolist())), layers)
