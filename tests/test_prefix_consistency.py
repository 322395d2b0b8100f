"""Prefix-consistent encoding (design.md, Tokenization rules; pitfall 16).

Over every built-in template (system / no system / empty system, 1-3 turns, leading and
trailing whitespace, Chinese, English, code, emoji) and over `sample/`:
- at every assistant turn the ids before the answer equal `tokenizer(rendered prefix)` (with
  BOS), what vLLM, TGI, llama.cpp and `apply_chat_template` + `tokenizer(text)` feed a model;
- where no token of the whole-text tokenization spans a segment boundary, the whole sample
  equals whole-text tokenization;
- the batched (sentencepiece) path gives the same ids as the one-sample path;
and greedy generation with stock transformers (`tokenizer(prompt_text)` → `generate`) on a
merged model reproduces the memorized answers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from test_chat_templates import CHATML_JINJA

from chinese_vicuna.data.chat import conversation_segment_lists, template_trains_eos
from chinese_vicuna.data.encode import IGNORE_INDEX, encode_segments, tokenize_segment_lists
from chinese_vicuna.data.fast_tokenize import BatchEncoder, encode_continuations
from chinese_vicuna.data.formats import read_conversations
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import Segment, available_templates, load_template
from conftest import MEMORIZED_COUNT, SAMPLE_INSTRUCT, read_jsonl

SAMPLE = Path(__file__).resolve().parent.parent / "sample"
CHAT_SAMPLES = sorted((SAMPLE / "chat").glob("*.json*"))

USERS = [
    "中国的首都是哪里？",
    "  What is the capital of France?  ",
    "写一个函数：\ndef add(a, b):\n    return a + b\n",
    "表情 😀🎉 emoji",
    "\n换行开头，结尾也有空格 ",
]
ANSWERS = [
    "北京。",
    "Paris is the capital of France.",
    "    indented code\nprint('你好')\n",
    "好的 😀",
    " leading space, trailing newline\n",
    "```python\nx = {'a': 1}\n```",
]
SYSTEMS = {"default": None, "empty": "", "custom": "你是一个乐于助人的助手。 "}
TEMPLATES = available_templates()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = CHATML_JINJA  # for `auto`
    return tok


def boundaries(texts: Sequence[str]) -> list[int]:
    """Character offsets where a segment starts (after the first)."""
    return list(itertools.accumulate(len(t) for t in texts))[:-1]


def spanned(tokenizer, text: str, cuts: Sequence[int]) -> bool:
    """Whether a token of the whole-text tokenization covers characters on both sides of a cut."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return any(start < cut < end for start, end in offsets for cut in cuts)


def new_counts() -> dict[str, int]:
    keys = ["turns checked", "turns with a token across an earlier boundary", "samples equal to whole-text tokenization"]
    return dict.fromkeys([*keys, "samples with a token across a boundary"], 0)


def check_sample(tokenizer, segments: Sequence[Segment], input_ids: list[int], counts: dict[str, int]) -> None:
    """The two properties for one encoded sample (input_ids = [bos] + segments [+ eos])."""
    texts = [s.text for s in segments]
    cuts = boundaries(texts)
    # ids of the sample segment by segment: the first one whole, then continuations
    lengths = [len(tokenizer(texts[0], add_special_tokens=False)["input_ids"])]
    lengths += [len(ids) for ids in encode_continuations(tokenizer, texts[1:])]
    pos = 1
    for k, seg in enumerate(segments):
        if seg.trainable:
            prefix = "".join(texts[:k])
            if not spanned(tokenizer, prefix, cuts[: k - 1]):
                assert input_ids[:pos] == tokenizer(prefix)["input_ids"], (prefix, seg.text)
                counts["turns checked"] += 1
            else:
                counts["turns with a token across an earlier boundary"] += 1
        pos += lengths[k]
    whole = tokenizer("".join(texts))["input_ids"]
    if spanned(tokenizer, "".join(texts), cuts):
        counts["samples with a token across a boundary"] += 1
        assert input_ids[:pos] != whole  # the span is real: whole-text tokenization merged across it
    else:
        assert input_ids[:pos] == whole
        counts["samples equal to whole-text tokenization"] += 1


def conversations(template_name: str) -> list[tuple[str | None, list[dict[str, str]]]]:
    """(system, messages) over the matrix: 3 system variants x 1-3 turns x rotated contents."""
    out = []
    for (_, system), turns, shift in itertools.product(SYSTEMS.items(), (1, 2, 3), range(len(ANSWERS))):
        messages = []
        for t in range(turns):
            messages.append({"role": "user", "content": USERS[(shift + t) % len(USERS)]})
            messages.append({"role": "assistant", "content": ANSWERS[(shift + 2 * t) % len(ANSWERS)]})
        out.append((system, messages))
    return out


@pytest.mark.parametrize("name", TEMPLATES)
def test_prefix_consistency_over_the_template_matrix(tokenizer, name: str) -> None:
    template = load_template(name, tokenizer)
    counts = new_counts()
    segment_lists = []
    if template.is_chat:
        for system, messages in conversations(name):
            segment_lists.append(template.chat_segments(messages, system=system, add_generation_prompt=False))
            # the open prompt of inference: tokenizer(rendered prompt) exactly, every time
            prompt = template.chat_segments(messages[:-1], system=system, add_generation_prompt=True)
            ids, _ = encode_segments(tokenizer, prompt)
            prompt_text = "".join(s.text for s in prompt)
            if not spanned(tokenizer, prompt_text, boundaries([s.text for s in prompt])):
                assert ids == tokenizer(prompt_text)["input_ids"]
    else:
        for instruction, answer, inp in itertools.product(USERS, ANSWERS, ["", "  输入 input "]):
            segment_lists.append(template.instruction_segments(instruction, inp, answer))
            ids, _ = encode_segments(tokenizer, template.instruction_segments(instruction, inp))
            assert ids == tokenizer(template.instruction_prompt(instruction, inp))["input_ids"]
    add_eos = not template.is_chat or not template_trains_eos(template, tokenizer)
    batched = tokenize_segment_lists(tokenizer, segment_lists, cutoff_len=4096, add_eos=add_eos)
    assert len(batched) == len(segment_lists)
    for segments, sample in zip(segment_lists, batched, strict=True):
        single, labels = encode_segments(tokenizer, segments, add_eos=add_eos)
        assert sample["input_ids"] == single and sample["labels"] == labels  # batched == one at a time
        check_sample(tokenizer, segments, sample["input_ids"], counts)
    # the properties were checked, not skipped: spans are the exception (a template's trailing
    # space before the answer, as chinese-alpaca's "### Response: ")
    assert counts["turns checked"] >= len(segment_lists), counts
    if name != "chinese-alpaca":
        assert counts["samples equal to whole-text tokenization"] >= 0.8 * len(segment_lists), counts


def test_no_dummy_prefix_token_before_answers(tokenizer) -> None:
    """The issue's example: the alpaca answer starts with 北京 right after the newline, no lone ▁."""
    template = load_template("alpaca", tokenizer)
    ids, labels = encode_segments(tokenizer, template.instruction_segments("中国的首都是哪里？", "", "北京是中国的首都。"), add_eos=True)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert tokenizer.convert_ids_to_tokens(ids[first - 2 : first + 1]) == [":", "<0x0A>", "北京"]


@pytest.mark.parametrize("name", ["alpaca", "chinese-alpaca"])
def test_sample_instructions_prefix_consistent(tokenizer, name: str) -> None:
    from chinese_vicuna.data.encode import tokenize_instructions

    records = [dict({"input": ""}, **r) for r in read_jsonl(SAMPLE_INSTRUCT)]
    template = load_template(name, tokenizer)
    samples = tokenize_instructions(records, tokenizer, template, cutoff_len=4096)
    assert len(samples) == len(records)
    counts = new_counts()
    for r, sample in zip(records, samples, strict=True):
        prompt = tokenizer(template.instruction_prompt(r["instruction"], r["input"]))["input_ids"]
        assert sample["input_ids"][: len(prompt)] == prompt
        assert sample["labels"][len(prompt) - 1] == IGNORE_INDEX and sample["labels"][len(prompt)] != IGNORE_INDEX
        check_sample(tokenizer, template.instruction_segments(r["instruction"], r["input"], r["output"]), sample["input_ids"], counts)
    assert counts["turns checked"] == len(records)


@pytest.mark.parametrize("path", CHAT_SAMPLES, ids=[p.name for p in CHAT_SAMPLES])
def test_sample_conversations_prefix_consistent(tokenizer, path: Path) -> None:
    template = load_template("chinese-vicuna-chat", tokenizer)
    convs = read_conversations(path)
    segment_lists = conversation_segment_lists(convs, tokenizer, template, cutoff_len=100_000, add_eos=True)
    samples = tokenize_segment_lists(tokenizer, segment_lists, cutoff_len=100_000, add_eos=True)
    counts = new_counts()
    for segments, sample in zip(segment_lists, samples, strict=True):
        check_sample(tokenizer, segments, sample["input_ids"], counts)
    assert counts["samples equal to whole-text tokenization"] == len(samples), counts


def test_batch_encoder_continuations_equal_hf(tokenizer) -> None:
    """The sentencepiece path obeys the same rule: continuations (leading spaces, newlines,
    added-token text) equal the HF continuation ids, in one call and pipelined."""
    encoder = BatchEncoder(tokenizer)
    assert encoder.fast
    texts = ["  two  spaces", "\n\n换行", " x", "答案</s>结束", "你好", "😀", "    def f():\n        return 1"] * 30
    starts = [i % 3 == 0 for i in range(len(texts))]
    want = [
        tokenizer(t, add_special_tokens=False)["input_ids"] if s else c
        for t, s, c in zip(texts, starts, encode_continuations(tokenizer, texts), strict=True)
    ]
    assert encoder(texts, starts) == want
    batches = [(texts[i : i + 7], starts[i : i + 7]) for i in range(0, len(texts), 7)]
    assert [ids for batch in encoder.map(batches) for ids in batch] == want
    assert encoder.fast
    # a continuation never starts with the dummy-prefix piece unless the text starts with a space
    for t, ids in zip(texts, encode_continuations(tokenizer, texts), strict=True):
        assert (tokenizer.convert_ids_to_tokens(ids[:1])[0].startswith("▁")) == t.startswith(" ")


def test_stock_transformers_on_merged_model_reproduce_memorized_answers(
    tiny_model_dir: Path, memorized_lora: Path, memorized_data: Path, tmp_path: Path
) -> None:
    """What any inference stack does: tokenizer(prompt text) → generate, greedy, on the merged model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import merge_lora

    # the template travels: the adapter and every checkpoint-N carry the one it was trained with
    checkpoints = list(memorized_lora.glob("checkpoint-*"))
    assert checkpoints and all((c / "prompt_template.json").is_file() for c in [memorized_lora, *checkpoints])
    out = tmp_path / "merged"
    merge_lora.main(["--base_model", str(tiny_model_dir), "--lora_weights", str(memorized_lora), "--output_dir", str(out)])
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    template = load_template("alpaca")
    records = read_jsonl(memorized_data)
    assert len(records) == MEMORIZED_COUNT
    for r in records:
        enc = tok(template.instruction_prompt(r["instruction"], r.get("input", "")), return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=128, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        assert tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True) == r["output"]
