"""The terminal chats' keyboard (chat.py --cli, tools/cpu_chat.py): line editing and history,
Ctrl-C and Ctrl-D, lines that are not UTF-8, and answers that Ctrl-C stops.

- Arrow keys, Home/End, Ctrl-A/E/K/U and ↑/↓ history work through Python's `readline` (without
  it, as on Windows without pyreadline3, arrow keys would type escape codes into the message).
  The history is this chat's own: nothing is read from or written to disk.
- Ctrl-D or Ctrl-C at the prompt ends the chat (exit status 0 or 130, one line, no traceback);
  Ctrl-C during an answer stops that answer and the prompt comes back.
- A line that is not valid UTF-8 is refused with one line and the chat goes on.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator

from chinese_vicuna.infer.i18n import Messages


class ChatEnded(Exception):
    """The user ended the chat at the prompt; `code` is the process's exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def enable_line_editing() -> bool:
    """Line editing and history for input() on a terminal, and Ctrl-C as KeyboardInterrupt;
    False where readline is missing."""
    if not sys.stdin.isatty():
        return False
    # Python leaves SIGINT ignored when it started so (a job started in the background by a
    # script or a CI runner); on a terminal Ctrl-C must reach the chat
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import readline  # importing it is what makes input() edit lines
    except ImportError:
        return False
    readline.clear_history()  # this chat's lines only
    readline.set_history_length(1000)
    return True


def read_line(prompt: str, t: Messages) -> str:
    """The next line the user types (the prompt shown first); ChatEnded on Ctrl-D / Ctrl-C."""
    while True:
        try:
            line = input(prompt)
        except EOFError:  # Ctrl-D, or the end of piped input
            _end_prompt_line()
            raise ChatEnded(0) from None
        except KeyboardInterrupt:
            _end_prompt_line()
            raise ChatEnded(130) from None
        except UnicodeDecodeError:
            print(t("cli.bad_input"), flush=True)
            continue
        try:  # a C/POSIX locale decodes bad bytes to lone surrogates instead of failing
            line.encode("utf-8")
        except UnicodeEncodeError:
            print(t("cli.bad_input"), flush=True)
            continue
        return line


def _end_prompt_line() -> None:
    if sys.stdin.isatty():  # the cursor is still after the prompt
        print(flush=True)


def print_answer(pieces: Iterator[str]) -> tuple[str, bool]:
    """Print the answer as it comes; Ctrl-C stops it (only it). The text so far, and whether it was stopped."""
    text = ""
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
            text += piece
    except KeyboardInterrupt:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # a generator's finally ends generation
        return text, True
    print(flush=True)
    return text, False
