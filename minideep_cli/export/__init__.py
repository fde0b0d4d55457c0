"""Export a checkpoint so it lives outside minideep: a Hugging Face folder, plain safetensors, or
one GGUF file for llama.cpp, Ollama and LM Studio (`--format gguf`: export/gguf.py).

`--format hf` writes a folder that `transformers` loads with AutoModelForCausalLM and
AutoTokenizer (config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json, special_tokens_map.json). A configuration is mapped to a standard class only
where that class computes exactly our function at inference; anything else is refused with the
reason, never approximated:

  gpt2                                         -> GPT2LMHeadModel (Linear -> Conv1D: transposed)
  moe (softmax router, no selection bias, no capacity dropping in eval) with gqa attention:
    every block sparse, no shared experts, k >= 2 with norm_topk
                                               -> MixtralForCausalLM
    otherwise (k = 1 or raw gates, shared experts, dense blocks anywhere)
                                               -> Qwen2MoeForCausalLM
  moe with mla attention, dense blocks only first (first_k_dense; moe_every 1), no eval dropping:
    softmax router, raw gates (no norm_topk, or k = 1), no selection bias
                                               -> DeepseekV2ForCausalLM
    sigmoid router + selection bias (norm_topk or not)
                                               -> DeepseekV3ForCausalLM
  refused (one line naming each): latent attention; a sigmoid router or a nonzero selection bias
    with gqa; renormalised softmax gates or a selection bias with mla; mla with dense blocks
    between sparse ones; capacity dropping at inference (model.eval_capacity_factor)

Qwen2-MoE details that keep it exact: dense blocks are `mlp_only_layers`; norm_topk_prob is set
only for k >= 2 (ours never renormalises a single gate); its q/k/v projections carry biases, written
as zeros; its shared expert is scaled by sigmoid(shared_expert_gate(x)), so the gate is written
as zeros (sigmoid(0) = 0.5 exactly) and the shared down projection doubled (exact in floating
point); without shared experts the shared expert has width 0 and adds exactly 0.
DeepSeek details: the rows that produce the RoPE parts of q and of the shared key are reordered
from our rotate-half pairs to DeepSeek's interleaved pairs (rope_interleave, as their checkpoints);
the shared experts are ungated as ours (width 0 when there are none); routed_scaling_factor 1,
one expert group. Training-only settings (router noise, the training capacity factor and drop
policy, balancing losses, dropout) do not change the exported function and are not written.

Experts are written per expert under the names the hub checkpoints use (Mixtral
`block_sparse_moe.experts.E.w1/w2/w3`, Qwen2-MoE and DeepSeek `mlp.experts.E.gate_proj/...`);
transformers 5 fuses them on load, and tools built around the hub checkpoints expect this layout.

`--format safetensors` writes model.safetensors (every weight, tied ones once), minideep_config.json
(the resolved minideep config, the weight aliases, step and data meta) and tokenizer.json. It loads
back into minideep (eval, sample, inspect-routing accept the folder) and involves no pickle at all.

Both folder formats are written into a temporary folder next to OUT_DIR and renamed into place, so
an OUT_DIR is never half-written; a non-empty OUT_DIR is replaced only with force. A GGUF file is
written the same way: a temporary file beside it, renamed into place; an existing one is replaced
only with force.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..checkpoint import (EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_KIND, TOKENIZER, WEIGHTS, load_checkpoint,
                          model_from_checkpoint, plain_weights, safetensors_module)
from ..errors import UserError, first_line
from ..files import stale_temp, temp_dir
from ..models import spec_of
from ..tokenizer import EOT, load_tokenizer
from .gguf import DTYPES, check_out_file, export_gguf, gguf_module
from .hf import generation_config, hf_tokenizer_files, hf_weights, json_text

FORMATS = ("hf", "safetensors", "gguf")


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    target: str  # the transformers class, the llama.cpp architecture (gguf), or "minideep" (safetensors)
    files: list[str] = field(default_factory=list)
    params: int = 0


# ---------------------------------------------------------------- entry point


def export_checkpoint(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "hf",
                      force: bool = False, dtype: Optional[str] = None) -> ExportResult:
    """Read a checkpoint (weights_only) or a safetensors export folder and write OUT_DIR (for gguf,
    one file) atomically."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if dtype is not None and fmt != "gguf":
        raise UserError(f"--dtype is for --format gguf (--format {fmt} keeps the checkpoint's weights as they are)")
    if fmt == "gguf":
        return _export_gguf(ckpt_path, Path(out_dir), force, dtype or "f32")
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # a link to a folder: the folder it points to is written, the link kept
        out_dir = out_dir.resolve()
    src = Path(ckpt_path).resolve()
    if src == out_dir.resolve() or out_dir.resolve() in src.parents:
        raise UserError(f"{out_dir} holds the checkpoint being exported ({ckpt_path}); choose another folder")
    clean_leftovers(out_dir.absolute())
    check_out_dir(out_dir, force)
    safetensors_torch = safetensors_module("minideep export")
    ckpt = load_checkpoint(ckpt_path)
    model, cfg = model_from_checkpoint(ckpt, "cpu", ckpt_path)
    check_arch_exports(cfg, fmt)
    if fmt == "hf":
        target, hf_config, tensors = hf_weights(model, load_tokenizer(ckpt["tokenizer"]).token_to_id(EOT))
        files = {"config.json": json_text(hf_config), WEIGHTS: tensors, **hf_tokenizer_files(ckpt["tokenizer"], cfg)}
        files["generation_config.json"] = json_text(generation_config(hf_config))
    else:
        target = "minideep"
        tensors, aliases = plain_weights(model.state_dict())
        weights = safetensors_torch.save(tensors, metadata={"format": "pt"})  # bytes, hashed before writing
        meta = {
            "kind": EXPORT_KIND,
            "format": EXPORT_FORMAT,
            "config": cfg.to_dict(),
            "aliases": aliases,
            "loop": {k: v for k, v in (ckpt.get("loop") or {}).items() if k in ("step", "tokens")},
            "data": ckpt.get("data") or {},
            "weights_sha256": hashlib.sha256(weights).hexdigest(),  # checked when the folder is read back
        }
        files = {EXPORT_CONFIG: json_text(meta), WEIGHTS: weights, TOKENIZER: ckpt["tokenizer"]}
    write_folder(out_dir, files, force, safetensors_torch.save_file)
    return ExportResult(out_dir, fmt, target, sorted(files), sum(p.numel() for p in model.parameters()))


def _export_gguf(ckpt_path, out: Path, force: bool, dtype: str) -> ExportResult:
    """--format gguf (export/gguf.py): checks, then the mapping (or its refusal), then the file."""
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype '{dtype}' for --format gguf; choose one of: {', '.join(DTYPES)}")
    gguf_module()
    check_out_file(out, force, Path(ckpt_path))
    ckpt = load_checkpoint(ckpt_path)
    model, cfg = model_from_checkpoint(ckpt, "cpu", ckpt_path)
    check_arch_exports(cfg, "gguf")
    plan = export_gguf(ckpt, model, cfg, out, dtype, name=out.stem)
    return ExportResult(out, "gguf", plan.arch, [out.name], sum(p.numel() for p in model.parameters()))


def check_arch_exports(cfg, fmt: str) -> None:
    """--format safetensors takes every arch; hf and gguf only those whose spec lists a mapping."""
    spec = spec_of(cfg.model)
    if fmt != "safetensors" and fmt not in spec.exports:
        raise UserError(f"cannot export to --format {fmt}: the {spec.name} arch has no mapping to it "
                        "(--format safetensors exports every arch)")


# ---------------------------------------------------------------- atomic folder writing


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder")
    if force and out_dir.is_dir() and out_dir.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise UserError(f"{out_dir} is the current folder or holds it: --force would replace everything in it; "
                        "choose a new folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} is not empty; choose another folder or pass --force to replace it")


def clean_leftovers(out_dir: Path) -> None:
    """What an export of out_dir killed mid-write (kill -9) left beside it, named by files.temp_name
    with the PID of a process now gone: its temporary folder, removed; the previous out_dir it
    was replacing, put back if out_dir is missing (else removed: the new one was in place)."""
    if not out_dir.parent.is_dir():
        return
    for p in out_dir.parent.iterdir():
        if not stale_temp(p.name, lambda name: name == out_dir.name) or not p.is_dir() or p.is_symlink():
            continue
        if p.name.endswith(".old") and (p / "replaced").is_dir() and not out_dir.exists():
            os.replace(p / "replaced", out_dir)
        shutil.rmtree(p, ignore_errors=True)


def write_folder(out_dir: Path, files: dict, force: bool, save_tensors: Callable) -> None:
    """files: name -> str (text), bytes, or dict of tensors (safetensors). Written into a temporary folder
    next to out_dir, fsynced, then renamed into place; on any failure nothing is left behind."""
    parent = out_dir.absolute().parent
    clean_leftovers(parent / out_dir.name)
    check_out_dir(out_dir, force)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(parent / out_dir.name)
    old = None
    try:
        for name, content in files.items():
            path = tmp / name
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            elif isinstance(content, bytes):
                path.write_bytes(content)
            else:
                save_tensors(content, str(path), metadata={"format": "pt"})
                # safetensors writes owner-only: give it a new file's mode (the folder's, less execute)
                os.chmod(path, tmp.stat().st_mode & 0o666)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if out_dir.is_dir():
            if any(out_dir.iterdir()):  # force: keep the old folder until the new one is in place
                old = temp_dir(parent / out_dir.name, ".old")
                os.replace(out_dir, old / "replaced")
            else:
                out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if not out_dir.exists():
                os.replace(old / "replaced", out_dir)
            if not (old / "replaced").exists():
                old.rmdir()
        if isinstance(e, Exception) and not isinstance(e, UserError):  # e.g. SafetensorError on a full disk
            reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
            raise UserError(f"cannot write {out_dir}: {reason}; it was left as it was")
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
