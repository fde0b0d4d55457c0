"""What every check under tests/gpu shares: the device they run on and the shapes they use.

Normally the checks run on CUDA at the presets' shapes (skipped, with a reason, where there is
no CUDA). With MINIDEEP_GPU_CHECK_CPU=1 (what `scripts/gpu-check.sh OUT --cpu` sets) the same
code runs on the CPU with tiny shapes, so the checks are exercised on every default test run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from minideep_cli.config import Config, resolve_config

ROOT = Path(__file__).resolve().parents[2]  # the checkout these tests belong to
CPU_MODE = os.environ.get("MINIDEEP_GPU_CHECK_CPU") == "1"
HAS_CUDA = torch.cuda.is_available()

# every module here: marked gpu (outside the default run), skipped where it cannot run
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CPU_MODE and not HAS_CUDA,
                       reason="no CUDA GPU (set MINIDEEP_GPU_CHECK_CPU=1 for the CPU dry run)"),
]

# --cpu: the presets' per-arch settings shrunk to a few seconds of CPU work (moe keeps its
# routing: experts, top_k, first_k_dense; mla its latent ranks, scaled down)
TINY = {
    "model.block_size": 32, "model.n_layer": 2, "model.n_embd": 32, "model.n_head": 4,
    "train.batch_size": 4,
}
TINY_MOE = {"model.n_kv_head": 2, "model.kv_lora_rank": 16, "model.q_lora_rank": 0, "model.qk_nope_head_dim": 8,
            "model.qk_rope_head_dim": 4, "model.v_head_dim": 8}


def tiny_overrides(arch: str, vocab: int | None = None) -> list[str]:
    items = {**TINY, **(TINY_MOE if arch == "moe" else {})}
    if vocab:
        items["data.vocab_size"] = vocab
    return [f"{k}={v}" for k, v in items.items()]


@dataclass
class Rig:
    """The device the checks run on and how large they are."""

    device: str
    cpu_mode: bool

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def config(self, preset: str, arch: str, attention: str | None = None, overrides=(), **train) -> Config:
        """The preset's config for arch (tiny in CPU mode) on this device, bf16 autocast, one
        micro-batch a step, no compile unless asked, no sampling; train.* keywords override."""
        o = tiny_overrides(arch) if self.cpu_mode else []
        if attention:
            o.append(f"model.attention={attention}")
        o += [f"train.device={self.device}", "train.dtype=bfloat16", "train.compile=false", "train.grad_accum=1",
              "train.max_minutes=0", "train.sample_tokens=0", "train.log_interval=1", "train.eval_iters=1",
              *overrides]
        o += [f"train.{k}={v}" for k, v in train.items()]
        return resolve_config(preset, overrides=o, arch=arch)


@pytest.fixture(scope="session")
def rig() -> Rig:
    return Rig("cpu" if CPU_MODE else "cuda", CPU_MODE)


@pytest.fixture(scope="session")
def preset_data(tmp_path_factory, corpus_text):
    """Tokenized training data: the whole bundled corpus at the rtx3060 preset's vocabulary on
    CUDA (long enough for its 1,024-token context); 120k characters, vocabulary 300 and a small
    validation split (train() ends by evaluating all of it) on the CPU."""
    from minideep_cli.data import bundled_corpus, tokenize_text

    out = tmp_path_factory.mktemp("gpu-data") / "tokens"
    if CPU_MODE:
        tokenize_text(corpus_text, out, vocab_size=300, val_fraction=0.02, source="gpu-check")
    else:
        vocab = resolve_config("rtx3060").data.vocab_size
        tokenize_text(bundled_corpus().read_text(), out, vocab_size=vocab, source="gpu-check")
    return out


def subprocess_env(**extra) -> dict:
    """The environment for `python -m minideep_cli` in a child process: this checkout's package
    first, whatever the working directory (the tests run in a temporary one)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


def losses_of(events: list) -> list[float]:
    return [info["loss"] for kind, info in events if kind == "step"]


def recorder(events: list):
    def on_event(kind, info):
        events.append((kind, info))
    return on_event


def count_grouped(monkeypatch) -> list[int]:
    """Count the experts' grouped-matmul calls, through every function Experts.forward may pick
    (models.fast.GROUPED for bf16, EAGER_GROUPED otherwise, one per activation)."""
    import minideep_cli.models.fast as moe_mod

    calls = [0]
    for table in (moe_mod.GROUPED, moe_mod.EAGER_GROUPED):
        for name, inner in list(table.items()):

            def counted(*a, _inner=inner, **k):
                calls[0] += 1
                return _inner(*a, **k)

            monkeypatch.setitem(table, name, counted)
    return calls
