"""docs/design.md stays true: every file, module, class, function and setting it names in
backticks exists where it says. Names of other libraries (`torch.load`, `nn.ModuleList`) and
words in backticks that name no code (`pos`, `aux`) are left alone; what looks like minideep's
own is checked:

- a path (`models/fast.py`, `bench/`): a file or folder under minideep_cli/ or the repository
  (file names minideep writes, `train.bin`, `tb/`, are no code)
- a dotted name whose first part is one of minideep's modules (`models.build_model`,
  `data.shards._SplitStream`): importable, the rest an attribute chain; `model.KEY`,
  `train.KEY`, `data.KEY`, `sample.KEY` that name a setting: a setting of that section (of some
  arch, for model)
- a weight name (`transformer.h.N.attn.c_attn`): a prefix of a registered model's weight names
- a CamelCase name (`ShuffledWindows`, `MixtralForCausalLM`): a class, function or constant of
  minideep_cli, or a name minideep writes (a string in its code: the transformers classes)
- a call `name(...)`: a function or method of that name defined in minideep_cli
"""

import ast
import dataclasses
import functools
import importlib
import re
from pathlib import Path

import pytest

import minideep_cli
from minideep_cli.config import SECTIONS, Config
from minideep_cli.models import ARCHES

PACKAGE = Path(minideep_cli.__file__).parent
REPO = PACKAGE.parent
DESIGN = REPO / "docs" / "design.md"


def code_spans(text: str) -> list[str]:
    """Backticked spans outside fenced code blocks."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [s.strip() for s in re.findall(r"`([^`\n]+)`", text)]


def source_names() -> tuple[set[str], set[str]]:
    """Every name minideep_cli defines (classes, functions, methods, module-level assignments)
    and every string constant in its code."""
    defined, strings = set(), set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined.update(t.id for t in targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    return defined, strings


def modules() -> dict[str, str]:
    """minideep_cli's modules and packages by their names inside it ("cli", "models",
    "data.shards"), and by their last part where no other module has it ("fast" for models.fast)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names.add(".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts))
    names -= {""}
    last = [n.rpartition(".")[2] for n in names]
    short = {n.rpartition(".")[2]: n for n in names if last.count(n.rpartition(".")[2]) == 1}
    return {**short, **{n: n for n in names}}


@functools.cache
def weight_names() -> tuple[str, ...]:
    """The state-dict names of every registered arch's model at its default settings (meta device)."""
    import torch

    from minideep_cli.models import build_model, model_config

    with torch.device("meta"):
        return tuple(k for name in ARCHES for k in build_model(model_config(name)).state_dict())


def settings(section: str) -> set[str]:
    if section == "model":
        return {f.name for spec in ARCHES.values() for f in dataclasses.fields(spec.config)}
    return {f.name for f in dataclasses.fields(getattr(Config(), section))}


def problem(span: str, mods: dict[str, str], defined: set[str], strings: set[str]) -> str | None:
    """Why `span` names nothing minideep has, or None (also for spans that name no code)."""
    if re.fullmatch(r"[\w./-]+(\.py|/)", span):  # a path; a folder minideep writes (`tb/`) is no source
        found = (PACKAGE / span).exists() or (REPO / span).exists() or span.rstrip("/") in strings
        return None if found else "no such file"
    if re.fullmatch(r"[\w.-]+\.(bin|json|yaml|pt|txt|safetensors|gguf|md|lock)", span):
        return None  # a file minideep reads or writes: `train.bin`, `meta.json`
    call = re.fullmatch(r"([a-z_][\w.]*)\([\w\s,=.*'\"-]*\)(\s*->.*)?", span)  # Python, not math
    name = call.group(1) if call else span
    if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
        return None
    parts = name.split(".")
    if len(parts) > 1 and parts[0] in SECTIONS and parts[1] in settings(parts[0]):
        return None  # a setting
    if any(w.startswith(name.replace(".N.", ".0.")) for w in weight_names()):
        return None  # a weight's name: `transformer.h.N.attn.c_attn`
    if len(parts) > 1 and parts[0] in mods:
        return attribute_problem(parts, mods)
    if len(parts) > 1 and parts[0] in SECTIONS:
        return f"{parts[0]}.{parts[1]} is neither a setting nor an attribute of a minideep module"
    if call and parts[-1] not in defined:
        return f"no function {parts[-1]} in minideep_cli"
    if len(parts) == 1 and re.fullmatch(r"[A-Z]\w*[a-z]\w*", name) and name not in defined | strings:
        return f"no class, function or constant {name} in minideep_cli"
    return None


def attribute_problem(parts: list[str], mods: dict[str, str]) -> str | None:
    """The longest module prefix imports, and the rest is an attribute chain of it."""
    k = max(i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in mods)
    obj = importlib.import_module("minideep_cli." + mods[".".join(parts[:k])])
    for attr in parts[k:]:
        if not hasattr(obj, attr):
            return f"{obj.__name__} has no {attr}"
        obj = getattr(obj, attr)
    return None


def test_every_name_design_md_gives_exists_where_it_says():
    mods = modules()
    defined, strings = source_names()
    spans = code_spans(DESIGN.read_text(encoding="utf-8"))
    wrong = sorted({f"`{s}`: {why}" for s in spans if (why := problem(s, mods, defined, strings))})
    assert not wrong, "docs/design.md names what does not exist:\n" + "\n".join(wrong)
    assert len(spans) > 200  # the check reads the whole file


@pytest.mark.parametrize("span, why", [
    ("models/rules.py", "no such file"),
    ("models.registry.build_model", "no registry"),
    ("fast.masked_sdpa", "has no masked_sdpa"),
    ("data.NoSuchWindows", "no NoSuchWindows"),
    ("model.n_expert", "neither a setting"),
    ("train.no_such_thing", "has no no_such_thing"),
    ("NoSuchTransformer", "no class"),
    ("no_such_helper(x)", "no function"),
])
def test_the_check_catches_a_wrong_name(span, why):
    mods = modules()
    defined, strings = source_names()
    assert why in (problem(span, mods, defined, strings) or "")


@pytest.mark.parametrize("span", ["models/fast.py", "bench/", "models.build_model", "data.ShuffledWindows",
                                  "fast.attend", "shards._SplitStream",
                                  "model.kv_lora_rank", "train.max_steps", "MoETransformer", "MixtralForCausalLM",
                                  "torch.load", "nn.ModuleList", "pos", "num_params(active=False, embeddings=True)"])
def test_the_check_passes_a_right_name_and_leaves_others_alone(span):
    mods = modules()
    defined, strings = source_names()
    assert problem(span, mods, defined, strings) is None
