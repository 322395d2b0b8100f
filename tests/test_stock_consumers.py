"""Every stock consumer gets the ids HF gets, BOS exactly once (pitfall 19), and an adapter
folder is all a stock tool needs: `AutoTokenizer.from_pretrained(adapter).apply_chat_template`
+ `PeftModel` ask the model as generate.py does (pitfall 17).

HF's ids for a conversation are `tokenizer(text)["input_ids"]` of the registry's rendering (BOS
added by the tokenizer); at an open prompt they are also the ids training and generate.py build
(`encode_segments`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_template_travels import matrix, registry_text

from chinese_vicuna.data.encode import encode_segments
from chinese_vicuna.errors import UserError
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import (
    CHAT_TEMPLATE_FILE,
    TEMPLATE_FILE,
    after_bos_for,
    available_templates,
    hf_chat_template,
    load_template,
    save_template_files,
)
from conftest import read_jsonl, run_script

NAMED = [t for t in available_templates() if t != "auto"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def training_prompt_ids(tokenizer, template, messages: list[dict[str, str]]) -> list[int]:
    """The ids training and generate.py put before an answer (an open prompt)."""
    if template.is_chat:
        segments = template.chat_segments(messages, add_generation_prompt=True)
    else:
        segments = template.instruction_segments(messages[-1]["content"])
    return encode_segments(tokenizer, segments)[0]


@pytest.mark.parametrize("name", NAMED)
def test_apply_chat_template_tokenize_gives_hf_ids_with_one_bos(tokenizer, name: str) -> None:
    """transformers 5 `apply_chat_template(tokenize=True)` adds no special tokens to the rendered
    text: the template's own BOS is the one, and the text after it tokenizes as at the start."""
    template = load_template(name, tokenizer)
    jinja = hf_chat_template(template, tokenizer)
    assert after_bos_for(tokenizer) == "space"  # transformers' converted LLaMA tokenizer: no dummy prefix after <s>
    open_prompts = 0
    for messages, gen in matrix(template):
        got = tokenizer.apply_chat_template(messages, chat_template=jinja, add_generation_prompt=gen, return_dict=False)
        want = tokenizer(registry_text(template, messages, gen))["input_ids"]
        assert got == want, (messages, gen)
        assert got[0] == tokenizer.bos_token_id != got[1], messages  # BOS once at the start
        if messages[-1]["role"] == "user" and (gen or not template.is_chat):
            assert got == training_prompt_ids(tokenizer, template, messages), messages
            open_prompts += 1
    assert open_prompts >= 20


def test_a_jinja_without_bos_renders_as_before(tokenizer) -> None:
    """`jinja()` (no BOS) is still the registry text byte for byte (tests/test_template_travels.py);
    with BOS the text is the BOS token, then that text joined as the tokenizer needs it."""
    template = load_template("vicuna_v1.1", tokenizer)
    empty_system = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    plain = tokenizer.apply_chat_template(empty_system, chat_template=template.jinja(), tokenize=False, add_generation_prompt=True)
    assert plain == " USER: hi ASSISTANT:"
    render = {
        join: tokenizer.apply_chat_template(
            empty_system, chat_template=template.jinja(bos=True, after_bos=join), tokenize=False, add_generation_prompt=True
        )
        for join in ("plain", "space", "strip")
    }
    assert render == {"plain": "<s> USER: hi ASSISTANT:", "space": "<s> USER: hi ASSISTANT:", "strip": "<s>USER: hi ASSISTANT:"}
    one = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(one, chat_template=template.jinja(bos=True, after_bos="space"), tokenize=False).startswith(
        "<s> A chat"
    )


def test_every_adapter_folder_is_self_describing(memorized_lora: Path, tokenizer) -> None:
    """finetune.py's output and every checkpoint-N carry the tokenizer and both template files."""
    folders = [memorized_lora, *sorted(memorized_lora.glob("checkpoint-*"))]
    assert len(folders) >= 2
    want = hf_chat_template(load_template("alpaca", tokenizer), tokenizer)
    from transformers import AutoTokenizer

    for folder in folders:
        assert (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8") == want, folder
        assert json.loads((folder / TEMPLATE_FILE).read_text(encoding="utf-8"))["name"] == "alpaca"
        assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert AutoTokenizer.from_pretrained(str(folder)).chat_template == want, folder


def stock_greedy(base: Path, adapter: Path, conversations: list[list[dict[str, str]]], max_new_tokens: int = 96) -> list[str]:
    """Stock tools only: AutoTokenizer + apply_chat_template + AutoModelForCausalLM + PeftModel."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)).eval()
    answers = []
    for messages in conversations:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
        answers.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


def test_stock_tools_reproduce_generate_py(tiny_model_dir: Path, memorized_lora: Path, memorized_data: Path, tmp_path: Path) -> None:
    """The adapter folder + stock tools give generate.py's greedy answers (the memorized ones)."""
    records = read_jsonl(memorized_data)[:4]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"instruction": r["instruction"]}, ensure_ascii=False) + "\n" for r in records), "utf-8")
    proc = run_script(
        "generate.py", "--base_model", str(tiny_model_dir), "--lora_weights", str(memorized_lora), "--data_file", str(questions),
        "--output_file", str(tmp_path / "answers.jsonl"), "--max_new_tokens", "96",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_generate = [r["output"] for r in read_jsonl(tmp_path / "answers.jsonl")]
    stock = stock_greedy(tiny_model_dir, memorized_lora, [[{"role": "user", "content": r["instruction"]}] for r in records])
    assert stock == by_generate == [r["output"] for r in records]


def test_stock_chat_lora_answers_its_memorized_turns(tiny_model_dir: Path, two_loras: dict[str, Path]) -> None:
    """A LoRA trained with a chat template (vicuna_v1.1, its turns end in EOS) through stock tools."""
    from serve_helpers import ANSWERS_B, INSTRUCTIONS

    stock = stock_greedy(tiny_model_dir, two_loras["b"], [[{"role": "user", "content": q}] for q in INSTRUCTIONS])
    assert stock == ANSWERS_B


@pytest.mark.parametrize("name", NAMED)
def test_stock_adapter_ids_equal_generate_ids_for_every_template(memorized_lora: Path, tmp_path: Path, tokenizer, name: str) -> None:
    """An adapter folder saved with each built-in template: stock `AutoTokenizer(adapter)
    .apply_chat_template` gives the prompt ids generate.py / chat.py build for the same turns
    (`prompt_ids`, `chat_prompt_ids`), so greedy answers are the same."""
    from transformers import AutoTokenizer

    from chinese_vicuna.infer.generation import chat_prompt_ids, prompt_ids

    adapter = tmp_path / name
    shutil.copytree(memorized_lora, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    template = load_template(name, tokenizer)
    save_template_files(adapter, template, tokenizer)
    stock = AutoTokenizer.from_pretrained(str(adapter))
    cases = [("中国的首都是哪里？", [], None), ("Write a haiku.", [], "Be brief.")]
    if template.is_chat:
        history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}]
        cases += [("再说一遍。", history, None), ("Again.", history * 2, "你是助手。")]
    for question, history, system in cases:
        messages = ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": question}]
        got = stock.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        if template.is_chat:
            want, _ = chat_prompt_ids(tokenizer, template, history, question, system=system)
        else:
            want = prompt_ids(tokenizer, template, question)  # an instruction template: the user message is the instruction
        assert got == want, (name, messages)


def test_vllm_hand_off_passes_each_loras_own_template(tiny_model_dir: Path, tmp_path: Path, tokenizer, caplog) -> None:
    """serve.py --engine vllm: LoRAs that carry their chat_template.jinja and tokenizer are rendered
    by vLLM with it (no server-wide --chat-template); an adapter from elsewhere keeps the server's
    template, with a warning naming it; the two kinds in one server are refused. The server-wide
    template is joined to BOS as the base's tokenizer needs."""
    import logging

    from chinese_vicuna.serving.launch import vllm_command

    def adapter(name: str, template: str | None, own_files: bool) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}), encoding="utf-8")
        if template and own_files:
            tokenizer.save_pretrained(str(folder))
            save_template_files(folder, load_template(template, tokenizer), tokenizer)
        elif template:
            load_template(template).save(folder)
        return folder

    chat, med = adapter("chat", "vicuna_v1.1", True), adapter("med", "alpaca", True)
    command, _ = vllm_command(str(tiny_model_dir), {"chat": str(chat), "med": str(med)}, "chinese-vicuna-chat", template_dir=tmp_path)
    assert "--chat-template" not in command and f"chat={chat}" in command
    upstream = adapter("upstream", None, False)
    with caplog.at_level(logging.WARNING):
        command, _ = vllm_command(str(tiny_model_dir), {"up": str(upstream)}, "alpaca", template_dir=tmp_path)
    assert "LoRA 'up' carries no chat_template.jinja" in caplog.text and "server's template 'alpaca'" in caplog.text
    jinja = Path(command[command.index("--chat-template") + 1]).read_text(encoding="utf-8")
    assert jinja == load_template("alpaca").jinja(bos=True, single_instruction=True, after_bos="space")
    same = adapter("same", "chinese-vicuna-chat", True)  # the server's template, carried too: also fine
    command, _ = vllm_command(str(tiny_model_dir), {"chat": str(chat), "same": str(same)}, "chinese-vicuna-chat", template_dir=tmp_path)
    assert "--chat-template" not in command
    with pytest.raises(UserError, match="vLLM can render one of the two ways per server"):
        vllm_command(str(tiny_model_dir), {"chat": str(chat), "up": str(upstream)}, "alpaca")
    with pytest.raises(UserError, match="one chat template"):
        vllm_command(str(tiny_model_dir), {"old": str(adapter("old", "vicuna_v1.1", False))}, "alpaca")
