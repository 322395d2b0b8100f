"""serve.py as a real process on loopback, driven by the official `openai` client: two LoRAs
memorized on the same questions with different answers, batched and one at a time."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from serve_helpers import ANSWERS_A, ANSWERS_B, INSTRUCTIONS, KEY, api_client, rss_mib, running_server

openai = pytest.importorskip("openai")

BASE = "base"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, two_loras: dict[str, Path]):
    args = ["--base_model", str(tiny_model_dir), "--served_model_name", BASE, "--lora_modules"]
    args += [f"{name}={path}" for name, path in two_loras.items()]
    args += ["--max_loras", "2", "--max_batch_size", "16", "--max_queue", "64", "--max_prompt_tokens", "200", "--max_tokens_limit", "300"]
    args += ["--enable_lora_loading", "true", "--lora_root", str(two_loras["a"].parent)]
    with running_server(*args, env={"CHINESE_VICUNA_API_KEY": KEY}) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return api_client(server)


def ask(client, model: str, question: str, **kw) -> str:
    kw.setdefault("temperature", 0)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)
    return reply.choices[0].message.content


def ask_stream(client, model: str, question: str, **kw) -> str:
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], temperature=0, stream=True, **kw)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def health(url: str) -> dict:
    return httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()


def wait_idle(url: str, seconds: float = 15) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        state = health(url)
        if (state["active"] == 0 and state["waiting"] == 0) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_models_lists_the_base_and_both_loras(client) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [BASE, "a", "b"]


def test_each_lora_answers_its_own_memorized_answers(client) -> None:
    assert [ask(client, "a", q) for q in INSTRUCTIONS] == ANSWERS_A
    assert [ask(client, "b", q) for q in INSTRUCTIONS] == ANSWERS_B
    base = [ask(client, BASE, q, max_tokens=20) for q in INSTRUCTIONS]
    assert not set(base) & (set(ANSWERS_A) | set(ANSWERS_B))


def test_streamed_equals_not_streamed(client) -> None:
    for model in ("a", "b", BASE):
        for q in INSTRUCTIONS[:2]:
            assert ask_stream(client, model, q, max_tokens=24) == ask(client, model, q, max_tokens=24)
    # /v1/completions: raw prompt text, streamed and not
    prompt = "### Instruction:\n" + INSTRUCTIONS[0]
    whole = client.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=0)
    pieces = client.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == whole.choices[0].text
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"


def test_usage_and_finish_reason(client) -> None:
    reply = client.chat.completions.create(model="a", messages=[{"role": "user", "content": INSTRUCTIONS[1]}], temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    stream = client.chat.completions.create(
        model="a",
        messages=[{"role": "user", "content": INSTRUCTIONS[1]}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    last = list(stream)[-1]
    assert last.usage.completion_tokens == reply.usage.completion_tokens


def test_sampling_with_a_seed_repeats(client) -> None:
    kw = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 16}
    assert ask(client, BASE, INSTRUCTIONS[0], **kw) == ask(client, BASE, INSTRUCTIONS[0], **kw)


def test_a_wrong_or_missing_key_gets_401(server) -> None:
    url, _ = server
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=url + "/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert httpx.get(url + "/v1/models").status_code == 401


def test_malformed_json_gets_400_and_the_server_keeps_serving(server, client) -> None:
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (
        '{"model": "a", "messages": [',
        "[1, 2]",
        '{"model": "a"}',
        '{"model": "a", "messages": [{"role": "robot", "content": "x"}]}',
    ):
        reply = httpx.post(url + "/v1/chat/completions", content=body, headers=headers, timeout=10)
        assert reply.status_code == 400, body
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert ask(client, "a", INSTRUCTIONS[0]) == ANSWERS_A[0]


def test_instruction_template_takes_one_user_message(client) -> None:
    history = [
        {"role": "user", "content": INSTRUCTIONS[0]},
        {"role": "assistant", "content": ANSWERS_A[0]},
        {"role": "user", "content": INSTRUCTIONS[1]},
    ]
    with pytest.raises(openai.BadRequestError, match="instruction template 'alpaca'"):
        client.chat.completions.create(model="a", messages=history, temperature=0)
    # a system message before the one user message is fine
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": INSTRUCTIONS[2]}]
    assert client.chat.completions.create(model="a", messages=system, temperature=0).choices[0].message.content == ANSWERS_A[2]
    # "b" was saved with a chat template: a conversation is rendered as one
    reply = client.chat.completions.create(model="b", messages=history, temperature=0, max_tokens=16)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_limits_are_400_or_404_with_openai_errors(client) -> None:
    with pytest.raises(openai.BadRequestError, match="max_prompt_tokens"):
        ask(client, "a", "长" * 400)
    with pytest.raises(openai.BadRequestError, match="max_tokens_limit"):
        ask(client, "a", INSTRUCTIONS[0], max_tokens=301)
    with pytest.raises(openai.BadRequestError, match="at most 16 choices"):
        ask(client, "a", INSTRUCTIONS[0], n=17)
    with pytest.raises(openai.NotFoundError):
        ask(client, "no-such-lora", INSTRUCTIONS[0])


def test_sixteen_concurrent_clients_mixed_loras_equal_sequential(server, client) -> None:
    url, _ = server
    jobs = [(("a", "b", BASE)[i % 3], INSTRUCTIONS[i % len(INSTRUCTIONS)]) for i in range(16)]
    start = time.perf_counter()
    sequential = [ask(client, m, q, max_tokens=32) for m, q in jobs]
    seq_s = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda job: ask(client, job[0], job[1], max_tokens=32), jobs))
    conc_s = time.perf_counter() - start
    assert concurrent == sequential
    assert sequential[0] == ANSWERS_A[0] and sequential[1] == ANSWERS_B[1]
    state = wait_idle(url)
    assert (state["active"], state["waiting"]) == (0, 0)
    print(f"\n16 requests: sequential {seq_s:.2f} s, concurrent {conc_s:.2f} s, ratio {seq_s / conc_s:.2f}x")


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client) -> None:
    url, _ = server
    before = health(url)
    stream = client.completions.create(model=BASE, prompt="很久很久以前", max_tokens=300, temperature=0, stream=True, stop=None)
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    state = wait_idle(url)
    assert (state["active"], state["waiting"]) == (0, 0)
    # it was cut short: far fewer than 300 decoding steps ran for it
    assert state["steps"] - before["steps"] < 250
    assert ask(client, "b", INSTRUCTIONS[3]) == ANSWERS_B[3]


def test_closing_one_stream_leaves_another_clients_stream_running(client) -> None:
    """Two clients stream at once; one closes its stream (its request is cancelled): the other's
    request, with an id of its own, runs to the end and equals the same request not streamed."""
    prompt, kw = "很久很久以前", {"model": BASE, "max_tokens": 300, "temperature": 0}
    a, b = (client.completions.create(prompt=prompt, stream=True, **kw) for _ in range(2))
    a_chunks, b_chunks = iter(a), iter(b)
    first_a, first_b = next(a_chunks), next(b_chunks)
    assert first_a.id != first_b.id
    a.close()
    rest = [first_b, *b_chunks]
    whole = client.completions.create(prompt=prompt, **kw).choices[0]
    assert "".join(c.choices[0].text for c in rest if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == [whole.finish_reason]


def test_adapters_load_and_unload_at_run_time(server, client, two_loras) -> None:
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    reply = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(two_loras["a"])}, headers=headers)
    assert reply.status_code == 200, reply.text
    assert "c" in [m.id for m in client.models.list().data]
    assert ask(client, "c", INSTRUCTIONS[1]) == ANSWERS_A[1]  # a third LoRA with --max_loras 2: LRU eviction
    assert len(health(url)["loaded_loras"]) <= 2
    assert ask(client, "a", INSTRUCTIONS[2]) == ANSWERS_A[2] and ask(client, "b", INSTRUCTIONS[2]) == ANSWERS_B[2]
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "c"}, headers=headers).status_code == 200
    with pytest.raises(openai.NotFoundError):
        ask(client, "c", INSTRUCTIONS[1])
    bad = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "/no/such/dir"}, headers=headers)
    assert bad.status_code == 400


@pytest.mark.slow
def test_load_200_requests_32_at_a_time_some_cancelled_some_malformed(server, client) -> None:
    url, proc = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    ask(client, "a", INSTRUCTIONS[0])  # warm
    rss_before = rss_mib(proc.pid)
    expected = {(m, q): ask(client, m, q, max_tokens=32) for m in ("a", "b", BASE) for q in INSTRUCTIONS}
    results: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> str:
        model, q = ("a", "b", BASE)[i % 3], INSTRUCTIONS[i % len(INSTRUCTIONS)]
        if i % 10 == 7:  # malformed
            code = httpx.post(url + "/v1/chat/completions", content='{"model": "a", "messages": ', headers=headers, timeout=30).status_code
            outcome = "malformed-400" if code == 400 else f"malformed-{code}"
        elif i % 10 == 3:  # cancelled mid-stream
            stream = client.completions.create(model=BASE, prompt=q, max_tokens=200, temperature=0, stream=True)
            for j, _ in enumerate(stream):
                if j == 2:
                    break
            stream.close()
            outcome = "cancelled"
        else:
            outcome = "ok" if ask(client, model, q, max_tokens=32) == expected[(model, q)] else "wrong"
        with lock:
            results.append(outcome)
        return outcome

    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(200)))
    seconds = time.perf_counter() - start
    state = wait_idle(url)
    rss_after = rss_mib(proc.pid)
    counts = {k: results.count(k) for k in sorted(set(results))}
    print(f"\nload: 200 requests in {seconds:.1f} s: {counts}; RSS {rss_before:.0f} → {rss_after:.0f} MiB; {state}")
    assert counts == {"ok": 160, "cancelled": 20, "malformed-400": 20}
    assert (state["active"], state["waiting"], state["cache_tokens"]) == (0, 0, 0)
