"""Continued pretraining on plain text, with an expanded vocabulary (Chinese-LLaMA's recipe).

    # stage 1 (optional): train only embed_tokens and lm_head → a full model folder
    python tools/pretrain.py --base_model BASE --tokenizer_path merged_tokenizer \
        --dataset_dir sample/pretrain --output_dir pt-embeddings --stage embeddings --block_size 512
    # stage 2: LoRA + embed_tokens and lm_head trained in full (modules_to_save) → an adapter
    python tools/pretrain.py --base_model BASE --tokenizer_path merged_tokenizer \
        --dataset_dir sample/pretrain --output_dir pt-lora --stage lora --block_size 512

The embeddings are resized to the tokenizer (new rows = mean of the old ones). Every .txt file
(one document a line) and .jsonl file ({"text": ...} a line) of --dataset_dir is tokenized,
concatenated and cut into --block_size blocks, written to a memory-mapped cache on disk a batch
at a time (the corpus may be larger than memory); --val_set_size blocks are held out, and the
held-out perplexity before and after training is printed and written to OUTPUT_DIR/perplexity.json.
With `--streaming true --max_steps N` nothing is prepared first: blocks are tokenized as training
reads them, shuffled by a buffer of --shuffle_buffer blocks (seeded), the first --val_set_size
blocks held out; a resumed run reads the stream again up to where it stopped (docs/data_scale.md).
Batch, checkpoint, resume and reporting flags are finetune.py's (`python tools/pretrain.py --help`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from chinese_vicuna.args import BatchArguments, LoraArguments, TrainArguments, TrainModelArguments, check_flags, parse_args
from chinese_vicuna.data.datasets import load_pretrain_dataset, pretrain_files, split_train_val
from chinese_vicuna.data.pretrain import StreamingBlocks
from chinese_vicuna.devices import is_main_process
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.files import atomic_write_bytes
from chinese_vicuna.model.adapters import parse_modules_to_save
from chinese_vicuna.model.build import load_checked_model
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.train.model import apply_training_speedups, load_model_for_training, save_without_embedding_copies
from chinese_vicuna.train.packing import packed_or_padded
from chinese_vicuna.train.trainer import build_trainer, start_run, train_and_save

logger = logging.getLogger("pretrain")

EMBEDDING_MODULES = ("embed_tokens", "lm_head")


@dataclass
class PretrainArguments:
    dataset_dir: str = field(
        default="sample/pretrain", metadata={"help": 'A folder of UTF-8 .txt / .jsonl ({"text": ...}) files, or one file.'}
    )
    block_size: int = field(default=512, metadata={"help": "Tokens per training block (text is concatenated and cut)."})
    stage: str = field(
        default="lora", metadata={"help": "embeddings: train only embed_tokens and lm_head; lora: LoRA + both in full (modules_to_save)."}
    )
    val_set_size: int = field(default=20, metadata={"help": "Blocks held out for perplexity (0 = none)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Tokenized-data cache (default ~/.cache/chinese_vicuna)."})
    use_data_cache: bool = field(default=True, metadata={"help": "Reuse tokenized blocks from the cache."})
    streaming: bool = field(default=False, metadata={"help": "Tokenize blocks while training (no pass first); needs --max_steps."})
    shuffle_buffer: int = field(default=1000, metadata={"help": "--streaming: blocks in the shuffle buffer (1 = corpus order)."})

    def __post_init__(self) -> None:
        check_flags(
            (self.block_size >= 2, f"--block_size {self.block_size}: must be at least 2 tokens (e.g. 512)"),
            (self.val_set_size >= 0, f"--val_set_size {self.val_set_size}: must be >= 0 (0 = no held-out blocks)"),
            (self.shuffle_buffer >= 1, f"--shuffle_buffer {self.shuffle_buffer}: must be at least 1 (1 = corpus order)"),
        )


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
    # 0. flags, parsed once (precision, batch arithmetic, evaluation and resume are final here)
    model_args, pt_args, lora_args, _batch, train_args = parse_args(  # _batch: applied to train_args
        (TrainModelArguments, PretrainArguments, LoraArguments, BatchArguments, TrainArguments), argv
    )
    if pt_args.stage not in ("embeddings", "lora"):
        raise UserError(f"--stage {pt_args.stage!r}: use embeddings or lora")
    start_run(model_args, train_args)
    if pt_args.stage == "embeddings" and model_args.precision in ("8bit", "4bit"):
        if model_args.precision_requested != "auto":
            raise UserError("--stage embeddings saves the whole model and cannot train a quantized one; use --precision fp32 or bf16")
        model_args.precision = "fp32"  # auto's 8-bit on a GPU: the whole model is trained and saved here
    tokenizer = load_tokenizer(model_args.tokenizer_path or model_args.base_model, model_args.trust_remote_code)

    # 1. data first (a bad path fails before a 13B model loads): text → blocks on disk (cached,
    #    memory-mapped by every process) and a held-out part; or a stream of blocks
    if pt_args.streaming:
        if train_args.max_steps <= 0:
            raise UserError("--streaming true: pass --max_steps (a stream has no length to count epochs by)")
        files = pretrain_files(pt_args.dataset_dir)
        held_out = StreamingBlocks(tokenizer, files, pt_args.block_size, shuffle_buffer=1, take=pt_args.val_set_size)
        val_data = list(held_out) if pt_args.val_set_size > 0 else []
        train_data = StreamingBlocks(
            tokenizer, files, pt_args.block_size, pt_args.shuffle_buffer, train_args.seed, skip=pt_args.val_set_size
        )  # fmt: skip
    else:
        with train_args.main_process_first(desc="tokenize"):
            blocks = load_pretrain_dataset(pt_args.dataset_dir, tokenizer, pt_args.block_size, pt_args.cache_dir, pt_args.use_data_cache)
        train_data, val_data = split_train_val(blocks, pt_args.val_set_size, train_args.seed)

    # 2. the model, its embeddings resized to the (expanded) tokenizer, and what trains
    if pt_args.stage == "embeddings":
        model = load_checked_model(
            model_args.base_model, tokenizer, model_args.precision, model_args.device_map, model_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation, grow_to_tokenizer=True,
        )  # fmt: skip
        freeze_all_but_embeddings(model)
        if train_args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=train_args.gradient_checkpointing_kwargs)
            model.enable_input_require_grads()
    else:
        model = load_model_for_training(
            model_args, lora_args, train_args, tokenizer, grow_to_tokenizer=True, default_modules_to_save=",".join(EMBEDDING_MODULES)
        )
        if set(EMBEDDING_MODULES) <= set(parse_modules_to_save(lora_args.modules_to_save, ",".join(EMBEDDING_MODULES)) or []):
            save_without_embedding_copies(model)  # else PEFT stores the resized embeddings twice more
    apply_training_speedups(model, lora_args, train_args)  # fast LoRA dropout, attention within packed samples (same results)

    # 3. train (packed rows, or padded batches with --packing false) and save, with held-out perplexity before and after
    collator, trainer_class = packed_or_padded(train_args.packing, tokenizer)
    trainer = build_trainer(trainer_class, model, tokenizer, train_args, train_data, val_data, collator)
    before = perplexity(trainer)
    train_and_save(trainer, tokenizer, None, train_args.resume_from_checkpoint)
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
