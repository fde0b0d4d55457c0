"""Export a checkpoint so it lives outside minideep: a Hugging Face folder or plain safetensors.

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

Both formats are written into a temporary folder next to OUT_DIR and renamed into place, so an
OUT_DIR is never half-written; a non-empty OUT_DIR is replaced only with force.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError
from .files import temp_dir

FORMATS = ("hf", "safetensors")
EXPORT_KIND = "minideep-export"
EXPORT_FORMAT = 1
EXPORT_CONFIG = "minideep_config.json"  # marks a safetensors export folder
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
INSTALL_HINT = "pip install safetensors (the export extra: pip install 'minideep[export]')"


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    target: str  # the transformers class, or "minideep" for the safetensors format
    files: list[str] = field(default_factory=list)
    params: int = 0


# ---------------------------------------------------------------- entry point


def export_checkpoint(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "hf",
                      force: bool = False) -> ExportResult:
    """Read a checkpoint (weights_only) or a safetensors export folder and write OUT_DIR atomically."""
    from .checkpoint import load_checkpoint, model_from_checkpoint

    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    src = Path(ckpt_path).resolve()
    if src == out_dir.resolve() or out_dir.resolve() in src.parents:
        raise UserError(f"{out_dir} holds the checkpoint being exported ({ckpt_path}); choose another folder")
    check_out_dir(out_dir, force)
    safetensors_torch = _safetensors("minideep export")
    ckpt = load_checkpoint(ckpt_path)
    model, cfg = model_from_checkpoint(ckpt, "cpu", ckpt_path)
    if fmt == "hf":
        from .tokenizer import EOT, load_tokenizer

        target, hf_config, tensors = hf_weights(model, load_tokenizer(ckpt["tokenizer"]).token_to_id(EOT))
        files = {"config.json": _json(hf_config), WEIGHTS: tensors, **hf_tokenizer_files(ckpt["tokenizer"], cfg)}
        files["generation_config.json"] = _json(_generation_config(hf_config))
    else:
        target = "minideep"
        tensors, aliases = plain_weights(model.state_dict())
        meta = {
            "kind": EXPORT_KIND,
            "format": EXPORT_FORMAT,
            "config": cfg.to_dict(),
            "aliases": aliases,
            "loop": {k: v for k, v in (ckpt.get("loop") or {}).items() if k in ("step", "tokens")},
            "data": ckpt.get("data") or {},
        }
        files = {EXPORT_CONFIG: _json(meta), WEIGHTS: tensors, TOKENIZER: ckpt["tokenizer"]}
    write_folder(out_dir, files, force, safetensors_torch.save_file)
    return ExportResult(out_dir, fmt, target, sorted(files), sum(p.numel() for p in model.parameters()))


def _safetensors(what: str):
    try:
        import safetensors.torch
    except ImportError:
        raise UserError(f"{what} needs the safetensors package: {INSTALL_HINT}")
    return safetensors.torch


def _json(d: dict) -> str:
    return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- atomic folder writing


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder")
    if force and out_dir.is_dir() and out_dir.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise UserError(f"{out_dir} is the current folder or holds it: --force would replace everything in it; "
                        "choose a new folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} is not empty; choose another folder or pass --force to replace it")


def write_folder(out_dir: Path, files: dict, force: bool, save_tensors: Callable) -> None:
    """files: name -> str (text) or dict of tensors (safetensors). Written into a temporary folder
    next to out_dir, fsynced, then renamed into place; on any failure nothing is left behind."""
    check_out_dir(out_dir, force)
    parent = out_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(parent / out_dir.name)
    old = None
    try:
        for name, content in files.items():
            path = tmp / name
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8")
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
            reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[0]
            raise UserError(f"cannot write {out_dir}: {reason[:200]}; it was left as it was")
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- safetensors format (minideep)


def plain_weights(state: dict) -> tuple[dict, dict]:
    """A state dict as separate contiguous tensors, each storage once: a tensor that is the same
    as an earlier one (tied embeddings) becomes an alias {name: name it equals}."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().clone()
    return tensors, aliases


def is_export_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / EXPORT_CONFIG).is_file()


def load_export(folder: str | os.PathLike) -> dict:
    """A safetensors export folder as a checkpoint dict (model, config, tokenizer, loop, data;
    no optimizer). JSON and safetensors only: nothing here can run code."""
    from .checkpoint import FORMAT, KIND

    folder = Path(folder)
    try:
        meta = json.loads((folder / EXPORT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{folder / EXPORT_CONFIG} is not readable: {e}")
    if not isinstance(meta, dict) or meta.get("kind") != EXPORT_KIND or not isinstance(meta.get("config"), dict):
        raise UserError(f"{folder} is not a minideep safetensors export")
    if meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{folder} has export format {meta.get('format')}; this minideep reads {EXPORT_FORMAT}")
    for name in (WEIGHTS, TOKENIZER):
        if not (folder / name).is_file():
            raise UserError(f"{folder} is an incomplete export: {name} is missing")
    safetensors_torch = _safetensors("reading a safetensors export")
    try:
        state = safetensors_torch.load_file(str(folder / WEIGHTS), device="cpu")
    except Exception as e:  # safetensors raises its own error types for damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{folder / WEIGHTS} is not a readable safetensors file: {first}")
    for name, target in (meta.get("aliases") or {}).items():
        if target not in state:
            raise UserError(f"{folder / EXPORT_CONFIG}: alias {name} points to missing weight {target}")
        state[name] = state[target]
    try:
        tokenizer = (folder / TOKENIZER).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / TOKENIZER} is not readable: {e}")
    loop = {"step": 0, "tokens": 0, **(meta.get("loop") or {})}
    return {"kind": KIND, "format": FORMAT, "model": state, "optimizer": None, "config": meta["config"],
            "tokenizer": tokenizer, "data": meta.get("data") or {}, "loop": loop}


# ---------------------------------------------------------------- hf format: which class


def hf_target(model) -> str:
    """The transformers class that computes exactly this model's function, or a UserError that
    names every setting without a standard equivalent."""
    cfg = model.cfg
    if cfg.arch == "gpt2":
        return "GPT2LMHeadModel"
    problems, target = [], None
    biased = any(b.ffn.router.bias.abs().sum().item() != 0 for b in model.blocks if b.is_moe)
    renormalised = cfg.norm_topk and cfg.top_k >= 2
    if cfg.attention == "gqa":
        if cfg.router != "softmax":
            problems.append(f"the {cfg.router} router with gqa attention (DeepSeek-V3's sigmoid routing exists "
                            "only with mla attention)")
        elif biased:
            problems.append("a nonzero router selection bias (bias_update_rate) with a softmax router")
        everywhere = all(b.is_moe for b in model.blocks)
        if cfg.qk_norm:  # Qwen3-MoE normalises each head's queries and keys, as model.qk_norm does
            target = "Qwen3MoeForCausalLM"
            if cfg.n_shared_experts:
                problems.append("shared experts with model.qk_norm (Qwen3-MoE has none)")
        else:
            target = ("MixtralForCausalLM" if everywhere and cfg.n_shared_experts == 0 and renormalised
                      else "Qwen2MoeForCausalLM")
    elif cfg.attention == "mla":
        if [b.is_moe for b in model.blocks] != [i >= cfg.first_k_dense for i in range(cfg.n_layer)]:
            problems.append(f"dense blocks between sparse ones (model.moe_every={cfg.moe_every}) with mla attention "
                            "(DeepSeek classes have first_k_dense_replace only)")
        if cfg.router == "sigmoid":
            target = "DeepseekV3ForCausalLM"
            if cfg.n_experts < 2:
                problems.append("DeepSeek-V3 routing needs at least 2 experts")
        else:
            target = "DeepseekV2ForCausalLM"
            if biased:
                problems.append("a nonzero router selection bias (bias_update_rate) with a softmax router")
            if renormalised:
                problems.append("renormalised softmax gates (model.norm_topk with top_k >= 2) with mla attention "
                                "(DeepSeek-V2 never renormalises; DeepSeek-V3 routes with a sigmoid)")
    else:
        problems.append(f"{cfg.attention} attention")
    if cfg.activation != "swiglu":
        problems.append(f"the {cfg.activation} activation (model.activation)")
    if cfg.logit_softcap:
        problems.append(f"soft-capped logits (model.logit_softcap={cfg.logit_softcap:g})")
    if cfg.eval_capacity_factor is not None:
        problems.append(f"capacity dropping at inference (model.eval_capacity_factor={cfg.eval_capacity_factor:g}, "
                        f"drop_policy {cfg.drop_policy})")
    if problems:
        raise UserError("cannot export to --format hf, no transformers class computes the same function: "
                        + "; ".join(problems) + " (use --format safetensors for a minideep-only export)")
    return target


def hf_weights(model, eot_id: Optional[int] = None) -> tuple[str, dict, dict]:
    """(class name, config.json dict, tensors with HF names). Every minideep weight must be used."""
    target = hf_target(model)
    state = model.state_dict()
    conv = {"GPT2LMHeadModel": _gpt2, "MixtralForCausalLM": _mixtral, "Qwen2MoeForCausalLM": _qwen2_moe,
            "Qwen3MoeForCausalLM": _qwen3_moe,
            "DeepseekV2ForCausalLM": _deepseek, "DeepseekV3ForCausalLM": _deepseek}[target]
    used: set[str] = set()

    def take(name: str):
        used.add(name)
        return state[name].detach()

    config, tensors = conv(model, take)
    # Weights the exported function does not read: the learned-noise scale (training only), the
    # router's selection bias (checked to be zero above), a tied output head (written once).
    unused = {n for n in state if n not in used and not n.endswith(("router.noise_weight", "router.bias"))}
    if _tied(model):
        unused.discard("lm_head.weight")
    if unused:
        raise UserError(f"cannot export to --format hf: weights with no place in {target}: {', '.join(sorted(unused))}")
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    config.update(architectures=[target], dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."))
    config.update(bos_token_id=eot_id, eos_token_id=eot_id)
    return target, config, tensors


def _gpt2(model, take) -> tuple[dict, dict]:
    import torch

    cfg = model.cfg
    t = {
        "transformer.wte.weight": take("transformer.wte.weight"),
        "transformer.wpe.weight": take("transformer.wpe.weight"),
    }

    def ln(src: str, dst: str):
        mod = model.get_submodule(src)
        t[f"{dst}.weight"] = take(f"{src}.weight")
        # LayerNorm without bias (model.bias false) equals one with a zero bias
        t[f"{dst}.bias"] = take(f"{src}.bias") if mod.bias is not None else torch.zeros_like(mod.weight).detach()

    def conv1d(src: str, dst: str):  # HF Conv1D: y = x @ W + b with W (in, out): our Linear transposed
        mod = model.get_submodule(src)
        t[f"{dst}.weight"] = take(f"{src}.weight").t()
        t[f"{dst}.bias"] = take(f"{src}.bias") if mod.bias is not None else torch.zeros(mod.out_features)

    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        ln(f"{p}.ln_1", f"{p}.ln_1")
        conv1d(f"{p}.attn.c_attn", f"{p}.attn.c_attn")
        conv1d(f"{p}.attn.c_proj", f"{p}.attn.c_proj")
        ln(f"{p}.ln_2", f"{p}.ln_2")
        conv1d(f"{p}.mlp.c_fc", f"{p}.mlp.c_fc")
        conv1d(f"{p}.mlp.c_proj", f"{p}.mlp.c_proj")
    ln("transformer.ln_f", "transformer.ln_f")
    eps = model.transformer.ln_f.eps
    config = {
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # the tanh approximation, as ours
        "layer_norm_epsilon": eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
    }
    return config, t


def _attention_and_norms(model, take, t: dict, p: str, i: int) -> None:
    """gqa block i: wq -> q_proj; wkv ([k heads; v heads] along the output) -> k_proj, v_proj."""
    b = model.blocks[i]
    kv = b.attn.n_kv_head * b.attn.head_dim
    wkv = take(f"blocks.{i}.attn.wkv.weight")
    t[f"{p}.input_layernorm.weight"] = take(f"blocks.{i}.attn_norm.weight")
    t[f"{p}.self_attn.q_proj.weight"] = take(f"blocks.{i}.attn.wq.weight")
    t[f"{p}.self_attn.k_proj.weight"] = wkv[:kv]
    t[f"{p}.self_attn.v_proj.weight"] = wkv[kv:]
    t[f"{p}.self_attn.o_proj.weight"] = take(f"blocks.{i}.attn.wo.weight")
    t[f"{p}.post_attention_layernorm.weight"] = take(f"blocks.{i}.ffn_norm.weight")


def _swiglu(take, src: str, dst: str, t: dict, names=("gate_proj", "up_proj", "down_proj"), scale_down: float = 1.0):
    """Our SwiGLU (Linear w1, w3, w2) -> gate, up, down projections (same layout: no transpose)."""
    t[f"{dst}.{names[0]}.weight"] = take(f"{src}.w1.weight")
    t[f"{dst}.{names[1]}.weight"] = take(f"{src}.w3.weight")
    down = take(f"{src}.w2.weight")
    t[f"{dst}.{names[2]}.weight"] = down * scale_down if scale_down != 1.0 else down


def _empty_swiglu(dst: str, t: dict, dim: int, dtype) -> None:
    """A gate/up/down MLP of width 0: its output is exactly 0 (for classes that always build one)."""
    import torch

    t[f"{dst}.gate_proj.weight"] = torch.zeros(0, dim, dtype=dtype)
    t[f"{dst}.up_proj.weight"] = torch.zeros(0, dim, dtype=dtype)
    t[f"{dst}.down_proj.weight"] = torch.zeros(dim, 0, dtype=dtype)


def _experts(take, src: str, dst: str, t: dict, names: tuple[str, str, str]) -> None:
    """Stacked w1, w3 (E, d, h) and w2 (E, h, d), used as x @ w[e] -> per-expert Linear weights."""
    w1, w3, w2 = take(f"{src}.w1"), take(f"{src}.w3"), take(f"{src}.w2")
    for e in range(w1.shape[0]):
        t[f"{dst}.{e}.{names[0]}.weight"] = w1[e].t()  # (h, d)
        t[f"{dst}.{e}.{names[1]}.weight"] = w3[e].t()  # (h, d)
        t[f"{dst}.{e}.{names[2]}.weight"] = w2[e].t()  # (d, h)


def _llama_like_config(model) -> dict:
    cfg = model.cfg
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": model.norm.eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": _tied(model),
        "use_cache": True,
        "output_router_logits": False,
        "router_aux_loss_coef": cfg.aux_loss_coef,
    }


def _tied(model) -> bool:
    emb = model.transformer.wte if model.cfg.arch == "gpt2" else model.tok_emb
    return model.lm_head.weight is emb.weight


def _embeddings(model, take, t: dict) -> None:
    t["model.embed_tokens.weight"] = take("tok_emb.weight")
    t["model.norm.weight"] = take("norm.weight")
    if not _tied(model):
        t["lm_head.weight"] = take("lm_head.weight")


def _expert_hidden(model) -> int:
    from .models.transformer import expert_hidden

    return next((b.ffn.experts.w1.shape[2] for b in model.blocks if b.is_moe), expert_hidden(model.cfg))


def _dense_hidden(model) -> int:
    from .models.transformer import dense_hidden

    return next((b.ffn.w1.out_features for b in model.blocks if not b.is_moe), dense_hidden(model.cfg))


def _mixtral(model, take) -> tuple[dict, dict]:
    cfg, t = model.cfg, {}
    _embeddings(model, take, t)
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}"
        _attention_and_norms(model, take, t, p, i)
        t[f"{p}.block_sparse_moe.gate.weight"] = take(f"blocks.{i}.ffn.router.weight")
        _experts(take, f"blocks.{i}.ffn.experts", f"{p}.block_sparse_moe.experts", t, ("w1", "w3", "w2"))
    config = {
        "model_type": "mixtral",
        **_llama_like_config(model),
        "intermediate_size": _expert_hidden(model),
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,  # Mixtral always renormalises the k gates (our norm_topk)
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }
    return config, t


def _qwen_moe_blocks(model, take, t: dict, attention_extra, moe_extra) -> list[int]:
    """The blocks as Qwen2-MoE and Qwen3-MoE lay them out (dense blocks as an `mlp`, sparse ones as
    `mlp.gate` and `mlp.experts`), each class adding its own attention or MoE tensors through the
    two callbacks, (prefix, i) and (prefix, i, block). Returns the dense blocks' indices."""
    dense_layers = []
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}"
        _attention_and_norms(model, take, t, p, i)
        attention_extra(p, i)
        if not b.is_moe:
            dense_layers.append(i)
            _swiglu(take, f"blocks.{i}.ffn", f"{p}.mlp", t)
            continue
        t[f"{p}.mlp.gate.weight"] = take(f"blocks.{i}.ffn.router.weight")
        _experts(take, f"blocks.{i}.ffn.experts", f"{p}.mlp.experts", t, ("gate_proj", "up_proj", "down_proj"))
        moe_extra(p, i, b)
    return dense_layers


def _qwen_moe_config(model, model_type: str, dense_layers: list[int]) -> dict:
    cfg = model.cfg
    return {
        "model_type": model_type,
        **_llama_like_config(model),
        "intermediate_size": _dense_hidden(model),  # width of the dense blocks (mlp_only_layers)
        "moe_intermediate_size": _expert_hidden(model),
        "num_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": bool(cfg.norm_topk and cfg.top_k >= 2),  # ours keeps a single gate raw
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense_layers,
        "use_sliding_window": False,
        "sliding_window": None,
    }


def _qwen2_moe(model, take) -> tuple[dict, dict]:
    import torch

    cfg, t = model.cfg, {}
    _embeddings(model, take, t)

    def zero_qkv_biases(p: str, i: int) -> None:  # Qwen2-MoE has q/k/v biases: zero, as ours have none
        for proj in ("q_proj", "k_proj", "v_proj"):
            w = t[f"{p}.self_attn.{proj}.weight"]
            t[f"{p}.self_attn.{proj}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)

    def shared_expert(p: str, i: int, b) -> None:
        # shared expert: output * sigmoid(gate x); gate 0 gives exactly 0.5, so the down projection
        # is doubled (both exact in floating point). Without shared experts: width 0, adds exactly 0.
        t[f"{p}.mlp.shared_expert_gate.weight"] = torch.zeros(1, cfg.n_embd, dtype=t[f"{p}.mlp.gate.weight"].dtype)
        if b.ffn.shared is not None:
            _swiglu(take, f"blocks.{i}.ffn.shared", f"{p}.mlp.shared_expert", t, scale_down=2.0)
        else:
            _empty_swiglu(f"{p}.mlp.shared_expert", t, cfg.n_embd, t[f"{p}.mlp.gate.weight"].dtype)

    dense_layers = _qwen_moe_blocks(model, take, t, zero_qkv_biases, shared_expert)
    config = {
        **_qwen_moe_config(model, "qwen2_moe", dense_layers),
        "shared_expert_intermediate_size": cfg.n_shared_experts * _expert_hidden(model),
        "qkv_bias": True,
        "max_window_layers": cfg.n_layer,
    }
    return config, t


def _qwen3_moe(model, take) -> tuple[dict, dict]:
    """Qwen3-MoE: Qwen2-MoE's layout without biases or a shared expert, plus q_norm and k_norm
    over each head (ours: attn.q_norm, attn.k_norm, applied before RoPE as Qwen3 does)."""
    t = {}
    _embeddings(model, take, t)

    def qk_norms(p: str, i: int) -> None:
        t[f"{p}.self_attn.q_norm.weight"] = take(f"blocks.{i}.attn.q_norm.weight")
        t[f"{p}.self_attn.k_norm.weight"] = take(f"blocks.{i}.attn.k_norm.weight")

    dense_layers = _qwen_moe_blocks(model, take, t, qk_norms, lambda p, i, b: None)
    return {**_qwen_moe_config(model, "qwen3_moe", dense_layers), "attention_bias": False}, t


def _rope_pair_order(dr: int):
    """Our RoPE rotates the pairs (j, j + dr/2) of a vector; DeepSeek's checkpoints (read by
    transformers with rope_interleave) rotate (2j, 2j + 1) with the same frequency j. Taking the
    rows that produce the rotated part in this order, the same for queries and keys, turns one
    into the other and leaves every q.k unchanged: [0, dr/2, 1, dr/2 + 1, ...]."""
    import torch

    return torch.stack([torch.arange(dr // 2), torch.arange(dr // 2) + dr // 2], dim=1).flatten()


def _deepseek(model, take) -> tuple[dict, dict]:
    """mla blocks -> DeepSeek-V2 (softmax, raw gates) or DeepSeek-V3 (sigmoid + selection bias)."""
    import torch

    cfg, t = model.cfg, {}
    v3 = cfg.router == "sigmoid"
    _embeddings(model, take, t)
    dn, dr = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    eh = _expert_hidden(model)
    order = _rope_pair_order(dr)
    for i, b in enumerate(model.blocks):
        p, a = f"model.layers.{i}", f"blocks.{i}.attn"
        t[f"{p}.input_layernorm.weight"] = take(f"blocks.{i}.attn_norm.weight")
        t[f"{p}.post_attention_layernorm.weight"] = take(f"blocks.{i}.ffn_norm.weight")
        wq = take(f"{a}.wq_b.weight" if cfg.q_lora_rank else f"{a}.wq.weight")
        wq = wq.view(cfg.n_head, dn + dr, -1)  # per head [nope; rope] rows
        wq = torch.cat([wq[:, :dn], wq[:, dn:][:, order]], 1).flatten(0, 1)
        if cfg.q_lora_rank:
            t[f"{p}.self_attn.q_a_proj.weight"] = take(f"{a}.wq_a.weight")
            t[f"{p}.self_attn.q_a_layernorm.weight"] = take(f"{a}.q_norm.weight")
            t[f"{p}.self_attn.q_b_proj.weight"] = wq
        else:
            t[f"{p}.self_attn.q_proj.weight"] = wq
        wkv_a = take(f"{a}.wkv_a.weight")  # [latent; shared RoPE key] rows
        rank = wkv_a.shape[0] - dr
        t[f"{p}.self_attn.kv_a_proj_with_mqa.weight"] = torch.cat([wkv_a[:rank], wkv_a[rank:][order]])
        t[f"{p}.self_attn.kv_a_layernorm.weight"] = take(f"{a}.kv_norm.weight")
        t[f"{p}.self_attn.kv_b_proj.weight"] = take(f"{a}.wkv_b.weight")  # per head [k_nope; v], as ours
        t[f"{p}.self_attn.o_proj.weight"] = take(f"{a}.wo.weight")
        if not b.is_moe:
            _swiglu(take, f"blocks.{i}.ffn", f"{p}.mlp", t)
            continue
        t[f"{p}.mlp.gate.weight"] = take(f"blocks.{i}.ffn.router.weight")
        if v3:  # selection-only bias: chooses experts, never weighs them, as ours
            t[f"{p}.mlp.gate.e_score_correction_bias"] = take(f"blocks.{i}.ffn.router.bias").float()
        _experts(take, f"blocks.{i}.ffn.experts", f"{p}.mlp.experts", t, ("gate_proj", "up_proj", "down_proj"))
        if b.ffn.shared is not None:  # ungated, n_shared_experts * moe_intermediate_size wide, as ours
            _swiglu(take, f"blocks.{i}.ffn.shared", f"{p}.mlp.shared_experts", t)
        else:  # DeepSeek always builds the shared MLP: width 0 adds exactly 0
            _empty_swiglu(f"{p}.mlp.shared_experts", t, cfg.n_embd, t[f"{p}.mlp.gate.weight"].dtype)
    config = {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        **_llama_like_config(model),
        "num_key_value_heads": cfg.n_head,  # MLA: every head has its own (up-projected) K and V
        "head_dim": dr,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": dn,
        "qk_rope_head_dim": dr,
        "v_head_dim": cfg.v_head_dim,
        "attention_bias": False,
        "mlp_bias": False,
        "intermediate_size": _dense_hidden(model),
        "moe_intermediate_size": eh,
        "n_routed_experts": cfg.n_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.top_k,
        "first_k_dense_replace": cfg.first_k_dense,
        "moe_layer_freq": 1,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
    }
    if v3:
        config.update(norm_topk_prob=bool(cfg.norm_topk and cfg.top_k >= 2), scoring_func="sigmoid",
                      topk_method="noaux_tc", rope_interleave=True, num_nextn_predict_layers=0)
    else:  # transformers' DeepSeek-V2 never renormalises the k softmax gates (norm_topk refused above)
        config.update(norm_topk_prob=False, scoring_func="softmax", topk_method="greedy")
    return config, t


# ---------------------------------------------------------------- hf format: tokenizer


def hf_tokenizer_files(tokenizer_json: str, cfg) -> dict[str, str]:
    """Our byte-level BPE as a PreTrainedTokenizerFast: tokenizer.json as is, <|endoftext|> as
    bos/eos/unk, and split_special_tokens so a literal "<|endoftext|>" in a text stays text,
    exactly as minideep encodes it."""
    from .tokenizer import EOT

    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": cfg.model.block_size,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
    }
    return {TOKENIZER: tokenizer_json, "tokenizer_config.json": _json(config),
            "special_tokens_map.json": _json(special)}


def _generation_config(hf_config: dict) -> dict:
    return {"bos_token_id": hf_config.get("bos_token_id"), "eos_token_id": hf_config.get("eos_token_id"),
            "pad_token_id": hf_config.get("eos_token_id")}
