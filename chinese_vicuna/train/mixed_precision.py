"""What bf16 training must not copy to fp32.

accelerate wraps a mixed-precision model's forward as `convert_outputs_to_fp32(autocast(forward))`,
so the packed loss received an fp32 copy of the bf16 logits (trained rows × vocabulary) and autograd
cast its fp32 gradient back: two passes over the largest tensor of the step for nothing, since
`losses.chunked_cross_entropy` computes in fp32 chunk by chunk from bf16 logits, and the logits
hold bf16 values either way (the loss is the same, bit for bit). docs/benchmarks.md has the profile.
"""

from __future__ import annotations

from types import MethodType
from typing import Any


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
