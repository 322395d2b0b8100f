"""Preference pairs from pairwise judging: winner → chosen, loser → rejected.

    python tools/eval_judge.py --mode pairwise --questions Q --answers A --answers_b B --output_dir J ...
    python tools/make_pairs.py --questions Q --answers A --answers_b B --judgments J/judgments.jsonl --output pairs.jsonl

Ties (verdicts that disagree between the two orders count as ties), failed judgments and second
turns are left out, each with its count. The output is TRL-style `{"prompt", "chosen", "rejected"}`
records that finetune_dpo.py reads (docs/preference.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from chinese_vicuna.args import parse_args
from chinese_vicuna.datatools.pairs import pairs_from_judgments
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.evaluation.judge import read_answers, read_questions
from chinese_vicuna.files import atomic_write_text

logger = logging.getLogger("make_pairs")


@dataclass
class MakePairsArguments:
    questions: str = field(default="", metadata={"help": "MT-bench-style question file the answers were judged on."})
    answers: str = field(default="", metadata={"help": "The first model's FastChat answer file (eval_judge --answers)."})
    answers_b: str = field(default="", metadata={"help": "The second model's answer file (eval_judge --answers_b)."})
    judgments: str = field(default="", metadata={"help": "eval_judge's judgments.jsonl (--mode pairwise)."})
    judge_model: str | None = field(default=None, metadata={"help": "Whose judgments to use, when the file holds several judges'."})
    output: str = field(default="pairs.jsonl", metadata={"help": "Preference records to write (.jsonl)."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((MakePairsArguments,), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    missing = [f"--{name}" for name in ("questions", "answers", "answers_b", "judgments") if not getattr(args, name)]
    if missing:
        raise UserError(f"give {', '.join(missing)} (the files eval_judge --mode pairwise was run on, and its judgments.jsonl)")
    if not Path(args.judgments).is_file():
        raise UserError(f"--judgments {args.judgments}: file not found (eval_judge writes OUTPUT_DIR/judgments.jsonl)")
    pairs, left_out = pairs_from_judgments(
        read_questions(args.questions), read_answers(args.answers), read_answers(args.answers_b), Path(args.judgments), args.judge_model
    )  # fmt: skip
    atomic_write_text(args.output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    counts = "; ".join(f"{n} {what}" for what, n in sorted(left_out.items())) or "none"
    logger.info("%d pairs written to %s; left out: %s", len(pairs), args.output, counts)


if __name__ == "__main__":
    main()
