"""Padding-free packing: the samples of a micro-batch concatenated into one row.

alpaca-lora's recipe pads every micro-batch to its longest sample; with instruction data's
long-tailed lengths much of each batch is padding. Here a micro-batch of N samples becomes
ONE row of their summed length (HF's `DataCollatorWithFlattening` layout):

- `position_ids` restart at 0 for every sample, and no `attention_mask` is passed: the
  transformers 5 mask builder (`masking_utils.find_packed_sequence_indices`) then turns the
  row into a block-diagonal causal mask for sdpa/eager, and flash-attention 2 uses the same
  position_ids for its varlen kernel. No token attends to another sample.
- `shift_labels` (the target of every position, -100 at each sample's last token) are
  built here, so no position predicts the first token of the next sample, and Trainer counts
  `num_items_in_batch` from them (the same count as unpacked `labels[..., 1:]`).
- The loss (`PackedLossMixin`) asks the model for logits only at positions with a trainable
  target (`logits_to_keep`): prompt tokens never go through the 32000-wide `lm_head`. The sum
  of token losses is divided by the same `num_items_in_batch` as HF's own loss, so packed and
  unpacked training give the same per-token mean over the same tokens, with gradient
  accumulation too.
- The last decoder layer feeds nothing but `lm_head`, so (LLaMA layers) it runs its query,
  attention output, o_proj and MLP only at those same positions; keys and values still cover
  every token (`last_layer_at_targets`). Exact: the other positions' outputs are never read.

The sampler still draws `micro_batch_size` samples per step, so the number of optimizer
steps per epoch, the data order and the learning-rate schedule are exactly those of
unpacked training; only padding and wasted logits disappear.

`--packing_max_tokens N` fills each row up to N tokens instead (`TokenBudgetBatchSampler`):
larger matmuls per forward, fewer and fuller optimizer steps (each step then holds a varying
number of samples; the loss is still the per-token mean over the accumulated batch, since
`num_items_in_batch` counts the trainable targets of all its rows).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

from chinese_vicuna.data.collate import PackedCollator, PaddingCollator, sequences_of
from chinese_vicuna.data.encode import IGNORE_INDEX
from chinese_vicuna.train.checkpointing import AtomicCheckpointMixin, CheckpointTrainer
from chinese_vicuna.train.losses import DEFAULT_CHUNK, causal_lm_loss, causal_lm_token_log_probs, loss_for_trainer, token_mean
from chinese_vicuna.train.mixed_precision import keep_logits_dtype

logger = logging.getLogger(__name__)


PACKED_SDPA = "sdpa_packed"


def _segment_starts(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """Start offsets of the samples in a packed row (positions restart at 0), else None."""
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != length:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0 or len(starts) == 1:
        return None
    return [*starts, length]


def packed_sdpa_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa per packed sample: causal attention inside each sample, nothing across them.

    The generic path hands sdpa one block-diagonal mask over the whole row, which on the CPU
    computes every (masked) block and cannot use the fused causal kernel. Here each sample
    runs `is_causal=True` on its own slice, the CPU analogue of flash-attention's varlen.
    Anything that is not a packed training row (generation, padded batches) goes to sdpa.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    n = query.shape[2]
    starts = _segment_starts(kwargs.get("position_ids"), n) if key.shape[2] == n else None
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    p = dropout if module.training else 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # split, not slicing: split's backward is one cat of the samples' gradients, where each slice's
    # backward would zero-fill a whole row and add it up (a full-row pass per sample and tensor).
    sizes = [b - a for a, b in itertools.pairwise(starts)]
    pieces = zip(*(t.split(sizes, dim=2) for t in (query, key, value)), strict=True)
    out = torch.cat([_causal_attention(q, k, v, p, scale) for q, k, v in pieces], dim=2)
    return out.transpose(1, 2).contiguous(), None


# On the CPU, samples up to this length use bf16 matmuls (see _causal_attention); the saved
# probabilities cost heads x n^2 x 2 bytes per sample and layer, so longer ones use flash.
CPU_MATMUL_ATTENTION_MAX_LEN = 512


_causal_bias_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scale: float) -> torch.Tensor:
    """Causal attention of one sample, (1, heads, n, head_dim), by what measures fastest here.

    CPU, bf16/fp16, n <= 512: scores by one batched bf16 matmul with the causal mask added in
    the same call (`baddbmm`), softmax (fp32 inside), bf16 matmul with V -- HF's eager attention
    without its extra passes; forward + backward faster than the CPU flash kernel (docs/benchmarks.md),
    which does not use the bf16 matmul units well. Elsewhere: sdpa's fused causal kernel (in
    fp32 on the CPU, where it is faster than in bf16).
    """
    n = query.shape[2]
    if query.device.type != "cpu" or dropout:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale, is_causal=True)
    if query.dtype == torch.float32 or n > CPU_MATMUL_ATTENTION_MAX_LEN:
        q, k, v = query.float(), key.float(), value.float()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True).to(query.dtype)
    cache_key = (query.dtype, query.device)
    if cache_key not in _causal_bias_cache:
        size = CPU_MATMUL_ATTENTION_MAX_LEN
        _causal_bias_cache[cache_key] = torch.full((size, size), float("-inf"), dtype=query.dtype, device=query.device).triu(1)
    bias = _causal_bias_cache[cache_key][:n, :n]  # the top-left block of a causal mask is causal
    heads = query.shape[0] * query.shape[1]
    q, k, v = (t.reshape(heads, n, t.shape[-1]) for t in (query, key, value))
    probs = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale).softmax(dim=-1)
    return torch.bmm(probs, v).view(query.shape[0], query.shape[1], n, value.shape[-1])


def use_packed_attention(model: Any) -> None:
    """Switch an sdpa model to `packed_sdpa_attention` (same results, no cross-sample work)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return  # flash-attention (varlen from position_ids) or eager: leave as chosen
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, AttentionMaskInterface._global_mapping["sdpa"])
    base.set_attn_implementation(PACKED_SDPA)


def packed_forward(model: Any, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """The model on a packed row. `use_cache=False` matters: with a KV cache object the mask
    builder skips packed-sequence detection and samples would attend to each other."""
    return model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False, **kwargs)


def _last_llama_layer(model: Any) -> Any:
    """The last decoder layer when it is a LlamaDecoderLayer (whose forward
    `_llama_layer_at_positions` mirrors), else None."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not layers:
        return None
    layer = layers[base.config.num_hidden_layers - 1]
    if getattr(layer, "gradient_checkpointing", False):
        return None  # a checkpointed layer recomputes in backward, outside the patch below
    if type(layer) is not LlamaDecoderLayer or "forward" in vars(layer):
        return None  # another wrapper's forward (accelerate's device hooks) stays in charge
    return layer


# Above this share of trained positions (pretraining, --train_on_inputs) the gathers and the masked
# attention cost more than the skipped rows save (docs/benchmarks.md): the layer runs whole.
LAST_LAYER_MAX_KEPT = 0.75


@contextlib.contextmanager
def last_layer_at_targets(model: Any, inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> Iterator[None]:
    """During one forward of a packed row, run the last LLaMA layer only at the `keep` positions
    (those with a trainable target; `logits_to_keep` reads nothing else). Its keys and values
    still cover every position. Other models, or a checkpointed layer, run unchanged."""
    layer = _last_llama_layer(model)
    n = inputs["input_ids"].shape[1]
    if layer is None or inputs["input_ids"].shape[0] != 1 or not 0 < keep.numel() <= n * LAST_LAYER_MAX_KEPT:
        yield
        return
    starts = _segment_starts(inputs.get("position_ids"), n) or [0, n]
    layer.forward = functools.partial(_llama_layer_at_positions, layer, keep, starts)
    try:
        yield
    finally:
        del layer.forward


def _llama_layer_at_positions(
    layer: Any, keep: torch.Tensor, starts: list[int], hidden_states: torch.Tensor, position_embeddings: Any = None, **kwargs: Any
) -> torch.Tensor:
    """LlamaDecoderLayer.forward on a packed row, computed at the `keep` positions only.

    Returns the full row's shape with zeros elsewhere (never read). Per sample, the kept queries
    attend to the sample's keys up to their own position (sdpa with a boolean mask)."""
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.models.llama.modeling_llama import rotate_half

    attn = layer.self_attn
    n, t = hidden_states.shape[1], keep.numel()
    x = layer.input_layernorm(hidden_states)

    def heads(y: torch.Tensor, length: int) -> torch.Tensor:
        return y.view(1, length, -1, attn.head_dim).transpose(1, 2)

    query = heads(attn.q_proj(x[:, keep]), t)
    key, value = heads(attn.k_proj(x), n), heads(attn.v_proj(x), n)
    cos, sin = (e.unsqueeze(1) for e in position_embeddings)  # HF's apply_rotary_pos_emb, positions apart
    query = query * cos[:, :, keep] + rotate_half(query) * sin[:, :, keep]
    key = key * cos + rotate_half(key) * sin
    key, value = repeat_kv(key, attn.num_key_value_groups), repeat_kv(value, attn.num_key_value_groups)
    dropout = attn.attention_dropout if layer.training else 0.0
    bounds = torch.searchsorted(keep, torch.tensor(starts, device=keep.device)).tolist()
    outputs = []
    for (a, b), (i, j) in zip(itertools.pairwise(starts), itertools.pairwise(bounds), strict=True):
        if i == j:
            continue
        sees = torch.arange(a, b, device=keep.device)[None, :] <= keep[i:j, None]  # causal within the sample
        q, k, v = query[:, :, i:j], key[:, :, a:b], value[:, :, a:b]
        if q.device.type == "cpu":  # the CPU's sdpa kernels are faster in fp32 (see _causal_attention)
            q, k, v = q.float(), k.float(), v.float()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sees, dropout_p=dropout, scale=attn.scaling)
        outputs.append(out.to(query.dtype))
    attended = torch.cat(outputs, dim=2).transpose(1, 2).reshape(1, t, -1)
    h = hidden_states[:, keep] + attn.o_proj(attended)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return hidden_states.new_zeros(hidden_states.shape).index_copy(1, keep, h)


# Packed rows in bf16 on the CPU are padded to a multiple of this many tokens (`pad_row_to_bucket`).
ROW_LENGTH_MULTIPLE = 64


def pad_row_to_bucket(model: Any, inputs: dict[str, torch.Tensor], multiple: int = ROW_LENGTH_MULTIPLE) -> dict[str, torch.Tensor]:
    """A packed row padded to a multiple of `multiple` tokens where the model computes in bf16 on the CPU.

    oneDNN, which runs the CPU's bf16 matmuls, builds (JIT-compiles) and caches a kernel for every
    new matrix shape: with rows of ever different lengths every step paid for new kernels of every
    linear layer (about 2.5× the matmul itself) and the cache kept growing (docs/benchmarks.md). The
    padding is a sample of its own (positions from 0, no trained target), so no other sample attends
    to it and the loss is unchanged. fp32 (MKL, no per-shape kernels) and GPU rows stay as they are."""
    ids = inputs["input_ids"]
    extra = -ids.shape[1] % multiple
    if not extra or ids.shape[0] != 1 or ids.device.type != "cpu":
        return inputs
    embeddings = model.module if hasattr(model, "module") else model
    if embeddings.get_input_embeddings().weight.dtype != torch.bfloat16:
        return inputs
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([ids, ids.new_zeros(1, extra)], dim=1)
    padded["position_ids"] = torch.cat([inputs["position_ids"], torch.arange(extra, dtype=inputs["position_ids"].dtype)[None]], dim=1)
    labels = inputs["shift_labels"]
    padded["shift_labels"] = torch.cat([labels, labels.new_full((1, extra), IGNORE_INDEX)], dim=1)
    return padded


def packed_loss(
    model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None, chunk: int = DEFAULT_CHUNK, kernel: str = "chunked"
) -> tuple[torch.Tensor, Any, int]:
    """(loss, outputs, trainable tokens) of a packed batch; see the module docstring. `chunk`:
    rows of logits at a time (`--loss_chunk_size`, train/losses.py).

    The loss is `sum of token losses / num_items_in_batch` when the Trainer gives the count of
    the whole accumulated batch (as HF's ForCausalLMLoss does), else the mean over this batch.
    """
    inputs = pad_row_to_bucket(model, inputs)
    targets = inputs["shift_labels"].reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    with last_layer_at_targets(model, inputs, keep):
        total, outputs = causal_lm_loss(model, lambda: packed_forward(model, inputs, logits_to_keep=keep), targets[keep], chunk, kernel)
    return token_mean(total, num_items_in_batch, int(keep.numel())), outputs, int(keep.numel())


class PackedLossMixin:
    """Trainer mixin: packed batches (with `shift_labels`) go through `packed_loss`."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if "shift_labels" not in inputs:
            self.loss_is_scaled_for_ga = None
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)  # type: ignore[misc]
        # The packed loss takes bf16 logits as they are: no fp32 copy (train/mixed_precision.py).
        keep_logits_dtype(model)
        chunk = getattr(self.args, "loss_chunk_size", DEFAULT_CHUNK)  # type: ignore[attr-defined]
        loss, outputs, _ = packed_loss(model, inputs, num_items_in_batch, chunk, getattr(self.args, "loss_kernel", "chunked"))  # type: ignore[attr-defined]
        loss = loss_for_trainer(self, loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def token_log_probs(
    model: Any, inputs: dict[str, torch.Tensor], chunk: int = 0, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 log-probability of every trained target, the sequence it lies in) of a batch, shape
    (targets,), ordered by sequence then position: for a stage whose loss is per token (GRPO) or per
    sequence (`sequence_log_probs`). `temperature` divides the logits first (the distribution GRPO's
    completions were sampled from).

    Takes either collator's batch: a packed row (`sequence_spans`; the last layer run only at
    trained positions, as `packed_loss`) or padded rows (one sequence each). Logits only at trained
    positions, `chunk` rows at a time through lm_head (`--loss_chunk_size`; 0: the model's own
    logits; train/losses.py `causal_lm_token_log_probs`). Sequence `g * k + j` is member j of
    sample g (data/collate.py)."""
    if "sequence_spans" in inputs:
        targets = inputs["shift_labels"].reshape(-1)
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        with last_layer_at_targets(model, inputs, keep):
            log_probs, _ = causal_lm_token_log_probs(
                model, lambda: packed_forward(model, inputs, logits_to_keep=keep), targets[keep], chunk, temperature
            )
        spans = inputs["sequence_spans"].to(keep.device)
        owner = torch.searchsorted(spans[:, 1].contiguous(), keep, right=True)  # the sequence each target lies in
    else:
        labels = inputs["labels"]
        trained = labels[:, 1:] != IGNORE_INDEX
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = trained  # position t predicts label t + 1
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"), "use_cache": False}
        log_probs, _ = causal_lm_token_log_probs(
            model, lambda: model(**forward, logits_to_keep=keep), labels[:, 1:][trained], chunk, temperature
        )
        owner = trained.nonzero()[:, 0]  # the row each target lies in
    return log_probs, owner


def sequence_log_probs(model: Any, inputs: dict[str, torch.Tensor], chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of the trained tokens, their count) of every sequence of a batch,
    in fp32, shape (sequences,): for a stage whose loss is per sequence (preference pairs).
    Either collator's batch, as `token_log_probs`."""
    log_probs, owner = token_log_probs(model, inputs, chunk)
    sequences = inputs["sequence_spans"].shape[0] if "sequence_spans" in inputs else inputs["input_ids"].shape[0]
    sums = torch.zeros(sequences, dtype=torch.float32, device=log_probs.device).index_add(0, owner, log_probs)
    counts = torch.zeros(sequences, dtype=torch.long, device=owner.device).index_add(0, owner, torch.ones_like(owner))
    return sums, counts


def token_budget_batches(lengths: Sequence[int], max_tokens: int, order: Sequence[int]) -> list[list[int]]:
    """Samples in `order`, cut into consecutive rows of at most `max_tokens` tokens (next-fit).

    Order is kept (no sorting by length), so a row holds a random mix of lengths like a
    sample-count micro-batch. A sample longer than the budget is a row of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = int(lengths[i])
        if current and used + n > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        batches.append(current)
    return batches


class TokenBudgetBatchSampler(BatchRebalanceSampler):
    """Micro-batches of up to `max_tokens` tokens, for `PackedCollator` rows.

    The rows are cut once from a seeded shuffle and their order is reshuffled every epoch
    (what TRL's and LLaMA-Factory's packed datasets do), so every epoch has the same number of
    steps, which Trainer fixes up front. Every process cuts the same rows and takes every
    `world`-th one (the list is padded by repeating its first rows, as DistributedSampler pads).
    A `BatchRebalanceSampler` subclass because Trainer hands exactly those to the DataLoader as a
    `batch_sampler` and leaves their per-process split to them."""

    def __init__(
        self, lengths: Sequence[int], max_tokens: int, seed: int = 42, shuffle: bool = True, rank: int = 0, world: int = 1
    ) -> None:
        # BatchRebalanceSampler.__init__ is not called: its sample-count arithmetic does not apply.
        self.seed, self.shuffle, self.rank, self.world, self.epoch = seed, shuffle, rank, world, 0
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else range(len(lengths))
        self.batches = token_budget_batches(lengths, max_tokens, order)
        padded = -(-len(self.batches) // world) * world
        self.batches += self.batches[: padded - len(self.batches)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
            order = torch.randperm(len(self.batches), generator=generator).tolist()
        else:
            order = list(range(len(self.batches)))
        return iter([self.batches[i] for i in order[self.rank :: self.world]])

    def __len__(self) -> int:
        return len(self.batches) // self.world


def dataset_lengths(dataset: Any) -> list[int]:
    """Tokens per sample (all its sequences): the store's lengths where it has them, else counted."""
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None:
        return [int(n) for n in lengths]
    return [sum(len(f["input_ids"]) for f in sequences_of([dataset[i]])) for i in range(len(dataset))]


class LengthSamplingMixin:
    """Trainer mixin for any stage: samplers that take each sample's tokens from the dataset's
    `lengths` (a group of sequences counts all of them, data/store.py `SequenceGroups`):
    `--packing_max_tokens N` rows of up to N tokens (`TokenBudgetBatchSampler`), and
    `--group_by_length` batches (Trainer's own sampler, which would measure a group by its
    number of sequences). Trainer has no public hook for its sampler: this overrides `_get_train_sampler`."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        args = self.args  # type: ignore[attr-defined]
        max_tokens = getattr(args, "packing_max_tokens", 0)
        dataset = train_dataset if train_dataset is not None else self.train_dataset  # type: ignore[attr-defined]
        if dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)  # type: ignore[misc]
        if max_tokens:
            return TokenBudgetBatchSampler(
                dataset_lengths(dataset),
                max_tokens,
                seed=args.data_seed if args.data_seed is not None else args.seed,
                shuffle=args.train_sampling_strategy != "sequential",
                rank=args.process_index,
                world=max(1, args.world_size),
            )
        if args.train_sampling_strategy == "group_by_length":
            return LengthGroupedSampler(args.train_batch_size * args.gradient_accumulation_steps, lengths=dataset_lengths(dataset))
        return super()._get_train_sampler(train_dataset)  # type: ignore[misc]


class PackedTrainer(PackedLossMixin, LengthSamplingMixin, AtomicCheckpointMixin, Trainer):
    """The SFT / pretraining Trainer for packed rows (`data.collate.PackedCollator`): the packed
    loss, rows by token budget with `--packing_max_tokens`, checkpoints saved atomically
    (train/checkpointing.py). It changes nothing in the model: the recipe switches an sdpa
    model to `packed_sdpa_attention` (`use_packed_attention`, via train/model.py
    `apply_training_speedups`)."""


def sequence_collator(packing: bool, tokenizer: Any) -> PackedCollator | PaddingCollator:
    """Packed rows (`--packing true`) or padded batches, for any stage whose samples are
    sequences or groups of them (data/collate.py)."""
    return PackedCollator() if packing else PaddingCollator(tokenizer.pad_token_id)


def packed_or_padded(packing: bool, tokenizer: Any) -> tuple[Any, type[Trainer]]:
    """The SFT recipes' choice of collator and Trainer class: packed rows (`--packing true`: one row
    per micro-batch, attention within each sample) or padded batches with the stock Trainer (both
    with atomic checkpoints)."""
    return sequence_collator(packing, tokenizer), PackedTrainer if packing else CheckpointTrainer
