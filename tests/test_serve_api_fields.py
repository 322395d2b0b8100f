"""serve.py's OpenAI parameters, driven by the official `openai` client over loopback: each field
is implemented (logprobs, echo, logit_bias, penalties, seed, n, models.retrieve, usage on
chunks) or refused with a 400 naming it; and lm-evaluation-harness's `local-completions`
scores multiple choice through the server exactly as tools/eval_choice.py does."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import read_jsonl
from serve_helpers import ANSWERS_A, INSTRUCTIONS, KEY, api_client, running_server

openai = pytest.importorskip("openai")

BASE = "base"
STORY = "很久很久以前"  # the tiny base model answers it with a repetitive text


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, two_loras: dict[str, Path]):
    args = ["--base_model", str(tiny_model_dir), "--served_model_name", BASE, "--lora_modules", f"a={two_loras['a']}"]
    args += ["--max_batch_size", "8", "--max_prompt_tokens", "400", "--max_tokens_limit", "300"]
    with running_server(*args, env={"CHINESE_VICUNA_API_KEY": KEY}) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return api_client(server)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def chat(client, model: str, question: str, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)


def ids_shown_as(tokenizer, text: str) -> list[int]:
    """Every token id whose text (after another token) is `text`: what a client biases to ban it."""
    anchor = tokenizer.encode("\n", add_special_tokens=False)[-1:]
    prefix = tokenizer.decode(anchor)
    return [i for i in range(len(tokenizer)) if tokenizer.decode([*anchor, i])[len(prefix) :] == text]


def test_models_retrieve(client) -> None:
    assert client.models.retrieve("a").id == "a"
    card = client.models.retrieve(BASE)
    assert card.id == BASE and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_logprobs_are_the_answers_tokens(client) -> None:
    reply = chat(client, "a", INSTRUCTIONS[0], logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert choice.message.content == ANSWERS_A[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == ANSWERS_A[0]
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob) and t.bytes == list(t.token.encode("utf-8"))
    # a memorized answer: each token is nearly certain
    assert all(t.logprob > -0.5 for t in content)
    assert chat(client, "a", INSTRUCTIONS[0]).choices[0].logprobs is None  # only when asked


def test_logit_bias_minus_100_on_the_memorized_first_token_changes_the_answer(client, tokenizer) -> None:
    reply = chat(client, "a", INSTRUCTIONS[1], logprobs=True)
    first = reply.choices[0].logprobs.content[0].token
    assert reply.choices[0].message.content == ANSWERS_A[1]
    banned = {str(i): -100 for i in ids_shown_as(tokenizer, first)}
    biased = chat(client, "a", INSTRUCTIONS[1], logit_bias=banned, logprobs=True)
    assert biased.choices[0].message.content != ANSWERS_A[1]
    assert biased.choices[0].logprobs.content[0].token != first
    # +100 forces a token
    forced = ids_shown_as(tokenizer, "好")[0]
    assert chat(client, "a", INSTRUCTIONS[1], logit_bias={str(forced): 100}, max_tokens=3).choices[0].message.content == "好好好"


def completion_tokens(client, **kw) -> list[str]:
    reply = client.completions.create(model=BASE, prompt=STORY, max_tokens=40, temperature=0, logprobs=0, **kw)
    return reply.choices[0].logprobs.tokens


def test_penalties_change_a_repetitive_answer(client) -> None:
    plain = completion_tokens(client)
    most = Counter(plain).most_common(1)[0][1]
    assert most >= 4, plain  # repetitive
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = completion_tokens(client, **kw)
        assert penalized != plain
        assert Counter(penalized).most_common(1)[0][1] < most, (kw, penalized)
    # a negative penalty makes it more repetitive
    assert Counter(completion_tokens(client, presence_penalty=-2.0)).most_common(1)[0][1] >= most


def test_n_choices_sampled_or_identical_when_greedy(client) -> None:
    greedy = chat(client, "a", INSTRUCTIONS[2], n=3)
    assert [c.message.content for c in greedy.choices] == [ANSWERS_A[2]] * 3
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert greedy.usage.completion_tokens == 3 * chat(client, "a", INSTRUCTIONS[2]).usage.completion_tokens
    kw = {"n": 4, "temperature": 1.0, "seed": 11, "max_tokens": 12}
    sampled = [c.message.content for c in chat(client, BASE, STORY, **kw).choices]
    assert len(set(sampled)) > 1
    assert [c.message.content for c in chat(client, BASE, STORY, **kw).choices] == sampled  # the seed repeats them
    # choice 0 of n with a seed is the n=1 answer with that seed
    assert chat(client, BASE, STORY, temperature=1.0, seed=11, max_tokens=12).choices[0].message.content == sampled[0]
    streamed = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": STORY}], stream=True, **kw)
    texts = [""] * 4
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == sampled


def test_completions_echo_logprobs_score_the_prompt(client, tokenizer) -> None:
    """What lm-evaluation-harness sends: token ids, max_tokens 1, echo, logprobs 1."""
    ids = tokenizer(STORY).input_ids
    reply = client.completions.create(model=BASE, prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # the generated token's log-probability equals the same token's when it is part of the prompt
    generated = client.completions.create(model=BASE, prompt=[ids], max_tokens=1, temperature=0, logprobs=1)
    assert generated.choices[0].logprobs.token_logprobs[0] == pytest.approx(lp.token_logprobs[-1], abs=1e-4)
    # every listed alternative is at most the best one; a prompt token's own log-probability is listed
    for token, own, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert own <= max(top.values()) + 1e-6 and top[token] == pytest.approx(own)
    # max_tokens 0: the prompt alone, text echoed
    only = client.completions.create(model=BASE, prompt=STORY, max_tokens=0, logprobs=2, echo=True)
    assert only.choices[0].text == STORY and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1 : len(ids)], abs=1e-4)


def test_streamed_completion_with_echo_and_logprobs_equals_not_streamed(client) -> None:
    kw = {"model": BASE, "prompt": STORY, "max_tokens": 8, "temperature": 0, "logprobs": 1, "echo": True}
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text and whole.text.startswith(STORY)
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == whole.logprobs.tokens


def test_a_memorized_answer_scores_higher_than_another(client, tokenizer) -> None:
    from chinese_vicuna.prompts import load_template

    prompt = load_template("alpaca").instruction_prompt(INSTRUCTIONS[0])

    def score(answer: str) -> float:
        reply = client.completions.create(model="a", prompt=prompt + answer, max_tokens=0, logprobs=0, echo=True)
        n = len(tokenizer(prompt).input_ids)
        return sum(reply.choices[0].logprobs.token_logprobs[n:])

    assert score(ANSWERS_A[0]) > score(ANSWERS_A[1]) + 5


def test_stream_chunks_carry_usage_null_then_usage(server) -> None:
    url, _ = server
    body = {"model": "a", "messages": [{"role": "user", "content": INSTRUCTIONS[0]}], "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as reply:
        lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f"}]),
        ("response_format", {"type": "json_object"}),
        ("top_k", 5),
        ("repetition_penalty", 1.2),
        ("audio", {"voice": "alloy"}),
    ],
)
def test_unsupported_chat_fields_are_400_naming_them(client, field: str, value) -> None:
    with pytest.raises(openai.BadRequestError, match=field):
        chat(client, "a", INSTRUCTIONS[0], extra_body={field: value})


@pytest.mark.parametrize(("field", "value"), [("suffix", "end"), ("best_of", 3), ("top_k", 5)])
def test_unsupported_completion_fields_are_400_naming_them(client, field: str, value) -> None:
    with pytest.raises(openai.BadRequestError, match=field):
        client.completions.create(model=BASE, prompt=STORY, max_tokens=2, extra_body={field: value})


def test_no_op_fields_are_accepted(client) -> None:
    kw = {"user": "u-1", "store": False, "metadata": {"k": "v"}, "tool_choice": "none", "service_tier": "auto",
          "parallel_tool_calls": False, "response_format": {"type": "text"}}  # fmt: skip
    assert chat(client, "a", INSTRUCTIONS[3], **kw).choices[0].message.content == ANSWERS_A[3]
    assert chat(client, "a", INSTRUCTIONS[3], extra_body={"tools": None, "logprobs": None}).choices[0].message.content == ANSWERS_A[3]
    reply = client.completions.create(model=BASE, prompt=STORY, max_tokens=2, best_of=1, user="u", temperature=0)
    assert reply.choices[0].finish_reason == "length"


def test_batched_requests_keep_their_own_settings(client, tokenizer) -> None:
    """Bias, penalties, logprobs and sampling in one batch: each answer equals the same request alone."""
    forced = str(ids_shown_as(tokenizer, "好")[0])
    jobs = [
        {"model": "a", "q": INSTRUCTIONS[0]},
        {"model": "a", "q": INSTRUCTIONS[1], "logit_bias": {forced: 100}, "max_tokens": 3},
        {"model": BASE, "q": STORY, "frequency_penalty": 2.0, "max_tokens": 30},
        {"model": BASE, "q": STORY, "max_tokens": 30, "logprobs": True, "top_logprobs": 2},
        {"model": BASE, "q": STORY, "temperature": 0.8, "seed": 5, "max_tokens": 20},
        {"model": "a", "q": INSTRUCTIONS[2], "presence_penalty": 1.5},
    ] * 2

    def one(job: dict):
        kw = dict(job)
        model, q = kw.pop("model"), kw.pop("q")
        reply = chat(client, model, q, **kw).choices[0]
        lp = [(t.token, round(t.logprob, 4)) for t in reply.logprobs.content] if reply.logprobs else None
        return reply.message.content, lp

    alone = [one(j) for j in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(one, jobs))
    assert together == alone
    assert alone[0][0] == ANSWERS_A[0] and alone[1][0] == "好好好"


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness, local-completions
# --------------------------------------------------------------------------------------------
SUBJECT = "computer_network"


def write_ceval(folder: Path, questions: list[dict[str, str]]) -> None:
    """A C-Eval-layout folder (val/ and an empty-shot dev/) with `questions`."""
    for split, rows in (("dev", questions[:1]), ("val", questions)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        with (folder / split / f"{SUBJECT}_{split}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "question", "A", "B", "C", "D", "answer", "explanation"])
            writer.writeheader()
            writer.writerows(rows)


def test_lm_eval_local_completions_chooses_as_eval_choice(server, tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    lm_eval = pytest.importorskip("lm_eval", reason="a test dependency: pip install -r requirements-dev.txt")
    from lm_eval.tasks import TaskManager

    from chinese_vicuna.evaluation.choice import BENCHMARKS, ChoiceQuestion

    url, _ = server
    questions = [
        {"id": str(i), "question": q, "A": a, "B": b, "C": c, "D": d, "answer": "ABCD"[i % 4], "explanation": ""}
        for i, (q, a, b, c, d) in enumerate(
            [
                ("TCP 是哪一层的协议？", "应用层", "传输层", "网络层", "链路层"),
                ("IP 地址有多少位？", "16", "32", "64", "128"),
                ("HTTP 默认端口是？", "21", "25", "80", "110"),
                ("路由器工作在哪一层？", "物理层", "链路层", "网络层", "会话层"),
                ("DNS 的作用是？", "加密", "域名解析", "路由", "压缩"),
                ("以太网帧的最小长度是？", "64 字节", "128 字节", "32 字节", "1500 字节"),
            ]
        )
    ]
    data = tmp_path / "ceval"
    write_ceval(data, questions)
    from eval_choice import main as eval_choice

    out = tmp_path / "eval-choice"
    eval_choice(["--progress", "false", "--benchmark", "ceval", "--base_model", str(tiny_model_dir), "--data_dir", str(data),
                 "--split", "val", "--ntrain", "0", "--output_dir", str(out), "--batch_size", "1"])  # fmt: skip
    expected = {p["id"]: p["prediction"] for p in read_jsonl(out / "predictions.jsonl")}

    # the same prompts, as an lm-evaluation-harness task of its own
    bench = BENCHMARKS["ceval"]
    docs = tmp_path / "task" / "docs.jsonl"
    docs.parent.mkdir()
    with docs.open("w", encoding="utf-8") as f:
        for q in questions:
            question = ChoiceQuestion(SUBJECT, q["id"], q["question"], (q["A"], q["B"], q["C"], q["D"]), q["answer"])
            f.write(json.dumps({"id": q["id"], "prompt": bench.prompt(question, []), "label": "ABCD".index(q["answer"])}) + "\n")
    (tmp_path / "task" / "cv_choice.yaml").write_text(
        "task: cv_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: ["A", "B", "C", "D"]\n'
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_args = (
        f"model={BASE},base_url={url}/v1/completions,tokenizer={tiny_model_dir},tokenizer_backend=huggingface,"
        "add_bos_token=True,num_concurrent=1,max_retries=1"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=["cv_choice"],
        task_manager=TaskManager(include_path=str(tmp_path / "task")),
        log_samples=True,
        batch_size=1,
    )
    chosen = {}
    for sample in results["samples"]["cv_choice"]:
        loglikelihoods = [resp[0] for resp in sample["filtered_resps"]]
        assert all(math.isfinite(x) for x in loglikelihoods)
        chosen[sample["doc"]["id"]] = "ABCD"[max(range(4), key=lambda i: loglikelihoods[i])]
    assert chosen == expected
    assert results["results"]["cv_choice"]["acc,none"] == pytest.approx(
        sum(expected[q["id"]] == q["answer"] for q in questions) / len(questions)
    )


def test_run_time_adapter_loading_is_off_unless_enabled(server, two_loras) -> None:
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"lora_name": "c", "lora_path": str(two_loras["a"])}
    reply = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=headers, timeout=30)
    assert reply.status_code == 404 and "--enable_lora_loading" in reply.json()["error"]["message"]
    reply = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a"}, headers=headers, timeout=30)
    assert reply.status_code == 404
