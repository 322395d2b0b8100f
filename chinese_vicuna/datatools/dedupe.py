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
cannot reach the threshold. `NearDuplicateIndex` takes texts one at a time (self_instruct);
`near_duplicate_flags` does a whole file with the candidate search in numpy (the doctor).
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

    Candidates come from a prefix filter with PPJoin's positional bound (Xiao et al. 2008): each
    text is the set of its token occurrences `(token, k)` in one global order, rarest first;
    a pair that can reach the threshold shares an element among the first few of each, and the
    positions of the shared elements bound how much more they can share. Survivors get the exact
    overlap (a set intersection) and then the exact LCS.

    The order is fixed from the token counts seen when the index was last rebuilt; the index
    rebuilds itself when the number of kept texts doubles, so the order follows the data at a
    near-linear total cost.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self.texts: list[list[str]] = []
        self.elements: list[frozenset[tuple[str, int]]] = []
        self.doc_freq: Counter[str] = Counter()
        self.frozen: dict[str, int] = {}
        self.postings: dict[tuple[str, int], list[tuple[int, int]]] = {}
        self.rebuild_at = 64

    def _ordered(self, tokens: Sequence[str]) -> list[tuple[str, int]]:
        # Each token occurrence is its own element (tok, k), so multisets become sets.
        seen: Counter[str] = Counter()
        items = []
        for tok in tokens:
            items.append((tok, seen[tok]))
            seen[tok] += 1
        frozen = self.frozen
        items.sort(key=lambda x: (frozen.get(x[0], 0), x))
        return items

    def _index(self, i: int, ordered: list[tuple[str, int]]) -> None:
        n = len(ordered)
        for pos, key in enumerate(ordered[: n - _min_overlap(n, self.threshold) + 1]):
            self.postings.setdefault(key, []).append((i, pos))

    def _rebuild(self) -> None:
        self.frozen = dict(self.doc_freq)
        self.postings = {}
        for i, tokens in enumerate(self.texts):
            self._index(i, self._ordered(tokens))
        self.rebuild_at = 2 * max(len(self.texts), 64)

    def find(self, tokens: Sequence[str]) -> int | None:
        """Index of a kept text with ROUGE-L >= threshold, or None."""
        n = len(tokens)
        if n == 0:
            return None
        t = self.threshold
        half = t / 2
        lo, hi = n * t / (2 - t), n * (2 - t) / t  # lengths that can reach t at all (LCS <= the shorter)
        texts = self.texts
        ordered = self._ordered(tokens)
        counts: dict[int, int] = {}
        postings = self.postings
        for i, key in enumerate(ordered[: n - _min_overlap(n, t) + 1]):
            for j, pj in postings.get(key, ()):
                c = counts.get(j, 0)
                if c < 0:
                    continue
                m = len(texts[j])
                if m < lo or m > hi:
                    counts[j] = -1
                    continue
                # positional bound: later shared elements lie after position i here and pj there
                if c + 1 + min(n - i - 1, m - pj - 1) < half * (n + m):
                    counts[j] = -1
                    continue
                counts[j] = c + 1
        if not counts:
            return None
        elements = frozenset(ordered)
        for j, c in counts.items():
            if c <= 0:
                continue
            m = len(texts[j])
            if len(elements & self.elements[j]) < half * (n + m):
                continue
            if rouge_l(tokens, texts[j]) >= t:
                return j
        return None

    def add(self, tokens: Sequence[str]) -> None:
        """Keep a text (call after `find` returned None, or to seed the index)."""
        if not tokens:
            return
        self.texts.append(list(tokens))
        ordered = self._ordered(tokens)
        self.elements.append(frozenset(ordered))
        self.doc_freq.update(set(tokens))
        if len(self.texts) >= self.rebuild_at:
            self._rebuild()
        else:
            self._index(len(self.texts) - 1, ordered)


def near_duplicate_flags(
    texts: Sequence[Sequence[str]], threshold: float = DEFAULT_THRESHOLD, skip: Sequence[bool] | None = None
) -> list[bool]:
    """For a whole file at once: whether each token list has ROUGE-L >= threshold with an earlier
    one that was itself kept (not flagged, not skipped). The same answer as feeding
    `NearDuplicateIndex` in order, with the candidate search in numpy over one global token order
    (the data's own counts), which is what makes a 50k-record file take seconds.
    """
    import numpy as np

    t = threshold
    occurrences: list[list[tuple[str, int]]] = []
    freq: Counter[tuple[str, int]] = Counter()
    for tokens in texts:
        seen: Counter[str] = Counter()
        elements = []
        for tok in tokens:
            elements.append((tok, seen[tok]))
            seen[tok] += 1
        occurrences.append(elements)
        freq.update(elements)
    rank = {e: r for r, e in enumerate(sorted(freq, key=lambda e: (freq[e], e)))}
    ordered = [sorted(rank[e] for e in elements) for elements in occurrences]
    lengths = np.array([len(o) for o in ordered], dtype=np.int64)
    post_rec: dict[int, list[int]] = {}
    post_pos: dict[int, list[int]] = {}
    prefix_len = [len(o) - _min_overlap(len(o), t) + 1 if o else 0 for o in ordered]
    for i, o in enumerate(ordered):
        for p, e in enumerate(o[: prefix_len[i]]):
            post_rec.setdefault(e, []).append(i)
            post_pos.setdefault(e, []).append(p)
    rec_arr = {e: np.array(v, dtype=np.int64) for e, v in post_rec.items()}
    pos_arr = {e: np.array(v, dtype=np.int64) for e, v in post_pos.items()}
    # every text's sorted element ids, end to end, to count exact overlaps of many candidates at once
    flat = np.fromiter((e for o in ordered for e in o), dtype=np.int64, count=int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    kept = np.zeros(len(texts), dtype=bool)
    flags = [False] * len(texts)
    eps = 1e-9
    for i, o in enumerate(ordered):
        if (skip is not None and skip[i]) or not o:
            continue
        n = len(o)
        prefix = o[: prefix_len[i]]
        # postings hold record numbers in increasing order: only the part before record i is read
        ends = [int(np.searchsorted(rec_arr[e], i)) for e in prefix]
        recs = np.concatenate([rec_arr[e][:k] for e, k in zip(prefix, ends, strict=True)])
        poss = np.concatenate([pos_arr[e][:k] for e, k in zip(prefix, ends, strict=True)])
        qpos = np.repeat(np.arange(len(prefix)), ends)
        mask = kept[recs]
        found = False
        if mask.any():
            recs, poss, qpos = recs[mask], poss[mask], qpos[mask]
            cands, first = np.unique(recs, return_index=True)  # first shared element of each pair
            m = lengths[cands]
            need = t * (n + m) - eps
            bound = np.minimum(n - qpos[first], m - poss[first])  # PPJoin: later shared elements come after it on both sides
            keep = (2 * np.minimum(n, m) >= need) & (2 * bound >= need)
            cands, m, need = cands[keep], m[keep], need[keep]
            if len(cands):
                # exact multiset overlap with each candidate: its elements that are among ours
                total = int(m.sum())
                local = np.concatenate([[0], np.cumsum(m)[:-1]])
                idx = np.repeat(starts[cands] - local, m) + np.arange(total)
                vals = flat[idx]
                mine = np.array(o, dtype=np.int64)
                hit = mine[np.minimum(np.searchsorted(mine, vals), n - 1)] == vals
                overlap = np.add.reduceat(hit.astype(np.int64), local)
                for j in cands[2 * overlap >= need].tolist():
                    if rouge_l(texts[i], texts[j]) >= t:
                        found = True
                        break
        if found:
            flags[i] = True
        else:
            kept[i] = True
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
