"""Plain text for continued pretraining: documents `[bos] ids [eos]`, concatenated and cut into
fixed-size blocks (the remainder that does not fill a block is dropped and counted), as in
Chinese-LLaMA's run_clm_pt.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from chinese_vicuna.data.fast_tokenize import encode_texts
from chinese_vicuna.errors import UserError


def encode_documents(tokenizer: Any, documents: Sequence[str], batch_size: int = 1000) -> list[list[int]]:
    """`[bos] + ids + [eos]` of every document, tokenized in batches."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[list[int]] = []
    for start in range(0, len(documents), batch_size):
        out.extend(bos + ids + eos for ids in encode_texts(tokenizer, documents[start : start + batch_size]))
    return out


def group_into_blocks(token_lists: Iterable[Sequence[int]], block_size: int) -> tuple[list[list[int]], int]:
    """Concatenate and cut into `block_size` blocks; returns (blocks, tokens dropped at the end)."""
    if block_size < 2:
        raise UserError(f"--block_size {block_size}: must be at least 2")
    blocks: list[list[int]] = []
    current: list[int] = []
    for ids in token_lists:
        current.extend(ids)
        while len(current) >= block_size:
            blocks.append(current[:block_size])
            current = current[block_size:]
    return blocks, len(current)
