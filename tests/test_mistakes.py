"""Issue 16: every user mistake is one line naming the file or setting, and nothing on disk is lost."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minideep_cli.config import resolve_config
from minideep_cli.errors import UserError

from test_cli import TINY, assert_clean_error, digest, invoke


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("override, name", [
    ("train.max_minutes=nan", "train.max_minutes"),
    ("model.capacity_factor=nan", "model.capacity_factor"),
    ("train.lr=1e300", "train.lr"),
    ("train.lr=inf", "train.lr"),
    ("model.router_noise_std=-inf", "model.router_noise_std"),
    ("train.seed=1180591620717411303424", "train.seed"),  # 2**70
])
def test_non_finite_or_huge_numbers_are_refused_by_name(override, name):
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        resolve_config(None, None, [override, "train.max_steps=0", "train.max_minutes=1"][::-1])


def test_negative_max_steps_is_called_negative():
    with pytest.raises(UserError, match=r"train\.max_steps cannot be negative"):
        resolve_config(None, None, ["train.max_steps=-5"])


def test_every_moe_only_key_is_refused_under_gpt2_but_presets_keep_working():
    for override in ("model.n_kv_head=2", "model.n_experts=4", "model.attention=mla", "model.rope_theta=500"):
        with pytest.raises(UserError, match=r"moe-arch setting"):
            resolve_config(None, None, [override], arch="gpt2")
    for preset in ("cpu", "rtx3060", "a100", "seed"):  # their moe: sections do not apply to gpt2
        assert resolve_config(preset, None, [], arch="gpt2").model.arch == "gpt2"
    assert resolve_config(None, None, ["model.n_kv_head=2"], arch="moe").model.n_kv_head == 2


def test_invalid_utf8_prompt_is_refused_before_training(small_data, tmp_path):
    with pytest.raises(UserError, match=r"sample\.prompt is not valid UTF-8"):
        resolve_config(None, None, ["sample.prompt=\udcffabc"])
    r = invoke("train", "--preset", "cpu", "--data", small_data, "--out", tmp_path / "run", *TINY,
               "-o", "sample.prompt=\udcffabc")
    assert_clean_error(r, "sample.prompt")
    assert not (tmp_path / "run").exists()


def test_sample_refuses_invalid_utf8_prompt_and_huge_seed(tmp_path):
    assert_clean_error(invoke("sample", tmp_path, "--prompt", "\udcffabc"), "--prompt")
    assert_clean_error(invoke("sample", tmp_path, "--seed", 2**70), "--seed")
