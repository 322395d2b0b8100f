"""Fast batched encoding of many texts, with the same ids as the tokenizer.

transformers 5 converts a LLaMA `tokenizer.model` into a `tokenizers` BPE whose Metaspace
pre-tokenizer does not split (`split=False`): a whole segment is one "word", and that BPE
is slow on long words, several times slower than sentencepiece itself (docs/benchmarks.md).
Where the tokenizer folder has the sentencepiece model it was converted from, and the two
give the same ids on a probe of the data, texts are encoded by sentencepiece itself
(sentencepiece is the reference those ids must agree with: docs/architecture.md, tokenization), on several threads.
Texts that contain an added/special token's text go through the HF tokenizer, which splits
those out; so does everything when the probe disagrees or there is no `tokenizer.model`.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


PROBE_EVERY = 256  # also compare one text in every PROBE_EVERY of each batch with the HF ids


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Ids of many texts in one batched call of the HF tokenizer (no special tokens added)."""
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
    """`encoder(texts) -> ids`, `encoder.map(batches)`; sentencepiece where it agrees with the HF tokenizer."""

    def __init__(self, tokenizer: Any, num_threads: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.sp = _sentencepiece_for(tokenizer)
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        # Text of every added token (<s>, </s>, chat markers...): HF splits these out, sentencepiece would not.
        added = sorted((t for t in tokenizer.get_added_vocab() if t), key=len, reverse=True)
        self.added_pattern = re.compile("|".join(map(re.escape, added))) if added else None
        self.verified = False

    @property
    def fast(self) -> bool:
        return self.sp is not None

    def _disable(self, text: str, want: list[int], got: list[int]) -> None:
        logger.warning(
            "sentencepiece and the HF tokenizer disagree on %r (%s vs %s); using the HF tokenizer (slower)", text[:60], want[:12], got[:12]
        )
        self.sp = None

    def _probe_first(self) -> int:
        """How many leading texts of a batch to compare with HF: 32 until a batch has agreed."""
        return 1 if self.verified else 32

    def _encode_sp(self, sp: Any, texts: Sequence[str], threads: int, probe_first: int) -> _SpResult:
        """The sentencepiece part of a batch, with the processor `sp` the caller chose for this batch.

        Safe on a worker thread: it reads no state that the main thread changes (a fallback
        clears `self.sp` while other batches are still being encoded)."""
        # Added tokens are split out by HF only; text that starts with whitespace is where the
        # converted HF tokenizer and sentencepiece are known to disagree: both go to HF.
        has_added = self.added_pattern.search if self.added_pattern is not None else lambda _: None
        plain = [i for i, t in enumerate(texts) if not t[:1].isspace() and not has_added(t)]
        # Probes as positions in `plain` (= in the sentencepiece output).
        probe = [*range(min(probe_first, len(plain))), *range(0, len(plain), PROBE_EVERY)]
        reference = dict(zip(probe, encode_texts(self.tokenizer, [texts[plain[k]] for k in probe]), strict=True))
        return plain, sp.encode([texts[i] for i in plain], num_threads=threads), reference

    def _finish(self, texts: Sequence[str], sp_result: _SpResult | None) -> list[list[int]]:
        """Check the probes, fill in the texts that HF encodes; HF for all after a disagreement
        (also for batches that were already encoded by sentencepiece when it happened)."""
        if self.sp is None or sp_result is None:
            return encode_texts(self.tokenizer, texts)
        plain, ids, reference = sp_result
        for k, want in reference.items():
            if ids[k] != want:
                self._disable(texts[plain[k]], want, ids[k])
                return encode_texts(self.tokenizer, texts)
        self.verified = True
        if len(plain) == len(texts):  # the usual case: every text went to sentencepiece
            return ids
        out: list[list[int] | None] = [None] * len(texts)
        for i, seq in zip(plain, ids, strict=True):
            out[i] = seq
        rest = [i for i in range(len(texts)) if out[i] is None]
        for i, seq in zip(rest, encode_texts(self.tokenizer, [texts[i] for i in rest]), strict=True):
            out[i] = seq
        return out  # type: ignore[return-value]

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        sp = self.sp
        if sp is None or not texts:
            return encode_texts(self.tokenizer, texts)
        return self._finish(texts, self._encode_sp(sp, texts, self.num_threads, self._probe_first()))

    def map(self, batches: Iterable[Sequence[str]]) -> Iterator[list[list[int]]]:
        """The ids of each batch, in order. With sentencepiece, up to `num_threads` batches are
        encoded at once on worker threads (one sentencepiece thread each; it releases the GIL)
        while the caller renders the next batches and assembles earlier ones (faster than one batch
        at a time: docs/benchmarks.md, tokenization)."""
        if self.sp is None:
            yield from (encode_texts(self.tokenizer, texts) for texts in batches)
            return
        # `self.sp` and `self.verified` are read and changed on this thread only: each batch is
        # handed the processor chosen when it is submitted (None after a fallback: no worker).
        in_flight: collections.deque[tuple[Sequence[str], Future | None]] = collections.deque()
        with ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix="tokenize") as pool:
            for texts in batches:
                sp = self.sp
                future = pool.submit(self._encode_sp, sp, texts, 1, self._probe_first()) if sp is not None else None
                in_flight.append((texts, future))
                if len(in_flight) > self.num_threads:
                    texts_done, future_done = in_flight.popleft()
                    yield self._finish(texts_done, future_done.result() if future_done else None)
            while in_flight:
                texts_done, future_done = in_flight.popleft()
                yield self._finish(texts_done, future_done.result() if future_done else None)


_SpResult = tuple[list[int], list[list[int]], dict[int, list[int]]]
