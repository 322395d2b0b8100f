"""chinese_vicuna.datatools.dedupe: the MinHash LSH near-duplicate search finds planted near
copies, never flags a pair below the threshold, agrees with the quadratic search, and is
deterministic."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from chinese_vicuna.datatools import dedupe
from chinese_vicuna.datatools.dedupe import (
    MinHasher,
    NearDuplicateIndex,
    lsh_shape,
    near_duplicate_flags,
    recall_bound,
    rouge_l,
    similarity_floor,
)
from chinese_vicuna.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SOURCES = 500
# Chinese-like text: 2000 CJK characters with Zipf frequencies, so unrelated texts share the
# common ones as real prompts do.
CHARS = [chr(0x4E00 + i) for i in range(2000)]
CUM = list(itertools.accumulate(1 / (i + 5) for i in range(len(CHARS))))


def chinese(rng: random.Random, n: int) -> list[str]:
    return rng.choices(CHARS, cum_weights=CUM, k=n)


def edited(rng: random.Random, text: list[str], k: int) -> list[str]:
    out = list(text)
    for _ in range(k):
        p = rng.randrange(len(out) + 1)
        op = rng.random()
        if op < 0.4 and p < len(out):
            out[p] = chinese(rng, 1)[0]
        elif op < 0.7 or len(out) < 3:
            out.insert(p, chinese(rng, 1)[0])
        else:
            out.pop(min(p, len(out) - 1))
    return out


def brute_force(texts: list[list[str]], threshold: float = 0.7, skip: list[bool] | None = None) -> list[bool]:
    """Every text against every kept one (the LCS only where the lengths allow the threshold)."""
    kept, flags = [], []
    for i, t in enumerate(texts):
        near = (
            not (skip and skip[i])
            and bool(t)
            and any(2 * min(len(t), len(k)) >= threshold * (len(t) + len(k)) and rouge_l(t, k) >= threshold for k in kept)
        )
        flags.append(near)
        if not (skip and skip[i]) and t and not near:
            kept.append(t)
    return flags


def test_bounds_behind_the_recall_figures() -> None:
    # ROUGE-L >= t needs multiset Jaccard >= t / (2 - t): checked on random pairs near the threshold
    rng = random.Random(0)
    checked = 0
    for _ in range(3000):
        a = chinese(rng, rng.randint(1, 30))
        b = edited(rng, a, rng.randint(0, 12))
        f = rouge_l(a, b)
        if not b or f < 0.6:
            continue
        ca, cb = Counter(a), Counter(b)
        jaccard = sum((ca & cb).values()) / sum((ca | cb).values())
        assert jaccard >= similarity_floor(f) - 1e-12
        checked += 1
    assert checked > 1000
    assert similarity_floor(0.7) == pytest.approx(0.7 / 1.3) and similarity_floor(0.75) == 0.6
    # 1 - (1 - J^4)^64 at the floors: what the docstring and docs/data.md state
    assert recall_bound(0.75) == pytest.approx(1 - (1 - 0.6**4) ** 64) and recall_bound(0.75) > 0.9998
    assert recall_bound(0.7) == pytest.approx(1 - (1 - (0.7 / 1.3) ** 4) ** 64) and recall_bound(0.7) > 0.996


@pytest.fixture(scope="module")
def planted() -> tuple[list[list[str]], list[tuple[int, int, float]]]:
    """500 unrelated texts of 5-50 characters, then 300 near copies of them at every similarity
    level (k random edits, k up to 3/4 of the length): (texts, [(copy, source, ROUGE-L)])."""
    rng = random.Random(11)
    sources = [chinese(rng, rng.randint(5, 50)) for _ in range(SOURCES)]
    texts = list(sources)
    pairs = []
    for _ in range(300):
        s = rng.randrange(len(sources))
        copy = edited(rng, sources[s], rng.randint(1, max(1, len(sources[s]) * 3 // 4)))
        pairs.append((len(texts), s, rouge_l(copy, sources[s])))
        texts.append(copy)
    return texts, pairs


def test_planted_near_copies_are_found_and_nothing_below_the_threshold(planted) -> None:
    texts, pairs = planted
    flags = near_duplicate_flags(texts)
    assert not any(flags[:SOURCES])  # the sources are unrelated: all kept
    levels = Counter(round(f, 1) for _, _, f in pairs)
    assert all(levels[x] >= 5 for x in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0))  # every level is represented
    # every copy with ROUGE-L >= 0.75 to its (kept) source is flagged
    strong = [c for c, _, f in pairs if f >= 0.75]
    assert len(strong) > 120 and all(flags[c] for c in strong)
    # every flag is a true one: an earlier kept text has ROUGE-L >= 0.7 with it
    for i in range(SOURCES, len(texts)):
        if flags[i]:
            assert any(rouge_l(texts[i], t) >= 0.7 for t, f in zip(texts[:i], flags[:i], strict=True) if not f), i
    # and below 0.7 nothing is flagged: copies far from every earlier text stay
    weak = [c for c, _, f in pairs if f < 0.6]
    assert len(weak) > 15 and sum(flags[c] for c in weak) <= 2


def test_agrees_with_the_quadratic_search_and_the_incremental_index(planted, monkeypatch) -> None:
    """Same flags as brute force on 880 texts with pairs at every level around 0.7 (the recall
    bound allows a miss with probability <= 0.4% per pair; on this seeded corpus there is none),
    and the same as NearDuplicateIndex fed in order, with crowded band keys both as pairs and
    followed one text at a time."""
    texts, _ = planted
    rng = random.Random(5)
    # templated prompts: a shared head and short tails crowd band keys
    head = chinese(rng, 10)
    texts = texts + [head + chinese(rng, rng.randint(2, 10)) for _ in range(60)] + [[] for _ in range(3)]
    texts += [list(t) for t in rng.sample(texts, 20)]  # identical token lists
    skip = [rng.random() < 0.05 for _ in texts]
    expected = brute_force(texts, 0.7, skip)
    assert near_duplicate_flags(texts, 0.7, skip) == expected
    monkeypatch.setattr(dedupe, "HOT_BUCKET", 3)
    assert near_duplicate_flags(texts, 0.7, skip) == expected
    index, incremental = NearDuplicateIndex(0.7), []
    for t, s in zip(texts, skip, strict=True):
        if s:
            incremental.append(False)
            continue
        found = index.find(t)
        incremental.append(found is not None)
        if found is None:
            index.add(t)
        else:
            assert rouge_l(t, index.texts[found]) >= 0.7
    assert incremental == expected and sum(expected) > 200


def test_other_thresholds() -> None:
    """Lower thresholds use fewer rows per band, so the miss bound holds at any threshold."""
    assert lsh_shape(0.7) == (4, 64) and lsh_shape(0.5) == (2, 128) and lsh_shape(0.9) == (4, 64)
    assert all(recall_bound(t) >= 0.996 for t in (0.3, 0.5, 0.6, 0.7, 0.8, 0.95))
    for bad in (0, -0.5, 1.2):
        with pytest.raises(UserError, match="similarity_threshold"):
            near_duplicate_flags([["a"]], bad)
    rng = random.Random(2)
    base = [chinese(rng, rng.randint(4, 30)) for _ in range(200)]
    texts = base + [edited(rng, rng.choice(base), rng.randint(1, 8)) for _ in range(200)]
    for threshold in (0.5, 0.9):
        assert near_duplicate_flags(texts, threshold) == brute_force(texts, threshold)


SIGNATURE = """
import json, sys
from chinese_vicuna.datatools.dedupe import MinHasher
sig = MinHasher().signatures([list("请把下面的句子翻译成英文"), ["hello", "world", "的", "的"]])
print(json.dumps(sig[:, :8].tolist()))
"""


def test_signatures_are_deterministic() -> None:
    """Seeded blake2b hashes, not Python's salted hash(): the same in another process with another
    PYTHONHASHSEED, and a text's signature does not depend on what else was hashed before."""
    texts = [list("请把下面的句子翻译成英文"), ["hello", "world", "的", "的"]]
    here = MinHasher().signatures(texts)
    other = MinHasher()
    other.signatures([list("完全不同的文本"), ["world"]])
    assert (other.signatures(texts[::-1])[::-1] == here).all()
    runs = []
    for seed in ("1", "2"):
        proc = subprocess.run(
            [sys.executable, "-c", SIGNATURE],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
            check=True,
        )
        runs.append(json.loads(proc.stdout))
    assert runs[0] == runs[1] == here[:, :8].tolist()
    # the repeat of a token is its own element: "的的" and "的" differ
    a, b = MinHasher().signatures([["的", "的"], ["的"]])
    assert (a != b).any()
