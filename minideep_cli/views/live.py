"""`sample --show-routing`: the live panel (rich Live) and the one-line-per-token plain form.

The sampling loop only appends each StepView to the panel's state (cheap); rich draws the panel
from that state in its own refresh thread, a few times a second, so drawing never slows
generation down token by token.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Optional, Sequence

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..routing_report import StepView
from .palette import bar, expert_hex, spark


def plain_line(sv: StepView, vocab_text: Sequence[str]) -> str:
    """index, id, token, p, rank, then L<block>=expert:prob,... per MoE layer (chosen experts,
    best first, with their router probabilities), entropy=<per layer>, top=<token>:<p> ...
    Fields are tab-separated; texts are JSON strings."""
    fields = [str(sv.index), f"id={sv.token}", json.dumps(sv.text, ensure_ascii=False), f"p={sv.prob:.4f}",
              f"rank={sv.rank}"]
    for lc in sv.layers:
        fields.append(f"L{lc.layer}=" + ",".join(f"{e}:{lc.probs[e]:.4f}" for e in lc.experts))
    if sv.layers:
        fields.append("entropy=" + ",".join(f"{lc.entropy:.3f}" for lc in sv.layers))
    fields.append("top=" + " ".join(f"{json.dumps(vocab_text[t], ensure_ascii=False)}:{p:.4f}" for t, p in sv.top))
    return "\t".join(fields)


class LivePanel:
    """What the live view shows; add() a StepView per token, rich renders via __rich__."""

    def __init__(self, prompt: str, vocab_text: Sequence[str], moe_layers: Sequence[int], n_experts: int,
                 total: int, note: Optional[str] = None, max_chars: int = 900):
        self.prompt, self.vocab_text, self.total, self.note = prompt, vocab_text, total, note
        self.moe_layers, self.n_experts, self.max_chars = list(moe_layers), n_experts, max_chars
        self.pieces: list[str] = []
        self.loads = [[0] * n_experts for _ in self.moe_layers]  # running load, per layer
        self.last: Optional[StepView] = None
        self.start = time.perf_counter()
        self.lock = threading.Lock()

    def add(self, sv: StepView) -> None:
        with self.lock:
            self.pieces.append(sv.text)
            for i, lc in enumerate(sv.layers):
                for e in lc.experts:
                    self.loads[i][e] += 1
            self.last = sv

    def __rich__(self):
        with self.lock:  # a consistent snapshot; drawing happens outside the lock
            pieces, sv = list(self.pieces), self.last
            loads = [list(l) for l in self.loads]
        elapsed = time.perf_counter() - self.start
        parts = [self._text(pieces)]
        if sv is not None:
            parts.append(self._token(sv, len(pieces), elapsed))
            if sv.layers:
                parts.append(self._path(sv))
                parts.append(self._loads(loads))
        if self.note:
            parts.append(Panel(Text(self.note, style="yellow"), title="note", title_align="left"))
        return Group(*parts)

    def _text(self, pieces: list[str]) -> Panel:
        t = Text()
        t.append(self.prompt, style="dim")
        if pieces:
            t.append("".join(pieces[:-1]))
            t.append(pieces[-1], style="bold reverse")
        if len(t) > self.max_chars:
            t = t[len(t) - self.max_chars:]
        return Panel(t, title="text (newest token highlighted)", title_align="left")

    def _token(self, sv: StepView, n: int, elapsed: float) -> Panel:
        head = Text()
        head.append(f"token {n}/{self.total}  ")
        head.append(json.dumps(self.vocab_text[sv.token], ensure_ascii=False), style="bold")
        head.append(f"  id {sv.token}  model p {sv.prob:.3f}  rank {sv.rank}  {n / max(elapsed, 1e-9):.1f} tok/s")
        t = Table(box=None, show_header=True, pad_edge=False)
        for col in ["", "prediction", "p", ""]:
            t.add_column(col)
        for tok, p in sv.top:
            mark = "►" if tok == sv.token else ""
            t.add_row(mark, json.dumps(self.vocab_text[tok], ensure_ascii=False), f"{p:.3f}", bar(p, 24))
        return Panel(Group(head, t), title="chosen token and the model's top predictions", title_align="left")

    def _path(self, sv: StepView) -> Panel:
        t = Table(box=None, pad_edge=False)
        for col in ["layer", "experts (router p)", "router p of e0.. (to the layer's max)", "entropy"]:
            t.add_column(col)
        for lc in sv.layers:
            chosen = Text()
            for e in lc.experts:
                chosen.append(f"e{e} {lc.probs[e]:.2f}  ", style=f"bold {expert_hex(e)}")
            probs = Text()
            top = max(lc.probs)
            for e, p in enumerate(lc.probs):
                probs.append(spark([p], top), style=expert_hex(e))
            t.add_row(str(lc.layer), chosen, probs, f"{lc.entropy:.3f}")
        return Panel(t, title="expert path of this token", title_align="left")

    def _loads(self, loads: list[list[int]]) -> Panel:
        t = Table(box=None, pad_edge=False)
        for col in ["layer", "tokens per expert so far (e0 first)", "max/mean"]:
            t.add_column(col)
        for layer, row in zip(self.moe_layers, loads):
            top = max(row) or 1
            cells = Text()
            for e, v in enumerate(row):
                cells.append(spark([v], top), style=expert_hex(e))
            mean = sum(row) / len(row)
            t.add_row(str(layer), cells, f"{max(row) / mean:.2f}" if mean else "–")
        return Panel(t, title="running load", title_align="left")
