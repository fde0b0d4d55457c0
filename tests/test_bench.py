"""`minideep bench`: FLOP counts by hand, the memory prediction against a measured peak, the presets'
fit, and the JSON layout (exact key sets, each listed in docs/bench.md). No timings are asserted."""

import copy
import importlib.util
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_cfg
from typer.testing import CliRunner

from minideep_cli.bench import peak
from minideep_cli.bench import train as bench_train
from minideep_cli.bench import (BenchOptions, bench_config, bench_memory, cpu_peak, estimate_memory, gpu_peak,
                                median_times, parse_bytes, run_bench)
from minideep_cli.cli import app
from minideep_cli.config import Config, resolve_config
from minideep_cli.errors import UserError
from minideep_cli.models import build_model
from minideep_cli.models.fast import CPU_FLASH_GQA
from minideep_cli.device import cpu_native_bf16

TOP = {"schema_version", "minideep", "torch", "python", "preset", "arch", "attention", "quick", "device", "threads",
       "sections", "elapsed_sec", "train", "busy", "products", "moe", "decode", "memory", "tokenizer", "peers"}
TRAIN = {"device", "dtype", "threads", "params", "active_params", "batch_size", "block_size", "step_ms",
         "tokens_per_sec", "flops_per_token", "achieved_tflops", "peak_tflops", "peak_source", "mfu",
         "matmul_tflops", "matmul_fraction", "variants"}
BUSY = {"threads", "policy_threads", "alone_ms", "busy_ms", "busy_policy_ms", "busy_ratio", "busy_policy_ratio"}
PRODUCTS = {"step_ms", "matmul_tflops", "model_flops", "rows", "alone_ms", "alone_of_step", "step_share", "ceiling_share"}
PRODUCTS_ROW = {"what", "kind", "phase", "calls", "distinct", "ms", "flops", "dtypes", "flops_share"}
TRAIN_VARIANT = {"overrides", "dtype", "step_ms", "tokens_per_sec", "vs_base"}
MOE = {"rows"}
MOE_ROW = {"name", "tokens", "n_embd", "n_experts", "top_k", "expert_hidden", "dense_hidden", "moe_ms", "dense_ms",
           "loop_ms", "moe_vs_dense", "moe_vs_loop"}
DECODE = {"dtype", "speed", "cache"}
DECODE_SPEED = {"attention", "context", "cached_tokens_per_sec", "recompute_tokens_per_sec", "speedup",
                "llama_cpp_tokens_per_sec"}
DECODE_CACHE = {"attention", "bytes_per_token", "state_bytes", "bytes_per_sequence", "block_size", "vs_gqa"}
MEMORY = {"estimate", "checks"}
MEMORY_ESTIMATE = {"dtype", "batch_size", "block_size", "params", "weights_bytes", "grads_bytes", "adamw_bytes",
                   "activations_bytes", "activations_checkpointed_bytes", "logits_bytes", "peak_bytes",
                   "peak_checkpointed_bytes", "grad_checkpointing", "predicted_bytes", "device_memory_bytes", "fits",
                   "margin_bytes"}
MEMORY_CHECK = {"model", "grad_checkpointing", "estimated_bytes", "measured_bytes", "error", "method"}
TOKENIZER = {"corpus_bytes", "vocab_size", "train_sec", "encode_mb_per_sec", "tokens", "bytes_per_token"}
PEERS = {"transformers", "train", "decode"}
PEERS_TRAIN = {"arch", "hf_class", "n_layer", "n_embd", "tokens_per_step", "minideep_tokens_per_sec",
               "hf_tokens_per_sec", "speedup", "flops_per_token", "matmul_tflops",
               "minideep_matmul_fraction", "hf_matmul_fraction"}
PEERS_DECODE = {"arch", "context", "minideep_tokens_per_sec", "hf_tokens_per_sec", "speedup"}
ALL_KEY_SETS = [TOP, TRAIN, TRAIN_VARIANT, BUSY, PRODUCTS, PRODUCTS_ROW, MOE, MOE_ROW, DECODE, DECODE_SPEED, DECODE_CACHE, MEMORY, MEMORY_ESTIMATE, MEMORY_CHECK,
                TOKENIZER, PEERS, PEERS_TRAIN, PEERS_DECODE]
FAST = dict(warmup=0, repeats=1, moe_repeats=1, decode_contexts=(8, 12), decode_tokens=2, measure_memory=False,
            matmul_n=64)


def tiny_config(arch: str, **model) -> Config:
    cfg = Config()
    cfg.model = tiny_model_cfg(arch, **model)
    cfg.train.batch_size, cfg.train.device = 2, "cpu"
    return cfg


# ---------------------------------------------------------------- FLOPs


def test_gpt2_flops_per_token_by_hand():
    # 2 layers x 32 wide, 4 heads, vocab 97, context 32. Per layer: c_attn 32x96, c_proj 32x32,
    # c_fc 32x128, mlp c_proj 128x32 = 12 * 32^2; lm_head 97x32; biases and LayerNorms are no matmuls.
    model = build_model(tiny_model_cfg("gpt2"))
    matmul = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 97 * 32
    scores = 2 * (2 * 32 * 32 + 2 * 32 * 32) * 3  # q.k and p.v: 2 * T * d each, forward; x3 for training
    assert model.flops_per_token(32) == 6 * matmul + scores == 190_656


def test_moe_flops_per_token_by_hand():
    # 2 layers x 32 wide, 4 heads of 8, 2 KV heads, 4 experts top-2 of hidden 96 // 2 = 48, vocab 97.
    model = build_model(tiny_model_cfg("moe"))
    attention = 32 * 32 + 32 * (2 * 2 * 8) + 32 * 32  # wq, wkv, wo
    experts = 2 * 3 * 32 * 48  # the top-2 experts a token runs, of 4
    router = 4 * 32
    matmul = 2 * (attention + experts + router) + 97 * 32  # + the tied lm_head
    scores = 2 * 12 * 4 * 8 * 32  # per layer 12 * n_head * head_dim * T
    assert model.flops_per_token(32) == 6 * matmul + scores == 192_192
    # one dense first layer: a SwiGLU of hidden 96 costs exactly what two experts of 48 cost
    dense_first = build_model(tiny_model_cfg("moe", first_k_dense=1))
    assert dense_first.flops_per_token(32) == 192_192 - 6 * router


# ---------------------------------------------------------------- memory


@pytest.mark.skipif(not CPU_FLASH_GQA, reason="older torch copies grouped heads on CPU too")
def test_memory_trace_attends_as_the_target_device():
    """The trace runs on CPU tensors; for a GPU target it must count what GPU attention saves: keys
    and values copied per query head (CPU attends the groups in place). Tiny moe: 2 layers, 4 query
    heads, 2 key/value heads of 8, batch 2 x 32, fp32."""
    from minideep_cli.bench import traced_activations

    cfg = tiny_config("moe")
    cpu, gpu = (traced_activations(cfg, torch.float32, 2, d)["all"] for d in ("cpu", "cuda"))
    head = 2 * 32 * 8 * 4  # one head's keys (or values): batch x T x head_dim x fp32 bytes
    # per layer, CPU saves the rotated K (2 heads) and the wkv output that V is a view of (K and V,
    # 4 heads); a GPU saves the copies of K and V per query head (8 heads)
    assert gpu - cpu == 2 * (8 - (2 + 4)) * head


@pytest.mark.parametrize("arch", ["gpt2", "moe"])
def test_memory_estimate_within_25_percent_of_measured_peak_rss(arch):
    cfg = bench_config(resolve_config("cpu", arch=arch, overrides=["train.device=cpu"]))
    res = bench_memory(cfg, BenchOptions(measure_memory=True), "cpu", torch.float32)
    assert set(res) == MEMORY and set(res["estimate"]) == MEMORY_ESTIMATE
    assert [c["grad_checkpointing"] for c in res["checks"]] == [False, True]
    for c in res["checks"]:
        assert set(c) == MEMORY_CHECK
        assert c["measured_bytes"] > 20e6  # a real peak was seen, not a baseline artefact
        assert abs(c["estimated_bytes"] - c["measured_bytes"]) <= 0.25 * c["measured_bytes"], c
    # checkpointing must save a visible share, in the estimate and in the measurement
    off, on = res["checks"]
    assert on["estimated_bytes"] < 0.8 * off["estimated_bytes"] and on["measured_bytes"] < 0.8 * off["measured_bytes"]


@pytest.mark.parametrize("arch", ["gpt2", "moe"])
@pytest.mark.parametrize("preset,device_gb", [("rtx3060", 12), ("a100", 40)])
def test_gpu_presets_are_predicted_to_fit_their_cards(preset, device_gb, arch):
    cfg = bench_config(resolve_config(preset, arch=arch))
    est = estimate_memory(cfg, device_gb * 10**9)
    assert est["dtype"] == "bfloat16" and est["fits"], est
    assert est["margin_bytes"] > 0.1 * device_gb * 10**9
    assert est["activations_checkpointed_bytes"] < est["activations_bytes"]


def test_estimate_grows_with_the_batch_and_counts_adamw_twice():
    small = estimate_memory(tiny_config("moe"))
    cfg = tiny_config("moe")
    cfg.train.batch_size = 4
    big = estimate_memory(cfg)
    # per-token activations double; a few batch-independent saved tensors (concatenated expert weights) do not
    assert 1.8 * small["activations_bytes"] < big["activations_bytes"] < 2 * small["activations_bytes"]
    assert small["adamw_bytes"] == 2 * small["weights_bytes"] == 8 * small["params"]


def test_parse_bytes_and_gpu_peaks():
    assert parse_bytes("12GB") == 12 * 10**9 and parse_bytes("40GiB") == 40 * 2**30 and parse_bytes("512MB") == 512 * 10**6
    with pytest.raises(UserError):
        parse_bytes("twelve")
    assert gpu_peak("NVIDIA GeForce RTX 3060")["tflops"] == 25.6
    assert gpu_peak("NVIDIA H100 PCIe")["tflops"] == 756.0
    assert gpu_peak("NVIDIA H100 80GB HBM3")["tflops"] == 989.4
    assert gpu_peak("NVIDIA A100-SXM4-40GB")["tflops"] == 312.0
    assert gpu_peak("Some Future GPU")["tflops"] is None


def test_cpu_peak_by_hand_for_fp32_and_native_bf16(monkeypatch):
    monkeypatch.setattr(peak, "cpu_ghz", lambda: (2.0, "test"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    intel = {"vendor_id": "GenuineIntel", "cpu family": "6"}
    fp32 = 2 * 2.0e9 * 2 * 2 * 16 / 1e12  # TFLOPS: 2 threads x 2 GHz x 2 FMA pipes x 2 FLOPs x 16 fp32 lanes
    assert cpu_peak(2, torch.float32, {**intel, "flags": "avx512f avx512_bf16"})["tflops"] == pytest.approx(fp32)
    assert cpu_peak(2, torch.bfloat16, {**intel, "flags": "avx512f"})["tflops"] == pytest.approx(fp32)  # emulated bf16
    assert cpu_peak(2, torch.bfloat16, {**intel, "flags": "avx512_bf16"})["tflops"] == pytest.approx(2 * fp32)
    amx = cpu_peak(2, torch.bfloat16, {**intel, "flags": "avx512_bf16 amx_bf16"})
    assert amx["tflops"] == pytest.approx(2 * 2.0e9 * 1024 / 1e12)
    assert "AVX512-BF16" in cpu_peak(2, torch.bfloat16, {"flags": "avx512_bf16"})["source"]
    # AMD Zen 4 (family 25 with AVX-512) runs 512-bit instructions as two 256-bit halves: 8 fp32 lanes
    zen4 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "flags": "avx512f avx512_bf16"}
    assert cpu_peak(2, torch.float32, zen4)["tflops"] == pytest.approx(fp32 / 2)
    assert cpu_peak(2, torch.bfloat16, zen4)["tflops"] == pytest.approx(fp32)
    assert "Zen 4" in cpu_peak(2, torch.float32, zen4)["source"]
    zen5 = {**zen4, "cpu family": "26"}  # full 512-bit datapath
    assert cpu_peak(2, torch.float32, zen5)["tflops"] == pytest.approx(fp32)


def test_matmul_rate_is_the_products_flops_over_the_median_time(monkeypatch):
    monkeypatch.setattr(peak, "median_times", lambda fns, repeats, warmup, sync: {"mm": 0.5})
    assert peak.matmul_tflops("cpu", torch.float32, BenchOptions()) == pytest.approx(2 * 2048**3 / 0.5 / 1e12)
    assert peak.matmul_tflops("cpu", torch.float32, BenchOptions(matmul_n=64)) == pytest.approx(2 * 64**3 / 0.5 / 1e12)


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_native_bf16({"avx2", "avx512_bf16"}) and cpu_native_bf16({"amx_bf16"})
    assert not cpu_native_bf16({"avx2", "avx512f", "avx512bw"}) and not cpu_native_bf16(set())


# ---------------------------------------------------------------- JSON layout


def check_keys(r: dict, sections) -> None:
    assert set(r) == TOP
    for s in ("train", "busy", "products", "moe", "decode", "memory", "tokenizer", "peers"):
        assert (r[s] is not None) == (s in sections), s
    if r["products"]:
        assert set(r["products"]) == PRODUCTS and all(set(row) == PRODUCTS_ROW for row in r["products"]["rows"])
    if r["busy"]:
        b = r["busy"]
        assert set(b) == BUSY and 1 <= b["policy_threads"] <= b["threads"] == torch.get_num_threads()
        assert b["busy_ratio"] == pytest.approx(b["busy_ms"] / b["alone_ms"])
    if r["train"]:
        assert set(r["train"]) == TRAIN and all(set(v) == TRAIN_VARIANT for v in r["train"]["variants"])
    if r["moe"]:
        assert set(r["moe"]) == MOE and all(set(row) == MOE_ROW for row in r["moe"]["rows"])
    if r["decode"]:
        assert set(r["decode"]) == DECODE
        assert all(set(row) == DECODE_SPEED for row in r["decode"]["speed"])
        assert all(set(row) == DECODE_CACHE for row in r["decode"]["cache"])
    if r["memory"]:
        assert set(r["memory"]) == MEMORY and set(r["memory"]["estimate"]) == MEMORY_ESTIMATE
    if r["tokenizer"]:
        assert set(r["tokenizer"]) == TOKENIZER
    if r["peers"]:
        assert set(r["peers"]) == PEERS
        assert all(set(row) == PEERS_TRAIN for row in r["peers"]["train"])
        assert all(set(row) == PEERS_DECODE for row in r["peers"]["decode"])
    json.dumps(r, allow_nan=False)


KEEP_MEMORY_SCRIPT = """
import ctypes, resource, sys
from minideep_cli.device import keep_cpu_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, as the counts below assume
SIZE = 40 * 2**20  # a block as large as a step's logits, freed at once as a step frees them
def rounds(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)  # touch every page, as a tensor's fill does
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
plain = rounds(5)
if not keep_cpu_memory():
    sys.exit(3)
rounds(1)  # the first block after the switch comes from the heap, and faults in once
print(plain, rounds(5))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_cpu_memory sets glibc's malloc")
def test_keep_cpu_memory_stops_large_blocks_faulting_in_each_time():
    # A fresh process: the setting is process-wide. 40 MiB is 10,240 pages of 4 KiB. The
    # measured effect on a real training step is in docs/results/2026-12-06-epochs.md.
    r = subprocess.run([sys.executable, "-c", KEEP_MEMORY_SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mmapped, kept = map(int, r.stdout.split())
    assert mmapped >= 5 * 10_240 * 0.9  # each block mmapped afresh, faulted in, unmapped on free
    assert kept < 10_240 / 2  # the heap keeps the block: less than half a block faults in 5 rounds


def test_json_keys_are_stable_for_every_section():
    sections = ("train", "busy", "products", "moe", "decode", "memory", "tokenizer")
    r = run_bench(tiny_config("moe"), BenchOptions.for_run(True, sections, **FAST))
    check_keys(r, sections)
    assert [row["attention"] for row in r["decode"]["cache"]] == ["gqa", "mla", "latent"]
    assert [row["context"] for row in r["decode"]["speed"]] == [8, 12] * 3
    assert r["train"]["flops_per_token"] == build_model(tiny_model_cfg("moe")).flops_per_token(32)
    cache = {row["attention"]: row for row in r["decode"]["cache"]}
    assert cache["gqa"]["bytes_per_token"] == 2 * (2 * 2 * 8) * 4  # 2 layers x (K, V) x 2 kv heads x 8 wide, fp32
    assert cache["latent"]["bytes_per_token"] == 0 and cache["latent"]["state_bytes"] > 0
    g = run_bench(tiny_config("gpt2"), BenchOptions.for_run(True, ("decode",), **FAST))
    check_keys(g, ("decode",))
    assert [row["attention"] for row in g["decode"]["cache"]] == ["mha"]
    # the same models in llama.cpp where llama-cpp-python is installed (latent attention has no GGUF)
    llama = importlib.util.find_spec("llama_cpp") is not None
    for row in r["decode"]["speed"] + g["decode"]["speed"]:
        assert (row["llama_cpp_tokens_per_sec"] is not None) == (llama and row["attention"] != "latent"), row


@pytest.mark.parametrize("preset", ["cpu", "rtx3060"])
def test_mla_and_latent_caches_are_smaller_than_gqa_at_the_presets(preset):
    from minideep_cli.bench import cache_rows

    rows = {r["attention"]: r for r in cache_rows(bench_config(resolve_config(preset, arch="moe")), torch.bfloat16)}
    assert rows["mla"]["bytes_per_sequence"] < rows["gqa"]["bytes_per_sequence"]
    assert rows["latent"]["bytes_per_sequence"] < rows["gqa"]["bytes_per_sequence"]


def test_peers_keys_when_transformers_is_installed():
    pytest.importorskip("transformers", reason="the peers section compares with Hugging Face transformers")
    from minideep_cli.bench import bench_peers

    cfgs = {"gpt2": tiny_config("gpt2"), "moe": tiny_config("moe")}
    p = bench_peers(cfgs, BenchOptions(**FAST), "cpu", torch.float32)
    assert set(p) == PEERS and [r["arch"] for r in p["train"]] == ["gpt2", "moe"]
    assert [r["hf_class"] for r in p["train"]] == ["GPT2LMHeadModel", "MixtralForCausalLM"]
    assert all(set(r) == PEERS_TRAIN for r in p["train"]) and all(set(r) == PEERS_DECODE for r in p["decode"])
    row = p["train"][0]
    assert row["flops_per_token"] == build_model(tiny_model_cfg("gpt2")).flops_per_token(32)
    for who in ("minideep", "hf"):  # the share of the matmul is achieved FLOPs over the matmul's rate
        achieved = row[f"{who}_tokens_per_sec"] * row["flops_per_token"]
        assert row[f"{who}_matmul_fraction"] == pytest.approx(achieved / (row["matmul_tflops"] * 1e12))


def test_peers_time_both_sides_with_adamw_whatever_the_preset_optimizer():
    pytest.importorskip("transformers", reason="the peers section compares with Hugging Face transformers")
    from minideep_cli.bench.peers import hf_twin

    for arch in ("gpt2", "moe"):
        cfg = tiny_config(arch)
        cfg.train.optimizer = "muon"
        twin, _ = hf_twin(cfg)
        assert twin.train.optimizer == "adamw" and cfg.train.optimizer == "muon"  # the caller's config untouched


def test_bench_guide_documents_every_json_key():
    text = Path(__file__).resolve().parent.parent.joinpath("docs", "bench.md").read_text()
    bench = text[text.index("## JSON keys"):]
    bench = bench[: bench.find("\n## ", 3)] if "\n## " in bench[3:] else bench
    documented = set(re.findall(r"`([a-z_]+)`", bench))
    missing = set().union(*ALL_KEY_SETS) - documented
    assert not missing, f"docs/bench.md, JSON keys, does not list: {sorted(missing)}"


# ---------------------------------------------------------------- the command


def test_cli_estimate_memory_needs_no_device_and_writes_json(tmp_path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(app, ["bench", "--preset", "rtx3060", "--estimate-memory", "--device-memory", "12GB",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "fits" in r.output
    data = json.loads(out.read_text())
    check_keys(data, ("memory",))
    assert data["memory"]["estimate"]["fits"] is True and data["memory"]["checks"] == []


def test_cli_bad_section_and_size_are_one_line_errors():
    for args in (["bench", "-s", "speed"], ["bench", "--estimate-memory", "--device-memory", "lots"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert r.stderr.strip().startswith("error: ")


def test_train_variants_are_timed_with_their_own_settings(monkeypatch):
    """--vs: each variant's step is built from its own config and compared by tokens/s."""
    base = tiny_config("gpt2")
    longer = copy.deepcopy(base)
    longer.model.block_size, longer.train.dtype = 64, "bfloat16"  # 2 x 64 tokens a step instead of 2 x 32
    built = []
    real_step = bench_train.train_step_fn
    monkeypatch.setattr(bench_train, "train_step_fn", lambda m, c, d, dt, *a: built.append((c.model.block_size, dt))
                        or real_step(m, c, d, dt, *a))
    calls = []

    def fake_times(fns, repeats, warmup, sync=None):  # 1 s for the plain step, 0.5 s for the variant
        calls.append(list(fns))
        for f in fns.values():
            f()
        return {k: 1.0 if k == "base" else 0.5 for k in fns}
    monkeypatch.setattr(bench_train, "median_times", fake_times)
    r = run_bench(base, BenchOptions.for_run(True, ("train",), **FAST), variants={"model.block_size=64 train.dtype=bfloat16": longer})
    check_keys(r, ("train",))
    assert built == [(32, torch.float32), (64, torch.bfloat16)]
    assert len(calls[0]) == 2  # both steps in one interleaved timing
    (v,) = r["train"]["variants"]
    assert set(v) == TRAIN_VARIANT and v["overrides"] == ["model.block_size=64", "train.dtype=bfloat16"]
    assert v["dtype"] == "bfloat16" and v["step_ms"] == 500.0 and r["train"]["step_ms"] == 1000.0
    assert v["tokens_per_sec"] == 2 * 64 / 0.5 and v["vs_base"] == (2 * 64 / 0.5) / (2 * 32 / 1.0)
    moved = copy.deepcopy(base)
    moved.train.device = "cuda"
    with pytest.raises(UserError, match="one device"):
        run_bench(base, BenchOptions.for_run(True, ("train",), **FAST), variants={"train.device=cuda": moved})


def test_cli_vs_times_a_variant_and_refuses_bad_ones(tmp_path):
    out = tmp_path / "v.json"
    tiny = ["-o", "model.n_layer=1", "-o", "model.n_embd=32", "-o", "model.n_head=2", "-o", "model.block_size=16",
            "-o", "train.batch_size=2", "-o", "train.device=cpu"]
    r = CliRunner().invoke(app, ["bench", "--preset", "cpu", "--arch", "gpt2", "--quick", *tiny, "-s", "memory",
                                 "--vs", "model.dropout=0.2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["sections"] == ["train", "memory"]  # --vs brings the train section along
    assert [v["overrides"] for v in data["train"]["variants"]] == [["model.dropout=0.2"]]
    for bad, needle in ((["--vs", "model.nope=1"], "model.nope"), (["--vs", " "], "--vs needs"),
                        (["--vs", "model.dropout=0", "--estimate-memory"], "--estimate-memory")):
        r = CliRunner().invoke(app, ["bench", "--preset", "cpu", *tiny, *bad])
        assert r.exit_code == 1 and "Traceback" not in r.output and r.stderr.strip().startswith("error: ")
        assert needle in r.stderr


def test_median_times_balances_the_order_of_its_functions():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    medians = median_times(fns, repeats=6, warmup=0)
    rounds = ["".join(calls[i : i + 3]) for i in range(0, 18, 3)]
    assert rounds == ["abc", "bca", "cab", "cba", "bac", "acb"]
    pairs = [r[i : i + 2] for r in rounds for i in range(2)]
    assert {p: pairs.count(p) for p in pairs} == {p: 2 for p in ["ab", "bc", "ca", "cb", "ba", "ac"]}
    assert [r[0] for r in rounds].count("a") == 2 and set(medians) == set("abc")
