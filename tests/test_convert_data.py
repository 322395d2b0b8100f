"""tools/convert_data.py: every input format, ShareGPT HTML → markdown, splitting, drop counts,
and finetune_chat.py training on the output."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from chinese_vicuna.data.datasets import load_chat_dataset
from chinese_vicuna.data.encode import TokenizeStats
from chinese_vicuna.data.records import Record
from chinese_vicuna.datatools.formats_convert import ConvertStats, Splitter, convert_records, html_to_markdown
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from conftest import memorize_args, read_jsonl, run_script

Q1, A1, Q2, A2 = "北京有多大？", "约1.64万平方公里。", "人口呢？", "两千多万人。"
TWO_TURNS = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
             {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]  # fmt: skip

# One record per input format, each holding the same two-turn conversation where it can.
INPUTS = {
    "alpaca": {"instruction": "翻译成英文", "input": "你好", "output": "Hello"},
    "belle-multiturn": {"instruction": f"Human: {Q1}\nAssistant: {A1}\nHuman: {Q2}\nAssistant:", "input": "", "output": A2},
    "guanaco": {"text": f"### Human: {Q1} ### Assistant: {A1} ### Human: {Q2} ### Assistant: {A2}"},
    "chinese-vicuna": {"input": [Q1, Q2], "output": [A1, A2]},
    "sharegpt": {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in TWO_TURNS]},
    "openai": {"messages": TWO_TURNS},
    "role-text": [{"role": m["role"], "text": m["content"]} for m in TWO_TURNS],
}
ALPACA_AS_MESSAGES = [{"role": "user", "content": "翻译成英文\n你好"}, {"role": "assistant", "content": "Hello"}]

CHATGPT_HTML = (
    '<div class="markdown prose w-full break-words dark:prose-invert light"><p>下面是一个 <strong>Python</strong> 例子，'
    "使用 <code>sorted()</code>：</p><ol><li>读取列表</li><li>排序 &amp; 输出</li></ol>"
    '<pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center relative text-gray-200 bg-gray-800 px-4 py-2">'
    '<span class="">python</span><button class="flex ml-auto gap-2"><svg></svg>Copy code</button></div>'
    '<div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs language-python">nums = [<span class="hljs-number">3</span>, '
    '<span class="hljs-number">1</span>]\n<span class="hljs-built_in">print</span>(<span class="hljs-built_in">sorted</span>(nums))'
    '  <span class="hljs-comment"># a &lt; b</span>\n</code></div></div></pre>'
    "<ul><li>第一点</li><li>第二点</li></ul><p>第一行<br>第二行 &quot;引号&quot; &#39;单引号&#39;</p></div>"
)
CHATGPT_MARKDOWN = """下面是一个 **Python** 例子，使用 `sorted()`：

1. 读取列表
2. 排序 & 输出

```python
nums = [3, 1]
print(sorted(nums))  # a < b
```

- 第一点
- 第二点

第一行
第二行 "引号" '单引号'"""


def convert(record: object, to: str, **kw: object) -> tuple[list[dict], ConvertStats]:
    stats = ConvertStats()
    return list(convert_records([Record(record, "t.jsonl:1")], to, stats=stats, **kw)), stats


@pytest.mark.parametrize("fmt", list(INPUTS))
def test_every_input_format_converts(fmt: str) -> None:
    expected = ALPACA_AS_MESSAGES if fmt == "alpaca" else TWO_TURNS
    [openai], stats = convert(INPUTS[fmt], "openai")
    assert openai == {"messages": expected} and stats.formats == {fmt: 1}
    [share], _ = convert(INPUTS[fmt], "sharegpt")
    assert share == {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in expected]}
    out, stats = convert(INPUTS[fmt], "alpaca")
    if fmt == "alpaca":
        assert out == [INPUTS["alpaca"]]
    else:  # two turns have no alpaca form: dropped, with the reason
        assert out == [] and stats.dropped == {"a multi-turn conversation has no alpaca form (use --to sharegpt or --to openai)": 1}


def test_single_turn_chat_to_alpaca_and_drop_reasons() -> None:
    out, stats = convert({"messages": TWO_TURNS[:2]}, "alpaca")
    assert out == [{"instruction": Q1, "input": "", "output": A1}]
    stats = ConvertStats()
    bad = [
        Record({"instruction": "x", "output": ""}, "f:1"),
        Record({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "f:2"),
        Record({"foo": 1}, "f:3"),
        Record(INPUTS["openai"], "f:4"),
    ]
    assert len(list(convert_records(bad, "openai", stats=stats))) == 1
    assert stats.records == 4 and stats.converted == 1 and sum(stats.dropped.values()) == 3
    assert set(stats.dropped) == {
        "field 'output' is empty",
        "a message has role 'user' where 'assistant' was expected (after an optional system message, turns must alternate user/assistant)",
        "not a record in a known format",
    }


def test_sharegpt_html_becomes_clean_markdown() -> None:
    assert html_to_markdown(CHATGPT_HTML) == CHATGPT_MARKDOWN
    record = {"conversations": [{"from": "human", "value": "给个<b>例子</b>"}, {"from": "gpt", "value": CHATGPT_HTML}]}
    [out], stats = convert(record, "sharegpt", html=True)
    assert out["conversations"][1]["value"] == CHATGPT_MARKDOWN and out["conversations"][0]["value"] == "给个**例子**"
    assert stats.notes == {"messages converted from HTML": 2}
    [plain], _ = convert(record, "sharegpt")  # off unless asked
    assert plain["conversations"][1]["value"] == CHATGPT_HTML


def test_long_conversations_split_at_turn_boundaries(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    template = load_template("chinese-vicuna-chat", tokenizer)
    system = {"role": "system", "content": "你是一个乐于助人的助手。"}
    rounds = [[{"role": "user", "content": f"第{i}个问题：{'天气怎么样' * (i + 1)}？"},
               {"role": "assistant", "content": f"第{i}个回答：{'今天晴朗' * (i + 2)}。"}] for i in range(6)]  # fmt: skip
    messages = [system] + [m for r in rounds for m in r]
    budget = 160
    stats = ConvertStats()
    parts = list(
        convert_records([Record({"messages": messages}, "t:1")], "openai", splitter=Splitter(tokenizer, template, budget), stats=stats)
    )
    assert len(parts) > 2 and stats.split == 1 and stats.written == len(parts)
    # every part opens with the system prompt and a user turn; together they hold every round once, in order
    assert all(p["messages"][0] == system and p["messages"][1]["role"] == "user" for p in parts)
    assert [m for p in parts for m in p["messages"][1:]] == messages[1:]
    # and each part fits when finetune_chat.py tokenizes it at --cutoff_len = budget: nothing truncated, no further split
    path = tmp_path / "parts.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in parts), encoding="utf-8")
    samples = load_chat_dataset(path, tokenizer, template, budget, use_cache=False)
    assert len(samples) == len(parts) and max(len(s["input_ids"]) for s in samples) <= budget
    whole = load_chat_dataset(path, tokenizer, template, 10_000, use_cache=False)
    assert [len(s["input_ids"]) for s in whole] == [len(s["input_ids"]) for s in samples]
    # merging any two neighbours would not fit: the split is as coarse as the budget allows
    stats2 = TokenizeStats()
    from chinese_vicuna.data.chat import tokenize_conversations
    from chinese_vicuna.data.formats import Conversation

    for a, b in itertools.pairwise(parts):
        merged = Conversation(a["messages"] + b["messages"][1:], "m")
        [s] = tokenize_conversations([merged], tokenizer, template, 10_000, stats=stats2)
        assert len(s["input_ids"]) > budget


def test_cli_converts_sharegpt_html_that_finetune_chat_trains_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "sharegpt.json"
    turns = [("写个排序的例子", CHATGPT_HTML), (Q1, f"<p>{A1}</p>", Q2, f"<p>{A2}<br>就这些。</p>"), ("空回答", "<p></p>")]
    records = [{"conversations": [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(t)]} for t in turns]
    src.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "chat.jsonl"
    proc = run_script("tools/convert_data.py", "--input", str(src), "--output", str(out), "--to", "openai", "--html_to_markdown", "true",
                      "--split_to_tokens", "512", "--base_model", str(tiny_model_dir))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["records"] == 3 and counts["converted"] == 2 and counts["written"] == 2 and counts["split"] == 0
    assert counts["dropped"] == {"a message (assistant) is empty; remove the turn or the record": 1}
    converted = read_jsonl(out)
    assert converted[0]["messages"][1]["content"] == CHATGPT_MARKDOWN
    assert converted[1]["messages"][3]["content"] == f"{A2}\n就这些。"
    args = memorize_args(tiny_model_dir, out, tmp_path / "lora", epochs=1, save_steps=100)
    proc = run_script("finetune_chat.py", *args[1:], "--max_steps", "1", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 conversations in openai format" in proc.stderr and (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from convert_data import main

    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps(INPUTS["alpaca"], ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(src), "--output", str(tmp_path / "b.jsonl"), "--to", "csv"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == "error: --to csv: use one of alpaca, sharegpt, openai"
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(src), "--output", str(tmp_path / "b.jsonl"), "--to", "openai", "--split_to_tokens", "512"])
    assert exit_info.value.code == 2 and "add --base_model" in capsys.readouterr().err
