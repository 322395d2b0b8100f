"""Preference pairs from pairwise judging (winner → chosen, loser → rejected), or from K sampled
answers per question of which a judge endpoint picks the best (RLAIF).

    python tools/eval_judge.py --mode pairwise --questions Q --answers A --answers_b B --output_dir J ...
    python tools/make_pairs.py --questions Q --answers A --answers_b B --judgments J/judgments.jsonl --output pairs.jsonl
    python tools/make_pairs.py --questions Q --num_samples 4 --base_model B --lora_weights L \
        --judge_api_base http://127.0.0.1:8000/v1 --judge_model M --output pairs.jsonl

Sampling mode keeps OUTPUT.progress.jsonl (a line per judged question): a rerun, after a kill
too, continues where it stopped and never asks the judge about a question twice.

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
from chinese_vicuna.datatools.pairs import pairs_from_judgments, sample_and_judge
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
    num_samples: int = field(default=0, metadata={"help": "Sampling mode: answers per question from --base_model (0: judged-file mode)."})
    base_model: str | None = field(default=None, metadata={"help": "Sampling mode: the model that answers."})
    lora_weights: str | None = field(default=None, metadata={"help": "Sampling mode: its adapter."})
    prompt_template: str | None = field(default=None, metadata={"help": "Sampling mode: template (default: the adapter's saved one)."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature."})
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens per sampled answer."})
    seed: int = field(default=42, metadata={"help": "Seed of the sampling (each question its own stream)."})
    judge_api_base: str | None = field(default=None, metadata={"help": "Sampling mode: OpenAI-compatible endpoint of the judge."})
    judge_api_key: str | None = field(default=None, metadata={"help": "Its key (default: OPENAI_API_KEY); never logged."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((MakePairsArguments,), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.num_samples:
        return sample_pairs(args)
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


def sample_pairs(args: MakePairsArguments) -> None:
    import zlib

    import torch

    from chinese_vicuna.endpoint import chat_completion, openai_client, resolve_api_key
    from chinese_vicuna.infer.engine import Engine

    if args.num_samples < 2 or not (args.questions and args.base_model and args.judge_api_base and args.judge_model):
        raise UserError("sampling mode needs --num_samples ≥ 2, --questions, --base_model, --judge_api_base and --judge_model")
    prompts = [q["turns"][0] for q in read_questions(args.questions)]
    client = openai_client(args.judge_api_base, resolve_api_key(args.judge_api_key))
    engine = Engine(args.base_model, args.lora_weights, args.prompt_template, precision="fp32")

    def sample(prompt: str) -> list[str]:
        torch.manual_seed(args.seed + zlib.crc32(prompt.encode("utf-8")))
        messages = [{"role": "user", "content": prompt}]
        return [
            engine.generate(messages, args.max_new_tokens, do_sample=True, temperature=args.temperature) for _ in range(args.num_samples)
        ]

    pairs, left_out = sample_and_judge(
        prompts, sample, lambda messages: chat_completion(client, args.judge_model, messages), Path(f"{args.output}.progress.jsonl")
    )
    atomic_write_text(args.output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    counts = "; ".join(f"{n} {what}" for what, n in sorted(left_out.items())) or "none"
    logger.info("%d pairs from %d questions written to %s; left out: %s", len(pairs), len(prompts), args.output, counts)


if __name__ == "__main__":
    main()
