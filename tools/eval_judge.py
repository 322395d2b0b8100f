"""MT-bench-style judging of model answers by an LLM behind any OpenAI-compatible endpoint.

    python tools/eval_judge.py --mode single|pairwise --questions Q --answers A [--answers_b B] \\
        --judge_api_base URL --judge_model M --output_dir O

single: each answer (each turn) rated 1-10, `[[rating]]`; pairwise: two models' answers compared,
every question in both orders (A/B and B/A), disagreement = tie. The key comes from
--judge_api_key or OPENAI_API_KEY and is never logged. Judgments are appended to
O/judgments.jsonl, so a rerun judges only what is missing; results.json and summary.md follow.
See docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from chinese_vicuna.args import parse_args
from chinese_vicuna.endpoint import chat_completion, openai_client, resolve_api_key
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.evaluation.judge import (
    load_judge_prompts,
    pair_jobs,
    pair_outcomes,
    pair_results,
    pair_summary,
    read_answers,
    read_judgments,
    read_questions,
    run_jobs,
    single_jobs,
    single_results,
    single_summary,
)
from chinese_vicuna.files import atomic_write_text
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.outputlock import hold_output_folder

logger = logging.getLogger("eval_judge")


@dataclass
class JudgeArguments:
    mode: str = field(default="single", metadata={"help": "single (grade 1-10) or pairwise (compare two models)."})
    questions: str = field(default="", metadata={"help": "MT-bench-format question file (.jsonl: question_id, category, turns)."})
    answers: str = field(default="", metadata={"help": "FastChat-format answer file (tools/gen_model_answer.py output)."})
    answers_b: str | None = field(default=None, metadata={"help": "pairwise: the second model's answer file."})
    reference_answers: str | None = field(
        default=None,
        metadata={"help": "FastChat-format reference answers for math/reasoning/coding (default: the questions' `reference`)."},
    )
    judge_api_base: str = field(
        default="", metadata={"help": "OpenAI-compatible base URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1."}
    )
    judge_model: str = field(default="gpt-4", metadata={"help": "The judge model's name at that endpoint."})
    judge_api_key: str | None = field(default=None, metadata={"help": "API key (default: the OPENAI_API_KEY environment variable)."})
    judge_prompts: str | None = field(
        default=None, metadata={"help": "FastChat's judge_prompts.jsonl, to judge with MT-bench's own prompts."}
    )
    output_dir: str = field(default="eval-judge", metadata={"help": "Where judgments.jsonl, results.json and summary.md go."})
    parallel: int = field(default=4, metadata={"help": "Judge requests in flight at once."})
    max_retries: int = field(default=5, metadata={"help": "Retries per request on 429 / 5xx / timeouts (exponential backoff)."})
    timeout: float = field(default=120.0, metadata={"help": "Seconds per request."})
    judge_max_tokens: int = field(default=2048, metadata={"help": "Most tokens in one judgment."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    configure_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    (args,) = parse_args((JudgeArguments,), argv)
    if args.mode not in ("single", "pairwise"):
        raise UserError(f"--mode {args.mode!r}: single or pairwise")
    if not (args.questions and args.answers):
        raise UserError("--questions and --answers are required")
    if args.mode == "pairwise" and not args.answers_b:
        raise UserError("--mode pairwise needs --answers_b (the second model's answers)")
    questions = read_questions(args.questions)
    prompts = load_judge_prompts(args.judge_prompts)
    references = None
    if args.reference_answers:
        ref_models = read_answers(args.reference_answers)
        references = next(iter(ref_models.values()))
    client = openai_client(args.judge_api_base, resolve_api_key(args.judge_api_key), args.max_retries, args.timeout)

    def ask(messages: list[dict[str, str]]) -> str:
        return chat_completion(client, args.judge_model, messages, temperature=0.0, max_tokens=args.judge_max_tokens)

    out = Path(args.output_dir)
    hold_output_folder(out)  # two judges into one folder would pay twice for every judgment
    out.mkdir(parents=True, exist_ok=True)
    judgments = out / "judgments.jsonl"
    answers = read_answers(args.answers)
    if args.mode == "single":
        jobs = []
        for model_id, model_answers in answers.items():
            model_jobs, missing = single_jobs(questions, model_answers, model_id, prompts, references, args.judge_model)
            if missing:
                logger.warning("%s: no answer to %d of %d questions; those are not judged", model_id, missing, len(questions))
            jobs += model_jobs
        run_jobs(jobs, ask, args.judge_model, judgments, args.parallel, args.progress)
        results = single_results(read_judgments(judgments), jobs)
        summary = single_summary(results, [r for r in read_judgments(judgments) if r.get("mode") == "single"], args.judge_model)
        judged, failed = sum(r["judged"] for r in results.values()), sum(r["failed"] for r in results.values())
    else:
        answers_b = read_answers(args.answers_b)
        if len(answers) != 1 or len(answers_b) != 1:
            raise UserError("pairwise: each answer file must hold one model's answers (one model_id)")
        (model_a, ans_a), (model_b, ans_b) = next(iter(answers.items())), next(iter(answers_b.items()))
        if model_a == model_b:
            raise UserError(f"pairwise: both answer files are from model_id {model_a!r}; give the models different ids")
        jobs, missing = pair_jobs(questions, ans_a, ans_b, model_a, model_b, prompts, references, args.judge_model)
        if missing:
            logger.warning("%d of %d questions lack an answer from one of the models; those are not judged", missing, len(questions))
        run_jobs(jobs, ask, args.judge_model, judgments, args.parallel, args.progress)
        outcomes = pair_outcomes(read_judgments(judgments), jobs, model_a)
        results = pair_results(outcomes, model_a, model_b)
        summary = pair_summary(results, args.judge_model)
        judged, failed = results["win_a"] + results["win_b"] + results["tie"], results["failed"]
    atomic_write_text(out / "results.json", json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(out / "summary.md", summary)
    logger.info("results: %s", json.dumps(results, ensure_ascii=False))
    if failed and not judged:
        raise UserError(
            f"--judge_api_base {args.judge_api_base} --judge_model {args.judge_model}: all {failed} judgments failed "
            f"(see the errors above and {judgments}); fix the judge and rerun the same command"
        )
    if failed:
        logger.warning(
            "%d of %d judgments failed and are not in the results; rerun the same command to retry them", failed, failed + judged
        )
    return results


if __name__ == "__main__":
    main()
