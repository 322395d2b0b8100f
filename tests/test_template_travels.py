"""The template travels with the model (pitfall 17): the Jinja chat_template written into merged
models and GGUF files renders byte-identically to the registry template; inference scripts use
the template saved beside the adapter or model unless one is named."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
from test_prefix_consistency import ANSWERS, USERS, conversations

from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import TEMPLATE_FILE, available_templates, load_template, resolve_template, saved_template
from conftest import SAMPLE_INSTRUCT, memorize_args, read_jsonl, run_script

NAMED = [t for t in available_templates() if t != "auto"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def registry_text(template, messages: list[dict[str, str]], gen: bool) -> str:
    if template.is_chat:
        return "".join(s.text for s in template.chat_segments(messages, add_generation_prompt=gen))
    text = template.instruction_prompt(messages[0]["content"])
    return text + (messages[1]["content"] if len(messages) > 1 else "")


def matrix(template) -> list[tuple[list[dict[str, str]], bool]]:
    """(messages, add_generation_prompt): the prefix-consistency matrix, whole and open."""
    if not template.is_chat:
        return [
            (msgs, False)
            for u, a in itertools.product(USERS, ANSWERS)
            for msgs in ([{"role": "user", "content": u}, {"role": "assistant", "content": a}], [{"role": "user", "content": u}])
        ]
    cases = []
    for system, messages in conversations(template.name):
        head = [] if system is None else [{"role": "system", "content": system}]
        cases += [(head + messages, False), (head + messages[:-1], True), (head + messages[:-1], False)]
    return cases


@pytest.mark.parametrize("name", NAMED)
def test_jinja_chat_template_renders_like_the_registry(tokenizer, name: str) -> None:
    template = load_template(name, tokenizer)
    tokenizer.chat_template = template.jinja()
    cases = matrix(template)
    assert len(cases) >= 60
    for messages, gen in cases:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert rendered == registry_text(template, messages, gen), (messages, gen)


def test_saved_template_is_used_and_an_explicit_one_wins_with_a_warning(tmp_path: Path, caplog) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert saved_template([adapter, None]) is None
    assert resolve_template(None, None, "alpaca").name == "alpaca"  # nothing saved: the fallback
    assert resolve_template(None, None, None) is None
    load_template("chinese-alpaca").save(adapter)
    assert (adapter / TEMPLATE_FILE).is_file()
    saved = saved_template([adapter, tmp_path])
    assert resolve_template(None, saved, "alpaca").name == "chinese-alpaca"
    with caplog.at_level(logging.WARNING):
        assert resolve_template("chinese-alpaca", saved, "alpaca").name == "chinese-alpaca"
    assert "differs" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert resolve_template("alpaca", saved, "alpaca").name == "alpaca"
    assert "differs from the template the model was trained with ('chinese-alpaca'" in caplog.text


def test_a_lora_trained_with_chinese_alpaca_answers_through_generate_without_naming_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The issue's end to end: finetune.py --prompt_template chinese-alpaca, then generate.py's
    file mode with no --prompt_template gives back the memorized answers (greedy)."""
    records = [read_jsonl(SAMPLE_INSTRUCT)[i] for i in (0, 1, 2, 12)]  # the last one has an input
    assert records[-1]["input"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    lora = tmp_path / "lora"
    proc = run_script(*memorize_args(tiny_model_dir, data, lora, save_steps=1000), "--prompt_template", "chinese-alpaca")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((lora / TEMPLATE_FILE).read_text(encoding="utf-8"))["name"] == "chinese-alpaca"

    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"instruction": r["instruction"], "input": r["input"]}, ensure_ascii=False) + "\n" for r in records), "utf-8"
    )
    ask = ["generate.py", "--base_model", str(tiny_model_dir), "--lora_weights", str(lora), "--data_file", str(questions)]
    proc = run_script(*ask, "--output_file", str(tmp_path / "answers.jsonl"), "--max_new_tokens", "96")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prompt template 'chinese-alpaca', saved with the model" in proc.stderr
    assert [r["output"] for r in read_jsonl(tmp_path / "answers.jsonl")] == [r["output"] for r in records]

    proc = run_script(*ask, "--output_file", str(tmp_path / "alpaca.jsonl"), "--max_new_tokens", "1", "--prompt_template", "alpaca")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--prompt_template alpaca differs from the template the model was trained with ('chinese-alpaca'); using alpaca" in proc.stderr


# The reference renderings (the leading BOS, which training adds as an id, is cut off).
LLAMA2_OFFICIAL = (  # meta-llama/Llama-2-7b-chat-hf tokenizer_config.json
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_OFFICIAL = (  # meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def fastchat_vicuna(messages: list[dict[str, str]], gen: bool) -> str:
    """FastChat's Conversation.get_prompt for vicuna_v1.1 (SeparatorStyle.ADD_COLON_TWO, sep ' ', sep2 '</s>')."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else load_template("vicuna_v1.1").default_system
    turns = [(("USER", "ASSISTANT")[m["role"] == "assistant"], m["content"]) for m in messages if m["role"] != "system"]
    if gen:
        turns.append(("ASSISTANT", None))
    ret, seps = system + " ", [" ", "</s>"]
    for i, (role, message) in enumerate(turns):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


@pytest.mark.parametrize("name", ["llama2", "llama3", "vicuna_v1.1"])
def test_templates_match_their_references(tokenizer, name: str) -> None:
    """llama2 / llama3 byte-identical to the official chat templates (whitespace trimmed, an
    explicit empty system prompt), vicuna_v1.1 to FastChat (an empty system prompt's leading space)."""
    template = load_template(name, tokenizer)
    official = {"llama2": LLAMA2_OFFICIAL, "llama3": LLAMA3_OFFICIAL}.get(name)
    checked = 0
    for messages, gen in matrix(template):
        if name == "llama2" and (messages[-1]["role"] == "user") != gen:
            continue  # the official Llama-2 template has no generation prompt: compare whole turns only
        if official is not None:
            bos = tokenizer.bos_token
            want = tokenizer.apply_chat_template(messages, chat_template=official, tokenize=False, add_generation_prompt=gen)
            assert want.startswith(bos)
            want = want[len(bos) :]
        else:
            want = fastchat_vicuna(messages, gen)
        assert registry_text(template, messages, gen) == want, (messages, gen)
        checked += 1
    assert checked >= 60
    if name == "vicuna_v1.1":
        assert (
            registry_text(template, [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}], True) == " USER: hi ASSISTANT:"
        )
