"""LoRA variants (train/lora_variants.py): each trains on the tiny model, is what stock PEFT loads,
merges with --verify (PEFT and --low_mem alike); LoRA+ optimizer groups; NEFTune on in training only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_INSTRUCT, memorize_args, read_jsonl, run_script

PROMPTS = ["中国的首都是哪里？", "Below is an instruction.\n\n### Response:\n北京", "一年有几个季节？春、夏、秋、冬。"]
STEPS = 6  # 3 epochs of 8 samples at micro-batch 4; the last checkpoint is the final state


def train_args(base: Path, data: Path, out: Path, *flags: str) -> list[str]:
    return [
        "finetune.py", "--base_model", str(base), "--data_path", str(data), "--output_dir", str(out),
        "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--lora_target_modules", "all-linear",
        "--learning_rate", "3e-3", "--warmup_steps", "0", "--micro_batch_size", "4", "--batch_size", "4",
        "--num_epochs", "3", "--val_set_size", "0", "--save_steps", str(STEPS), "--disable_tqdm", "true", *flags,
    ]  # fmt: skip


def prompt_ids(tokenizer) -> list[torch.Tensor]:
    return [torch.tensor([[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]]) for p in PROMPTS]


@torch.inference_mode()
def logits_of(model, batches) -> torch.Tensor:
    model.eval()
    return torch.cat([model(input_ids=b).logits[0] for b in batches])


def stock_peft_logits(base: Path, adapter: Path, batches) -> torch.Tensor:
    """The adapter as stock PEFT loads it onto the original fp32 base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return logits_of(PeftModel.from_pretrained(model, str(adapter)), batches)


def hf_logits(folder: Path, batches) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits_of(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), batches)


VARIANTS = {
    "dora": (["--use_dora", "true"], {"use_dora": True}),
    "rslora": (["--use_rslora", "true"], {"use_rslora": True}),
    "gaussian": (["--init_lora_weights", "gaussian"], {"init_lora_weights": "gaussian"}),
    # PiSSA/OLoRA: saved converted (rank 2r, plain init) for the original base
    "pissa": (["--init_lora_weights", "pissa"], {"init_lora_weights": True, "r": 16}),
    "pissa_niter": (["--init_lora_weights", "pissa_niter_4", "--use_rslora", "true"], {"init_lora_weights": True, "r": 16}),
    "olora": (["--init_lora_weights", "olora"], {"init_lora_weights": True, "r": 16}),
    "loftq": (["--init_lora_weights", "loftq", "--precision", "4bit"], {"init_lora_weights": True, "r": 8}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_loads_in_stock_peft_and_merges(variant: str, tiny_model_dir: Path, memorized_data: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    flags, expected = VARIANTS[variant]
    out = tmp_path / "adapter"
    proc = run_script(*train_args(tiny_model_dir, memorized_data, out, *flags))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert {k: config[k] for k in expected} == expected

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    batches = prompt_ids(tokenizer)
    base = hf_logits(tiny_model_dir, batches)
    adapted = stock_peft_logits(tiny_model_dir, out, batches)
    assert (adapted - base).abs().max() > 1e-2  # trained: the adapter moves the logits
    if variant in ("pissa", "olora"):
        # the checkpoint keeps the training form; PEFT recomputes the residual base from the original one
        trained = stock_peft_logits(tiny_model_dir, out / f"checkpoint-{STEPS}", batches)
        assert (trained - adapted).abs().max() < 1e-4
    merged = tmp_path / "merged"
    proc = run_script(
        "merge_lora.py", "--base_model", str(tiny_model_dir), "--lora_weights", str(out), "--output_dir", str(merged), "--verify"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (hf_logits(merged, batches) - adapted).abs().max() < 1e-4
    if variant in ("dora", "rslora", "gaussian"):  # the streaming merge folds the same weights
        low = tmp_path / "low"
        proc = run_script(
            "merge_lora.py", "--base_model", str(tiny_model_dir), "--lora_weights", str(out), "--output_dir", str(low), "--low_mem"
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (hf_logits(low, batches) - adapted).abs().max() < 1e-4


def test_continued_training_keeps_the_variant(tiny_model_dir: Path, memorized_data: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    proc = run_script(*train_args(tiny_model_dir, memorized_data, first, "--use_dora", "true", "--use_rslora", "true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script(*train_args(tiny_model_dir, memorized_data, second, "--lora_weights", str(first)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((second / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["use_dora"] is True and config["use_rslora"] is True
    # asking for a variant on a continued adapter is one line, before the base loads
    proc = run_script(
        *train_args(tiny_model_dir, memorized_data, tmp_path / "third", "--lora_weights", str(first), "--init_lora_weights", "pissa")
    )
    assert proc.returncode == 2
    assert "keeps its own variant" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--init_lora_weights", "loftq"], "--precision 4bit"),
        (["--init_lora_weights", "pissa", "--precision", "4bit"], "use --init_lora_weights loftq"),
        (["--init_lora_weights", "pissa", "--use_dora", "true"], "pick one"),
        (["--init_lora_weights", "svd"], "pissa_niter_N"),
        (["--loraplus_lr_ratio", "-1"], "must be >= 0"),
    ],
)
def test_impossible_variants_are_one_line(
    flags: list[str], message: str, tiny_model_dir: Path, memorized_data: Path, tmp_path: Path
) -> None:
    proc = run_script(*train_args(tiny_model_dir, memorized_data, tmp_path / "out", *flags))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def variant_trainer(tiny_model_dir: Path, memorized_data: Path, out: Path, *flags: str):
    """finetune.py's steps up to the Trainer, in this process."""
    from chinese_vicuna.args import BatchArguments, DataArguments, LoraArguments, TrainArguments, TrainModelArguments, parse_args
    from chinese_vicuna.data.datasets import load_instruction_dataset
    from chinese_vicuna.model.loading import load_tokenizer
    from chinese_vicuna.prompts import load_template
    from chinese_vicuna.train.model import load_model_for_training
    from chinese_vicuna.train.packing import packed_or_padded
    from chinese_vicuna.train.trainer import build_trainer

    argv = train_args(tiny_model_dir, memorized_data, out, *flags)[1:]
    model_args, data_args, lora_args, _, args = parse_args(
        (TrainModelArguments, DataArguments, LoraArguments, BatchArguments, TrainArguments), argv
    )
    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = load_instruction_dataset(memorized_data, tokenizer, load_template("alpaca", tokenizer), data_args.cutoff_len)
    model = load_model_for_training(model_args, lora_args, args, tokenizer)
    collator, trainer_class = packed_or_padded(args.packing, tokenizer)
    return build_trainer(trainer_class, model, tokenizer, args, data, None, collator)


def test_loraplus_puts_b_matrices_in_their_own_group(tiny_model_dir: Path, memorized_data: Path, tmp_path: Path) -> None:
    trainer = variant_trainer(tiny_model_dir, memorized_data, tmp_path / "out", "--loraplus_lr_ratio", "16", "--use_dora", "true")
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
    lr_of = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert set(lr_of) == set(names.values())  # every trainable parameter, once
    for name, lr in lr_of.items():
        b_side = ".lora_B." in name or "lora_magnitude_vector" in name
        assert lr == pytest.approx(3e-3 * 16 if b_side else 3e-3), name
    assert any(".lora_B." in n for n in lr_of) and any(".lora_A." in n for n in lr_of)


def test_neftune_noise_in_training_only(tiny_model_dir: Path, memorized_data: Path, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    trainer = variant_trainer(tiny_model_dir, memorized_data, tmp_path / "out", "--neftune_noise_alpha", "5", "--max_steps", "1")
    embedding = trainer.model.get_input_embeddings()
    ids = torch.tensor([[1, 5, 9, 42]])
    seen: dict[str, torch.Tensor] = {}

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                embedding.train()
                seen["train_a"], seen["train_b"] = embedding(ids), embedding(ids)
                embedding.eval()
                seen["eval"] = embedding(ids)
                embedding.train()

    trainer.add_callback(Look())
    trainer.train()
    exact = embedding.weight[ids].detach()
    assert not torch.equal(seen["train_a"], seen["train_b"])  # fresh noise every forward in training
    assert (seen["train_a"] - exact).abs().max() > 0
    assert torch.equal(seen["eval"], exact)  # none in evaluation
    embedding.train()
    assert torch.equal(embedding(ids).detach(), exact)  # and none once training is over


@pytest.mark.parametrize("flags", [["--use_dora", "true"], ["--init_lora_weights", "pissa"]], ids=["dora", "pissa"])
def test_merged_variant_exports_to_gguf_that_llama_cpp_runs_like_hf(
    flags: list[str], tiny_model_dir: Path, memorized_data: Path, tmp_path: Path
) -> None:
    """A DoRA / PiSSA adapter that memorized its data, merged and converted: llama.cpp answers the
    memorized records and agrees with HF's top-1 at every position."""
    pytest.importorskip("llama_cpp", reason="optional group: bash scripts/setup_env.sh --llamacpp")
    from chinese_vicuna.data.fast_tokenize import encode_continuations
    from chinese_vicuna.export.gguf import convert
    from chinese_vicuna.infer.generation import prompt_ids as template_prompt_ids
    from chinese_vicuna.infer.llamacpp import LlamaCppTokenizer, greedy_answer, load_gguf
    from chinese_vicuna.prompts import load_template

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    proc = run_script(*memorize_args(tiny_model_dir, memorized_data, adapter, save_steps=1000), *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script(
        "merge_lora.py", "--base_model", str(tiny_model_dir), "--lora_weights", str(adapter), "--output_dir", str(merged), "--verify"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    gguf = convert(merged, tmp_path / "model-f16.gguf", "f16")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    llm = load_gguf(str(gguf), n_ctx=512, logits_all=True)
    template = load_template("alpaca", tokenizer)
    records = read_jsonl(SAMPLE_INSTRUCT)[:3]
    for r in records:
        assert greedy_answer(llm, LlamaCppTokenizer(llm), template, r["instruction"], r["input"]) == r["output"]
    agree = total = 0
    with torch.inference_mode():
        for r in records:
            ids = template_prompt_ids(tokenizer, template, r["instruction"], r["input"]) + encode_continuations(tokenizer, [r["output"]])[0]
            hf_top = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
            llm.reset()
            llm.eval(ids)
            cpp_top = llm.scores[: len(ids)].argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(hf_top, cpp_top, strict=True))
            total += len(ids)
    assert agree / total >= 0.99, (agree, total)


def variant_lora(base: Path, out: Path, seed: int, **variant) -> Path:
    """A LoRA of a variant with every weight moved off its initial value (as if trained)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **variant)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    peft_model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("order", ["dora,rslora,plain", "plain,rslora,dora"])
def test_adapters_of_different_variants_merge_in_order(order: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Several adapters of different variants, in order: PEFT's merge (--verify at every step) and
    the streaming --low_mem merge give the same weights."""
    from transformers import AutoModelForCausalLM

    kinds = {"dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "plain": {}}
    folders = [str(variant_lora(tiny_model_dir, tmp_path / k, i, **kinds[k])) for i, k in enumerate(order.split(","))]
    peft_out, low_out = tmp_path / "peft", tmp_path / "low"
    common = ["merge_lora.py", "--base_model", str(tiny_model_dir), "--lora_weights", ",".join(folders)]
    proc = run_script(*common, "--output_dir", str(peft_out), "--verify")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("max |logits(merged) - logits(base + LoRA)|") == 3
    proc = run_script(*common, "--output_dir", str(low_out), "--low_mem")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = AutoModelForCausalLM.from_pretrained(str(peft_out), dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(low_out), dtype=torch.float32).state_dict()
    assert max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-5
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).state_dict()
    assert float((a["model.layers.0.mlp.down_proj.weight"] - base["model.layers.0.mlp.down_proj.weight"]).abs().max()) > 1e-3
