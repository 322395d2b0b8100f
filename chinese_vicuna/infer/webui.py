"""Gradio pieces shared by generate.py and chat.py: decoding controls, a stop button and a
private save folder per Gradio session, user mistakes as one-line page errors, launching on
127.0.0.1 unless told otherwise. Their words come from chinese_vicuna/infer/i18n.py in the
language of --ui_language.

A session is Gradio's `request.session_hash`: one per page load, and one per API client
(`gradio_client.Client`), which never runs the page's load events.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import threading
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any

# No usage reports or version checks from the page's server.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # re-exported: scripts import it from here, after the setting above

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.i18n import Messages
from chinese_vicuna.model.rope import context_length

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


def page_error(message: object) -> gr.Error:
    """A user mistake on a page: shown in the page, one line in the server console, no traceback."""
    logger.warning("page: %s", message)
    return gr.Error(str(message), print_exception=False)


def decoding_from_values(values: tuple[Any, ...]) -> DecodingArguments:
    """The controls' values back into DecodingArguments (a bad value or combination → a page error)."""
    names = [f.name for f in fields(DecodingArguments)]
    kwargs = dict(zip(names, values, strict=True))
    try:
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "num_beams"):
            kwargs[name] = int(kwargs[name])
        for name in ("temperature", "top_p", "repetition_penalty"):
            kwargs[name] = float(kwargs[name])
        decoding = DecodingArguments(**kwargs)
        decoding.validate()
    except (TypeError, ValueError, OverflowError) as exc:  # an API client's None, "abc", inf
        raise page_error(f"decoding parameters: {exc}") from None
    except UserError as exc:
        raise page_error(exc) from None
    return decoding


def check_context(model: Any, prompt_tokens: int, decoding: DecodingArguments) -> None:
    """The prompt plus max_new_tokens must fit the model's context (a page error if not)."""
    context = context_length(model.config) if hasattr(model, "config") else None
    if context and prompt_tokens + decoding.max_new_tokens > context:
        raise page_error(
            f"the input is {prompt_tokens} tokens and max_new_tokens is {decoding.max_new_tokens}, "
            f"together more than the model's context of {context} tokens: shorten the input or lower max_new_tokens"
        )


def session_of(request: gr.Request | None) -> str:
    """The Gradio session of a call (a fresh id if Gradio gave none, so it is never shared)."""
    return (request.session_hash if request is not None else None) or uuid.uuid4().hex


class SessionStops:
    """A stop event per Gradio session: the Stop button ends that session's generation only."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, request: gr.Request | None) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events[session_of(request)] = event
        return event

    def stop(self, request: gr.Request) -> None:
        with self._lock:
            event = self._events.get(session_of(request))
        if event is not None:
            event.set()

    def end(self, request: gr.Request) -> None:
        """The session is gone (demo.unload): stop what it started and forget it."""
        with self._lock:
            event = self._events.pop(session_of(request), None)
        if event is not None:
            event.set()


class SessionFolders:
    """A private folder per Gradio session for the files it saves; removed when the session
    ends (`demo.unload`) and, with all others, when the server exits."""

    def __init__(self, prefix: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))  # 0700: per-user data
        self._folders: dict[str, Path] = {}
        self._lock = threading.Lock()
        atexit.register(shutil.rmtree, self.root, True)
        logger.info("files saved from the page go to %s, a folder per session (removed when it ends and at exit)", self.root)

    def new_file(self, request: gr.Request | None, prefix: str, suffix: str) -> Path:
        """An empty file of its own in the session's folder: unique per save, never reused."""
        session = session_of(request)
        with self._lock:
            folder = self._folders.get(session)
            if folder is None or not folder.is_dir():
                # a folder made here, never a name built from the client's session id
                folder = self._folders[session] = Path(tempfile.mkdtemp(dir=self.root))
        fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
        os.close(fd)
        return Path(name)

    def end(self, request: gr.Request) -> None:
        with self._lock:
            folder = self._folders.pop(session_of(request), None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def launch(
    demo: gr.Blocks,
    server_name: str = "127.0.0.1",
    server_port: int | None = None,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    css: str | None = None,
) -> None:
    """Serve the page; 127.0.0.1 and no public share link unless asked for; `auth` (user, password) asks for a login."""
    if server_name not in ("127.0.0.1", "localhost") or share:
        logger.warning("the page is reachable from other machines (--server_name %s, --share %s)", server_name, share)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a service manager, a test) stops the server as Ctrl-C does: Gradio closes it,
        # launch returns and atexit clean-ups (the sessions' save folders) run
        signal.signal(signal.SIGTERM, _interrupt)
    demo.queue(default_concurrency_limit=1)  # one generation at a time on one model
    demo.launch(server_name=server_name, server_port=server_port, share=share, auth=auth, css=css, show_error=True, footer_links=[])
