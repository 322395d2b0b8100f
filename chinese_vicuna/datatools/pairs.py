"""Preference pairs from pairwise judging (tools/eval_judge.py --mode pairwise): for every
question whose two-order verdicts agree, the winner's answer is `chosen` and the loser's
`rejected`; ties, failed judgments and second turns are left out and counted."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError
from chinese_vicuna.evaluation.judge import load_judge_prompts, pair_jobs, pair_outcomes, read_judgments

logger = logging.getLogger(__name__)


def judge_of(records: Sequence[dict[str, Any]], path: Path) -> str:
    judges = sorted({str(r.get("judge")) for r in records if r.get("mode") == "pairwise"})
    if len(judges) != 1:
        found = ", ".join(judges) or "none"
        raise UserError(f"{path}: pairwise judgments by {found}; name one with --judge_model")
    return judges[0]


def pairs_from_judgments(
    questions: Sequence[dict[str, Any]],
    answers_a: dict[str, dict[Any, list[str]]],
    answers_b: dict[str, dict[Any, list[str]]],
    judgments: Path,
    judge_model: str | None = None,
) -> tuple[list[dict[str, Any]], Counter]:
    """TRL-style records `{"prompt", "chosen", "rejected", "question_id"}` and the counts of what was left out."""
    if len(answers_a) != 1 or len(answers_b) != 1:
        raise UserError("--answers and --answers_b must each hold one model's answers (one model_id)")
    (model_a, ans_a), (model_b, ans_b) = next(iter(answers_a.items())), next(iter(answers_b.items()))
    records = read_judgments(judgments)
    judge = judge_model or judge_of(records, judgments)
    jobs, _ = pair_jobs(questions, ans_a, ans_b, model_a, model_b, load_judge_prompts(None), None, judge)
    by_id = {q["question_id"]: q for q in questions}
    answers = {model_a: ans_a, model_b: ans_b}
    pairs, left_out = [], Counter()
    for outcome in pair_outcomes(records, jobs, model_a):
        qid, result = outcome["question_id"], outcome["result"]
        if outcome["turn"] != 1:
            left_out["second turns (the two answers follow different histories)"] += 1
        elif result in ("tie", "failed"):
            left_out["ties" if result == "tie" else "not judged or unparsable in either order"] += 1
        else:
            loser = model_b if result == model_a else model_a
            chosen, rejected = answers[result][qid][0], answers[loser][qid][0]
            if chosen.strip() == rejected.strip():
                left_out["identical answers"] += 1
                continue
            pairs.append({"prompt": by_id[qid]["turns"][0], "chosen": chosen, "rejected": rejected, "question_id": qid})
    return pairs, left_out
