"""Chat templates: byte-exact rendering and exact label masks for a 3-turn conversation.

The trained characters are rebuilt from the token pieces themselves (`▁` → space, `<0xNN>`
byte pieces → bytes), so the check does not go through the encoding it tests. Later segments
are encoded as continuations (design.md, Tokenization rules): no SentencePiece dummy-prefix
space before an answer, so an answer `X` is trained as `X` (as whole-text tokenization has it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_prompts import CV_SYSTEM, VICUNA_SYSTEM  # the design.md system prompts

from chinese_vicuna.data.chat import tokenize_conversations
from chinese_vicuna.data.encode import IGNORE_INDEX, encode_segments
from chinese_vicuna.data.formats import Conversation
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template

U = ["你好", "你叫什么名字？", "你会做什么？"]
A = ["你好！有什么可以帮你的吗？", "我是一个AI助手。", "我可以回答问题、写作和翻译。"]
MESSAGES = [m for u, a in zip(U, A) for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
SYSTEM = "你是一个乐于助人的助手。"

CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml(system: str, turns: list[tuple[str, str | None]]) -> str:
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    for u, a in turns:
        text += f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n"
        text += f"{a}<|im_end|>\n" if a is not None else ""
    return text


# name, system passed to chat_segments, full 3-turn text, open prompt after turn 2,
# trained characters of each answer (the last one with the trained EOS where the template
# does not end its answers with EOS itself).
CASES = {
    "chinese-vicuna-chat": (
        None,
        CV_SYSTEM + "".join(f"User:{u}\n\nAssistant:{a}\n\n" for u, a in zip(U, A)),
        CV_SYSTEM + f"User:{U[0]}\n\nAssistant:{A[0]}\n\nUser:{U[1]}\n\nAssistant:",
        [f"{A[0]}\n\n", f"{A[1]}\n\n", f"{A[2]}\n\n</s>"],
    ),
    "vicuna_v1.1": (
        None,
        f"{VICUNA_SYSTEM} USER: {U[0]} ASSISTANT: {A[0]}</s>USER: {U[1]} ASSISTANT: {A[1]}</s>USER: {U[2]} ASSISTANT: {A[2]}</s>",
        f"{VICUNA_SYSTEM} USER: {U[0]} ASSISTANT: {A[0]}</s>USER: {U[1]} ASSISTANT:",
        [f" {A[0]}</s>", f" {A[1]}</s>", f" {A[2]}</s>"],
    ),
    "llama2": (
        SYSTEM,
        f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{U[0]} [/INST] {A[0]} </s><s>[INST] {U[1]} [/INST] {A[1]} </s>"
        f"<s>[INST] {U[2]} [/INST] {A[2]} </s>",
        f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{U[0]} [/INST] {A[0]} </s><s>[INST] {U[1]} [/INST]",
        [f" {A[0]} </s>", f" {A[1]} </s>", f" {A[2]} </s>"],
    ),
    "chatml": (
        None,
        chatml("You are a helpful assistant.", list(zip(U, A))),
        chatml("You are a helpful assistant.", [(U[0], A[0]), (U[1], None)]),
        [f"{A[0]}<|im_end|>\n", f"{A[1]}<|im_end|>\n", f"{A[2]}<|im_end|>\n</s>"],
    ),
    "llama3": (
        SYSTEM,
        f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
        + "".join(
            f"<|start_header_id|>user<|end_header_id|>\n\n{u}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{a}<|eot_id|>"
            for u, a in zip(U, A)
        ),
        f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U[0]}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{A[0]}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U[1]}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        [f"{A[0]}<|eot_id|>", f"{A[1]}<|eot_id|>", f"{A[2]}<|eot_id|></s>"],
    ),
    "auto": (
        SYSTEM,
        chatml(SYSTEM, list(zip(U, A))),
        chatml(SYSTEM, [(U[0], A[0]), (U[1], None)]),
        [f"{A[0]}<|im_end|>\n", f"{A[1]}<|im_end|>\n", f"{A[2]}<|im_end|>\n</s>"],
    ),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = CHATML_JINJA  # for `auto`: the tokenizer's own template (ChatML here)
    return tok


def piece_text(tokenizer, ids: list[int]) -> str:
    """The characters the token pieces stand for, without the tokenizer's decoding rules."""
    out = bytearray()
    for piece in tokenizer.convert_ids_to_tokens(ids):
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        out += bytes([int(byte.group(1), 16)]) if byte else piece.replace("▁", " ").encode()
    return out.decode("utf-8")


def trained_runs(tokenizer, sample: dict[str, list[int]]) -> list[str]:
    """The characters of every maximal run of trained positions."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for input_id, label in zip(sample["input_ids"], sample["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == input_id  # labels are the ids themselves (shifted inside the model)
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(input_id)
        previous = label
    return [piece_text(tokenizer, run) for run in runs]


def render(template, messages, system, gen) -> str:
    return "".join(s.text for s in template.chat_segments(messages, system=system, add_generation_prompt=gen))


@pytest.mark.parametrize("name", list(CASES))
def test_rendering_is_byte_exact(tokenizer, name: str) -> None:
    system, full, open_prompt, _ = CASES[name]
    template = load_template(name, tokenizer)
    assert render(template, MESSAGES, system, gen=False) == full
    assert render(template, [*MESSAGES[:3]], system, gen=True) == open_prompt


def test_llama2_without_system_and_system_message_override(tokenizer) -> None:
    llama2 = load_template("llama2", tokenizer)
    assert render(llama2, MESSAGES[:3], None, gen=True) == f"[INST] {U[0]} [/INST] {A[0]} </s><s>[INST] {U[1]} [/INST]"
    # a leading system message in the data replaces the template's default system prompt
    cv = load_template("chinese-vicuna-chat", tokenizer)
    with_system = [{"role": "system", "content": SYSTEM}, *MESSAGES[:1]]
    assert render(cv, with_system, None, gen=True) == f"{SYSTEM}\n\nUser:{U[0]}\n\nAssistant:"


@pytest.mark.parametrize("name", list(CASES))
def test_label_mask_is_exact(tokenizer, name: str) -> None:
    system, _, _, expected = CASES[name]
    template = load_template(name, tokenizer)
    messages = ([{"role": "system", "content": system}] if system else []) + MESSAGES
    [sample] = tokenize_conversations([Conversation(messages, "test")], tokenizer, template, cutoff_len=2048)
    assert sample["input_ids"][0] == tokenizer.bos_token_id and sample["labels"][0] == IGNORE_INDEX
    assert trained_runs(tokenizer, sample) == expected
    # all user and system text is masked: the untrained characters hold every one of them
    untrained = piece_text(tokenizer, [i for i, lab in zip(sample["input_ids"], sample["labels"]) if lab == IGNORE_INDEX])
    for text in [*U, system or template.default_system]:
        assert text.strip() in untrained


@pytest.mark.parametrize("name", list(CASES))
def test_inference_prompt_is_the_trained_prefix(tokenizer, name: str) -> None:
    """chat_segments(history + [user], add_generation_prompt=True) gives exactly the ids the
    model saw before each answer in training, and the next position is that answer's first
    trained token."""
    system, _, _, _ = CASES[name]
    template = load_template(name, tokenizer)
    [sample] = tokenize_conversations(
        [Conversation(([{"role": "system", "content": system}] if system else []) + MESSAGES, "test")], tokenizer, template, 2048
    )
    starts = []
    for turn in range(3):
        history = MESSAGES[: 2 * turn + 1]
        ids, _ = encode_segments(tokenizer, template.chat_segments(history, system=system, add_generation_prompt=True))
        assert sample["input_ids"][: len(ids)] == ids
        assert sample["labels"][len(ids) - 1] == IGNORE_INDEX and sample["labels"][len(ids)] != IGNORE_INDEX
        starts.append(len(ids))
    assert starts == sorted(starts)


def test_last_turn_only_keeps_ids_and_trains_last_answer(tokenizer) -> None:
    template = load_template("chinese-vicuna-chat", tokenizer)
    conv = [Conversation(MESSAGES, "test")]
    [full] = tokenize_conversations(conv, tokenizer, template, 2048)
    [last] = tokenize_conversations(conv, tokenizer, template, 2048, train_on_last_turn_only=True)
    assert last["input_ids"] == full["input_ids"]
    assert trained_runs(tokenizer, last) == [f"{A[2]}\n\n</s>"]
    [everything] = tokenize_conversations(conv, tokenizer, template, 2048, train_on_inputs=True)
    assert everything["labels"][1:] == everything["input_ids"][1:]


def test_instruction_template_is_refused(tokenizer) -> None:
    from chinese_vicuna.errors import UserError

    with pytest.raises(UserError, match="instruction template"):
        tokenize_conversations([Conversation(MESSAGES, "test")], tokenizer, load_template("alpaca", tokenizer), 2048)
