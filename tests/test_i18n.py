"""chinese_vicuna/infer/i18n.py: one table, both languages for every key, the same placeholders
in both, and --ui_language checked when parsed."""

from __future__ import annotations

import string

import pytest

from chinese_vicuna.args import UIArguments, parse_args
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.generation import GenerationStats
from chinese_vicuna.infer.i18n import LANGUAGES, MESSAGES, Messages


def placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_every_message_has_both_languages_with_the_same_placeholders():
    assert [key for key, texts in MESSAGES.items() if set(texts) != set(LANGUAGES)] == []
    assert [key for key, texts in MESSAGES.items() if placeholders(texts["zh"]) != placeholders(texts["en"])] == []


def test_messages_format_in_each_language():
    stats = GenerationStats(new_tokens=12, seconds=2.0, stopped_by="eos")
    assert Messages("zh").stats(stats) == "生成 12 个 token，用时 2.0 秒（6.0 tokens/s），结束原因：eos"
    assert Messages("en").stats(stats) == "12 tokens in 2.0 s (6.0 tokens/s), ended by eos"
    assert Messages("en")("cli.undone", turns=1) == "[undone; 1 turn(s) left]"
    assert Messages()("chat.send") == "发送"  # zh is the default


def test_ui_language_flag():
    assert parse_args((UIArguments,), [])[0].ui_language == "zh"
    assert parse_args((UIArguments,), ["--ui_language", "en"])[0].ui_language == "en"
    with pytest.raises(UserError, match="--ui_language 'fr': use zh or en"):
        parse_args((UIArguments,), ["--ui_language", "fr"])
