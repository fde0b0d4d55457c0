"""Rendering of `minideep bench` results (the plain dict minideep_cli.bench.run_bench returns) as
rich tables. Nothing here measures anything."""

from __future__ import annotations

from rich.table import Table


def _b(n) -> str:
    """Bytes, human-readable (binary units)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:.2f}"


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _table(title: str, *cols: str) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold")
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def render_bench(console, r: dict) -> None:
    console.print(f"minideep {r['minideep']} · torch {r['torch']} · device {r['device'] or '-'} · "
                  f"{r['threads']} threads · preset {r['preset'] or '-'} · arch {r['arch']} ({r['attention']})"
                  f"{' · quick' if r['quick'] else ''}")
    if r["train"]:
        t = r["train"]
        tab = _table("train (one micro-batch step: forward, backward, clip, optimizer)", "model", "tokens/s", "step",
                     "FLOPs/token", "achieved", "peak", "MFU")
        tab.add_row(f"{t['params'] / 1e6:.2f}M params ({t['active_params'] / 1e6:.2f}M active), "
                    f"{t['batch_size']}x{t['block_size']} {t['dtype']}",
                    f"{t['tokens_per_sec']:,.0f}", f"{t['step_ms']:,.1f} ms", f"{t['flops_per_token'] / 1e6:,.1f}M",
                    f"{t['achieved_tflops']:.3f} TFLOPS",
                    "-" if t["peak_tflops"] is None else f"{t['peak_tflops']:.2f} TFLOPS",
                    "-" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%")
        console.print(tab)
        console.print(f"  peak: {t['peak_source']}")
        console.print(f"  a {t['dtype']} square matmul here runs at {t['matmul_tflops']:.3f} TFLOPS: the step reaches "
                      f"{100 * t['matmul_fraction']:.0f}% of it")
        if t["variants"]:
            tab = _table("train: the same step with other settings (timed interleaved with it)", "with", "dtype",
                         "tokens/s", "step", "vs plain")
            for v in t["variants"]:
                tab.add_row(" ".join(v["overrides"]), v["dtype"], f"{v['tokens_per_sec']:,.0f}", f"{v['step_ms']:,.1f} ms",
                            _x(v["vs_base"]))
            console.print(tab)
    if r.get("busy"):
        render_busy(console, r["busy"])
    if r.get("products"):
        render_products(console, r["products"])
    if r["moe"]:
        tab = _table("moe layer forward+backward (ratios measured side by side)", "shape", "MoE", "dense SwiGLU",
                     "loop", "MoE / dense", "MoE / loop")
        for row in r["moe"]["rows"]:
            tab.add_row(f"{row['name']}: {row['tokens']:,}x{row['n_embd']}, {row['n_experts']} experts top-{row['top_k']}, "
                        f"h {row['expert_hidden']} (dense {row['dense_hidden']})",
                        f"{row['moe_ms']:.1f} ms", f"{row['dense_ms']:.1f} ms", f"{row['loop_ms']:.1f} ms",
                        _x(row["moe_vs_dense"]), _x(row["moe_vs_loop"]))
        console.print(tab)
    if r["decode"]:
        d = r["decode"]
        llama = any(row["llama_cpp_tokens_per_sec"] for row in d["speed"])  # llama-cpp-python installed
        tab = _table(f"decode (greedy, batch 1, {d['dtype']})", "attention", "context", "cached tok/s",
                     *(["llama.cpp tok/s"] if llama else []), "recompute tok/s", "cache speedup")
        for row in d["speed"]:
            theirs = row["llama_cpp_tokens_per_sec"]
            tab.add_row(row["attention"], str(row["context"]), f"{row['cached_tokens_per_sec']:,.1f}",
                        *([f"{theirs:,.1f}" if theirs else "-"] if llama else []),
                        f"{row['recompute_tokens_per_sec']:,.1f}", _x(row["speedup"]))
        console.print(tab)
        tab = _table("decoding cache per sequence", "attention", "per token", "fixed state", "per sequence",
                     "vs gqa")
        for row in d["cache"]:
            tab.add_row(row["attention"], _b(row["bytes_per_token"]), _b(row["state_bytes"]),
                        f"{_b(row['bytes_per_sequence'])} ({row['block_size']} tokens)", _x(row["vs_gqa"]))
        console.print(tab)
    if r["memory"]:
        render_memory(console, r["memory"])
    if r["tokenizer"]:
        t = r["tokenizer"]
        tab = _table("tokenizer (byte-level BPE, bundled corpus)", "corpus", "train", "encode", "bytes/token")
        tab.add_row(f"{t['corpus_bytes'] / 1e6:.2f} MB, vocab {t['vocab_size']:,}", f"{t['train_sec']:.2f} s",
                    f"{t['encode_mb_per_sec']:.2f} MB/s", f"{t['bytes_per_token']:.2f}")
        console.print(tab)
    if r["peers"]:
        p = r["peers"]
        tab = _table(f"peers: Hugging Face transformers {p['transformers']}, same model, same batch, same AdamW",
                     "model", "minideep tok/s", "transformers tok/s", "minideep speedup")
        for row in p["train"]:
            tab.add_row(f"train {row['arch']} ({row['hf_class']}, {row['n_layer']}x{row['n_embd']})",
                        f"{row['minideep_tokens_per_sec']:,.0f}", f"{row['hf_tokens_per_sec']:,.0f}", _x(row["speedup"]))
        for row in p["decode"]:
            tab.add_row(f"decode {row['arch']}, {row['context']} context, KV cache",
                        f"{row['minideep_tokens_per_sec']:,.1f}", f"{row['hf_tokens_per_sec']:,.1f}", _x(row["speedup"]))
        console.print(tab)
        for row in p["train"]:
            console.print(f"  train {row['arch']}: a square matmul timed alongside ran at {row['matmul_tflops']:.3f} TFLOPS; "
                          f"the steps reach {100 * row['minideep_matmul_fraction']:.0f}% (minideep) and "
                          f"{100 * row['hf_matmul_fraction']:.0f}% (transformers) of it")
    console.print(f"done in {r['elapsed_sec']:.1f} s")


def render_busy(console, b: dict) -> None:
    """The step alone and beside the busy process, with torch's thread count and minideep train's."""
    tab = _table("train step beside a busy process bench started (one core's work; rounds alternated)",
                 "threads", "step", "vs alone")
    tab.add_row(f"alone, {b['threads']} (torch's choice)", f"{b['alone_ms']:,.1f} ms", "1.00x")
    tab.add_row(f"beside it, {b['threads']} (torch's choice)", f"{b['busy_ms']:,.1f} ms", _x(b["busy_ratio"]))
    tab.add_row(f"beside it, {b['policy_threads']} (minideep train's choice)", f"{b['busy_policy_ms']:,.1f} ms",
                _x(b["busy_policy_ratio"]))
    console.print(tab)


def render_products(console, p: dict) -> None:
    """The step's products and attention kernels alone, and the ceiling of its matmul share."""
    tab = _table("the train step's products, each timed alone (interleaved with the step)", "part", "calls",
                 "time a step", "of the square rate")
    for row in p["rows"]:
        share = "-" if row["flops_share"] is None else f"{100 * row['flops_share']:.0f}%"
        dtypes = f" ({', '.join(row['dtypes'])})" if row["dtypes"] else ""
        tab.add_row(row["what"] + dtypes, f"{row['calls']:,}", f"{row['ms']:,.1f} ms", share)
    tab.add_row("the whole step", "", f"{p['step_ms']:,.1f} ms", "")
    console.print(tab)
    ceiling = "-" if p["ceiling_share"] is None else f"{100 * p['ceiling_share']:.0f}%"
    console.print(f"  forward and backward products and attention alone: {p['alone_ms']:,.1f} ms, "
                  f"{100 * p['alone_of_step']:.0f}% of the step; a step of only these (the rest, the optimizer "
                  f"included, free) would reach {ceiling} of the square matmul's rate (the step: "
                  f"{100 * p['step_share']:.0f}%)")


def render_memory(console, m: dict) -> None:
    e = m["estimate"]
    tab = _table(f"predicted peak training memory ({e['dtype']}, batch {e['batch_size']}x{e['block_size']}, "
                 f"{e['params'] / 1e6:.1f}M params; nothing allocated)", "part", "bytes")
    for label, key in (("weights (fp32)", "weights_bytes"), ("gradients (fp32)", "grads_bytes"),
                       ("AdamW states (2 x fp32)", "adamw_bytes"), ("activations", "activations_bytes"),
                       ("activations, gradient checkpointing", "activations_checkpointed_bytes"),
                       ("logits and their gradients", "logits_bytes"), ("peak", "peak_bytes"),
                       ("peak, gradient checkpointing", "peak_checkpointed_bytes")):
        tab.add_row(label, _b(e[key]))
    ck = "on" if e["grad_checkpointing"] else "off"
    tab.add_row(f"[bold]predicted (checkpointing {ck} in this config)[/bold]", f"[bold]{_b(e['predicted_bytes'])}[/bold]")
    console.print(tab)
    if e["device_memory_bytes"] is not None:
        verdict = "[green]fits[/green]" if e["fits"] else "[red]does not fit[/red]"
        console.print(f"  {verdict} in {_b(e['device_memory_bytes'])}: margin {_b(e['margin_bytes'])} "
                      "(fits = predicted peak <= 90% of the device)")
    if m["checks"]:
        tab = _table("estimate against a measured peak", "model", "checkpointing", "estimated", "measured", "error")
        for c in m["checks"]:
            tab.add_row(f"{c['model']} ({c['method']})", "on" if c["grad_checkpointing"] else "off",
                        _b(c["estimated_bytes"]), _b(c["measured_bytes"]),
                        "-" if c["error"] is None else f"{100 * c['error']:+.0f}%")
        console.print(tab)
