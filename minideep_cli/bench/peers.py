"""The peers section (--compare-hf): the same models trained and decoded by Hugging Face
transformers, with the same batch, autocast, clipping and AdamW."""

from __future__ import annotations

import copy

import torch

from ..config import Config
from ..errors import UserError
from ..generate import generate
from ..models import build_model
from ..models import has_experts
from ..models.transformer import expert_hidden
from .peak import matmul_fn
from .timing import BenchOptions, median_times, syncer
from .train import step_fn, train_step_fn


def hf_twin(cfg: Config):
    """(minideep config, transformers model) of the same architecture, or a reason why not."""
    import transformers

    cfg = copy.deepcopy(cfg)
    cfg.train.optimizer = "adamw"  # both sides take the same AdamW step, whatever the preset's optimizer
    m = cfg.model
    if not has_experts(m):  # GPT-2
        hc = transformers.GPT2Config(vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.n_embd,
                                     n_layer=m.n_layer, n_head=m.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, layer_norm_epsilon=1e-5)
        c = copy.deepcopy(cfg)
        c.model.dropout, c.model.attention_dropout = 0.0, None  # as its twin: no dropout on either side
        return c, transformers.GPT2LMHeadModel(hc)

    c = copy.deepcopy(cfg)
    mm = c.model
    # Mixtral: gqa, every block sparse, softmax router renormalised over the top k, dropless, no z-loss
    mm.attention, mm.first_k_dense, mm.moe_every, mm.n_shared_experts = "gqa", 0, 1, 0
    mm.router, mm.norm_topk, mm.router_noise, mm.capacity_factor, mm.z_loss_coef = "softmax", True, "none", None, 0.0
    mm.dropout, mm.attention_dropout = 0.0, None
    hc = transformers.MixtralConfig(
        vocab_size=mm.vocab_size, hidden_size=mm.n_embd, intermediate_size=expert_hidden(mm), num_hidden_layers=mm.n_layer,
        num_attention_heads=mm.n_head, num_key_value_heads=mm.n_kv_head or mm.n_head, num_local_experts=mm.n_experts,
        num_experts_per_tok=mm.top_k, max_position_embeddings=mm.block_size, rope_theta=mm.rope_theta,
        tie_word_embeddings=mm.tie_embeddings, output_router_logits=True, router_aux_loss_coef=mm.aux_loss_coef,
        rms_norm_eps=1e-6)
    return c, transformers.MixtralForCausalLM(hc)


def hf_step_fn(model, cfg: Config, device: str, dtype):
    """The transformers model's step, otherwise the same (batch, autocast, clipping, AdamW)."""
    model.to(device)
    # transformers shifts the labels itself: it gets the inputs as labels
    return step_fn(model, cfg, device, dtype, lambda x, y: model(input_ids=x, labels=x), lambda out: out.loss)


def decode_seconds(ours, hf, prompt: list[int], n: int, device: str, repeats: int) -> tuple[float, float]:
    """Seconds per new token of minideep's `generate` and of transformers' `generate` (greedy, each
    with its KV cache), prefill excluded: (time for n + 1 tokens - time for 1 token) / n. The four
    timings are interleaved repetitions, so drift in the machine's speed falls on both alike."""
    hf.eval()
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)

    def ours_gen(k):
        return lambda: sum(1 for _ in generate(ours, prompt, k, temperature=0.0, use_cache=True, device=device))

    def hf_gen(k):
        return lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                   use_cache=True, pad_token_id=0, eos_token_id=None)

    with torch.no_grad():
        t = median_times({"ours1": ours_gen(1), "ours": ours_gen(n + 1), "hf1": hf_gen(1), "hf": hf_gen(n + 1)},
                         repeats, 1, syncer(device))
    return (t["ours"] - t["ours1"]) / n, (t["hf"] - t["hf1"]) / n


def bench_peers(cfgs: dict[str, Config], opts: BenchOptions, device: str, dtype) -> dict:
    """minideep against transformers on the same architectures, same batch, same AdamW."""
    try:
        import transformers
    except ImportError:
        raise UserError("--compare-hf needs Hugging Face transformers: pip install transformers")

    train_rows, decode_rows = [], []
    for arch, cfg in cfgs.items():
        torch.manual_seed(0)
        mcfg, hf = hf_twin(cfg)
        ours = build_model(mcfg.model).to(device)
        matmul, matmul_flops = matmul_fn(device, dtype, opts.matmul_size(device))  # the reference, timed alongside
        t = median_times({"minideep": train_step_fn(ours, mcfg, device, dtype), "transformers": hf_step_fn(hf, mcfg, device, dtype),
                          "matmul": matmul}, opts.repeats, opts.warmup, syncer(device))
        fpt = ours.flops_per_token(mcfg.model.block_size)
        tokens = mcfg.train.batch_size * mcfg.model.block_size

        def share(sec: float) -> float:  # achieved FLOPs per second over the matmul's
            return tokens / sec * fpt * t["matmul"] / matmul_flops

        train_rows.append({"arch": arch, "hf_class": type(hf).__name__, "n_layer": mcfg.model.n_layer, "n_embd": mcfg.model.n_embd,
                           "tokens_per_step": tokens, "minideep_tokens_per_sec": tokens / t["minideep"],
                           "hf_tokens_per_sec": tokens / t["transformers"], "speedup": t["transformers"] / t["minideep"],
                           "flops_per_token": fpt, "matmul_tflops": matmul_flops / t["matmul"] / 1e12,
                           "minideep_matmul_fraction": share(t["minideep"]), "hf_matmul_fraction": share(t["transformers"])})
        if not has_experts(mcfg.model):  # GPT-2: transformers' generate with its cache, 512 tokens of context
            ctx_len, n = 512, opts.decode_tokens
            d = copy.deepcopy(mcfg)
            d.model.block_size = ctx_len + n + 4
            torch.manual_seed(0)
            _, hf_d = hf_twin(d)
            ours_d = build_model(d.model).to(device=device).eval()
            hf_d.to(device)
            prompt = torch.randint(0, d.model.vocab_size, (ctx_len,), generator=torch.Generator().manual_seed(1)).tolist()
            reps = 3 * opts.repeats  # a decode is ~50 ms: cheap to repeat, and noisy
            ours_s, hf_s = decode_seconds(ours_d, hf_d, prompt, n, device, reps)
            decode_rows.append({"arch": arch, "context": ctx_len, "minideep_tokens_per_sec": 1 / ours_s,
                                "hf_tokens_per_sec": 1 / hf_s, "speedup": hf_s / ours_s})
    return {"transformers": transformers.__version__, "train": train_rows, "decode": decode_rows}
