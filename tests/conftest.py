import pytest
import torch

from minideep_cli.config import Config
from minideep_cli.models import ModelConfig, model_config, spec_for

HOSTILE = (
    "Héllo, wörld! Ça va? naïve café\n"
    "日本語のテキスト、中文字符。한국어\n"
    "emoji 🎉👩‍👩‍👧‍👦🚀 flags 🇫🇷\n"
    "tabs\there\t\tand CRLF\r\nlines\r\n"
    "  leading spaces, trailing   \n\n\n"
    "control \x01\x02\x7f and zero-width \u200b joiner\n"
    "<|endoftext|> appears in plain text too\n"
    "math ∑∫√∞ ≠ ≤ and combining e\u0301\n"
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test gets its own cache dir and working dir; nothing touches ~/.cache or the repo."""
    monkeypatch.setenv("MINIDEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def corpus_text():
    from minideep_cli.data import bundled_corpus

    return bundled_corpus().read_text()[:120_000]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, corpus_text):
    """A small tokenized data dir (120k chars of Shakespeare, vocab 300), made once."""
    from minideep_cli.data import tokenize_text

    out = tmp_path_factory.mktemp("data") / "tokens"
    tokenize_text(corpus_text, out, vocab_size=300, source="test")
    return out


def tiny_model_cfg(arch: str, **kw) -> ModelConfig:
    """A small model section of the arch; settings in kw that it does not have (a test over every
    arch passing moe's capacity_factor) are left out."""
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    if arch == "moe":
        base.update(n_kv_head=2, n_experts=4, top_k=2, capacity_factor=1.0, router_noise="none")
    base.update(kw)
    keys = spec_for(arch).keys()
    return model_config(arch, **{k: v for k, v in base.items() if k in keys})


def tiny_train_cfg(data_dir, arch="moe", **train) -> Config:
    cfg = Config()
    cfg.model = tiny_model_cfg(arch, block_size=32)
    cfg.data.dir = str(data_dir)
    t = dict(batch_size=8, max_steps=20, max_minutes=0, lr=3e-3, eval_interval=10, eval_iters=2,
             log_interval=1, sample_tokens=0, warmup=0.1)
    t.update(train)
    for k, v in t.items():
        setattr(cfg.train, k, v)
    return cfg


def unigram_nats(data_dir) -> float:
    """Nats per token of the best context-free model of the training split: a model that learned
    anything from context beats it."""
    import numpy as np

    from minideep_cli.data import TokenData

    d = TokenData.open(data_dir)
    counts = np.bincount(np.asarray(d.train), minlength=d.meta["vocab_size"]).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def invoke(*args):
    """The CLI in this process, every argument as a string."""
    from typer.testing import CliRunner

    from minideep_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_error(result, *needles):
    """One `error: ...` line naming each needle, a non-zero exit and no traceback."""
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for n in needles:
        assert n in lines[0], lines[0]


def leftovers(parent) -> list:
    """Hidden names in a folder: what a writer left behind."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def scale_up_weights(model, std: float, router_bias: bool = False) -> None:
    """Random weights scaled up so that routing, gates and every term of a tiny model matter:
    norms near 1, the router wide, matrices at std / sqrt(fan_in); a nonzero selection bias
    (router_bias), as aux-loss-free balancing leaves it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "router" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, std / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1)
        for name, b in model.named_buffers():
            if router_bias and name.endswith("router.bias"):
                b.normal_(0, 0.3)
