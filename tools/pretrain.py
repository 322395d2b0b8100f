"""Continued pretraining on plain text, with an expanded vocabulary (Chinese-LLaMA's recipe).

    # stage 1 (optional): train only embed_tokens and lm_head → a full model folder
    python tools/pretrain.py --base_model BASE --tokenizer_path merged_tokenizer \
        --dataset_dir sample/pretrain --output_dir pt-embeddings --stage embeddings --block_size 512
    # stage 2: LoRA + embed_tokens and lm_head trained in full (modules_to_save) → an adapter
    python tools/pretrain.py --base_model BASE --tokenizer_path merged_tokenizer \
        --dataset_dir sample/pretrain --output_dir pt-lora --stage lora --block_size 512

The embeddings are resized to the tokenizer (new rows = mean of the old ones). Every .txt file
of --dataset_dir is tokenized, concatenated and cut into --block_size blocks (cached on disk);
--val_set_size blocks are held out, and the held-out perplexity before and after training is
printed and written to OUTPUT_DIR/perplexity.json. Batch, checkpoint, resume and reporting
flags are finetune.py's (`python tools/pretrain.py --help`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chinese_vicuna.data import PaddingCollator, split_train_val
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.fast_lora import use_fast_lora_dropout
from chinese_vicuna.files import atomic_write_bytes
from chinese_vicuna.modeling import (
    add_lora,
    check_special_tokens,
    is_main_process,
    load_base_model,
    load_lora,
    load_tokenizer,
    prepare_for_training,
    resize_embeddings_to_tokenizer,
    resolve_precision,
)
from chinese_vicuna.pretrain_data import load_pretrain_dataset
from chinese_vicuna.training import (
    BatchArguments,
    LoraArguments,
    ModelArguments,
    TrainArguments,
    build_trainer,
    parse_args,
    parse_modules_to_save,
    start_run,
    train_and_save,
)

logger = logging.getLogger("pretrain")

EMBEDDING_MODULES = ("embed_tokens", "lm_head")


@dataclass
class PretrainArguments:
    dataset_dir: str = field(default="sample/pretrain", metadata={"help": "A folder of UTF-8 .txt files (or one .txt file)."})
    block_size: int = field(default=512, metadata={"help": "Tokens per training block (text is concatenated and cut)."})
    stage: str = field(
        default="lora", metadata={"help": "embeddings: train only embed_tokens and lm_head; lora: LoRA + both in full (modules_to_save)."}
    )
    val_set_size: int = field(default=20, metadata={"help": "Blocks held out for perplexity (0 = none)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Tokenized-data cache (default ~/.cache/chinese_vicuna)."})
    use_data_cache: bool = field(default=True, metadata={"help": "Reuse tokenized blocks from the cache."})


def freeze_all_but_embeddings(model: object) -> None:
    """--stage embeddings: everything frozen except the input and output embeddings."""
    for name, param in model.named_parameters():
        param.requires_grad = any(f"{m}." in name for m in EMBEDDING_MODULES)


def perplexity(trainer: object) -> float | None:
    if not trainer.eval_dataset:
        return None
    return math.exp(min(trainer.evaluate()["eval_loss"], 50.0))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    model_args, pt_args, lora_args, batch_args, train_args = parse_args(
        (ModelArguments, PretrainArguments, LoraArguments, BatchArguments, TrainArguments), argv
    )
    if pt_args.stage not in ("embeddings", "lora"):
        raise UserError(f"--stage {pt_args.stage!r}: use embeddings or lora")
    resume = start_run(model_args, batch_args, train_args)

    # 1. precision and tokenizer
    precision = resolve_precision(model_args.precision, model_args.load_in_8bit, model_args.load_in_4bit)
    if pt_args.stage == "embeddings" and precision in ("8bit", "4bit"):
        if model_args.precision != "auto" or model_args.load_in_8bit or model_args.load_in_4bit:
            raise UserError("--stage embeddings saves the whole model and cannot train a quantized one; use --precision fp32 or bf16")
        precision = "fp32"
    tokenizer = load_tokenizer(model_args.tokenizer_path or model_args.base_model, model_args.trust_remote_code)

    # 2. data first (a bad path fails before a 13B model loads): text → blocks (cached), a held-out part
    with train_args.main_process_first(desc="tokenize"):
        blocks = load_pretrain_dataset(pt_args.dataset_dir, tokenizer, pt_args.block_size, pt_args.cache_dir, pt_args.use_data_cache)
    train_data, val_data = split_train_val(blocks, pt_args.val_set_size, train_args.seed)

    # 3. the model, its embeddings resized to the (expanded) tokenizer, what trains
    model = load_base_model(
        model_args.base_model, precision, model_args.device_map, model_args.trust_remote_code, model_args.attn_implementation
    )
    check_special_tokens(model, tokenizer, model_args.base_model)
    resize_embeddings_to_tokenizer(model, tokenizer, model_args.base_model)

    if pt_args.stage == "embeddings":
        freeze_all_but_embeddings(model)
        if train_args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    else:
        model = prepare_for_training(model, train_args.gradient_checkpointing)
        modules = parse_modules_to_save(lora_args.modules_to_save, default=",".join(EMBEDDING_MODULES))
        if model_args.lora_weights:
            model = load_lora(model, model_args.lora_weights, is_trainable=True, tokenizer=tokenizer)
        else:
            model = add_lora(model, lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_target_modules, modules)
        if lora_args.fast_lora_dropout:
            use_fast_lora_dropout(model, autocast=bool(train_args.bf16 or train_args.fp16))
        if modules and set(EMBEDDING_MODULES) <= set(modules):
            # PEFT's save_embedding_layers="auto" would store a resized embed_tokens and lm_head twice
            # more (the base's copy and the trained one under a second name): 3x the adapter size.
            model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    train_args.gradient_checkpointing_kwargs = {"use_reentrant": False}

    # 4. train and save, with held-out perplexity before and after
    trainer = build_trainer(model, tokenizer, train_args, train_data, val_data, PaddingCollator(tokenizer.pad_token_id))
    before = perplexity(trainer)
    train_and_save(trainer, tokenizer, resume)
    after = perplexity(trainer)
    sp_model = Path(getattr(tokenizer, "vocab_file", None) or "")
    if is_main_process() and sp_model.name == "tokenizer.model" and sp_model.is_file():
        # transformers 5 saves only tokenizer.json; keep the sentencepiece model for GGUF and merging
        atomic_write_bytes(Path(train_args.output_dir) / "tokenizer.model", sp_model.read_bytes())
    if before is not None and is_main_process():
        report = {"stage": pt_args.stage, "eval_blocks": len(val_data), "perplexity_before": before, "perplexity_after": after}
        logger.info("held-out perplexity: %.2f before → %.2f after", before, after)
        atomic_write_bytes(Path(train_args.output_dir) / "perplexity.json", json.dumps(report, indent=2).encode())
        print(json.dumps(report))


if __name__ == "__main__":
    main()
