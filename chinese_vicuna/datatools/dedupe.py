"""Exact and near-duplicate detection for instruction data (self-instruct's ROUGE-L rule).

Self-instruct drops a generated instruction whose ROUGE-L F-measure with any kept one is at
least 0.7. Its tokenizer (rouge_score's) keeps only ASCII letters and digits, so Chinese text
has no tokens at all; here every CJK character is a token and other text splits into
lower-cased words, which is character-level ROUGE-L for Chinese and word-level for English.

Comparing each new text with all kept ones is quadratic (and an exact prefix filter prunes
little on characters: ROUGE-L 0.7 needs only about half of two short prompts' characters in
common). Candidates come from MinHash LSH over token multisets instead: F >= t implies a
multiset Jaccard J >= t/(2-t), so a pair at the threshold agrees on some band of ROWS minhashes
with probability >= 1 - (1 - J**ROWS)**BANDS (99.64% at 0.7, 99.986% at 0.75; `recall_bound`).
Every candidate is then checked exactly (length bound, minhash agreement, bit-parallel LCS), so
nothing below the threshold is ever flagged; the trade-off is a rare missed pair.
`NearDuplicateIndex` takes texts one at a time (self_instruct); `near_duplicate_flags` does a
whole list in bulk with numpy, and `NearDuplicateWindow` a stream in bounded memory (the doctor),
with the same hashes and the same flags.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from chinese_vicuna.errors import UserError

DEFAULT_THRESHOLD = 0.7

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def normalize(text: str) -> str:
    """NFKC (full-width → half-width), lower case, whitespace collapsed: the key of exact duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def rouge_tokens(text: str) -> list[str]:
    """CJK characters one by one, other runs of letters/digits as words; punctuation dropped."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


class LcsQuery:
    """One text's bit masks, built once for the LCS with many others (bit-parallel, Hyyrö 2004:
    one big-integer step per token of the other text; either text can be the bit side)."""

    def __init__(self, a: Sequence[str]) -> None:
        masks: dict[str, int] = {}
        for i, tok in enumerate(a):
            masks[tok] = masks.get(tok, 0) | (1 << i)
        self.masks, self.n, self.full = masks, len(a), (1 << len(a)) - 1

    def lcs(self, b: Sequence[str]) -> int:
        masks, full = self.masks, self.full
        v = full
        for tok in b:
            u = v & masks.get(tok, 0)
            v = ((v + u) | (v - u)) & full
        return self.n - v.bit_count()

    def rouge_l(self, b: Sequence[str]) -> float:
        """ROUGE-L F-measure with b, the same value as `rouge_l(a, b)`."""
        if not self.n or not b:
            return 0.0
        return 2 * self.lcs(b) / (self.n + len(b))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (bit-parallel, Hyyrö 2004)."""
    if len(a) < len(b):
        a, b = b, a  # fewer tokens to step through
    return LcsQuery(a).lcs(b) if b else 0


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F-measure of two token lists (0 when either is empty)."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    return 2 * lcs / (len(a) + len(b))


ROWS = 4  # minhash values per LSH band
BANDS = 64  # bands: ROWS * BANDS = 256 hash functions
HOT_BUCKET = 256  # near_duplicate_flags: a band key shared by more texts is followed one text at a time
MAX_MISS = 0.004  # the highest chance to miss a pair at the threshold that lsh_shape accepts
SEED = 18  # the hash functions are drawn once from this seed: same data, same flags, every run


def similarity_floor(threshold: float) -> float:
    """Smallest Jaccard similarity of two texts' token multisets when their ROUGE-L F >= threshold.

    The LCS is a common sub-multiset, so the multiset overlap O >= LCS >= t/2 * (n + m), and
    O / (n + m - O) >= t / (2 - t): 0.538 at 0.7, 0.6 at 0.75.
    """
    return threshold / (2 - threshold)


def lsh_shape(threshold: float) -> tuple[int, int]:
    """(rows, bands) for a threshold: ROWS x BANDS at 0.7; fewer rows per band (and more bands,
    the same 256 hashes) where the floor is too low for the miss bound MAX_MISS (below ~0.66)."""
    if not 0 < threshold <= 1:
        # at 0 every pair qualifies, even with no token in common, which no index can find
        raise UserError(f"--similarity_threshold {threshold}: a ROUGE-L threshold must be above 0 and at most 1 (self-instruct uses 0.7)")
    floor = similarity_floor(threshold)
    for rows in range(ROWS, 1, -1):
        bands = ROWS * BANDS // rows
        if (1 - floor**rows) ** bands <= MAX_MISS:
            return rows, bands
    return 1, ROWS * BANDS


def recall_bound(threshold: float, rows: int | None = None, bands: int | None = None) -> float:
    """Lowest probability that LSH makes a pair with ROUGE-L >= threshold a candidate: a band
    matches with probability J**rows, J >= similarity_floor(threshold)."""
    if rows is None or bands is None:
        rows, bands = lsh_shape(threshold)
    return 1 - (1 - similarity_floor(threshold) ** rows) ** bands


class MinHasher:
    """MinHash signatures (ROWS * BANDS values) of token multisets and their LSH band keys.

    Each occurrence of a token is its own element (the k-th repeat of "的" is ("的", k)), so a
    set of elements is the token multiset and set Jaccard is multiset Jaccard. An element's
    64-bit base hash is blake2b of its text (not Python's salted `hash()`); the hash functions
    are multiply-add-shift on it, with multipliers drawn from `seed`. Hashes are computed once
    per distinct element (a few thousand: characters and their repeat counts), so a signature
    is a gather and a minimum, in numpy for a whole batch of texts.
    """

    def __init__(self, rows: int = ROWS, bands: int = BANDS, seed: int = SEED) -> None:
        import numpy as np

        self.rows, self.bands = rows, bands
        self.size = rows * bands
        rng = np.random.default_rng(seed)
        self._mul = rng.integers(0, 1 << 63, size=self.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._add = rng.integers(0, 1 << 63, size=self.size, dtype=np.uint64)
        self._vocab: dict[str, int] = {}
        self._ids: dict[int, int] = {}  # element (token id << 20 | repeat) → row of the hash table
        self._table = np.empty((256, self.size), dtype=np.uint32)  # row i: the hashes of element i

    def _element_rows(self, elements: Any) -> Any:
        """Rows of the hash table for element keys, hashing the ones not seen before."""
        import numpy as np

        distinct, inverse = np.unique(elements, return_inverse=True)
        ids = self._ids
        new = [e for e in distinct.tolist() if e not in ids]
        if new:
            start = len(ids)
            if start + len(new) + 1 > len(self._table):  # + 1: the padding row stays last
                grown = np.empty((max(2 * len(self._table), start + len(new) + 1), self.size), dtype=np.uint32)
                grown[:start] = self._table[:start]
                self._table = grown
            tokens = list(self._vocab)
            names = [tokens[e >> 20] if not e & 0xFFFFF else f"{tokens[e >> 20]}\x00{e & 0xFFFFF}" for e in new]
            base = np.array(
                [int.from_bytes(hashlib.blake2b(x.encode("utf-8"), digest_size=8).digest(), "little") for x in names],
                dtype=np.uint64,
            )
            self._table[start : start + len(new)] = (base[:, None] * self._mul + self._add) >> np.uint64(32)
            for k, e in enumerate(new, start):
                ids[e] = k
        rows = np.array([ids[e] for e in distinct.tolist()], dtype=np.int64)
        return rows[inverse.ravel()]

    def signatures(self, texts: Sequence[Sequence[str]]) -> Any:
        """(len(texts), ROWS * BANDS) uint32 minhashes; an empty text gets all 0xFFFFFFFF."""
        import numpy as np

        vocab = self._vocab
        flat = [t for text in texts for t in text]
        for t in dict.fromkeys(flat):  # distinct tokens, in order
            if t not in vocab:
                vocab[t] = len(vocab)
        tok = np.fromiter(map(vocab.__getitem__, flat), dtype=np.int64, count=len(flat))
        lengths = np.array([len(t) for t in texts], dtype=np.int64)
        text_of = np.repeat(np.arange(len(texts)), lengths)
        # k-th occurrence of a token in its text: its rank among equal (text, token); which
        # occurrence gets which k does not change the set, so any sort order does
        order = np.argsort(text_of * (len(vocab) + 1) + tok)
        same = np.concatenate([[False], (text_of[order][1:] == text_of[order][:-1]) & (tok[order][1:] == tok[order][:-1])])
        run_start = np.maximum.accumulate(np.where(same, 0, np.arange(len(tok))))
        repeat = np.empty(len(tok), dtype=np.int64)
        repeat[order] = np.minimum(np.arange(len(tok)) - run_start, 0xFFFFF)
        rows = self._element_rows((tok << 20) | repeat) if len(tok) else np.zeros(0, dtype=np.int64)
        pad = len(self._ids)  # a row of 0xFFFFFFFF, the identity of min
        self._table[pad] = 0xFFFFFFFF
        out = np.empty((len(texts), self.size), dtype=np.uint32)
        offsets = np.cumsum(lengths) - lengths
        # Similar lengths together, padded to a rectangle: one gather and one min per chunk.
        by_length = np.argsort(lengths, kind="stable")
        for c in range(0, len(by_length), 256):
            idx = by_length[c : c + 256]
            lens = lengths[idx]
            block = np.full((len(idx), max(1, int(lens[-1]))), pad, dtype=np.int64)
            col = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
            block[np.repeat(np.arange(len(idx)), lens), col] = rows[np.repeat(offsets[idx], lens) + col]
            out[idx] = self._table[block].min(axis=1)
        return out

    def band_keys(self, signatures: Any) -> Any:
        """(n, BANDS) uint64: one key per band of ROWS values, the band number mixed in."""
        import numpy as np

        bands = signatures.reshape(len(signatures), self.bands, self.rows).astype(np.uint64)
        prime = np.uint64(0x100000001B3)
        keys = np.broadcast_to(np.arange(self.bands, dtype=np.uint64), bands.shape[:2]).copy()
        for r in range(self.rows):
            keys = keys * prime + bands[:, :, r] + np.uint64(r + 1)
        return keys


class _Verifier:
    """The checks every candidate passes before the LCS, as arrays: the length bound, and enough
    agreeing minhashes (first on the first QUICK values, then on all)."""

    QUICK = 64

    def __init__(self, threshold: float, size: int) -> None:
        self.threshold = threshold
        floor = similarity_floor(threshold)
        quick = min(self.QUICK, size)
        # Agreements ~ Binomial(k, J), J >= floor: at most 5 standard deviations below the mean
        self.min_agree = [math.floor(k * floor - 5 * math.sqrt(k * floor * (1 - floor))) for k in (quick, size)]
        self.quick = quick

    def length_ok(self, n: Any, m: Any) -> Any:
        # LCS <= the shorter text, so 2 * min(n, m) >= t * (n + m) (1e-9: a bound, never a miss)
        import numpy as np

        return 2 * np.minimum(n, m) >= self.threshold * (n + m) - 1e-9

    def agree(self, sigs: Any, a: Any, b: Any) -> Any:
        """Which of the pairs (a[k], b[k]) (rows of sigs, or a single row b) have enough agreeing minhashes."""
        import numpy as np

        ok = np.zeros(len(a), dtype=bool)
        step = max(1, (1 << 22) // self.quick)  # pairs compared at once
        for c in range(0, len(a), step):
            x, y = a[c : c + step], b[c : c + step] if np.ndim(b) else b
            quick = (sigs[x, : self.quick] == sigs[y, : self.quick]).sum(axis=-1) >= self.min_agree[0]
            rest = np.flatnonzero(quick)
            x, y = x[rest], y[rest] if np.ndim(y) else y
            ok[c + rest] = (sigs[x] == sigs[y]).sum(axis=-1) >= self.min_agree[1]
        return ok


class NearDuplicateIndex:
    """Texts kept so far; `find(tokens)` says whether a kept one has ROUGE-L >= threshold with it.

    Candidates come from MinHash LSH over token multisets: texts that agree on all ROWS values
    of at least one of BANDS bands. A pair with ROUGE-L >= t has multiset Jaccard
    J >= t/(2-t) (`similarity_floor`), so it becomes a candidate with probability at least
    1 - (1 - J**ROWS)**BANDS (`recall_bound`): >= 0.9998 at ROUGE-L 0.75 and >= 0.996 at 0.7;
    real near duplicates have a higher J and are missed far less often. Candidates then pass
    the length bound (min/max >= t/(2-t), exact), enough agreeing minhashes (at most 5 standard
    deviations below what J >= t/(2-t) gives: a further miss chance below 1e-6) and the exact
    ROUGE-L (bit-parallel LCS). So nothing below the threshold is ever flagged; the only error
    is a rare missed pair.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, hasher: MinHasher | None = None) -> None:
        import numpy as np

        self.threshold = threshold
        shape = lsh_shape(threshold)  # checks the threshold too
        self.hasher = hasher or MinHasher(*shape)
        self.texts: list[list[str]] = []
        self._lengths = np.empty(64, dtype=np.int64)
        self._sigs = np.empty((64, self.hasher.size), dtype=np.uint32)
        self._buckets: dict[int, list[int]] = {}
        self._verify = _Verifier(threshold, self.hasher.size)
        self._last: tuple[list[str], Any, list[int]] | None = None

    def _sketch(self, tokens: Sequence[str]) -> tuple[Any, list[int]]:
        tokens = list(tokens)
        if self._last is not None and self._last[0] == tokens:  # find() then add() of the same text
            return self._last[1], self._last[2]
        sig = self.hasher.signatures([tokens])
        keys = self.hasher.band_keys(sig)[0].tolist()
        self._last = (tokens, sig[0], keys)
        return sig[0], keys

    def find(self, tokens: Sequence[str]) -> int | None:
        """Index (in `texts`) of a kept text with ROUGE-L >= threshold, the earliest such candidate, or None."""
        if not tokens:
            return None
        return self._find(tokens, *self._sketch(tokens))

    def add(self, tokens: Sequence[str]) -> None:
        """Keep a text (call after `find` returned None, or to seed the index)."""
        if tokens:
            self._add(tokens, *self._sketch(tokens))

    def _find(self, tokens: Sequence[str], sig: Any, keys: Sequence[int]) -> int | None:
        import numpy as np

        found: set[int] = set()
        buckets = self._buckets
        for key in keys:
            bucket = buckets.get(key)
            if bucket:
                found.update(bucket)
        if not found:
            return None
        cands = np.fromiter(found, dtype=np.int64, count=len(found))
        cands.sort()
        cands = cands[self._verify.length_ok(len(tokens), self._lengths[cands])]
        self._sigs[len(self.texts)] = sig  # a scratch row past the kept ones
        cands = cands[self._verify.agree(self._sigs, cands, len(self.texts))]
        for j in cands.tolist():
            if rouge_l(tokens, self.texts[j]) >= self.threshold:
                return j
        return None

    def _add(self, tokens: Sequence[str], sig: Any, keys: Sequence[int]) -> None:
        import numpy as np

        i = len(self.texts)
        if i + 1 >= len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.empty_like(self._lengths)])
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        self.texts.append(list(tokens))
        self._lengths[i] = len(tokens)
        self._sigs[i] = sig
        buckets = self._buckets
        for key in keys:
            bucket = buckets.get(key)
            if bucket is None:
                buckets[key] = [i]
            else:
                bucket.append(i)


class NearDuplicateWindow:
    """Near duplicates in a stream, in memory bounded by `window` (not by the stream's length): each
    text is checked against at least the last `window` kept texts, in two generations of
    `NearDuplicateIndex` (the older is dropped when the newer fills). With fewer than `window` kept
    texts this is exactly `NearDuplicateIndex` fed in order: the flags of `near_duplicate_flags`."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, window: int = 10_000) -> None:
        if window < 1:
            raise UserError(f"near-duplicate window {window}: must be at least 1")
        self.threshold, self.window = threshold, window
        self.hasher = MinHasher(*lsh_shape(threshold))
        self.current = NearDuplicateIndex(threshold, self.hasher)
        self.previous: NearDuplicateIndex | None = None
        self.rotations = 0

    def flags(self, texts: Sequence[Sequence[str]], skip: Sequence[bool] | None = None) -> list[bool]:
        """For the next texts of the stream: whether each is a near duplicate of a kept one (and keep those that are not)."""
        flags = [False] * len(texts)
        todo = [i for i, tokens in enumerate(texts) if tokens and not (skip is not None and skip[i])]
        if not todo:
            return flags
        sigs = self.hasher.signatures([texts[i] for i in todo])
        keys = self.hasher.band_keys(sigs).tolist()
        for row, i in enumerate(todo):
            tokens = [sys.intern(t) for t in texts[i]]  # kept texts share their token strings
            sig, key = sigs[row], keys[row]
            if self.current._find(tokens, sig, key) is not None or (
                self.previous is not None and self.previous._find(tokens, sig, key) is not None
            ):
                flags[i] = True
                continue
            self.current._add(tokens, sig, key)
            if len(self.current.texts) >= self.window:
                self.previous, self.current = self.current, NearDuplicateIndex(self.threshold, self.hasher)
                self.rotations += 1
        return flags


def near_duplicate_flags(
    texts: Sequence[Sequence[str]],
    threshold: float = DEFAULT_THRESHOLD,
    skip: Sequence[bool] | None = None,
    hasher: MinHasher | None = None,
) -> list[bool]:
    """For a whole file at once: whether each token list has ROUGE-L >= threshold with an earlier
    one that was itself kept (not flagged, not skipped).

    The same flags as feeding `NearDuplicateIndex` in order with the same hasher, found in bulk:
    candidate pairs come from one sort of every band key (no per-record dictionary work), pass
    the length and minhash-agreement filters as arrays, and only the survivors are checked with
    the LCS in record order, against records that were kept. A band key shared by more than
    `HOT_BUCKET` texts (templated prompts) is instead followed in that pass, holding only kept
    texts, so a large cluster of near copies costs no quadratic number of pairs.
    """
    import numpy as np

    shape = lsh_shape(threshold)  # checks the threshold too
    flags = [False] * len(texts)
    # A later identical token list is always flagged: it has the first copy's candidates, so it
    # matches the first copy (if kept) or whatever kept text the first copy matched.
    first: dict[tuple[str, ...], int] = {}
    uniq: list[int] = []
    for i, tokens in enumerate(texts):
        if (skip is not None and skip[i]) or not tokens:
            continue
        if first.setdefault(tuple(tokens), i) != i:
            flags[i] = True
        else:
            uniq.append(i)
    if len(uniq) < 2:
        return flags
    hasher = hasher or MinHasher(*shape)
    sigs = hasher.signatures([texts[i] for i in uniq])
    keys = hasher.band_keys(sigs)
    count, bands = keys.shape
    lengths = np.array([len(texts[i]) for i in uniq], dtype=np.int64)
    verify = _Verifier(threshold, hasher.size)

    # Every (key, text) occurrence sorted by key: each one pairs with those before it in its bucket.
    flat = keys.ravel()
    order = np.argsort(flat)
    sorted_keys, owner = flat[order], (order // bands).astype(np.int64)
    starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    sizes = np.diff(np.concatenate([starts, [len(flat)]]))
    group = np.repeat(np.arange(len(starts)), sizes)
    rank = np.arange(len(flat)) - starts[group]  # earlier texts in the same bucket
    hot = sizes[group] > HOT_BUCKET
    per = np.where(hot, 0, rank)
    one = np.repeat(owner, per)
    other = owner[np.repeat(starts[group], per) + np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)]
    later, earlier = np.maximum(one, other), np.minimum(one, other)
    pairs = np.sort(later * count + earlier)  # by the later text, then the earlier one
    pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])] if len(pairs) else pairs  # one per pair, whatever the bands
    later, earlier = pairs // count, pairs % count
    keep = verify.length_ok(lengths[later], lengths[earlier])
    later, earlier = later[keep], earlier[keep]
    agree = verify.agree(sigs, later, earlier)
    later, earlier = later[agree].tolist(), earlier[agree].tolist()

    # In order: only these texts have candidates; everyone else is kept.
    candidates: dict[int, list[int]] = {}
    for u, j in zip(later, earlier, strict=True):
        candidates.setdefault(u, []).append(j)
    hot_keys: dict[int, list[int]] = {}
    for u, key in zip(owner[hot].tolist(), sorted_keys[hot].tolist(), strict=True):
        hot_keys.setdefault(u, []).append(key)
    kept = [True] * count
    hot_kept: dict[int, list[int]] = {}
    for u in sorted(candidates.keys() | hot_keys.keys()):
        js = {j for j in candidates.get(u, ()) if kept[j]}
        mine = hot_keys.get(u, ())
        extra = [j for key in mine for j in hot_kept.get(key, ()) if j not in js]
        if extra:
            more = np.array(extra, dtype=np.int64)
            more = more[verify.length_ok(lengths[u], lengths[more])]
            js.update(more[verify.agree(sigs, more, u)].tolist())
        query = LcsQuery(texts[uniq[u]]) if js else None
        if query is not None and any(query.rouge_l(texts[uniq[j]]) >= threshold for j in sorted(js)):
            kept[u] = False
            flags[uniq[u]] = True
        else:
            for key in mine:
                hot_kept.setdefault(key, []).append(u)
    return flags


def dedupe_key(record: dict[str, str]) -> str:
    """The text two instruction records are compared on: instruction and input (not the answer)."""
    return record["instruction"] + "\n" + record.get("input", "")


class Deduper:
    """Exact (normalized instruction + input) and near (ROUGE-L) duplicate filter for alpaca records."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.exact: set[str] = set()
        self.near = NearDuplicateIndex(threshold)

    def check(self, record: dict[str, str]) -> str | None:
        """'duplicate', 'near_duplicate' or None (new: then call `add`)."""
        text = dedupe_key(record)
        if normalize(text) in self.exact:
            return "duplicate"
        if self.near.find(rouge_tokens(text)) is not None:
            return "near_duplicate"
        return None

    def add(self, record: dict[str, str]) -> None:
        text = dedupe_key(record)
        self.exact.add(normalize(text))
        self.near.add(rouge_tokens(text))

    def add_all(self, records: Iterable[dict[str, str]]) -> None:
        for r in records:
            self.add(r)
