"""Configs saved before each arch had its own settings (minideep 0.1.0 up to issue 36): one flat
model section holding every arch's settings. They read into the arch's settings, and their
checkpoints evaluate, sample and resume as before (docs/design.md, Configuration)."""

import dataclasses
import json

import pytest
import yaml
from conftest import invoke

from minideep_cli.checkpoint import load_checkpoint, save_checkpoint
from minideep_cli.config import Config
from minideep_cli.errors import UserError
from minideep_cli.models import spec_for
from minideep_cli.models.gpt2_arch import GPT2Config
from minideep_cli.models.moe_arch import MoEConfig

# ModelConfig as minideep 0.1.0 saved it (dataclasses.asdict), at its defaults
FLAT_0_1_0 = {
    "arch": "moe", "vocab_size": 2048, "block_size": 256, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0,
    "attention_dropout": None, "bias": True, "n_kv_head": 0, "attention": "gqa", "rope_theta": 10000.0,
    "tie_embeddings": True, "ffn_hidden": 0, "q_lora_rank": 0, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16, "v_head_dim": 32, "n_latents": 16, "n_experts": 8, "top_k": 2, "expert_hidden": 0,
    "n_shared_experts": 0, "first_k_dense": 0, "moe_every": 1, "router": "softmax", "norm_topk": False,
    "router_noise": "none", "router_noise_std": 1.0, "capacity_factor": 1.25, "eval_capacity_factor": None,
    "drop_policy": "position", "aux_loss_coef": 0.01, "z_loss_coef": 0.001, "bias_update_rate": 0.0,
    "qk_norm": False, "activation": "swiglu", "logit_softcap": 0.0, "zero_init_out": False,
}

TINY = ["-o", "model.n_layer=1", "-o", "model.n_embd=32", "-o", "model.block_size=32", "-o", "train.batch_size=4",
        "-o", "train.max_minutes=0", "-o", "train.max_steps=6", "-o", "train.eval_interval=3",
        "-o", "train.eval_iters=1", "-o", "train.sample_tokens=0"]


def flat(model: dict) -> dict:
    """A model section as 0.1.0 saved it: every arch's settings, the arch's own as given."""
    return {**FLAT_0_1_0, **model}


def test_a_flat_model_section_reads_into_its_archs_settings():
    for arch, settings in (("gpt2", GPT2Config), ("moe", MoEConfig)):
        cfg = Config.from_dict({"model": flat({"arch": arch, "n_layer": 3})})
        assert type(cfg.model) is settings and cfg.model.n_layer == 3
        assert tuple(dataclasses.asdict(cfg.model)) == spec_for(arch).keys()
    cfg = Config.from_dict({"model": flat({"arch": "moe", "n_kv_head": 2, "bias": False})})
    assert cfg.model.n_kv_head == 2 and not hasattr(cfg.model, "bias")  # gpt2's setting, which moe never read
    with pytest.raises(UserError, match=r"unknown key 'model\.nope'"):  # a key no arch has is still refused
        Config.from_dict({"model": {"arch": "moe", "nope": 1}})
    with pytest.raises(UserError, match="unknown arch 'rnn'"):
        Config.from_dict({"model": {"arch": "rnn"}})
    with pytest.raises(UserError, match="section 'model' in saved config must be a mapping"):
        Config.from_dict({"model": [1, 2]})


def rewrite_as_0_1_0(run) -> None:
    """The run's checkpoints and config.yaml with the model section as 0.1.0 wrote it."""
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run / name)
        state["config"]["model"] = flat(state["config"]["model"])
        save_checkpoint({k: v for k, v in state.items() if k not in ("kind", "format")}, run / name)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"] = flat(saved["model"])
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))


@pytest.mark.parametrize("arch", ["gpt2", "moe"])
def test_a_0_1_0_checkpoint_evaluates_samples_and_resumes(arch, small_data, tmp_path):
    run = tmp_path / "run"
    extra = ["-o", "model.n_experts=4"] if arch == "moe" else []
    r = invoke("train", "--arch", arch, "--data", small_data, "--out", run, *TINY, *extra)
    assert r.exit_code == 0, r.output
    before_eval = json.loads(invoke("eval", run, "--json").stdout)
    before_sample = invoke("sample", run, "--max-new-tokens", 16, "--temperature", 0).stdout

    rewrite_as_0_1_0(run)
    assert len(load_checkpoint(run / "last.pt")["config"]["model"]) == len(FLAT_0_1_0)
    r = invoke("eval", run, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == before_eval, r.output  # the same model, the same numbers
    r = invoke("sample", run, "--max-new-tokens", 16, "--temperature", 0)
    assert r.exit_code == 0 and r.stdout == before_sample, r.output
    r = invoke("train", "--resume", "--out", run, "-o", "train.max_steps=8")
    assert r.exit_code == 0, r.output
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["loop"]["step"] == 8
    assert tuple(resumed["config"]["model"]) == spec_for(arch).keys()  # saved again in its arch's settings
