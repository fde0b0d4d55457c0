"""The routing report and the training-history view in the terminal (rich)."""

from __future__ import annotations

import json

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..routing_report import History, RoutingReport
from . import count
from .palette import bar, expert_hex, spark


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _show(s: str) -> str:
    """A token's text, quoted, with spaces and newlines visible."""
    return json.dumps(s, ensure_ascii=False)


def legend(n_experts: int) -> Text:
    t = Text("experts: ")
    for e in range(n_experts):
        t.append(f" e{e} ", style=f"bold black on {expert_hex(e)}")
        t.append(" ")
    return t


def layers_table(report: RoutingReport) -> Table:
    m = report.model
    t = Table(title="Per layer (loads: one bar per expert, e0 first)", title_justify="left")
    for col, just in [("layer", "right"), ("tokens per expert", "left"), ("max/mean", "right"), ("CV", "right"),
                      ("entropy", "right"), ("load ent.", "right"), (f"dropped @cf {m.capacity_factor}", "right"),
                      ("gate mean", "right"), ("gates 0..1", "left")]:
        t.add_column(col, justify=just)
    for l in report.layers:
        loads = Text()
        top = max(l.loads) or 1
        for e, v in enumerate(l.loads):
            loads.append(spark([v], top), style=expert_hex(e))
        t.add_row(str(l.layer), loads, f"{l.imbalance_max_mean:.2f}", f"{l.imbalance_cv:.2f}",
                  f"{l.router_entropy:.3f}", f"{l.load_entropy:.3f}", _pct(l.dropped_frac),
                  f"{l.gates.mean:.3f}", spark(l.gates.hist))
    return t


def experts_table(report: RoutingReport, layer: int) -> Table:
    l = report.layer(layer)
    t = Table(title=f"Layer {layer}: experts (what each receives most often)", title_justify="left")
    for col, just in [("expert", "left"), ("load", "left"), ("share", "right"), ("mean p", "right"),
                      ("concentr.", "right"), ("special. bits", "right"), ("top tokens (count, affinity)", "left")]:
        t.add_column(col, justify=just)
    top = max(e.share for e in l.experts) or 1.0
    for e in l.experts:
        toks = "  ".join(f"{_show(tc.text)} ({tc.count}, {_pct(tc.affinity)})" for tc in e.top_tokens)
        t.add_row(Text(f"e{e.expert}", style=f"bold {expert_hex(e.expert)}"),
                  Text(bar(e.share / top, 16), style=expert_hex(e.expert)), _pct(e.share), f"{e.mean_prob:.3f}",
                  _pct(e.concentration), f"{e.specialisation_bits:.2f}", Text(toks or "(no tokens: dead)"))
    return t


def coloured_text(report: RoutingReport, max_chars: int = 1500) -> Text:
    tv = report.text
    li = report.model.moe_layers.index(tv.layer)
    out, n = Text(), 0
    for s, ex in zip(tv.tokens, tv.experts):
        if n + len(s) > max_chars:
            out.append(" …")
            break
        out.append(s, style=expert_hex(ex[li][0]))
        n += len(s)
    return out


def pairs_and_paths(report: RoutingReport, layer: int) -> Group:
    parts = []
    l = report.layer(layer)
    if report.model.top_k >= 2:
        t = Table(title=f"Layer {layer}: experts chosen together (top pairs)", title_justify="left")
        for col in ["pair", "tokens", "share", "lift vs independent"]:
            t.add_column(col, justify="left" if col == "pair" else "right")
        for p in l.top_pairs:
            t.add_row(f"e{p.experts[0]} + e{p.experts[1]}", str(p.count), _pct(p.share), f"{p.lift:.2f}")
        parts.append(t)
    c = Table(title="Consecutive tokens sharing an expert (observed vs chance)", title_justify="left")
    for col in ["layer", "same top-1", "chance", "any shared", "chance", "pairs"]:
        c.add_column(col, justify="right")
    for l in report.layers:
        cs = l.consecutive
        c.add_row(str(l.layer), _pct(cs.top1_same), _pct(cs.top1_same_chance), _pct(cs.any_shared),
                  _pct(cs.any_shared_chance), f"{cs.pairs:,}")
    parts.append(c)
    ps = report.paths
    parts.append(Text(f"Most common expert paths: the top-1 expert at layers {', '.join(map(str, ps.layers))}; "
                      f"{ps.n_distinct:,} distinct paths over {ps.n_tokens:,} tokens", style="italic"))
    p = Table()
    for col in ["path", "tokens", "share"]:
        p.add_column(col, justify="left" if col == "path" else "right")
    for pc in ps.top:
        path = Text()
        for i, e in enumerate(pc.path):
            path.append(("→" if i else "") + f"e{e}", style=expert_hex(e))
        p.add_row(path, f"{pc.count:,}", _pct(pc.share))
    parts.append(p)
    return Group(*parts)


def render_report(console: Console, report: RoutingReport) -> None:
    m, s, src = report.model, report.summary, report.source
    console.print(f"[bold]{src.checkpoint}[/bold] on {src.text}: {src.tokens:,} tokens, windows of {m.block_size}")
    console.print(f"{m.arch}: {count(m.n_layer, 'layer')}, MoE at {', '.join(map(str, m.moe_layers))}; {count(m.n_experts, 'expert')}, "
                  f"top-{m.top_k}, {m.router} router; drops simulated at capacity factor {m.capacity_factor} "
                  f"with {m.train_batch_size} windows per batch ({m.drop_policy} order)")
    console.print(f"worst layer {s.worst_layer} (max/mean {s.worst_imbalance:.2f}); mean router entropy "
                  f"{s.mean_router_entropy:.3f} of 1; dropped {_pct(s.dropped_frac)}; dead experts {s.dead_experts}")
    console.print(layers_table(report))
    layer = report.text.layer
    console.print(experts_table(report, layer))
    console.print(Panel(Group(legend(m.n_experts), Text(""), coloured_text(report)),
                        title=f"text coloured by top-1 expert at layer {layer}", title_align="left"))
    console.print(pairs_and_paths(report, layer))


def render_history(console: Console, h: History) -> None:
    console.print(f"[bold]{h.run_dir}[/bold]: routing over training ({h.n_experts} experts; entropy normalised by "
                  f"ln {h.n_experts})")
    t = Table(title_justify="left")
    for col, just in [("layer", "right"), ("steps", "right"), ("max/mean first → last", "right"),
                      ("max/mean over training", "left"), ("entropy first → last", "right"),
                      ("dropped first → last", "right"), ("aux first → last", "right"), ("min load last", "right")]:
        t.add_column(col, justify=just)
    for l in h.layers:
        low = l.min_load[-1]
        t.add_row(str(l.layer), f"{l.steps[0]}–{l.steps[-1]}",
                  f"{l.imbalance[0]:.2f} → {l.imbalance[-1]:.2f}", spark(_thin(l.imbalance, 40)),
                  f"{l.router_entropy[0]:.3f} → {l.router_entropy[-1]:.3f}",
                  f"{_pct(l.dropped_frac[0])} → {_pct(l.dropped_frac[-1])}",
                  f"{l.aux[0]:.3f} → {l.aux[-1]:.3f}", "–" if low is None else f"{low:g}")
    console.print(t)
    worst = next(l for l in h.layers if l.layer == h.worst_layer)
    console.print(f"worst layer at the end: {worst.layer} (max/mean {worst.imbalance[-1]:.2f}, entropy "
                  f"{worst.router_entropy[-1]:.3f}, dropped {_pct(worst.dropped_frac[-1])})")


def _thin(values: list[float], n: int) -> list[float]:
    """At most n values, evenly spaced, keeping the first and the last."""
    if len(values) <= n:
        return values
    return [values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)]
