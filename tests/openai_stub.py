"""A scripted OpenAI-compatible chat endpoint on 127.0.0.1 for the data-tool tests.

Each request takes the next behaviour from a script (then "good" forever): rate-limit with
429 + Retry-After, fail with 500, wrap the JSON list in a fence, answer in prose only, put prose
around the list, repeat earlier records (exactly and nearly), drop fields, cut the list off.
Fresh records are unique random Chinese strings, so any two differ by far more than ROUGE-L 0.7.
"""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROSE = "抱歉，我现在无法按要求生成数据。不过我可以告诉你：好的指令数据应该多样、真实、回答充实。"


class StubServer:
    """Runs in a thread; `base` is the /v1 URL; `arrivals` logs (monotonic time, behaviour, auth header)."""

    def __init__(self, script: list[str], per_reply: int = 3, delay: float = 0.0, retry_after: str = "1") -> None:
        self.script = list(script)
        self.per_reply = per_reply
        self.delay = delay
        self.retry_after = retry_after
        self.rng = random.Random(1234)
        self.issued: list[dict[str, str]] = []  # every fresh, complete record sent
        self.arrivals: list[tuple[float, str, str | None]] = []
        self.prompts: list[str] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers, payload = stub.handle(body, self.headers.get("Authorization"))
                data = json.dumps(payload, ensure_ascii=False).encode()
                self.send_response(status)
                for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------
    def fresh(self) -> dict[str, str]:
        def text(n: int) -> str:
            return "".join(chr(0x4E00 + self.rng.randrange(3000)) for _ in range(n))

        record = {"instruction": text(12) + "？", "input": text(6) if self.rng.random() < 0.5 else "", "output": text(20) + "。"}
        self.issued.append(record)
        return record

    def reply(self, behaviour: str) -> str:
        n = self.per_reply
        if behaviour == "prose":
            return PROSE
        if behaviour == "fenced":
            return (
                "好的，以下是生成的数据：\n```json\n"
                + json.dumps([self.fresh() for _ in range(n)], ensure_ascii=False, indent=2)
                + "\n```\n希望有帮助！"
            )
        if behaviour == "prose_around":
            return "下面是任务列表：\n" + json.dumps([self.fresh() for _ in range(n)], ensure_ascii=False) + "\n以上。"
        if behaviour == "repeat":
            old = self.issued[:2]
            near = {**self.issued[0], "instruction": self.issued[0]["instruction"][:-2] + "呢？"}
            return json.dumps([*old, near, self.fresh()], ensure_ascii=False)
        if behaviour == "drop_fields":
            good = self.fresh()
            return json.dumps(
                [{"instruction": "缺少回答的指令"}, {"input": "", "output": "没有指令"}, {"instruction": "", "output": "空指令"}, good],
                ensure_ascii=False,
            )
        if behaviour == "truncated":
            text = json.dumps([self.fresh() for _ in range(n)], ensure_ascii=False)
            last = self.issued.pop()  # cut inside the last record: it never arrives whole
            cut = text.rfind(json.dumps(last["instruction"], ensure_ascii=False)) + 5
            return text[:cut]
        if behaviour == "jsonl":
            return "\n".join(json.dumps(self.fresh(), ensure_ascii=False) for _ in range(n))
        return json.dumps([self.fresh() for _ in range(n)], ensure_ascii=False)

    def handle(self, body: dict[str, Any], auth: str | None) -> tuple[int, dict[str, str], dict[str, Any]]:
        with self.lock:
            behaviour = self.script.pop(0) if self.script else "good"
            self.arrivals.append((time.monotonic(), behaviour, auth))
            self.prompts.append(body["messages"][-1]["content"])
            if behaviour == "429":
                return 429, {"Retry-After": self.retry_after}, {"error": {"message": "rate limited", "type": "rate_limit"}}
            if behaviour == "500":
                return 500, {}, {"error": {"message": "internal error", "type": "server_error"}}
            content = self.reply(behaviour)
        if self.delay:
            time.sleep(self.delay)
        return (
            200,
            {},
            {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )
