"""Cheaper LoRA dropout on the CPU, same distribution.

PEFT's LoRA layer computes `lora_B(lora_A(dropout(x)))` after casting `x` to the fp32 LoRA
weights' dtype. Under bf16 autocast that cast is wasted (the matmul casts back to bf16), and
on the CPU `nn.Dropout` draws one 32-bit random number per element through `bernoulli_`:
for a micro-batch of instruction data this costs about as much as the q_proj matmul itself.

`FastDropout` draws 16 random bits per element (four per 64-bit draw of the same global
generator, so seeding and checkpoint resume behave as before) and keeps an element when its
bits clear a threshold: keep probability `1 - round(p * 65536) / 65536` (0.95 ± 8e-6 for
p = 0.05), scaled by its inverse exactly as `nn.Dropout` does. On CUDA it calls the native
dropout (one fused kernel there). Measured on this project's 2-core CPU: 0.7 ms vs 2.2 ms
per (800, 512) bf16 tensor.
"""

from __future__ import annotations

from typing import Any

import torch

_LEVELS = 1 << 16


class FastDropout(torch.nn.Module):
    """Dropout with a 16-bit random threshold per element (CPU), native dropout elsewhere."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.dropped_levels = round(p * _LEVELS)

    @property
    def keep_probability(self) -> float:
        return 1.0 - self.dropped_levels / _LEVELS

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropped_levels == 0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, training=True)
        n = x.numel()
        # Uniform over all 2^64 values, read as four uniform int16 lanes.
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n].view(x.shape)
        keep = bits >= self.dropped_levels - _LEVELS // 2
        # Scalar multiply (one rounding, as nn.Dropout); a bf16 mask holding 1/0.95 would not be exact.
        return torch.where(keep, x * (1.0 / self.keep_probability), 0.0)


def use_fast_lora_dropout(model: Any, autocast: bool) -> int:
    """Swap every LoRA layer's `nn.Dropout` for `FastDropout`; with `autocast` (bf16/fp16
    training) also skip PEFT's fp32 copy of the layer input. Returns the layers changed."""
    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if isinstance(dropout, torch.nn.Dropout):
                dropouts[name] = FastDropout(dropout.p)
        if autocast:
            # Autocast casts the input back to bf16/fp16 for the LoRA matmul anyway.
            module.cast_input_dtype_enabled = False
        changed += 1
    return changed
