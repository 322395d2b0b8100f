"""Data in the hub's formats (chinese_vicuna/data/records.py): Parquet, CSV, Arrow, a
`save_to_disk` folder, a local clone of a hub dataset repository and a hub id (from the datasets
cache, offline) give the same records, and so the same token ids, as the same records in JSONL;
Parquet is read a record batch at a time."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chinese_vicuna.data.datasets import load_chat_dataset, load_instruction_dataset
from chinese_vicuna.data.records import TABLE_BATCH_ROWS, data_files, read_records
from chinese_vicuna.errors import UserError
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from conftest import REPO, SAMPLE_INSTRUCT, read_jsonl, run_script

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

RECORDS = read_jsonl(SAMPLE_INSTRUCT)[:40]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def hub_forms(root: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows as JSONL and in each of the hub's forms."""
    root.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    forms = {"jsonl": write_jsonl(root / "data.jsonl", rows)}
    forms["parquet"] = root / "data.parquet"
    pq.write_table(table, forms["parquet"], row_group_size=7)  # several row groups and batches
    forms["csv"] = root / "data.csv"
    with forms["csv"].open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    forms["arrow"] = root / "data.arrow"
    with pa.OSFile(str(forms["arrow"]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=5):
            writer.write_batch(batch)
    forms["save_to_disk"] = root / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(forms["save_to_disk"]))
    forms["save_to_disk_dict"] = root / "saved-dict"
    held_out = datasets.Dataset.from_list(rows[:3])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": held_out}).save_to_disk(str(forms["save_to_disk_dict"]))
    repo = forms["hub_repo"] = root / "hub-repo"
    (repo / "data").mkdir(parents=True)
    (repo / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n", encoding="utf-8")
    (repo / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# a dataset\n", encoding="utf-8")
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), repo / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), repo / "data" / "train-00001-of-00002.parquet")
    pq.write_table(held_out.data.table, repo / "data" / "test-00000-of-00001.parquet")  # not training data
    return forms


def test_every_form_reads_the_same_records(tmp_path: Path) -> None:
    rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in RECORDS]
    forms = hub_forms(tmp_path, rows)
    for name, path in forms.items():
        got = [r.data for path in data_files(path) for r in read_records(path)]
        assert got == rows, name
    assert [f.name for f in data_files(forms["hub_repo"])] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert read_records(forms["parquet"])[8].where == f"{forms['parquet']} row 9"
    assert read_records(forms["csv"])[0].where == f"{forms['csv']}:2"


def test_every_form_trains_on_the_same_token_ids(tmp_path: Path, tok) -> None:
    """finetune.py's loader: the same samples (input_ids and labels) from every form; the
    validators run on each (a record with an empty output is refused naming its row)."""
    rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in RECORDS]
    forms = hub_forms(tmp_path, rows)
    template = load_template("alpaca", tok)
    want = load_instruction_dataset(forms["jsonl"], tok, template, 256, cache_dir=tmp_path / "cache").to_list()
    assert len(want) == len(rows)
    for name, path in forms.items():
        got = load_instruction_dataset(path, tok, template, 256, cache_dir=tmp_path / "cache").to_list()
        assert got == want, name
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([*rows[:3], {"instruction": "x", "input": "", "output": ""}]), bad)
    with pytest.raises(UserError, match=r"bad\.parquet row 4: field 'output' is empty"):
        load_instruction_dataset(bad, tok, template, 256, use_cache=False)


def test_chat_data_from_parquet(tmp_path: Path, tok) -> None:
    """ShareGPT conversations as Parquet (list<struct> columns, as on the hub) give finetune_chat.py
    the samples the same JSONL gives."""
    sample = REPO / "sample" / "chat" / "sharegpt_sample.jsonl"
    if not sample.is_file():
        sample = next((REPO / "sample" / "chat").glob("*sharegpt*.json*"))
    rows = [r.data for r in read_records(sample)]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", rows)
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    template = load_template("chinese-vicuna-chat", tok)
    want = load_chat_dataset(jsonl, tok, template, 512, use_cache=False).to_list()
    assert load_chat_dataset(parquet, tok, template, 512, use_cache=False).to_list() == want


def test_a_hub_id_is_read_from_the_datasets_cache_offline(tmp_path: Path) -> None:
    """`--data_path user/name`: datasets.load_dataset, offline, from the datasets cache an earlier
    online run left (built here by datasets' own Parquet builder and put where a hub dataset's
    cache lives: HF_DATASETS_CACHE/user___name/config/version/commit)."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in RECORDS[:10]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    commit = "0123456789abcdef0123456789abcdef01234567"
    files = DataFilesDict.from_patterns({"train": [str(tmp_path / "train-00000-of-00001.parquet")]})
    builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name="alpaca-zh", config_name="default", hash=commit, data_files=files)
    builder.download_and_prepare()
    cache = tmp_path / "hf" / "datasets"
    shutil.copytree(builder.cache_dir, cache / "someone___alpaca-zh" / "default" / "0.0.0" / commit)
    code = (
        "import json\n"
        "from chinese_vicuna.data.records import read_records\n"
        "print(json.dumps([r.data for r in read_records('someone/alpaca-zh')], ensure_ascii=False))\n"
    )
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache),
    }  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == rows
    missing = code.replace("someone/alpaca-zh", "nobody/missing")
    proc = subprocess.run([sys.executable, "-c", missing], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "not loadable as a hub dataset" in proc.stderr


def test_finetune_and_the_data_tools_take_parquet(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The command lines: finetune.py --data_path x.parquet trains; data_doctor.py and
    convert_data.py read a Parquet file and a save_to_disk folder."""
    rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in RECORDS[:8]]
    forms = hub_forms(tmp_path / "forms", rows)
    out = tmp_path / "lora"
    proc = run_script(
        "finetune.py", "--base_model", str(tiny_model_dir), "--data_path", str(forms["parquet"]), "--output_dir", str(out),
        "--micro_batch_size", "4", "--batch_size", "4", "--num_epochs", "1", "--val_set_size", "0", "--cutoff_len", "128",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    doctor = tmp_path / "doctor"
    proc = run_script(
        "tools/data_doctor.py", "--data_path", str(forms["save_to_disk"]), "--base_model", str(tiny_model_dir), "--cutoff_len", "128",
        "--output_dir", str(doctor),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((doctor / "report.json").read_text(encoding="utf-8"))["records"] == len(rows)
    converted = tmp_path / "converted.jsonl"
    proc = run_script("tools/convert_data.py", "--input", str(forms["parquet"]), "--output", str(converted), "--to", "sharegpt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_jsonl(converted)) == len(rows)


def arrow_peak_reading(path: Path) -> int:
    """The most Arrow memory held while every record of `path` is read (Arrow allocates outside
    Python's heap; its pool counts every buffer)."""
    base, peak = pa.total_allocated_bytes(), 0
    for i, _ in enumerate(read_records_iter(path)):
        if i % 64 == 0:
            peak = max(peak, pa.total_allocated_bytes() - base)
    return peak


def read_records_iter(path: Path):
    from chinese_vicuna.data.records import iter_records

    return iter_records(path)


def test_parquet_memory_is_flat_in_the_file_size(tmp_path: Path) -> None:
    """A Parquet file of one row group (the worst case: pyarrow's default for files under a
    million rows) is read a record batch at a time: four times the rows, about the same memory."""
    import random

    rnd = random.Random(0)
    peaks, sizes = [], []
    for batches in (8, 32):
        rows = [
            {"instruction": f"问题{i}", "input": "", "output": "".join(chr(0x4E00 + rnd.randrange(3000)) for _ in range(200))}
            for i in range(batches * TABLE_BATCH_ROWS)
        ]
        table = pa.Table.from_pylist(rows)
        path = tmp_path / f"{batches}.parquet"
        pq.write_table(table, path, row_group_size=len(rows))
        sizes.append(table.nbytes)
        del rows, table
        peaks.append(arrow_peak_reading(path))
    assert peaks[1] < peaks[0] * 1.5 < sizes[1] / 2, (peaks, sizes)


def test_clear_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"broken\.parquet: cannot read it as Parquet"):
        read_records(broken)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("instruction,output\na,b,c\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"ragged\.csv:2: 1 more values than the header"):
        read_records(ragged)
    saved = tmp_path / "dict"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([{"a": "b"}])}).save_to_disk(str(saved))
    with pytest.raises(UserError, match="without a 'train' split"):
        data_files(saved)
    shutil.rmtree(saved)
