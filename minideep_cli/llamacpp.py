"""Running an exported GGUF file in llama.cpp through llama-cpp-python: tokens, logits, greedy
continuations, bits per byte and decoding speed, the way minideep computes each, so the two can be
compared (tests/test_gguf.py, `minideep bench -s decode`, scripts/gguf-check.py).

llama.cpp keeps its KV cache in f16 unless told otherwise; these helpers open the model with an
f32 cache (and no flash attention), so an f32 file computes what minideep computes in fp32.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .errors import UserError

INSTALL_HINT = ("pip install llama-cpp-python==0.3.36 (it compiles llama.cpp from source: "
                "cmake and a C++ compiler, about 10-25 minutes on 2 cores)")


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"running a GGUF file needs llama-cpp-python: {INSTALL_HINT}")
    return llama_cpp


def open_gguf(path: str | os.PathLike, n_ctx: int, threads: Optional[int] = None, f32_cache: bool = True):
    """A llama_cpp.Llama over the file, keeping every position's logits (llm.scores)."""
    llama_cpp = llama_cpp_module()
    if not Path(path).is_file():
        raise UserError(f"GGUF file not found: {path}")
    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                               flash_attn=False, n_threads=threads, n_threads_batch=threads, verbose=False, **cache)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise UserError(f"llama.cpp cannot load {path}: {str(e).splitlines()[0][:160]}")


def tokenize(llm, text: str) -> list[int]:
    """As minideep encodes: no BOS added, and a literal <|endoftext|> in the text stays text."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) float32 logits of every position of one sequence, from position 0."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy_steps(llm, prompt: list[int]) -> Iterator[int]:
    """Greedy tokens after the prompt, one per next(): each the argmax of the last logits (ties:
    the lowest id, as torch's argmax), fed back before the next one is chosen."""
    llm.reset()
    llm.eval(prompt)
    while True:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        yield token
        llm.eval([token])


def greedy(llm, prompt: list[int], n: int) -> list[int]:
    return list(itertools.islice(greedy_steps(llm, prompt), n))


def bits_per_byte(llm, tokens: list[int], byte_lengths: list[int], block_size: int) -> float:
    """minideep eval's windows (evaluate.py): non-overlapping windows of block_size, every token
    but the first predicted once; summed NLL over the UTF-8 bytes of the predicted tokens."""
    nll, n_bytes = 0.0, 0
    for s in range(0, len(tokens) - 1, block_size):
        window = tokens[s : s + block_size + 1]
        z = logits(llm, window[:-1]).astype(np.float64)  # (T, V)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        targets = np.asarray(window[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        n_bytes += sum(byte_lengths[t] for t in targets)
    return nll / (np.log(2) * n_bytes)


def decode_tokens_per_sec(llm, prompt: list[int], n: int, warmup: int = 2) -> float:
    """Greedy tokens per second after the prompt, the median step, as bench's per_token_seconds
    times minideep (the prefill, first token and `warmup` tokens are not timed)."""
    steps = greedy_steps(llm, prompt)
    next(steps)  # prefill + first token
    times = []
    for i in range(n + warmup):
        start = time.perf_counter()
        next(steps)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1 / statistics.median(times)
