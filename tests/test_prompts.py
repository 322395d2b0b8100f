"""Byte-exact rendering of every built-in template (pitfall 7: train and inference agree)."""

from __future__ import annotations

import json

import pytest

from chinese_vicuna.errors import UserError
from chinese_vicuna.prompts import Segment, available_templates, load_template

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n翻译成英文\n\n### Input:\n你好，世界！\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n中国的首都是哪里？\n\n### Response:\n"
)
CV_SYSTEM = (
    "The following is a conversation between an AI assistant called Assistant and a human user called User. "
    "The assistant is intelligent, knowledgeable and polite to answer questions of user.\n\n"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TWO_TURNS = [
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你？"},
    {"role": "user", "content": "讲个笑话"},
]


def render(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments)


def test_every_builtin_template_loads() -> None:
    names = available_templates()
    assert {"alpaca", "chinese-alpaca", "chinese-vicuna-chat", "vicuna_v1.1", "llama2", "chatml", "llama3", "auto"} <= set(names)
    for name in names:
        if name != "auto":
            assert load_template(name).name == name


def test_alpaca_with_and_without_input() -> None:
    t = load_template("alpaca")
    assert t.instruction_prompt("翻译成英文", "你好，世界！") == ALPACA_INPUT
    assert t.instruction_prompt("中国的首都是哪里？") == ALPACA_NO_INPUT
    segs = t.instruction_segments("中国的首都是哪里？", "", "北京。")
    assert segs == [Segment(ALPACA_NO_INPUT, False), Segment("北京。", True)]


def test_chinese_alpaca_has_one_space_after_response() -> None:
    t = load_template("chinese-alpaca")
    assert t.instruction_prompt("中国的首都是哪里？") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n中国的首都是哪里？\n\n### Response: "
    )


def test_chinese_vicuna_chat() -> None:
    t = load_template("chinese-vicuna-chat")
    text = render(t.chat_segments(TWO_TURNS))
    assert text == CV_SYSTEM + "User:你好\n\nAssistant:你好！有什么可以帮你？\n\nUser:讲个笑话\n\nAssistant:"
    segs = t.chat_segments(TWO_TURNS)
    assert [s.trainable for s in segs] == [False, True, False]
    assert segs[1].text == "你好！有什么可以帮你？\n\n"


def test_vicuna_v11() -> None:
    t = load_template("vicuna_v1.1")
    text = render(t.chat_segments(TWO_TURNS))
    assert text == VICUNA_SYSTEM + " USER: 你好 ASSISTANT: 你好！有什么可以帮你？</s>USER: 讲个笑话 ASSISTANT:"
    assert "</s>" in t.stop_strings and "USER:" in t.stop_strings


def test_llama2_with_and_without_system() -> None:
    t = load_template("llama2")
    with_system = render(t.chat_segments(TWO_TURNS, system="你是助手。"))
    assert with_system == "[INST] <<SYS>>\n你是助手。\n<</SYS>>\n\n你好 [/INST] 你好！有什么可以帮你？ </s><s>[INST] 讲个笑话 [/INST]"
    assert render(t.chat_segments(TWO_TURNS[:1])) == "[INST] 你好 [/INST]"


def test_chatml_and_llama3() -> None:
    chatml = render(load_template("chatml").chat_segments(TWO_TURNS, system="S"))
    assert chatml == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n你好！有什么可以帮你？<|im_end|>\n<|im_start|>user\n讲个笑话<|im_end|>\n<|im_start|>assistant\n"
    )
    llama3 = render(load_template("llama3").chat_segments(TWO_TURNS[:1], system="S"))
    assert llama3 == (
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_auto_uses_the_tokenizers_chat_template(tiny_model_dir) -> None:
    from chinese_vicuna.model.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    t = load_template("auto", tok)
    segs = t.chat_segments(TWO_TURNS, system="")
    assert render(segs) == "<user>你好</user><assistant>你好！有什么可以帮你？</assistant><user>讲个笑话</user><assistant>"
    assert [s for s in segs if s.trainable] == [Segment("你好！有什么可以帮你？</assistant>", True)]


def test_user_text_with_braces_is_not_formatted() -> None:
    t = load_template("alpaca")
    assert "{input} {0} {eos}" in t.instruction_prompt("{input} {0} {eos}")


def test_custom_json_template_and_errors(tmp_path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"prompt_input": "Q:{instruction}|{input}\nA:", "prompt_no_input": "Q:{instruction}\nA:"}), encoding="utf-8")
    assert load_template(str(path)).instruction_prompt("问", "入") == "Q:问|入\nA:"
    with pytest.raises(UserError, match="unknown prompt template 'nope'"):
        load_template("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json: not a valid JSON template"):
        load_template(str(bad))


def test_role_order_is_validated() -> None:
    t = load_template("chinese-vicuna-chat")
    with pytest.raises(UserError, match="message 2 has role 'user' where 'assistant' was expected"):
        t.chat_segments([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(UserError, match="unknown role 'bot'"):
        t.chat_segments([{"role": "bot", "content": "a"}])
