"""Print a model's answers to instructions before and after a LoRA, side by side.

python tools/compare_answers.py --base_model DIR --lora_weights DIR --data_path data.jsonl --num 4
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chinese_vicuna.data import read_records, validate_instruction
from chinese_vicuna.errors import exit_on_user_error
from chinese_vicuna.generation import generate_answer
from chinese_vicuna.modeling import load_lora, load_model_and_tokenizer
from chinese_vicuna.prompts import load_template


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", required=True)
    parser.add_argument("--lora_weights", required=True)
    parser.add_argument("--data_path", required=True, help="alpaca-format .json/.jsonl; the first --num records are asked")
    parser.add_argument("--num", type=int, default=4)
    parser.add_argument("--prompt_template", default="alpaca")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    records = [validate_instruction(r) for r in read_records(args.data_path)[: args.num]]
    model, tokenizer = load_model_and_tokenizer(args.base_model, "fp32")
    template = load_template(args.prompt_template, tokenizer)
    before = [generate_answer(model, tokenizer, template, r["instruction"], r["input"], args.max_new_tokens) for r in records]
    model = load_lora(model, args.lora_weights)
    model.eval()
    after = [generate_answer(model, tokenizer, template, r["instruction"], r["input"], args.max_new_tokens) for r in records]
    for r, b, a in zip(records, before, after, strict=True):
        print(f"### {r['instruction']}")
        print(f"  expected: {r['output']}")
        print(f"  before:   {b[:80]!r}")
        print(f"  after:    {a!r}  {'✓' if a == r['output'] else '✗'}")


if __name__ == "__main__":
    main()
