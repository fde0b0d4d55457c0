"""Reading a trained model back: one checkpoint opened into a model, its config and its
tokenizer (`load_for_inference`), and the engines of the commands that use it: `eval`
(`evaluate_checkpoint`) and `inspect-routing` (`route_checkpoint`); `sample` streams from
generate.py. Engines return data and never print."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from .checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from .config import Config
from .models.moe_arch import MoEConfig
from .data import TokenData, open_or_none, read_text_file
from .device import pick_device, pick_dtype
from .errors import UserError
from .evaluate import evaluate_tokens
from .models import has_experts
from .models.transformer import is_moe_layer
from .schema import check_text
from .routing_report import ReportInputs, RoutingReport, analyze, collect_routing, model_info
from .tokenizer import split_chunks, load_tokenizer, token_byte_lengths, token_bytes


TEXT_LIMIT = 1 << 30  # bytes of an --text file read whole by eval and inspect-routing (a few hours of CPU eval)


@dataclass
class Loaded:
    """A checkpoint opened for inference."""

    model: torch.nn.Module  # in eval mode, on `device`
    config: Config
    tokenizer: Tokenizer
    path: Path  # the checkpoint file (or export folder) read
    device: str
    step: int  # the training step its weights are from
    tokenizer_json: str  # as saved: a data dir is read with this model only if it holds the same


def load_for_inference(ckpt: Optional[Path], device: str = "auto") -> Loaded:
    """A checkpoint file, a run dir (its best.pt) or an export folder; None = the newest run."""
    path = resolve_checkpoint(str(ckpt) if ckpt else None)
    state = load_checkpoint(path)
    dev = pick_device(device, "--device")
    model, cfg = model_from_checkpoint(state, dev, path)
    return Loaded(model, cfg, load_tokenizer(state["tokenizer"]), path, dev, state["loop"]["step"], state["tokenizer"])


def moe_layers(m: MoEConfig) -> list[int]:
    """The blocks whose feed-forward is an MoE layer (docs/design.md, The models); none when dense."""
    return [i for i in range(m.n_layer) if has_experts(m) and is_moe_layer(m, i)]


def _validation_split(lo: Loaded, dd: Optional[TokenData], instead: str) -> TokenData:
    """The data dir to read with this model: it must be here and hold the model's tokenizer."""
    if dd is None:
        raise UserError(f"the checkpoint's training data is not on this machine; give --text or {instead}")
    if dd.tokenizer_json != lo.tokenizer_json:
        raise UserError(f"{dd.dir} was tokenized with another tokenizer than this checkpoint's")
    return dd


def evaluate_checkpoint(ckpt: Path, text: Optional[Path] = None, data: Optional[Path] = None,
                        device: str = "auto") -> dict:
    """eval: loss, perplexity and bits per byte on a text file, a data dir's validation split, or
    (neither given) the split the model trained with; plus checkpoint, source and step."""
    if text and data:
        raise UserError("give --text or --data, not both")
    lo = load_for_inference(ckpt, device)
    if text:
        body = read_text_file(text, TEXT_LIMIT)
        chunks = split_chunks(body, 1 << 20)
        tokens = np.asarray([i for c in chunks for i in lo.tokenizer.encode(c).ids], dtype=np.int64)
        source = str(text)
    else:
        dd = _validation_split(lo, TokenData.open(data) if data else open_or_none(lo.config), "--data")
        tokens, source = dd.val, f"{dd.dir} (val)"
    if len(tokens) < 2:
        raise UserError("the text is too short to evaluate (fewer than 2 tokens)")
    res = evaluate_tokens(lo.model, tokens, token_byte_lengths(lo.tokenizer), lo.config.model.block_size,
                          batch_size=8, device=lo.device, dtype=pick_dtype(lo.config.train.dtype, lo.device))
    res.update({"checkpoint": str(lo.path), "source": source, "step": lo.step})
    return res


def _routing_tokens(lo: Loaded, text: Optional[Path], prompt: Optional[str], max_tokens: int) -> tuple[np.ndarray, str]:
    """The tokens to route (at most max_tokens) and where they come from."""
    if text or prompt is not None:
        body = read_text_file(text, TEXT_LIMIT) if text else check_text(prompt, "--prompt")
        ids = []
        for chunk in split_chunks(body, 1 << 16):  # stop encoding once there are enough tokens
            ids += lo.tokenizer.encode(chunk).ids
            if len(ids) > max_tokens:
                break
        source = str(text) if text else "--prompt"
    else:
        dd = _validation_split(lo, open_or_none(lo.config), "--prompt")
        ids, source = dd.val, f"{dd.dir} (validation split)"
    if len(ids) == 0:
        raise UserError("the text is empty: nothing to route")
    if len(ids) > max_tokens:
        source += f", first {max_tokens:,} tokens"
    return np.asarray(ids[:max_tokens], dtype=np.int64), source


def route_checkpoint(ckpt: Optional[Path], text: Optional[Path] = None, prompt: Optional[str] = None,
                     layer: Optional[int] = None, max_tokens: int = 20000, device: str = "auto",
                     progress: Optional[Callable[[int, int], None]] = None) -> RoutingReport:
    """inspect-routing: route a text (default: the start of the validation split the model trained
    with) and analyse which experts each token used; `layer` picks the MoE layer detailed."""
    lo = load_for_inference(ckpt, device)
    m = lo.config.model
    blocks = moe_layers(m)
    if not blocks:
        raise UserError(f"{lo.path} is a dense {m.arch} model with no experts: there is no routing to inspect "
                        "(sample --show-routing shows its predictions)")
    if layer is not None and layer not in blocks:
        raise UserError(f"--layer {layer} is not an MoE layer; the MoE layers are {', '.join(map(str, blocks))}")
    tokens, source = _routing_tokens(lo, text, prompt, max_tokens)
    if progress:
        progress(0, len(tokens))
    trace = collect_routing(lo.model, tokens, lo.device, dtype=pick_dtype(lo.config.train.dtype, lo.device),
                            progress=progress)
    return analyze(trace, token_bytes(lo.tokenizer), model_info(lo.config, blocks),
                   ReportInputs(str(lo.path), source, len(tokens)), layer)
