"""Groups of sampled completions per prompt (GRPO's rollouts), from the model being trained.

    rollouts = sample_groups(model, prompt_ids, num_generations=8, max_new_tokens=256,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    rollouts.completion_ids[i * 8 + j]   # prompt i's j-th completion (its EOS included)

The model is used as it is (a PeftModel with its current adapter weights: no merge, no copy),
in eval mode and without gradients; its train/eval mode is restored afterwards.

Why it is faster than `model.generate` over the prompts repeated G times (what TRL does):
- each prompt is prefilled once; in a LLaMA step (`_SharedPrefixLlama`) its keys and values serve
  its whole group (one batched matmul over prompts), never copied G times;
- each row's completion cache is preallocated, so a step writes one column (`DynamicCache`
  concatenates the whole cache every step); other models run their own forward over a cache
  with spare columns (`_GenericDecoder`, `GrowingLayer`);
- the decoding step calls the model's modules directly: no logits processors or stopping
  criteria, only the last position through lm_head;
- sampling draws one uniform per row (inverse CDF), not `torch.multinomial`;
- finished rows leave the batch, so a group's short answers stop costing as soon as they end;
  `generate` computes them until the longest row ends.

Exact: padding is masked and positions count real tokens, so at temperature 0 every completion
is the greedy answer of its prompt decoded alone, token for token (generate.py's answers).
Sampling follows HF's order: temperature, then top-k, then top-p (the smallest set of tokens
whose probability reaches top_p), then one draw per row from `generator` (on the model's device).
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
    # inverse CDF, one uniform per row: torch.multinomial costs ~10x more on the CPU (it draws
    # per row through a slower path); the cumulative sum in float64 keeps the tail's mass exact
    cdf = probs.double().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device, generator=generator) * cdf[:, -1:]
    # token i is drawn when cdf[i-1] <= u < cdf[i]: a token of probability 0 never is
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)


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


def _prefill(
    model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """Each prompt once, left-padded (the mask hides the padding, positions count real tokens):
    the cache, the mask [prompts, width] and the last position's logits [prompts, vocab]."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompt_ids], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], dtype=torch.long, device=device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    return cache, mask, out.logits[:, -1, :]


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
    cache, mask, logits = _prefill(model, prompt_ids, pad_token_id, device)
    rows = len(prompt_ids) * group
    decoder: _Decoder = (_SharedPrefixLlama if _SharedPrefixLlama.supports(model) else _GenericDecoder)(
        model, cache, mask, group, max_new_tokens
    )
    del cache
    logits = logits.repeat_interleave(group, 0)  # each prompt's first-token logits for its group's rows
    lengths = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long, device=device).repeat_interleave(group)
    completions: list[list[int]] = [[] for _ in range(rows)]
    truncated = [False] * rows
    active = torch.arange(rows, device=device)  # which completion each batch row is
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
            active, tokens, lengths = active[keep], tokens[keep], lengths[keep]
            decoder.keep_rows(keep)
        logits = decoder.step(tokens, lengths)
        lengths = lengths + 1
    return Rollouts(completions, truncated)


class _Decoder:
    """One decoding step for the batch's rows (`step`), and dropping finished rows (`keep_rows`)."""

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def keep_rows(self, keep: torch.Tensor) -> None:
        raise NotImplementedError


class _GenericDecoder(_Decoder):
    """Any causal LM: its own forward over a cache with spare columns (`GrowingLayer`), each
    prompt's prefill cache repeated for its group's rows."""

    def __init__(self, model: torch.nn.Module, cache: DynamicCache, mask: torch.Tensor, group: int, max_new_tokens: int) -> None:
        self.model = model
        self.layers = [(layer.keys.repeat_interleave(group, 0), layer.values.repeat_interleave(group, 0)) for layer in cache.layers]
        self.mask = mask.repeat_interleave(group, 0)
        self.cache: DynamicCache | None = None

    def keep_rows(self, keep: torch.Tensor) -> None:
        if self.cache is not None:
            self.layers = [(layer.keys, layer.values) for layer in self.cache.layers]
        mask = self.mask[keep]
        start = int((mask.sum(0) > 0).nonzero()[0])  # padding columns no kept row uses any more
        self.mask = mask[:, start:]
        self.layers = [(k.index_select(0, keep)[:, :, start:], v.index_select(0, keep)[:, :, start:]) for k, v in self.layers]
        self.cache = None

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.cache = DynamicCache()
            self.cache.layers = [GrowingLayer(k, v) for k, v in self.layers]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=positions[:, None],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]


class _SharedPrefixLlama(_Decoder):
    """A LLaMA decoding step written out over the model's own modules (LoRA layers included), with
    each prompt's keys and values kept ONCE for its whole group: a row attends to its prompt's
    prefix cache (shared, never copied) and to its own completion's cache (a preallocated buffer).

    Every row is at the same completion step, so the completion part needs no mask; the prefix
    part is masked by its prompt's padding. Both parts' scores go through one softmax, so this
    is the attention over [prompt, completion] that the model's forward computes."""

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        from transformers import LlamaForCausalLM

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return type(base) is LlamaForCausalLM and base.config._attn_implementation in ("sdpa", "eager")

    def __init__(self, model: torch.nn.Module, cache: DynamicCache, mask: torch.Tensor, group: int, max_new_tokens: int) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.rotate = apply_rotary_pos_emb
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.prefix = [(layer.keys, layer.values) for layer in cache.layers]  # [prompts, kv heads, width, dim]
        # -inf on each prompt's padding, added to its rows' prefix scores
        self.prefix_bias = torch.zeros(mask.shape, dtype=self.prefix[0][0].dtype, device=mask.device).masked_fill(mask == 0, float("-inf"))
        prompts, heads, _, dim = self.prefix[0][0].shape
        self.row_prompt = torch.arange(prompts, device=mask.device).repeat_interleave(group)
        # the prefix part runs as one batched matmul over prompts, their rows side by side in
        # `slots` columns; `slot_of_row` places each row (None: every group full, rows = slots)
        self.slots = group
        self.slot_of_row: torch.Tensor | None = None
        rows = prompts * group
        self.completion = [
            (k.new_empty(rows, heads, max_new_tokens, dim), k.new_empty(rows, heads, max_new_tokens, dim)) for k, _ in self.prefix
        ]
        self.filled = 0  # completion columns written

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.row_prompt = self.row_prompt[keep]
        sizes = torch.bincount(self.row_prompt, minlength=self.prefix[0][0].shape[0])
        self.slots = int(sizes.max())
        first_row = sizes.cumsum(0) - sizes  # rows stay in prompt order
        rank = torch.arange(keep.numel(), device=keep.device) - first_row[self.row_prompt]
        self.slot_of_row = self.row_prompt * self.slots + rank
        n, t = keep.numel(), self.filled
        for k, v in self.completion:  # compacted in place: the first n rows are the kept ones
            k[:n, :, :t] = k[keep, :, :t]
            v[:n, :, :t] = v[keep, :, :t]
        self.completion = [(k[:n], v[:n]) for k, v in self.completion]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        base = self.base
        hidden = base.model.embed_tokens(tokens[:, None])
        cos, sin = base.model.rotary_emb(hidden, position_ids=positions[:, None])
        bias = self.prefix_bias[self.row_prompt][:, None, None, :]  # [rows, 1, 1, width]
        for layer, (prefix_k, prefix_v), (own_k, own_v) in zip(base.model.layers, self.prefix, self.completion):
            residual = hidden
            hidden = residual + self._attention(
                layer.self_attn, layer.input_layernorm(hidden), cos, sin, prefix_k, prefix_v, own_k, own_v, bias
            )
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.filled += 1
        return base.lm_head(base.model.norm(hidden))[:, -1, :]

    def _attention(
        self,
        attn: torch.nn.Module,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix_k: torch.Tensor,
        prefix_v: torch.Tensor,
        own_k: torch.Tensor,
        own_v: torch.Tensor,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        rows, dim = hidden.shape[0], attn.head_dim
        kv_heads, groups = prefix_k.shape[1], attn.num_key_value_groups
        q = attn.q_proj(hidden).view(rows, 1, -1, dim).transpose(1, 2)  # [rows, heads, 1, dim]
        k = attn.k_proj(hidden).view(rows, 1, -1, dim).transpose(1, 2)
        v = attn.v_proj(hidden).view(rows, 1, -1, dim).transpose(1, 2)
        q, k = self.rotate(q, k, cos, sin)
        t = self.filled
        own_k[:, :, t : t + 1] = k
        own_v[:, :, t : t + 1] = v
        own_k, own_v = own_k[:, :, : t + 1], own_v[:, :, : t + 1]
        q = q.reshape(rows, kv_heads, groups, dim)  # a kv head's query heads side by side
        width = prefix_k.shape[2]
        prefix_scores = self._from_slots(torch.matmul(self._to_slots(q), prefix_k.transpose(2, 3)) * attn.scaling)
        own_scores = torch.matmul(q, own_k.transpose(2, 3)) * attn.scaling  # [rows, kv heads, groups, t+1]
        probs = torch.softmax(torch.cat([prefix_scores + bias, own_scores], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs[..., width:], own_v) + self._from_slots(torch.matmul(self._to_slots(probs[..., :width]), prefix_v))
        return attn.o_proj(out.reshape(rows, 1, kv_heads * groups * dim))

    def _to_slots(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, kv heads, groups, n] → [prompts, kv heads, slots*groups, n]: each prompt's rows side
        by side, so one matmul against the prompts' caches [prompts, kv heads, ., .] serves all rows."""
        prompts = self.prefix[0][0].shape[0]
        if self.slot_of_row is not None:
            padded = x.new_zeros(prompts * self.slots, *x.shape[1:])
            padded[self.slot_of_row] = x
            x = padded
        _, kv_heads, groups, n = x.shape
        return x.view(prompts, self.slots, kv_heads, groups, n).transpose(1, 2).reshape(prompts, kv_heads, self.slots * groups, n)

    def _from_slots(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `_to_slots`."""
        prompts, kv_heads, _, n = x.shape
        x = x.view(prompts, kv_heads, self.slots, -1, n).transpose(1, 2).reshape(prompts * self.slots, kv_heads, -1, n)
        return x if self.slot_of_row is None else x[self.slot_of_row]
