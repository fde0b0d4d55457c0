"""Which device and precision a command runs on, and what the CPU offers: `auto` picks CUDA when
there is one, the preset is picked from the hardware, and bf16 autocast is used where it pays."""

from __future__ import annotations

import ctypes
import sys

import torch

from .errors import UserError


def pick_device(name: str, option: str = "train.device") -> str:
    """auto (CUDA when there is one, else CPU), or the device named; `option` names the setting
    in messages."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError:
        raise UserError(f"{option}: unknown device '{name}'; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{option}={name} but CUDA is not available")
    return name


def auto_preset() -> str:
    """The preset for this machine when none is given: by the GPU's memory, or cpu."""
    if torch.cuda.is_available():
        return "a100" if torch.cuda.get_device_properties(0).total_memory >= 30e9 else "rtx3060"
    return "cpu"


def cpu_info() -> dict[str, str]:
    """The first CPU's fields as Linux lists them in /proc/cpuinfo ("flags", "vendor_id", "cpu
    family", ...); empty elsewhere."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():  # the end of the first CPU's block
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_flags(info: dict[str, str] | None = None) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing)."""
    return set((cpu_info() if info is None else info).get("flags", "").split())


def cpu_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16): there bf16 matrix
    products are faster than fp32; elsewhere bf16 is emulated and slower."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def pick_dtype(name: str, device: str) -> torch.dtype:
    """auto: bf16 autocast on CUDA, fp32 on CPU. Even with native bf16 the cpu preset's moe model
    trained worse in bf16 in the same budget (docs/results/2026-11-29-tiny-shakespeare.md)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def default_preset(preset: str | None, config: object | None) -> str | None:
    """The preset asked for; without --preset and --config, the one for this machine."""
    return preset if preset is not None else (None if config else auto_preset())


def keep_cpu_memory() -> bool:
    """Let training on the CPU reuse its memory from step to step. Every step allocates the
    same large tensors and frees them again: the logits and their gradients alone are batch x
    context x vocabulary floats, 32 MiB each on the cpu preset. glibc's malloc serves blocks
    that large with a fresh mmap and returns freed memory at the top of its heap to the kernel,
    so every step page-faults all of it back in, zeroed, and the cpu preset's step took longer
    for it (docs/results/2026-12-06-epochs.md). This
    setting, for the whole process, keeps such blocks in malloc's heap (no mmap; trim only past
    1 GiB free), so later steps reuse them; the peak memory stays the same. Linux with glibc
    only; returns whether it was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
