"""One inference owner (issue 26): `infer/engine.py`'s `Engine` resolves the template by one rule
and turns messages into prompt ids for every front end; no front end renders a template or
tokenizes a prompt itself, and every front end's ids equal Engine's for every built-in template."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chinese_vicuna.args import ChatTemplateArguments, TemplateArguments
from chinese_vicuna.infer.engine import CHAT, DEFAULT_TEMPLATES, INSTRUCTION, Engine, adapter_template, model_template
from chinese_vicuna.prompts import TEMPLATE_FILE, available_templates, load_template
from conftest import REPO

# Building a prompt's ids or choosing a model's template: the template rendered, its segments
# encoded, a prompt tokenized, a saved template read or resolved.
BUILDING = re.compile(
    r"(?<![.\w])(?<!def )(prompt_ids|chat_prompt_ids|generate_answer|resolve_template|saved_template|template_from_json|encode_segments)\("
    r"|\.(chat_segments|instruction_segments|instruction_prompt)\(|apply_chat_template\(|(?<![\w])tokenizer\("
)
# Where that may happen, and why. Everything inference does is in infer/.
ALLOWED = {
    "chinese_vicuna/infer/engine.py": "the inference owner",
    "chinese_vicuna/infer/generation.py": "the prompt-id primitives Engine calls",
    "chinese_vicuna/infer/llamacpp.py": "a GGUF's saved template, read for Engine's rule",
    "chinese_vicuna/prompts.py": "the template registry itself",
    "chinese_vicuna/data/cache.py": "training data",
    "chinese_vicuna/data/chat.py": "training data",
    "chinese_vicuna/data/encode.py": "training data",
    "chinese_vicuna/data/fast_tokenize.py": "training data",
    "chinese_vicuna/data/preference.py": "training data (preference pairs)",
    "chinese_vicuna/board.py": "the training board's preview of training records, as training encodes them",
    "chinese_vicuna/datatools/formats_convert.py": "token counts of training data",
    "chinese_vicuna/model/vocab.py": "vocabulary expansion",
    "chinese_vicuna/evaluation/choice.py": "multiple-choice scoring: a letter's id as the prompt's continuation, no generation",
    "chinese_vicuna/export/merge.py": "merge verification ids",
    "chinese_vicuna/export/ollama.py": "the template an exported model carries",
    "tools/benchmark.py": "training tokenization benchmarks",
}
# The front ends: they reach a model only through Engine (no template loaded, rendered or tokenized).
FRONT_ENDS = [
    "generate.py",
    "chat.py",
    "serve.py",
    "chinese_vicuna/infer/session.py",
    "chinese_vicuna/serving/adapters.py",
    "chinese_vicuna/serving/engine.py",
    "chinese_vicuna/serving/openai_api.py",
    "chinese_vicuna/serving/launch.py",
    "chinese_vicuna/serving/llamacpp_server.py",
    "chinese_vicuna/evaluation/answers.py",
    "tools/gen_model_answer.py",
    "tools/cpu_chat.py",
    "tools/compare_answers.py",
    "tools/bench_streaming.py",
]


def sources() -> list[Path]:
    return sorted([*REPO.glob("*.py"), *REPO.glob("tools/*.py"), *REPO.glob("chinese_vicuna/**/*.py")])


def test_prompt_ids_are_built_only_by_the_inference_owner() -> None:
    found = {str(p.relative_to(REPO)) for p in sources() if BUILDING.search(p.read_text(encoding="utf-8"))}
    assert found - set(ALLOWED) == set(), "build prompts through chinese_vicuna.infer.engine.Engine"
    assert "chinese_vicuna/infer/engine.py" in found  # the pattern still finds what it looks for
    for name in FRONT_ENDS:
        text = (REPO / name).read_text(encoding="utf-8")
        assert not BUILDING.search(text) and "load_template(" not in text, name


def test_one_default_per_kind_and_the_rule(tmp_path: Path) -> None:
    assert DEFAULT_TEMPLATES == {INSTRUCTION: "alpaca", CHAT: "chinese-vicuna-chat"}
    # the flags' documented fallbacks are the same defaults
    assert TemplateArguments.fallback_template == DEFAULT_TEMPLATES[INSTRUCTION]
    assert ChatTemplateArguments.fallback_template == DEFAULT_TEMPLATES[CHAT]
    adapter, model = tmp_path / "adapter", tmp_path / "model"
    adapter.mkdir()
    model.mkdir()
    assert model_template(None, [adapter, model], INSTRUCTION).name == "alpaca"
    assert model_template(None, [adapter, model], CHAT).name == "chinese-vicuna-chat"
    assert model_template(None, [adapter, model], None) is None
    load_template("llama3").save(model)
    assert model_template(None, [adapter, model], INSTRUCTION).name == "llama3"  # saved beside the merged model
    load_template("chinese-alpaca").save(adapter)
    assert model_template(None, [adapter, model], CHAT).name == "chinese-alpaca"  # the adapter's first
    assert model_template("chatml", [adapter, model], INSTRUCTION).name == "chatml"  # asked for: wins
    # a LoRA beside a base: its saved template, else the base's
    base = load_template("vicuna_v1.1")
    assert adapter_template(adapter, base).name == "chinese-alpaca"
    (adapter / TEMPLATE_FILE).unlink()
    assert adapter_template(adapter, base) is base


HISTORY = [
    {"role": "user", "content": "你好，<s>介绍一下你自己"},
    {"role": "assistant", "content": "我是一个助手。"},
]
QUESTION = "北京有什么好玩的？</s>"
SYSTEM = "你是一个乐于助人的助手。"


@pytest.fixture(scope="module")
def front_ends(tiny_model_dir: Path):
    """The API server's prompt side (over a real batched engine) and the chat session, on the tiny model."""
    from chinese_vicuna.args import ChatSessionArguments, DecodingArguments
    from chinese_vicuna.model.build import load_for_inference
    from chinese_vicuna.serving.adapters import AdapterRegistry
    from chinese_vicuna.serving.engine import BatchEngine
    from chinese_vicuna.serving.openai_api import OpenAIServer, ServeLimits

    model, tokenizer = load_for_inference(str(tiny_model_dir))
    batch = BatchEngine(AdapterRegistry(model, tokenizer, {}, "alpaca"), tokenizer, 1, 0)
    yield model, tokenizer, OpenAIServer(batch, "base", ServeLimits()), ChatSessionArguments(), DecodingArguments()
    batch.close()


@pytest.mark.parametrize("name", [t for t in available_templates() if t != "auto"])
def test_every_front_end_asks_with_engines_ids(front_ends, name: str) -> None:
    from chinese_vicuna.infer.session import ChatSession
    from chinese_vicuna.serving.openai_api import ChatMessage

    model, tokenizer, server, session_args, decoding = front_ends
    template = load_template(name, tokenizer)
    engine = Engine.for_model(model, tokenizer, template)
    api = [ChatMessage(role=m["role"], content=m["content"]) for m in [{"role": "system", "content": SYSTEM}, *HISTORY]]
    if not template.is_chat:
        ids = engine.instruction_ids(QUESTION)
        assert engine.prompt_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]) == ids
        assert server.chat_prompt(template, "base", [api[0], ChatMessage(role="user", content=QUESTION)]) == ids  # serve.py
        assert ids == engine.prompt_ids([{"role": "user", "text": QUESTION}])  # Engine's public form
        return
    ids, dropped = engine.chat_ids(HISTORY, QUESTION, SYSTEM)  # gen_model_answer, cpu_chat
    assert dropped == 0
    messages = [{"role": "system", "content": SYSTEM}, *HISTORY, {"role": "user", "content": QUESTION}]
    assert engine.prompt_ids(messages) == ids  # Engine's public form
    assert server.chat_prompt(template, "base", [*api, ChatMessage(role="user", content=QUESTION)]) == ids  # serve.py
    chat = ChatSession(engine, session_args, decoding)  # chat.py's page and terminal
    assert chat.prompt(HISTORY, QUESTION, system=SYSTEM)[0] == ids
