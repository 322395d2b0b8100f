"""Batched answers for file mode (generate.py --data_file): length-sorted micro-batches, left padding.

Records are answered a window at a time (`window` = several micro-batches): inside a window the
prompts are sorted by length so each micro-batch pads little, and the window's answers are
written back in input order, so the output file stays resumable line by line (a kill loses at
most one window). Each micro-batch is one `model.generate` call with left padding and an
attention mask: a greedy answer is the same as the prompt generated alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteriaList

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.infer.generation import StopOnStrings, finish_text, model_device


@torch.inference_mode()
def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    decoding: DecodingArguments,
    stop_strings: Sequence[str] = (),
    strip: bool = False,
) -> list[str]:
    """Answers of several prompts (ids) in one `generate` call, left-padded."""
    decoding.validate()
    device = model_device(model)
    width = max(len(p) for p in prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    criteria = [StopOnStrings(tokenizer, width, stop_strings)] if decoding.num_beams == 1 else []
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        stopping_criteria=StoppingCriteriaList(criteria),
        **decoding.generate_kwargs(),
    )
    answers = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:  # a finished row is padded after its EOS
            row = row[: row.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        answers.append(finish_text(text, stop_strings, strip))
    return answers


def answer_in_batches(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    decoding: DecodingArguments,
    stop_strings: Sequence[str],
    strip: bool,
    batch_size: int,
    on_window: Callable[[int, list[str]], None],
    window_batches: int = 4,
) -> None:
    """Answer `prompts` in order, window by window; `on_window(start, answers)` gets each
    window's answers in input order (write them there)."""
    window = max(1, batch_size) * window_batches
    for start in range(0, len(prompts), window):
        chunk = list(prompts[start : start + window])
        order = sorted(range(len(chunk)), key=lambda i: len(chunk[i]))
        answers: list[str] = [""] * len(chunk)
        for b in range(0, len(order), max(1, batch_size)):
            rows = order[b : b + max(1, batch_size)]
            for i, text in zip(rows, generate_batch(model, tokenizer, [chunk[i] for i in rows], decoding, stop_strings, strip)):
                answers[i] = text
        on_window(start, answers)
