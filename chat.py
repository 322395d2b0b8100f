"""Multi-turn chat with streaming answers: a web page, or the terminal with --cli.

    python chat.py --base_model MODEL --lora_weights LORA                   # page on http://127.0.0.1:7860
    python chat.py --base_model MODEL --lora_weights LORA --cli             # in the terminal

The conversation is rendered with the chat template's segments and encoded segment by
segment, exactly as chat fine-tuning encodes it; history is kept within --max_memory tokens
by dropping the oldest whole turns. Saved conversations are JSONL lines {"messages": [...]},
the chat data format the fine-tuning scripts read.
"""

# No `from __future__ import annotations`: Gradio passes `gr.Request` to the page's callbacks by
# their annotation, which must then be the class itself (gr is imported inside build_page).
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chinese_vicuna.args import (
    ChatSessionArguments,
    ChatTemplateArguments,
    DecodingArguments,
    ModelArguments,
    ServerArguments,
    UIArguments,
    parse_args,
)
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.infer.engine import CHAT, Engine
from chinese_vicuna.infer.generation import GenerationStats
from chinese_vicuna.infer.i18n import Messages
from chinese_vicuna.infer.session import ChatSession, Message, keeps_answer, save_conversation
from chinese_vicuna.infer.terminal import ChatEnded, enable_line_editing, print_answer, read_line
from chinese_vicuna.model.build import load_from_args

logger = logging.getLogger("chat")


@dataclass
class ChatFrontArguments:
    cli: bool = field(default=False, metadata={"help": "Chat in the terminal instead of a web page."})
    save_dir: str = field(default=".", metadata={"help": "--cli: where /save writes when given no path."})


# --------------------------------------------------------------------------------------------
# Terminal
# --------------------------------------------------------------------------------------------
def run_cli(chat: ChatSession, save_dir: str, language: str = "zh") -> int:
    """The terminal chat; returns the exit status (0, or 130 after Ctrl-C at the prompt)."""
    t = Messages(language)
    enable_line_editing()
    history: list[Message] = []
    system = chat.system_of(chat.default_template, chat.settings.system)
    print(t("cli.start", template=chat.default_template, help=t("cli.help")), flush=True)
    while True:
        try:
            line = read_line(t("cli.user"), t)
        except ChatEnded as end:
            print(t("cli.bye"), flush=True)
            return end.code
        command, _, rest = line.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/help":
            print(t("cli.help"))
            continue
        if command == "/reset":
            history = []
            print(t("cli.new_conversation"))
            continue
        if command == "/undo":
            history = history[:-2]
            print(t("cli.undone", turns=len(history) // 2))
            continue
        if command == "/save":
            target = rest.strip() or str(Path(save_dir) / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            try:
                print(t("cli.saved", path=save_conversation(target, history, system)))
            except (UserError, OSError) as exc:
                print(t("cli.not_saved", error=exc))
            continue
        if command == "/regen":
            if not history:
                print(t("cli.nothing_to_regenerate"))
                continue
            line, history = history[-2]["content"], history[:-2]
        elif command.startswith("/"):
            print(t("cli.unknown_command", command=command, help=t("cli.help")))
            continue
        elif not line.strip():
            continue

        try:
            ids, template, note = chat.prompt(history, line, system=system)
        except UserError as exc:
            print(f"[{exc}]", flush=True)
            continue
        if note:
            print(f"[{note}]")
        print(t("cli.assistant"), end="", flush=True)
        text, stopped = print_answer(chat.stream(ids, template))
        if stopped:
            print(t("cli.stopped"), flush=True)
        elif not keeps_answer(text):
            print(t("cli.empty_answer"), flush=True)
        else:  # a stopped or empty answer is not kept: saved, it would train the model to say nothing
            history = [*history, {"role": "user", "content": line}, {"role": "assistant", "content": text}]


# --------------------------------------------------------------------------------------------
# Web page
# --------------------------------------------------------------------------------------------
def build_page(chat: ChatSession, title: str, language: str = "zh") -> Any:
    from chinese_vicuna.infer.webui import (
        SessionFolders,
        SessionStops,
        check_context,
        decoding_controls,
        decoding_from_values,
        gr,
        page_error,
    )

    t = Messages(language)
    stops = SessionStops()
    folders = SessionFolders("chat-saves-")  # a private folder per session, a new file per save

    def respond(
        request: gr.Request,
        message: str,
        history: list[Message],
        system: str,
        template_name: str,
        max_memory: float,
        *values: object,
    ) -> Iterator[tuple[list[Message], list[Message], str, str]]:
        if not (message or "").strip():
            raise page_error(t("chat.need_message"))
        if template_name not in chat.templates:
            raise page_error(f"template {template_name!r}: choose one of {', '.join(chat.templates)}")
        settings = decoding_from_values(values)
        try:
            ids, template, note = chat.prompt(history, message, template_name, system, int(max_memory))
        except (TypeError, ValueError, OverflowError):  # an API client's None or text
            raise page_error(f"max_memory must be a positive number of tokens (got {max_memory!r})") from None
        except UserError as exc:
            raise page_error(exc) from None
        check_context(chat.model, len(ids), settings)
        user = {"role": "user", "content": message}
        shown = [*history, user, {"role": "assistant", "content": ""}]
        yield shown, history, "", t("generating") if settings.streams else t("beam_search")
        stats, text = GenerationStats(), ""
        for piece in chat.stream(ids, template, settings, stops.start(request), stats):
            text += piece
            shown[-1] = {"role": "assistant", "content": text}
            yield shown, history, "", t("generating")
        if not keeps_answer(text, stats):  # shown, but not part of the conversation (nor of a saved file)
            yield shown, history, message, "; ".join(x for x in (t("chat.not_kept"), t.stats(stats)) if x)
            return
        done = [*history, user, {"role": "assistant", "content": text}]
        yield done, done, "", "; ".join(x for x in (note, t.stats(stats)) if x)

    def regenerate(request: gr.Request, history: list[Message], *rest: Any) -> Iterator[tuple[list[Message], list[Message], str, str]]:
        if len(history) < 2:
            raise page_error(t("chat.nothing_to_regenerate"))
        yield from respond(request, history[-2]["content"], history[:-2], *rest)

    def undo(history: list[Message]) -> tuple[list[Message], list[Message], str]:
        history = history[:-2]
        return history, history, t("chat.turns", turns=len(history) // 2)

    def clear() -> tuple[list[Message], list[Message], str, None]:
        return [], [], t("chat.new_conversation"), None

    def save(request: gr.Request, history: list[Message], system: str) -> tuple[str, str]:
        if not history:
            raise page_error(t("chat.nothing_to_save"))
        turns = len(history) // 2
        path = folders.new_file(request, f"chat-{time.strftime('%Y%m%d-%H%M%S')}-{turns}turns-", ".jsonl")
        save_conversation(path, history, system, append=False)
        return str(path), t("chat.saved_turns", turns=turns)

    def default_system(name: str) -> Any:
        return chat.templates[name].default_system if name in chat.templates else gr.update()

    def end_session(request: gr.Request) -> None:
        stops.end(request)
        folders.end(request)

    first = chat.templates[chat.default_template]
    # Gradio's own copies of served files go after an hour, and all of them at exit
    with gr.Blocks(title=title, delete_cache=(600, 3600)) as demo:
        history = gr.State([])
        gr.Markdown(f"## {title}")
        chatbot = gr.Chatbot(label=t("chat.conversation"), height=420, buttons=["copy", "copy_all"], elem_id="chatbot")
        with gr.Row():
            message = gr.Textbox(placeholder=t("chat.message_placeholder"), show_label=False, scale=5, elem_id="message")
            send = gr.Button(t("chat.send"), variant="primary", scale=1, elem_id="send-btn")
        with gr.Row():
            stop = gr.Button(t("stop"), elem_id="stop-btn")
            regen = gr.Button(t("chat.regenerate"), elem_id="regen-btn")
            undo_btn = gr.Button(t("chat.undo"), elem_id="undo-btn")
            clear_btn = gr.Button(t("chat.clear"), elem_id="clear-btn")
            save_btn = gr.Button(t("chat.save"), elem_id="save-btn")
        status = gr.Markdown(elem_id="status")
        saved = gr.File(label=t("chat.saved_file"), elem_id="saved", interactive=False, height=90)
        with gr.Accordion(t("chat.settings"), open=False):
            template_name = gr.Dropdown(list(chat.templates), value=chat.default_template, label=t("chat.template"), elem_id="template")
            system = gr.Textbox(chat.system_of(first.name, chat.settings.system), lines=2, label=t("chat.system"), elem_id="system")
            max_memory = gr.Number(chat.settings.max_memory, precision=0, label=t("chat.max_memory"), elem_id="max_memory")
        with gr.Accordion(t("decoding"), open=False):
            controls = decoding_controls(chat.decoding, t)

        settings = [system, template_name, max_memory, *controls]
        outputs = [chatbot, history, message, status]
        # preprocess=False: respond checks every value itself (one line), not Gradio's component
        # checks, which print a traceback for an API client's out-of-range value
        send.click(respond, [message, history, *settings], outputs, api_name="respond", preprocess=False)
        message.submit(respond, [message, history, *settings], outputs, api_name=False, preprocess=False)
        regen.click(regenerate, [history, *settings], outputs, api_name="regenerate", preprocess=False)
        stop.click(stops.stop, None, None, queue=False, api_name="stop")
        undo_btn.click(undo, history, [chatbot, history, status], api_name="undo")
        clear_btn.click(clear, None, [chatbot, history, status, saved], api_name="clear")
        chatbot.clear(clear, None, [chatbot, history, status, saved], api_name=False)  # the chatbot's own trash icon
        save_btn.click(save, [history, system], [saved, status], api_name="save")
        template_name.change(default_system, template_name, system, api_name=False)
        demo.unload(end_session)
    return demo


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    model_args, template_args, session_args, decoding, server, ui, args = parse_args(
        (ModelArguments, ChatTemplateArguments, ChatSessionArguments, DecodingArguments, ServerArguments, UIArguments, ChatFrontArguments),
        argv,
    )
    logging.basicConfig(level=logging.WARNING if args.cli else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    decoding.validate()
    if args.cli:  # keep the terminal for the conversation
        import warnings

        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore")

    model, tokenizer = load_from_args(model_args)
    # the template the adapter (or merged model) was trained with, unless one is named
    engine = Engine.around(model, tokenizer, template_args.prompt_template, [model_args.lora_weights, model_args.base_model], CHAT)
    chat = ChatSession(engine, session_args, decoding)  # refuses an instruction template

    if args.cli:
        code = run_cli(chat, args.save_dir, ui.ui_language)
        if code:
            raise SystemExit(code)
        return
    from chinese_vicuna.infer.webui import launch

    title = f"Chinese-Vicuna chat · {model_args.lora_weights or model_args.base_model}"
    launch(build_page(chat, title, ui.ui_language), server.server_name, server.server_port, server.share)


if __name__ == "__main__":
    main()
