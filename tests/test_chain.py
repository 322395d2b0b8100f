"""The whole Chinese-LLaMA recipe on the tiny model: expand the vocabulary → continued pretraining
(LoRA + embed_tokens/lm_head in full) → merge_lora.py → instruction SFT on the merged model →
greedy generation gives the memorized answers, with the expanded tokenizer all along."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.data.records import read_records, validate_instruction
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.generation import generate_answer, prompt_ids
from chinese_vicuna.model.adapters import load_lora
from chinese_vicuna.model.build import load_for_inference
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from conftest import REPO, memorize_args, run_script


def test_expand_pretrain_merge_sft_generate(
    english_base_dir: Path, expanded_tokenizer_dir: Path, memorized_data: Path, tmp_path: Path
) -> None:
    n_base = len(load_tokenizer(str(english_base_dir)))
    n_new = len(load_tokenizer(str(expanded_tokenizer_dir)))

    # 1. continued pretraining: LoRA + embed_tokens and lm_head trained in full on the resized vocabulary
    pt = tmp_path / "pt-lora"
    proc = run_script(
        "tools/pretrain.py", "--base_model", str(english_base_dir), "--tokenizer_path", str(expanded_tokenizer_dir),
        "--dataset_dir", str(REPO / "sample" / "pretrain"), "--output_dir", str(pt), "--stage", "lora",
        "--lora_r", "8", "--lora_target_modules", "all-linear", "--block_size", "64", "--val_set_size", "16",
        "--micro_batch_size", "8", "--batch_size", "8", "--max_steps", "20", "--learning_rate", "1e-2",
        "--warmup_steps", "0", "--save_steps", "1000", "--logging_steps", "5", "--disable_tqdm", "true",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((pt / "perplexity.json").read_text())
    print("stage lora, held-out perplexity:", report)
    assert report["perplexity_after"] < 0.5 * report["perplexity_before"]
    config = json.loads((pt / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    with safe_open(str(pt / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert shapes["base_model.model.model.embed_tokens.weight"] == (n_new, 128)
    assert shapes["base_model.model.lm_head.weight"] == (n_new, 128)
    assert any(".lora_A." in k for k in shapes)

    # 2. merge into the original (unresized) base: the adapter's vocabulary and tokenizer win
    merged = tmp_path / "merged"
    proc = run_script("merge_lora.py", "--base_model", str(english_base_dir), "--lora_weights", str(pt), "--output_dir", str(merged))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == n_new
    assert len(load_tokenizer(str(merged))) == n_new

    # the merged model with the old tokenizer: stopped, both sizes and the file named
    with pytest.raises(UserError, match=rf"has {n_base} tokens but {merged}/config.json has vocab_size {n_new}"):
        load_for_inference(str(merged), None, "fp32", tokenizer_path=str(english_base_dir))

    # 3. instruction SFT on the merged model, with its (expanded) tokenizer; as in Chinese-Alpaca,
    # embed_tokens and lm_head train in full: the new rows, born equal (the mean), are still close
    # after a short pretraining, and a LoRA alone cannot pull lm_head's rows apart
    sft = tmp_path / "sft"
    proc = run_script(*memorize_args(merged, memorized_data, sft, epochs=60, save_steps=1000), "--modules_to_save", "embed_tokens,lm_head")
    assert proc.returncode == 0, proc.stderr[-3000:]

    # 4. greedy generation reproduces the memorized answers, tokenized with the new pieces
    model, tokenizer = load_for_inference(str(merged), None, "fp32")
    model = load_lora(model, str(sft))
    model.eval()
    template = load_template("alpaca", tokenizer)
    records = [validate_instruction(r) for r in read_records(memorized_data)]
    assert max(prompt_ids(tokenizer, template, records[0]["instruction"])) >= n_base  # new Chinese pieces in use
    torch.manual_seed(0)
    answers = [generate_answer(model, tokenizer, template, r["instruction"], r["input"], DecodingArguments(max_new_tokens=48)) for r in records]
    right = sum(a == r["output"] for a, r in zip(answers, records))
    print(f"memorized answers reproduced: {right}/{len(records)}")
    assert answers[0] == records[0]["output"]
    assert right >= len(records) - 1, list(zip(answers, (r["output"] for r in records)))
