"""tools/make_pairs.py: pairwise judgments → preference pairs (winner chosen), ties and the rest counted."""

from __future__ import annotations

import json
from pathlib import Path

import make_pairs

from chinese_vicuna.data.preference import to_example
from chinese_vicuna.data.records import Record


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_winner_is_chosen_ties_and_second_turns_are_counted(tmp_path: Path, caplog) -> None:
    questions = [{"question_id": i, "category": "writing", "turns": [f"问题{i}"] + (["追问"] if i == 5 else [])} for i in range(1, 6)]
    answers = lambda model, tag: [  # noqa: E731
        {"question_id": i, "model_id": model, "choices": [{"index": 0, "turns": [f"{tag}{i}", f"{tag}{i}-2"]}]} for i in range(1, 6)
    ]
    # (question, turn, model_1 first shown, verdict): 1 → a wins both orders, 2 → b wins, 3 → orders disagree (tie),
    # 4 → [[C]] tie, 5 → a wins turn 1; its turn 2 is judged too but not a pair
    verdicts = {1: ("A", "B"), 2: ("B", "A"), 3: ("A", "A"), 4: ("tie", "tie"), 5: ("A", "B")}
    records = []
    for qid, (ab, ba) in verdicts.items():
        for turn in (1, 2) if qid == 5 else (1,):
            for first, second, verdict in (("m-a", "m-b", ab), ("m-b", "m-a", ba)):
                key = {"mode": "pairwise", "question_id": qid, "turn": turn, "model_1": first, "model_2": second, "judge": "j"}
                records.append({**key, "category": "writing", "verdict": verdict, "judgment": f"[[{verdict}]]"})
    judgments = write_jsonl(tmp_path / "judgments.jsonl", records)
    files = [
        write_jsonl(tmp_path / "q.jsonl", questions),
        write_jsonl(tmp_path / "a.jsonl", answers("m-a", "甲")),
        write_jsonl(tmp_path / "b.jsonl", answers("m-b", "乙")),
    ]
    out = tmp_path / "pairs.jsonl"
    argv = ["--questions", str(files[0]), "--answers", str(files[1]), "--answers_b", str(files[2]), "--judgments", str(judgments)]
    with caplog.at_level("INFO"):
        make_pairs.main([*argv, "--output", str(out)])
    pairs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert pairs == [
        {"prompt": "问题1", "chosen": "甲1", "rejected": "乙1", "question_id": 1},
        {"prompt": "问题2", "chosen": "乙2", "rejected": "甲2", "question_id": 2},
        {"prompt": "问题5", "chosen": "甲5", "rejected": "乙5", "question_id": 5},
    ]
    assert "3 pairs written" in caplog.text and "1 second turns" in caplog.text and "2 ties" in caplog.text
    # what finetune_dpo.py reads
    example = to_example(Record(pairs[0], "pairs.jsonl:1"))
    assert example.answers == ["甲1", "乙1"] and example.instruction == ("问题1", "")
