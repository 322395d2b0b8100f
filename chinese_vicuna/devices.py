"""Processes, devices and precision: where a model runs and in which dtype, decided once."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Precision:
    """What `decide_precision` decided: how the base's weights load, and the training's mixed precision."""

    weights: str  # fp32, bf16, fp16, 8bit or 4bit
    bf16: bool = False  # mixed-precision training in bf16
    fp16: bool = False  # mixed-precision training in fp16 (CUDA only)
    use_cpu: bool = False  # training without CUDA: Accelerate syncs gloo gradients only when told CPU


def decide_precision(
    weights: str = "auto",
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    *,
    training: bool = False,
    bf16: bool | None = None,
    fp16: bool | None = None,
    whole_model: str | None = None,
) -> Precision:
    """The one place precision is decided, from the flags as given.

    Weights: `auto` is Chinese-Vicuna's 8-bit on a CUDA GPU and fp32 on the CPU (bf16 when training
    in bf16 on the CPU: only bf16 matmuls ever read the frozen base); `half` is bf16 where supported,
    else fp16. Training (`training`): `--bf16`/`--fp16` not given → bf16 where the GPU supports it,
    fp16 on older GPUs, neither on the CPU. `whole_model`: the flag that makes the run train and save
    every weight (e.g. `--stage embeddings`): quantized weights are refused when asked for, and
    `auto` loads fp32."""
    cuda = torch.cuda.is_available()
    if training:
        if fp16 and not cuda:
            raise UserError("--fp16 needs a CUDA GPU (fp16 on the CPU gives loss 0/NaN); use --bf16 true on the CPU")
        if bf16 and fp16:
            raise UserError("--bf16 and --fp16 are exclusive; pick one")
        if bf16 is None:
            bf16 = bool(cuda and bf16_supported() and not fp16)
        if fp16 is None:
            fp16 = bool(cuda and not bf16)
    if load_in_8bit and load_in_4bit:
        raise UserError("--load_in_8bit and --load_in_4bit are exclusive; pick one")
    requested = "8bit" if load_in_8bit else "4bit" if load_in_4bit else weights
    if requested not in PRECISIONS:
        raise UserError(f"unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        resolved = "8bit" if cuda else "bf16" if training and bf16 else "fp32"
        if whole_model and resolved in ("8bit", "4bit"):
            resolved = "fp32"
    elif requested == "half":  # the fp16 launchers: bf16 on Ampere+ and the CPU, fp16 on older GPUs
        resolved = "bf16" if bf16_supported() else "fp16"
    else:
        resolved = requested
    if whole_model and resolved in ("8bit", "4bit"):
        raise UserError(f"{whole_model} saves the whole model and cannot train a quantized one; use --precision fp32 or bf16")
    return Precision(resolved, bool(training and bf16), bool(training and fp16), bool(training and not cuda))


def resolve_precision(precision: str, load_in_8bit: bool = False, load_in_4bit: bool = False) -> str:
    """The weights' precision of `decide_precision` for inference (no training flags)."""
    return decide_precision(precision, load_in_8bit, load_in_4bit).weights


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


LOSS_KERNELS = ("auto", "chunked", "liger")


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def decide_loss_kernel(requested: str, cuda: bool | None = None, liger: bool | None = None) -> str:
    """`--loss_kernel` → the loss head's kernel (train/losses.py): `liger` (Liger's fused linear
    cross-entropy, Triton: CUDA only) where asked, or with `auto` on CUDA where liger-kernel is
    installed; else `chunked` (the chunks through lm_head, any device)."""
    if requested not in LOSS_KERNELS:
        raise UserError(f"--loss_kernel {requested!r}: use one of {', '.join(LOSS_KERNELS)}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    liger = liger_installed() if liger is None else liger
    if requested == "liger" and not (cuda and liger):
        missing = "no CUDA device here" if not cuda else "liger-kernel is not installed (pip install liger-kernel)"
        raise UserError(
            f"--loss_kernel liger: Liger's fused kernel runs on CUDA with liger-kernel, and {missing}; use --loss_kernel chunked (or auto)"
        )
    return "liger" if requested == "liger" or (requested == "auto" and cuda and liger) else "chunked"
