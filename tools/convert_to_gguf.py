"""A merged LLaMA-architecture HF model → one GGUF file for llama.cpp (CPU inference).

    python tools/convert_to_gguf.py --model_dir MERGED_DIR --outfile model-q4_0.gguf --outtype q4_0

The `gguf` package writes the file (architecture `llama`, the sentencepiece vocabulary of
tokenizer.model with its scores and token types, added tokens, special token ids, the q/k
rows permuted to llama.cpp's rotary layout); q8_0 / q4_0 / q4_k_m are made from the f16 file
by llama.cpp's own quantizer through llama-cpp-python (`pip install -r requirements-llamacpp.txt`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from chinese_vicuna.args import parse_args
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.export.gguf import OUTTYPES, convert


@dataclass
class GgufArguments:
    model_dir: str = field(metadata={"help": "Merged HF model folder (with tokenizer.model)."})
    outfile: str = field(metadata={"help": "The .gguf file to write."})
    outtype: str = field(default="f16", metadata={"help": "f32, f16, q8_0 or q4_0 (see OUTTYPES)."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((GgufArguments,), argv)
    if args.outtype not in OUTTYPES:
        raise UserError(f"--outtype {args.outtype!r}: use one of {', '.join(OUTTYPES)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert(args.model_dir, args.outfile, args.outtype)


if __name__ == "__main__":
    main()
