"""One writer per output folder: training, merging, evaluation and the data tools hold a lock on
what they write, so a second run into a folder in use is refused before it touches anything.

The lock is `.{name}.lock` beside the folder (or file) it guards, locked with `flock`: the kernel
releases it when the holder ends in any way (a SIGKILL included), so a stale lock never blocks
(what a killed holder leaves is an unlocked file, taken over by the next run); a holder that
ends normally removes it.
It sits beside, not inside, because a merge replaces the whole folder by a rename. While held it
records the holder (pid, host, start time, command line) for the refusal message. Where the file
system has no `flock` (some network mounts), the record alone decides, with a liveness check of
its pid on this host.

Two lifetimes: `hold_output_folder` keeps the lock for the rest of the script's main() (a training
run: taken when the output folder is prepared, released by `exit_on_user_error` at the end of
main, or by the process's end); `OutputLock` is scoped (a `with` block, e.g. a merge's staging).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError
from chinese_vicuna.files import umask_mode

# Held until the script's main() ends: {lock file: lock}, for this process only (a fork does not inherit them).
_HELD: dict[Path, OutputLock] = {}


def lock_file(path: str | os.PathLike) -> Path:
    target = Path(path).absolute()
    return target.parent / f".{target.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(record: dict[str, Any]) -> str:
    """`pid 1234 (python finetune.py --output_dir out ...), since 2026-01-01 10:00 UTC` from a lock record."""
    command = record.get("command") or "?"
    if len(command) > 200:
        command = command[:197] + "..."
    host = f" on {record['host']}" if record.get("host") and record.get("host") != socket.gethostname() else ""
    since = f", since {record['since']}" if record.get("since") else ""
    return f"pid {record.get('pid', '?')}{host} ({command}){since}"


class OutputLock:
    """An exclusive hold on one output folder or file; `release()` (or the end of a `with`) lets go."""

    def __init__(self, path: str | os.PathLike, flag: str = "--output_dir") -> None:
        self.target = Path(path).absolute()
        self.path = lock_file(path)
        self.fd: int | None = None
        self.pid = os.getpid()  # a forked child inherits the descriptor, not the right to remove the file
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise UserError(self._refusal(flag, self._read_record())) from None
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise
                # no flock here: the record decides (a live pid on this host that is not this process holds it)
                record = self._read_record()
                if (
                    record.get("host") == socket.gethostname()
                    and isinstance(record.get("pid"), int)
                    and record["pid"] != os.getpid()
                    and _alive(record["pid"])
                ):
                    os.close(fd)
                    raise UserError(self._refusal(flag, record)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed that file as it let go: lock the one there now
        self.fd = fd
        self._write_record()

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # non-inheritable: a child script does not hold it
        except OSError as exc:  # named by what the user gave, not the lock file they have not heard of
            raise OSError(exc.errno, exc.strerror, os.fspath(self.target)) from None

    def _refusal(self, flag: str, record: dict[str, Any]) -> str:
        # Never a flag here: --overwrite_output_dir or --resume_from_checkpoint would harm the running run.
        holder = _holder(record) if record else "another process"
        return f"{flag} {self.target}: in use by {holder}; wait for it to end, or choose another {flag}"

    def _read_record(self) -> dict[str, Any]:
        try:
            record = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _write_record(self) -> None:
        assert self.fd is not None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"), 0)
        os.fchmod(self.fd, umask_mode())

    def release(self) -> None:
        if self.fd is not None and self.pid != os.getpid():
            self.fd = None  # a fork's copy: the parent still holds the lock
        if self.fd is not None:
            # removed while still locked, so nothing is left beside the user's files; a process that
            # opened it meanwhile finds, once it gets the lock, that the name is gone and opens anew
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
        _HELD.pop(self.path, None)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def hold_output_folder(path: str | os.PathLike, flag: str = "--output_dir") -> OutputLock:
    """Lock `path` (a folder or a file) for the rest of this script's run, or raise a UserError
    naming the process that writes it now. Holding it again in the same process is a no-op."""
    key = lock_file(path)
    held = _HELD.get(key)
    if held is not None and held.fd is not None:
        return held
    lock = _HELD[key] = OutputLock(path, flag)
    return lock


def release_output_folders() -> None:
    """Let go of every folder `hold_output_folder` took (the end of a script's main)."""
    for lock in list(_HELD.values()):
        lock.release()


# Held past main() (a test or a tool that parsed a recipe's flags itself): let go at the interpreter's exit.
atexit.register(release_output_folders)
