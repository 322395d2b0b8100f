"""FastDropout: the same Bernoulli keep mask and scaling as nn.Dropout, from cheaper random bits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chinese_vicuna.model.adapters import add_lora
from chinese_vicuna.model.build import load_for_inference
from chinese_vicuna.train.fast_lora import FastDropout, use_fast_lora_dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_probability_and_scale(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    drop = FastDropout(0.05).train()
    x = torch.randn(1024, 4096).to(dtype)  # 4M elements: the keep fraction's std is 1.1e-4
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.95) < 6e-4
    # Each of the four 16-bit lanes of a 64-bit draw is uniform (a sign-bit bug would keep
    # every element of one lane).
    lanes = kept.flatten().view(-1, 4).float().mean(0)
    assert torch.all((lanes - 0.95).abs() < 1.2e-3), lanes
    # Kept elements are scaled exactly as nn.Dropout scales them (one rounding in `dtype`).
    assert drop.keep_probability == 1 - round(0.05 * 65536) / 65536
    torch.testing.assert_close(y[kept], x[kept] * (1 / drop.keep_probability), atol=0, rtol=0)


def test_gradient_is_mask_times_scale_and_seeded() -> None:
    drop = FastDropout(0.3).train()
    x = torch.randn(64, 96, requires_grad=True)
    torch.manual_seed(1)
    y = drop(x)
    y.sum().backward()
    mask = (y != 0).float()
    torch.testing.assert_close(x.grad, mask / drop.keep_probability)
    assert abs(mask.mean().item() - 0.7) < 0.03
    torch.manual_seed(1)
    assert torch.equal(drop(x.detach()) != 0, mask.bool())  # same seed, same mask
    torch.manual_seed(2)
    assert not torch.equal(drop(x.detach()) != 0, mask.bool())


def test_identity_in_eval_and_at_zero() -> None:
    x = torch.randn(8, 8)
    assert FastDropout(0.5).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


def test_swapped_into_peft_model_without_changing_the_adapter(tiny_model_dir: Path) -> None:
    model, _ = load_for_inference(str(tiny_model_dir), None, "fp32")
    model = add_lora(model, 8, 16, 0.05, "q_proj,v_proj")
    keys = sorted(model.state_dict())
    layers = model.get_base_model().config.num_hidden_layers
    assert use_fast_lora_dropout(model, autocast=True) == 2 * layers
    assert sorted(model.state_dict()) == keys  # the saved adapter is unchanged
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_dropout")]
    assert all(isinstance(m.lora_dropout["default"], FastDropout) for m in lora_layers)
    assert all(m.lora_dropout["default"].p == 0.05 for m in lora_layers)
    assert all(m.cast_input_dtype_enabled is False for m in lora_layers)
    # Under bf16 autocast the layer output equals the stock one in eval (no dropout either way).
    model.eval()
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(input_ids=ids).logits
        for m in lora_layers:
            m.cast_input_dtype_enabled = True
        stock = model(input_ids=ids).logits
    torch.testing.assert_close(ours, stock, atol=0, rtol=0)
