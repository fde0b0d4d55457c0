"""The arch seam (docs/design.md, Architectures): a third arch, defined and registered here without
touching minideep_cli/, trains, evaluates, samples, exports to safetensors and is benchmarked
through the CLI. It is a dense pre-LayerNorm transformer (one layer in these runs) built from
minideep's own layers, so what is tested is the seam, not new math."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_clean_error, invoke

from minideep_cli.config import resolve_config
from minideep_cli.errors import UserError
from minideep_cli.models import ARCHES, ArchSpec, ModelConfig, register
from minideep_cli.models.attention import Cache, KVCache
from minideep_cli.models.layers import causal_attention, param_roles
from minideep_cli.models.output import Output, lm_loss

NAME = "tinydense"


@dataclass
class TinyDenseConfig(ModelConfig):
    arch: str = NAME
    mlp_ratio: int = 2  # the MLP's hidden width is mlp_ratio * n_embd


def check_tiny_dense(m: TinyDenseConfig) -> None:
    if m.mlp_ratio < 1:
        raise UserError(f"model.mlp_ratio must be at least 1, got {m.mlp_ratio}")


class Layer(nn.Module):
    def __init__(self, cfg: TinyDenseConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.norm1, self.norm2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd)

    def forward(self, x, cache: KVCache | None, pos: int):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3 * self.n_head, -1).transpose(1, 2).chunk(3, dim=1)
        if cache is not None:  # q, k, v: (B, nh, T, hs)
            k, v = cache.update(pos, k, v)  # (B, nh, pos+T, hs)
        x = x + self.proj(causal_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyDense(nn.Module):
    """The Model interface (docs/design.md) and nothing more."""

    def __init__(self, cfg: TinyDenseConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd)
        self.grad_checkpointing = False  # the train loop sets it; these layers are small enough without
        for p in (self.wte.weight, self.wpe.weight):  # small, so the tied head starts near uniform
            nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx, targets=None, cache: Cache | None = None) -> Output:
        pos = cache.pos if cache is not None else 0
        x = self.wte(idx) + self.wpe.weight[pos : pos + idx.size(1)]  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache.layers[i] if cache is not None else None, pos)
        if cache is not None:
            cache.pos += idx.size(1)
        logits = self.norm(x) @ self.wte.weight.T  # tied output head: (B, T, vocab)
        return Output(logits, lm_loss(logits, targets) if targets is not None else None, {})

    def param_roles(self) -> dict[str, str]:
        return param_roles(self, [m.weight for m in self.layers.modules() if isinstance(m, nn.Linear)])

    def new_cache(self, batch, max_len=None, dtype=None, device=None) -> Cache:
        c, w = self.cfg, self.wte.weight
        return Cache([KVCache(batch, c.n_head, max_len or c.block_size, c.n_embd // c.n_head, dtype or w.dtype,
                              device or w.device) for _ in range(c.n_layer)])

    def cache_bytes_per_token(self, dtype=None) -> int:
        return self.cfg.n_layer * 2 * self.cfg.n_embd * (dtype or self.wte.weight.dtype).itemsize

    def cache_state_bytes(self, dtype=None) -> int:
        return 0

    def num_params(self, active: bool = False, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.wte.weight.numel() - self.wpe.weight.numel()

    def flops_per_token(self, seq_len: int) -> int:
        matmul = sum(p.numel() for p in self.layers.parameters() if p.dim() == 2) + self.wte.weight.numel()
        return 6 * matmul + 12 * self.cfg.n_layer * self.cfg.n_embd * seq_len


SPEC = ArchSpec(name=NAME, config=TinyDenseConfig, model=f"{__name__}:TinyDense", layer_prefix="layers",
                attentions=("mha",), validate=check_tiny_dense)

TINY = ["-o", "model.n_layer=1", "-o", "model.n_embd=32", "-o", "model.n_head=2", "-o", "model.block_size=32",
        "-o", "train.batch_size=4", "-o", "train.device=cpu"]


@pytest.fixture(scope="module")
def tiny_dense():
    """The arch registered for this module's tests, and taken out again after them."""
    register(SPEC)
    yield SPEC
    ARCHES.pop(NAME)


def test_its_settings_resolve_and_other_archs_settings_are_refused(tiny_dense):
    cfg = resolve_config("cpu", None, ["model.mlp_ratio=3"], NAME)  # the preset's common sections apply
    assert type(cfg.model) is TinyDenseConfig and cfg.model.mlp_ratio == 3 and cfg.model.block_size == 128
    with pytest.raises(UserError, match=r"model\.n_experts is a moe-arch setting \(the tinydense arch"):
        resolve_config(None, None, ["model.n_experts=4"], NAME)
    with pytest.raises(UserError, match=r"model\.mlp_ratio must be at least 1"):
        resolve_config(None, None, ["model.mlp_ratio=0"], NAME)
    with pytest.raises(UserError, match=r"model\.mlp_ratio is a tinydense-arch setting"):
        resolve_config(None, None, ["model.mlp_ratio=3"], "gpt2")


def test_train_eval_sample_export_and_bench_through_the_cli(tiny_dense, small_data, tmp_path):
    run = tmp_path / "run"
    r = invoke("train", "--preset", "cpu", "--arch", NAME, "--data", small_data, "--out", run, *TINY,
               "-o", "train.max_minutes=0", "-o", "train.max_steps=6", "-o", "train.eval_interval=3",
               "-o", "train.eval_iters=1", "-o", "train.sample_tokens=8")
    assert r.exit_code == 0, r.output
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["model"]["arch"] == NAME and ckpt["config"]["model"]["mlp_ratio"] == 2
    assert {k.split(".")[0] for k in ckpt["model"]} == {"wte", "wpe", "layers", "norm"}

    r = invoke("eval", run, "--json")
    assert r.exit_code == 0, r.output
    bpb = json.loads(r.stdout)["bpb"]
    assert 0 < bpb < math.log2(300)  # at least as good as uniform over the vocabulary (a token is >= 1 byte)

    cached = invoke("sample", run, "--prompt", "KING:", "--max-new-tokens", 12, "--temperature", 0)
    uncached = invoke("sample", run, "--prompt", "KING:", "--max-new-tokens", 12, "--temperature", 0, "--no-cache")
    assert cached.exit_code == 0 and uncached.exit_code == 0, cached.output + uncached.output
    assert cached.stdout == uncached.stdout and cached.stdout.startswith("KING:")  # its cache decodes as it trains

    r = invoke("export", run / "last.pt", tmp_path / "st", "--format", "safetensors")
    assert r.exit_code == 0, r.output
    r = invoke("eval", tmp_path / "st", "--json")  # the export loads back as the same model
    assert r.exit_code == 0 and json.loads(r.stdout)["bpb"] == bpb, r.output
    assert_clean_error(invoke("export", run / "last.pt", tmp_path / "hf"), "tinydense arch has no mapping")

    out = tmp_path / "bench.json"
    r = invoke("bench", "--preset", "cpu", "--arch", NAME, "--quick", *TINY, "-s", "train", "--json", out)
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["arch"] == NAME and result["attention"] == "mha" and result["train"]["step_ms"] > 0
