"""A merged LLaMA-architecture HF model → one GGUF file for llama.cpp (CPU inference).

    python tools/convert_to_gguf.py MERGED_DIR --outfile model-q4_0.gguf --outtype q4_0    # as llama.cpp's convert_hf_to_gguf.py
    python tools/convert_to_gguf.py --model_dir MERGED_DIR --outfile model-q4_0.gguf --outtype q4_0

The `gguf` package writes the file (architecture `llama`, the sentencepiece vocabulary of
tokenizer.model with its scores and token types, added tokens, special token ids, the q/k
rows permuted to llama.cpp's rotary layout); q8_0 / q4_0 / q4_k_m are made from the f16 file
by llama.cpp's own quantizer through llama-cpp-python (`pip install -r requirements-llamacpp.txt`).
With `--ollama_modelfile true`, an Ollama `Modelfile` (the model's template as TEMPLATE, its stop
strings, its default system prompt) is written beside the file: `ollama create NAME -f Modelfile`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chinese_vicuna.args import parse_args
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.export.gguf import OUTTYPES, convert
from chinese_vicuna.export.ollama import model_template, write_modelfile
from chinese_vicuna.logs import configure_logging


@dataclass
class GgufArguments:
    model_dir: str = field(metadata={"help": "Merged HF model folder (with tokenizer.model); also the first argument, without the flag."})
    outfile: str = field(metadata={"help": "The .gguf file to write."})
    outtype: str = field(default="f16", metadata={"help": "f32, f16, q8_0 or q4_0 (see OUTTYPES)."})
    ollama_modelfile: bool = field(
        default=False, metadata={"help": "Also write an Ollama Modelfile beside the .gguf (the model's prompt_template.json as TEMPLATE)."}
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((GgufArguments,), argv, positional="--model_dir")
    if args.outtype not in OUTTYPES:
        raise UserError(f"--outtype {args.outtype!r}: use one of {', '.join(OUTTYPES)}")
    configure_logging(plain=True)
    template = model_template(args.model_dir) if args.ollama_modelfile else None  # refused before converting
    out = convert(args.model_dir, args.outfile, args.outtype)
    if template is not None:
        write_modelfile(out, template)


if __name__ == "__main__":
    main()
