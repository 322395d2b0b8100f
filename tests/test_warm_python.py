"""tests/warm_python.py: a script forked from the warm interpreter behaves as `python script.py`
would (exit codes, output, argv, cwd, umask, environment, atexit, tracebacks, signals, timeouts),
and a call whose environment a preloaded library may have read starts a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from warm_python import run_python

SCRIPT = textwrap.dedent("""
    import atexit, os, sys
    print("argv", sys.argv)
    print("cwd", os.getcwd())
    print("umask", oct(os.umask(0)))
    print("path0", sys.path[0])
    print("name", __name__)
    print("var", os.environ.get("CHINESE_VICUNA_CACHE"))
    print("warm", "torch" in sys.modules)
    print("stdin", sys.stdin.read())
    atexit.register(lambda: print("atexit ran"))
    print("to stderr", file=sys.stderr)
    how = sys.argv[1]
    if how == "raise":
        raise ValueError("bad value 7")
    if how == "exit-message":
        sys.exit("one clear line")
    if how == "kill":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sleep":
        import time
        time.sleep(60)
    sys.exit(int(how))
""")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "probe.py"
    path.parent.mkdir()
    path.write_text(SCRIPT, encoding="utf-8")
    return path


def run(script: Path, how: str, cwd: Path, timeout: float = 120, stdin: str | None = None, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CHINESE_VICUNA_CACHE": "值 1", **extra}
    return run_python([str(script), how], cwd=cwd, env=env, timeout=timeout, stdin=stdin)


def lines(proc: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


def test_a_forked_script_sees_what_a_fresh_interpreter_would(script: Path, tmp_path: Path) -> None:
    assert run(script, "0", cwd=REPO).returncode == 0  # the server runs before the umask changes
    old = os.umask(0o027)
    try:
        proc = run(script, "3", cwd=tmp_path, stdin="输入\n")
    finally:
        os.umask(old)
    seen = lines(proc)
    assert proc.returncode == 3
    assert seen["argv"] == repr([str(script), "3"])
    assert (seen["cwd"], seen["umask"], seen["path0"], seen["name"]) == (str(tmp_path), "0o27", str(script.parent), "__main__")
    assert (seen["var"], seen["stdin"], seen["warm"]) == ("值 1", "输入", "True")
    assert proc.stdout.endswith("atexit ran\n") and proc.stderr == "to stderr\n"


def test_errors_signals_and_timeouts_end_as_in_a_real_process(script: Path, tmp_path: Path) -> None:
    raised = run(script, "raise", cwd=tmp_path)
    assert raised.returncode == 1
    assert "Traceback" in raised.stderr and raised.stderr.endswith("ValueError: bad value 7\n")
    assert "atexit ran" in raised.stdout  # the interpreter exits normally after the traceback
    message = run(script, "exit-message", cwd=tmp_path)
    assert (message.returncode, message.stderr) == (1, "to stderr\none clear line\n")
    assert run(script, "kill", cwd=tmp_path).returncode == -9
    with pytest.raises(subprocess.TimeoutExpired):
        run(script, "sleep", cwd=tmp_path, timeout=3)
    assert run(script, "0", cwd=tmp_path).returncode == 0  # the server goes on after a killed script


def test_an_environment_read_at_import_starts_a_fresh_interpreter(script: Path, tmp_path: Path) -> None:
    threads = "3" if os.environ.get("OMP_NUM_THREADS") != "3" else "2"
    proc = run(script, "0", cwd=tmp_path, OMP_NUM_THREADS=threads)
    assert proc.returncode == 0
    assert lines(proc)["warm"] == "False"  # not forked: nothing was imported before the script
