"""Chat data: the four formats, per-record validation, splitting long conversations."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
from test_prompts import CV_SYSTEM

from chinese_vicuna.data.chat import conversation_segment_lists, plan_chunks, tokenize_conversations
from chinese_vicuna.data.datasets import load_chat_dataset
from chinese_vicuna.data.encode import IGNORE_INDEX, TokenizeStats
from chinese_vicuna.data.fast_tokenize import encode_continuations
from chinese_vicuna.data.formats import Conversation, read_conversations
from chinese_vicuna.errors import UserError
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template

REPO = Path(__file__).resolve().parent.parent
CHAT = REPO / "sample" / "chat"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def write(path: Path, records: list, jsonl: bool = True) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_sample_files_in_every_format() -> None:
    raw = json.loads((CHAT / "chat_sample.jsonl").read_text(encoding="utf-8").splitlines()[0])
    [first, *_] = convs = read_conversations(CHAT / "chat_sample.jsonl")
    assert len(convs) == 24
    assert first.messages == [
        m for u, a in zip(raw["input"], raw["output"]) for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})
    ]
    assert first.where == f"{CHAT / 'chat_sample.jsonl'}:1"
    rounds = [len(c.messages) // 2 for c in convs]
    assert all(2 <= r <= 5 for r in rounds) and rounds[:4] == [3, 3, 3, 3]

    share = json.loads((CHAT / "sharegpt_sample.json").read_text(encoding="utf-8"))
    convs = read_conversations(CHAT / "sharegpt_sample.json")
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert [c.messages for c in convs] == [[{"role": roles[m["from"]], "content": m["value"]} for m in r["conversations"]] for r in share]
    assert convs[0].messages[0]["role"] == "system" and convs[1].where.endswith("sharegpt_sample.json record 2")

    lines = (CHAT / "openai_messages_sample.jsonl").read_text(encoding="utf-8").splitlines()
    assert [c.messages for c in read_conversations(CHAT / "openai_messages_sample.jsonl")] == [json.loads(x)["messages"] for x in lines]

    lines = (CHAT / "role_text_sample.jsonl").read_text(encoding="utf-8").splitlines()
    expected = [[{"role": m["role"], "content": m["text"]} for m in json.loads(x)] for x in lines]
    assert [c.messages for c in read_conversations(CHAT / "role_text_sample.jsonl")] == expected


GOOD = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}


@pytest.mark.parametrize(
    ("records", "jsonl", "where", "says"),
    [
        # broken role order: two user turns in a row
        (
            [GOOD, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}],
            True,
            ":2:",
            "message 2 has role 'user' where 'assistant' was expected",
        ),
        # an assistant first
        ([{"input": ["q"], "output": ["a"]}, [{"role": "assistant", "text": "a"}]], True, ":2:", "file started in"),
        ([[{"role": "assistant", "text": "a"}, {"role": "user", "text": "q"}]], True, ":1:", "role 'assistant' where 'user'"),
        # unknown roles
        (
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "bing", "value": "a"}]}],
            False,
            " record 1:",
            "message 2 has unknown 'from' value 'bing'",
        ),
        ([GOOD, GOOD, {"messages": [{"role": "bot", "content": "a"}]}], True, ":3:", "message 1 has unknown role 'bot'"),
        # empty content
        ([{"input": ["q1", "q2"], "output": ["a1", " "]}], True, ":1:", "message 4 (assistant) is empty"),
        ([GOOD, {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}], True, ":2:", "is empty"),
        # mixed formats in one file
        ([GOOD, {"input": ["q"], "output": ["a"]}], True, ":2:", "Chinese-Vicuna chat"),
        (
            [[{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}], {"conversations": []}],
            False,
            " record 2:",
            "one format per file",
        ),
        # other broken records
        ([{"input": ["q1", "q2", "q3"], "output": ["a1"]}], True, ":1:", "'input' has 3 user turns but 'output' has 1"),
        ([{"instruction": "x", "output": "y"}], True, ":1:", "not a conversation in a known format"),
        ([{"input": "q", "output": "a"}], True, ":1:", "alpaca instruction data goes to finetune.py"),
        ([{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}], False, " record 1:", "one message, not a conversation"),
        ([{"messages": [{"role": "user", "content": "q"}]}], True, ":1:", "no assistant turn"),
        ([{"messages": [{"role": "user", "content": ["part"]}, {"role": "assistant", "content": "a"}]}], True, ":1:", "must be a string"),
    ],
)
def test_broken_records_name_file_and_record(tmp_path: Path, records: list, jsonl: bool, where: str, says: str) -> None:
    path = write(tmp_path / ("bad.jsonl" if jsonl else "bad.json"), records, jsonl)
    with pytest.raises(UserError) as err:
        read_conversations(path)
    message = str(err.value)
    assert message.startswith(f"{path}{where}") and says in message and "\n" not in message


def test_unanswered_last_turn_dropped_and_counted(tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "d.jsonl", [{"input": ["你好", "再见"], "output": ["你好！"]}, {"input": ["嗨"], "output": ["嗨！"]}])
    assert [len(c.messages) for c in read_conversations(path)] == [2, 2]
    template = load_template("chinese-vicuna-chat", tokenizer)
    with caplog.at_level(logging.INFO):
        samples = load_chat_dataset(path, tokenizer, template, 2048, use_cache=False)
    assert len(samples) == 2
    assert "2 records → 2 samples" in caplog.text and "1 unanswered final user turns dropped" in caplog.text


def test_plan_chunks() -> None:
    assert plan_chunks([50, 70, 70], [50, 40, 40], 100) == [(0, 2), (2, 3)]
    assert plan_chunks([150, 70], [150, 20], 100) == [(0, 1), (1, 2)]
    assert plan_chunks([10, 99, 99], [10, 20, 20], 100) == [(0, 3)]


def long_conversation(system: str | None) -> list[dict[str, str]]:
    """5 long turns from the sample data (each round about 150-250 tokens)."""
    pool = [c.messages for c in read_conversations(CHAT / "chat_sample.jsonl")]
    users = [m["content"] for conv in pool for m in conv if m["role"] == "user"]
    answers = [m["content"] for conv in pool for m in conv if m["role"] == "assistant"]
    users.sort(key=len)
    answers.sort(key=len)
    messages = [{"role": "system", "content": system}] if system else []
    for i in range(5):
        messages += [
            {"role": "user", "content": f"第{i + 1}问：" + users[-1 - i]},
            {"role": "assistant", "content": answers[-1 - i] + answers[-6 - i]},
        ]
    return messages


@pytest.mark.parametrize("system", [None, "你是一位耐心的中文老师。"])
def test_long_conversation_split_at_turn_boundaries(tokenizer, caplog: pytest.LogCaptureFixture, system: str | None) -> None:
    template = load_template("chinese-vicuna-chat", tokenizer)
    messages = long_conversation(system)
    cutoff = 300
    conv = Conversation(messages, "long.jsonl:1")
    [whole] = tokenize_conversations([conv], tokenizer, template, 100_000)
    assert len(whole["input_ids"]) > cutoff + 300  # it needs splitting

    stats = TokenizeStats()
    with caplog.at_level(logging.INFO):
        segment_lists = conversation_segment_lists([conv], tokenizer, template, cutoff, add_eos=True, stats=stats)
        samples = tokenize_conversations([conv], tokenizer, template, cutoff, stats=TokenizeStats())
    assert 3 <= len(samples) <= 5
    assert all(len(s["input_ids"]) <= cutoff for s in samples)
    assert stats.extra == {"conversations split at turn boundaries": 1, "samples from split conversations": len(samples)}

    # every sample starts at a user turn, after the system prompt; together they hold every
    # round once, in order, with every answer trained
    head = f"{system}\n\n" if system else CV_SYSTEM
    users = [m["content"] for m in messages if m["role"] == "user"]
    chunks = []
    for segments, sample in zip(segment_lists, samples, strict=True):
        assert segments[0].text.startswith(head + "User:第")
        texts = "".join(s.text for s in segments)
        chunks.append([i for i, u in enumerate(users) if f"User:{u}\n\nAssistant:" in texts])
        assert sample["input_ids"][-1] == tokenizer.eos_token_id and sample["labels"][-1] == tokenizer.eos_token_id
        assert (
            sum(label != IGNORE_INDEX for label in sample["labels"])
            == sum(len(ids) for ids in encode_continuations(tokenizer, [s.text for s in segments if s.trainable])) + 1
        )
    assert [i for chunk in chunks for i in chunk] == list(range(5))
    # greedy: a sample takes the next round whenever it fits
    head_messages = messages[:1] if system else []
    for chunk, following in itertools.pairwise(chunks):
        grown = head_messages + messages[len(head_messages) + 2 * chunk[0] : len(head_messages) + 2 * following[0] + 2]
        [sample] = tokenize_conversations([Conversation(grown, "x")], tokenizer, template, 100_000)
        assert len(sample["input_ids"]) > cutoff
    assert max(map(len, chunks)) == (2 if system else 1)  # the long default system prompt leaves room for one round


def test_split_counts_in_log_and_single_long_turn_truncated(tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    short = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    huge_question = [{"role": "user", "content": "很长的问题" * 200}, {"role": "assistant", "content": "好的。"}]
    huge_answer = [{"role": "user", "content": "讲个长故事"}, {"role": "assistant", "content": "很久很久以前" * 200}]
    records = [{"messages": long_conversation(None)}, {"messages": huge_question}, {"messages": short + huge_answer}]
    path = write(tmp_path / "long.jsonl", records)
    template = load_template("chinese-vicuna-chat", tokenizer)
    with caplog.at_level(logging.INFO):
        samples = load_chat_dataset(path, tokenizer, template, 400, use_cache=False)
    assert all(len(s["input_ids"]) <= 400 for s in samples)
    # the long conversation → n samples; the huge question alone loses its answer to
    # truncation (dropped); the huge answer becomes a sample of its own, truncated but kept
    n_long = len(samples) - 2
    assert samples[-1]["labels"][-1] != IGNORE_INDEX and len(samples[-1]["input_ids"]) == 400
    assert (
        f"3 records → {len(samples)} samples; 2 truncated at cutoff_len; 1 dropped with no trainable token after truncation; "
        f"2 conversations split at turn boundaries; {n_long + 2} samples from split conversations" in caplog.text
    )


def test_dataset_cache_reuses_samples(tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    template = load_template("chinese-vicuna-chat", tokenizer)
    first = load_chat_dataset(CHAT / "role_text_sample.jsonl", tokenizer, template, 2048, cache_dir=tmp_path).to_list()
    with caplog.at_level(logging.INFO):
        again = load_chat_dataset(CHAT / "role_text_sample.jsonl", tokenizer, template, 2048, cache_dir=tmp_path).to_list()
    assert again == first and "loaded from cache" in caplog.text
    last = load_chat_dataset(CHAT / "role_text_sample.jsonl", tokenizer, template, 2048, False, True, cache_dir=tmp_path).to_list()
    assert [s["input_ids"] for s in last] == [s["input_ids"] for s in first] and last != first


def test_token_count_never_exceeds_utf8_bytes_plus_one(tokenizer) -> None:
    """The bound conversation_segment_lists uses to skip counting conversations that fit."""
    template = load_template("chinese-vicuna-chat", tokenizer)
    texts = [
        s.text
        for path in sorted(CHAT.iterdir())
        for conv in read_conversations(path)
        for s in template.chat_segments(conv.messages, add_generation_prompt=False)
    ]
    texts += ["</s>", " \n\n", "😀😀", "\x00\x01", "ǅ", "ﬁ"]
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert all(n <= len(t.encode("utf-8")) + 1 for n, t in zip(counts, texts, strict=True))


def test_folder_of_files_in_different_formats(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    template = load_template("vicuna_v1.1", tokenizer)
    with caplog.at_level(logging.INFO):
        samples = load_chat_dataset(CHAT, tokenizer, template, 2048, use_cache=False)
    assert len(samples) == 24 + 4 + 4 + 4
    for fmt in ("chinese-vicuna", "sharegpt", "openai", "role-text"):
        assert f"conversations in {fmt} format" in caplog.text
