"""Streaming overhead: tokens/s of `stream_generate` vs plain `model.generate`, same prompt.

Both decode greedily exactly `--new_tokens` tokens (min_new_tokens = max_new_tokens, so
neither stops early); each is run `--repeats` times after one warm-up, and the median is
reported. The streamed text must equal the plain text (checked).

    python tools/bench_streaming.py --base_model MODEL [--lora_weights LORA] [--precision fp32]
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from chinese_vicuna.args import DecodingArguments, ModelArguments, parse_args
from chinese_vicuna.errors import exit_on_user_error
from chinese_vicuna.infer.engine import INSTRUCTION, Engine
from chinese_vicuna.infer.generation import stream_generate
from chinese_vicuna.model.build import load_from_args


def plain(model: Any, tokenizer: Any, ids: list[int], n: int) -> str:
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids], device=model.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True, clean_up_tokenization_spaces=False)


@exit_on_user_error
@dataclass
class StreamBenchArguments:
    instruction: str = field(default="用三句话介绍一下北京。", metadata={"help": "The alpaca instruction to answer."})
    new_tokens: int = field(default=128, metadata={"help": "Tokens per answer (exactly: EOS is held off)."})
    repeats: int = field(default=5, metadata={"help": "Timed runs of each kind (the median is reported)."})


def main(argv: list[str] | None = None) -> None:
    model_args, args = parse_args((ModelArguments, StreamBenchArguments), argv)
    model, tokenizer = load_from_args(model_args)
    ids = Engine.around(model, tokenizer, "alpaca", (), INSTRUCTION).instruction_ids(args.instruction)
    n = args.new_tokens
    decoding = DecodingArguments(max_new_tokens=n, min_new_tokens=n)
    # no stop strings: both runs must produce exactly n tokens
    plain(model, tokenizer, ids, n)
    "".join(stream_generate(model, tokenizer, ids, decoding))

    plain_s, stream_s, first_s = [], [], []
    reference = streamed = ""
    for _ in range(args.repeats):
        start = time.perf_counter()
        reference = plain(model, tokenizer, ids, n)
        plain_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        pieces = stream_generate(model, tokenizer, ids, decoding)
        first = next(pieces)
        first_s.append(time.perf_counter() - start)
        streamed = first + "".join(pieces)
        stream_s.append(time.perf_counter() - start)
    result = {
        "model": model_args.base_model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "precision": model_args.precision,
        "threads": torch.get_num_threads(),
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "plain_tokens_per_s": round(n / statistics.median(plain_s), 1),
        "stream_tokens_per_s": round(n / statistics.median(stream_s), 1),
        "overhead_percent": round(100 * (statistics.median(stream_s) / statistics.median(plain_s) - 1), 1),
        "stream_first_piece_s": round(statistics.median(first_s), 3),
        "same_text": streamed == reference,
    }
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
