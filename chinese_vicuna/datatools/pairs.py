"""Preference pairs for finetune_dpo.py, two ways:

- from pairwise judging (tools/eval_judge.py --mode pairwise): for every question whose two-order
  verdicts agree, the winner's answer is `chosen` and the loser's `rejected`; ties, failed
  judgments and second turns are left out and counted;
- sampled (RLAIF): K answers per prompt from a model, a judge endpoint picks the best, which is
  `chosen` against each other distinct answer; resumable (one progress line per judged prompt)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
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


# ---------------------------------------------------------------- sampled answers, a judge picks (RLAIF)

PICK_PROMPT = (
    "Below are {k} answers to the same question. Pick the single best answer: the most helpful, correct and "
    'relevant one. Reply with its number in double brackets, e.g. "[[1]]", and nothing else.\n\n'
    "[Question]\n{question}\n\n{answers}"
)


def pick_messages(question: str, answers: Sequence[str]) -> list[dict[str, str]]:
    listed = "\n\n".join(f"[Answer {i}]\n{a}" for i, a in enumerate(answers, start=1))
    return [{"role": "user", "content": PICK_PROMPT.format(k=len(answers), question=question, answers=listed)}]


def parse_pick(reply: str, k: int) -> int | None:
    """The 0-based index the judge picked ("[[n]]", 1 ≤ n ≤ k), or None."""
    found = re.findall(r"\[\[(\d+)\]\]", reply)
    return int(found[-1]) - 1 if found and 1 <= int(found[-1]) <= k else None


def read_progress(path: Path) -> dict[str, dict[str, Any]]:
    """The prompts judged so far (a line per prompt); a torn last line (a killed run) is cut off."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as f:
            f.truncate(len(data))
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return {row["prompt"]: row for row in rows}


def append_progress(path: Path, row: dict[str, Any]) -> None:
    """One judged prompt, on disk before the next request: a rerun after a kill never asks twice."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def sample_and_judge(
    prompts: Sequence[str],
    sample: Callable[[str], list[str]],
    judge: Callable[[list[dict[str, str]]], str],
    progress: Path,
) -> tuple[list[dict[str, Any]], Counter]:
    """For each prompt: K sampled answers, the judge's pick; pairs = the pick (chosen) against each
    other distinct answer (rejected). Progress is kept in `progress`; a rerun continues it."""
    done = read_progress(progress)
    for prompt in prompts:
        if prompt in done:
            continue
        answers = sample(prompt)
        distinct = list(dict.fromkeys(a for a in answers if a.strip()))
        reply = judge(pick_messages(prompt, distinct)) if len(distinct) > 1 else ""
        row = {"prompt": prompt, "answers": distinct, "best": parse_pick(reply, len(distinct)) if reply else None, "judged": bool(reply)}
        append_progress(progress, row)
        done[prompt] = row
    pairs, left_out = [], Counter()
    for prompt in prompts:
        row = done[prompt]
        if not row["judged"]:
            left_out["prompts with fewer than two distinct answers"] += 1
        elif row["best"] is None:
            left_out["judge replies without a valid [[n]]"] += 1
        else:
            best = row["answers"][row["best"]]
            pairs += [{"prompt": prompt, "chosen": best, "rejected": other} for i, other in enumerate(row["answers"]) if i != row["best"]]
    return pairs, left_out
