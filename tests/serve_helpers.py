"""Shared by the serving tests: two LoRAs memorized on the same questions with different
answers, and serve.py started as a real process on a free loopback port."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from conftest import REPO, SAMPLE_INSTRUCT, free_port, memorize_args, read_jsonl, run_script

QUESTIONS = 4
RECORDS = read_jsonl(SAMPLE_INSTRUCT)
# the same questions; LoRA "a" learns the sample answers, LoRA "b" the answers of the next
# four records (alpaca template for a, vicuna_v1.1 saved with b: its turns end in EOS)
ANSWERS_A = [r["output"] for r in RECORDS[:QUESTIONS]]
ANSWERS_B = [r["output"] for r in RECORDS[QUESTIONS : 2 * QUESTIONS]]
INSTRUCTIONS = [r["instruction"] for r in RECORDS[:QUESTIONS]]
KEY = "sk-test-5f2c9a71"


def train_two_loras(base: Path, root: Path) -> dict[str, Path]:
    """finetune.py twice on the same instructions with two answer sets."""
    out = {}
    for name, answers, template in (("a", ANSWERS_A, "alpaca"), ("b", ANSWERS_B, "vicuna_v1.1")):
        data = root / f"{name}.jsonl"
        rows = [{"instruction": q, "input": "", "output": a} for q, a in zip(INSTRUCTIONS, answers)]
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        lora = root / f"lora-{name}"
        args = memorize_args(base, data, lora, epochs=50, save_steps=1000)
        proc = run_script(*args, "--prompt_template", template)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if not (lora / "prompt_template.json").is_file():  # the template travels with the adapter
            shutil.copy(REPO / "chinese_vicuna" / "templates" / f"{template}.json", lora / "prompt_template.json")
        out[name] = lora
    return out



@contextmanager
def running_server(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    """serve.py ARGS on a free port; yields (base_url, process) once /health answers."""
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{port}.log", "w+")  # noqa: SIM115 (closed below)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "serve.py", *args, "--port", str(port)], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"serve.py exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                httpx.get(url + "/health", timeout=2, headers={"Authorization": f"Bearer {KEY}"})
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise AssertionError("serve.py did not start in time") from None
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        text = log.read()
        log.close()
        assert KEY not in text, "the API key was written to the server's log"


def api_client(served: tuple[str, subprocess.Popen]):
    """The official `openai` client for a `running_server` started with KEY."""
    import openai

    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
