"""The decode section: generation tokens/s with and without the cache at several context lengths,
each attention variant's cache bytes, read from the models, and, where llama-cpp-python is
installed, the same model exported to GGUF (f32) decoding the same prompt in llama.cpp."""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import Config, validate
from ..errors import UserError
from ..generate import generate
from ..models import build_model, spec_of
from .timing import BenchOptions, syncer


def attention_variants(cfg: Config) -> list[str]:
    """The attention variants of the arch this config accepts (one where the arch's is fixed:
    gpt2's multi-head attention)."""
    offered = spec_of(cfg.model).attentions
    if len(offered) == 1:
        return list(offered)
    out = []
    for v in offered:
        c = copy.deepcopy(cfg)
        c.model.attention = v
        try:
            validate(c)
        except UserError:
            continue
        out.append(v)
    return out


def variant_config(cfg: Config, variant: str) -> Config:
    c = copy.deepcopy(cfg)
    if len(spec_of(c.model).attentions) > 1:  # model.attention chooses it
        c.model.attention = variant
    return c


def cache_rows(cfg: Config, dtype) -> list[dict]:
    """Cache bytes per token and per sequence (block_size tokens) for each attention variant, read
    from the models (built on the meta device: nothing is allocated)."""
    rows = []
    for v in attention_variants(cfg):
        with torch.device("meta"):
            model = build_model(variant_config(cfg, v).model)
        per_token, state = model.cache_bytes_per_token(dtype), model.cache_state_bytes(dtype)
        rows.append({"attention": v, "bytes_per_token": per_token, "state_bytes": state,
                     "bytes_per_sequence": cfg.model.block_size * per_token + state, "block_size": cfg.model.block_size})
    base = next((r["bytes_per_sequence"] for r in rows if r["attention"] in ("gqa", "mha")), None)
    for r in rows:
        r["vs_gqa"] = r["bytes_per_sequence"] / base if base else None
    return rows


def per_token_seconds(model, prompt: list[int], n: int, use_cache: bool, device: str, warmup: int) -> float:
    """Median seconds per generated token after the prompt (its prefill and `warmup` tokens are not timed)."""
    sync = syncer(device)
    gen = generate(model, prompt, n + warmup + 1, temperature=0.0, use_cache=use_cache, device=device)
    times = []
    next(gen)  # prefill + first token
    for i in range(n + warmup):
        start = time.perf_counter()
        next(gen)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def llama_cpp_runner(model, device: str, dtype, folder: str):
    """A function (prompt, n, warmup) -> tokens/s of this model in llama.cpp, or None where that
    is not measured: llama-cpp-python not installed, not on CPU in fp32 (the GGUF is the fp32
    model), or no llama.cpp architecture computes the model (export/gguf.py)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    from ..export.gguf import gguf_plan, placeholder_tokenizer_keys, write_gguf
    from ..llamacpp import decode_tokens_per_sec, open_gguf

    if device != "cpu" or dtype != torch.float32:
        return None
    try:
        plan = gguf_plan(model)
    except UserError:
        return None
    path = f"{folder}/{plan.arch}.gguf"
    write_gguf(Path(path), plan, placeholder_tokenizer_keys(model.cfg.vocab_size), "f32")
    llm = open_gguf(path, model.cfg.block_size, threads=torch.get_num_threads())
    return lambda prompt, n, warmup: decode_tokens_per_sec(llm, prompt, n, warmup)


def bench_decode(cfg: Config, opts: BenchOptions, device: str, dtype) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        return _bench_decode(cfg, opts, device, dtype, folder)


def _bench_decode(cfg: Config, opts: BenchOptions, device: str, dtype, folder: str) -> dict:
    speed = []
    longest = max(opts.decode_contexts)
    for v in attention_variants(cfg):
        c = variant_config(cfg, v)
        c.model.block_size = max(c.model.block_size, longest + opts.decode_tokens + opts.warmup + 2)
        c.model.dropout = 0.0
        torch.manual_seed(0)
        model = build_model(c.model).to(device=device, dtype=dtype).eval()
        llama = llama_cpp_runner(model, device, dtype, folder)
        g = torch.Generator().manual_seed(1)
        for ctx_len in opts.decode_contexts:
            prompt = torch.randint(0, c.model.vocab_size, (ctx_len,), generator=g).tolist()
            with torch.no_grad():
                cached = per_token_seconds(model, prompt, opts.decode_tokens, True, device, opts.warmup)
                full = per_token_seconds(model, prompt, max(3, opts.decode_tokens // 3), False, device, 1)
            theirs = llama(prompt, opts.decode_tokens, opts.warmup) if llama else None
            speed.append({"attention": v, "context": ctx_len, "cached_tokens_per_sec": 1 / cached,
                          "recompute_tokens_per_sec": 1 / full, "speedup": full / cached,
                          "llama_cpp_tokens_per_sec": theirs})
    return {"dtype": str(dtype).replace("torch.", ""), "speed": speed, "cache": cache_rows(cfg, dtype)}
