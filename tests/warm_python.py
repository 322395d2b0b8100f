"""Run repository scripts in processes forked from a warm interpreter.

A `python finetune.py ...` spends most of a tiny-model test importing torch, transformers, peft and
bitsandbytes (seconds of CPU each time: bitsandbytes alone wraps its kernels in `torch.compile` at
import), and the suite starts scripts many times. A fork server imports those libraries once;
every script then runs in a process forked from it: its own pid, exit code, stdout and stderr,
cwd, umask, argv and environment, and a normal interpreter exit (atexit handlers, flushed files).
What a fork cannot give is an environment read at import time, so a call whose environment
differs from the server's in such a variable (below) starts a fresh interpreter instead.
Tests about a process's life (signals, servers, terminals) start their own interpreters.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Variables read when an interpreter starts or a preloaded library is imported (thread pools, search
# paths, hash seed, cache and offline settings): a call whose values differ from the server's gets a
# fresh interpreter. Every other variable (API keys, WANDB_*, the data cache folder, what libraries
# set in the test process as it runs) is read later, so the forked script sees the call's value.
IMPORT_TIME_PREFIXES = (
    "PYTHON", "OMP_", "MKL_", "KMP_", "LD_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DATASETS_",
    "TORCH", "PYTORCH_", "BNB_", "CUDA_", "XDG_", "HOME", "TMPDIR", "TOKENIZERS_",
)  # fmt: skip
# Set by libraries in the test process as they run, and read only later (so a fork is still right):
# torch.cuda.is_available() reads the first (DeepSpeed sets it); inductor reads its cache folder when it
# compiles (bitsandbytes' import sets it); Intel OpenMP reads KMP_DUPLICATE_LIB_OK when a second runtime
# loads, hf-xet its setting when it downloads (lm_eval's import sets both).
READ_LATER = frozenset({"PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_CACHE_DIR", "KMP_DUPLICATE_LIB_OK", "HF_XET_HIGH_PERFORMANCE"})

PRELOAD = """
import torch, transformers, peft, datasets, accelerate, safetensors, sentencepiece, bitsandbytes
from transformers import Trainer, TrainingArguments, AutoModelForCausalLM, AutoTokenizer
import transformers.models.llama.modeling_llama
"""

SERVER = r"""
import json, os, runpy, sys
control_in = os.fdopen(os.dup(0), "r")
control_out = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1):  # the scripts' stdio is set per call; the control pipes live on other descriptors
    os.dup2(null, fd)
exec(PRELOAD)  # after the redirection: what the libraries print must not reach the control pipe


def run(request):
    control_in.close()
    control_out.close()
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    stdin = os.open(request["stdin"] or os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    args = request["args"]
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        sys.path[0] = ""
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.argv = list(args)
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
        runpy.run_path(args[0], run_name="__main__")
    sys.exit(0)


for line in control_in:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        run(request)  # never returns: the script's exit (or exception) ends this process normally
    control_out.write(json.dumps({"pid": pid}) + "\n")
    control_out.flush()
    _, status = os.waitpid(pid, 0)
    control_out.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
    control_out.flush()
"""


class WarmPython:
    """One fork server per test process, started on first use."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"PRELOAD = {PRELOAD!r}\n{SERVER}"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        self.replies = b""
        atexit.register(self.close)

    def fits(self, env: dict[str, str]) -> bool:
        keys = {k for k in self.env.keys() | env.keys() if k.startswith(IMPORT_TIME_PREFIXES) and k not in READ_LATER}
        return self.process.poll() is None and all(self.env.get(k) == env.get(k) for k in keys)

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float, stdin: str | None) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="warm-python-") as folder:
            files = {name: Path(folder) / name for name in ("stdin", "stdout", "stderr")}
            for path in files.values():
                path.touch()
            if stdin is not None:
                files["stdin"].write_text(stdin, encoding="utf-8")
            umask = os.umask(0)
            os.umask(umask)
            request = {"args": args, "cwd": str(cwd), "env": env, "umask": umask, "stdin": str(files["stdin"]) if stdin is not None else None}
            request.update(stdout=str(files["stdout"]), stderr=str(files["stderr"]))
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            pid = self.reply(None)["pid"]
            try:
                returncode = self.reply(timeout)["returncode"]
                timed_out = False
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                returncode, timed_out = self.reply(None)["returncode"], True
            out, err = (files[name].read_text(encoding="utf-8") for name in ("stdout", "stderr"))
        if timed_out:
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout, output=out, stderr=err)
        return subprocess.CompletedProcess([sys.executable, *args], returncode, out, err)

    def reply(self, timeout: float | None) -> dict:
        """The server's next JSON line; TimeoutError when none came within `timeout` seconds."""
        while b"\n" not in self.replies:
            ready, _, _ = select.select([self.process.stdout], [], [], timeout)
            if not ready:
                raise TimeoutError
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("the warm interpreter (tests/warm_python.py) exited")
            self.replies += chunk
        line, self.replies = self.replies.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a loaded machine: the server's exit is not worth failing a run over
                self.process.kill()
                self.process.wait()


_server: WarmPython | None = None
_server_env: dict[str, str] | None = None


def set_server_environment(env: dict[str, str]) -> None:
    """The environment the fork server is started with (on first use): the session's, not that
    of whichever test happens to start a script first."""
    global _server_env
    _server_env = dict(env)


def run_python(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *args], capture_output=True, text=True, ...)`, forked from the
    warm interpreter when the environment allows it."""
    global _server
    if _server is None:
        _server = WarmPython(_server_env if _server_env is not None else env)
    forked = bool(args) and (args[0].endswith(".py") or args[0] in ("-m", "-c")) and _server.fits(env)
    if os.environ.get("WARM_PYTHON_LOG"):  # which calls got a fresh interpreter, and why
        differing = sorted(k for k in _server.env.keys() | env.keys() if _server.env.get(k) != env.get(k))
        with open(os.environ["WARM_PYTHON_LOG"], "a", encoding="utf-8") as log:
            log.write(f"{'forked' if forked else 'fresh'} {args[:1]} {differing}\n")
    if forked:
        return _server.run(args, cwd, env, timeout, stdin)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
