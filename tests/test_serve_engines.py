"""Hand-off engines: the Jinja chat template renders like our templates; the `vllm serve`
command serve.py builds (live on a GPU); llama-cpp-python's OpenAI server on a GGUF of the
merged LoRA answers the same `openai` client code as serve.py (live on the CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from chinese_vicuna.errors import UserError
from chinese_vicuna.prompts import available_templates, load_template
from chinese_vicuna.serving.launch import vllm_command
from conftest import REPO, run_script
from serve_helpers import ANSWERS_A, INSTRUCTIONS, KEY, running_server

CONVERSATIONS = [
    [{"role": "user", "content": "你好{input}"}],
    [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "一加一？"}],
    [
        {"role": "user", "content": "中国的首都是哪里？"},
        {"role": "assistant", "content": "北京。"},
        {"role": "user", "content": "上海呢？"},
    ],
]


@pytest.mark.parametrize("name", [n for n in available_templates() if n != "auto"])
def test_jinja_chat_template_renders_like_the_template(name: str, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    template = load_template(name, tok)
    jinja = template.jinja(bos=True, single_instruction=True)
    for messages in CONVERSATIONS:
        user_turns = [m for m in messages if m["role"] != "system"]
        if not template.is_chat and len(user_turns) > 1:
            with pytest.raises(Exception, match="instruction template"):
                tok.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=True)
            continue
        rendered = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=True)
        if template.is_chat:
            expected = "".join(s.text for s in template.chat_segments(messages))
        else:
            expected = template.instruction_prompt(user_turns[0]["content"])
        assert rendered == tok.bos_token + expected


def fake_adapter(folder: Path, r: int, template: str | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}), encoding="utf-8")
    if template:
        shutil.copy(REPO / "chinese_vicuna" / "templates" / f"{template}.json", folder / "prompt_template.json")
    return folder


def test_vllm_command(tmp_path: Path) -> None:
    med = fake_adapter(tmp_path / "med", 16, "alpaca")
    law = fake_adapter(tmp_path / "law", 64, None)
    command, env = vllm_command(
        "/models/llama-7b", {"med": str(med), "law": str(law)}, "alpaca", "127.0.0.1", 8001, None, 3, "k-123", "0,1", "bf16", tmp_path
    )
    jinja = tmp_path / "alpaca.jinja"
    assert Path(command[0]).name == "vllm"
    assert command[1:] == [
        "serve", "/models/llama-7b", "--host", "127.0.0.1", "--port", "8001", "--served-model-name", "llama-7b",
        "--chat-template", str(jinja), "--tensor-parallel-size", "2", "--dtype", "bfloat16",
        "--enable-lora", "--max-loras", "3", "--max-lora-rank", "64", "--lora-modules", f"med={med}", f"law={law}",
    ]  # fmt: skip
    assert jinja.read_text(encoding="utf-8") == load_template("alpaca").jinja(bos=True, single_instruction=True)
    assert env == {"VLLM_API_KEY": "k-123", "CUDA_VISIBLE_DEVICES": "0,1"}  # the key never on the command line
    assert "k-123" not in " ".join(command)
    chat = fake_adapter(tmp_path / "chat", 8, "chinese-vicuna-chat")
    with pytest.raises(UserError, match="one chat template"):
        vllm_command("/models/llama-7b", {"med": str(med), "chat": str(chat)}, "alpaca")
    command, _ = vllm_command("/models/llama-7b", {}, "auto", template_dir=tmp_path)
    assert "--chat-template" not in command  # vLLM keeps the tokenizer's own chat_template


def test_serve_dry_run_prints_the_vllm_command(tmp_path: Path) -> None:
    med = fake_adapter(tmp_path / "med", 8, None)
    proc = run_script("serve.py", "--engine", "vllm", "--base_model", "/models/x", "--lora_modules", f"med={med}", "--dry_run", "true")
    assert proc.returncode == 0, proc.stderr
    assert " serve /models/x " in proc.stdout and f"--lora-modules med={med}" in proc.stdout


def ask(client, model: str, question: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=48)
    return reply.choices[0].message.content


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or shutil.which("vllm") is None, reason="needs a CUDA GPU and vLLM")
def test_vllm_serves_the_loras_live(tiny_model_dir: Path, two_loras: dict[str, Path]) -> None:
    openai = pytest.importorskip("openai")
    args = ["--engine", "vllm", "--base_model", str(tiny_model_dir), "--lora_modules", f"a={two_loras['a']}"]
    with running_server(*args, env={"CHINESE_VICUNA_API_KEY": KEY}, timeout=600) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        assert [ask(client, "a", q) for q in INSTRUCTIONS] == ANSWERS_A


def test_llamacpp_engine_answers_the_same_client_code(tiny_model_dir: Path, two_loras: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="optional group: bash scripts/setup_env.sh --llamacpp")
    openai = pytest.importorskip("openai")
    from convert_to_gguf import convert

    import merge_lora

    merged = tmp_path / "merged"
    merge_lora.main(["--base_model", str(tiny_model_dir), "--lora_weights", str(two_loras["a"]), "--output_dir", str(merged)])
    gguf = convert(merged, tmp_path / "a-f16.gguf", "f16")
    args = ["--engine", "llamacpp", "--gguf", str(gguf), "--served_model_name", "a", "--prompt_template", "alpaca"]
    with running_server(*args, env={"CHINESE_VICUNA_API_KEY": KEY}) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        # answers are trained as continuations (no dummy-prefix "▁" before them), so llama.cpp's
        # decode and the built-in engine's give the same text
        assert [ask(client, "a", q) for q in INSTRUCTIONS] == ANSWERS_A
        stream = client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": INSTRUCTIONS[1]}], temperature=0, max_tokens=48, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ANSWERS_A[1]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
