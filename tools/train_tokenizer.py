"""Train a Chinese sentencepiece model (BPE, byte fallback) from text files.

    python tools/train_tokenizer.py --input sample/pretrain/*.txt --model_prefix zh_sp --vocab_size 2500

Writes `P.model` (and `P.vocab`, one `piece<TAB>score` per line), ready for
tools/merge_tokenizers.py. Options that decide how text is cut follow LLaMA's tokenizer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.files import atomic_write_bytes
from chinese_vicuna.vocab import load_model_proto, train_sentencepiece_model

logger = logging.getLogger("train_tokenizer")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="UTF-8 text files (one sentence or paragraph per line)")
    parser.add_argument("--model_prefix", required=True, help="output path prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab_size", type=int, default=20000, help="pieces to learn (Chinese-LLaMA used 20000)")
    parser.add_argument("--character_coverage", type=float, default=0.9995, help="share of characters kept as pieces; rarer ones use bytes")
    parser.add_argument("--num_threads", type=int, default=1, help="training threads (1 = reproducible)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
