"""Training memory, estimated from a model's config.json before anything loads (tools/estimate_memory.py;
docs/memory.md): weights at their precision, LoRA + gradients + AdamW states, activations (with or
without gradient checkpointing), the loss's logits, and the framework's own footprint.

The activation terms count what a LLaMA layer keeps for backward per token (in the compute dtype):
with a frozen base and LoRA, the inputs of the adapted linears, q/k/v and the attention output,
the MLP's gate/up/act/product, the norms' inputs. Checked against measured CPU peaks (docs/memory.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30

# Bytes per weight by storage precision. NF4: 4 bits + an 8-bit absmax per 64 weights (double
# quantization) + its second-level constants; LLM.int8: 1 byte + a fp32 scale per row (tiny).
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "half": 2.0, "8bit": 1.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256)}
# LoRA parameter: fp32 weight + fp32 gradient + AdamW's two fp32 moments.
LORA_TRAIN_BYTES = 16
# Per token and decoder layer, in units of the hidden width h and the MLP width i, what backward
# keeps: without checkpointing ~ (ACT_H·h + ACT_I·i) values; with checkpointing only the layer input
# (h) per layer, plus one layer's full set while it is recomputed. Fitted to one measured peak (the
# ~54M model without checkpointing, docs/memory.md) and checked against three others.
ACT_H, ACT_I = 20, 7
# What the process holds before the model: torch + transformers + peft on the CPU (RSS), or the
# CUDA context and allocator slack on a GPU.
FRAMEWORK_BYTES = {"cpu": 0.6 * GIB, "cuda": 0.75 * GIB}


@dataclass
class MemoryEstimate:
    weights: float
    adapter_and_optimizer: float
    activations: float
    logits: float
    framework: float

    @property
    def total(self) -> float:
        return self.weights + self.adapter_and_optimizer + self.activations + self.logits + self.framework

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("weights", self.weights),
            ("adapter + gradients + AdamW", self.adapter_and_optimizer),
            ("activations", self.activations),
            ("logits (loss)", self.logits),
            ("framework", self.framework),
            ("total", self.total),
        ]


def _linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one LLaMA-style decoder layer."""
    h, i = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or h // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    return {
        "q_proj": (h, heads * head_dim), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * head_dim, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }  # fmt: skip


def estimate_training_memory(
    config: dict[str, Any],
    precision: str = "4bit",
    lora_r: int = 8,
    target_modules: str = "q_proj,v_proj",
    cutoff_len: int = 256,
    micro_batch_size: int = 4,
    gradient_checkpointing: bool = True,
    compute_bytes: int = 2,
    loss_chunk_size: int = 1024,
    trained_fraction: float = 1.0,
    device: str = "cuda",
    lora_dropout: float = 0.05,
) -> MemoryEstimate:
    """Bytes of one LoRA training step's peak, by part. `compute_bytes`: the activations' dtype (2 under
    bf16/fp16 autocast, 4 in fp32); `lora_dropout` > 0 keeps a dropped copy of each adapted input; `trained_fraction`: share of positions with a trained target
    (the logits exist only there); a micro-batch is `micro_batch_size × cutoff_len` tokens at most."""
    h, i, layers = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_hidden_layers"])
    vocab = int(config["vocab_size"])
    shapes = _linear_shapes(config)
    layer_params = sum(a * b for a, b in shapes.values()) + 2 * h
    tied = bool(config.get("tie_word_embeddings", False))
    # bitsandbytes quantizes the decoder's linears; embeddings and lm_head stay in the compute dtype
    # (fp32 on the CPU, where this project loads quantized models with fp32 compute).
    quantized = precision in ("4bit", "8bit")
    side_bytes = (4 if device == "cpu" else 2) if quantized else WEIGHT_BYTES[precision]
    weights = layers * layer_params * WEIGHT_BYTES[precision] + vocab * h * (1 if tied else 2) * side_bytes + h * 4

    targets = list(shapes) if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    lora_params = layers * sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)
    adapter = lora_params * LORA_TRAIN_BYTES

    tokens = micro_batch_size * cutoff_len
    per_layer_full = tokens * (ACT_H * h + ACT_I * i) * compute_bytes
    # plus each adapted linear's rank-r intermediate (x·Aᵀ) and the fp32 attention softmax statistics
    per_layer_full += tokens * lora_r * len(targets) * compute_bytes
    if lora_dropout > 0:  # each adapted linear keeps its own dropped copy of its input for the LoRA's backward
        per_layer_full += tokens * sum(shapes[t][0] for t in targets if t in shapes) * compute_bytes
    # backward through a layer also holds the gradients of its activations (about as many values again)
    if gradient_checkpointing:
        activations = layers * tokens * h * compute_bytes + 2 * per_layer_full
    else:
        activations = (layers + 1) * per_layer_full
    trained = max(1, int(tokens * trained_fraction))
    rows = min(trained, loss_chunk_size) if loss_chunk_size > 0 else trained
    # the chunk's logits (compute dtype), its fp32 log-softmax and its fp32 gradient; unchunked, the
    # model's logits and the loss's fp32 copy and gradient of every trained position
    logits = rows * vocab * (compute_bytes + 4 + 4) + (trained * h * compute_bytes if loss_chunk_size > 0 else 0)
    return MemoryEstimate(weights, adapter, activations, logits, FRAMEWORK_BYTES[device])
