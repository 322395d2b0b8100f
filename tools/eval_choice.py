"""C-Eval / CMMLU (and MMLU) accuracy of a base model (+ LoRA), by the benchmarks' official protocols.

    python tools/eval_choice.py --benchmark ceval|cmmlu|mmlu --base_model B [--lora_weights L] \\
        --data_dir D --split val|test --ntrain 5 --output_dir O

Answer-only prompts with `--ntrain` shots from dev (0 allowed); the choice is the argmax of the
next-token logits over A/B/C/D (each letter's continuation id after the prompt). Writes to O:
predictions.jsonl (resumable: a rerun scores only what is missing), results.json, summary.md,
accuracy.png, and for C-Eval's test split submission.json. See docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chinese_vicuna.args import ModelArguments, TemplateArguments, parse_args
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.evaluation.choice import (
    aggregate,
    find_subjects,
    get_benchmark,
    load_questions,
    plot_results,
    prepare,
    read_predictions,
    score,
    submission,
    summary_markdown,
)
from chinese_vicuna.files import atomic_write_text
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.outputlock import hold_output_folder
from chinese_vicuna.prompts import load_template
from chinese_vicuna.run import load_from_args

logger = logging.getLogger("eval_choice")

CONFIG_FILE = "eval_config.json"
# settings that change the predictions: a rerun into the same output_dir must keep them
RUN_KEYS = ("benchmark", "split", "ntrain", "base_model", "lora_weights", "prompt_template", "max_length")


@dataclass
class ChoiceArguments:
    benchmark: str = field(default="ceval", metadata={"help": "ceval, cmmlu or mmlu."})
    data_dir: str = field(default="", metadata={"help": "The benchmark's folder: dev/, val/, test/ of per-subject CSV files."})
    split: str = field(default="val", metadata={"help": "val or test (C-Eval, MMLU), test (CMMLU)."})
    ntrain: int = field(default=5, metadata={"help": "Few-shot examples from dev per question (0 = zero-shot)."})
    output_dir: str = field(default="eval-choice", metadata={"help": "Where predictions and results go."})
    subjects: str | None = field(default=None, metadata={"help": "Comma list of subjects (default: every subject file found)."})
    batch_size: int = field(default=8, metadata={"help": "Questions per forward pass."})
    max_length: int = field(default=2048, metadata={"help": "Prompt token budget: longer few-shot prompts drop their longest shots."})
    overwrite: bool = field(default=False, metadata={"help": "Start over instead of resuming predictions in output_dir."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})


def check_resume(out: Path, config: dict, overwrite: bool) -> None:
    """A rerun resumes only the same evaluation; anything else must not mix into its predictions."""
    pred = out / "predictions.jsonl"
    if overwrite:
        pred.unlink(missing_ok=True)
    elif pred.is_file() and (out / CONFIG_FILE).is_file():
        old = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
        changed = {k: (old.get(k), config[k]) for k in RUN_KEYS if old.get(k) != config[k]}
        if changed:
            raise UserError(
                f"{out} holds predictions of another evaluation {changed} (old, new): use another --output_dir or --overwrite true"
            )
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, ensure_ascii=False, indent=2) + "\n")


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    configure_logging()
    # --prompt_template: an instruction template that wraps the whole prompt; not given (or none): the
    # benchmark's raw prompt, the official protocol (no saved template is read here)
    model_args, template_args, args = parse_args((ModelArguments, TemplateArguments, ChoiceArguments), argv)
    wrapper = template_args.prompt_template or "none"
    bench = get_benchmark(args.benchmark)
    if not args.data_dir:
        raise UserError("--data_dir is required: the benchmark's folder (see docs/evaluation.md)")
    only = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    subjects = find_subjects(bench, args.data_dir, args.split, only)
    questions, shots = load_questions(bench, args.data_dir, args.split, subjects, args.ntrain)
    for_submission = bench.name == "ceval" and args.split == "test"  # C-Eval hides these answers: the submission file is the result
    unanswered = sum(not q.answer for q in questions)
    if questions and unanswered == len(questions) and not for_submission:
        raise UserError(
            f"--data_dir {args.data_dir} --split {args.split}: none of the {len(questions)} questions has an answer "
            "(no answer column), so nothing can be scored; use a split with answers (val or dev)"
        )

    out = Path(args.output_dir)
    hold_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**asdict(args), "base_model": model_args.base_model, "lora_weights": model_args.lora_weights, "prompt_template": wrapper}
    check_resume(out, config, args.overwrite)
    pred_path = out / "predictions.jsonl"
    done = {(r["subject"], str(r["id"])) for r in read_predictions(pred_path)}
    todo = [q for q in questions if (q.subject, q.id) not in done]
    logger.info(
        "%s %s: %d subjects, %d questions, %d already predicted",
        bench.name,
        args.split,
        len(subjects),
        len(questions),
        len(questions) - len(todo),
    )

    if todo:
        model, tokenizer = load_from_args(model_args)
        wrap = None
        if wrapper != "none":
            template = load_template(wrapper, tokenizer)
            if template.is_chat:
                raise UserError(
                    f"--prompt_template {wrapper}: wrap with an instruction template (alpaca, chinese-alpaca) or none"
                )
            wrap = template.instruction_prompt
        prepared = prepare(bench, tokenizer, todo, shots, args.max_length, wrap)
        start = time.perf_counter()
        with pred_path.open("a", encoding="utf-8") as f:

            def append(records: list[dict]) -> None:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                f.flush()

            score(model, tokenizer, prepared, args.batch_size, append, args.progress)
        seconds = time.perf_counter() - start
        mean_len = sum(len(p.ids) for p in prepared) / len(prepared)
        logger.info(
            "scored %d questions in %.1f s: %.2f questions/s (prompts %.0f tokens on average)",
            len(prepared),
            seconds,
            len(prepared) / seconds,
            mean_len,
        )

    wanted = {(q.subject, q.id) for q in questions}
    records = [r for r in read_predictions(pred_path) if (r["subject"], str(r["id"])) in wanted]
    results = aggregate(bench, records)
    results.update(split=args.split, ntrain=args.ntrain, base_model=model_args.base_model, lora_weights=model_args.lora_weights)
    title = f"{bench.name} {args.split}, {args.ntrain}-shot"
    atomic_write_text(out / "results.json", json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(out / "summary.md", summary_markdown(bench, results, title))
    plot_results(bench, results, out / "accuracy.png", title)
    if bench.name == "ceval" and args.split == "test":
        atomic_write_text(out / "submission.json", json.dumps(submission(records), ensure_ascii=False, indent=1) + "\n")
    if results["average"] is not None:
        logger.info("average accuracy %.2f%% over %d subjects; %s", results["average"], len(results["subjects"]), out / "summary.md")
    if unanswered and not for_submission:
        logger.warning("%d of %d questions have no answer in --split %s: predicted, not scored", unanswered, len(questions), args.split)
    return results


if __name__ == "__main__":
    main()
