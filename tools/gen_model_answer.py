"""Answers to an MT-bench-format question file, in FastChat's answer format, for tools/eval_judge.py.

    # a local base model + LoRA, through the chat template (the adapter's saved one if any)
    python tools/gen_model_answer.py --questions sample/eval/mt_bench/question.jsonl \\
        --base_model B --lora_weights L --model_id my-lora --answer_file answers/my-lora.jsonl
    # any OpenAI-compatible endpoint (serve.py, vLLM, llama.cpp, a hosted API)
    python tools/gen_model_answer.py --questions Q --api_base http://127.0.0.1:8000/v1 \\
        --api_model NAME --model_id NAME --answer_file answers/NAME.jsonl

Multi-turn questions are answered turn by turn with the earlier turns in context. Greedy unless
--do_sample true. A rerun appends only the questions not answered yet.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from chinese_vicuna.args import ChatTemplateArguments, DecodingArguments, ModelArguments, parse_args
from chinese_vicuna.endpoint import openai_client, resolve_api_key
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.evaluation.answers import answer_record, answered_ids, endpoint_turns, local_turns
from chinese_vicuna.evaluation.judge import read_questions
from chinese_vicuna.infer.engine import CHAT, Engine, adapter_template, model_template
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.outputlock import hold_output_folder
from chinese_vicuna.run import load_from_args

logger = logging.getLogger("gen_model_answer")


@dataclass
class AnswerArguments:
    questions: str = field(default="sample/eval/mt_bench/question.jsonl", metadata={"help": "MT-bench-format question file (.jsonl)."})
    answer_file: str = field(default="", metadata={"help": "Where the answers go (appended; default answers/{model_id}.jsonl)."})
    model_id: str = field(
        default="", metadata={"help": "The name the answers carry (default: the LoRA's or base's folder name, or --api_model)."}
    )
    system: str | None = field(default=None, metadata={"help": "System prompt (default: the template's)."})
    max_memory: int | None = field(default=None, metadata={"help": "Token budget of a prompt; the oldest turns go first."})
    api_base: str | None = field(
        default=None, metadata={"help": "Answer through this OpenAI-compatible endpoint instead of a local model."}
    )
    api_model: str = field(default="", metadata={"help": "The model name at --api_base."})
    api_key: str | None = field(default=None, metadata={"help": "API key (default: the OPENAI_API_KEY environment variable)."})
    parallel: int = field(default=4, metadata={"help": "Endpoint: questions in flight at once."})
    max_retries: int = field(default=5, metadata={"help": "Endpoint: retries on 429 / 5xx (exponential backoff)."})


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    configure_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model_args, template_args, args, decoding = parse_args((ModelArguments, ChatTemplateArguments, AnswerArguments, DecodingArguments), argv)
    decoding.validate()
    questions = read_questions(args.questions)
    if args.api_base:
        if not args.api_model:
            raise UserError("--api_base needs --api_model (the model's name at that endpoint)")
        model_id = args.model_id or args.api_model
    else:
        if not model_args.base_model:
            raise UserError("give --base_model (a local model, optionally with --lora_weights) or --api_base with --api_model")
        model_id = args.model_id or Path(model_args.lora_weights or model_args.base_model).name
    out = Path(args.answer_file or f"answers/{model_id}.jsonl")
    hold_output_folder(out, "--answer_file")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = answered_ids(out, model_id)
    todo = [q for q in questions if q["question_id"] not in done]
    logger.info("%d questions, %d already answered by %s in %s", len(questions), len(questions) - len(todo), model_id, out)
    if not todo:
        return out

    empty = 0
    with out.open("a", encoding="utf-8") as f:

        def write(question: dict, turns: list[str]) -> None:
            nonlocal empty
            if not turns or any(not turn.strip() for turn in turns):  # an empty reply is no answer: a rerun asks again
                empty += 1
                return
            f.write(json.dumps(answer_record(question["question_id"], model_id, turns), ensure_ascii=False) + "\n")
            f.flush()

        if args.api_base:
            client = openai_client(args.api_base, resolve_api_key(args.api_key), args.max_retries)
            temperature = decoding.temperature if decoding.do_sample else 0.0

            def ask(q: dict) -> list[str]:
                return endpoint_turns(client, args.api_model, q["turns"], temperature, decoding.max_new_tokens, args.system)

            with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
                try:
                    for q, turns in zip(todo, pool.map(ask, todo)):
                        write(q, turns)
                except Exception as exc:  # the client already retried 429/5xx with backoff
                    raise UserError(
                        f"{args.api_base}: a request failed after {args.max_retries} retries ({type(exc).__name__}: {exc}); "
                        "the answers so far are kept, rerun to continue"
                    ) from None
        else:
            from tqdm.auto import tqdm

            model, tokenizer = load_from_args(model_args)
            # --prompt_template names the base's template; an adapter's saved one wins
            template = model_template(template_args.prompt_template, (), CHAT, tokenizer)
            if model_args.lora_weights:
                template = adapter_template(model_args.lora_weights, template, tokenizer)
            engine = Engine.for_model(model, tokenizer, template)
            for q in tqdm(todo, desc="questions"):
                write(q, local_turns(engine, q["turns"], decoding, args.system, args.max_memory))
    source = f"--api_base {args.api_base} --api_model {args.api_model}" if args.api_base else f"model {model_id}"
    if empty == len(todo):
        raise UserError(f"{source}: all {empty} replies were empty, none saved to {out}; check the model or endpoint and rerun")
    if empty:
        logger.warning(
            "%d of %d questions got an empty reply and were not saved; rerun the same command to ask them again", empty, len(todo)
        )
    logger.info("answers of %s in %s", model_id, out)
    return out


if __name__ == "__main__":
    main()
