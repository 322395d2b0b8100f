"""tools/make_pairs.py: pairwise judgments → preference pairs (winner chosen), ties and the rest counted."""

from __future__ import annotations

import json
from pathlib import Path

import make_pairs

from chinese_vicuna.data.preference import to_example
from chinese_vicuna.data.records import Record


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_winner_is_chosen_ties_and_second_turns_are_counted(tmp_path: Path, caplog) -> None:
    questions = [{"question_id": i, "category": "writing", "turns": [f"问题{i}"] + (["追问"] if i == 5 else [])} for i in range(1, 6)]
    answers = lambda model, tag: [  # noqa: E731
        {"question_id": i, "model_id": model, "choices": [{"index": 0, "turns": [f"{tag}{i}", f"{tag}{i}-2"]}]} for i in range(1, 6)
    ]
    # (question, turn, model_1 first shown, verdict): 1 → a wins both orders, 2 → b wins, 3 → orders disagree (tie),
    # 4 → [[C]] tie, 5 → a wins turn 1; its turn 2 is judged too but not a pair
    verdicts = {1: ("A", "B"), 2: ("B", "A"), 3: ("A", "A"), 4: ("tie", "tie"), 5: ("A", "B")}
    records = []
    for qid, (ab, ba) in verdicts.items():
        for turn in (1, 2) if qid == 5 else (1,):
            for first, second, verdict in (("m-a", "m-b", ab), ("m-b", "m-a", ba)):
                key = {"mode": "pairwise", "question_id": qid, "turn": turn, "model_1": first, "model_2": second, "judge": "j"}
                records.append({**key, "category": "writing", "verdict": verdict, "judgment": f"[[{verdict}]]"})
    judgments = write_jsonl(tmp_path / "judgments.jsonl", records)
    files = [
        write_jsonl(tmp_path / "q.jsonl", questions),
        write_jsonl(tmp_path / "a.jsonl", answers("m-a", "甲")),
        write_jsonl(tmp_path / "b.jsonl", answers("m-b", "乙")),
    ]
    out = tmp_path / "pairs.jsonl"
    argv = ["--questions", str(files[0]), "--answers", str(files[1]), "--answers_b", str(files[2]), "--judgments", str(judgments)]
    with caplog.at_level("INFO"):
        make_pairs.main([*argv, "--output", str(out)])
    pairs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert pairs == [
        {"prompt": "问题1", "chosen": "甲1", "rejected": "乙1", "question_id": 1},
        {"prompt": "问题2", "chosen": "乙2", "rejected": "甲2", "question_id": 2},
        {"prompt": "问题5", "chosen": "甲5", "rejected": "乙5", "question_id": 5},
    ]
    assert "3 pairs written" in caplog.text and "1 second turns" in caplog.text and "2 ties" in caplog.text
    # what finetune_dpo.py reads
    example = to_example(Record(pairs[0], "pairs.jsonl:1"))
    assert example.answers == ["甲1", "乙1"] and example.instruction == ("问题1", "")


class PickingJudge:
    """An OpenAI-compatible chat endpoint on loopback that always picks answer 2 and records each
    question it is asked; on request number `kill_at` it SIGKILLs `victim` before replying."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from conftest import free_port

        judge = self
        self.asked: list[str] = []
        self.answered: list[str] = []
        self.kill_at, self.victim = 0, 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                import os
                import re
                import signal

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = re.search(r"\[Question\]\n(.*?)\n\n", body["messages"][-1]["content"], re.S).group(1)
                judge.asked.append(question)
                if len(judge.asked) == judge.kill_at:
                    os.kill(judge.victim, signal.SIGKILL)
                    return
                judge.answered.append(question)
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "[[2]]"}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def test_sampled_answers_judged_resume_after_sigkill_without_asking_twice(tiny_model_dir: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from conftest import REPO

    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "turns": [f"第{i}个问题：今天天气怎么样？"]} for i in range(4)])
    judge = PickingJudge()
    out = tmp_path / "pairs.jsonl"
    argv = [sys.executable, str(REPO / "tools" / "make_pairs.py"), "--questions", str(questions), "--num_samples", "2"]
    argv += ["--base_model", str(tiny_model_dir), "--judge_api_base", judge.url, "--judge_model", "j", "--output", str(out)]
    argv += ["--max_new_tokens", "6", "--temperature", "1.5"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": "test"}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    judge.victim, judge.kill_at = first.pid, 3  # killed while its third question waits for the judge
    first.communicate(timeout=300)
    assert first.returncode == -9 and not out.exists()
    assert len((tmp_path / "pairs.jsonl.progress.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    prompts = [f"第{i}个问题：今天天气怎么样？" for i in range(4)]
    assert judge.answered == prompts  # every question judged once, in order; none asked again once answered
    assert judge.asked == [*prompts[:3], *prompts[2:]]  # only the one cut off by the kill was asked again
    progress = [json.loads(line) for line in (tmp_path / "pairs.jsonl.progress.jsonl").read_text(encoding="utf-8").splitlines()]
    expected = [{"prompt": r["prompt"], "chosen": r["answers"][1], "rejected": r["answers"][0]} for r in progress if len(r["answers"]) == 2]
    pairs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert pairs == expected and len(pairs) >= 3
