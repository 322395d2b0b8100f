"""finetune_chat.py end to end: the tiny model memorizes 3-turn conversations, and the chat path
(history + user turn → chat_segments → encode_segments → greedy generate) gives back every
assistant turn exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chinese_vicuna.data.encode import encode_segments
from chinese_vicuna.model.adapters import load_lora
from chinese_vicuna.model.loading import load_base_model, load_tokenizer
from chinese_vicuna.prompts import load_template
from conftest import memorize_args, read_jsonl, run_script

REPO = Path(__file__).resolve().parent.parent
CHAT_SAMPLE = REPO / "sample" / "chat" / "chat_sample.jsonl"
CONVERSATIONS = 4  # the first 4 sample conversations: 3 short turns each


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = CHAT_SAMPLE.read_text(encoding="utf-8").splitlines()[:CONVERSATIONS]
    path = tmp_path_factory.mktemp("chat-data") / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_run(tiny_model_dir: Path, chat_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """finetune_chat.py with the memorizing settings of finetune.py's tests (default template,
    default gradient checkpointing)."""
    out = tmp_path_factory.mktemp("chat-lora") / "lora"
    args = memorize_args(tiny_model_dir, chat_data, out, epochs=60, save_steps=60)
    # One thread: the tiny model's matrices are too small to share, and the machine may be busy.
    proc = run_script("finetune_chat.py", *args[1:], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_training_writes_a_loadable_adapter_and_logs(chat_run) -> None:
    out, proc = chat_run
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-60" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    assert f"{CONVERSATIONS} conversations in chinese-vicuna format" in proc.stderr
    assert f"{CONVERSATIONS} records → {CONVERSATIONS} samples; 0 truncated" in proc.stderr
    losses = [e["loss"] for e in read_jsonl(out / "trainer_log.jsonl") if "loss" in e]
    assert losses[-1] < 0.05 < losses[0]


@torch.inference_mode()
def test_chat_path_reproduces_every_assistant_turn(chat_run, tiny_model_dir: Path, chat_data: Path) -> None:
    out, _ = chat_run
    tokenizer = load_tokenizer(str(out))
    model = load_lora(load_base_model(str(tiny_model_dir), "fp32"), str(out)).eval()
    template = load_template("chinese-vicuna-chat", tokenizer)
    checked = 0
    for record in read_jsonl(chat_data):
        history: list[dict[str, str]] = []
        for user, answer in zip(record["input"], record["output"], strict=True):
            messages = [*history, {"role": "user", "content": user}]
            ids, _ = encode_segments(tokenizer, template.chat_segments(messages, add_generation_prompt=True))
            generated = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(ids) :].tolist()
            # the model learned to stop: the answer, its "\n\n" end marker, then EOS
            assert generated[-1] == tokenizer.eos_token_id
            text = tokenizer.decode(generated, skip_special_tokens=True)
            assert text.endswith("\n\n")
            for stop in template.stop_strings:
                text = text.split(stop, 1)[0]
            assert text.strip() == answer
            history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            checked += 1
    assert checked == 3 * CONVERSATIONS


def test_chat_defaults_and_shared_flags() -> None:
    from chinese_vicuna.args import BatchArguments, ChatTemplateArguments, LoraArguments, TrainModelArguments, parse_args
    from finetune_chat import ChatDataArguments, ChatTrainArguments

    types = (TrainModelArguments, ChatTemplateArguments, ChatDataArguments, LoraArguments, BatchArguments, ChatTrainArguments)
    model, template, data, lora, batch, train = parse_args(types, [])
    assert (data.cutoff_len, template.prompt_template, data.train_on_last_turn_only) == (2048, None, False)
    assert template.fallback_template == "chinese-vicuna-chat"  # None: the saved template, else this one
    assert train.gradient_checkpointing is True and data.data_path == "sample/chat/chat_sample.jsonl"
    flags = "--base_model m --load_in_4bit true --lora_r 4 --lora_target_modules all-linear --micro_batch_size 2 --batch_size 8"
    flags += " --num_epochs 2 --learning_rate 1e-4 --gradient_checkpointing false --train_on_last_turn_only true --prompt_template llama2"
    model, template, data, lora, batch, train = parse_args(types, flags.split())
    assert model.load_in_4bit and lora.lora_r == 4 and batch.batch_size == 8 and train.learning_rate == 1e-4
    assert train.gradient_checkpointing is False and data.train_on_last_turn_only is True and template.prompt_template == "llama2"


def test_bad_data_is_one_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"input": ["你好"], "output": ["你好！"]}\n{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
        encoding="utf-8",
    )
    proc = run_script(
        "finetune_chat.py", "--base_model", str(tiny_model_dir), "--data_path", str(bad), "--output_dir", str(tmp_path / "o"),
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}:2: record in OpenAI messages") and "one format per file" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["8bit", "4bit"])
def test_kbit_chat_training_on_gpu(tiny_model_dir: Path, chat_data: Path, tmp_path: Path, precision: str) -> None:
    """QLoRA / LLM.int8 chat training on CUDA (bf16 or fp16 mixed precision, gradient checkpointing on)."""
    out = tmp_path / precision
    args = memorize_args(tiny_model_dir, chat_data, out, epochs=30, save_steps=30)
    proc = run_script("finetune_chat.py", *args[1:], "--precision", precision)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [e["loss"] for e in read_jsonl(out / "trainer_log.jsonl") if "loss" in e]
    assert losses[-1] < losses[0] / 4
    model = load_lora(load_base_model(str(tiny_model_dir), precision), str(out))
    assert any("lora_A" in name for name, _ in model.named_parameters())
