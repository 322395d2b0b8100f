"""tools/self_instruct.py against a scripted local OpenAI-style endpoint, spoken to by the openai client."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
from openai_stub import StubServer

from chinese_vicuna.datatools.dedupe import NearDuplicateIndex, lcs_length, rouge_l, rouge_tokens
from chinese_vicuna.datatools.ratelimit import SlidingWindowLimiter
from chinese_vicuna.datatools.selfinstruct import build_prompt, parse_records, retry_after_seconds, to_alpaca
from conftest import REPO, read_jsonl, run_script

KEY = "sk-test-secret-0123456789"
HOSTILE = ["429", "fenced", "500", "prose", "repeat", "drop_fields", "truncated", "429", "prose_around", "500", "jsonl", "repeat"]


def max_in_window(times: list[float], window: float) -> int:
    """The most start times in any half-open window [t, t + window)."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def assert_unique_valid(records: list[dict], issued: list[dict]) -> None:
    for r in records:
        assert set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"]
        assert r in issued  # never a record with a dropped field or one cut off by truncation
    keys = [r["instruction"] + "\n" + r["input"] for r in records]
    assert len(set(keys)) == len(keys)
    toks = [rouge_tokens(k) for k in keys]
    assert all(rouge_l(a, b) < 0.7 for a, b in itertools.combinations(toks, 2))


# --------------------------------------------------------------------------------------------
# Parsing, validation, limiter, similarity (pure functions)
# --------------------------------------------------------------------------------------------
def test_parse_records_handles_what_models_return() -> None:
    rec = {"instruction": "介绍一下长城。", "input": "", "output": "长城是……"}
    two = [rec, {**rec, "instruction": "介绍一下故宫。"}]
    plain = json.dumps(two, ensure_ascii=False)
    assert parse_records(plain) == two
    assert parse_records("好的：\n```json\n" + plain + "\n```\n还需要更多吗？") == two
    assert parse_records("以下是数据：" + plain + " 以上是全部。") == two
    assert parse_records("\n".join(json.dumps(r, ensure_ascii=False) for r in two)) == two
    assert parse_records(json.dumps({"data": two}, ensure_ascii=False)) == two
    assert parse_records(plain[: plain.rfind("故宫") + 1]) == [rec]  # truncated: the whole first record survives
    assert parse_records("抱歉，我不能这样做。") == []


def test_to_alpaca_validates_and_names_the_reason() -> None:
    assert to_alpaca({"指令": " 写一首诗 ", "输入": "无", "输出": "床前明月光"}) == (
        {"instruction": "写一首诗", "input": "", "output": "床前明月光"},
        "",
    )
    assert to_alpaca({"instruction": "x"}) == (None, "missing output")
    assert to_alpaca({"output": "x"}) == (None, "missing instruction")
    assert to_alpaca({"instruction": " ", "output": "x"}) == (None, "empty instruction")
    assert to_alpaca({"instruction": "x", "output": ["a"]}) == (None, "a field is not a string")
    assert to_alpaca("x") == (None, "not an object")


def test_prompt_samples_topics_and_shows_seed_examples() -> None:
    seed = {"instruction": "把下面的句子翻译成英文。", "input": "我爱北京。", "output": "I love Beijing."}
    a = build_prompt(random.Random(1), 20, "zh", [seed])
    b = build_prompt(random.Random(2), 20, "zh")
    assert "20 条" in a and json.dumps(seed, ensure_ascii=False) in a and "参考示例" in a
    assert a.split("要求")[1][:120] != b.split("要求")[1][:120]  # other topics / task types
    assert "Write 5 diverse tasks" in build_prompt(random.Random(1), 5, "en")


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({}) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += max(seconds, 1e-6)


def test_limiter_never_exceeds_the_limit_in_any_window_on_a_fake_clock() -> None:
    fake = FakeClock()
    limiter = SlidingWindowLimiter(7, window=60.0, clock=fake.clock, sleep=fake.sleep)
    starts = []
    for i in range(50):
        fake.now += [0.0, 3.0, 11.5, 0.2][i % 4]  # bursts and gaps
        starts.append(limiter.acquire())
    assert max_in_window(starts, 60.0) == 7
    # and it is not slower than it must be: the 8th start comes exactly one window after the 1st
    assert starts[7] == pytest.approx(starts[0] + 60.0)


def test_limiter_holds_across_threads() -> None:
    fake = FakeClock()
    limiter = SlidingWindowLimiter(5, window=60.0, clock=fake.clock, sleep=fake.sleep)
    starts: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            t = limiter.acquire()
            with lock:
                starts.append(t)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(starts) == 40 and max_in_window(starts, 60.0) == 5


def test_bit_parallel_lcs_and_index_agree_with_brute_force() -> None:
    rng = random.Random(0)

    def dp(a: list[str], b: list[str]) -> int:
        row = [0] * (len(b) + 1)
        for x in a:
            prev, row = row, [0]
            for j, y in enumerate(b):
                row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        return row[-1]

    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 25))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 25))]
        assert lcs_length(a, b) == dp(a, b)
    index, kept = NearDuplicateIndex(0.7), []
    for _ in range(600):  # a small alphabet makes many near pairs
        t = [rng.choice("abcdefgh") for _ in range(rng.randint(1, 12))]
        found = index.find(t) is not None
        assert found == any(rouge_l(t, k) >= 0.7 for k in kept)
        if not found:
            index.add(t)
            kept.append(t)
    assert 50 < len(kept) < 600
    assert rouge_tokens("把Hello World翻译成中文！") == ["把", "hello", "world", "翻", "译", "成", "中", "文"]


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
def test_hostile_endpoint_gives_exactly_n_unique_valid_records(tmp_path: Path) -> None:
    out = tmp_path / "gen.jsonl"
    with StubServer(HOSTILE, per_reply=3) as server:
        proc = run_script(
            "tools/self_instruct.py", "--api_base", server.base, "--model", "stub-model", "--num_samples", "17",
            "--output_file", str(out), "--requests_per_minute", "1000", "--concurrency", "1", "--progress", "false",
            "--records_per_request", "3",
            env={"OPENAI_API_KEY": KEY},
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(out)
    assert len(records) == 17
    assert_unique_valid(records, server.issued)
    # the key went to the server and nowhere else
    assert all(auth == f"Bearer {KEY}" for _, _, auth in server.arrivals)
    assert KEY not in proc.stdout + proc.stderr and KEY not in out.read_text(encoding="utf-8")
    # every scripted behaviour was met, and the reasons were counted
    assert [b for _, b, _ in server.arrivals[: len(HOSTILE)]] == HOSTILE
    summary = proc.stdout
    for reason in ("'duplicate': 4", "'near_duplicate': 2", "'invalid: missing output': 1", "'invalid: missing instruction': 1",
                   "'invalid: empty instruction': 1", "'replies with no JSON record': 1", "'rate_limited (429)': 2",
                   "'server errors (500)': 2"):  # fmt: skip
        assert reason in summary, summary
    # Retry-After: 1 was honoured: the retry after each 429 arrived at least a second later
    for (t0, b0, _), (t1, _, _) in itertools.pairwise(server.arrivals):
        if b0 == "429":
            assert t1 - t0 >= 1.0
    assert max_in_window([t for t, _, _ in server.arrivals], 60.0) <= 1000


def test_rate_limit_end_to_end_with_a_short_window(tmp_path: Path) -> None:
    """The same run, in process, with a limiter of 3 per 2 s: the starts obey it and the server saw each one."""
    from chinese_vicuna.datatools.selfinstruct import SelfInstructConfig, generate

    class Recording(SlidingWindowLimiter):
        log: ClassVar[list[float]] = []

        def acquire(self) -> float:
            t = super().acquire()
            self.log.append(t)
            return t

    limiter = Recording(3, window=2.0)
    with StubServer(["500", "good", "good", "500", "good", "good", "good"], per_reply=2) as server:
        cfg = SelfInstructConfig(model="m", num_samples=9, output_file=str(tmp_path / "o.jsonl"), api_base=server.base,
                                 concurrency=3, records_per_request=2, progress=False)  # fmt: skip
        result = generate(cfg, limiter=limiter)
    assert result.kept == 9 and len(read_jsonl(tmp_path / "o.jsonl")) == 9
    assert len(limiter.log) == len(server.arrivals) >= 7
    assert max_in_window(limiter.log, 2.0) <= 3


def test_killed_run_keeps_every_line_and_resumes_to_exactly_n(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from self_instruct import main

    out = tmp_path / "gen.jsonl"
    with StubServer(["fenced", "repeat", "drop_fields"], per_reply=2, delay=0.3) as server:
        args = ["--api_base", server.base, "--model", "m", "--num_samples", "16", "--output_file", str(out),
                "--requests_per_minute", "1000", "--concurrency", "1", "--records_per_request", "2", "--progress", "false"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "tools/self_instruct.py", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if out.is_file() and out.read_bytes().count(b"\n") >= 4:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        before = out.read_text(encoding="utf-8").splitlines()
        assert 4 <= len(before) < 16
        with out.open("a", encoding="utf-8") as f:
            f.write('{"instruction": "半行')  # a line cut off by the kill
        main(args)  # the same command again (in process: the start-up of a second interpreter is slow here)
    after = out.read_text(encoding="utf-8").splitlines()
    assert after[: len(before)] == before and len(after) == 16
    assert_unique_valid([json.loads(x) for x in after], server.issued)
    assert "incomplete last line" in caplog.text
    # a third run has nothing to do and sends nothing
    with StubServer([]) as idle:
        main([idle.base if a == server.base else a for a in args])
        assert idle.arrivals == []
    assert out.read_text(encoding="utf-8").splitlines() == after


def test_user_errors_end_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from self_instruct import main

    base = ["--api_base", "http://127.0.0.1:9/v1", "--model", "m", "--output_file", str(tmp_path / "x.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--num_samples", "0"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == "error: --num_samples 0: must be at least 1"
    (tmp_path / "x.jsonl").write_text('{"text": "not alpaca"}\n', encoding="utf-8")
    with pytest.raises(SystemExit):
        main([*base, "--num_samples", "3"])
    assert "x.jsonl:1: not an alpaca record (missing instruction); pick another --output_file" in capsys.readouterr().err
