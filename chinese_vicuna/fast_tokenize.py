"""Fast batched encoding of many texts, with the same ids as the tokenizer.

transformers 5 converts a LLaMA `tokenizer.model` into a `tokenizers` BPE whose Metaspace
pre-tokenizer does not split (`split=False`): a whole segment is one "word", and that BPE
is slow on long words (~400 µs for a 150-character prompt here; sentencepiece ~45 µs).
Where the tokenizer folder has the sentencepiece model it was converted from, and the two
give the same ids on a probe of the data, texts are encoded by sentencepiece itself
(design.md: sentencepiece is the reference those ids must agree with), on several threads.
Texts that contain an added/special token's text go through the HF tokenizer, which splits
those out; so does everything when the probe disagrees or there is no `tokenizer.model`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROBE_EVERY = 64  # also compare one text in every PROBE_EVERY of each batch with the HF ids


def hf_encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _sentencepiece_for(tokenizer: Any) -> Any:
    """The sentencepiece processor the tokenizer was built from, or None."""
    if type(tokenizer).__name__ not in ("LlamaTokenizer", "LlamaTokenizerFast"):
        return None
    path = getattr(tokenizer, "vocab_file", None) or str(Path(getattr(tokenizer, "name_or_path", "")) / "tokenizer.model")
    if not path or not Path(path).is_file():
        return None
    try:
        import sentencepiece as spm
    except ImportError:
        return None
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.get_piece_size() > len(tokenizer):
        return None
    return sp


class BatchEncoder:
    """`encoder(texts) -> ids`; sentencepiece where it agrees with the HF tokenizer."""

    def __init__(self, tokenizer: Any, num_threads: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.sp = _sentencepiece_for(tokenizer)
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        # Text of every added token (<s>, </s>, chat markers...): HF splits these out, sentencepiece would not.
        self.added = [t for t in tokenizer.get_added_vocab() if t]
        self.verified = False

    @property
    def fast(self) -> bool:
        return self.sp is not None

    def _disable(self, text: str, want: list[int], got: list[int]) -> None:
        logger.warning(
            "sentencepiece and the HF tokenizer disagree on %r (%s vs %s); using the HF tokenizer (slower)", text[:60], want[:12], got[:12]
        )
        self.sp = None

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        if self.sp is None or not texts:
            return hf_encode(self.tokenizer, texts)
        # Added tokens are split out by HF only; text that starts with whitespace is where the
        # converted HF tokenizer and sentencepiece are known to disagree: both go to HF.
        plain = [i for i, t in enumerate(texts) if not t[:1].isspace() and not any(a in t for a in self.added)]
        probe = plain[: 32 if not self.verified else 1] + plain[::PROBE_EVERY]
        reference = dict(zip(probe, hf_encode(self.tokenizer, [texts[i] for i in probe]), strict=True))
        ids = self.sp.encode([texts[i] for i in plain], num_threads=self.num_threads)
        out: list[list[int] | None] = [None] * len(texts)
        for i, seq in zip(plain, ids, strict=True):
            out[i] = seq
        for i, want in reference.items():
            if out[i] != want:
                self._disable(texts[i], want, out[i] or [])
                return hf_encode(self.tokenizer, texts)
        self.verified = True
        rest = [i for i in range(len(texts)) if out[i] is None]
        for i, seq in zip(rest, hf_encode(self.tokenizer, [texts[i] for i in rest]), strict=True):
            out[i] = seq
        return out  # type: ignore[return-value]


def batch_encoder(tokenizer: Any) -> Callable[[Sequence[str]], list[list[int]]]:
    """A reusable encoder for `tokenizer` (checks sentencepiece agreement as it goes)."""
    return BatchEncoder(tokenizer)
