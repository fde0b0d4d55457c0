"""--format gguf: one self-contained file that llama.cpp (and so Ollama and LM Studio) runs.

A model goes to the llama.cpp architecture whose graph computes exactly our function, read from
llama.cpp's graph code (src/models/*.cpp and build_moe_ffn in src/llama-graph.cpp of the
llama.cpp that llama-cpp-python 0.3.36 vendors), or is refused with the reason:

  gpt2                                          -> gpt2 (LayerNorm, fused q/k/v, learned positions)
  moe, gqa attention, SwiGLU, dense blocks only first
                                                -> glm4moe: RoPE in rotate-half (NEOX) order as
                                                   ours, per-head q/k RMSNorm when present, and a
                                                   router whose gating (softmax or sigmoid), gate
                                                   renormalisation (expert_weights_norm) and
                                                   selection-only bias (exp_probs_b) are settings
  moe, mla attention, SwiGLU, dense blocks only first
                                                -> deepseek2 with MLA's absorbed layout (k_b, v_b)

qwen3moe is not used for the default model: its graph always renormalises the k gates
(build_moe_ffn(..., LLM_FFN_SILU, true, ...)), and the cpu preset keeps them raw. glm4moe
passes hparams.expert_weights_norm, so raw gates are one key.

Exactness details:
- glm4moe and deepseek2 always run a shared expert (glm4moe without one would add silu(x), its
  build_ffn with no weights): a model without shared experts gets one of width expert_hidden
  whose weights are all zero, so it adds exactly 0 (silu(0) * 0 = 0, then a zero projection).
- exp_probs_b is added to the router scores for choosing experts only, never for weighing them,
  as our router.bias; it is written as it is (zeros when unused).
- deepseek2 rotates interleaved pairs (RoPE type NORM): the rows that make the RoPE parts of q and
  of the shared key are reordered from our (j, j + d/2) pairs, as for --format hf's DeepSeek.
  Its k_b is our per-head W_uk transposed (H, r, dn); v_b our W_uv (H, dv, r).
- a tied output head is left out: llama.cpp then reads token_embd for it.
- ours is dropless at inference and so is llama.cpp; training-only settings (router noise,
  the training capacity, dropout, balancing losses) do not change the exported function.

dtypes: f32 (exact), f16, bf16, q8_0. Vectors (norms, biases, the router's selection bias) and the
router's matrix stay f32 whatever the dtype (ours routes in fp32); q8_0 quantises blocks of 32
along a row, so a matrix whose rows (its input width) do not divide by 32 is written in f16.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from ..errors import UserError
from ..files import temp_name, writable
from ..models import has_experts
from ..tokenizer import EOT, load_tokenizer
from .deepseek import _rope_pair_order
from .layout import dense_width, expert_width, tied

DTYPES = ("f32", "f16", "bf16", "q8_0")
INSTALL_HINT = "pip install gguf (the gguf extra: pip install 'minideep[gguf]')"
PRE_TOKENIZER = "gpt-2"  # llama-vocab.cpp: the GPT-2 split regex, our ByteLevel pre-tokenizer's


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise UserError(f"minideep export --format gguf needs the gguf package: {INSTALL_HINT}")
    return gguf


@dataclass
class Tensor:
    name: str
    data: torch.Tensor  # in llama.cpp's row-major layout (numpy shape = ggml ne reversed)
    keep_f32: bool = False  # norms, biases, the router: f32 at every dtype


@dataclass
class Plan:
    """What a GGUF file holds: its architecture, hyperparameter keys and tensors."""

    arch: str
    keys: dict = field(default_factory=dict)  # gguf key -> value (int, float, bool, str)
    tensors: list[Tensor] = field(default_factory=list)

    def add(self, name: str, data: torch.Tensor, keep_f32: bool = False) -> None:
        self.tensors.append(Tensor(name, data.detach().float().contiguous(), keep_f32 or data.dim() == 1))


# ---------------------------------------------------------------- which architecture


def gguf_arch(model) -> str:
    """The llama.cpp architecture whose graph computes this model's function, or a UserError that
    names every setting it cannot compute."""
    cfg = model.cfg
    if not has_experts(cfg):
        return "gpt2"
    problems = []
    dense = [not b.is_moe for b in model.blocks]
    if dense != [i < cfg.first_k_dense for i in range(cfg.n_layer)]:
        problems.append(f"dense blocks between sparse ones (model.moe_every={cfg.moe_every}); llama.cpp's "
                        "glm4moe and deepseek2 have leading dense blocks only")
    if cfg.attention == "gqa":
        arch = "glm4moe"
    elif cfg.attention == "mla":
        arch = "deepseek2"
        # deepseek2 takes these shapes for DeepSeek-V2-Lite and its kin, and then reads no q_lora_rank
        if cfg.q_lora_rank and (cfg.n_layer in (26, 27) or (cfg.n_layer, cfg.vocab_size) == (48, 128256)):
            problems.append(f"a low-rank query (model.q_lora_rank) with {cfg.n_layer} layers, which llama.cpp's "
                            "deepseek2 reads as DeepSeek-V2-Lite (no low-rank query)")
        if cfg.qk_nope_head_dim < 1:  # its graph asserts a position-free part
            problems.append("model.qk_nope_head_dim=0 (llama.cpp's deepseek2 needs at least 1)")
    else:
        arch = None
        problems.append(f"{cfg.attention} attention (no llama.cpp graph computes it)")
    if cfg.activation != "swiglu":
        problems.append(f"the {cfg.activation} activation (model.activation; glm4moe and deepseek2 use SwiGLU)")
    if cfg.logit_softcap:
        problems.append(f"soft-capped logits (model.logit_softcap={cfg.logit_softcap:g})")
    if cfg.eval_capacity_factor is not None:
        problems.append(f"capacity dropping at inference (model.eval_capacity_factor={cfg.eval_capacity_factor:g})")
    if problems:
        raise UserError("cannot export to --format gguf, no llama.cpp architecture computes the same function: "
                        + "; ".join(problems) + " (use --format safetensors for a minideep-only export)")
    return arch


# ---------------------------------------------------------------- tensors and keys per architecture


def gguf_plan(model) -> Plan:
    """The architecture, keys and tensors (llama.cpp names) of this model. Every weight is used."""
    arch = gguf_arch(model)
    state = model.state_dict()
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name]

    plan = Plan(arch)
    {"gpt2": _gpt2, "glm4moe": _glm4moe, "deepseek2": _deepseek2}[arch](model, take, plan)
    unused = {n for n in state if n not in used and not n.endswith("router.noise_weight")}
    if tied(model):  # llama.cpp reads token_embd for a missing output head
        unused.discard("lm_head.weight")
    if unused:
        raise UserError(f"cannot export to --format gguf: weights with no place in {arch}: {', '.join(sorted(unused))}")
    return plan


def _gpt2(model, take, plan: Plan) -> None:
    cfg = model.cfg
    plan.keys.update({"context_length": cfg.block_size, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
                      "feed_forward_length": 4 * cfg.n_embd, "attention.head_count": cfg.n_head,
                      "attention.layer_norm_epsilon": model.transformer.ln_f.eps})
    plan.add("token_embd.weight", take("transformer.wte.weight"))
    plan.add("position_embd.weight", take("transformer.wpe.weight"))

    def linear_or_norm(src: str, dst: str) -> None:
        # model.bias false: a LayerNorm or Linear without bias equals one with a zero bias
        mod = model.get_submodule(src)
        plan.add(f"{dst}.weight", take(f"{src}.weight"))
        plan.add(f"{dst}.bias", take(f"{src}.bias") if mod.bias is not None else torch.zeros(mod.weight.shape[0]))

    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        linear_or_norm(f"{p}.ln_1", f"blk.{i}.attn_norm")
        linear_or_norm(f"{p}.attn.c_attn", f"blk.{i}.attn_qkv")  # rows [q; k; v], as llama.cpp splits them
        linear_or_norm(f"{p}.attn.c_proj", f"blk.{i}.attn_output")
        linear_or_norm(f"{p}.ln_2", f"blk.{i}.ffn_norm")
        linear_or_norm(f"{p}.mlp.c_fc", f"blk.{i}.ffn_up")
        linear_or_norm(f"{p}.mlp.c_proj", f"blk.{i}.ffn_down")
    linear_or_norm("transformer.ln_f", "output_norm")


def _moe_keys(model, plan: Plan) -> None:
    """Keys glm4moe and deepseek2 share: sizes, RMSNorm epsilon, RoPE base, the router."""
    cfg = model.cfg
    plan.keys.update({
        "context_length": cfg.block_size, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
        "feed_forward_length": dense_width(model), "attention.head_count": cfg.n_head,
        "attention.layer_norm_rms_epsilon": model.norm.eps, "rope.freq_base": float(cfg.rope_theta),
        "leading_dense_block_count": cfg.first_k_dense, "expert_count": cfg.n_experts,
        "expert_used_count": cfg.top_k, "expert_feed_forward_length": expert_width(model),
        # at least one shared expert: a zero one stands for none (module docstring)
        "expert_shared_count": max(1, cfg.n_shared_experts),
        "expert_weights_norm": bool(cfg.norm_topk and cfg.top_k >= 2),  # ours keeps a single gate raw
        "expert_weights_scale": 1.0,
        "expert_gating_func": 1 if cfg.router == "softmax" else 2,  # llama.cpp: 1 softmax, 2 sigmoid
    })


def _embeddings(model, take, plan: Plan) -> None:
    plan.add("token_embd.weight", take("tok_emb.weight"))
    plan.add("output_norm.weight", take("norm.weight"))
    if not tied(model):
        plan.add("output.weight", take("lm_head.weight"))


def _feed_forward(model, take, plan: Plan, i: int) -> None:
    """Block i's dense SwiGLU, or its router, experts and shared expert (a zero one if none)."""
    b, p, f = model.blocks[i], f"blk.{i}", f"blocks.{i}.ffn"
    if not b.is_moe:
        plan.add(f"{p}.ffn_gate.weight", take(f"{f}.w1.weight"))
        plan.add(f"{p}.ffn_up.weight", take(f"{f}.w3.weight"))
        plan.add(f"{p}.ffn_down.weight", take(f"{f}.w2.weight"))
        return
    plan.add(f"{p}.ffn_gate_inp.weight", take(f"{f}.router.weight"), keep_f32=True)  # (E, d)
    plan.add(f"{p}.exp_probs_b.bias", take(f"{f}.router.bias"))  # (E,) selection only, as ours
    # ours: x @ w[e] with w1, w3 (E, d, h), w2 (E, h, d); llama.cpp: per expert (out, in) rows
    plan.add(f"{p}.ffn_gate_exps.weight", take(f"{f}.experts.w1").transpose(1, 2))  # (E, h, d)
    plan.add(f"{p}.ffn_up_exps.weight", take(f"{f}.experts.w3").transpose(1, 2))  # (E, h, d)
    plan.add(f"{p}.ffn_down_exps.weight", take(f"{f}.experts.w2").transpose(1, 2))  # (E, d, h)
    if b.ffn.shared is not None:
        gate, up, down = take(f"{f}.shared.w1.weight"), take(f"{f}.shared.w3.weight"), take(f"{f}.shared.w2.weight")
    else:
        h, d = expert_width(model), model.cfg.n_embd
        gate, up, down = torch.zeros(h, d), torch.zeros(h, d), torch.zeros(d, h)
    plan.add(f"{p}.ffn_gate_shexp.weight", gate)
    plan.add(f"{p}.ffn_up_shexp.weight", up)
    plan.add(f"{p}.ffn_down_shexp.weight", down)


def _glm4moe(model, take, plan: Plan) -> None:
    cfg = model.cfg
    _moe_keys(model, plan)
    head_dim = cfg.n_embd // cfg.n_head
    plan.keys.update({"attention.head_count_kv": cfg.n_kv_head or cfg.n_head, "rope.dimension_count": head_dim,
                      "attention.key_length": head_dim, "attention.value_length": head_dim})
    _embeddings(model, take, plan)
    for i in range(cfg.n_layer):
        p, a = f"blk.{i}", f"blocks.{i}.attn"
        kv = model.blocks[i].attn.n_kv_head * head_dim
        wkv = take(f"{a}.wkv.weight")  # [k heads; v heads] rows
        plan.add(f"{p}.attn_norm.weight", take(f"blocks.{i}.attn_norm.weight"))
        plan.add(f"{p}.attn_q.weight", take(f"{a}.wq.weight"))
        plan.add(f"{p}.attn_k.weight", wkv[:kv])
        plan.add(f"{p}.attn_v.weight", wkv[kv:])
        plan.add(f"{p}.attn_output.weight", take(f"{a}.wo.weight"))
        if cfg.qk_norm:  # per head, before RoPE, as llama.cpp's glm4moe applies attn_q_norm and attn_k_norm
            plan.add(f"{p}.attn_q_norm.weight", take(f"{a}.q_norm.weight"))
            plan.add(f"{p}.attn_k_norm.weight", take(f"{a}.k_norm.weight"))
        plan.add(f"{p}.post_attention_norm.weight", take(f"blocks.{i}.ffn_norm.weight"))  # glm4moe's name for it
        _feed_forward(model, take, plan, i)


def _deepseek2(model, take, plan: Plan) -> None:
    cfg = model.cfg
    _moe_keys(model, plan)
    dn, dr, dv, r, H = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.n_head
    plan.keys.update({
        "attention.head_count_kv": 1,  # absorbed MLA attends as one shared key/value head
        "attention.q_lora_rank": cfg.q_lora_rank, "attention.kv_lora_rank": r,
        "attention.key_length": r + dr, "attention.value_length": r,
        "attention.key_length_mla": dn + dr, "attention.value_length_mla": dv,
        "rope.dimension_count": dr,
    })
    order = _rope_pair_order(dr)
    _embeddings(model, take, plan)
    for i in range(cfg.n_layer):
        p, a = f"blk.{i}", f"blocks.{i}.attn"
        plan.add(f"{p}.attn_norm.weight", take(f"blocks.{i}.attn_norm.weight"))
        wq = take(f"{a}.wq_b.weight" if cfg.q_lora_rank else f"{a}.wq.weight").view(H, dn + dr, -1)
        wq = torch.cat([wq[:, :dn], wq[:, dn:][:, order]], 1).flatten(0, 1)  # per head [nope; rope pairs interleaved]
        if cfg.q_lora_rank:
            plan.add(f"{p}.attn_q_a.weight", take(f"{a}.wq_a.weight"))
            plan.add(f"{p}.attn_q_a_norm.weight", take(f"{a}.q_norm.weight"))
            plan.add(f"{p}.attn_q_b.weight", wq)
        else:
            plan.add(f"{p}.attn_q.weight", wq)
        wkv_a = take(f"{a}.wkv_a.weight")  # [latent; shared RoPE key] rows
        plan.add(f"{p}.attn_kv_a_mqa.weight", torch.cat([wkv_a[:r], wkv_a[r:][order]]))
        plan.add(f"{p}.attn_kv_a_norm.weight", take(f"{a}.kv_norm.weight"))
        w_uk, w_uv = take(f"{a}.wkv_b.weight").view(H, dn + dv, r).split([dn, dv], 1)  # (H, dn, r), (H, dv, r)
        plan.add(f"{p}.attn_k_b.weight", w_uk.transpose(1, 2))  # (H, r, dn): q_nope -> latent space
        plan.add(f"{p}.attn_v_b.weight", w_uv)  # (H, dv, r): latent -> value
        plan.add(f"{p}.attn_output.weight", take(f"{a}.wo.weight"))
        plan.add(f"{p}.ffn_norm.weight", take(f"blocks.{i}.ffn_norm.weight"))
        _feed_forward(model, take, plan, i)


# ---------------------------------------------------------------- tokenizer and metadata


def tokenizer_keys(tokenizer_json: str) -> dict:
    """Our byte-level BPE as llama.cpp's `gpt2` tokenizer: tokens in id order, merges in rank
    order, <|endoftext|> a control token and bos/eos, and no BOS or EOS added (minideep adds none)."""
    tok = load_tokenizer(tokenizer_json)
    model = json.loads(tokenizer_json)["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    if any(t is None for t in tokens):
        raise UserError("cannot export to --format gguf: the tokenizer's ids are not contiguous")
    eot = tok.token_to_id(EOT)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": PRE_TOKENIZER,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens],  # CONTROL, NORMAL
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": eot,
        "tokenizer.ggml.eos_token_id": eot,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }


def placeholder_tokenizer_keys(vocab_size: int) -> dict:
    """A vocabulary for a file that is fed token ids and never text (`minideep bench`'s random
    models): byte-level characters in byte order ("\\n" among them, which llama.cpp looks up on
    loading) and one merge, so llama.cpp loads it as the gpt2 tokenizer it is in a real export."""
    from ..tokenizer import _byte_level_chars

    chars = sorted(_byte_level_chars(), key=_byte_level_chars().get)  # byte 0, 1, ... as characters
    tokens = [chars[i] if i < 256 else f"<{i}>" for i in range(vocab_size)]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": PRE_TOKENIZER, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * vocab_size, "tokenizer.ggml.merges": [f"{tokens[0]} {tokens[1]}"],
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False}


def general_keys(name: str, ckpt: dict, cfg) -> dict:
    loop, data = ckpt.get("loop") or {}, ckpt.get("data") or {}
    source = str(data.get("source") or "unknown data")
    step = int(loop.get("step", 0))
    return {
        "general.name": name,
        "general.type": "model",
        "general.description": f"{cfg.model.arch} model trained with minideep {__version__} on {source}, step {step:,}",
        "general.dataset.count": 1,
        "general.dataset.0.name": source,
        "minideep.version": __version__,
        "minideep.step": step,
        "minideep.tokens": int(loop.get("tokens", 0)),
        "minideep.config": json.dumps(cfg.to_dict(), sort_keys=True),
    }


# ---------------------------------------------------------------- writing


def check_out_file(out: Path, force: bool, src: Path) -> None:
    """Before any work: OUT is a file we may create or (with force) replace, and not the source."""
    if out.is_dir():
        raise UserError(f"{out} is a folder; --format gguf writes one file (e.g. {out / 'model.gguf'})")
    if out.resolve() == src.resolve():
        raise UserError(f"{out} is the checkpoint being exported; choose another file")
    if out.exists() and not force:
        raise UserError(f"{out} exists; choose another file or pass --force to replace it")
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}")
    writable(out)


def _encoded(gguf, t: Tensor, dtype: str):
    """(array, raw ggml type or None) of one tensor at dtype (module docstring: what stays f32)."""
    a = t.data.numpy()
    if t.keep_f32 or dtype == "f32":
        return a, None
    if dtype == "f16" or (dtype == "q8_0" and a.shape[-1] % 32):
        return a.astype("float16"), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    return gguf.quants.quantize(a, qtype), qtype


def file_type(gguf, dtype: str) -> int:
    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0}[dtype]


def write_gguf(out: Path, plan: Plan, metadata: dict, dtype: str) -> None:
    """Write the file beside OUT, fsync it and rename it into place; on failure remove it."""
    gguf = gguf_module()
    tmp = temp_name(out)
    w = gguf.GGUFWriter(tmp, plan.arch)  # opens nothing until write_header_to_file
    try:
        for key, value in {**{f"{plan.arch}.{k}": v for k, v in plan.keys.items()}, **metadata}.items():
            _add_key(gguf, w, key, value)
        w.add_file_type(file_type(gguf, dtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for t in plan.tensors:
            data, raw = _encoded(gguf, t, dtype)
            w.add_tensor(t.name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as e:
        w.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full or read-only disk
            raise UserError(f"cannot write {out}: {e.strerror or e}; it was left as it was")
        raise


def _add_key(gguf, w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        # llama.cpp checks each key's type: its counts, sizes and token ids are uint32
        (w.add_uint64 if key.startswith("minideep.") else w.add_uint32)(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)
    else:
        raise TypeError(f"no gguf type for {key}={value!r}")


def export_gguf(ckpt: dict, model, cfg, out: Path, dtype: str = "f32", name: Optional[str] = None) -> Plan:
    """Map the model (or refuse), then write OUT atomically. Returns what was written."""
    plan = gguf_plan(model)
    metadata = {**general_keys(name or f"minideep-{cfg.model.arch}", ckpt, cfg), **tokenizer_keys(ckpt["tokenizer"])}
    write_gguf(out, plan, metadata, dtype)
    return plan
