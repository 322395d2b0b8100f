"""Processes, devices and precision: where a model runs and in which dtype, decided once."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from chinese_vicuna.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "half", "8bit", "4bit")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "-1"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def bf16_supported() -> bool:
    """bf16 on a CUDA GPU that has it (Ampere+), or on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True


NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def cpu_has_native_bf16(flags: Iterable[str] | None = None) -> bool:
    """An x86 CPU with bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 matmuls outrun fp32 (docs/benchmarks.md)."""
    found = cpu_flags() if flags is None else set(flags)
    return any(flag in found for flag in NATIVE_BF16_CPU_FLAGS)


def native_train_precision(cpu_flags: Iterable[str], cuda_bf16: bool | None = None) -> str:
    """`bf16` where the hardware runs it natively, else `fp32`.

    `cuda_bf16`: None without a GPU, else `torch.cuda.is_bf16_supported()`. Without native bf16
    a CPU emulates it, an order of magnitude slower than fp32 (docs/benchmarks.md)."""
    if cuda_bf16 is not None:
        return "bf16" if cuda_bf16 else "fp32"
    return "bf16" if cpu_has_native_bf16(cpu_flags) else "fp32"


def this_machine_train_precision() -> str:
    """`native_train_precision` of this machine's GPU, or of its CPU where there is no GPU."""
    cuda_bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None
    return native_train_precision(cpu_flags(), cuda_bf16)


def resolve_precision(precision: str, load_in_8bit: bool = False, load_in_4bit: bool = False) -> str:
    """`auto`: Chinese-Vicuna's 8-bit on a CUDA GPU, fp32 weights on the CPU; `half`: bf16 where supported, else fp16."""
    if load_in_8bit and load_in_4bit:
        raise UserError("--load_in_8bit and --load_in_4bit are exclusive; pick one")
    if load_in_8bit:
        return "8bit"
    if load_in_4bit:
        return "4bit"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "8bit" if torch.cuda.is_available() else "fp32"
    if precision == "half":  # the fp16 launchers: bf16 on Ampere+ and the CPU, fp16 on older GPUs
        return "bf16" if bf16_supported() else "fp16"
    return precision


def compute_dtype() -> torch.dtype:
    """bf16 where the hardware has it, else fp16 (GPU) — for k-bit compute and half loads."""
    return torch.bfloat16 if bf16_supported() else torch.float16


def default_device_map(device_map: str | None = None) -> Any:
    """torchrun: each process its own GPU; one GPU: that GPU; CPU: None. `auto` spreads layers."""
    if device_map:
        return device_map
    if torch.cuda.is_available():
        rank = local_rank()
        return {"": rank if rank >= 0 else torch.cuda.current_device()}
    return None
