"""serve.py under hostile and careless use: a bad request never harms its neighbours, a broken
adapter never enters the engine, a client that leaves frees its slot at once, a huge prompt does
not stall the event loop, SIGTERM stops the server in seconds, and no error body carries internal
text (no traceback in the log either)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from conftest import run_script
from serve_helpers import ANSWERS_A, INSTRUCTIONS, KEY, api_client, running_server

openai = pytest.importorskip("openai")

BASE = "base"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


def server_log(url: str) -> str:
    port = url.rsplit(":", 1)[1]
    return (Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{port}.log").read_text(encoding="utf-8", errors="replace")


def health(url: str) -> dict:
    return httpx.get(url + "/health", headers=HEADERS, timeout=30).json()


def wait_until(url: str, condition, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        state = health(url)
        if condition(state):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def ask(client, question: str, **kw) -> str:
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="a", messages=[{"role": "user", "content": question}], **kw).choices[0].message.content


# --------------------------------------------------------------------------------------------
# Broken adapters (made from the good one)
# --------------------------------------------------------------------------------------------
def broken_adapter(good: Path, folder: Path, how: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(good, folder)
    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if how == "cut-config":
        text = config.read_text(encoding="utf-8")
        config.write_text(text[: len(text) // 2], encoding="utf-8")
    elif how == "cut-weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "wrong-shapes":
        tensors = load_file(str(weights))
        tensors = {k: torch.cat([v, v[:, :1]], dim=1) if ".lora_A." in k else v for k, v in tensors.items()}
        save_file(tensors, str(weights))
    elif how == "nan-weights":
        tensors = load_file(str(weights))
        key = next(k for k in tensors if ".lora_B." in k)
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, str(weights))
    elif how == "not-a-peft-config":
        config.write_text(json.dumps({"peft_type": "NO_SUCH_TYPE", "r": 8}), encoding="utf-8")
    return folder


BROKEN = ["cut-config", "cut-weights", "wrong-shapes", "nan-weights", "not-a-peft-config"]


@pytest.mark.parametrize("how", ["cut-config", "cut-weights", "wrong-shapes"])
def test_a_broken_adapter_is_refused_at_start_up_in_one_line(tiny_model_dir: Path, two_loras, tmp_path: Path, how: str) -> None:
    bad = broken_adapter(two_loras["a"], tmp_path / "bad", how)
    proc = run_script("serve.py", "--base_model", str(tiny_model_dir), "--lora_modules", f"bad={bad}", "--port", "1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert "LoRA 'bad'" in errors[0]


def test_a_port_out_of_range_is_one_line() -> None:
    proc = run_script("serve.py", "--base_model", "/nonexistent", "--port", "99999")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--port 99999" in errors[0], proc.stderr


# --------------------------------------------------------------------------------------------
# One server for the rest
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_root(two_loras, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-root")
    shutil.copytree(two_loras["a"], root / "good")
    for how in BROKEN:
        broken_adapter(two_loras["a"], root / how, how)
    (root / "escape").symlink_to(two_loras["a"])  # inside the root, pointing outside it
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, two_loras, lora_root: Path):
    args = ["--base_model", str(tiny_model_dir), "--served_model_name", BASE, "--lora_modules", f"a={two_loras['a']}"]
    args += ["--max_batch_size", "16", "--max_queue", "100", "--max_tokens_limit", "1000", "--max_prompt_tokens", "512"]
    args += ["--enable_lora_loading", "true", "--lora_root", str(lora_root)]
    with running_server(*args, env={"CHINESE_VICUNA_API_KEY": KEY}) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return api_client(server)


BAD_BODIES = {
    "seed beyond 64 bits": {"seed": 2**70, "temperature": 1.0},
    "temperature 1e-300": {"temperature": 1e-300},
    "max_tokens true": {"max_tokens": True},
    "stream 'yes'": {"stream": "yes"},
    "n as a string": {"n": "2"},
    "logit_bias out of range": {"logit_bias": {"5": 1000}},
    "top_logprobs without logprobs": {"top_logprobs": 2},
}
RAW_BAD = {
    "100,000-deep JSON": "[" * 100_000 + "]" * 100_000,
    "5000-digit integer": '{"model": "a", "messages": [{"role": "user", "content": "x"}], "seed": ' + "9" * 5000 + "}",
    "NaN": '{"model": "a", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "not UTF-8": b'{"model": "\xff"}',
}


@pytest.mark.parametrize("case", [*BAD_BODIES, *RAW_BAD])
def test_a_bad_request_beside_three_good_ones(server, client, case: str) -> None:
    url, _ = server
    if case in BAD_BODIES:
        body = {"model": "a", "messages": [{"role": "user", "content": INSTRUCTIONS[0]}], **BAD_BODIES[case]}
        content = json.dumps(body)
    else:
        content = RAW_BAD[case]

    def bad() -> httpx.Response:
        return httpx.post(url + "/v1/chat/completions", content=content, headers=HEADERS, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        good = [pool.submit(ask, client, q) for q in INSTRUCTIONS[1:4]]
        reply = pool.submit(bad).result()
        answers = [f.result() for f in good]
    assert answers == ANSWERS_A[1:4]
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == OPENAI_ERROR_KEYS and error["type"] == "invalid_request_error"
    assert "Traceback" not in reply.text and "Error:" not in error["message"]


def test_oversized_body_is_413(server) -> None:
    url, _ = server
    reply = httpx.post(url + "/v1/completions", content=b"x" * (16 * 2**20 + 1), headers=HEADERS, timeout=60)
    assert reply.status_code == 413 and set(reply.json()["error"]) == OPENAI_ERROR_KEYS


def test_run_time_adapters_are_validated_and_confined_to_the_root(server, client, lora_root: Path, tmp_path: Path) -> None:
    url, _ = server

    def load(name: str, path: str) -> httpx.Response:
        return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=HEADERS, timeout=60)

    for how in BROKEN:
        reply = load(how, how)
        assert reply.status_code == 400, (how, reply.text)
        assert "LoRA" in reply.json()["error"]["message"] and "Traceback" not in reply.text
    served = [m.id for m in client.models.list().data]
    assert not set(BROKEN) & set(served)
    # outside the root: the same answer whether the folder exists or not
    outside = tmp_path / "exists"
    outside.mkdir()
    answers = {load("x", p).text for p in (str(outside), "/no/such/folder", "../" * 8 + "etc", "escape", str(lora_root / "escape"))}
    assert len(answers) == 1 and "--lora_root" in answers.pop()
    # a good one under the root works, and the others kept answering throughout
    assert load("good", "good").status_code == 200
    good = client.chat.completions.create(model="good", messages=[{"role": "user", "content": INSTRUCTIONS[1]}], temperature=0)
    assert good.choices[0].message.content == ANSWERS_A[1]
    assert ask(client, INSTRUCTIONS[2]) == ANSWERS_A[2]


def raw_request(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode("utf-8")
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head.encode("ascii") + data)
    return sock


def test_disconnected_non_stream_clients_are_cancelled_queued_or_running(server, client) -> None:
    """100 clients ask for 1000 tokens each (16 run, 84 wait), then all hang up: the engine is idle
    after a handful of steps, where finishing them would take thousands."""
    url, _ = server
    before = health(url)
    body = {"model": BASE, "prompt": "很久很久以前", "max_tokens": 1000, "temperature": 0}
    socks = [raw_request(url, body) for _ in range(100)]
    started = wait_until(url, lambda s: s["waiting"] + s["inflight"] >= 100 and s["active"] > 0)
    for sock in socks:
        sock.close()
    idle = wait_until(url, lambda s: s["active"] == 0 and s["waiting"] == 0 and s["inflight"] == 0)
    steps_after_close = idle["steps"] - started["steps"]
    print(f"\n100 disconnected clients: idle {steps_after_close} decoding steps after they hung up")
    assert steps_after_close < 100  # each running one alone would take 1000
    assert idle["cancelled"] - before["cancelled"] == 100
    assert ask(client, INSTRUCTIONS[0]) == ANSWERS_A[0]


def timed_health(url: str) -> tuple[float, dict]:
    start = time.perf_counter()
    state = health(url)
    return time.perf_counter() - start, state


def test_health_answers_while_a_5_mb_prompt_arrives(server) -> None:
    """A prompt that cannot fit --max_prompt_tokens is refused without being tokenized, and
    /health answers meanwhile."""
    url, _ = server
    prompt = "hello world " * (5 * 2**20 // 12)
    result: queue.Queue = queue.Queue()

    def send() -> None:
        body = {"model": BASE, "prompt": prompt, "max_tokens": 1}
        result.put(httpx.post(url + "/v1/completions", json=body, headers=HEADERS, timeout=120))

    thread = threading.Thread(target=send)
    thread.start()
    latencies, tokenizing = [], []
    while thread.is_alive():
        latency, state = timed_health(url)
        latencies.append(latency)
        tokenizing.append(state["tokenizing"])
    thread.join()
    reply = result.get()
    assert reply.status_code == 400 and "max_prompt_tokens" in reply.json()["error"]["message"]
    assert not any(tokenizing)  # refused by its length alone
    assert statistics.median(latencies) < 0.5, latencies


def test_sigterm_stops_a_busy_server_within_5_seconds(tiny_model_dir: Path) -> None:
    """Tokenizing a large prompt (the event loop keeps answering /health meanwhile), 16 requests
    decoding, more queued and a stream open: SIGTERM, and the process is gone in at most 5 s."""
    args = ["--base_model", str(tiny_model_dir), "--served_model_name", BASE, "--max_batch_size", "16", "--max_queue", "64"]
    args += ["--max_tokens_limit", "1000", "--max_prompt_tokens", "100000000", "--max_request_bytes", str(64 * 2**20)]
    with running_server(*args, env={"CHINESE_VICUNA_API_KEY": KEY}) as (url, proc):
        # a 1 MB prompt is tokenized on a worker thread: /health answers while it is in progress. Were
        # it tokenized on the event loop, one answer would wait for the whole tokenization.
        start = time.monotonic()
        big = threading.Thread(
            target=lambda: httpx.post(
                url + "/v1/completions", json={"model": BASE, "prompt": "hello world " * (2**20 // 12), "max_tokens": 1},
                headers=HEADERS, timeout=300,
            )
        )  # fmt: skip
        big.start()
        during = []
        while big.is_alive():
            latency, state = timed_health(url)
            if state["tokenizing"]:
                during.append(latency)
        big.join()
        request_s = time.monotonic() - start
        print(f"\n/health while a 1 MB prompt was tokenized ({request_s:.2f} s): {len(during)} answers, "
              f"median {statistics.median(during or [0]):.3f} s, slowest {max(during or [0]):.3f} s")  # fmt: skip
        assert len(during) >= 3 and max(during) < request_s / 2, during
        assert statistics.median(during) < 0.5, during
        # busy: decoding, queued, streaming, tokenizing
        stream = httpx.stream("POST", url + "/v1/completions", headers=HEADERS, timeout=60,
                              json={"model": BASE, "prompt": "从前", "max_tokens": 1000, "stream": True})  # fmt: skip
        stream.__enter__()  # headers come with the first token
        socks = [raw_request(url, {"model": BASE, "prompt": "很久很久以前", "max_tokens": 1000, "temperature": 0}) for _ in range(30)]
        wait_until(url, lambda s: s["active"] == 16 and s["waiting"] > 0)
        threading.Thread(
            target=lambda: httpx.post(
                url + "/v1/completions", json={"model": BASE, "prompt": "hello world " * (2**20 // 12), "max_tokens": 1},
                headers=HEADERS, timeout=300,
            ),
            daemon=True,
        ).start()  # fmt: skip
        wait_until(url, lambda s: s["tokenizing"] > 0)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        seconds = time.monotonic() - start
        for sock in socks:
            sock.close()
        stream.__exit__(None, None, None)
        print(f"SIGTERM to exit: {seconds:.2f} s")
        assert proc.returncode is not None and seconds <= 5
        assert "Traceback" not in server_log(url)


def test_no_traceback_in_the_log(server) -> None:
    url, _ = server
    assert "Traceback" not in server_log(url)


# --------------------------------------------------------------------------------------------
# The engine alone: a request that fails while decoding fails alone
# --------------------------------------------------------------------------------------------
def test_a_request_failing_inside_the_batch_fails_alone(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chinese_vicuna.serving.adapters import AdapterRegistry
    from chinese_vicuna.serving.engine import GENERATION_FAILED, BatchEngine, GenerationRequest, SamplingParams

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    engine = BatchEngine(AdapterRegistry(model, tok, {}, "alpaca", 1), tok, max_batch_size=8, max_queue=8)
    prompts = [tok(p).input_ids for p in ("很久很久以前", "从前有座山", "今天天气")]

    def run(jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[str, str | None]]:
        done: list[queue.Queue] = []
        for ids, params in jobs:
            q: queue.Queue = queue.Queue()
            engine.submit(GenerationRequest(ids, None, params, q.put))
            done.append(q)
        out = []
        for q in done:
            text, event = "", None
            while event is None or not event.finish_reason:
                event = q.get(timeout=120)
                text += event.text
            out.append((text, event.finish_reason if event.finish_reason != "error" else event.error))
        return out

    good = [(ids, SamplingParams(max_tokens=40, temperature=0)) for ids in prompts]
    alone = [run([job])[0] for job in good]
    # settings that slipped past validation: each breaks only its own request, at admission or mid-batch
    for bad in (
        SamplingParams(max_tokens=40, temperature=1.0, seed=2**70),
        SamplingParams(max_tokens=40, temperature=1e-300),
        SamplingParams(max_tokens=40, temperature=0, logit_bias={10**6: 1.0}),
    ):
        together = run([*good[:2], (prompts[0], bad), good[2]])
        assert [together[i] for i in (0, 1, 3)] == alone
        assert together[2] == ("", GENERATION_FAILED)
    assert engine.stats()["active"] == 0 and engine.stats()["inflight"] == 0
    engine.close()
