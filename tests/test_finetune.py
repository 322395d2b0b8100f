"""finetune.py end to end: memorization, loadable adapters, k-bit runs, resume, flags."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

import finetune
from chinese_vicuna.args import DataArguments, DecodingArguments, ModelArguments, TrainArguments, parse_args
from chinese_vicuna.infer.generation import generate_answer
from chinese_vicuna.model.build import load_for_inference
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from conftest import MEMORIZED_COUNT, SAMPLE_INSTRUCT, read_jsonl

PROBE = "一年有几个季节？"


def base_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def probe_ids(tok) -> list[int]:
    return [tok.bos_token_id, *tok(load_template("alpaca").instruction_prompt(PROBE), add_special_tokens=False)["input_ids"]]


def test_memorized_outputs_are_reproduced_exactly_and_stop_at_eos(tiny_model_dir: Path, memorized_lora: Path, memorized_data: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(memorized_lora)).eval()
    template = load_template("alpaca", tok)
    records = read_jsonl(memorized_data)
    assert len(records) == MEMORIZED_COUNT
    for rec in records:
        assert generate_answer(model, tok, template, rec["instruction"], rec["input"], DecodingArguments(max_new_tokens=64)) == rec["output"]
        # generation ended on a trained EOS, well before the token limit
        ids = probe_ids(tok) if rec["instruction"] == PROBE else None
        if ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, pad_token_id=0)
            assert out[0, -1].item() == tok.eos_token_id and out.shape[1] - len(ids) < 64


def test_final_and_intermediate_adapters_load_with_stock_peft(tiny_model_dir: Path, memorized_lora: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    ids = probe_ids(tok)
    reference = base_logits(tiny_model_dir, ids)
    checkpoints = sorted(memorized_lora.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-40", "checkpoint-80", "checkpoint-120"]
    for adapter in (memorized_lora, checkpoints[0]):
        assert (adapter / "adapter_config.json").is_file()
        assert (adapter / "tokenizer.json").is_file()
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        lora_b = [v for k, v in weights.items() if "lora_B" in k]
        assert len(lora_b) == 2 * 7  # 2 layers × 7 linear modules (all-linear)
        assert all(v.abs().sum() > 0 for v in lora_b)  # pitfall 1: not an empty adapter
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter)).eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
        assert (logits - reference).abs().max() > 1.0


def test_training_log_and_loss_plot(memorized_lora: Path) -> None:
    entries = read_jsonl(memorized_lora / "trainer_log.jsonl")
    losses = [e["loss"] for e in entries if "loss" in e]
    assert len(losses) == 12 and losses[-1] < 0.05 < losses[0]
    assert (memorized_lora / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def short_run_args(base: Path, out: Path, *extra: str) -> list[str]:
    data = str(SAMPLE_INSTRUCT)
    return ["--base_model", str(base), "--data_path", data, "--output_dir", str(out), "--val_set_size", "8", "--micro_batch_size", "4",
            "--batch_size", "8", "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
            "--warmup_steps", "0", "--disable_tqdm", "true", *extra]  # fmt: skip


@pytest.mark.parametrize("flag", ["--load_in_8bit", "--load_in_4bit"])
def test_kbit_runs_on_cpu_save_loadable_adapters(flag: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    finetune.main(
        short_run_args(tiny_model_dir, out, flag, "true", "--lora_target_modules", "q_proj,v_proj", "--gradient_checkpointing", "true")
    )
    entries = read_jsonl(out / "trainer_log.jsonl")
    assert any("eval_loss" in e for e in entries) and all(torch.isfinite(torch.tensor(e["loss"])) for e in entries if "loss" in e)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    lora_b = [v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().sum() > 0 for v in lora_b)  # 2 layers × q/v, trained (B starts at 0)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] in (["q_proj", "v_proj"], ["v_proj", "q_proj"])


class CrashAfter(TrainerCallback):
    """Kills a run (an exception, like a power cut) right after the given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash after step {self.step}")


def test_interrupted_run_resumes_to_the_same_adapter(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(SAMPLE_INSTRUCT.read_text(encoding="utf-8").splitlines()[:16]), encoding="utf-8")

    def args(out: Path, *extra: str) -> list[str]:
        # dropout on and shuffled data: resume must restore RNG and data position too
        return ["--base_model", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out), "--val_set_size", "0",
                "--micro_batch_size", "4", "--batch_size", "4", "--num_epochs", "2", "--save_steps", "3", "--logging_steps", "1",
                "--lora_dropout", "0.1", "--learning_rate", "1e-3", "--warmup_steps", "2", "--disable_tqdm", "true", *extra]  # fmt: skip

    finetune.main(args(tmp_path / "whole"))

    original_build = finetune.build_trainer
    monkeypatch.setattr(finetune, "build_trainer", lambda *a, **k: original_build(*a, callbacks=[CrashAfter(7)], **k))
    with pytest.raises(SystemExit) as exc:  # Ctrl-C: a clean stop, exit code 130
        finetune.main(args(tmp_path / "broken"))
    assert exc.value.code == 130
    monkeypatch.setattr(finetune, "build_trainer", original_build)
    assert sorted(p.name for p in (tmp_path / "broken").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not (tmp_path / "broken" / "adapter_model.safetensors").exists()

    finetune.main(args(tmp_path / "broken", "--resume_from_checkpoint", "true"))  # = the newest checkpoint-6
    whole = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "broken" / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6)
    # the resumed run went on from step 6 (the crash came before step 7 was logged)
    steps = [e["step"] for e in read_jsonl(tmp_path / "broken" / "trainer_log.jsonl") if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_booleans_parse_as_booleans() -> None:
    types = (ModelArguments, DataArguments, TrainArguments)
    model, data, _ = parse_args(types, ["--train_on_inputs", "false", "--load_in_8bit", "False"])
    assert data.train_on_inputs is False and model.load_in_8bit is False
    _, data, _ = parse_args(types, ["--train_on_inputs", "true", "--use_data_cache", "no"])
    assert data.train_on_inputs is True and data.use_data_cache is False


def test_fp16_on_cpu_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--base_model", str(tiny_model_dir), "--output_dir", str(tmp_path), "--fp16", "true"])
    assert exc.value.code == 2
    assert "--fp16 needs a CUDA GPU" in capsys.readouterr().err


def test_batch_size_must_divide(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        finetune.main(["--base_model", str(tiny_model_dir), "--output_dir", str(tmp_path), "--batch_size", "10", "--micro_batch_size", "4"])
    assert "--batch_size 10 is not a multiple of --micro_batch_size 4" in capsys.readouterr().err


def test_broken_special_token_config_is_reported_and_fixed(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    broken = tmp_path / "decapoda-like"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config.update(bos_token_id=0, eos_token_id=1)  # as in decapoda-research/llama-7b-hf
    (broken / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        model, _ = load_for_inference(str(broken), None, "fp32")
    assert "config.json has eos_token_id=1 but the tokenizer says 2" in caplog.text
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1, 2)
    assert model.generation_config.eos_token_id == 2


def test_continue_training_an_existing_adapter(tiny_model_dir: Path, memorized_lora: Path, tmp_path: Path) -> None:
    out = tmp_path / "continued"
    finetune.main(short_run_args(tiny_model_dir, out, "--lora_weights", str(memorized_lora), "--learning_rate", "1e-4"))
    before = load_file(str(memorized_lora / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys()  # same LoRA (all-linear, r=16), trained further
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16


def test_report_to_tensorboard_and_offline_wandb(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "out"
    finetune.main(short_run_args(tiny_model_dir, out, "--report_to", "tensorboard,wandb"))
    [events] = list((out / "runs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 2
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


@pytest.mark.parametrize(
    ("flags", "grouped"),
    [([], False), (["--packing", "false"], True), (["--packing", "false", "--group_by_length", "false"], False)],
)
def test_length_grouping_is_the_fallback_without_packing(tiny_model_dir: Path, tmp_path: Path, flags: list[str], grouped: bool) -> None:
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from chinese_vicuna.data.datasets import load_instruction_dataset
    from chinese_vicuna.train.trainer import build_trainer

    (train_args,) = parse_args((TrainArguments,), ["--output_dir", str(tmp_path), "--per_device_train_batch_size", "4", *flags])
    model, tok = load_for_inference(str(tiny_model_dir), None, "fp32")
    samples = load_instruction_dataset(SAMPLE_INSTRUCT, tok, load_template("alpaca", tok), 256)
    trainer = build_trainer(Trainer, model, tok, train_args, samples)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) == grouped
    if grouped:
        # Grouped micro-batches carry less padding than the same samples drawn at random.
        order = list(sampler)
        lengths = [len(samples[i]["input_ids"]) for i in order]
        padded = sum(4 * max(lengths[i : i + 4]) for i in range(0, len(lengths), 4))
        random_order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
        random_lengths = [len(samples[i]["input_ids"]) for i in random_order]
        padded_random = sum(4 * max(random_lengths[i : i + 4]) for i in range(0, len(random_lengths), 4))
        assert padded < 0.9 * padded_random, (padded, padded_random)
