"""tools/data_doctor.py on preference data: invalid and identical pairs, duplicate prompts, length bias."""

from __future__ import annotations

import json
from pathlib import Path

import data_doctor


def test_preference_checks(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    records = [
        {"instruction": "问题一", "input": "", "chosen": "一个很长很长很长的好回答。", "rejected": "短。"},
        {"instruction": "问题二", "input": "", "chosen": "一样。", "rejected": "一样。"},
        {"instruction": "问题一", "input": "", "chosen": "又一个很长很长很长的回答。", "rejected": "短。"},
        {"instruction": "问题三", "input": "", "chosen": "", "rejected": "有内容。"},
        {"prompt": "问题四", "chosen": "很长很长很长很长的回答。", "rejected": "短"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "doctor"
    data_doctor.main(["--data_path", str(data), "--base_model", str(tiny_model_dir), "--cutoff_len", "256", "--output_dir", str(out)])
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["records"] == 5 and report["pairs"] == 4 and report["formats"] == {"alpaca": 3, "trl": 1}
    assert report["invalid_records"] == 1 and report["invalid_examples"] == [f"{data}:4: 'chosen' is empty; a pair needs two answers"]
    assert report["identical_answers"] == 1 and report["identical_examples"] == [f"{data}:2"]
    assert report["duplicate_prompts"] == 1
    assert report["dropped_by_truncation_or_identical_tokens"] == {"dropped: chosen and rejected identical": 1}
    assert report["chosen_longer_share"] == 1.0
    assert "Length bias" in (out / "report.md").read_text(encoding="utf-8")
    assert "5 preference records" in capsys.readouterr().out
