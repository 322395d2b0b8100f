"""How much memory a LoRA / QLoRA run will take, from the base's config.json alone (seconds, nothing loads).

    python tools/estimate_memory.py --base_model ./llama-7b-hf --precision 4bit --lora_r 16 --cutoff_len 2048 --micro_batch_size 4

Prints weights, adapter + gradients + AdamW states, activations (with --gradient_checkpointing, the
default here, or without), the loss's logits and the framework's footprint, and their sum
(chinese_vicuna/train/memory.py; docs/memory.md compares it with measured peaks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from chinese_vicuna.args import BaseModelArguments, parse_args
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.files import read_json
from chinese_vicuna.train.memory import GIB, WEIGHT_BYTES, estimate_training_memory

# Hub ids of common bases → their config.json fields (no network here): the estimate needs only these.
KNOWN_SHAPES = {
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000},
    "llama-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40, "vocab_size": 32000},
    "llama-65b": {"hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 80, "num_attention_heads": 64, "vocab_size": 32000},
    "llama-3-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256,
    },
}  # fmt: skip


@dataclass
class EstimateArguments:
    precision: str = field(default="4bit", metadata={"help": f"Weights: {', '.join(WEIGHT_BYTES)}."})
    lora_r: int = field(default=8)
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={"help": "Comma list, or all-linear."})
    lora_dropout: float = field(default=0.05)
    cutoff_len: int = field(default=256)
    micro_batch_size: int = field(default=4)
    gradient_checkpointing: bool = field(default=True)
    bf16: bool = field(default=True, metadata={"help": "Activations in bf16/fp16 (autocast); false: fp32."})
    loss_chunk_size: int = field(default=1024, metadata={"help": "As finetune.py's; 0: the model's own logits."})
    trained_fraction: float = field(default=1.0, metadata={"help": "Share of positions with a trained target (answers only: ~0.3-0.6)."})
    device: str = field(default="cuda", metadata={"help": "cuda or cpu (framework footprint; quantized models' side weights)."})
    json: bool = field(default=False, metadata={"help": "Print JSON instead of a table."})


def read_config(base_model: str) -> dict:
    if base_model in KNOWN_SHAPES:
        return KNOWN_SHAPES[base_model]
    path = Path(base_model) / "config.json"
    if not path.is_file():
        raise UserError(f"--base_model {base_model}: no config.json there; give a model folder or one of {', '.join(KNOWN_SHAPES)}")
    return read_json(path)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    # --base_model: a model folder (its config.json) or one of KNOWN_SHAPES' names
    base, args = parse_args((BaseModelArguments, EstimateArguments), argv)
    if args.precision not in WEIGHT_BYTES:
        raise UserError(f"--precision {args.precision}: use one of {', '.join(WEIGHT_BYTES)}")
    if args.device not in ("cuda", "cpu"):
        raise UserError(f"--device {args.device}: use cuda or cpu")
    estimate = estimate_training_memory(
        read_config(base.require_base_model(f"a model folder (its config.json) or one of {', '.join(KNOWN_SHAPES)}")), args.precision, args.lora_r, args.lora_target_modules, args.cutoff_len, args.micro_batch_size,
        args.gradient_checkpointing, 2 if args.bf16 else 4, args.loss_chunk_size, args.trained_fraction, args.device, args.lora_dropout,
    )  # fmt: skip
    if args.json:
        print(json.dumps({name: round(value / GIB, 3) for name, value in estimate.rows()}))
        return
    for name, value in estimate.rows():
        print(f"{name:<30} {value / GIB:8.2f} GiB")


if __name__ == "__main__":
    main()
