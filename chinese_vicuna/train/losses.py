"""Cross-entropy that never holds the `[tokens, vocab]` logits of a batch.

Causal-LM training spends much of its memory on logits: HF's loss upcasts `(tokens, vocab)` logits
to fp32, keeps a fp32 log-softmax for backward and builds fp32 gradients -- for a 128k vocabulary at
4×2048 tokens, 4 GB before the backward pass. Here the model runs with its `lm_head` set aside
(`lm_head_set_aside`: the forward returns the final hidden states at the trained positions), and
`lm_head_cross_entropy` takes them through `lm_head` in chunks of `chunk` rows: each chunk's logits,
fp32 log-softmax and gradient live only while that chunk is worked on. With a plain `nn.Linear`
head (LLaMA, Qwen, Mistral...) the gradients are computed in the same pass (as Liger's fused
linear cross-entropy does on CUDA): no logits are recomputed in backward, so it costs the matmuls
of the unchunked loss. Any other head (a LoRA on lm_head, a trained copy, a quantized one) runs
per chunk under activation checkpointing.

Only positions with a trainable target reach `lm_head` (`logits_to_keep`, see `train/packing.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from chinese_vicuna.data.encode import IGNORE_INDEX

DEFAULT_CHUNK = 1024


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """Sum over rows of `-log_softmax(logits)[target]`, computed in fp32 chunks.

    Forward keeps only the logits (which exist anyway); backward recomputes the softmax chunk
    by chunk. The fused `log_softmax`/`softmax` kernels are faster on the CPU (docs/benchmarks.md) than
    `logsumexp` plus separate subtract/exp passes.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:  # type: ignore[override]
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            log_probs = torch.log_softmax(logits[start : start + chunk].float(), dim=-1)
            total -= log_probs.gather(1, targets[start : start + chunk].unsqueeze(1)).sum()
        ctx.save_for_backward(logits, targets)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        g = grad_total.float()
        for start in range(0, logits.shape[0], ctx.chunk):
            p = torch.softmax(logits[start : start + ctx.chunk].float(), dim=-1)
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, targets[start : start + ctx.chunk]] -= 1.0
            grad[start : start + ctx.chunk] = p.mul_(g)
        return grad, None, None


def _trainable_rows(rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` flattened to (positions, features) and `targets` to (positions,), without the -100 ones."""
    rows, targets = rows.reshape(-1, rows.shape[-1]), targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    return (rows, targets) if bool(keep.all()) else (rows[keep], targets[keep])


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Summed token cross-entropy of `logits` (rows, vocab) against `targets` (rows,).

    Rows whose target is -100 are skipped. Returns a fp32 scalar *sum*; divide by the number
    of trainable tokens (Trainer's `num_items_in_batch`) for the per-token mean.
    """
    logits, targets = _trainable_rows(logits, targets)
    if targets.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph connected (no trainable token)
    return _ChunkedCrossEntropySum.apply(logits, targets, chunk)


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of one chunk of rows in fp32, and (when wanted) its gradient
    softmax - one_hot in fp32."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    total = -log_probs.gather(1, targets.unsqueeze(1)).sum()
    if not want_grad:
        return total, None
    grad = log_probs.exp_()
    grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
    return total, grad


class _LinearCrossEntropySum(torch.autograd.Function):
    """Sum over rows of `-log_softmax(hidden @ weight.T)[target]`, chunk by chunk; the gradients of
    `hidden` (and of `weight` where it trains) are built in the same pass and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, want_grad: bool) -> torch.Tensor:  # type: ignore[override]
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)  # chunk sums add up without rounding drift
        grad_hidden = torch.empty_like(hidden) if want_grad and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad and ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk):
            rows = hidden[start : start + chunk]
            if rows.dtype != weight.dtype and not torch.is_autocast_enabled(rows.device.type):
                rows = rows.to(weight.dtype)  # e.g. fp32 outputs of a bf16 model
            logits = torch.nn.functional.linear(rows, weight)  # under autocast: its dtype, as lm_head would
            part, grad = _chunk_loss_and_grad(logits, targets[start : start + chunk], want_grad)
            total += part
            if grad is None:
                continue
            grad = grad.to(logits.dtype)  # what autograd hands the unchunked lm_head
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (grad @ weight.to(grad.dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad.T @ rows.to(grad.dtype)).float()
            del grad, logits
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight) if t is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return total.float()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        grad_hidden = (saved.pop(0) * grad_total).to(ctx.hidden_dtype) if ctx.has[0] else None
        grad_weight = (saved.pop(0) * grad_total).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None, None


def _is_plain_linear(module: Any) -> bool:
    return type(module) is torch.nn.Linear and module.bias is None


def liger_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy of `hidden @ weight.T` by Liger's fused linear cross-entropy
    (liger-kernel's public `LigerFusedLinearCrossEntropyLoss`; Triton, CUDA only)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(weight.dtype)
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(weight, hidden, targets)
    return loss.float()


def lm_head_cross_entropy(
    hidden: torch.Tensor, lm_head: Any, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK, kernel: str = "chunked"
) -> torch.Tensor:
    """Summed token cross-entropy of `lm_head(hidden)` (rows, hidden) against `targets` (rows,),
    never more than `chunk` rows of logits at a time (module docstring); with `kernel` "liger"
    (`--loss_kernel`, decided by `devices.decide_loss_kernel`) a plain head on CUDA goes through
    Liger's fused kernel instead. Rows whose target is -100 are skipped. Returns a fp32 scalar
    *sum*; divide by the count of trainable tokens."""
    hidden, targets = _trainable_rows(hidden, targets)
    if targets.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph connected (no trainable token)
    chunk = chunk if chunk > 0 else hidden.shape[0]
    if kernel == "liger" and _is_plain_linear(lm_head) and hidden.is_cuda:
        return liger_cross_entropy(hidden, lm_head.weight, targets)
    if _is_plain_linear(lm_head):
        want_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head.weight.requires_grad)
        return _LinearCrossEntropySum.apply(hidden, lm_head.weight, targets, chunk, want_grad)
    from torch.utils.checkpoint import checkpoint

    def part(rows: torch.Tensor, rows_targets: torch.Tensor) -> torch.Tensor:
        return _chunk_loss_and_grad(lm_head(rows), rows_targets, False)[0]

    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        rows, rows_targets = hidden[start : start + chunk], targets[start : start + chunk]
        loss = checkpoint(part, rows, rows_targets, use_reentrant=False) if torch.is_grad_enabled() else part(rows, rows_targets)
        total = total + loss.double()
    return total.float()


# Heads whose logits the model changes after lm_head (Gemma 2's soft-capping, Cohere's scale): their
# loss needs the model's own logits.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _causal_lm(model: Any) -> Any:
    """The transformers model under PEFT / DDP / compile wrappers."""
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


@contextlib.contextmanager
def lm_head_set_aside(model: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    """During one forward, `lm_head` passes its input through: the model's `logits` are the final
    hidden states at the kept positions. Yields the head (None where the model's logits are more
    than `lm_head(hidden)`: then nothing is changed) and the autocast state lm_head would have run
    under (Accelerate's mixed precision wraps only the model's forward in autocast)."""
    base = _causal_lm(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    state: dict[str, Any] = {}
    # DeepSpeed ZeRO-3 gathers a partitioned weight (`ds_id`) only inside its module's own forward.
    partitioned = head is not None and hasattr(getattr(head, "weight", None), "ds_id")
    if head is None or partitioned or any(getattr(base.config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING):
        yield None, state
        return

    def passthrough(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        device = hidden.device.type
        state.update(device=device, enabled=torch.is_autocast_enabled(device), dtype=torch.get_autocast_dtype(device))
        return hidden

    head.forward = passthrough
    try:
        yield head, state
    finally:
        del head.forward


def _through_lm_head(
    model: Any, forward: Callable[[], Any], chunk: int, head_fn: Callable[[torch.Tensor, Any], torch.Tensor]
) -> tuple[torch.Tensor | None, Any]:
    """(`head_fn(hidden, lm_head)`, outputs) of `forward()` run with lm_head set aside (chunk > 0), or
    (None, outputs) with the model's own logits where it stands (chunk 0, or a head it cannot set aside)."""
    if chunk <= 0:
        return None, forward()
    with lm_head_set_aside(model) as (head, state):
        outputs = forward()
    if head is None:
        return None, outputs
    hidden = outputs.logits
    outputs.logits = None  # never read: evaluation asks for the loss only
    # lm_head's matmuls in the precision the forward gave it (bf16 under mixed precision)
    autocast = torch.autocast(state["device"], dtype=state["dtype"]) if state.get("enabled") else contextlib.nullcontext()
    with autocast:
        return head_fn(hidden, head), outputs


def causal_lm_loss(
    model: Any, forward: Callable[[], Any], targets: torch.Tensor, chunk: int, kernel: str = "chunked"
) -> tuple[torch.Tensor, Any]:
    """(summed fp32 loss over `targets`, outputs) of `forward()`, one call of `model` whose
    `logits_to_keep` selects exactly the positions of `targets` (the trainable ones, in order).
    `chunk` rows of logits at a time (or Liger's kernel: `kernel`, see `lm_head_cross_entropy`);
    chunk 0: the model's own logits of the kept positions, with `chunked_cross_entropy` (the form
    before `lm_head_cross_entropy`)."""
    total, outputs = _through_lm_head(
        model, forward, chunk, lambda hidden, head: lm_head_cross_entropy(hidden, head, targets, chunk, kernel)
    )
    if total is not None:
        return total, outputs
    logits = outputs.logits
    return chunked_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets), outputs


def token_mean(total: torch.Tensor, num_items_in_batch: Any, count: int) -> torch.Tensor:
    """`total / num_items_in_batch` when the Trainer gives the count of the whole accumulated batch
    (as HF's ForCausalLMLoss does), else the mean over this batch's `count` tokens."""
    denominator = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


def loss_for_trainer(trainer: Any, loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    """A `token_mean` as Trainer's compute_loss returns it: divided by the accumulated batch's token
    count, so Trainer must not divide by the accumulation steps again."""
    trainer.loss_is_scaled_for_ga = num_items_in_batch is not None
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        # num_items_in_batch is the count over all processes; DDP averages gradients.
        loss = loss * trainer.accelerator.num_processes
    return loss


class ChunkedLossMixin:
    """Trainer mixin: padded causal-LM batches (`labels`) take their loss through `causal_lm_loss`,
    only at trained positions, `--loss_chunk_size` rows of logits at a time."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        chunk = getattr(self.args, "loss_chunk_size", DEFAULT_CHUNK)  # type: ignore[attr-defined]
        labels = inputs.get("labels")
        if not chunk or labels is None or "shift_labels" in inputs or getattr(self, "label_smoother", None) is not None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)  # type: ignore[misc]
        trained = labels[:, 1:] != IGNORE_INDEX
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = trained  # position t predicts label t + 1
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        kernel = getattr(self.args, "loss_kernel", "chunked")  # type: ignore[attr-defined]
        total, outputs = causal_lm_loss(model, lambda: model(**forward, logits_to_keep=keep), labels[:, 1:][trained], chunk, kernel)
        loss = loss_for_trainer(self, token_mean(total, num_items_in_batch, int(trained.sum())), num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


# ---------------------------------------------------------------- per-token log-probabilities
# Stages whose loss is not a token mean (preference pairs, GRPO's per-token ratios) need each
# trained token's log-probability with its gradient: the same chunks through lm_head.


class _LinearTokenLogProbs(torch.autograd.Function):
    """`log_softmax(hidden @ weight.T)[row, target]` of every row, `chunk` rows of logits at a time.

    d logp / d logits = one_hot - softmax, so d/d hidden of each row is `(one_hot - p) @ weight`,
    built in the forward pass (no logits kept) and scaled by the row's incoming gradient in
    backward. A trained `weight` needs those rows scaled before the product: its gradient
    recomputes the chunk's logits in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, want_grad: bool) -> torch.Tensor:  # type: ignore[override]
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad and ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            rows = _rows_for(hidden[start : start + chunk], weight)
            logits = torch.nn.functional.linear(rows, weight)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            rows_targets = targets[start : start + chunk]
            out[start : start + chunk] = log_probs.gather(1, rows_targets.unsqueeze(1)).squeeze(1)
            if grad_hidden is not None:
                grad = log_probs.exp_().neg_()
                grad[torch.arange(grad.shape[0], device=grad.device), rows_targets] += 1.0
                grad = grad.to(logits.dtype)  # what autograd hands the unchunked lm_head
                grad_hidden[start : start + chunk] = (grad @ weight.to(grad.dtype)).to(hidden.dtype)
            del logits, log_probs
        weight_trains = want_grad and ctx.needs_input_grad[1]
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else None, hidden if weight_trains else None, weight, targets)
        ctx.chunk, ctx.weight_trains, ctx.weight_dtype = chunk, weight_trains, weight.dtype
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_hidden_rows, hidden, weight, targets = ctx.saved_tensors
        g = grad_out.float().unsqueeze(1)
        grad_hidden = (grad_hidden_rows * g).to(grad_hidden_rows.dtype) if grad_hidden_rows is not None else None
        grad_weight = None
        if ctx.weight_trains:
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
            enabled, dtype = ctx.autocast
            autocast = torch.autocast(hidden.device.type, dtype=dtype) if enabled else contextlib.nullcontext()
            for start in range(0, hidden.shape[0], ctx.chunk):
                with autocast:
                    rows = _rows_for(hidden[start : start + ctx.chunk], weight)
                    logits = torch.nn.functional.linear(rows, weight)
                grad = torch.softmax(logits.float(), dim=-1).neg_()
                grad[torch.arange(grad.shape[0], device=grad.device), targets[start : start + ctx.chunk]] += 1.0
                grad.mul_(g[start : start + ctx.chunk])
                grad_weight += grad.to(logits.dtype).T.float() @ rows.float()
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _rows_for(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`rows` in the weight's dtype unless autocast decides (e.g. fp32 outputs of a bf16 model)."""
    if rows.dtype != weight.dtype and not torch.is_autocast_enabled(rows.device.type):
        return rows.to(weight.dtype)
    return rows


def lm_head_token_log_probs(hidden: torch.Tensor, lm_head: Any, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """fp32 log-probability of each target under `lm_head(hidden)`: hidden (rows, features) and
    targets (rows,), every target a token id (no -100); shape (rows,), differentiable. Never more
    than `chunk` rows of logits at a time; any head other than a plain `nn.Linear` runs per chunk
    under activation checkpointing."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if targets.numel() == 0:
        return hidden.sum(dim=-1) * 0.0  # keeps the graph connected
    chunk = chunk if chunk > 0 else hidden.shape[0]
    if _is_plain_linear(lm_head):
        want_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head.weight.requires_grad)
        return _LinearTokenLogProbs.apply(hidden, lm_head.weight, targets, chunk, want_grad)
    from torch.utils.checkpoint import checkpoint

    def part(rows: torch.Tensor, rows_targets: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(lm_head(rows).float(), dim=-1).gather(1, rows_targets.unsqueeze(1)).squeeze(1)

    parts = []
    for start in range(0, hidden.shape[0], chunk):
        rows, rows_targets = hidden[start : start + chunk], targets[start : start + chunk]
        parts.append(checkpoint(part, rows, rows_targets, use_reentrant=False) if torch.is_grad_enabled() else part(rows, rows_targets))
    return torch.cat(parts)


def causal_lm_token_log_probs(
    model: Any, forward: Callable[[], Any], targets: torch.Tensor, chunk: int, temperature: float = 1.0
) -> tuple[torch.Tensor, Any]:
    """(fp32 log-probability of every one of `targets`, outputs) of `forward()`, one call of `model`
    whose `logits_to_keep` selects exactly the positions of `targets` (trained ones, in order):
    `causal_lm_loss`'s per-token form, for losses that weigh tokens or sequences apart (preference
    pairs, GRPO). `chunk` rows of logits at a time; chunk 0: the model's own logits of the kept
    positions. `temperature` divides the logits (for a bias-free head, as LLaMA's: the hidden rows)."""

    def through_head(hidden: torch.Tensor, head: Any) -> torch.Tensor:
        if temperature == 1.0:
            return lm_head_token_log_probs(hidden, head, targets, chunk)
        if getattr(head, "bias", None) is None:
            return lm_head_token_log_probs(hidden / temperature, head, targets, chunk)
        logits = head(hidden).float() / temperature  # a biased head: logits / T is not head(hidden / T)
        return -torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")

    log_probs, outputs = _through_lm_head(model, forward, chunk, through_head)
    if log_probs is not None:
        return log_probs, outputs
    logits = outputs.logits
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if temperature != 1.0:
        logits = logits / temperature
    return -torch.nn.functional.cross_entropy(logits, targets.reshape(-1), reduction="none"), outputs
