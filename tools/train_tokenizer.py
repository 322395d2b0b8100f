"""Train a Chinese sentencepiece model (BPE, byte fallback) from text files.

    python tools/train_tokenizer.py --input sample/pretrain/*.txt --model_prefix zh_sp --vocab_size 2500

Writes `P.model` (and `P.vocab`, one `piece<TAB>score` per line), ready for
tools/merge_tokenizers.py. Options that decide how text is cut follow LLaMA's tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from chinese_vicuna.args import parse_args
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.files import atomic_write_bytes
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.model.vocab import load_model_proto, train_sentencepiece_model

logger = logging.getLogger("train_tokenizer")


@dataclass
class TrainTokenizerArguments:
    input: list[str] = field(metadata={"help": "UTF-8 text files (one sentence or paragraph per line)."})
    model_prefix: str = field(metadata={"help": "Output path prefix: writes PREFIX.model and PREFIX.vocab."})
    vocab_size: int = field(default=20000, metadata={"help": "Pieces to learn (Chinese-LLaMA used 20000)."})
    character_coverage: float = field(default=0.9995, metadata={"help": "Share of characters kept as pieces; rarer ones use bytes."})
    num_threads: int = field(default=1, metadata={"help": "Training threads (1 = reproducible)."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((TrainTokenizerArguments,), argv)
    configure_logging(plain=True)
    if args.vocab_size < 300:
        raise UserError(f"--vocab_size {args.vocab_size} is too small: 256 byte pieces and 3 special pieces come first")

    model = train_sentencepiece_model(args.input, args.vocab_size, args.character_coverage, num_threads=args.num_threads)
    proto = load_model_proto(model, args.model_prefix + ".model")
    atomic_write_bytes(args.model_prefix + ".model", model)
    vocab = "".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces)
    atomic_write_bytes(args.model_prefix + ".vocab", vocab.encode("utf-8"))
    logger.info("wrote %s.model: %d pieces from %d files", args.model_prefix, len(proto.pieces), len(args.input))


if __name__ == "__main__":
    main()
