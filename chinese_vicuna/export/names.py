"""The one table of tensor names between Hugging Face and Meta layouts, and the q/k permutation."""

from __future__ import annotations

import torch


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q/k rows (rotary halves) → Meta's / llama.cpp's interleaved rotary pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows → HF's (what transformers' convert_llama_weights_to_hf does)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# One row per decoder-layer module: Hugging Face name → (Meta name, GGUF name).
LAYER_NAMES = {
    "self_attn.q_proj": ("attention.wq", "attn_q"),
    "self_attn.k_proj": ("attention.wk", "attn_k"),
    "self_attn.v_proj": ("attention.wv", "attn_v"),
    "self_attn.o_proj": ("attention.wo", "attn_output"),
    "mlp.gate_proj": ("feed_forward.w1", "ffn_gate"),
    "mlp.down_proj": ("feed_forward.w2", "ffn_down"),
    "mlp.up_proj": ("feed_forward.w3", "ffn_up"),
    "input_layernorm": ("attention_norm", "attn_norm"),
    "post_attention_layernorm": ("ffn_norm", "ffn_norm"),
}
# The tensors outside the layers, likewise.
TOP_NAMES = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", "token_embd.weight"),
    "model.norm.weight": ("norm.weight", "output_norm.weight"),
    "lm_head.weight": ("output.weight", "output.weight"),
}
HF_TO_META = {hf: meta for hf, (meta, _) in LAYER_NAMES.items()}


# Which dimension Meta's model-parallel shards split (None: replicated), as fairscale does:
# column-parallel layers split rows, row-parallel ones (wo, w2) and the embedding split columns.
META_SPLIT_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "attention.wq": 0,
    "attention.wk": 0,
    "attention.wv": 0,
    "attention.wo": 1,
    "feed_forward.w1": 0,
    "feed_forward.w2": 1,
    "feed_forward.w3": 0,
}


META_TOP = {hf: meta for hf, (meta, _) in TOP_NAMES.items()}


def meta_module(name: str) -> str:
    """`layers.3.attention.wq.weight` → `attention.wq`; `tok_embeddings.weight` → `tok_embeddings`."""
    return name.removesuffix(".weight").split(".", 2)[-1] if name.startswith("layers.") else name.split(".")[0]


def gguf_name(hf_name: str) -> str | None:
    """The GGUF (llama.cpp) name of a Hugging Face LLaMA tensor; None for what llama.cpp computes itself."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name][1]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        module = ".".join(parts[3:-1])
        if module in LAYER_NAMES:
            return f"blk.{parts[2]}.{LAYER_NAMES[module][1]}.{parts[-1]}"
    return None  # rotary inv_freq buffers and the like
