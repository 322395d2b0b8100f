"""The Trainer set-up shared by finetune.py, finetune_chat.py and tools/pretrain.py.

Arguments are dataclasses for `HfArgumentParser` (every `TrainingArguments` flag works), with
alpaca-lora's names on top (`--micro_batch_size`, `--batch_size`, `--num_epochs`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from chinese_vicuna.errors import UserError
from chinese_vicuna.files import save_figure
from chinese_vicuna.modeling import bf16_supported, cpu_has_native_bf16, is_main_process, trainable_parameters, world_size

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    base_model: str = field(default="", metadata={"help": "Base model: a local HF folder or a hub id (LLaMA-family)."})
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer folder if not the base model's."})
    lora_weights: str | None = field(default=None, metadata={"help": "Continue training this adapter (folder or hub id)."})
    precision: str = field(
        default="auto", metadata={"help": "Weights: auto (8bit on GPU, fp32 on CPU), fp32, bf16, fp16, half, 8bit, 4bit."}
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Same as --precision 8bit."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Same as --precision 4bit (QLoRA NF4, double quantization)."})
    device_map: str | None = field(
        default=None, metadata={"help": "'auto' spreads the model over all GPUs; default one device per process."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the model (off unless you trust it)."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "sdpa (default; packed rows attend per sample), eager, or flash_attention_2 (GPU, varlen on packed rows)."},
    )


@dataclass
class LoraArguments:
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    fast_lora_dropout: bool = field(
        default=True,
        metadata={
            "help": "LoRA dropout from 16 random bits per element on the CPU, no fp32 copy of its input under autocast "
            "(same keep probability to 1/65536; chinese_vicuna/fast_lora.py). false = PEFT's nn.Dropout."
        },
    )
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={"help": "Comma list of module names, or all-linear."})
    modules_to_save: str | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full beside the LoRA, e.g. embed_tokens,lm_head after vocabulary expansion "
            "(default: none for SFT, embed_tokens,lm_head for tools/pretrain.py --stage lora; 'none' for none)."
        },
    )


def parse_modules_to_save(value: str | None, default: str = "") -> list[str] | None:
    """`embed_tokens,lm_head` → a list; None → `default`; `none` or empty → None."""
    value = default if value is None else value
    modules = [m.strip() for m in value.split(",") if m.strip() and m.strip().lower() != "none"]
    return modules or None


@dataclass
class DataArguments:
    data_path: str = field(
        default="sample/instruct/data_sample.jsonl",
        metadata={"help": "Alpaca-format .json (list) or .jsonl file, or a folder of them; several, comma-separated, are mixed."},
    )
    data_weights: str | None = field(
        default=None, metadata={"help": "Sampling weights of the --data_path files, e.g. 0.3,0.7 (docs/data.md)."}
    )
    data_mix_size: int | None = field(default=None, metadata={"help": "Samples in the mixture (default: all files' samples)."})
    val_data_path: str | None = field(default=None, metadata={"help": "Validation file, used instead of a --val_set_size split."})
    prompt_template: str = field(
        default="alpaca", metadata={"help": "Template name (alpaca, chinese-alpaca, chat templates, auto) or a .json path."}
    )
    cutoff_len: int = field(default=256, metadata={"help": "Maximum tokens per sample; longer samples are truncated."})
    val_set_size: int = field(default=200, metadata={"help": "Samples held out for evaluation (a count; 0 = none)."})
    train_on_inputs: bool = field(default=False, metadata={"help": "Also train on the prompt tokens."})
    cache_dir: str | None = field(default=None, metadata={"help": "Tokenized-data cache (default ~/.cache/chinese_vicuna)."})
    use_data_cache: bool = field(default=True, metadata={"help": "Reuse tokenized data from the cache."})


@dataclass
class BatchArguments:
    micro_batch_size: int = field(default=4, metadata={"help": "Samples per device per step (sets per_device_train_batch_size)."})
    batch_size: int = field(default=128, metadata={"help": "Global batch: micro_batch_size × accumulation × processes."})
    num_epochs: float = field(default=3, metadata={"help": "Epochs (sets num_train_epochs)."})


@dataclass
class TrainArguments(TrainingArguments):
    """TrainingArguments with Chinese-Vicuna's defaults."""

    output_dir: str = field(default="lora-Vicuna", metadata={"help": "Where the adapter and checkpoints go."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate."})
    warmup_steps: float = field(default=100, metadata={"help": "Linear warm-up steps."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    eval_steps: float | None = field(default=200, metadata={"help": "Evaluate every N steps (when --val_set_size > 0)."})
    save_steps: float = field(default=200, metadata={"help": "Save checkpoint-N every N steps."})
    save_total_limit: int | None = field(default=30, metadata={"help": "Keep at most this many checkpoints."})
    # None first: HfArgumentParser picks the second member of the union as the flag type.
    report_to: None | str | list[str] = field(default="none", metadata={"help": "none, tensorboard or wandb (WANDB_MODE=offline works)."})  # noqa: RUF036
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; default: on where the GPU supports it."})
    fp16: bool | None = field(default=None, metadata={"help": "fp16 mixed precision; default: on for GPUs without bf16."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    packing: bool = field(
        default=True,
        metadata={"help": "Padding-free packing: each micro-batch is one row, positions restart per sample (docs/benchmarks.md)."},
    )
    group_by_length: bool | None = field(
        default=None,
        metadata={"help": "Batch samples of similar length (less padding); default: on when packing is off, as the fallback."},
    )

    def __post_init__(self) -> None:
        cuda = torch.cuda.is_available()
        if self.fp16 and not cuda:
            raise UserError("--fp16 needs a CUDA GPU (fp16 on the CPU gives loss 0/NaN); use --bf16 true on the CPU")
        if self.bf16 and self.fp16:
            raise UserError("--bf16 and --fp16 are exclusive; pick one")
        if self.bf16 is None:
            self.bf16 = bool(cuda and bf16_supported() and not self.fp16)
        if self.fp16 is None:
            self.fp16 = bool(cuda and not self.bf16)
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if not cuda:
            # With gloo under torchrun, gradients are only synced when Accelerate is told CPU.
            self.use_cpu = True
            if not self.bf16 and cpu_has_native_bf16():
                # Opt-in, not a default: results would then differ between CPUs with and without it.
                logger.info("this CPU has native bf16 matmuls: --bf16 true trained 1.8x faster in docs/benchmarks.md")
        if self.deepspeed:
            from chinese_vicuna.distributed import check_deepspeed

            check_deepspeed(self.deepspeed)
        super().__post_init__()


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse command-line flags (or a single .json/.yaml file) into the dataclasses."""
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            parsed = parser.parse_json_file(argv[0])
        elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            parsed = parser.parse_yaml_file(argv[0])
        else:
            parsed = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    for args in parsed:
        if isinstance(args, TrainingArguments):
            # Seed now: the LoRA is initialised before the Trainer exists (which seeds only in
            # its __init__), so without this two runs with the same --seed start apart.
            from transformers import set_seed

            set_seed(args.seed)
    return tuple(parsed)


def apply_batch_arguments(args: TrainArguments, batch: BatchArguments) -> None:
    """Global batch stays `batch_size` whatever the number of processes."""
    procs = world_size()
    denominator = batch.micro_batch_size * procs
    if batch.micro_batch_size < 1 or batch.batch_size < 1:
        raise UserError("--micro_batch_size and --batch_size must be at least 1")
    if batch.batch_size % denominator:
        raise UserError(
            f"--batch_size {batch.batch_size} is not a multiple of --micro_batch_size {batch.micro_batch_size} × {procs} processes; "
            f"pick a batch size divisible by {denominator}"
        )
    args.per_device_train_batch_size = batch.micro_batch_size
    args.per_device_eval_batch_size = batch.micro_batch_size
    args.gradient_accumulation_steps = batch.batch_size // denominator
    args.num_train_epochs = batch.num_epochs
    if getattr(args, "deepspeed", None):
        from chinese_vicuna.distributed import refresh_deepspeed_config

        refresh_deepspeed_config(args)  # its "auto" batch values were filled before the lines above


def configure_evaluation(args: TrainArguments, has_eval: bool) -> None:
    from transformers.trainer_utils import IntervalStrategy

    if has_eval:
        args.eval_strategy = IntervalStrategy.STEPS
        args.eval_steps = args.eval_steps or args.save_steps
    else:
        args.eval_strategy = IntervalStrategy.NO
        args.load_best_model_at_end = False


def resolve_resume(args: TrainArguments) -> str | None:
    """`--resume_from_checkpoint true|last` means the newest checkpoint in output_dir."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "no", "0", "none"):
        return None
    if str(value).lower() in ("true", "yes", "1", "last", "latest"):
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint {value}: no checkpoint-N folder in {args.output_dir}")
        return last
    if not os.path.isdir(value):
        raise UserError(f"--resume_from_checkpoint {value}: folder not found")
    return value


# --------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------


class JsonlLogCallback(TrainerCallback):
    """Appends every log entry to `trainer_log.jsonl`; writes `training_loss.png` at the end."""

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / "trainer_log.jsonl"

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            plot_loss(state.log_history, self.path.parent / "training_loss.png")


def plot_loss(log_history: list[dict[str, Any]], out_png: str | os.PathLike) -> bool:
    """Training (and eval) loss against steps, as a PNG. False when there is nothing to plot."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out_png)
    return True


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
def log_trainable(model: Any) -> None:
    trainable, total = trainable_parameters(model)
    logger.info(
        "trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1)
    )


def build_trainer(
    model: Any,
    tokenizer: Any,
    args: TrainArguments,
    train_dataset: Any,
    eval_dataset: Any = None,
    data_collator: Any = None,
    callbacks: list[TrainerCallback] | None = None,
    trainer_class: type[Trainer] = Trainer,
) -> Trainer:
    """A Trainer that logs to trainer_log.jsonl and saves loadable adapters in every checkpoint."""
    configure_evaluation(args, bool(eval_dataset))
    from chinese_vicuna.packing import PackedCollator, use_packed_attention, use_packing

    if getattr(args, "packing", False):
        data_collator, trainer_class = use_packing(data_collator, trainer_class)
        if isinstance(data_collator, PackedCollator):
            use_packed_attention(model)
    if args.group_by_length is None:
        # Without packing, padding is the waste: group similar lengths (HF's LengthGroupedSampler),
        # unless another --train_sampling_strategy was asked for.
        args.group_by_length = not isinstance(data_collator, PackedCollator) and args.train_sampling_strategy == "random"
        if args.group_by_length:
            logger.info("packing off: length-grouped batches (--group_by_length false to draw them uniformly at random)")
    if args.group_by_length:
        args.train_sampling_strategy = "group_by_length"
    if len(train_dataset) == 0:
        raise UserError("no training samples left; check the data file and --cutoff_len")
    steps_per_epoch = math.ceil(len(train_dataset) / (args.per_device_train_batch_size * world_size() * args.gradient_accumulation_steps))
    logger.info(
        "%d training samples, %d eval; global batch %d = %d × %d accumulation × %d processes; %d optimizer steps per epoch",
        len(train_dataset),
        len(eval_dataset or []),
        args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size(),
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        world_size(),
        steps_per_epoch,
    )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset or None,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(args.output_dir), *(callbacks or [])],
    )
    return trainer


def train_and_save(trainer: Trainer, tokenizer: Any, resume_from_checkpoint: str | None = None) -> None:
    """Train (or resume) and save the final adapter through the Trainer (ZeRO-3 safe)."""
    args = trainer.args
    if is_main_process():
        log_trainable(trainer.model)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    # Trainer.save_model gathers ZeRO-3 shards and calls PEFT's save_pretrained on the
    # unwrapped (uncompiled) model: adapter_config.json + adapter_model.safetensors.
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        logger.info("adapter saved to %s", args.output_dir)


# --------------------------------------------------------------------------------------------
# Recipe steps shared by finetune.py and finetune_chat.py
# --------------------------------------------------------------------------------------------
def start_run(model_args: ModelArguments, batch_args: BatchArguments, train_args: TrainArguments) -> str | None:
    """Logging, the required flags and the batch arithmetic; returns the checkpoint to resume from."""
    logging.basicConfig(
        level=logging.INFO if train_args.should_log else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not model_args.base_model:
        raise UserError("--base_model is required: a Hugging Face model folder or hub id, e.g. --base_model ./tiny-llama")
    apply_batch_arguments(train_args, batch_args)
    return resolve_resume(train_args)


def load_model_for_training(model_args: ModelArguments, lora_args: LoraArguments, train_args: TrainArguments, tokenizer: Any) -> Any:
    """The PEFT model ready to train: checked base at its precision, checkpointing, a new or continued LoRA."""
    from chinese_vicuna.modeling import add_lora, load_checked_model, load_lora, prepare_for_training, resolve_precision

    precision = resolve_precision(model_args.precision, model_args.load_in_8bit, model_args.load_in_4bit)
    if model_args.precision == "auto" and precision == "fp32" and train_args.bf16:
        # bf16 training: the frozen base is only ever read by bf16 matmuls, so store it in bf16
        # (half the memory, no per-step cast of every weight); the LoRA weights stay fp32.
        precision = "bf16"
    model = load_checked_model(
        model_args.base_model,
        tokenizer,
        precision,
        model_args.device_map,
        model_args.trust_remote_code,
        model_args.lora_weights,
        model_args.attn_implementation,
    )
    model = prepare_for_training(model, train_args.gradient_checkpointing)
    train_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    if model_args.lora_weights:
        model = load_lora(model, model_args.lora_weights, is_trainable=True)
    else:
        model = add_lora(
            model,
            lora_args.lora_r,
            lora_args.lora_alpha,
            lora_args.lora_dropout,
            lora_args.lora_target_modules,
            parse_modules_to_save(lora_args.modules_to_save),
        )
    if lora_args.fast_lora_dropout:
        from chinese_vicuna.fast_lora import use_fast_lora_dropout

        use_fast_lora_dropout(model, autocast=bool(train_args.bf16 or train_args.fp16))
    return model
