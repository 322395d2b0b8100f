"""Instruction inference: a web page whose answer streams, or a data file in → a file out.

    python generate.py --base_model MODEL --lora_weights LORA                 # page on http://127.0.0.1:7860
    python generate.py --base_model MODEL --lora_weights LORA \\
        --data_file questions.jsonl --output_file answers.jsonl               # batch mode, resumable

`--lora_weights`: an adapter folder (output_dir or any checkpoint-N), a stock PEFT adapter,
or a hub id; leave it out for a merged model. Decoding flags: `python generate.py --help`.
"""

# No `from __future__ import annotations`: Gradio passes `gr.Request` to the page's callbacks by
# their annotation, which must then be the class itself (gr is imported inside build_page).
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from chinese_vicuna.args import DecodingArguments, ModelArguments, ServerArguments, TemplateArguments, UIArguments, parse_args
from chinese_vicuna.data.records import Record, read_records
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.infer.engine import INSTRUCTION, Engine
from chinese_vicuna.infer.generation import GenerationStats
from chinese_vicuna.infer.jsonl import JsonlAppender, check_output_file, question_of, resume_point
from chinese_vicuna.model.build import load_from_args

logger = logging.getLogger("generate")


@dataclass
class BatchFileArguments:
    data_file: str | None = field(default=None, metadata={"help": "Batch mode: alpaca records (.jsonl/.json) to answer."})
    output_file: str | None = field(default=None, metadata={"help": "Batch mode: each input record + its 'output', one JSON line each."})
    batch_size: int = field(
        default=16, metadata={"help": "Batch mode: records answered together (length-sorted, left-padded); 1 = one at a time."}
    )


def read_batch_input(data_file: str, output_file: str) -> tuple[list[Record], list[tuple[str, str]], int]:
    """The records, their questions and how many the output file already answers: every record
    and the output file checked before any model is loaded."""
    check_output_file(output_file, data_file)
    records = read_records(data_file)
    questions = [question_of(r) for r in records]  # check every record before generating
    return records, questions, resume_point(output_file, records)


def run_batch(engine: Engine, decoding: DecodingArguments, data_file: str, output_file: str, batch_size: int = 16) -> None:
    records, questions, done = read_batch_input(data_file, output_file)
    if done:
        logger.info("%s: %d of %d records already answered; resuming", output_file, done, len(records))
    prompts = [engine.instruction_ids(instruction, inp) for instruction, inp in questions[done:]]
    with JsonlAppender(output_file) as out, tqdm(total=len(records), initial=done, desc="generate", unit="record") as bar:

        def write(start: int, answers: list[str]) -> None:
            for record, text in zip(records[done + start :], answers):
                out.write({**record.data, "output": text})
            bar.update(len(answers))

        engine.answer_in_batches(prompts, decoding, batch_size, write)
    logger.info("wrote %d lines to %s", len(records), output_file)


def build_page(engine: Engine, decoding: DecodingArguments, title: str, language: str = "zh") -> Any:
    from chinese_vicuna.infer.i18n import Messages
    from chinese_vicuna.infer.webui import SessionStops, check_context, decoding_controls, decoding_from_values, gr, page_error

    t = Messages(language)
    stops = SessionStops()

    def respond(request: gr.Request, instruction: str, inp: str, *values: object) -> Iterator[tuple[str, str]]:
        if not (instruction or "").strip():
            raise page_error(t("generate.need_instruction"))
        settings = decoding_from_values(values)
        ids = engine.instruction_ids(instruction, inp or "")
        check_context(engine.model, len(ids), settings)
        stats, text = GenerationStats(), ""
        yield "", t("generating") if settings.streams else t("beam_search")
        for piece in engine.stream_answer(ids, settings, stop_event=stops.start(request), stats=stats):
            text += piece
            yield text, t("generating")
        yield text, t("generate.done", prompt_tokens=len(ids), stats=t.stats(stats))

    with gr.Blocks(title=title) as demo:
        gr.Markdown(t("generate.intro", title=title, template=engine.template.name))
        with gr.Row():
            with gr.Column():
                instruction = gr.Textbox(
                    lines=3, label=t("generate.instruction"), placeholder=t("generate.instruction_placeholder"), elem_id="instruction"
                )
                inp = gr.Textbox(lines=2, label=t("generate.input"), elem_id="input")
                with gr.Row():
                    run = gr.Button(t("generate.run"), variant="primary", elem_id="generate-btn")
                    stop = gr.Button(t("stop"), elem_id="stop-btn")
                with gr.Accordion(t("decoding"), open=False):
                    controls = decoding_controls(decoding, t)
            with gr.Column():
                output = gr.Textbox(lines=12, label=t("generate.answer"), elem_id="answer", interactive=False)
                status = gr.Markdown(elem_id="status")
        # Generate is disabled while an answer is generated, so a second click is never silently
        # dropped, and enabled again however the answer ends: done or stopped (`.then`), or an
        # error (Gradio 6's page runs `.then` only after a success, so `.failure` too).
        # preprocess=False: respond checks every value itself (one line), not Gradio's component
        # checks, which print a traceback for an API client's out-of-range value
        for trigger, api_name in ((run.click, "generate"), (instruction.submit, False)):
            answering = trigger(lambda: gr.update(interactive=False), None, run, queue=False, api_name=False).then(
                respond, [instruction, inp, *controls], [output, status], api_name=api_name, preprocess=False
            )
            for ended in (answering.then, answering.failure):
                ended(lambda: gr.update(interactive=True), None, run, queue=False, api_name=False)
        stop.click(stops.stop, None, None, queue=False, api_name="stop")
        demo.unload(stops.end)
    return demo


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    model_args, template_args, decoding, server, ui, args = parse_args(
        (ModelArguments, TemplateArguments, DecodingArguments, ServerArguments, UIArguments, BatchFileArguments), argv
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    decoding.validate()
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1 (got {args.batch_size})")
    if bool(args.data_file) != bool(args.output_file):
        raise UserError("batch mode needs both --data_file and --output_file (or neither, for the web page)")

    if args.data_file:
        read_batch_input(args.data_file, args.output_file)  # data and output file problems before minutes of loading

    model, tokenizer = load_from_args(model_args)
    # the template the adapter (or merged model) was trained with, unless one is named
    engine = Engine.around(model, tokenizer, template_args.prompt_template, [model_args.lora_weights, model_args.base_model], INSTRUCTION)

    if args.data_file:
        run_batch(engine, decoding, args.data_file, args.output_file, args.batch_size)
        return
    from chinese_vicuna.infer.webui import launch

    title = f"Chinese-Vicuna · {model_args.lora_weights or model_args.base_model}"
    launch(build_page(engine, decoding, title, ui.ui_language), server.server_name, server.server_port, server.share)


if __name__ == "__main__":
    main()
