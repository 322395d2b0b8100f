"""What bf16 training must not copy to fp32, and what the CPU allocator must not keep.

Measured on a CPU with AMX/AVX512-BF16 (docs/benchmarks.md, "bf16 on a CPU with native bf16"):

- accelerate wraps a mixed-precision model's forward as `convert_outputs_to_fp32(autocast(forward))`,
  so the packed loss received an fp32 copy of the bf16 logits (rows × 32000) and autograd cast
  its fp32 gradient back: two full passes over the largest tensor of the step, for nothing —
  `losses.chunked_cross_entropy` already computes in fp32 chunk by chunk from bf16 logits, and the
  logits hold bf16 values either way (same loss, bit for bit).
- glibc's dynamic mmap threshold: after the first large tensor is freed, glibc raises the
  threshold (up to 32 MiB), so the next activations come from the heap, whose freed holes of ever
  different row lengths are never returned: the resident size grew step after step (by 1 GiB
  over 16 steps in bf16). A fixed threshold keeps large tensors in mmap, returned when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from types import MethodType
from typing import Any

logger = logging.getLogger(__name__)

# glibc mallopt parameter numbers (malloc.h).
_M_MMAP_THRESHOLD = -3
# Tensors above this size are mmapped and returned to the system when freed; glibc's own
# initial (and smallest dynamic) value, kept fixed.
MMAP_THRESHOLD_BYTES = 128 * 1024

_allocator_set = False


def keep_large_tensors_out_of_the_heap() -> bool:
    """Fix glibc's mmap threshold (see the module docstring). True where it was set (Linux/glibc)."""
    global _allocator_set
    if _allocator_set:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _allocator_set = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return _allocator_set


_libc: Any = None


def return_freed_heap() -> None:
    """Give the heap's free pages back to the system (glibc `malloc_trim`); a no-op elsewhere."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if sys.platform.startswith("linux") else False
            _libc.malloc_trim  # noqa: B018  (musl has none)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def keep_logits_dtype(model: Any) -> bool:
    """Drop accelerate's fp32 conversion of the outputs from `model`'s forward, keeping its autocast.

    Only for a loss that takes bf16/fp16 logits itself (the packed loss). True when it was there."""
    module = getattr(model, "module", model)  # DDP wraps the module whose forward accelerate replaced
    forward = module.__dict__.get("forward")
    converter = getattr(forward, "__wrapped__", None)
    if type(converter).__name__ != "ConvertOutputsToFp32":
        return False
    inner = converter.model_forward  # autocast(forward): unbound where accelerate wrapped a method
    module.forward = MethodType(inner, module) if isinstance(forward, MethodType) else inner
    return True
