"""User errors: one clear line, no traceback; Ctrl-C: a clean stop."""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import PurePath
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C
_MAIN_DEPTH = 0  # nested exit_on_user_error mains (a tool calling a script's main)


class UserError(Exception):
    """A problem the user can fix (bad path, bad data line, wrong sizes); the message says how."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says at which step and how to resume."""


# OS errors a user causes (a path, a permission, a full disk), by errno: what to do about each.
OS_ERROR_FIXES = {
    errno.ENOENT: "not found; check the path",
    errno.EISDIR: "is a folder where a file is expected; give a file",
    errno.ENOTDIR: "a part of this path is a file, not a folder; check the path",
    errno.EEXIST: "already exists and is not a folder; check the path",
    errno.EACCES: "permission denied; check its permissions or choose another path",
    errno.EPERM: "operation not permitted; check its permissions or choose another path",
    errno.ENOSPC: "no space left on the device; free some space or write somewhere else",
    errno.EDQUOT: "disk quota exceeded; free some space or write somewhere else",
    errno.EROFS: "read-only file system; write somewhere else",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop); fix or remove the link",
    errno.ENAMETOOLONG: "file name too long; use a shorter path",
}


# Below this many free bytes, a write that failed without saying why failed for want of space.
NEARLY_FULL = 1 << 20


@contextlib.contextmanager
def disk_full_as_os_error(folder: str | os.PathLike) -> Iterator[None]:
    """Writers that hide ENOSPC in their own exceptions (safetensors' `SafetensorError: ... No space left
    on device (os error 28)`, torch.save's `RuntimeError: ... unexpected pos`) raise an OSError ENOSPC
    naming `folder` instead, which `exit_on_user_error` reports in one line."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        full = "No space left on device" in str(exc) or "os error 28" in str(exc)
        if not full:
            with contextlib.suppress(OSError):
                stat = os.statvfs(folder)
                full = stat.f_bavail * stat.f_frsize < NEARLY_FULL
        if not full:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(folder)) from exc


def _path_in_traceback(tb: TracebackType | None) -> str | None:
    """The file an error happened on, when the exception does not say: an open file or a path held by
    one of the innermost frames (a decode error inside `Path.read_text` or `f.read()`)."""
    frames = [frame for frame, _ in traceback.walk_tb(tb)][::-1][:4]
    for frame in frames:
        for value in frame.f_locals.values():
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                return value.name
            if isinstance(value, PurePath):
                return os.fspath(value)
    return None


def user_error_line(exc: BaseException) -> str | None:
    """One line for an error the user caused and can fix, or None for anything else (a bug keeps its traceback)."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        path = _path_in_traceback(exc.__traceback__) or "an input file"
        return f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
    if isinstance(exc, OSError) and exc.errno in OS_ERROR_FIXES:
        path = exc.filename if exc.filename is not None else _path_in_traceback(exc.__traceback__)
        where = f"{os.fspath(path)}: " if path is not None else ""
        return f"{where}{OS_ERROR_FIXES[exc.errno]}"
    return None


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a script's main(): a user-caused error (UserError, a missing or unwritable path, a full
    disk, a file that is not UTF-8) prints `error: ...` on stderr and exits with code 2; Ctrl-C prints
    one line (training: where it stopped and how to resume) and exits with 130. Anything else is a
    bug and keeps its traceback. The output folders the run locked are let go when the outermost main()
    ends (chinese_vicuna/outputlock.py), so a test or a tool may run scripts one after another in one process."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> T:
        global _MAIN_DEPTH
        _MAIN_DEPTH += 1
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt as exc:
            logging.shutdown()
            print(str(exc) if isinstance(exc, TrainingInterrupted) else "interrupted", file=sys.stderr, flush=True)
            raise SystemExit(INTERRUPTED_EXIT) from None
        except Exception as exc:
            line = user_error_line(exc)
            if line is None:
                raise
            logging.shutdown()
            print(f"error: {line}", file=sys.stderr, flush=True)
            raise SystemExit(USER_ERROR_EXIT) from None
        finally:
            _MAIN_DEPTH -= 1
            if _MAIN_DEPTH == 0:
                from chinese_vicuna.outputlock import release_output_folders

                release_output_folders()

    return wrapper
