"""Every argument dataclass of the scripts, and `parse_args`: parsed once, final after parsing.

Flag groups are defined once here and shared by every script that takes them (model loading,
template, decoding, server, LoRA, data, batch, training). `parse_args` derives the settings
that follow from others (batch arithmetic, evaluation, resume) so no code changes arguments later.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import HfArgumentParser, TrainingArguments

from chinese_vicuna import checkpoints
from chinese_vicuna.devices import bf16_supported, cpu_has_native_bf16, is_main_process, resolve_precision, world_size
from chinese_vicuna.errors import UserError
from chinese_vicuna.outputlock import hold_output_folder

logger = logging.getLogger(__name__)


def check_flags(*checks: tuple[bool, str]) -> None:
    """The first failed (ok, message) check is a UserError; each message names its flag and the value."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


@dataclass
class DecodingArguments:
    """Decoding flags; the web pages start from them and batch mode uses them.

    Defaults stream well and reproduce what a model was trained to say: greedy (the same
    answer every time), one beam (beam search cannot stream), no repetition penalty.
    """

    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens to generate per answer."})
    min_new_tokens: int = field(default=0, metadata={"help": "Do not stop (EOS) before this many tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (with temperature/top_p/top_k) instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling: keep the smallest set of tokens with this mass."})
    top_k: int = field(default=40, metadata={"help": "Sample among the k most likely tokens (0 = all)."})
    num_beams: int = field(default=1, metadata={"help": "Beam search with this many beams (>1 cannot stream: shown when done)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalize repeated tokens (1.0 = off; 1.1-1.3 against loops)."})

    def validate(self) -> None:
        """Bad values are user errors, named with their flag."""
        checks = [
            (self.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "--min_new_tokens must be between 0 and --max_new_tokens"),
            (self.num_beams >= 1, "--num_beams must be at least 1"),
            (self.repetition_penalty > 0, "--repetition_penalty must be > 0 (1.0 = off)"),
            (not self.do_sample or self.temperature > 0, "--temperature must be > 0 when sampling"),
            (0 < self.top_p <= 1, "--top_p must be in (0, 1]"),
            (self.top_k >= 0, "--top_k must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message} (got {asdict(self)})")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`; sampling knobs only when sampling."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(self.max_new_tokens),
            "min_new_tokens": int(self.min_new_tokens),
            "num_beams": int(self.num_beams),
            "repetition_penalty": float(self.repetition_penalty),
            "do_sample": bool(self.do_sample),
        }
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k))
        else:
            # the model's generation_config may carry sampling defaults; neutral values keep
            # transformers from warning that they are ignored
            kwargs.update(temperature=1.0, top_p=1.0, top_k=50)
        return kwargs

    @property
    def streams(self) -> bool:
        """Beam search picks its answer only at the end, so it cannot stream token by token."""
        return self.num_beams == 1


@dataclass
class ModelArguments:
    """Which model to load and how: shared by every script that loads one."""

    base_model: str = field(
        default="", metadata={"help": "Base model: a local HF folder or a hub id (LLaMA-family); a merged model works too."}
    )
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer folder if not the base model's."})
    lora_weights: str | None = field(
        default=None, metadata={"help": "A LoRA adapter folder (output_dir or a checkpoint-N), a stock PEFT adapter or a hub id."}
    )
    lora_config: str | None = field(
        default=None,
        metadata={
            "help": "adapter_config.json for a --lora_weights folder that has none (a Chinese-Vicuna checkpoint-N with only "
            "pytorch_model.bin), e.g. config-sample/adapter_config.json; the folder is read in place."
        },
    )
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
    # What the user asked for, before `finalize` resolved `precision` (not a flag).
    precision_requested: str = field(default="", init=False, repr=False)


@dataclass
class TrainModelArguments(ModelArguments):
    """ModelArguments of the training recipes: --lora_weights continues training an adapter."""

    lora_weights: str | None = field(default=None, metadata={"help": "Continue training this adapter (folder or hub id)."})


@dataclass
class TemplateArguments:
    """The prompt template (chinese_vicuna/templates/*.json, a .json path, or auto)."""

    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Template name (alpaca, chinese-alpaca, a chat template, auto) or a .json path. Default: inference uses the "
            "prompt_template.json saved with the adapter or merged model, training and models without one use alpaca."
        },
    )
    # used where no template is given and none was saved with the model
    fallback_template: ClassVar[str] = "alpaca"

    @property
    def template_or_fallback(self) -> str:
        """The template to train with: the one given, else the fallback."""
        return self.prompt_template or self.fallback_template


@dataclass
class ChatTemplateArguments(TemplateArguments):
    """TemplateArguments of the chat scripts: a chat template by default."""

    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Chat template: chinese-vicuna-chat, vicuna_v1.1, chatml, llama2, llama3, auto, or a .json path. Default: the "
            "prompt_template.json saved with the adapter, merged model or GGUF, else chinese-vicuna-chat."
        },
    )
    fallback_template: ClassVar[str] = "chinese-vicuna-chat"


@dataclass
class ChatSessionArguments:
    """The system prompt and history budget of the chat front ends (page, terminal)."""

    system: str | None = field(default=None, metadata={"help": "System prompt (default: the template's)."})
    max_memory: int = field(default=1024, metadata={"help": "Most prompt tokens (system + history + question); oldest turns go first."})

    def __post_init__(self) -> None:
        if self.max_memory < 1:
            raise UserError(f"--max_memory must be a positive number of tokens, got {self.max_memory}")


@dataclass
class ServerArguments:
    """Where a page or server listens: loopback unless told otherwise."""

    server_name: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0 = every network)."})
    server_port: int = field(default=7860, metadata={"help": "Port to listen on."})
    share: bool = field(default=False, metadata={"help": "Also open a public gradio.live link."})


@dataclass
class UIArguments:
    """The language of the web pages and the terminal chat (chinese_vicuna/infer/i18n.py)."""

    ui_language: str = field(default="zh", metadata={"help": "Language of the page / terminal chat: zh (中文) or en (English)."})

    def __post_init__(self) -> None:
        if self.ui_language not in ("zh", "en"):
            raise UserError(f"--ui_language {self.ui_language!r}: use zh or en")


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

    def __post_init__(self) -> None:
        check_flags(
            (self.lora_r >= 1, f"--lora_r {self.lora_r}: the LoRA rank must be at least 1 (8-64 are usual)"),
            (self.lora_alpha > 0, f"--lora_alpha {self.lora_alpha}: must be > 0 (usually 2 × --lora_r)"),
            (0 <= self.lora_dropout < 1, f"--lora_dropout {self.lora_dropout}: must be in [0, 1)"),
        )


@dataclass
class DataArguments:
    data_path: str = field(
        default="sample/instruct/data_sample.jsonl",
        metadata={"help": "Alpaca-format data: .json/.jsonl/.parquet/.csv/.arrow, a folder, a hub dataset (docs/data.md); comma-separated: mixed."},
    )
    data_weights: str | None = field(default=None, metadata={"help": "Sampling weights of the --data_path files, e.g. 0.3,0.7 (docs/data.md)."})
    data_mix_size: int | None = field(default=None, metadata={"help": "Samples in the mixture (default: all files' samples)."})
    val_data_path: str | None = field(default=None, metadata={"help": "Validation file, used instead of a --val_set_size split."})
    cutoff_len: int = field(default=256, metadata={"help": "Maximum tokens per sample; longer samples are truncated."})
    val_set_size: int | None = field(
        default=None,
        metadata={"help": "Samples held out for evaluation (a count; 0 = none). Default: 200, at most a tenth of the samples."},
    )
    train_on_inputs: bool = field(default=False, metadata={"help": "Also train on the prompt tokens."})
    cache_dir: str | None = field(default=None, metadata={"help": "Tokenized-data cache (default ~/.cache/chinese_vicuna)."})
    use_data_cache: bool = field(default=True, metadata={"help": "Reuse tokenized data from the cache."})

    def __post_init__(self) -> None:
        check_flags(
            (self.cutoff_len >= 1, f"--cutoff_len {self.cutoff_len}: must be a positive number of tokens (e.g. 256, 512, 2048)"),
            (self.val_set_size is None or self.val_set_size >= 0, f"--val_set_size {self.val_set_size}: must be >= 0 (0 = no evaluation)"),
        )


@dataclass
class BatchArguments:
    micro_batch_size: int = field(default=4, metadata={"help": "Samples per device per step (sets per_device_train_batch_size)."})
    batch_size: int = field(default=128, metadata={"help": "Global batch: micro_batch_size × accumulation × processes."})
    num_epochs: float = field(default=3, metadata={"help": "Epochs (sets num_train_epochs)."})

    def __post_init__(self) -> None:
        check_flags(
            (self.micro_batch_size >= 1, f"--micro_batch_size {self.micro_batch_size}: must be at least 1"),
            (self.batch_size >= 1, f"--batch_size {self.batch_size}: must be at least 1"),
            (self.num_epochs > 0, f"--num_epochs {self.num_epochs}: must be > 0 (a --max_steps N > 0 overrides it)"),
        )


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
    packing_max_tokens: int = field(
        default=0,
        metadata={"help": "With packing: fill each micro-batch (row) up to this many tokens instead of micro_batch_size samples; 0: off."},
    )
    group_by_length: bool | None = field(
        default=None,
        metadata={"help": "Batch samples of similar length (less padding); default: on when packing is off, as the fallback."},
    )
    # alpaca-lora's names, kept as ours; transformers 5 calls them deprecated aliases of activation_checkpointing*
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in backward: less memory, about a third more compute.", "nargs": "?", "const": True},
    )
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": 'Keyword arguments of gradient checkpointing (default: {"use_reentrant": false}).'}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an --output_dir that holds another run: its checkpoints and adapter are moved to "
            "OUTPUT_DIR/superseded-<time>/."
        },
    )
    # The run's identity (checkpoints.run_fingerprint), set by `finalize`; not a flag.
    run_fingerprint: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_flags(
            (self.learning_rate > 0, f"--learning_rate {self.learning_rate}: must be > 0 (LoRA: 1e-4 to 3e-4 are usual)"),
            (self.warmup_steps >= 0, f"--warmup_steps {self.warmup_steps}: must be >= 0"),
            (self.save_steps > 0, f"--save_steps {self.save_steps}: must be > 0"),
            (self.logging_steps > 0, f"--logging_steps {self.logging_steps}: must be > 0"),
            (self.eval_steps is None or self.eval_steps > 0, f"--eval_steps {self.eval_steps}: must be > 0"),
        )
        # Our names set, the new ones not: take them over without transformers' deprecation warning.
        if self.activation_checkpointing is None and self.gradient_checkpointing is not None:
            self.activation_checkpointing = self.gradient_checkpointing
        if self.activation_checkpointing_kwargs is None and self.gradient_checkpointing_kwargs is not None:
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs
        cuda = torch.cuda.is_available()
        if self.fp16 and not cuda:
            raise UserError("--fp16 needs a CUDA GPU (fp16 on the CPU gives loss 0/NaN); use --bf16 true on the CPU")
        if self.bf16 and self.fp16:
            raise UserError("--bf16 and --fp16 are exclusive; pick one")
        if self.packing_max_tokens < 0 or (self.packing_max_tokens and not self.packing):
            raise UserError(f"--packing_max_tokens {self.packing_max_tokens} needs --packing true and a count ≥ 0 (0: off)")
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
                logger.info("this CPU has native bf16 matmuls: --bf16 true trains faster here (docs/benchmarks.md)")
        if self.deepspeed:
            from chinese_vicuna.distributed import check_deepspeed

            check_deepspeed(self.deepspeed)
        super().__post_init__()


# Flag names of Chinese-Vicuna's and Chinese-LLaMA-Alpaca's own scripts → ours. Accepted where the
# script has our flag (with a note in the log); named in the error where it has not.
UPSTREAM_FLAGS = {
    "--model_path": "--base_model",
    "--output_path": "--output_dir",
    "--test_size": "--val_set_size",
    "--total_batch": "--batch_size",
    "--micro_batch": "--micro_batch_size",
    "--peft_path": "--lora_weights",
    "--lora_model": "--lora_weights",
    "--lora_path": "--lora_weights",
}


def translate_upstream_flags(argv: list[str], known: set[str]) -> tuple[list[str], list[str]]:
    """argv with upstream flag names replaced by ours where this script takes them; and a
    note for each upstream flag it does not take (for the error)."""
    out, unknown = [], []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        ours = UPSTREAM_FLAGS.get(flag)
        if ours is None or flag in known:
            out.append(arg)
        elif ours in known:
            logger.info("%s is Chinese-Vicuna / Chinese-LLaMA-Alpaca's name for %s here", flag, ours)
            out.append(ours + sep + value)
        else:
            out.append(arg)
            unknown.append(f"{flag} (upstream name of {ours}, which this script does not take)")
    return out, unknown


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None, pass_through: bool = False) -> tuple[Any, ...]:
    """Parse command-line flags (or a single .json/.yaml file) into the dataclasses, then derive
    what follows from them (`finalize`): after this, nothing changes an argument. Upstream flag
    names (`UPSTREAM_FLAGS`) are accepted as aliases.

    `pass_through`: flags the dataclasses do not know are returned last, as a list (a tool that
    hands them on to another script), instead of being an error."""
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    argv, upstream_unknown = translate_upstream_flags(list(argv), set(parser._option_string_actions))
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            parsed = parser.parse_json_file(argv[0])
        elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            parsed = parser.parse_yaml_file(argv[0])
        else:
            parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=pass_through)
    except ValueError as exc:
        message = str(exc).splitlines()[0]
        if upstream_unknown:
            message += "; " + "; ".join(upstream_unknown)
        raise UserError(message) from None
    if pass_through and isinstance(parsed[-1], list):
        *parsed, extra = parsed
        finalize(parsed)
        return (*parsed, extra)
    finalize(parsed)
    return tuple(parsed)


def finalize(parsed: Sequence[Any]) -> None:
    """The one place that derives settings from other settings:

    - precision: resolved once (`auto` → 8bit on a GPU, fp32 on the CPU; bf16 storage of the
      frozen base when training in bf16 on the CPU, since only bf16 matmuls ever read it);
    - batch arithmetic: the global batch stays `batch_size` whatever the number of processes;
    - evaluation on when there is held-out data; length-grouped batches when packing is off;
    - non-reentrant gradient checkpointing; `--resume_from_checkpoint true` → the checkpoint's path.
    """
    train = next((a for a in parsed if isinstance(a, TrainingArguments)), None)
    for args in parsed:
        if isinstance(args, ModelArguments):
            check_lora_weights(args.lora_weights)
            args.precision_requested = "8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else args.precision
            auto = args.precision_requested == "auto"
            args.precision = resolve_precision(args.precision, args.load_in_8bit, args.load_in_4bit)
            if auto and args.precision == "fp32" and train is not None and train.bf16:
                args.precision = "bf16"
            args.load_in_8bit, args.load_in_4bit = args.precision == "8bit", args.precision == "4bit"
    if train is None:
        return
    configure_logging(train)
    # Seed now: the LoRA is initialised before the Trainer exists (which seeds only in its
    # __init__), so without this two runs with the same --seed start apart.
    from transformers import set_seed

    set_seed(train.seed)
    batch = next((a for a in parsed if isinstance(a, BatchArguments)), None)
    if batch is not None:
        apply_batch_arguments(train, batch)
    # val_set_size None: the default hold-out (train/data.py sizes it to the data)
    has_eval = any(getattr(a, "val_set_size", 0) != 0 or getattr(a, "val_data_path", None) for a in parsed)
    configure_evaluation(train, has_eval)
    if getattr(train, "group_by_length", False) is None:
        # Without packing, padding is the waste: group similar lengths (HF's LengthGroupedSampler),
        # unless another --train_sampling_strategy was asked for.
        train.group_by_length = not getattr(train, "packing", False) and train.train_sampling_strategy == "random"
        if train.group_by_length:
            logger.info("packing off: length-grouped batches (--group_by_length false to draw them uniformly at random)")
    if train.group_by_length:
        train.train_sampling_strategy = "group_by_length"
    kwargs = train.activation_checkpointing_kwargs or {"use_reentrant": False}
    train.activation_checkpointing_kwargs = train.gradient_checkpointing_kwargs = kwargs
    # the output folder and the checkpoint to resume from, checked before anything loads
    checkpoints.check_writable(train.output_dir)
    if is_main_process():
        # one writer per folder, before anything reads it for a resume or moves a run aside
        hold_output_folder(train.output_dir)
    train.run_fingerprint = checkpoints.run_fingerprint(parsed)
    train.resume_from_checkpoint = resolve_resume(train)
    prepare_output_dir(train)


def configure_logging(train: TrainingArguments) -> None:
    """Log lines from here on (the main process at INFO, others at WARNING): what `finalize` decides is shown."""
    logging.basicConfig(
        level=logging.INFO if train.should_log else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_lora_weights(value: str | None) -> None:
    """--lora_weights is a local folder or a hub id: a typo is caught before a base model loads."""
    if not value or Path(value).exists():
        return
    # `out/checkpoint-60x` is shaped like a hub id `user/name`, but its first part is a local folder
    if not HUB_ID.match(value) or Path(value.split("/")[0]).is_dir():
        raise UserError(f"--lora_weights {value}: folder not found (give an adapter folder: a run's --output_dir or its checkpoint-N)")


def apply_batch_arguments(args: TrainingArguments, batch: BatchArguments) -> None:
    """Global batch stays `batch_size` whatever the number of processes."""
    procs = world_size()
    denominator = batch.micro_batch_size * procs
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


def configure_evaluation(args: TrainingArguments, has_eval: bool) -> None:
    from transformers.trainer_utils import IntervalStrategy

    if has_eval:
        args.eval_strategy = IntervalStrategy.STEPS
        args.eval_steps = args.eval_steps or args.save_steps
    else:
        args.eval_strategy = IntervalStrategy.NO
        args.load_best_model_at_end = False


def resolve_resume(args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint true|last`: the newest complete checkpoint-N of output_dir (incomplete
    ones, from an interrupted save of an older version or a damaged disk, are named and passed over);
    a named checkpoint must be complete. Either way it must belong to this run (`run_fingerprint`)."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "no", "0", "none"):
        return None
    if args.overwrite_output_dir:
        raise UserError("--overwrite_output_dir true starts over and --resume_from_checkpoint continues: pass only one")
    needs_optimizer = not args.save_only_model
    if str(value).lower() in ("true", "yes", "1", "last", "latest"):
        folder, skipped = checkpoints.newest_complete_checkpoint(args.output_dir, needs_optimizer)
        for reason in skipped:
            logger.warning("not resuming from %s", reason)
        if folder is None:
            found = f" (incomplete: {'; '.join(skipped)})" if skipped else ""
            raise UserError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in {args.output_dir}{found}")
        how = "the newest complete checkpoint"
    else:
        folder = Path(value)
        if not folder.is_dir():
            raise UserError(f"--resume_from_checkpoint {value}: folder not found")
        problem = checkpoints.checkpoint_problem(folder, needs_optimizer)
        if problem:
            raise UserError(
                f"--resume_from_checkpoint {value}: {problem}; name another checkpoint-N, or pass true for the newest complete one"
            )
        how = "as named"
    if args.run_fingerprint is not None:
        checkpoints.check_fingerprint(folder, args.run_fingerprint, new_data=args.ignore_data_skip)
    logger.info("resuming from %s (%s in %s)", folder, how, args.output_dir)
    return str(folder)


def prepare_output_dir(args: TrainingArguments) -> None:
    """Before anything loads: output_dir is a writable folder, and a fresh run does not write over
    (nor mix its log and checkpoints with) another run's unless --overwrite_output_dir true."""
    checkpoints.check_writable(args.output_dir)
    if args.resume_from_checkpoint or not checkpoints.holds_a_run(args.output_dir):
        return
    if not args.overwrite_output_dir:
        found = [p.name for p in checkpoints.checkpoint_folders(args.output_dir)] or ["a saved adapter"]
        raise UserError(
            f"--output_dir {args.output_dir} holds another run ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): "
            "continue it with --resume_from_checkpoint true, start over with --overwrite_output_dir true, or choose another --output_dir"
        )
    if is_main_process():
        moved = checkpoints.move_previous_run_aside(args.output_dir)
        logger.warning("--overwrite_output_dir true: the previous run's checkpoints and adapter were moved to %s", moved)
