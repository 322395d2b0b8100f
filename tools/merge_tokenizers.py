"""Merge a Chinese sentencepiece model into a base LLaMA tokenizer (vocabulary expansion).

    python tools/merge_tokenizers.py --base_tokenizer BASE_MODEL_DIR \
        --chinese_sp_model zh_sp.model --output_dir merged_tokenizer [--test_text sample/pretrain/zh_4.txt]

The Chinese model's pieces that the base lacks are appended after the base's pieces (every
old piece keeps its id); the base's normalizer and special pieces are kept. Writes
`tokenizer.model` and a Hugging Face tokenizer folder, checks that the HF tokenizer gives
sentencepiece's ids, and prints the pieces added and tokens per Chinese character before
and after. Then resize the model: tools/pretrain.py does it (new rows = mean of old rows).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from chinese_vicuna.args import parse_args
from chinese_vicuna.data.records import read_text_lines
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.model.vocab import (
    merge_sentencepiece_models,
    sp_hf_mismatches,
    sp_model_path,
    tokens_per_chinese_char,
    write_hf_tokenizer,
)

logger = logging.getLogger("merge_tokenizers")


@dataclass
class MergeTokenizersArguments:
    base_tokenizer: str = field(metadata={"help": "The base model's folder (with tokenizer.model) or a tokenizer.model file."})
    chinese_sp_model: str = field(metadata={"help": "A sentencepiece .model (tools/train_tokenizer.py)."})
    output_dir: str = field(metadata={"help": "Where the merged tokenizer folder goes."})
    test_text: list[str] | None = field(default=None, metadata={"help": "Chinese text files for the tokens-per-character figures."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((MergeTokenizersArguments,), argv)
    configure_logging(plain=True)
    import sentencepiece as spm

    base_path = sp_model_path(args.base_tokenizer)
    zh_path = Path(args.chinese_sp_model)
    if not zh_path.is_file():
        raise UserError(f"--chinese_sp_model {zh_path}: file not found (train one with tools/train_tokenizer.py)")
    result = merge_sentencepiece_models(base_path.read_bytes(), zh_path.read_bytes(), str(base_path), str(zh_path))
    like = args.base_tokenizer if Path(args.base_tokenizer).is_dir() else None
    tokenizer = write_hf_tokenizer(result.model, args.output_dir, like=like)

    # The converted HF tokenizer must give sentencepiece's ids, or training and GGUF/llama.cpp disagree.
    texts = read_text_lines(args.test_text) if args.test_text else []
    probe = [*texts[:200], "中文与English混排，标点：「」（）！？", "数字123和456。", "茶叶 tea 茶"]
    bad = sp_hf_mismatches(result.model, tokenizer, probe)
    if bad:
        raise UserError(f"{args.output_dir}: the Hugging Face tokenizer's ids differ from sentencepiece's on {bad[0]!r}; report this")
    if len(tokenizer) != result.size:
        raise UserError(f"{args.output_dir}: the HF tokenizer has {len(tokenizer)} tokens but tokenizer.model has {result.size} pieces")

    report = {"base_pieces": result.base_size, "added_pieces": len(result.added), "merged_pieces": result.size}
    if texts:
        text = "\n".join(texts)
        before = spm.SentencePieceProcessor(model_file=str(base_path))
        after = spm.SentencePieceProcessor(model_proto=result.model)
        report["tokens_per_chinese_char_before"] = round(tokens_per_chinese_char(before.encode, text), 4)
        report["tokens_per_chinese_char_after"] = round(tokens_per_chinese_char(after.encode, text), 4)
    logger.info(
        "%s: %d base pieces + %d new = %d (first new: %s)",
        args.output_dir,
        result.base_size,
        len(result.added),
        result.size,
        " ".join(result.added[:10]),
    )
    print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    main()
