"""Peak FLOPs of the device (a table for GPUs, an estimate from the clock and vector width for
CPUs) and the rate a square matmul reaches in practice, for MFU."""

from __future__ import annotations

import platform
import re
from typing import Callable, Optional

import torch

from ..device import cpu_flags, cpu_info
from .timing import BenchOptions, median_times, syncer

# Dense BF16 tensor-core peaks with FP32 accumulation, TFLOPS (vendor specifications, no sparsity).
# Matched against torch.cuda.get_device_name(), longest name first.
GPU_PEAK_TFLOPS = {
    "RTX 3060": 25.6,
    "RTX 3090": 71.0,
    "RTX 4090": 165.2,
    "A100": 312.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM
    "H200": 989.4,
}
FMA_UNITS = 2  # fused multiply-add pipes per core assumed for the CPU estimate


def cpu_ghz() -> tuple[float, str]:
    """Maximum clock in GHz and where it came from (Linux sysfs, /proc/cpuinfo, else 3.0 assumed)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1e6, "cpufreq max"
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", f.read())]
        if mhz:
            return max(mhz) / 1e3, "/proc/cpuinfo"
    except OSError:
        pass
    return 3.0, "assumed"


def simd_datapath(cap: str, info: dict[str, str]) -> tuple[int, str]:
    """Bits of fp32 work per FMA pipe per cycle: the vector width torch dispatches to (AVX-512: 512,
    AVX2: 256, else 128), except on AMD Zen 4 (vendor AuthenticAMD, family 25 with AVX-512; Zen 3,
    also family 25, has none), which runs each 512-bit instruction as two 256-bit halves. Laptop
    Zen 5 parts (family 26) split it too but are not told apart from desktop and server Zen 5,
    which do not: there the estimate is twice what the CPU can do."""
    simd = 512 if "AVX512" in cap else 256 if "AVX2" in cap else 128
    if simd == 512 and info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25":
        return 256, f"{cap} on 256-bit halves (AMD Zen 4)"
    return simd, cap


def cpu_peak(threads: int, dtype=torch.float32, info: Optional[dict] = None) -> dict:
    """FP32 peak = threads x GHz x FMA pipes (2) x 2 FLOPs per FMA x fp32 lanes (datapath / 32 bits;
    see simd_datapath). The clock is the one Linux reports, on a VM often the base clock: a CPU
    boosting above it can exceed the estimate, so bench also times a matmul (`matmul_tflops`).
    bf16 on a CPU with AVX512-BF16 doubles the peak (each 32-bit lane takes a pair of bf16
    products); with AMX, 1,024 bf16 FLOPs per cycle per core (one tile unit); without either,
    bf16 is emulated and the fp32 peak stays the bound."""
    info = cpu_info() if info is None else info
    flags = cpu_flags(info)
    simd, simd_how = simd_datapath(torch.backends.cpu.get_cpu_capability(), info)
    ghz, ghz_source = cpu_ghz()
    per_cycle, how = FMA_UNITS * 2 * (simd // 32), f"{FMA_UNITS} FMA x 2 x {simd // 32} fp32 lanes ({simd_how})"
    if dtype == torch.bfloat16 and "amx_bf16" in flags:
        per_cycle, how = 1024, "1,024 bf16 FLOPs per cycle (AMX)"
    elif dtype == torch.bfloat16 and "avx512_bf16" in flags:
        per_cycle, how = 2 * per_cycle, f"{how} x 2 bf16 per lane (AVX512-BF16)"
    flops = threads * ghz * 1e9 * per_cycle
    return {"name": f"{platform.processor() or platform.machine()} ({threads} threads)", "tflops": flops / 1e12,
            "source": f"{threads} threads x {ghz:.2f} GHz ({ghz_source}) x {how}"}


def gpu_peak(name: str) -> dict:
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return {"name": name, "tflops": GPU_PEAK_TFLOPS[key], "source": f"{key} dense bf16 (table)"}
    return {"name": name, "tflops": None, "source": "not in the table: MFU unknown"}


def device_peak(device: str, dtype=torch.float32) -> dict:
    if device.startswith("cuda"):
        return gpu_peak(torch.cuda.get_device_name(torch.device(device)))
    return cpu_peak(torch.get_num_threads(), dtype)


def matmul_fn(device: str, dtype, n: int) -> tuple[Callable[[], object], float]:
    """One n x n x n matrix product in the step's precision, and its FLOPs: timed next to a step,
    the rate this machine's matrix unit delivers in practice, where the peak is a specification
    (GPU) or an estimate (CPU)."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=c)), 2.0 * n**3


def matmul_tflops(device: str, dtype, opts: BenchOptions) -> float:
    fn, flops = matmul_fn(device, dtype, opts.matmul_size(device))
    return flops / median_times({"mm": fn}, opts.repeats, opts.warmup, syncer(device))["mm"] / 1e12
