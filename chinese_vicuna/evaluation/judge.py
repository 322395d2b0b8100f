"""MT-bench-style LLM judging: prompts, verdict parsing, the judging loop and aggregation.

The reference is MT-bench's published protocol (FastChat `fastchat/llm_judge`): a judge model
grades one answer 1-10 (`[[rating]]`, single mode) or picks the better of two (`[[A]]`, `[[B]]`,
`[[C]]` for a tie, pairwise mode); math, reasoning and coding questions are judged against a
reference answer; the second turn is judged with the whole two-turn conversation in view.
FastChat's `judge_prompts.jsonl` can be given as is; the built-in prompts use the same framing
and placeholders, in our own words, and tell the judge that questions may be Chinese and that an
answer in a language other than the question's is worse.

Pairwise: every question is judged in both orders (A/B, then B/A); two verdicts that disagree
are a tie, which cancels a judge's position bias. An unparseable judgment counts as failed and
is left out of averages and win rates.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError

logger = logging.getLogger(__name__)

NEED_REF_CATEGORIES = ("math", "reasoning", "coding")
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str  # single | pairwise
    system_prompt: str
    prompt_template: str


# --------------------------------------------------------------------------------------------
# Built-in prompts (MT-bench framing; FastChat placeholders)
# --------------------------------------------------------------------------------------------
_LANG = (
    " The question may be in Chinese; an answer should be in the language of the question, and an answer in"
    " another language, or one that mixes languages without reason, is worse."
)
_FAIR = (
    " Do not let the order in which the answers are shown, their length, or the assistants' names influence"
    " you, and be as objective as possible."
)
_RATE = ' Give a short explanation first, then rate the answer from 1 to 10 in exactly this format: "[[rating]]", e.g. "Rating: [[6]]".'
_PICK = (
    ' Give a short explanation first, then your verdict in exactly this format: "[[A]]" if assistant A is better,'
    ' "[[B]]" if assistant B is better, "[[C]]" for a tie.'
)
_GENERAL = "helpfulness, relevance, accuracy, depth, creativity and level of detail"
_ANSWER = "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
_REF = "[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]"
_PAIR = (
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)


def _conversation(who: str, answer_key: str) -> str:
    return (
        f"<|The Start of {who}'s Conversation with User|>\n\n### User:\n{{question_1}}\n\n### {who}:\n{{{answer_key}_1}}\n\n"
        f"### User:\n{{question_2}}\n\n### {who}:\n{{{answer_key}_2}}\n\n<|The End of {who}'s Conversation with User|>"
    )


_REF_CONVERSATION = (
    "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
    "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>"
)


def _single(name: str, instruction: str, template: str) -> JudgePrompt:
    return JudgePrompt(
        name, "single", "You are a careful, impartial judge of AI assistants' answers.", f"[Instruction]\n{instruction}\n\n{template}"
    )


BUILTIN_PROMPTS: dict[str, JudgePrompt] = {
    "single": _single(
        "single",
        f"Judge how well the AI assistant's answer below responds to the user's question, considering {_GENERAL}.{_LANG}{_RATE}",
        f"[Question]\n{{question}}\n\n{_ANSWER}",
    ),
    "single-ref": _single(
        "single-ref",
        "Judge the AI assistant's answer below for correctness and helpfulness. Compare it with the reference answer and "
        f"point out every mistake.{_LANG}{_RATE}",
        f"[Question]\n{{question}}\n\n{_REF}\n\n{_ANSWER}",
    ),
    "single-multi": JudgePrompt(
        "single-multi",
        "single",
        f"Judge the AI assistant's answer to the user's second question in the conversation below, considering {_GENERAL}.{_LANG}{_RATE}\n\n",
        _conversation("Assistant A", "answer"),
    ),
    "single-ref-multi": JudgePrompt(
        "single-ref-multi",
        "single",
        "Judge the AI assistant's answer to the user's second question for correctness and helpfulness. Compare it with the "
        f"reference answers and point out every mistake.{_LANG}{_RATE}\n\n",
        f"{_REF_CONVERSATION}\n\n\n{_conversation('Assistant A', 'answer')}",
    ),
    "pair": JudgePrompt(
        "pair",
        "pairwise",
        f"Judge which of two AI assistants answers the user's question below better, considering {_GENERAL}.{_FAIR}{_LANG}{_PICK}",
        f"[User Question]\n{{question}}\n\n{_PAIR}",
    ),
    "pair-ref": JudgePrompt(
        "pair-ref",
        "pairwise",
        "Judge which of two AI assistants answers the user's question below more correctly and helpfully. Compare both "
        f"with the reference answer and point out every mistake.{_FAIR}{_LANG}{_PICK}",
        f"[User Question]\n{{question}}\n\n{_REF}\n\n{_PAIR}",
    ),
    "pair-multi": JudgePrompt(
        "pair-multi",
        "pairwise",
        f"Judge which of two AI assistants answers the user's second question better, considering {_GENERAL}.{_FAIR}{_LANG}{_PICK}",
        f"{_conversation('Assistant A', 'answer_a')}\n\n\n{_conversation('Assistant B', 'answer_b')}",
    ),
    "pair-ref-multi": JudgePrompt(
        "pair-ref-multi",
        "pairwise",
        "Judge which of two AI assistants answers the user's second question more correctly and helpfully. Compare both "
        f"with the reference answers and point out every mistake.{_FAIR}{_LANG}{_PICK}",
        f"{_REF_CONVERSATION}\n\n\n{_conversation('Assistant A', 'answer_a')}\n\n\n{_conversation('Assistant B', 'answer_b')}",
    ),
}
# FastChat judge_prompts.jsonl names → our roles
FASTCHAT_NAMES = {
    "single-v1": "single",
    "single-math-v1": "single-ref",
    "single-v1-multi-turn": "single-multi",
    "single-math-v1-multi-turn": "single-ref-multi",
    "pair-v2": "pair",
    "pair-math-v1": "pair-ref",
    "pair-v2-multi-turn": "pair-multi",
    "pair-math-v1-multi-turn": "pair-ref-multi",
}


def load_judge_prompts(path: str | Path | None) -> dict[str, JudgePrompt]:
    """The built-in prompts, with those named in a FastChat-format `judge_prompts.jsonl` in their place."""
    prompts = dict(BUILTIN_PROMPTS)
    if not path:
        return prompts
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--judge_prompts {path}: no such file (FastChat's fastchat/llm_judge/data/judge_prompts.jsonl)")
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            spec = json.loads(line)
            role = FASTCHAT_NAMES.get(spec["name"], spec["name"])
            prompt = JudgePrompt(role, spec["type"], spec["system_prompt"], spec["prompt_template"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{path} line {n}: not a judge prompt with name/type/system_prompt/prompt_template ({exc})") from None
        if role in prompts:
            prompts[role] = prompt
    return prompts


def prompt_role(mode: str, turn: int, with_reference: bool) -> str:
    role = "single" if mode == "single" else "pair"
    return role + ("-ref" if with_reference else "") + ("-multi" if turn == 2 else "")


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------
def parse_rating(judgment: str) -> float | None:
    """`[[n]]` as MT-bench parses it, `[n]` as its one fallback; None when there is neither."""
    match = RATING.search(judgment) or RATING_FALLBACK.search(judgment)
    return float(ast.literal_eval(match.group(1))) if match else None


def parse_verdict(judgment: str) -> str | None:
    """`A`, `B` or `tie` (`[[C]]`), checked in that order as MT-bench does; None when there is none."""
    if "[[A]]" in judgment:
        return "A"
    if "[[B]]" in judgment:
        return "B"
    if "[[C]]" in judgment:
        return "tie"
    return None


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path, what: str) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what} file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {n}: not JSON ({exc.msg})") from None
    return rows


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """MT-bench questions: `question_id`, `category`, `turns` (1 or 2 strings), optional `reference`."""
    questions = read_jsonl(path, "question")
    seen = set()
    for n, q in enumerate(questions, start=1):
        turns = q.get("turns")
        if "question_id" not in q or not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise UserError(f"{path} record {n}: an MT-bench question needs question_id and turns (a list of strings)")
        if q["question_id"] in seen:
            raise UserError(f"{path} record {n}: question_id {q['question_id']!r} repeats")
        seen.add(q["question_id"])
        q.setdefault("category", "general")
    if not questions:
        raise UserError(f"{path}: no questions")
    return questions


def read_answers(path: str | Path) -> dict[str, dict[Any, list[str]]]:
    """FastChat answer records → {model_id: {question_id: turns of the first choice}}."""
    answers: dict[str, dict[Any, list[str]]] = {}
    for n, rec in enumerate(read_jsonl(path, "answer"), start=1):
        try:
            turns = rec["choices"][0]["turns"]
            answers.setdefault(str(rec["model_id"]), {})[rec["question_id"]] = [str(t) for t in turns]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{path} record {n}: a FastChat answer needs question_id, model_id and choices[0].turns") from None
    if not answers:
        raise UserError(f"{path}: no answers")
    return answers


def reference_turns(question: dict[str, Any], references: dict[Any, list[str]] | None) -> list[str] | None:
    """The reference answer of a math/reasoning/coding question: a reference answer file first, then the question's own."""
    if question["category"] not in NEED_REF_CATEGORIES:
        return None
    if references and question["question_id"] in references:
        return references[question["question_id"]]
    return question.get("reference")


# --------------------------------------------------------------------------------------------
# Judge messages
# --------------------------------------------------------------------------------------------
def _ref_values(ref: list[str] | None, turn: int) -> dict[str, str]:
    if not ref:
        return {}
    return {"ref_answer_1": ref[0]} if turn == 1 else {"ref_answer_1": ref[0], "ref_answer_2": ref[1] if len(ref) > 1 else ""}


def single_messages(
    prompt: JudgePrompt, question: dict[str, Any], answer: list[str], turn: int, ref: list[str] | None
) -> list[dict[str, str]]:
    """Chat messages asking the judge to rate `answer` at `turn` (1 or 2)."""
    q = question["turns"]
    if turn == 1:
        values = {"question": q[0], "answer": answer[0]}
    else:
        values = {"question_1": q[0], "question_2": q[1], "answer_1": answer[0], "answer_2": answer[1]}
    return _messages(prompt, {**values, **_ref_values(ref, turn)})


def pair_messages(
    prompt: JudgePrompt, question: dict[str, Any], answer_a: list[str], answer_b: list[str], turn: int, ref: list[str] | None
) -> list[dict[str, str]]:
    """Chat messages asking the judge which of two answers (shown as A, then B) is better at `turn`."""
    q = question["turns"]
    if turn == 1:
        values = {"question": q[0], "answer_a": answer_a[0], "answer_b": answer_b[0]}
    else:
        values = {"question_1": q[0], "question_2": q[1], "answer_a_1": answer_a[0], "answer_a_2": answer_a[1]}
        values.update(answer_b_1=answer_b[0], answer_b_2=answer_b[1])
    return _messages(prompt, {**values, **_ref_values(ref, turn)})


def _messages(prompt: JudgePrompt, values: dict[str, str]) -> list[dict[str, str]]:
    try:
        user = prompt.prompt_template.format(**values)
    except (KeyError, IndexError) as exc:
        raise UserError(f"judge prompt {prompt.name!r} uses placeholder {exc} that this question has no value for") from None
    messages = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
    return [*messages, {"role": "user", "content": user}]


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------
@dataclass
class JudgeJob:
    """One request to the judge; `key` identifies it in judgments.jsonl (resume)."""

    key: dict[str, Any]
    prompt: str
    messages: list[dict[str, str]]
    category: str

    def record(self, judgment: str, judge_model: str) -> dict[str, Any]:
        rec = {
            **self.key,
            "category": self.category,
            "judge": judge_model,
            "prompt": self.prompt,
            "judgment": judgment,
            "tstamp": time.time(),
        }
        if self.key["mode"] == "single":
            rec["score"] = parse_rating(judgment)
        else:
            rec["verdict"] = parse_verdict(judgment)
        return rec


def job_id(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, ensure_ascii=False)


def _judged_turns(question: dict[str, Any], *answers: list[str]) -> list[int]:
    """Turn 1, and turn 2 where the question and every answer have a second turn (MT-bench judges two turns)."""
    n = min(len(question["turns"]), *(len(a) for a in answers))
    return [1, 2] if n >= 2 else [1]


def single_jobs(
    questions: Sequence[dict[str, Any]],
    answers: dict[Any, list[str]],
    model_id: str,
    prompts: dict[str, JudgePrompt],
    references: dict | None,
    judge_model: str,
) -> tuple[list[JudgeJob], int]:
    """The single-grade requests for one model, and how many questions it has no answer for."""
    jobs, missing = [], 0
    for q in questions:
        answer = answers.get(q["question_id"])
        if answer is None:
            missing += 1
            continue
        ref = reference_turns(q, references)
        for turn in _judged_turns(q, answer):
            prompt = prompts[prompt_role("single", turn, bool(ref))]
            key = {"mode": "single", "question_id": q["question_id"], "turn": turn, "model": model_id, "judge": judge_model}
            jobs.append(JudgeJob(key, prompt.name, single_messages(prompt, q, answer, turn, ref), q["category"]))
    return jobs, missing


def pair_jobs(
    questions: Sequence[dict[str, Any]],
    answers_a: dict[Any, list[str]],
    answers_b: dict[Any, list[str]],
    model_a: str,
    model_b: str,
    prompts: dict[str, JudgePrompt],
    references: dict | None,
    judge_model: str,
) -> tuple[list[JudgeJob], int]:
    """Pairwise requests, each question and turn in both orders; and how many questions lack an answer."""
    jobs, missing = [], 0
    for q in questions:
        qid = q["question_id"]
        if qid not in answers_a or qid not in answers_b:
            missing += 1
            continue
        ref = reference_turns(q, references)
        for turn in _judged_turns(q, answers_a[qid], answers_b[qid]):
            prompt = prompts[prompt_role("pairwise", turn, bool(ref))]
            for first, second, ans1, ans2 in (
                (model_a, model_b, answers_a[qid], answers_b[qid]),
                (model_b, model_a, answers_b[qid], answers_a[qid]),
            ):
                key = {"mode": "pairwise", "question_id": qid, "turn": turn, "model_1": first, "model_2": second, "judge": judge_model}
                jobs.append(JudgeJob(key, prompt.name, pair_messages(prompt, q, ans1, ans2, turn, ref), q["category"]))
    return jobs, missing


def read_judgments(path: Path) -> list[dict[str, Any]]:
    """judgments.jsonl so far; a torn last line (a killed run) is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line.strip()]


def run_jobs(
    jobs: Sequence[JudgeJob],
    ask: Callable[[list[dict[str, str]]], str],
    judge_model: str,
    out_path: Path,
    parallel: int = 4,
    progress: bool = True,
) -> tuple[int, int]:
    """Judge the jobs not yet in `out_path`, `parallel` requests at a time, appending each judgment
    as one whole line as it arrives. Returns (judged now, requests that failed after retries)."""
    from tqdm.auto import tqdm

    if parallel < 1:
        raise UserError(f"--parallel {parallel}: must be at least 1")
    keys = list(jobs[0].key) if jobs else []
    done = {job_id({k: r.get(k) for k in keys}) for r in read_judgments(out_path)}
    todo = [job for job in jobs if job_id(job.key) not in done]
    if len(todo) < len(jobs):
        logger.info("%d of %d judgments already in %s", len(jobs) - len(todo), len(jobs), out_path)
    judged = errors = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a", encoding="utf-8") as f, ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(ask, job.messages): job for job in todo}
        for future in tqdm(as_completed(futures), total=len(futures), desc="judging", disable=not progress):
            job = futures[future]
            try:
                judgment = future.result()
            except Exception as exc:  # the client already retried 429/5xx with backoff
                errors += 1
                logger.error(
                    "question %s turn %s: the judge request failed (%s: %s)",
                    job.key["question_id"],
                    job.key["turn"],
                    type(exc).__name__,
                    exc,
                )
                continue
            f.write(json.dumps(job.record(judgment, judge_model), ensure_ascii=False) + "\n")
            f.flush()
            judged += 1
    if errors:
        logger.error("%d judge requests failed; rerun the same command to retry them (the rest is kept)", errors)
    return judged, errors


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------
def _select(records: Iterable[dict[str, Any]], jobs: Sequence[JudgeJob]) -> list[dict[str, Any]]:
    wanted = {job_id(job.key) for job in jobs}
    keys = list(jobs[0].key) if jobs else []
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        k = job_id({key: r.get(key) for key in keys})
        if k in wanted:
            latest[k] = r
    return list(latest.values())


def single_results(records: Iterable[dict[str, Any]], jobs: Sequence[JudgeJob]) -> dict[str, dict[str, Any]]:
    """{model_id: {"score": mean rating, "judged": n, "failed": k}}; failed = unparseable judgments
    plus requests that got no judgment (errors after retries)."""
    results: dict[str, dict[str, Any]] = {}
    expected: dict[str, int] = {}
    for job in jobs:
        expected[job.key["model"]] = expected.get(job.key["model"], 0) + 1
    scores: dict[str, list[float]] = {m: [] for m in expected}
    for r in _select(records, jobs):
        if r["score"] is not None:
            scores[r["model"]].append(float(r["score"]))
    for model, n in expected.items():
        judged = len(scores[model])
        results[model] = {"score": sum(scores[model]) / judged if judged else None, "judged": judged, "failed": n - judged}
    return results


def pair_outcomes(records: Iterable[dict[str, Any]], jobs: Sequence[JudgeJob], model_a: str) -> list[dict[str, Any]]:
    """One outcome per question and turn: the winner (model id or "tie"), or failed when either order
    has no usable verdict. Verdicts that disagree between the two orders are a tie."""
    games: dict[tuple[Any, int], dict[str, str | None]] = {}
    for job in jobs:
        games.setdefault((job.key["question_id"], job.key["turn"]), {})
    for r in _select(records, jobs):
        verdict = r["verdict"]
        winner = None if verdict is None else "tie" if verdict == "tie" else r["model_1"] if verdict == "A" else r["model_2"]
        games[(r["question_id"], r["turn"])]["first" if r["model_1"] == model_a else "second"] = winner or "failed"
    outcomes = []
    for (qid, turn), g in games.items():
        first, second = g.get("first"), g.get("second")
        if first in (None, "failed") or second in (None, "failed"):
            result = "failed"
        else:
            result = first if first == second else "tie"
        outcomes.append({"question_id": qid, "turn": turn, "result": result, "first_order": first, "second_order": second})
    return outcomes


def pair_results(outcomes: Sequence[dict[str, Any]], model_a: str, model_b: str) -> dict[str, Any]:
    """{"model_a", "model_b", "win_a", "win_b", "tie", "win_rate_a", "failed"}; win_rate_a = (win_a + tie/2) / judged."""
    win_a = sum(o["result"] == model_a for o in outcomes)
    win_b = sum(o["result"] == model_b for o in outcomes)
    tie = sum(o["result"] == "tie" for o in outcomes)
    n = win_a + win_b + tie
    return {
        "model_a": model_a,
        "model_b": model_b,
        "win_a": win_a,
        "win_b": win_b,
        "tie": tie,
        "win_rate_a": (win_a + 0.5 * tie) / n if n else None,
        "failed": len(outcomes) - n,
        "judged": n,
    }


def single_summary(results: dict[str, dict[str, Any]], records: Sequence[dict[str, Any]], judge_model: str) -> str:
    """Markdown: score per model, then per model and category."""
    lines = [f"# Single-answer grading (judge: {judge_model})", "", "| model | score (1-10) | judged | failed |", "|---|---:|---:|---:|"]
    for model, r in results.items():
        score = "–" if r["score"] is None else f"{r['score']:.2f}"
        lines.append(f"| {model} | {score} | {r['judged']} | {r['failed']} |")
    by_cat: dict[tuple[str, str], list[float]] = {}
    for rec in records:
        if rec.get("score") is not None:
            by_cat.setdefault((rec["model"], rec.get("category", "")), []).append(float(rec["score"]))
    if by_cat:
        lines += ["", "| model | category | score | judgments |", "|---|---|---:|---:|"]
        for (model, cat), vals in sorted(by_cat.items()):
            lines.append(f"| {model} | {cat} | {sum(vals) / len(vals):.2f} | {len(vals)} |")
    return "\n".join(lines) + "\n"


def pair_summary(results: dict[str, Any], judge_model: str) -> str:
    rate = "–" if results["win_rate_a"] is None else f"{results['win_rate_a']:.3f}"
    return "\n".join(
        [
            f"# Pairwise comparison (judge: {judge_model}; each question judged in both orders, disagreement = tie)",
            "",
            "| model A | model B | A wins | B wins | ties | win rate of A | failed |",
            "|---|---|---:|---:|---:|---:|---:|",
            f"| {results['model_a']} | {results['model_b']} | {results['win_a']} | {results['win_b']} | {results['tie']} | {rate} | {results['failed']} |",
            "",
            "win rate of A = (A wins + ties / 2) / judged.",
            "",
        ]
    )
