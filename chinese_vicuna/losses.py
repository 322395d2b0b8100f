"""Cross-entropy that never holds the full fp32 logits of a batch.

Causal-LM training with a 32000-token vocabulary spends much of its memory on logits:
HF's loss upcasts `(tokens, vocab)` bf16 logits to fp32, keeps a fp32 log-softmax for
backward and builds fp32 gradients. `chunked_cross_entropy` works through the rows in
chunks: forward keeps only the (already existing) logits and one fp32 log-sum-exp per row;
backward rebuilds softmax − one-hot chunk by chunk, in the logits' dtype.

Combined with `logits_to_keep` (only the positions that have a trainable target go
through `lm_head`, see `chinese_vicuna.packing`) the logits shrink to trainable tokens only.
Liger's fused linear cross-entropy is Triton (CUDA only); this one runs everywhere.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """Sum over rows of `logsumexp(logits) - logits[target]`, computed in fp32 chunks."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:  # type: ignore[override]
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            x = logits[start : start + chunk].float()
            t = targets[start : start + chunk]
            lse_c = torch.logsumexp(x, dim=-1)
            lse[start : start + chunk] = lse_c
            total += (lse_c - x.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        g = grad_total.float()
        for start in range(0, logits.shape[0], ctx.chunk):
            x = logits[start : start + ctx.chunk].float()
            p = (x - lse[start : start + ctx.chunk].unsqueeze(1)).exp_()
            rows = torch.arange(x.shape[0], device=x.device)
            p[rows, targets[start : start + ctx.chunk]] -= 1.0
            grad[start : start + ctx.chunk] = (p * g).to(grad.dtype)
        return grad, None, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Summed token cross-entropy of `logits` (rows, vocab) against `targets` (rows,).

    Rows whose target is -100 are skipped. Returns a fp32 scalar *sum*; divide by the number
    of trainable tokens (Trainer's `num_items_in_batch`) for the per-token mean.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):
        logits, targets = logits[keep], targets[keep]
    if targets.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph connected (no trainable token)
    return _ChunkedCrossEntropySum.apply(logits, targets, chunk)
