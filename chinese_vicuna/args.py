"""Every shared argument dataclass of the scripts, and `parse_args`: parsed once, final after parsing.

Flag groups are defined once here and shared by every script and tool that takes them (base
model, model loading, template, decoding, page server, API server, LoRA, data, batch, training).
`parse_args` only parses, validates and derives the settings that follow from others (precision
through `devices.decide_precision`, batch arithmetic, evaluation): it configures nothing and
touches no file. Logging, the seed, resume and the output folder are the recipe's set-up step,
`chinese_vicuna.run.prepare_run`, called in view after parsing.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from transformers import HfArgumentParser, TrainingArguments

from chinese_vicuna.devices import decide_loss_kernel, decide_precision, world_size
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.decoding import DecodingArguments as DecodingArguments  # the decoding flag group, owned by infer/

logger = logging.getLogger(__name__)


def check_flags(*checks: tuple[bool, str]) -> None:
    """The first failed (ok, message) check is a UserError; each message names its flag and the value."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


@dataclass
class BaseModelArguments:
    """--base_model, the one definition: every script and tool that names a base model takes it from here.

    A script that cannot run without it says so with `require_base_model`."""

    base_model: str = field(
        default="", metadata={"help": "Base model: a local HF folder or a hub id (LLaMA-family); a merged model works too."}
    )

    def require_base_model(self, what: str = "a Hugging Face model folder or hub id, e.g. --base_model ./tiny-llama") -> str:
        if not self.base_model:
            raise UserError(f"--base_model is required: {what}")
        return self.base_model


@dataclass
class ModelArguments(BaseModelArguments):
    """Which model to load and how: shared by every script that loads one."""

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
    # RoPE scaling for a longer context (model/rope.py); an adapter trained with it records it (rope_scaling.json)
    rope_scaling: str | None = field(
        default=None,
        metadata={
            "help": "RoPE scaling: linear (position interpolation), dynamic (NTK), yarn or llama3; default: the adapter's, else none."
        },
    )
    rope_factor: float = field(default=1.0, metadata={"help": "With --rope_scaling: the context grows by this factor (e.g. 2, 4)."})
    model_max_length: int | None = field(
        default=None, metadata={"help": "With --rope_scaling: the new context window in tokens (default: the base's × --rope_factor)."}
    )


@dataclass
class TrainModelArguments(ModelArguments):
    """ModelArguments of the training recipes: --lora_weights continues training an adapter."""

    lora_weights: str | None = field(default=None, metadata={"help": "Continue training this adapter (folder or hub id)."})


@dataclass
class TemplateArguments:
    """--prompt_template, the one definition. None (the default) means: the template saved with the
    adapter or model (`prompt_template.json`) where there is one, else the script's kind default,
    `fallback_template` (alpaca for instruction scripts, chinese-vicuna-chat for chat scripts).
    Training has no saved template to read, so it trains with the fallback."""

    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Template name (alpaca, chinese-alpaca, chinese-vicuna-chat, vicuna_v1.1, chatml, llama2, llama3, auto) or a "
            ".json path. Default: the prompt_template.json saved with the adapter, merged model or GGUF, else the script's "
            "default (alpaca; chinese-vicuna-chat for the chat scripts)."
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

    fallback_template: ClassVar[str] = "chinese-vicuna-chat"


@dataclass
class ChatSessionArguments:
    """The system prompt and history budget of the chat front ends (page, terminal)."""

    system: str | None = field(default=None, metadata={"help": "System prompt (default: the template's)."})
    max_memory: int = field(default=1024, metadata={"help": "Most prompt tokens (system + history + question); oldest turns go first."})

    def __post_init__(self) -> None:
        if self.max_memory < 1:
            raise UserError(f"--max_memory must be a positive number of tokens, got {self.max_memory}")


LOOPBACK = "127.0.0.1"  # pages and servers listen here unless told otherwise (pitfall 14)


@dataclass
class ServerArguments:
    """Where a web page listens (Gradio's names); the API server's --host/--port work as aliases."""

    server_name: str = field(
        default=LOOPBACK, metadata={"help": "Address to listen on (0.0.0.0 = every network).", "aliases": ["--host"]}
    )
    server_port: int = field(default=7860, metadata={"help": "Port to listen on.", "aliases": ["--port"]})
    share: bool = field(default=False, metadata={"help": "Also open a public gradio.live link."})


@dataclass
class ApiServerArguments:
    """Where the API server listens (vLLM's and llama.cpp's names); the pages' --server_name/--server_port work as aliases."""

    host: str = field(
        default=LOOPBACK, metadata={"help": "Address to listen on (0.0.0.0 = every network: set a key).", "aliases": ["--server_name"]}
    )
    port: int = field(default=8000, metadata={"help": "Port to listen on.", "aliases": ["--server_port"]})


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
            "(same keep probability to 1/65536; chinese_vicuna/train/fast_lora.py). false = PEFT's nn.Dropout."
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

    # LoRA variants (docs/lora_variants.md): saved in adapter_config.json, so stock PEFT loads them
    use_dora: bool = field(default=False, metadata={"help": "DoRA: a trained magnitude per output row beside the LoRA direction."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale alpha/sqrt(r) instead of alpha/r (stable at high ranks)."})
    init_lora_weights: str = field(
        default="default",
        metadata={
            "help": "LoRA initialisation: default (B=0), gaussian, pissa, pissa_niter_N (fast SVD), olora, or loftq (with "
            "--precision 4bit). PiSSA/OLoRA adapters are saved converted, for the original base."
        },
    )

    def __post_init__(self) -> None:
        check_lora_init(self.init_lora_weights)
        check_flags(
            (self.lora_r >= 1, f"--lora_r {self.lora_r}: the LoRA rank must be at least 1 (8-64 are usual)"),
            (self.lora_alpha > 0, f"--lora_alpha {self.lora_alpha}: must be > 0 (usually 2 × --lora_r)"),
            (0 <= self.lora_dropout < 1, f"--lora_dropout {self.lora_dropout}: must be in [0, 1)"),
        )


LORA_INITS = ("default", "true", "gaussian", "pissa", "olora", "loftq")


def check_lora_init(value: str) -> None:
    """--init_lora_weights is one PEFT knows (pissa_niter_N with a whole N)."""
    if value in LORA_INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", value):
        return
    raise UserError(
        f"--init_lora_weights {value}: use one of {', '.join(LORA_INITS[:1] + LORA_INITS[2:])} or pissa_niter_N (e.g. pissa_niter_4)"
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default="sample/instruct/data_sample.jsonl",
        metadata={"help": "Alpaca-format data: .json/.jsonl/.parquet/.csv/.arrow, a folder, a hub dataset (docs/data.md); comma-separated: mixed."},
    )
    data_weights: str | None = field(
        default=None, metadata={"help": "Sampling weights of the --data_path files, e.g. 0.3,0.7 (docs/data.md)."}
    )
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
    loraplus_lr_ratio: float = field(
        default=0.0,
        metadata={"help": "LoRA+: the LoRA B matrices learn at --learning_rate × this ratio (16 is usual); 0: off."},
    )
    loss_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Loss through lm_head this many positions at a time: no [tokens, vocab] logits (train/losses.py); 0: the model's own logits."
        },
    )
    loss_kernel: str = field(
        default="auto",
        metadata={"help": "The loss head: auto (Liger's fused kernel on CUDA where liger-kernel is installed, else chunked), chunked or liger."},
    )
    # TrainingArguments' own flag, redefined: the layers are compiled in view (train/compile.py), never the whole model
    torch_compile: str = field(
        default="auto",
        metadata={
            "help": "Compile one decoder layer's forward for all layers, and the loss' chunks (chinese_vicuna/train/compile.py): "
            "auto (on with CUDA, off on the CPU where it does not pay: docs/benchmarks.md), true or false.",
            "nargs": "?",
            "const": "true",
        },
    )

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
        if self.loss_chunk_size < 0:
            raise UserError(f"--loss_chunk_size {self.loss_chunk_size}: must be >= 0 (positions per chunk; 0: unchunked)")
        if self.loraplus_lr_ratio < 0:
            raise UserError(f"--loraplus_lr_ratio {self.loraplus_lr_ratio}: must be >= 0 (0: off; 16 is usual)")
        if self.packing_max_tokens < 0 or (self.packing_max_tokens and not self.packing):
            raise UserError(f"--packing_max_tokens {self.packing_max_tokens} needs --packing true and a count ≥ 0 (0: off)")
        # mixed precision and the CPU flag: decided with the weights' precision, in one function
        precision = decide_precision(training=True, bf16=self.bf16, fp16=self.fp16)
        self.bf16, self.fp16, self.use_cpu = precision.bf16, precision.fp16, self.use_cpu or precision.use_cpu
        self.loss_kernel = decide_loss_kernel(self.loss_kernel, cuda=False if self.use_cpu else None)
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if self.deepspeed:
            from chinese_vicuna.distributed import check_deepspeed

            check_deepspeed(self.deepspeed)
        # Trainer compiles the whole model through accelerate when torch_compile or a backend/mode is set:
        # it gets neither, apply_training_speedups compiles the layers with them (train/compile.py).
        asked = decide_torch_compile(self.torch_compile, self.use_cpu, bool(self.torch_compile_backend or self.torch_compile_mode))
        self.compile_backend, self.compile_mode = self.torch_compile_backend, self.torch_compile_mode
        self.torch_compile, self.torch_compile_backend, self.torch_compile_mode = False, None, None
        super().__post_init__()
        self.torch_compile = asked


def decide_torch_compile(value: str | bool, use_cpu: bool, backend_or_mode_given: bool = False) -> bool:
    """--torch_compile: true/false as given (a backend or mode given means true, as in TrainingArguments);
    auto: on with CUDA, off on the CPU, where compiling costs more than it saves (docs/benchmarks.md)."""
    import torch

    text = str(value).strip().lower()
    if text not in ("auto", "true", "false", "1", "0", "yes", "no"):
        raise UserError(f"--torch_compile {value}: use auto, true or false")
    if text != "auto":
        return text in ("true", "1", "yes")
    return backend_or_mode_given or (not use_cpu and torch.cuda.is_available())


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


def parse_args(
    dataclass_types: tuple[type, ...], argv: list[str] | None = None, pass_through: bool = False, positional: str | None = None
) -> tuple[Any, ...]:
    """Parse command-line flags (or a single .json/.yaml file) into the dataclasses, validate them
    and derive what follows from them (`derive`): after this, nothing changes an argument. Nothing
    is configured, nothing on disk is read for writing or written: that is the recipe's set-up step
    (`chinese_vicuna.run.prepare_run`). Upstream flag names (`UPSTREAM_FLAGS`) are accepted as aliases.

    `pass_through`: flags the dataclasses do not know are returned last, as a list (a tool that
    hands them on to another script), instead of being an error.
    `positional`: the flag a leading bare argument stands for (`tool.py DIR` = `tool.py --model_dir DIR`,
    the form of llama.cpp's converter and of earlier versions)."""
    parser = HfArgumentParser(dataclass_types)
    argv = list(sys.argv[1:] if argv is None else argv)
    if positional and argv and not argv[0].startswith("-") and not (len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml"))):
        argv = [positional, *argv]
    argv, upstream_unknown = translate_upstream_flags(argv, set(parser._option_string_actions))
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
        derive(parsed)
        return (*parsed, extra)
    derive(parsed)
    return tuple(parsed)


def derive(parsed: Sequence[Any]) -> None:
    """The one place that derives settings from other settings, while parsing:

    - precision: `devices.decide_precision` from the flags as given (with the training's mixed
      precision; a group with a `whole_model` property, e.g. pretraining's `--stage embeddings`,
      trains every weight and refuses quantized ones);
    - batch arithmetic: the global batch stays `batch_size` whatever the number of processes;
    - evaluation on when there is held-out data; length-grouped batches when packing is off;
    - non-reentrant gradient checkpointing.
    """
    train = next((a for a in parsed if isinstance(a, TrainingArguments)), None)
    whole_model = next((a.whole_model for a in parsed if getattr(a, "whole_model", None)), None)
    for args in parsed:
        if isinstance(args, ModelArguments):
            check_lora_weights(args.lora_weights)
            training = {"training": True, "bf16": train.bf16, "fp16": train.fp16} if train is not None else {}
            args.precision = decide_precision(args.precision, args.load_in_8bit, args.load_in_4bit, whole_model=whole_model, **training).weights
            args.load_in_8bit, args.load_in_4bit = args.precision == "8bit", args.precision == "4bit"
    if train is None:
        return
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
        train.train_sampling_strategy = "group_by_length"
    kwargs = train.activation_checkpointing_kwargs or {"use_reentrant": False}
    train.activation_checkpointing_kwargs = train.gradient_checkpointing_kwargs = kwargs


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
