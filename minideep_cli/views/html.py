"""The routing report as one self-contained HTML file: inline CSS, SVG and JavaScript, no
network (no CDN, no fonts, no images fetched). Charts are SVG drawn here in Python; the script
only colours the text by the chosen layer and shows each token's router probabilities on hover.

Any script error is written into <pre id="js-errors">, and a page whose script ran to the end
carries data-status="ok" on <body>: a headless browser's DOM dump shows both.
"""

from __future__ import annotations

import dataclasses
import json
from html import escape

from ..routing_report import RoutingReport
from . import count
from .palette import expert_hex

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #1d2330;
       background: #fbfbfd; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #566; } .cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0; }
.card { background: #fff; border: 1px solid #dde; border-radius: 8px; padding: 8px 14px; }
.card b { display: block; font-size: 18px; }
section { background: #fff; border: 1px solid #e3e3ec; border-radius: 10px; padding: 12px 18px; margin: 14px 0; }
table { border-collapse: collapse; margin: 6px 0; } th, td { padding: 3px 10px; text-align: right; }
th { background: #f1f2f7; font-weight: 600; } td.l, th.l { text-align: left; } tr:nth-child(even) td { background: #fafafe; }
code, .tok { font-family: ui-monospace, Menlo, Consolas, monospace; }
#tokens { position: relative; white-space: pre-wrap; font: 14px/1.9 ui-monospace, Menlo, Consolas, monospace; border: 1px solid #eee;
          padding: 10px; max-height: 520px; overflow: auto; }
#tokens span { border-radius: 3px; cursor: default; } #tokens span:hover { outline: 2px solid #223; }
#tip { position: fixed; display: none; background: #fff; border: 1px solid #99a; border-radius: 8px; padding: 8px 10px;
       box-shadow: 0 4px 16px rgba(0,0,0,.18); font-size: 12px; pointer-events: none; z-index: 10; }
.probrow { display: flex; align-items: flex-end; gap: 1px; height: 34px; margin: 2px 0 6px; }
.probrow div { width: 9px; background: #ccd; } .probrow div.chosen { outline: 2px solid #111; }
.legend span { display: inline-block; padding: 1px 7px; margin: 2px; border-radius: 4px; font-size: 12px; }
svg text { font: 11px system-ui, sans-serif; fill: #223; } details { margin: 6px 0; } summary { cursor: pointer; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
"""

ERROR_CAPTURE = """
window.__errors = [];
function __record(msg) {
  window.__errors.push(String(msg));
  var el = document.getElementById('js-errors');
  if (el) { el.textContent = window.__errors.join('\\n'); el.hidden = false; }
}
window.addEventListener('error', function (e) { __record('error: ' + (e.message || e.type)); });
window.addEventListener('unhandledrejection', function (e) { __record('unhandled rejection: ' + e.reason); });
"""

SCRIPT = r"""
(function () {
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var tv = data.text, layers = data.model.moe_layers, colours = data.colours;
  var box = document.getElementById('tokens'), tip = document.getElementById('tip');
  var select = document.getElementById('layer-select');
  var spans = [];
  tv.tokens.forEach(function (s, i) {
    var sp = document.createElement('span');
    sp.textContent = s;
    sp.dataset.i = i;
    spans.push(sp);
    box.appendChild(sp);
  });
  function colour(li) {
    spans.forEach(function (sp, i) { sp.style.background = colours[tv.experts[i][li][0]] + '66'; });
  }
  layers.forEach(function (l, li) {
    var o = document.createElement('option');
    o.value = li; o.textContent = 'layer ' + l;
    if (l === tv.layer) { o.selected = true; }
    select.appendChild(o);
  });
  select.addEventListener('change', function () { colour(+select.value); });
  colour(layers.indexOf(tv.layer));
  function show(i, x, y) {
    tip.textContent = '';
    var head = document.createElement('div');
    head.innerHTML = '<b></b> id ' + tv.ids[i] + ', token ' + (i + 1);
    head.firstChild.textContent = JSON.stringify(tv.tokens[i]);
    tip.appendChild(head);
    layers.forEach(function (l, li) {
      var probs = tv.probs[i][li], chosen = tv.experts[i][li];
      var label = document.createElement('div');
      label.textContent = 'layer ' + l + ': ' + chosen.map(function (e) {
        return 'e' + e + ' ' + (100 * probs[e]).toFixed(1) + '%'; }).join(' · ');
      tip.appendChild(label);
      var row = document.createElement('div');
      row.className = 'probrow';
      probs.forEach(function (p, e) {
        var b = document.createElement('div');
        b.style.height = Math.max(1, Math.round(32 * p)) + 'px';
        b.style.background = colours[e];
        b.title = 'e' + e;
        if (chosen.indexOf(e) >= 0) { b.className = 'chosen'; }
        row.appendChild(b);
      });
      tip.appendChild(row);
    });
    tip.style.display = 'block';
    var w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = Math.min(x + 14, window.innerWidth - w - 8) + 'px';
    tip.style.top = (y + 16 + h > window.innerHeight ? y - h - 10 : y + 16) + 'px';
  }
  box.addEventListener('mousemove', function (ev) {
    var i = ev.target.dataset ? ev.target.dataset.i : undefined;
    if (i === undefined) { tip.style.display = 'none'; return; }
    show(+i, ev.clientX, ev.clientY);
  });
  box.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
  // report.html#token=N opens with token N outlined and its probabilities shown
  var m = /^#token=(\d+)$/.exec(location.hash);
  if (m && +m[1] < spans.length) {
    var sp = spans[+m[1]];
    sp.style.outline = '2px solid #223';
    box.scrollTop = Math.max(0, sp.offsetTop - box.offsetTop - box.clientHeight / 2);
    var r = sp.getBoundingClientRect();
    show(+m[1], r.left, r.bottom);
  }
  document.body.dataset.status = 'ok';
})();
"""


def _json_for_script(obj) -> str:
    """JSON that cannot close or confuse the <script> element it sits in."""
    return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _mix(a: str, b: str, t: float) -> str:
    """Colour between hex a (t = 0) and b (t = 1)."""
    t = max(0.0, min(1.0, t))
    ca = [int(a[i : i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


def load_colour(ratio: float) -> str:
    """Load relative to uniform: 1 white, above red, below blue, 0 (dead) dark grey."""
    if ratio <= 0:
        return "#444450"
    if ratio >= 1:
        return _mix("#ffffff", "#d7301f", (ratio - 1) / 2)
    return _mix("#ffffff", "#2c7fb8", 1 - ratio)


def heatmap_svg(report: RoutingReport) -> str:
    E = report.model.n_experts
    cw = max(14, min(56, 900 // max(1, E)))
    ch, left, top = 28, 64, 22
    w, h = left + cw * E + 4, top + ch * len(report.layers) + 4
    out = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="load heatmap">']
    for e in range(E):
        if cw >= 24 or e % 4 == 0:
            out.append(f'<text x="{left + e * cw + cw / 2}" y="{top - 7}" text-anchor="middle">e{e}</text>')
    for r, l in enumerate(report.layers):
        y = top + r * ch
        out.append(f'<text x="{left - 8}" y="{y + ch / 2 + 4}" text-anchor="end">layer {l.layer}</text>')
        for e, (share, n) in enumerate(zip(l.load_share, l.loads)):
            ratio = share * E
            out.append(f'<rect x="{left + e * cw}" y="{y}" width="{cw - 1}" height="{ch - 1}" '
                       f'fill="{load_colour(ratio)}"><title>layer {l.layer}, e{e}: {n:,} assignments, '
                       f'{_pct(share)} ({ratio:.2f}x uniform)</title></rect>')
            if cw >= 40:
                fill = "#fff" if ratio <= 0 or abs(ratio - 1) > 1.2 else "#223"
                out.append(f'<text x="{left + e * cw + cw / 2}" y="{y + ch / 2 + 4}" text-anchor="middle" '
                           f'style="fill:{fill}">{100 * share:.0f}</text>')
    out.append("</svg>")
    return "".join(out)


def bars_svg(title: str, labels: list[str], values: list[float], vmax: float, fmt, colour: str = "#5b7bd5",
             ref: float | None = None, bw: int = 38, gap: int = 12) -> str:
    """A small vertical bar chart; `ref` draws a dashed reference line (e.g. 1.0 = balanced)."""
    h, top, bottom, left = 120, 30, 22, 8
    w = left + len(values) * (bw + gap) + 8
    vmax = vmax if vmax > 0 else 1.0
    w = max(w, 8 * len(title) + 16)
    out = [f'<svg width="{w}" height="{top + h + bottom}" viewBox="0 0 {w} {top + h + bottom}" role="img" '
           f'aria-label="{escape(title)}"><text x="{left}" y="14" style="font-weight:600">{escape(title)}</text>']
    for i, (lab, v) in enumerate(zip(labels, values)):
        x = left + i * (bw + gap)
        bh = max(1.0, h * min(v, vmax) / vmax)
        out.append(f'<rect x="{x}" y="{top + h - bh:.1f}" width="{bw}" height="{bh:.1f}" fill="{colour}">'
                   f'<title>{escape(lab)}: {fmt(v)}</title></rect>')
        if fmt(v):
            out.append(f'<text x="{x + bw / 2}" y="{top + h - bh - 4:.1f}" text-anchor="middle">{fmt(v)}</text>')
        out.append(f'<text x="{x + bw / 2}" y="{top + h + 15}" text-anchor="middle">{escape(lab)}</text>')
    if ref is not None and ref <= vmax:
        y = top + h - h * ref / vmax
        out.append(f'<line x1="{left - 4}" x2="{w - 4}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c33" stroke-dasharray="4 3"/>')
    out.append("</svg>")
    return "".join(out)


def gates_svg(report: RoutingReport) -> str:
    parts = []
    for l in report.layers:
        top = max(l.gates.hist) or 1
        labels = ["0"] + [""] * (len(l.gates.hist) - 2) + ["1"]
        parts.append(bars_svg(f"layer {l.layer}: gate weights 0..1", labels, [c / top for c in l.gates.hist], 1.0,
                              lambda v: "", "#7a9a56", bw=16, gap=3))
    return "".join(parts)


def coselect_svg(matrix: list[list[int]]) -> str:
    E = len(matrix)
    c, left, top = max(10, min(30, 480 // max(1, E))), 34, 20
    w, h = left + c * E + 4, top + c * E + 4
    peak = max((v for row in matrix for v in row), default=0) or 1
    out = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="co-selection">']
    for e in range(E):
        if c >= 20 or e % 4 == 0:
            out.append(f'<text x="{left + e * c + c / 2}" y="{top - 6}" text-anchor="middle">e{e}</text>')
            out.append(f'<text x="{left - 4}" y="{top + e * c + c / 2 + 4}" text-anchor="end">e{e}</text>')
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            out.append(f'<rect x="{left + j * c}" y="{top + i * c}" width="{c - 1}" height="{c - 1}" '
                       f'fill="{_mix("#ffffff", "#6a3d9a", v / peak) if i != j else "#eeeeee"}">'
                       f'<title>e{i} + e{j}: {v:,} tokens</title></rect>')
    out.append("</svg>")
    return "".join(out)


def _tok(s: str) -> str:
    return f'<code class="tok">{escape(json.dumps(s, ensure_ascii=False))}</code>'


def experts_tables(report: RoutingReport) -> str:
    out = []
    for l in report.layers:
        rows = []
        for e in l.experts:
            toks = " ".join(f"{_tok(t.text)}&nbsp;{t.count}&nbsp;({_pct(t.affinity)})" for t in e.top_tokens)
            rows.append(f'<tr><td class="l"><span style="color:{expert_hex(e.expert)}">&#9632;</span> e{e.expert}</td>'
                        f"<td>{e.load:,}</td><td>{_pct(e.share)}</td><td>{e.mean_prob:.3f}</td>"
                        f"<td>{_pct(e.concentration)}</td><td>{e.specialisation_bits:.2f}</td>"
                        f'<td class="l">{toks or "(no tokens: dead expert)"}</td></tr>')
        open_ = " open" if l.layer == report.text.layer else ""
        out.append(f"<details{open_}><summary>layer {l.layer}</summary><table><tr><th class='l'>expert</th>"
                   "<th>load</th><th>share</th><th>mean p</th><th>concentration</th><th>specialisation (bits)</th>"
                   f"<th class='l'>top tokens: count (affinity)</th></tr>{''.join(rows)}</table></details>")
    return "".join(out)


def pairs_html(report: RoutingReport) -> str:
    if report.model.top_k < 2:
        return "<p>top-1 routing: every token chooses a single expert, so there are no pairs.</p>"
    out = []
    for l in report.layers:
        rows = "".join(f"<tr><td class='l'>e{p.experts[0]} + e{p.experts[1]}</td><td>{p.count:,}</td>"
                       f"<td>{_pct(p.share)}</td><td>{p.lift:.2f}</td></tr>" for p in l.top_pairs)
        open_ = " open" if l.layer == report.text.layer else ""
        out.append(f"<details{open_}><summary>layer {l.layer}</summary><div class='charts'>"
                   f"{coselect_svg(l.coselect or [])}<table><tr><th class='l'>pair</th><th>tokens</th><th>share</th>"
                   f"<th>lift</th></tr>{rows}</table></div></details>")
    return "".join(out)


def paths_html(report: RoutingReport) -> str:
    ps = report.paths
    rows = []
    for pc in ps.top:
        path = " &rarr; ".join(f'<span style="color:{expert_hex(e)}">&#9632;</span>e{e}' for e in pc.path)
        rows.append(f"<tr><td class='l'>{path}</td><td>{pc.count:,}</td><td>{_pct(pc.share)}</td></tr>")
    cons = "".join(
        f"<tr><td>{l.layer}</td><td>{_pct(l.consecutive.top1_same)}</td><td>{_pct(l.consecutive.top1_same_chance)}</td>"
        f"<td>{_pct(l.consecutive.any_shared)}</td><td>{_pct(l.consecutive.any_shared_chance)}</td>"
        f"<td>{l.consecutive.pairs:,}</td></tr>" for l in report.layers)
    return (f"<p>{ps.n_distinct:,} distinct paths (top-1 expert at layers {', '.join(map(str, ps.layers))}) over "
            f"{ps.n_tokens:,} tokens.</p><table><tr><th class='l'>path</th><th>tokens</th><th>share</th></tr>"
            f"{''.join(rows)}</table><h2>Consecutive tokens sharing an expert</h2><table><tr><th>layer</th>"
            "<th>same top-1</th><th>chance</th><th>any expert shared</th><th>chance</th><th>pairs</th></tr>"
            f"{cons}</table>")


def render_html(report: RoutingReport) -> str:
    m, s, src = report.model, report.summary, report.source
    labels = [f"L{l.layer}" for l in report.layers]
    imb = [l.imbalance_max_mean for l in report.layers]
    charts = "".join([
        bars_svg("load imbalance (max/mean)", labels, imb, max(2.0, max(imb)), lambda v: f"{v:.2f}", "#d7301f", 1.0),
        bars_svg("router entropy / ln E", labels, [l.router_entropy for l in report.layers], 1.0,
                 lambda v: f"{v:.2f}", "#5b7bd5"),
        bars_svg("load entropy / ln E", labels, [l.load_entropy for l in report.layers], 1.0,
                 lambda v: f"{v:.2f}", "#3a9d8f"),
        bars_svg(f"dropped at capacity factor {m.capacity_factor}", labels, [l.dropped_frac for l in report.layers],
                 max(0.05, max(l.dropped_frac for l in report.layers)), lambda v: _pct(v), "#e08a1e"),
    ])
    legend = "".join(f'<span style="background:{expert_hex(e)}66">e{e}</span>' for e in range(m.n_experts))
    cards = "".join(f'<div class="card">{k}<b>{v}</b></div>' for k, v in [
        ("tokens", f"{src.tokens:,}"), ("worst layer", f"{s.worst_layer} ({s.worst_imbalance:.2f}x)"),
        ("mean router entropy", f"{s.mean_router_entropy:.3f}"), ("dropped", _pct(s.dropped_frac)),
        ("dead experts", str(s.dead_experts))])
    data = {"model": {"moe_layers": m.moe_layers}, "text": dataclasses.asdict(report.text),
            "colours": [expert_hex(e) for e in range(m.n_experts)]}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>minideep routing report</title>
<script>{ERROR_CAPTURE}</script>
<style>{CSS}</style></head>
<body>
<pre id="js-errors" hidden></pre>
<h1>Routing report</h1>
<div class="meta">{escape(src.checkpoint)} on {escape(src.text)} &middot; {escape(m.arch)}: {count(m.n_layer, 'layer')},
MoE at {', '.join(map(str, m.moe_layers))}; {count(m.n_experts, 'expert')}, top-{m.top_k}, {escape(m.router)} router &middot;
drops simulated at capacity factor {m.capacity_factor}, {m.train_batch_size} windows of {m.block_size} per batch
({escape(m.drop_policy)} order)</div>
<div class="cards">{cards}</div>
<section><h2>Load per layer and expert</h2>
<p class="meta">Share of each layer's assignments; white = uniform (1/{m.n_experts}), red = over-loaded,
blue = under-loaded, grey = dead. Hover a cell for counts.</p>{heatmap_svg(report)}</section>
<section><h2>Balance, entropy and drops</h2><div class="charts">{charts}</div>
<h2>Gate weights</h2><div class="charts">{gates_svg(report)}</div></section>
<section><h2>Text coloured by top-1 expert</h2>
<p>Colour by <select id="layer-select"></select> &middot; hover a token for its router probabilities at every
layer (outlined: the chosen experts); <code>#token=N</code> at the end of the address opens with token N
shown. First {len(report.text.ids):,} tokens.</p>
<div class="legend">{legend}</div><div id="tokens"></div><div id="tip"></div></section>
<section><h2>Experts: what each receives (specialisation)</h2>
<p class="meta">concentration = share of the expert's tokens taken by its top tokens; specialisation =
KL divergence of its token mix from the text's, in bits (0 = no preference); affinity = share of that
token's occurrences routed to the expert.</p>{experts_tables(report)}</section>
<section><h2>Experts chosen together</h2>{pairs_html(report)}</section>
<section><h2>Expert paths across layers</h2>{paths_html(report)}</section>
<script type="application/json" id="report-data">{_json_for_script(data)}</script>
<script>{SCRIPT}</script>
</body></html>
"""
