"""Cross-entropy that never holds the full fp32 logits of a batch.

Causal-LM training with a 32000-token vocabulary spends much of its memory on logits:
HF's loss upcasts `(tokens, vocab)` bf16 logits to fp32, keeps a fp32 log-softmax for
backward and builds fp32 gradients. `chunked_cross_entropy` works through the rows in
chunks: forward keeps only the (already existing) logits; backward rebuilds softmax − one-hot
chunk by chunk in fp32 and writes the gradient in the logits' dtype.

Combined with `logits_to_keep` (only the positions that have a trainable target go
through `lm_head`, see `chinese_vicuna.train.packing`) the logits shrink to trainable tokens only.
Liger's fused linear cross-entropy is Triton (CUDA only); this one runs everywhere.
"""

from __future__ import annotations

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
