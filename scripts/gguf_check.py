"""A trained model against its GGUF exports in llama.cpp, in one command (the record
docs/results/2026-12-07-gguf.md was made with it):

    python scripts/gguf_check.py RUN [--text HELD_OUT.txt] [--prompt "ROMEO:"] [--tokens 100] [--json OUT.json]
                                     [--threads N] [--no-bpb]

For each dtype (f32, f16, bf16, q8_0) it exports RUN with `minideep export --format gguf` into a
temporary folder, then compares, through llama-cpp-python: the token ids of the held-out text; the
logits of its first block_size tokens (f32 KV cache, and llama.cpp's default f16 one); the greedy
continuation of the prompt against `minideep sample --temperature 0`'s; bits per byte on the held-out
text (minideep eval's windows); file sizes; and decoding tokens/s after the prompt, minideep's cached
generation against llama.cpp's, with the same number of threads (torch's; set it with
--threads), one token of each in turn. The held-out text defaults to the
last 10% of the bundled corpus (the bundled data's validation split). Needs the gguf and
llama-cpp-python packages (docs/export.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minideep_cli.data import bundled_corpus, read_text_file
from minideep_cli.errors import UserError
from minideep_cli.evaluate import evaluate_tokens
from minideep_cli.export import export_checkpoint
from minideep_cli.generate import generate
from minideep_cli.inference import load_for_inference
from minideep_cli.tokenizer import token_byte_lengths, token_bytes


def decode_speeds(decoders: dict, n: int) -> dict:
    """Greedy tokens/s of each decoder (name -> a generator of tokens after its prompt), timed one
    token at a time in turn, so that every decoder meets the same load on a shared machine; the
    median step of each. The prefill and first token are not timed."""
    for d in decoders.values():
        next(d)
    times = {name: [] for name in decoders}
    for _ in range(n):
        for name, d in decoders.items():
            start = time.perf_counter()
            next(d)
            times[name].append(time.perf_counter() - start)
    return {name: 1 / float(np.median(t)) for name, t in times.items()}


def check(run: Path, text: str, prompt_text: str, n_new: int, bpb: bool = True) -> dict:
    from minideep_cli import llamacpp

    llamacpp.llama_cpp_module()
    lo = load_for_inference(run, "cpu")
    model, tok, T = lo.model, lo.tokenizer, lo.config.model.block_size
    threads = torch.get_num_threads()
    lengths = token_byte_lengths(tok)
    held = tok.encode(text).ids
    window = held[:T]
    prompt = tok.encode(prompt_text).ids
    n_new = min(n_new, T - len(prompt))  # within the context, where minideep never restarts it
    with torch.no_grad():
        ours_logits = model(torch.tensor([window])).logits[0].numpy()
    ours_tokens = list(generate(model, prompt, n_new, temperature=0.0))
    pieces = token_bytes(tok)
    out = {
        "run": str(run), "step": lo.step, "block_size": T, "threads": threads, "prompt": prompt_text,
        "held_out_tokens": len(held),
        "minideep": {
            "bpb": evaluate_tokens(model, np.array(held), lengths, T)["bpb"] if bpb else None,
            "continuation": b"".join(pieces[i] for i in ours_tokens).decode("utf-8", "replace"),
        },
        "gguf": {},
    }
    decoders = {"minideep": generate(model, prompt, n_new, temperature=0.0)}
    with tempfile.TemporaryDirectory() as folder:
        for dtype in ("f32", "f16", "bf16", "q8_0"):
            path = Path(folder) / f"m-{dtype}.gguf"
            res = export_checkpoint(lo.path, path, "gguf", dtype=dtype)
            llm = llamacpp.open_gguf(path, T, threads=threads)
            theirs_tokens = llamacpp.greedy(llm, prompt, n_new)
            same = next((i for i, (a, b) in enumerate(zip(ours_tokens, theirs_tokens)) if a != b), n_new)
            diff = np.abs(llamacpp.logits(llm, window) - ours_logits).max()
            row = {
                "arch": res.target, "bytes": path.stat().st_size,
                "tokenization_equal": llamacpp.tokenize(llm, text) == held,
                "max_logit_diff": float(diff), "max_logit_diff_relative": float(diff / np.abs(ours_logits).max()),
                "greedy_tokens_equal": same, "greedy_tokens": n_new,
                "bpb": llamacpp.bits_per_byte(llm, held, lengths, T) if bpb else None,
            }
            decoders[dtype] = llamacpp.greedy_steps(llamacpp.open_gguf(path, T, threads=threads), prompt)
            if dtype == "f32":  # llama.cpp's default KV cache, f16
                f16_cache = llamacpp.open_gguf(path, T, threads=threads, f32_cache=False)
                d = np.abs(llamacpp.logits(f16_cache, window) - ours_logits).max()
                row["f16_cache_max_logit_diff_relative"] = float(d / np.abs(ours_logits).max())
                g = llamacpp.greedy(f16_cache, prompt, n_new)
                row["f16_cache_greedy_tokens_equal"] = next(
                    (i for i, (a, b) in enumerate(zip(ours_tokens, g)) if a != b), n_new)
            out["gguf"][dtype] = row
        speeds = decode_speeds(decoders, n_new - 1)  # within the context: prompt + n_new <= block_size
    out["minideep"]["decode_tokens_per_sec"] = speeds.pop("minideep")
    for dtype, tps in speeds.items():
        out["gguf"][dtype]["decode_tokens_per_sec"] = tps
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="run dir, checkpoint or safetensors export")
    ap.add_argument("--text", type=Path, help="held-out text (default: the bundled corpus's last 10%%)")
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--tokens", type=int, default=100, help="greedy tokens to compare and time")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--no-bpb", action="store_true", help="skip bits per byte (the slow part)")
    ap.add_argument("--threads", type=int, help="threads for both minideep and llama.cpp (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        if a.text:
            text = read_text_file(a.text)
        else:
            corpus = bundled_corpus().read_text(encoding="utf-8")
            text = corpus[int(len(corpus) * 0.9):]
        result = check(a.run, text, a.prompt, a.tokens, bpb=not a.no_bpb)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
