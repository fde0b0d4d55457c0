"""The HTML routing report: one self-contained file, safe with any token text, and it renders in
a real (headless) browser without script errors."""

import json
import re
import shutil
import subprocess

import pytest
from test_routing import VOCAB, hand_trace

from minideep_cli.routing_report import ModelInfo, ReportInputs, analyze
from minideep_cli.views.html import render_html

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
NASTY = "</script><img src=x onerror=alert(1)>"


def report(vocab=VOCAB):
    info = ModelInfo("moe", 2, [0, 1], 4, 2, "softmax", 1.0, "position", 2, 3)
    return analyze(hand_trace(), vocab, info, ReportInputs("runs/x/best.pt", "hand-built <text>", 6), layer=1)


def test_report_is_one_file_with_no_external_references():
    html = render_html(report())
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert not re.search(r"""\b(?:src|href|xlink:href|action)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert not re.search(r"@import|url\s*\(|<link\b|<iframe\b|<img\b|<script[^>]+src", html, re.I)
    assert "http://" not in html and "https://" not in html
    assert html.count("<svg") >= 5  # heatmap, four charts, gates, co-selection
    data = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1)
    embedded = json.loads(data)
    assert embedded["text"]["tokens"] == ["F", "H", "F", "J", "F", "H"]
    assert embedded["text"]["layer"] == 1 and embedded["model"]["moe_layers"] == [0, 1]


def test_token_text_cannot_break_out_of_the_page():
    vocab = list(VOCAB)
    vocab[5] = NASTY.encode()
    html = render_html(report(vocab))
    assert NASTY not in html and "<img" not in html
    assert html.count("</script>") == 3  # the error capture, the data, the script: nothing closes them early
    data = re.search(r'id="report-data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(data)["text"]["tokens"][0] == NASTY


def browse(page, tmp_path, *args):
    """Run headless chromium on a file; returns (completed process, console lines from its log)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", *args, page]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [l for l in r.stderr.splitlines() if ":CONSOLE" in l]
    return r, console


def page_state(dom: str) -> tuple[str, str]:
    status = re.search(r'<body[^>]*data-status="([^"]*)"', dom)
    errors = re.search(r'<pre id="js-errors"[^>]*>(.*?)</pre>', dom, re.S)
    return (status.group(1) if status else ""), (errors.group(1) if errors else "<no error element>")


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    f = tmp_path / "report.html"
    f.write_text(render_html(report()), encoding="utf-8")
    # the #token=N address runs the hover code too (token 3's router probabilities at every layer)
    r, console = browse(f.as_uri() + "#token=3", tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    status, errors = page_state(r.stdout)
    assert (status, errors) == ("ok", ""), errors
    assert not console, console
    tip = re.search(r'<div id="tip"[^>]*>(.*?)</div></section>', r.stdout, re.S).group(1)
    assert "layer 0: e3" in tip and "layer 1: e2" in tip and 'class="chosen"' in tip
    assert r.stdout.count('<span data-i="') == 6

    shot = tmp_path / "shot.png"
    r, console = browse(f.as_uri(), tmp_path, "--window-size=1200,1400", f"--screenshot={shot}", "--hide-scrollbars")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    assert not console, console
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1400)
    colours = img.getcolors(maxcolors=1 << 20)
    most = max(n for n, _ in colours)
    assert len(colours) > 50 and most < 0.95 * img.size[0] * img.size[1], (len(colours), most)


@needs_chromium
def test_the_browser_check_catches_a_script_error(tmp_path):
    """The checks above must fail for a page whose script breaks."""
    f = tmp_path / "broken.html"
    f.write_text(render_html(report()).replace("var spans = [];", "var spans = []; undefinedFunction();"))
    r, console = browse(f.as_uri(), tmp_path, "--dump-dom")
    status, errors = page_state(r.stdout)
    assert status == "" and "undefinedFunction" in errors
    assert any("undefinedFunction" in l for l in console)
