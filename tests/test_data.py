"""Data loading, validation, exact label masks, truncation, cache, collation."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import sentencepiece as spm

import finetune
from chinese_vicuna.data.collate import PaddingCollator
from chinese_vicuna.data.datasets import load_instruction_dataset, split_train_val
from chinese_vicuna.data.encode import IGNORE_INDEX, TokenizeStats, tokenize_instructions
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from conftest import SAMPLE_INSTRUCT, read_jsonl, run_script

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def test_hf_ids_equal_sentencepiece_on_chinese(tiny_model_dir: Path, tok) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    texts = ["你好，世界！“引号”（括号）《书名》：；、。？……——", "GPU 和 LoRA：显存 11GB，batch=4。\n第二行"]
    for rec in read_jsonl(SAMPLE_INSTRUCT):
        texts += [rec["instruction"], rec["output"]] + ([rec["input"]] if rec["input"] else [])
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert tok.decode(sp.encode(texts[0])) == texts[0]


def test_exact_labels_bos_prompt_masked_response_and_eos_trained(tok) -> None:
    template = load_template("alpaca", tok)
    rec = {"instruction": "中国的首都是哪里？", "input": "", "output": "北京是中国的首都。"}
    [sample] = tokenize_instructions([rec], tok, template, cutoff_len=256)
    prompt = tok(template.instruction_prompt(rec["instruction"]), add_special_tokens=False)["input_ids"]
    # the answer is a continuation of the prompt: whole-text tokenization, no dummy-prefix "▁" (pitfall 16)
    whole = tok(template.instruction_prompt(rec["instruction"]) + rec["output"], add_special_tokens=False)["input_ids"]
    assert whole[: len(prompt)] == prompt
    answer = whole[len(prompt) :]
    assert tok.convert_ids_to_tokens(answer)[0] != "▁"
    assert sample["input_ids"] == [BOS, *prompt, *answer, EOS]
    assert sample["labels"] == [IGNORE_INDEX] * (1 + len(prompt)) + answer + [EOS]
    [with_inputs] = tokenize_instructions([rec], tok, template, cutoff_len=256, train_on_inputs=True)
    assert with_inputs["labels"] == [IGNORE_INDEX, *prompt, *answer, EOS]


def test_padding_is_masked_by_position_even_when_pad_equals_eos(tok) -> None:
    template = load_template("alpaca", tok)
    recs = [
        {"instruction": "一加一等于几？", "input": "", "output": "二。"},
        {"instruction": "说一个成语。", "input": "", "output": "喜出望外，心花怒放。"},
    ]
    samples = tokenize_instructions(recs, tok, template, cutoff_len=256)
    batch = PaddingCollator(pad_token_id=EOS)(samples)  # pad == eos: pitfall 3/4
    short = min(range(2), key=lambda i: len(samples[i]["input_ids"]))
    n = len(samples[short]["input_ids"])
    assert batch["labels"][short, n - 1].item() == EOS  # the real EOS is still trained
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, n:] == EOS).all()
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][short, :n].tolist() == samples[short]["labels"]


def test_truncation_and_untrainable_samples_are_counted(tok, caplog) -> None:
    template = load_template("alpaca", tok)
    recs = [
        {"instruction": "中国的首都是哪里？", "input": "", "output": "北京是中国的首都。"},
        {"instruction": "问" * 300, "input": "", "output": "答"},
    ]
    cutoff = len(tokenize_instructions(recs[:1], tok, template, cutoff_len=10_000)[0]["input_ids"])
    stats = TokenizeStats()
    samples = tokenize_instructions(recs, tok, template, cutoff_len=cutoff, stats=stats)
    assert len(samples) == 1 and len(samples[0]["input_ids"]) == cutoff  # the first fits exactly
    assert (stats.total, stats.kept, stats.truncated, stats.dropped_no_trainable) == (2, 1, 1, 1)
    with caplog.at_level(logging.INFO):
        stats.log("x.jsonl")
    assert "2 records → 1 samples; 1 truncated at cutoff_len; 1 dropped with no trainable token" in caplog.text


def test_cache_second_run_does_not_tokenize(tok, tmp_path: Path, caplog) -> None:
    template = load_template("alpaca", tok)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(SAMPLE_INSTRUCT.read_text(encoding="utf-8").splitlines()[:10]), encoding="utf-8")
    with caplog.at_level(logging.INFO):
        first = load_instruction_dataset(data, tok, template, 256, cache_dir=tmp_path / "cache")
        assert "loaded from cache" not in caplog.text
        second = load_instruction_dataset(data, tok, template, 256, cache_dir=tmp_path / "cache")
    assert "10 tokenized samples loaded from cache" in caplog.text
    assert first.to_list() == second.to_list()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    load_instruction_dataset(data, tok, template, 128, cache_dir=tmp_path / "cache")  # other settings → other key
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_json_list_and_folder_inputs(tok, tmp_path: Path) -> None:
    template = load_template("alpaca", tok)
    en = SAMPLE_INSTRUCT.parent / "data_sample_en.json"
    assert len(load_instruction_dataset(en, tok, template, 256, use_cache=False)) == len(json.loads(en.read_text(encoding="utf-8")))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.json").write_text(en.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "b.jsonl").write_text(SAMPLE_INSTRUCT.read_text(encoding="utf-8"), encoding="utf-8")
    assert len(load_instruction_dataset(folder, tok, template, 256, use_cache=False)) == 8 + 72


def test_val_split_is_a_count_and_seeded() -> None:
    samples = [{"input_ids": [i]} for i in range(50)]
    train, val = split_train_val(samples, 10, seed=1)
    assert len(train) == 40 and len(val) == 10
    assert split_train_val(samples, 10, seed=1) == (train, val)
    assert sorted(s["input_ids"][0] for s in train + val) == list(range(50))
    assert split_train_val(samples, 0) == (samples, [])


BAD_FILES = {
    "invalid_json.jsonl": (
        b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
        r"invalid_json\.jsonl:2: invalid JSON",
    ),
    "missing_instruction.jsonl": (b'{"output": "b"}\n', r"missing_instruction\.jsonl:1: missing field 'instruction'"),
    "missing_output.json": (
        b'[{"instruction": "a", "output": "b"}, {"instruction": "a"}]',
        r"missing_output\.json record 2: missing field 'output'",
    ),
    "not_a_string.jsonl": (
        b'{"instruction": "a", "input": 3, "output": "b"}\n',
        r"not_a_string\.jsonl:1: field 'input' must be a string, got int",
    ),
    "empty.jsonl": (b"  \n", r"empty\.jsonl: the file is empty"),
    "latin1.jsonl": (
        '{"instruction": "a", "output": "b"}\n{"instruction": "café", "output": "b"}\n'.encode("latin-1"),
        r"latin1\.jsonl:2: bytes that are not UTF-8",
    ),
    "not_a_list.json": (b'{"instruction": "a", "output": "b"}', r"not_a_list\.json: a \.json data file must hold a list"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_bad_data_file_ends_with_one_clear_line(name: str, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    content, pattern = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        finetune.main(
            ["--base_model", str(tiny_model_dir), "--data_path", str(path), "--output_dir", str(tmp_path / "out"), "--val_set_size", "0"]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert re.search(pattern, err[-1]), err[-1]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_user_errors_have_no_traceback_in_a_real_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n', encoding="utf-8")
    proc = run_script("finetune.py", "--base_model", str(tiny_model_dir), "--data_path", str(bad), "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: {bad}:1: missing field 'output' (an alpaca record needs 'instruction' and 'output')"
    )
    proc = run_script("finetune.py", "--base_model", str(tmp_path / "nowhere"), "--data_path", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nowhere" in proc.stderr.strip().splitlines()[-1]
