import pytest
import yaml

from minideep_cli.config import list_presets, resolve_config
from minideep_cli.errors import UserError


def test_precedence_defaults_preset_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"train": {"lr": "5e-4", "batch_size": 7}, "gpt2": {"model": {"n_layer": 3}}}))
    cfg = resolve_config("cpu", str(f), ["train.batch_size=9"], arch="gpt2")
    assert cfg.train.lr == 5e-4  # config file beats preset; "5e-4" string coerced to float
    assert cfg.train.batch_size == 9  # override beats config file
    assert cfg.model.n_layer == 3  # the gpt2: section applies for gpt2
    assert cfg.model.block_size == 128  # from the preset
    assert cfg.train.beta1 == 0.9  # default
    moe = resolve_config("cpu", str(f), [], arch="moe")
    assert moe.model.n_layer != 3 and moe.model.arch == "moe"


def test_type_coercion():
    cfg = resolve_config(None, None, ["train.lr=3e-4", "train.max_steps=1e3", "train.compile=yes",
                                      "model.capacity_factor=null", "model.eval_capacity_factor=2"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.compile is True
    assert cfg.model.capacity_factor is None and cfg.model.eval_capacity_factor == 2.0
    with pytest.raises(UserError, match="must be an integer"):
        resolve_config(None, None, ["train.batch_size=2.5"])
    with pytest.raises(UserError, match="must be true or false"):
        resolve_config(None, None, ["train.compile=maybe"])


def test_unknown_keys_suggest_nearest(tmp_path):
    with pytest.raises(UserError, match="did you mean 'train.lr'"):
        resolve_config(None, None, ["train.lrr=1"])
    with pytest.raises(UserError, match="did you mean 'model.n_embd'"):
        resolve_config(None, None, ["model.n_emb=64"])
    f = tmp_path / "c.yaml"
    f.write_text("trian:\n  lr: 1\n")
    with pytest.raises(UserError, match="did you mean 'train'"):
        resolve_config(None, str(f), [])
    with pytest.raises(UserError, match="did you mean 'cpu'"):
        resolve_config("cpuu", None, [])
    with pytest.raises(UserError, match="section.key=value"):
        resolve_config(None, None, ["train.lr"])


@pytest.mark.parametrize("arch", ["gpt2", "moe"])
@pytest.mark.parametrize("preset", ["cpu", "rtx3060", "a100", "seed"])
def test_every_preset_loads_and_builds(preset, arch):
    import torch

    from minideep_cli.models import build_model

    assert preset in list_presets()
    cfg = resolve_config(preset, None, [], arch=arch)
    assert cfg.model.arch == arch
    with torch.device("meta"):  # sizes checked without allocating
        model = build_model(cfg.model)
    assert model.num_params() > 0


def test_presets_ship_in_the_wheel(tmp_path):
    """A non-editable install must find presets and the bundled corpus."""
    import os
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(root)], check=True, cwd=tmp_path)
    wheel = zipfile.ZipFile(next(tmp_path.glob("*.whl")))
    names = wheel.namelist()
    for p in list_presets():
        assert f"minideep_cli/presets/{p}.yaml" in names
    assert "minideep_cli/assets/tinyshakespeare.txt" in names
    # installed as pip lays a wheel out (no source tree next to it), the code finds both
    site = tmp_path / "site"
    wheel.extractall(site)
    probe = ("import minideep_cli, minideep_cli.config as c, minideep_cli.data as d; "
             "print(minideep_cli.__file__); print(c.list_presets()); print(d.bundled_corpus().is_file())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(site)}).stdout.splitlines()
    assert out[0].startswith(str(site))  # the installed copy, not this checkout
    assert out[1] == str(list_presets()) and out[2] == "True"


def test_dropout_rates_are_checked():
    assert resolve_config(None, None, ["model.attention_dropout=0"]).model.attention_dropout == 0.0
    for bad in ["model.dropout=1", "model.attention_dropout=-0.1"]:
        with pytest.raises(UserError, match="at least 0 and below 1"):
            resolve_config(None, None, [bad])
