"""Fast batched encoding of many texts, with the same ids as the tokenizer.

Two kinds of text (docs/design.md, Tokenization rules): the first segment of a sample is
encoded as the tokenizer encodes a whole string (with sentencepiece's dummy-prefix `▁`);
every later segment is encoded as a *continuation* of the text before it, with no dummy
prefix. A continuation is encoded by tokenizing a fixed probe text followed by the segment
and removing the probe's ids; that is only accepted when the probe's ids come out unchanged,
i.e. no token spans the probe/segment boundary, in which case (BPE merges only ever grow)
the segment's ids are exactly what the tokenizer gives that text inside a longer string.

transformers 5 converts a LLaMA `tokenizer.model` into a `tokenizers` BPE whose Metaspace
pre-tokenizer does not split (`split=False`): a whole segment is one "word", and that BPE
is slow on long words, several times slower than sentencepiece itself (docs/benchmarks.md).
Where the tokenizer folder has the sentencepiece model it was converted from, and the two
give the same ids on a probe of the data, texts are encoded by sentencepiece itself
(sentencepiece is the reference those ids must agree with: docs/architecture.md, tokenization), on several threads.
Texts that contain an added/special token's text go through the HF tokenizer, which splits
those out; so does everything when the probe disagrees or there is no `tokenizer.model`.

A segment that follows a special token (vicuna_v1.1's `</s>USER:`) continues the text only
where the tokenizer continues it there: a transformers 5 LLaMA tokenizer with `"legacy": true`
(and llama.cpp, and the hub's `tokenizer.json` pipeline) begins the text after every special
token as a new text, with the dummy prefix `▁`; the default one (`legacy` false or unset)
continues it (`restarts_after_special`).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


PROBE_EVERY = 256  # also compare one text in every PROBE_EVERY of each batch with the HF ids
# Texts put before a continuation, tried in order until the probe's ids survive intact: a
# newline (a byte token in LLaMA vocabularies, merged with nothing), then texts that cannot
# merge with what a newline can (BPE vocabularies such as Llama-3's have "\n\n" tokens).
CONTINUATION_PROBES = ("\n", "a", "。", "0")


def encode_texts(tokenizer: Any, texts: Sequence[str], split_special_tokens: bool = False) -> list[list[int]]:
    """Ids of many texts in one batched call of the HF tokenizer (no special tokens added);
    `split_special_tokens`: special-token text ("<s>") is encoded as the characters it is."""
    if not texts:
        return []
    if split_special_tokens:
        return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


# Literal special-token text in user data (HTML strikethrough "<s>", "</s>" in code) must stay
# text, while the template's own "{eos}" / "<|im_end|>" are the special ids. User strings are
# marked before rendering (`LiteralSpecials.protect`: each special token's text → ESCAPE + a
# code character, a native ESCAPE → ESCAPE ESCAPE) and `encode_segment_texts` encodes a marked
# text as HF would with the template's special tokens split out and the user's kept as text.
# Text without a marker (almost all) takes the usual path unchanged.
ESCAPE = "\U000f0000"  # Supplementary Private Use Area-A: no meaning in any data
_ESCAPED = re.compile(ESCAPE + "(.)", re.S)


class LiteralSpecials:
    """Marks the special-token text in user strings for one tokenizer (`literal_specials(tokenizer)`)."""

    def __init__(self, tokenizer: Any) -> None:
        decoder = getattr(tokenizer, "added_tokens_decoder", None)
        if decoder is not None:  # HF: special added tokens are kept as text; every added one is split out of the template's
            specials = {t.content for t in decoder.values() if getattr(t, "special", False) and t.content}
            self.added_ids: dict[str, int] = {t: i for t, i in tokenizer.get_added_vocab().items() if t}
        else:  # infer/llamacpp.LlamaCppTokenizer: its BOS and EOS text
            self.added_ids = dict(getattr(tokenizer, "special_ids", {}))
            specials = set(self.added_ids)
        ordered = sorted(specials, key=len, reverse=True)  # "</s>" before "<s>" where one contains another
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self.code = {t: ESCAPE + chr(0xF0001 + i) for i, t in enumerate(ordered)}
        self.text = {code[1]: t for t, code in self.code.items()} | {ESCAPE: ESCAPE}
        added = sorted(self.added_ids, key=len, reverse=True)
        self.added = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        self.ends_with_added = re.compile("(?:" + "|".join(map(re.escape, added)) + r")\Z") if added else None
        self.restarts: bool | None = None  # restarts_after_special(tokenizer), probed on first use

    def protect(self, text: str) -> str:
        """`text` with its special-token strings marked as literal text."""
        if ESCAPE in text:
            text = text.replace(ESCAPE, ESCAPE + ESCAPE)
        if self.pattern is None or not self.pattern.search(text):
            return text
        return self.pattern.sub(lambda m: self.code[m.group()], text)

    def restore(self, text: str) -> str:
        return _ESCAPED.sub(lambda m: self.text.get(m.group(1), m.group()), text)

    def encode(self, tokenizer: Any, text: str, start: bool) -> list[int]:
        """Ids of a marked text: split at the (template's) added tokens as HF does, the pieces
        between encoded with special-token text kept as text; as HF, a piece after a special
        token continues the text, or begins one where the tokenizer restarts there."""
        parts = self.added.split(text) if self.added is not None else [text]
        ids: list[int] = []
        for j, part in enumerate(parts):
            if j % 2:
                ids.append(self.added_ids[part])
            elif part and (start if j == 0 else restarts_after_special(tokenizer)):
                ids.extend(encode_texts(tokenizer, [self.restore(part)], split_special_tokens=True)[0])
            elif part:
                ids.extend(encode_continuations(tokenizer, [self.restore(part)], split_special_tokens=True)[0])
        return ids


_LITERALS: weakref.WeakKeyDictionary[Any, LiteralSpecials] = weakref.WeakKeyDictionary()


def literal_specials(tokenizer: Any) -> LiteralSpecials:
    """The tokenizer's `LiteralSpecials` (built once per tokenizer)."""
    found = _LITERALS.get(tokenizer)
    if found is None:
        found = _LITERALS[tokenizer] = LiteralSpecials(tokenizer)
    return found


def protect_messages(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Messages whose contents keep special-token text as text when rendered and encoded."""
    literals = literal_specials(tokenizer)
    return [{**m, "content": literals.protect(m["content"])} if isinstance(m.get("content"), str) else dict(m) for m in messages]


def strip_probe(ids: list[int], probe_ids: list[int]) -> list[int] | None:
    """`ids` without the leading `probe_ids`, or None when the probe did not survive intact."""
    n = len(probe_ids)
    return ids[n:] if ids[:n] == probe_ids else None


def encode_continuations(tokenizer: Any, texts: Sequence[str], split_special_tokens: bool = False) -> list[list[int]]:
    """Ids of texts that continue earlier text (no dummy-prefix `▁`), HF tokenizer, batched.

    Works with anything that has the HF `tokenizer(texts, add_special_tokens=False)` call
    (the llama.cpp adapter too).
    """
    out: list[list[int] | None] = [None] * len(texts)
    todo = list(range(len(texts)))
    for probe in CONTINUATION_PROBES:
        if not todo:
            break
        probe_ids = encode_texts(tokenizer, [probe])[0]
        encoded = encode_texts(tokenizer, [probe + texts[i] for i in todo], split_special_tokens)
        for i, ids in zip(todo, encoded, strict=True):
            out[i] = strip_probe(ids, probe_ids)
        todo = [i for i in todo if out[i] is None]
    if todo:
        # No probe stayed intact (a tokenizer that merges across all of them): the text's own
        # ids are the closest there is; say so rather than fail a whole dataset.
        logger.warning(
            "%d segment(s) could not be encoded as continuations, e.g. %r; encoded as whole texts", len(todo), texts[todo[0]][:60]
        )
        for i, ids in zip(todo, encode_texts(tokenizer, [texts[i] for i in todo], split_special_tokens), strict=True):
            out[i] = ids
    return out  # type: ignore[return-value]


def restarts_after_special(tokenizer: Any) -> bool:
    """Whether `tokenizer` encodes the text after a special token as a text of its own (the
    dummy prefix `▁` again: transformers 5 LLaMA with `"legacy": true`, whose pre-tokenizer is
    Metaspace `prepend_scheme="always"`) where a continuation would differ (probed once)."""
    literals = literal_specials(tokenizer)
    if literals.restarts is None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
        eos = getattr(tokenizer, "eos_token", None) or next((t for t, i in literals.added_ids.items() if i == eos_id), None)
        literals.restarts = False
        if eos and eos_id is not None and literals.added is not None and literals.added.fullmatch(eos):
            probe = "Below 你好"
            after, whole = encode_texts(tokenizer, [eos + probe, probe])
            literals.restarts = after == [eos_id, *whole] and whole != encode_continuations(tokenizer, [probe])[0]
    return literals.restarts


# GGUF keys (export/gguf.py writes them, infer/llamacpp.LlamaCppTokenizer reads them): how the
# HF tokenizer the file was converted from begins text, which llama.cpp's tokenizer cannot know.
GGUF_RESTARTS_KEY = "chinese_vicuna.restarts_after_special"
GGUF_FOLDS_SPACE_KEY = "chinese_vicuna.leading_space_in_prefix"


def folds_leading_space(tokenizer: Any) -> bool:
    """Whether a leading space becomes the dummy prefix itself (" Below" and "Below" give the
    same ids: transformers 5 LLaMA's Metaspace) rather than a `▁` beside it (sentencepiece,
    llama.cpp)."""
    return bool(getattr(tokenizer, "bos_token_id", None) is not None and encode_texts(tokenizer, ["Below"]) == encode_texts(tokenizer, [" Below"]))


def segment_starts(tokenizer: Any, texts: Sequence[str], starts: Sequence[bool]) -> list[bool]:
    """`starts`, plus the segments a restarting tokenizer begins anew: those right after a
    segment of the same sample that ends with an added token (`restarts_after_special`)."""
    starts = list(starts)
    literals = literal_specials(tokenizer)
    if literals.ends_with_added is None or all(starts) or not restarts_after_special(tokenizer):
        return starts
    return [s or bool(literals.ends_with_added.search(texts[i - 1])) for i, s in enumerate(starts)]


def encode_segment_texts(tokenizer: Any, texts: Sequence[str], starts: Sequence[bool] | None = None) -> list[list[int]]:
    """Ids of segment texts: `starts[i]` marks a text that begins a sample (encoded whole, as
    `tokenizer(text)` does), the others are continuations (`encode_continuations`), or whole
    texts after a special token where the tokenizer restarts there (`segment_starts`). Texts
    with literal special-token text marked (`LiteralSpecials.protect`) keep it as text."""
    starts = [True] * len(texts) if starts is None else starts
    return _encode_segment_texts(tokenizer, texts, segment_starts(tokenizer, texts, starts))


def _encode_segment_texts(tokenizer: Any, texts: Sequence[str], starts: Sequence[bool]) -> list[list[int]]:
    """`encode_segment_texts` with `starts` final (texts need not be neighbours here)."""
    marked = [i for i, t in enumerate(texts) if ESCAPE in t]
    if marked:
        literals = literal_specials(tokenizer)
        out: list[list[int] | None] = [None] * len(texts)
        for i in marked:
            out[i] = literals.encode(tokenizer, texts[i], starts[i])
        rest = [i for i in range(len(texts)) if out[i] is None]
        for i, ids in zip(rest, _encode_segment_texts(tokenizer, [texts[i] for i in rest], [starts[i] for i in rest]), strict=True):
            out[i] = ids
        return out  # type: ignore[return-value]
    if all(starts):
        return encode_texts(tokenizer, texts)
    out = [None] * len(texts)
    first = [i for i, s in enumerate(starts) if s]
    rest = [i for i, s in enumerate(starts) if not s]
    for i, ids in zip(first, encode_texts(tokenizer, [texts[i] for i in first]), strict=True):
        out[i] = ids
    for i, ids in zip(rest, encode_continuations(tokenizer, [texts[i] for i in rest]), strict=True):
        out[i] = ids
    return out  # type: ignore[return-value]


def sample_starts(segment_counts: Iterable[int]) -> list[bool]:
    """`starts` for samples of the given segment counts, flattened: True on each sample's first segment."""
    return [j == 0 for n in segment_counts for j in range(n)]


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
    """`encoder(texts, starts) -> ids`, `encoder.map(batches)`; sentencepiece where it agrees
    with the HF tokenizer, the same whole-text / continuation rule as `encode_segment_texts`."""

    def __init__(self, tokenizer: Any, num_threads: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.sp = _sentencepiece_for(tokenizer)
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        # Text of every added token (<s>, </s>, chat markers...): HF splits these out, sentencepiece would not.
        added = sorted((t for t in tokenizer.get_added_vocab() if t), key=len, reverse=True)
        self.added_pattern = re.compile("|".join(map(re.escape, added))) if added else None
        self.verified = False
        self.sp_probe_ids: list[int] = self.sp.encode(CONTINUATION_PROBES[0]) if self.sp is not None else []

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

    def _encode_sp(self, sp: Any, texts: Sequence[str], starts: Sequence[bool], threads: int, probe_first: int) -> _SpResult:
        """The sentencepiece part of a batch, with the processor `sp` the caller chose for this batch.

        Safe on a worker thread: it reads no state that the main thread changes (a fallback
        clears `self.sp` while other batches are still being encoded)."""
        # Added tokens are split out by HF only; a whole text that starts with whitespace is
        # where the converted HF tokenizer and sentencepiece are known to disagree (HF adds no
        # dummy prefix before a leading space): both go to HF. Continuations are encoded after
        # the probe, whose ids are removed (a text whose probe did not survive goes to HF).
        has_added = self.added_pattern.search if self.added_pattern is not None else lambda _: None
        candidates = [i for i, t in enumerate(texts) if not has_added(t) and ESCAPE not in t and not (starts[i] and t[:1].isspace())]
        probe = CONTINUATION_PROBES[0]
        raw = sp.encode([texts[i] if starts[i] else probe + texts[i] for i in candidates], num_threads=threads)
        plain: list[int] = []
        ids: list[list[int]] = []
        for i, seq in zip(candidates, raw, strict=True):
            if not starts[i]:
                seq = strip_probe(seq, self.sp_probe_ids)
                if seq is None:
                    continue
            plain.append(i)
            ids.append(seq)
        # Probes as positions in `plain` (= in `ids`).
        checks = [*range(min(probe_first, len(plain))), *range(0, len(plain), PROBE_EVERY)]
        want = _encode_segment_texts(self.tokenizer, [texts[plain[k]] for k in checks], [starts[plain[k]] for k in checks])
        return plain, ids, dict(zip(checks, want, strict=True))

    def _finish(self, texts: Sequence[str], starts: Sequence[bool], sp_result: _SpResult | None) -> list[list[int]]:
        """Check the probes, fill in the texts that HF encodes; HF for all after a disagreement
        (also for batches that were already encoded by sentencepiece when it happened)."""
        if self.sp is None or sp_result is None:
            return _encode_segment_texts(self.tokenizer, texts, starts)
        plain, ids, reference = sp_result
        for k, want in reference.items():
            if ids[k] != want:
                self._disable(texts[plain[k]], want, ids[k])
                return _encode_segment_texts(self.tokenizer, texts, starts)
        self.verified = True
        if len(plain) == len(texts):  # the usual case: every text went to sentencepiece
            return ids
        out: list[list[int] | None] = [None] * len(texts)
        for i, seq in zip(plain, ids, strict=True):
            out[i] = seq
        rest = [i for i in range(len(texts)) if out[i] is None]
        for i, seq in zip(rest, _encode_segment_texts(self.tokenizer, [texts[i] for i in rest], [starts[i] for i in rest]), strict=True):
            out[i] = seq
        return out  # type: ignore[return-value]

    def __call__(self, texts: Sequence[str], starts: Sequence[bool] | None = None) -> list[list[int]]:
        """Ids of `texts`; `starts` as in `encode_segment_texts` (None: all whole texts)."""
        starts = segment_starts(self.tokenizer, texts, [True] * len(texts) if starts is None else starts)
        sp = self.sp
        if sp is None or not texts:
            return _encode_segment_texts(self.tokenizer, texts, starts)
        return self._finish(texts, starts, self._encode_sp(sp, texts, starts, self.num_threads, self._probe_first()))

    def map(self, batches: Iterable[Sequence[str] | tuple[Sequence[str], Sequence[bool]]]) -> Iterator[list[list[int]]]:
        """The ids of each batch (texts, or (texts, starts)), in order. With sentencepiece, up to
        `num_threads` batches are encoded at once on worker threads (one sentencepiece thread
        each; it releases the GIL) while the caller renders the next batches and assembles
        earlier ones (measured gain: docs/benchmarks.md, tokenization)."""

        def split(batch: Sequence[str] | tuple[Sequence[str], Sequence[bool]]) -> tuple[Sequence[str], Sequence[bool]]:
            if isinstance(batch, tuple):
                return batch[0], segment_starts(self.tokenizer, *batch)
            return batch, [True] * len(batch)

        if self.sp is None:
            yield from (_encode_segment_texts(self.tokenizer, *split(b)) for b in batches)
            return
        # `self.sp` and `self.verified` are read and changed on this thread only: each batch is
        # handed the processor chosen when it is submitted (None after a fallback: no worker).
        in_flight: collections.deque[tuple[Sequence[str], Sequence[bool], Future | None]] = collections.deque()
        with ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix="tokenize") as pool:
            for batch in batches:
                texts, starts = split(batch)
                sp = self.sp
                future = pool.submit(self._encode_sp, sp, texts, starts, 1, self._probe_first()) if sp is not None else None
                in_flight.append((texts, starts, future))
                if len(in_flight) > self.num_threads:
                    texts_done, starts_done, future_done = in_flight.popleft()
                    yield self._finish(texts_done, starts_done, future_done.result() if future_done else None)
            while in_flight:
                texts_done, starts_done, future_done = in_flight.popleft()
                yield self._finish(texts_done, starts_done, future_done.result() if future_done else None)


_SpResult = tuple[list[int], list[list[int]], dict[int, list[int]]]
