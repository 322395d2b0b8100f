"""User errors: one clear line, no traceback."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix (bad path, bad data line, wrong sizes); the message says how."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a script's main(): a UserError prints `error: ...` on stderr and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            logging.shutdown()
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper
