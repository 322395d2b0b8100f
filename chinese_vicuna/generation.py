"""Text generation shared by the inference scripts."""

from __future__ import annotations

from typing import Any

import torch

from chinese_vicuna.data import encode_segments
from chinese_vicuna.prompts import PromptTemplate


def prompt_ids(tokenizer: Any, template: PromptTemplate, instruction: str, input: str = "") -> list[int]:
    """The ids the model saw before its answer in training: `[bos] + prompt` segments."""
    ids, _ = encode_segments(tokenizer, template.instruction_segments(instruction, input))
    return ids


@torch.inference_mode()
def generate_answer(
    model: Any,
    tokenizer: Any,
    template: PromptTemplate,
    instruction: str,
    input: str = "",
    max_new_tokens: int = 256,
    **decoding: Any,
) -> str:
    """One answer, not streamed; greedy unless `decoding` says otherwise."""
    ids = prompt_ids(tokenizer, template, instruction, input)
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=decoding.pop("do_sample", False),
        **decoding,
    )
    text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    for stop in template.stop_strings:
        if stop in text:
            text = text.split(stop, 1)[0]
    return text.strip() if template.is_chat else text
