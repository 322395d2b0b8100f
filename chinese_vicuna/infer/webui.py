"""Gradio pieces shared by generate.py and chat.py: decoding controls, a stop button per
browser session, launching on 127.0.0.1 unless told otherwise. Their words come from
chinese_vicuna/infer/i18n.py in the language of --ui_language.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import fields
from typing import Any

# No usage reports or version checks from the page's server.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # re-exported: scripts import it from here, after the setting above

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.i18n import Messages

logger = logging.getLogger(__name__)


def decoding_controls(defaults: DecodingArguments, t: Messages | None = None) -> list[gr.components.Component]:
    """One control per DecodingArguments field, in field order, starting from the flags."""
    t = t or Messages()
    return [
        gr.Slider(
            1,
            max(2048, defaults.max_new_tokens),
            value=defaults.max_new_tokens,
            step=1,
            label=t("decoding.max_new_tokens"),
            elem_id="max_new_tokens",
        ),
        gr.Slider(
            0,
            max(512, defaults.min_new_tokens),
            value=defaults.min_new_tokens,
            step=1,
            label=t("decoding.min_new_tokens"),
            elem_id="min_new_tokens",
        ),
        gr.Checkbox(value=defaults.do_sample, label=t("decoding.do_sample"), elem_id="do_sample"),
        gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label=t("decoding.temperature"), elem_id="temperature"),
        gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.01, label=t("decoding.top_p"), elem_id="top_p"),
        gr.Slider(0, 200, value=defaults.top_k, step=1, label=t("decoding.top_k"), elem_id="top_k"),
        gr.Slider(1, max(8, defaults.num_beams), value=defaults.num_beams, step=1, label=t("decoding.num_beams"), elem_id="num_beams"),
        gr.Slider(
            1.0, 2.0, value=defaults.repetition_penalty, step=0.01, label=t("decoding.repetition_penalty"), elem_id="repetition_penalty"
        ),
    ]


def decoding_from_values(values: tuple[Any, ...]) -> DecodingArguments:
    """The controls' values back into DecodingArguments (a bad combination → gr.Error)."""
    names = [f.name for f in fields(DecodingArguments)]
    kwargs = dict(zip(names, values, strict=True))
    for name in ("max_new_tokens", "min_new_tokens", "top_k", "num_beams"):
        kwargs[name] = int(kwargs[name])
    decoding = DecodingArguments(**kwargs)
    try:
        decoding.validate()
    except UserError as exc:
        raise gr.Error(str(exc)) from None
    return decoding


class SessionStops:
    """A stop event per browser session: the Stop button ends that session's generation.

    `session_state()` is a gr.State that holds a random id per page load (a plain string:
    a gr.State value is copied per session, and an Event cannot be copied).
    """

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    @staticmethod
    def session_state(demo: gr.Blocks) -> gr.State:
        state = gr.State("")
        demo.load(lambda: uuid.uuid4().hex, None, state)
        return state

    def start(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events[session] = event
        return event

    def stop(self, session: str) -> None:
        with self._lock:
            event = self._events.get(session)
        if event is not None:
            event.set()


def launch(demo: gr.Blocks, server_name: str = "127.0.0.1", server_port: int | None = None, share: bool = False) -> None:
    """Serve the page; 127.0.0.1 and no public share link unless asked for."""
    if server_name not in ("127.0.0.1", "localhost") or share:
        logger.warning("the page is reachable from other machines (--server_name %s, --share %s)", server_name, share)
    demo.queue(default_concurrency_limit=1)  # one generation at a time on one model
    demo.launch(server_name=server_name, server_port=server_port, share=share, show_error=True, footer_links=[])
