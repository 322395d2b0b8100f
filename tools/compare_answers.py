"""Print a model's answers to instructions before and after a LoRA, side by side.

python tools/compare_answers.py --base_model DIR --lora_weights DIR --data_path data.jsonl --num 4
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from chinese_vicuna.args import DecodingArguments, ModelArguments, TemplateArguments, parse_args
from chinese_vicuna.data.records import read_records, validate_instruction
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.infer.engine import INSTRUCTION, Engine
from chinese_vicuna.model.adapters import load_lora
from chinese_vicuna.model.build import load_for_inference


@dataclass
class CompareArguments:
    data_path: str = field(metadata={"help": "Alpaca-format .json/.jsonl; the first --num records are asked."})
    num: int = field(default=4, metadata={"help": "How many records to ask."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens per answer (greedy)."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    model_args, template_args, args = parse_args((ModelArguments, TemplateArguments, CompareArguments), argv)
    logging.basicConfig(level=logging.WARNING)
    if not model_args.lora_weights:
        raise UserError("--lora_weights is required: the adapter whose answers are compared with the base's")

    records = [validate_instruction(r) for r in read_records(args.data_path)[: args.num]]
    model, tokenizer = load_for_inference(model_args.base_model, None, model_args.precision, tokenizer_path=model_args.tokenizer_path)
    engine = Engine.around(model, tokenizer, template_args.prompt_template, [model_args.lora_weights, model_args.base_model], INSTRUCTION)
    greedy = DecodingArguments(max_new_tokens=args.max_new_tokens)
    prompts = [engine.instruction_ids(r["instruction"], r["input"]) for r in records]
    before = [engine.answer(ids, greedy) for ids in prompts]
    tuned = Engine.for_model(load_lora(model, model_args.lora_weights).eval(), tokenizer, engine.template)
    after = [tuned.answer(ids, greedy) for ids in prompts]
    for r, b, a in zip(records, before, after, strict=True):
        print(f"### {r['instruction']}")
        print(f"  expected: {r['output']}")
        print(f"  before:   {b[:80]!r}")
        print(f"  after:    {a!r}  {'✓' if a == r['output'] else '✗'}")


if __name__ == "__main__":
    main()
