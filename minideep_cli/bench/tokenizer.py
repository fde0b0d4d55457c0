"""The tokenizer section: BPE training time and encode throughput on the bundled corpus."""

from __future__ import annotations

import time

from ..config import Config
from ..data import bundled_corpus
from ..tokenizer import split_chunks, train_tokenizer
from .timing import BenchOptions, median_times


def bench_tokenizer(cfg: Config, opts: BenchOptions) -> dict:

    text = bundled_corpus().read_text(encoding="utf-8")
    nbytes = len(text.encode("utf-8"))
    vocab = cfg.data.vocab_size
    start = time.perf_counter()
    tok = train_tokenizer([text], vocab)
    train_s = time.perf_counter() - start
    chunks = list(split_chunks(text, 1 << 16))
    sec = median_times({"encode": lambda: [tok.encode(c) for c in chunks]}, max(1, opts.repeats // 2), 1)["encode"]
    n_tokens = sum(len(tok.encode(c).ids) for c in chunks)
    return {"corpus_bytes": nbytes, "vocab_size": vocab, "train_sec": train_s, "encode_mb_per_sec": nbytes / sec / 1e6,
            "tokens": n_tokens, "bytes_per_token": nbytes / n_tokens}
