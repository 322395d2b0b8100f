"""Exact and near-duplicate detection for instruction data (self-instruct's ROUGE-L rule).

Self-instruct drops a generated instruction whose ROUGE-L F-measure with any kept one is at
least 0.7. Its tokenizer (rouge_score's) keeps only ASCII letters and digits, so Chinese text
has no tokens at all; here every CJK character is a token and other text splits into
lower-cased words, which is character-level ROUGE-L for Chinese and word-level for English.

Comparing each new text with all kept ones is quadratic. `NearDuplicateIndex` finds the same
pairs with a prefix filter: F >= t implies a multiset overlap of at least
t/2 * (len(a) + len(b)) tokens, and two token sets with that much overlap share a token among
the first few of each (in one fixed token order, rarest first). Only texts that share such a
token, pass the length bound and the overlap bound get the exact LCS, which is bit-parallel
(one big-integer step per token). The result is exact: the filter only skips pairs that
cannot reach the threshold.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

DEFAULT_THRESHOLD = 0.7

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def normalize(text: str) -> str:
    """NFKC (full-width → half-width), lower case, whitespace collapsed: the key of exact duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def rouge_tokens(text: str) -> list[str]:
    """CJK characters one by one, other runs of letters/digits as words; punctuation dropped."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (bit-parallel, Hyyrö 2004)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F-measure of two token lists (0 when either is empty)."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    return 2 * lcs / (len(a) + len(b))


def _min_overlap(n: int, threshold: float) -> int:
    """Fewest shared tokens a text of n tokens needs with any text it can reach `threshold` with."""
    # The partner has at least n * t / (2 - t) tokens, and F <= 2 * overlap / (n + m).
    return max(1, math.floor(threshold / 2 * (n + n * threshold / (2 - threshold))))  # floor: a longer prefix, never a missed pair


class NearDuplicateIndex:
    """Texts kept so far; `find(text)` says whether a kept one has ROUGE-L >= threshold with it.

    Token order (rarest first) is fixed from the counts seen when the index was last rebuilt;
    the index rebuilds itself when the number of kept texts doubles, so the cost stays near
    linear while the order follows the data.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self.texts: list[list[str]] = []
        self.counters: list[Counter[str]] = []
        self.doc_freq: Counter[str] = Counter()
        self.frozen: dict[str, int] = {}
        self.postings: dict[tuple[str, int], list[int]] = {}
        self.rebuild_at = 64

    def _prefix(self, counter: Counter[str], n: int) -> list[tuple[str, int]]:
        # Each token occurrence is its own element (tok, k), so multisets become sets.
        items = sorted(((tok, k) for tok, c in counter.items() for k in range(c)), key=lambda x: (self.frozen.get(x[0], 0), x))
        return items[: n - _min_overlap(n, self.threshold) + 1]

    def _index(self, i: int) -> None:
        for key in self._prefix(self.counters[i], len(self.texts[i])):
            self.postings.setdefault(key, []).append(i)

    def _rebuild(self) -> None:
        self.frozen = dict(self.doc_freq)
        self.postings = {}
        for i in range(len(self.texts)):
            self._index(i)
        self.rebuild_at = 2 * max(len(self.texts), 64)

    def find(self, tokens: Sequence[str]) -> int | None:
        """Index of a kept text with ROUGE-L >= threshold, or None."""
        n = len(tokens)
        if n == 0:
            return None
        counter = Counter(tokens)
        t = self.threshold
        seen: set[int] = set()
        for key in self._prefix(counter, n):
            for j in self.postings.get(key, ()):
                if j in seen:
                    continue
                seen.add(j)
                m = len(self.texts[j])
                if 2 * min(n, m) < t * (n + m):  # LCS <= the shorter length
                    continue
                other = self.counters[j]
                overlap = sum(min(c, other[tok]) for tok, c in counter.items())
                if 2 * overlap < t * (n + m):
                    continue
                if rouge_l(tokens, self.texts[j]) >= t:
                    return j
        return None

    def add(self, tokens: Sequence[str]) -> None:
        """Keep a text (call after `find` returned None, or to seed the index)."""
        if not tokens:
            return
        self.texts.append(list(tokens))
        self.counters.append(Counter(tokens))
        self.doc_freq.update(set(tokens))
        if len(self.texts) >= self.rebuild_at:
            self._rebuild()
        else:
            self._index(len(self.texts) - 1)


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
