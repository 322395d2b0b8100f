"""tools/eval_judge.py and tools/gen_model_answer.py against a scripted OpenAI-compatible endpoint
on 127.0.0.1 (a real HTTP server, spoken to by the official `openai` client), and the local model."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, read_jsonl

QUESTIONS = REPO / "sample" / "eval" / "mt_bench" / "question.jsonl"
SECRET = "sk-test-never-logged-1234"


class ScriptedEndpoint(ThreadingHTTPServer):
    """POST /v1/chat/completions → `script(request_number, body)`, which returns the reply text,
    or (status, text) for an error status. Every request body is kept."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.script: Callable[[int, dict[str, Any]], Any] = lambda n, body: "[[5]]"
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def user_texts(self) -> list[str]:
        return [r["messages"][-1]["content"] for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedEndpoint

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            n = len(self.server.requests)
            self.server.requests.append(body)
            self.server.authorizations.append(self.headers.get("Authorization"))
        reply = self.server.script(n, body)
        status, text = reply if isinstance(reply, tuple) else (200, reply)
        if status == 200:
            payload = {
                "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }  # fmt: skip
        else:
            payload = {"error": {"message": text, "type": "rate_limit" if status == 429 else "server_error"}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("retry-after-ms", "10")  # keeps the client's backoff short in tests
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def endpoint() -> Iterator[ScriptedEndpoint]:
    server = ScriptedEndpoint()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def write_answers(path: Path, model_id: str, make: Callable[[int, int], str]) -> Path:
    """A FastChat answer file answering every sample question, turn t of question q with make(q, t)."""
    lines = []
    for q in read_jsonl(QUESTIONS):
        turns = [make(q["question_id"], t) for t in range(1, len(q["turns"]) + 1)]
        lines.append(
            json.dumps({"question_id": q["question_id"], "answer_id": "x", "model_id": model_id, "choices": [{"index": 0, "turns": turns}]})
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def judge(endpoint: ScriptedEndpoint, out: Path, *argv: str) -> dict:
    from eval_judge import main

    return main(["--questions", str(QUESTIONS), "--judge_api_base", endpoint.url, "--judge_model", "judge-x",
                 "--output_dir", str(out), "--progress", "false", "--parallel", "3", *argv])  # fmt: skip


JUDGED_UNITS = 11  # 5 two-turn questions + 1 one-turn question


def test_single_grade_mean_and_failed_exact(endpoint: ScriptedEndpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    answers = write_answers(tmp_path / "alpha.jsonl", "alpha", lambda q, t: f"回答{q}-{t}")

    def script(n: int, body: dict) -> str:
        q = int(re.findall(r"回答(\d+)-(\d+)", body["messages"][-1]["content"])[-1][0])
        return {2: "The answer is fine. [7]", 6: "I cannot decide."}.get(q, f"Short explanation. Rating: [[{q}]]")

    endpoint.script = script
    results = judge(endpoint, tmp_path / "out", "--mode", "single", "--answers", str(answers), "--judge_api_key", SECRET)
    # ratings 1,1, 7,7 (the [n] fallback), 3,3, 4,4, 5,5; question 6 unparseable
    assert results == {"alpha": {"score": 4.0, "judged": 10, "failed": 1}}
    assert json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8")) == results
    assert len(endpoint.requests) == JUDGED_UNITS
    assert all(r["temperature"] == 0 and r["model"] == "judge-x" for r in endpoint.requests)
    texts = endpoint.user_texts()
    first = next(t for t in texts if "回答1-1" in t and "回答1-2" not in t)
    assert (
        "[Question]\n请写一段不超过一百字的短文，介绍你家乡的春天。\n\n[The Start of Assistant's Answer]\n回答1-1\n[The End of Assistant's Answer]"
        in first
    )
    math_turn1 = next(t for t in texts if "回答4-1" in t and "回答4-2" not in t)
    assert "[The Start of Reference Answer]\n周长 26 厘米，面积 40 平方厘米。\n[The End of Reference Answer]" in math_turn1
    second_turn = next(t for t in texts if "回答3-2" in t)
    assert "### Assistant A:\n回答3-1" in second_turn and "### Reference answer:\n小丽 > 小明 > 小红 > 小刚。" in second_turn
    # the key reached the server, and nowhere else
    assert endpoint.authorizations == [f"Bearer {SECRET}"] * JUDGED_UNITS
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert not any(SECRET in p.read_text(encoding="utf-8") for p in (tmp_path / "out").iterdir())


def test_rerun_does_not_rejudge(endpoint: ScriptedEndpoint, tmp_path: Path) -> None:
    answers = write_answers(tmp_path / "alpha.jsonl", "alpha", lambda q, t: f"回答{q}-{t}")
    endpoint.script = lambda n, body: "[[8]]"
    out = tmp_path / "out"
    first = judge(endpoint, out, "--mode", "single", "--answers", str(answers))
    assert len(endpoint.requests) == JUDGED_UNITS
    assert judge(endpoint, out, "--mode", "single", "--answers", str(answers)) == first
    assert len(endpoint.requests) == JUDGED_UNITS
    # a judgment lost (the run was killed while writing it): only that one is asked again
    lines = (out / "judgments.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "judgments.jsonl").write_text("".join(lines[:-1]) + lines[-1][:10], encoding="utf-8")
    assert judge(endpoint, out, "--mode", "single", "--answers", str(answers)) == first
    assert len(endpoint.requests) == JUDGED_UNITS + 1
    assert len(read_jsonl(out / "judgments.jsonl")) == JUDGED_UNITS


def test_429_then_success_is_retried(endpoint: ScriptedEndpoint, tmp_path: Path) -> None:
    answers = write_answers(tmp_path / "alpha.jsonl", "alpha", lambda q, t: f"回答{q}-{t}")
    endpoint.script = lambda n, body: (429, "slow down") if n == 0 else (503, "busy") if n == 1 else "[[6]]"
    results = judge(endpoint, tmp_path / "out", "--mode", "single", "--answers", str(answers), "--parallel", "1")
    assert results == {"alpha": {"score": 6.0, "judged": JUDGED_UNITS, "failed": 0}}
    assert len(endpoint.requests) == JUDGED_UNITS + 2
    assert endpoint.requests[0] == endpoint.requests[1] == endpoint.requests[2]


def test_request_that_keeps_failing_counts_as_failed_and_is_retried_on_rerun(endpoint: ScriptedEndpoint, tmp_path: Path) -> None:
    answers = write_answers(tmp_path / "alpha.jsonl", "alpha", lambda q, t: f"回答{q}-{t}")
    endpoint.script = lambda n, body: (400, "bad request") if "回答6-1" in body["messages"][-1]["content"] else "[[4]]"
    out = tmp_path / "out"
    assert judge(endpoint, out, "--mode", "single", "--answers", str(answers)) == {"alpha": {"score": 4.0, "judged": 10, "failed": 1}}
    assert len(endpoint.requests) == JUDGED_UNITS  # a 400 is not retried
    endpoint.script = lambda n, body: "[[10]]"
    assert judge(endpoint, out, "--mode", "single", "--answers", str(answers)) == {"alpha": {"score": 50 / 11, "judged": 11, "failed": 0}}
    assert len(endpoint.requests) == JUDGED_UNITS + 1


def test_pairwise_position_biased_judge_gives_only_ties(endpoint: ScriptedEndpoint, tmp_path: Path) -> None:
    a = write_answers(tmp_path / "a.jsonl", "alpha", lambda q, t: f"甲的回答{q}-{t}")
    b = write_answers(tmp_path / "b.jsonl", "beta", lambda q, t: f"乙的回答{q}-{t}")
    endpoint.script = lambda n, body: "Assistant A is better. [[A]]"
    results = judge(endpoint, tmp_path / "out", "--mode", "pairwise", "--answers", str(a), "--answers_b", str(b))
    assert results == {"model_a": "alpha", "model_b": "beta", "win_a": 0, "win_b": 0, "tie": JUDGED_UNITS,
                       "win_rate_a": 0.5, "failed": 0, "judged": JUDGED_UNITS}  # fmt: skip
    # every question and turn in both orders
    assert len(endpoint.requests) == 2 * JUDGED_UNITS
    texts = endpoint.user_texts()
    assert sum(t.index("甲的回答1-1") < t.index("乙的回答1-1") for t in texts if "回答1-2" not in t and "回答1-1" in t) == 1
    assert sum(t.index("乙的回答1-1") < t.index("甲的回答1-1") for t in texts if "回答1-2" not in t and "回答1-1" in t) == 1
    assert any("[The Start of Assistant A's Answer]\n甲的回答6-1\n[The End of Assistant A's Answer]" in t for t in texts)


def test_pairwise_fair_judge_expected_win_rate(endpoint: ScriptedEndpoint, tmp_path: Path) -> None:
    good_a, good_b = {1, 2, 3}, {4}
    a = write_answers(tmp_path / "a.jsonl", "alpha", lambda q, t: ("【优】" if q in good_a else "") + f"回答{q}-{t}")
    b = write_answers(tmp_path / "b.jsonl", "beta", lambda q, t: ("【优】" if q in good_b else "") + f"答复{q}-{t}")

    def fair(n: int, body: dict) -> str:
        text = body["messages"][-1]["content"]
        split = text.index("Start of Assistant B")
        first, second = "【优】" in text[:split], "【优】" in text[split:]
        return "[[A]]" if first and not second else "[[B]]" if second and not first else "[[C]]"

    endpoint.script = fair
    results = judge(endpoint, tmp_path / "out", "--mode", "pairwise", "--answers", str(a), "--answers_b", str(b))
    # alpha wins q1-q3 (2 turns each), beta wins q4 (2 turns), q5 (2 turns) and q6 (1 turn) tie
    assert (results["win_a"], results["win_b"], results["tie"], results["failed"]) == (6, 2, 3, 0)
    assert results["win_rate_a"] == pytest.approx((6 + 0.5 * 3) / 11)
    assert "| alpha | beta | 6 | 2 | 3 |" in (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")


def test_judge_prompts_file_is_used(endpoint: ScriptedEndpoint, tmp_path: Path) -> None:
    """FastChat's judge_prompts.jsonl format: its single-v1 prompt replaces the built-in one."""
    prompts = tmp_path / "judge_prompts.jsonl"
    spec = {"name": "single-v1", "type": "single", "system_prompt": "SYS", "prompt_template": "Q={question} A={answer}",
            "description": "", "category": "general", "output_format": "[[rating]]"}  # fmt: skip
    prompts.write_text(json.dumps(spec, ensure_ascii=False) + "\n", encoding="utf-8")
    answers = write_answers(tmp_path / "alpha.jsonl", "alpha", lambda q, t: f"回答{q}-{t}")
    endpoint.script = lambda n, body: "[[9]]"
    judge(endpoint, tmp_path / "out", "--mode", "single", "--answers", str(answers), "--judge_prompts", str(prompts))
    req = next(r for r in endpoint.requests if r["messages"][-1]["content"].endswith("A=回答1-1"))
    assert req["messages"] == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Q=请写一段不超过一百字的短文，介绍你家乡的春天。 A=回答1-1"},
    ]


# --------------------------------------------------------------------------------------------
# gen_model_answer
# --------------------------------------------------------------------------------------------
def two_questions(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(line + "\n" for line in QUESTIONS.read_text(encoding="utf-8").splitlines()[3:5]), encoding="utf-8")
    return path


def test_gen_model_answer_through_endpoint(endpoint: ScriptedEndpoint, tmp_path: Path) -> None:
    from gen_model_answer import main

    endpoint.script = lambda n, body: f"答{len(body['messages'])}：" + body["messages"][-1]["content"][:4]
    out = tmp_path / "answers.jsonl"
    questions = two_questions(tmp_path)
    main(["--questions", str(questions), "--api_base", endpoint.url, "--api_model", "remote-m", "--answer_file", str(out),
          "--max_new_tokens", "32"])  # fmt: skip
    recs = read_jsonl(out)
    qs = read_jsonl(questions)
    assert [r["question_id"] for r in recs] == [q["question_id"] for q in qs]
    for r, q in zip(recs, qs):
        assert r["model_id"] == "remote-m" and r["choices"][0]["index"] == 0
        assert r["choices"][0]["turns"] == [f"答1：{q['turns'][0][:4]}", f"答3：{q['turns'][1][:4]}"]
    second = [r for r in endpoint.requests if len(r["messages"]) == 3]
    assert len(second) == 2
    for body in second:
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert body["messages"][1]["content"].startswith("答1：") and body["temperature"] == 0 and body["max_tokens"] == 32
    # a rerun answers nothing again
    main(["--questions", str(questions), "--api_base", endpoint.url, "--api_model", "remote-m", "--answer_file", str(out)])
    assert len(endpoint.requests) == 4 and len(read_jsonl(out)) == 2


def test_gen_model_answer_through_local_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from gen_model_answer import main

    from chinese_vicuna.args import DecodingArguments
    from chinese_vicuna.infer.generation import chat_prompt_ids, generate_text
    from chinese_vicuna.model.build import load_for_inference
    from chinese_vicuna.prompts import load_template

    out = tmp_path / "answers.jsonl"
    questions = two_questions(tmp_path)
    main(["--questions", str(questions), "--base_model", str(tiny_model_dir), "--answer_file", str(out), "--max_new_tokens", "6"])
    recs = read_jsonl(out)
    assert [r["model_id"] for r in recs] == [tiny_model_dir.name] * 2
    model, tok = load_for_inference(str(tiny_model_dir), precision="fp32")
    template = load_template("chinese-vicuna-chat", tok)
    decoding = DecodingArguments(max_new_tokens=6)
    for r, q in zip(recs, read_jsonl(questions)):
        a1 = generate_text(model, tok, chat_prompt_ids(tok, template, [], q["turns"][0])[0], decoding, template.stop_strings, strip=True)
        history = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": a1}]
        a2 = generate_text(
            model, tok, chat_prompt_ids(tok, template, history, q["turns"][1])[0], decoding, template.stop_strings, strip=True
        )
        assert r["choices"][0]["turns"] == [a1, a2]
