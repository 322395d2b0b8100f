"""Convert instruction / chat data between formats: alpaca, BELLE (incl. multi-turn Human:/Assistant:
text), Guanaco, Chinese-Vicuna chat, ShareGPT, OpenAI messages, role/text → alpaca, sharegpt or openai.

    python tools/convert_data.py --input sharegpt.json --output chat.jsonl --to openai \\
        --html_to_markdown true --split_to_tokens 2048 --base_model ./llama-7b-hf

The output is what finetune.py (alpaca) and finetune_chat.py (sharegpt, openai) read as is.
Counts of what was converted, split and dropped (and why) are printed as JSON. See docs/data.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from chinese_vicuna.args import BaseModelArguments, ChatTemplateArguments, parse_args
from chinese_vicuna.datatools.formats_convert import TARGETS, Splitter, convert_file
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.outputlock import hold_output_folder


@dataclass
class ConvertArguments:
    input: str = field(metadata={"help": "Data in any supported format (per record): .json/.jsonl/.parquet/.csv/.arrow, or a hub dataset."})
    output: str = field(metadata={"help": "Output file: .jsonl (JSON lines) or .json (a list)."})
    to: str = field(metadata={"help": "alpaca, sharegpt or openai."})
    html_to_markdown: bool = field(default=False, metadata={"help": "Turn HTML messages (ShareGPT) into markdown."})
    split_to_tokens: int | None = field(
        default=None, metadata={"help": "Split conversations longer than this many tokens at turn boundaries (needs --base_model)."}
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    # --base_model: whose tokenizer counts tokens for --split_to_tokens; --prompt_template: the chat template they render with
    args, base, template_args = parse_args((ConvertArguments, BaseModelArguments, ChatTemplateArguments), argv)
    configure_logging()
    if args.to not in TARGETS:
        raise UserError(f"--to {args.to}: use one of {', '.join(TARGETS)}")
    splitter = None
    if args.split_to_tokens is not None:
        if not base.base_model:
            raise UserError("--split_to_tokens counts tokens with a tokenizer: add --base_model MODEL_DIR")
        if args.split_to_tokens < 8:
            raise UserError(f"--split_to_tokens {args.split_to_tokens}: too small for one round; use the training --cutoff_len")
        from chinese_vicuna.model.loading import load_tokenizer
        from chinese_vicuna.prompts import load_template

        tokenizer = load_tokenizer(base.base_model)
        splitter = Splitter(tokenizer, load_template(template_args.template_or_fallback, tokenizer), args.split_to_tokens)
    hold_output_folder(args.output, "--output")
    stats = convert_file(args.input, args.output, args.to, args.html_to_markdown, splitter)
    print(json.dumps(stats.as_dict(), ensure_ascii=False))


if __name__ == "__main__":
    main()
