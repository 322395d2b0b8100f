"""Groups of sampled completions per prompt (GRPO's rollouts), from the model being trained.

    rollouts = sample_groups(model, prompt_ids, num_generations=8, max_new_tokens=256,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    rollouts.completion_ids[i * 8 + j]   # prompt i's j-th completion (its EOS included)

The model is used as it is (a PeftModel with its current adapter weights: no merge, no copy),
in eval mode and without gradients; its train/eval mode is restored afterwards.

Why it is faster than `model.generate` over the prompts repeated G times (what TRL does):
- each prompt is prefilled once and its KV cache expanded to its G rows, not prefilled G times;
- a lean decoding loop calls the model's forward directly: one token per row, no logits
  processors or stopping criteria, only the last position through lm_head (`logits_to_keep=1`);
- the cache keeps spare columns (`GrowingLayer`), so a step writes one column instead of
  copying the whole cache (`DynamicCache` concatenates every step);
- finished rows leave the batch (and padding columns no row needs are cut), so a group's
  short answers stop costing as soon as they end; `generate` computes them to the longest.

Exact: padding is masked and positions count real tokens, so at temperature 0 every completion
is the greedy answer of its prompt decoded alone, token for token (generate.py's answers).
Sampling follows HF's order: temperature, then top-k, then top-p (the smallest set of tokens
whose probability reaches top_p), then one draw per row from `generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from chinese_vicuna.infer.generation import model_device
from chinese_vicuna.serving.engine import GrowingLayer


@dataclass
class Rollouts:
    """Completions of a group sampler: prompt i's group is rows i*G .. i*G+G-1."""

    completion_ids: list[list[int]]  # generated ids, the EOS included when generated, nothing after it
    truncated: list[bool]  # cut at max_new_tokens without an EOS
    texts: list[str] = field(default_factory=list)  # filled by Engine.sample_groups: the answers as generate.py shows them

    @property
    def num_tokens(self) -> int:
        """Generated tokens, EOS included: what throughput counts."""
        return sum(len(c) for c in self.completion_ids)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab]: argmax at temperature 0, else a draw from the
    tempered distribution cut to the top_k most likely and to the top_p nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token once the tokens before it already reach top_p (the first always stays)
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check(
    prompt_ids: Sequence[Sequence[int]], num_generations: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int
) -> None:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample_groups needs at least one prompt, and every prompt at least one token")
    if num_generations < 1 or max_new_tokens < 1:
        raise ValueError(f"num_generations and max_new_tokens must be >= 1 (got {num_generations}, {max_new_tokens})")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, {top_k})")


def sample_groups(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    num_generations: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> Rollouts:
    """`num_generations` completions of each prompt (ids, BOS included), at most `max_new_tokens`
    each; temperature 0 is greedy. See the module docstring."""
    _check(prompt_ids, num_generations, max_new_tokens, temperature, top_p, top_k)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _sample(
                model, prompt_ids, num_generations, max_new_tokens, temperature, top_p, top_k, eos_token_id, pad_token_id, generator
            )
    finally:
        model.train(was_training)


def _sample(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    group: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    generator: torch.Generator | None,
) -> Rollouts:
    device = model_device(model)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long, device=device)
    # prefill: each prompt once, left-padded; the mask hides the padding, positions count real tokens
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompt_ids], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], dtype=torch.long, device=device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    # each prompt's cache, mask and last logits repeated for its group's rows
    rows = len(prompt_ids) * group
    layers = [(layer.keys.repeat_interleave(group, 0), layer.values.repeat_interleave(group, 0)) for layer in cache.layers]
    mask = mask.repeat_interleave(group, 0)
    logits = out.logits[:, -1, :].repeat_interleave(group, 0)
    lengths = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long, device=device).repeat_interleave(group)
    del out, cache

    completions: list[list[int]] = [[] for _ in range(rows)]
    truncated = [False] * rows
    active = torch.arange(rows, device=device)  # which completion each batch row is
    step_cache: DynamicCache | None = None
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, temperature, top_p, top_k, generator)
        finished = torch.isin(tokens, eos)
        for row, token in zip(active.tolist(), tokens.tolist()):
            completions[row].append(token)
        if step == max_new_tokens - 1:
            for row, done in zip(active.tolist(), finished.tolist()):
                truncated[row] = not done
            break
        if bool(finished.any()):
            keep = (~finished).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            active, tokens, lengths, mask = active[keep], tokens[keep], lengths[keep], mask[keep]
            layers = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in _layers(step_cache, layers)]
            start = int((mask.sum(0) > 0).nonzero()[0])  # padding columns no kept row uses any more
            mask = mask[:, start:]
            layers = [(k[:, :, start:], v[:, :, start:]) for k, v in layers]
            step_cache = None
        if step_cache is None:
            step_cache = DynamicCache()
            step_cache.layers = [GrowingLayer(k, v) for k, v in layers]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=lengths[:, None],
            cache=step_cache,
            use_cache=True,
            logits_to_keep=1,
        )
        lengths = lengths + 1
        logits = out.logits[:, -1, :]
    return Rollouts(completions, truncated)


def _layers(step_cache: DynamicCache | None, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The current keys and values per layer: the decoding cache's once it exists."""
    if step_cache is None:
        return layers
    return [(layer.keys, layer.values) for layer in step_cache.layers]
