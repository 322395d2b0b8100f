"""Reliability of data, files and file mode (issue 15, items 4-8): JSON lines split at "\\n"
only, wrong training data never silent, one line for every bad input, files with the umask's
permissions, special-token text kept as text."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import generate
from chinese_vicuna.data.cache import cache_key
from chinese_vicuna.data.datasets import load_instruction_dataset
from chinese_vicuna.data.encode import IGNORE_INDEX, tokenize_instructions
from chinese_vicuna.data.fast_tokenize import encode_continuations
from chinese_vicuna.data.records import data_files, read_records
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.generation import chat_prompt_ids, prompt_ids
from chinese_vicuna.infer.jsonl import resume_point
from chinese_vicuna.model.loading import load_base_model, load_tokenizer
from chinese_vicuna.prompts import load_template
from conftest import REPO, run_script

BOS, EOS = 1, 2
SEPARATORS = "\u2028\u2029\u0085"  # line ends to str.splitlines, ordinary characters inside a JSON string


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def records_with_separators(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"第{i}题{SEPARATORS[i % 3]}换行？", "input": "", "output": f"答{SEPARATORS[i % 3]}{i}"} for i in range(n)]


# --- 1. JSON lines end at "\n" only -----------------------------------------------------------


def test_line_separators_inside_strings_stay_in_their_record(tok, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "sep.jsonl", records_with_separators(6))
    assert len(data.read_text(encoding="utf-8").splitlines()) == 18  # what str.splitlines would have made of it
    assert [r.data["output"] for r in read_records(data)] == [f"答{SEPARATORS[i % 3]}{i}" for i in range(6)]
    assert len(load_instruction_dataset(data, tok, load_template("alpaca", tok), 256, use_cache=False)) == 6


def test_resume_point_counts_lines_at_newlines_only(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "q.jsonl", records_with_separators(4))
    records = read_records(data)
    out = write_jsonl(tmp_path / "a.jsonl", [r.data for r in records[:2]])
    with out.open("ab") as f:
        f.write(json.dumps(records[2].data, ensure_ascii=False).encode()[:9])  # a run killed mid-line
    assert resume_point(out, records) == 2
    assert out.read_bytes().count(b"\n") == 2  # the torn line is cut off


def test_generate_file_mode_resumes_after_a_partial_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "q.jsonl", records_with_separators(3))
    out = tmp_path / "a.jsonl"
    argv = ["--base_model", str(tiny_model_dir), "--data_file", str(data), "--output_file", str(out)]
    argv += ["--max_new_tokens", "4", "--prompt_template", "alpaca", "--batch_size", "2"]
    generate.main(argv)
    full = read_jsonl_lines(out)
    out.write_bytes(out.read_bytes()[: -len(out.read_bytes().split(b"\n")[-2]) - 1] + b'{"instruc')  # last answer torn
    generate.main(argv)
    assert read_jsonl_lines(out) == full  # the same answers, each once
    generate.main(argv)  # complete: nothing left to do, nothing written twice
    assert read_jsonl_lines(out) == full


def read_jsonl_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").split("\n") if line]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.mark.parametrize("case", ["same_file", "folder", "binary"])
def test_bad_output_file_is_one_line_before_the_model_loads(case: str, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "q.jsonl", records_with_separators(2))
    out = {"same_file": tmp_path / "." / "q.jsonl", "folder": tmp_path / "dir.jsonl", "binary": tmp_path / "model.bin"}[case]
    if case == "folder":
        out.mkdir()
    if case == "binary":
        out.write_bytes(bytes(range(256)) * 4 + b"\n")
    with pytest.raises(SystemExit) as exc:  # the base does not exist: the check comes before loading it
        generate.main(["--base_model", str(tmp_path / "no-model"), "--data_file", str(data), "--output_file", str(out)])
    assert exc.value.code == 2
    line = error_line(capsys)
    assert {"same_file": "is the --data_file", "folder": "is a folder", "binary": "not UTF-8 JSON lines"}[case] in line, line
    assert data.read_bytes().count(b"\n") == 2


# --- 2. wrong training data is never silent --------------------------------------------------

BAD_RECORDS = {
    "null_output": ({"instruction": "a", "output": None}, r"bad\.jsonl:2: field 'output' is null"),
    "null_instruction": ({"instruction": None, "output": "b"}, r"bad\.jsonl:2: field 'instruction' is null"),
    "empty_output": ({"instruction": "a", "output": "  "}, r"bad\.jsonl:2: field 'output' is empty"),
    "list_output": ({"instruction": "a", "output": ["b"]}, r"bad\.jsonl:2: field 'output' must be a string, got list"),
    "lone_surrogate": ('{"instruction": "a\\ud800", "output": "b"}', r"bad\.jsonl:2: a lone surrogate \(\\ud800\)"),
    "long_integer": ('{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}", r"bad\.jsonl:2: a value JSON allows but Python"),
    "deep_nesting": (
        '{"instruction": "a", "output": "b", "n": ' + "[" * 100_000 + "]" * 100_000 + "}",
        r"bad\.jsonl:2: JSON nested too deeply",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_each_bad_record_is_one_line_naming_file_and_line(name: str, tok, tmp_path: Path) -> None:
    record, pattern = BAD_RECORDS[name]
    good = json.dumps({"instruction": "a", "output": "b"})
    line = record if isinstance(record, str) else json.dumps(record)
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(UserError) as exc:
        load_instruction_dataset(path, tok, load_template("alpaca", tok), 256, use_cache=False)
    assert re.search(pattern, str(exc.value)) and "\n" not in str(exc.value), str(exc.value)


def test_surrogate_escapes_in_a_json_list(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"instruction": "😀", "output": "中"}, {"instruction": "a", "output": "b"}]), encoding="utf-8")
    assert "\\ud83d\\ude00" in path.read_text(encoding="utf-8")  # ensure_ascii: a surrogate pair, one character
    assert read_records(path)[0].data["instruction"] == "😀"
    path.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "\\udfff", "output": "b"}]', encoding="utf-8")
    with pytest.raises(UserError, match=r"list\.json record 2: a lone surrogate \(\\udfff\)"):
        read_records(path)


def test_null_input_means_no_input(tok) -> None:
    from chinese_vicuna.data.records import Record, validate_instruction

    assert validate_instruction(Record({"instruction": "a", "input": None, "output": "b"}, "x:1"))["input"] == ""
    assert validate_instruction(Record({"instruction": "a", "output": None}, "x:1"), require_output=False)["output"] == ""


def test_special_token_text_in_data_stays_text(tok) -> None:
    template = load_template("alpaca", tok)
    answer = "用 <s>删除线</s> 标记，代码里写 </s>。"
    [sample] = tokenize_instructions([{"instruction": "<s>是什么？", "input": "", "output": answer}], tok, template, 512)
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.count(BOS) == 1 and ids[0] == BOS  # only the BOS the encoder adds
    assert ids.count(EOS) == 1 and ids[-1] == EOS and labels[-1] == EOS  # only the trained EOS at the end
    trained = [t for t in labels[:-1] if t != IGNORE_INDEX]
    assert trained == encode_continuations(tok, [answer], split_special_tokens=True)[0]
    assert tok.decode(trained) == answer
    # the prompt: the HF ids of the whole prompt text with "<s>" as characters
    prompt_text = template.instruction_prompt("<s>是什么？")
    assert ids[1 : len(ids) - len(trained) - 1] == tok(prompt_text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    # inference asks with the same ids
    assert prompt_ids(tok, template, "<s>是什么？") == ids[: len(ids) - len(trained) - 1]


def test_template_special_tokens_stay_ids_beside_literal_ones(tok) -> None:
    from chinese_vicuna.data.encode import encode_segments

    template = load_template("vicuna_v1.1", tok)  # its assistant turn ends with the real {eos}
    typed = [{"role": "user", "content": "写 </s>"}, {"role": "assistant", "content": "好的：</s>"}]
    ids, _ = chat_prompt_ids(tok, template, typed, "<s>再来")
    assert ids.count(BOS) == 1 and ids.count(EOS) == 1  # the encoder's BOS, the template's end of the answer
    assert "写 </s> ASSISTANT: 好的：</s></s>USER: <s>再来" in tok.decode(ids, skip_special_tokens=False)
    # text without special-token strings is encoded as before (the prefix-consistent ids)
    plain = [{"role": "user", "content": "写"}, {"role": "assistant", "content": "好的："}]
    rendered = template.chat_segments([*plain, {"role": "user", "content": "再来"}])
    assert chat_prompt_ids(tok, template, plain, "再来")[0] == encode_segments(tok, rendered)[0]


def test_cache_key_covers_file_type_and_json_holding_jsonl_fails_every_time(tok, tmp_path: Path) -> None:
    template = load_template("alpaca", tok)
    lines = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}])
    as_json = tmp_path / "d.json"
    as_json.write_bytes(lines.read_bytes())
    assert cache_key([lines], tok, {}) != cache_key([as_json], tok, {})
    load_instruction_dataset(lines, tok, template, 256, cache_dir=tmp_path / "cache")
    for _ in range(2):
        with pytest.raises(UserError, match=r"d\.json:2: invalid JSON"):
            load_instruction_dataset(as_json, tok, template, 256, cache_dir=tmp_path / "cache")


def test_auto_template_cache_follows_the_chat_template(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    tok = load_tokenizer(str(tiny_model_dir))  # its own copy: the chat_template is changed below
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    from chinese_vicuna.data.datasets import load_chat_dataset

    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]}])
    first = load_chat_dataset(data, tok, load_template("auto", tok), 256, cache_dir=tmp_path / "cache")
    tok.chat_template = tok.chat_template.replace(": ", " says ")
    with caplog.at_level(logging.INFO):
        second = load_chat_dataset(data, tok, load_template("auto", tok), 256, cache_dir=tmp_path / "cache")
    assert "loaded from cache" not in caplog.text
    assert first.to_list() != second.to_list()


TEMPLATE_ERRORS = {
    "no_prompt_input": ({"prompt_no_input": "Q:{instruction}\nA:"}, "an instruction template needs 'prompt_input'"),
    "input_dropped": ({"prompt_input": "Q:{instruction}\nA:", "prompt_no_input": "Q:{instruction}\nA:"}, "has no {input} placeholder"),
    "a_list": ([{"prompt_input": "x"}], "a template must be a JSON object, got list"),
    "chat_no_assistant": ({"user_format": "U:{content}\n", "assistant_prefix": "A:"}, "a chat template needs 'assistant_format'"),
    "stop_string": ({"prompt_input": "{instruction}{input}", "prompt_no_input": "{instruction}", "stop": "###"}, "'stop' must be a list"),
    "flag_type": (
        {"user_format": "{content}", "assistant_prefix": "", "assistant_format": "{content}", "strip_content": "yes"},
        "true or false",
    ),
}


@pytest.mark.parametrize("name", sorted(TEMPLATE_ERRORS))
def test_template_files_are_checked_at_load(name: str, tmp_path: Path) -> None:
    spec, message = TEMPLATE_ERRORS[name]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(UserError) as exc:
        load_template(str(path))
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value), str(exc.value)


def test_data_folder_skips_hidden_counts_others_and_rejects_non_files(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.jsonl", "b.json"):
        (folder / name).write_text(
            '[{"instruction": "a", "output": "b"}]' if name.endswith(".json") else '{"instruction": "a", "output": "b"}\n'
        )
    (folder / ".a.jsonl.swp").write_text("x")
    (folder / "notes.txt").write_text("x")
    (folder / "README.md").write_text("x")
    with caplog.at_level(logging.INFO):
        assert [p.name for p in data_files(folder)] == ["a.jsonl", "b.json"]
    assert "2 .json or .jsonl files read; skipped 1 hidden and 2 other entries (README.md, notes.txt)" in caplog.text
    (folder / "x.json").mkdir()
    with pytest.raises(UserError, match=r"x\.json: is a folder, not a data file"):
        data_files(folder)
    (folder / "x.json").rmdir()
    (folder / "loop.jsonl").symlink_to(folder / "loop.jsonl")
    with pytest.raises(UserError, match=r"loop\.jsonl: cannot open \(Too many levels of symbolic links\)"):
        data_files(folder)


def test_unreadable_data_file_is_one_line(tmp_path: Path) -> None:
    """A real permission error in a real process: as root, without the capabilities that let root
    read any file (setpriv), else as the user."""
    data = write_jsonl(tmp_path / "secret.jsonl", [{"instruction": "a", "output": "b"}])
    data.chmod(0o000)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads every file and setpriv is missing to drop that")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    code = "from chinese_vicuna.data.records import read_records\nfrom chinese_vicuna.errors import UserError\n"
    code += f"try:\n    read_records({str(data)!r})\nexcept UserError as e:\n    print(e)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*prefix, sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == f"{data}: cannot read the file (Permission denied); check its permissions", proc.stderr[-2000:]


# --- 3. one line for a bad model folder or a missing package ---------------------------------


def test_base_without_tokenizer_and_truncated_weights_are_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(UserError, match=r"bare: no tokenizer files \(tokenizer\.json, tokenizer\.model or vocab\.json\)"):
        load_tokenizer(str(bare))
    weights = bare / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(UserError, match=rf"{re.escape(str(weights))}: truncated or damaged \(\d+ bytes; its header describes \d+\)"):
        load_base_model(str(bare))


def test_convert_to_gguf_without_gguf_says_what_to_install(tiny_model_dir: Path, tmp_path: Path) -> None:
    shadow = tmp_path / "no-gguf"
    shadow.mkdir()
    (shadow / "gguf.py").write_text("raise ImportError('No module named gguf')\n")  # as if not installed
    env = {"PYTHONPATH": f"{shadow}{os.pathsep}{REPO}"}
    proc = run_script("tools/convert_to_gguf.py", "--model_dir", str(tiny_model_dir), "--outfile", str(tmp_path / "m.gguf"), env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (
        proc.stderr.strip().splitlines()[-1] == "error: writing GGUF files needs the gguf package: pip install -r requirements-llamacpp.txt"
    )
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))


# --- 4. files others can read ----------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_written_files_follow_the_umask(umask: int, tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os, stat
        from pathlib import Path
        from chinese_vicuna.files import atomic_write_text
        from chinese_vicuna.export.tensors import StagingDir
        root = Path({str(tmp_path)!r})
        atomic_write_text(root / "manifest.json", "{{}}")
        import torch
        from safetensors.torch import save_file
        with StagingDir(root / "model") as stage:
            atomic_write_text(stage.path / "config.json", "{{}}")
            save_file({{"w": torch.zeros(2)}}, str(stage.path / "model.safetensors"))  # safetensors writes 0600: a merged model
        for p in ("manifest.json", "model", "model/config.json", "model/model.safetensors"):
            print(oct(stat.S_IMODE((root / p).stat().st_mode)))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, umask=umask
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [oct(0o666 & ~umask), oct(0o777 & ~umask), oct(0o666 & ~umask), oct(0o666 & ~umask)]


# --- 5. merge outputs are never lost ---------------------------------------------------------


def old_model(out: Path) -> Path:
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "config.json").write_text("{}")
    return out


def test_overwrite_interrupted_during_the_swap_keeps_the_old_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from chinese_vicuna.export.tensors import StagingDir

    out = old_model(tmp_path / "merged")
    real_rename = os.rename

    def killed(src, dst) -> None:  # the staging folder → target rename: interrupted (Ctrl-C)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), StagingDir(out, overwrite=True) as stage:
        (stage.path / "model.safetensors").write_bytes(b"new weights")
        monkeypatch.setattr(os, "rename", lambda src, dst: killed(src, dst) if Path(src) == stage.path else real_rename(src, dst))
    monkeypatch.setattr(os, "rename", real_rename)
    assert (out / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # the aborted staging folder is gone too, and the lock
    with StagingDir(out, overwrite=True) as stage:
        (stage.path / "model.safetensors").write_bytes(b"new weights")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # replaced as a whole
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_second_writer_of_the_same_model_is_refused_and_leaves_the_first_intact(tmp_path: Path) -> None:
    from chinese_vicuna.export.tensors import StagingDir

    out = old_model(tmp_path / "merged")
    with StagingDir(out, overwrite=True) as first:
        (first.path / "model.safetensors").write_bytes(b"new weights")
        with pytest.raises(
            UserError,
            match=rf"--output_dir {re.escape(str(out))}: in use by pid {os.getpid()} \(.*\), since .*; wait for it to end, or choose another --output_dir$",
        ):
            StagingDir(out, overwrite=True)  # would have removed the first one's staging folder as a leftover
        assert (first.path / "model.safetensors").is_file()
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    with StagingDir(out, overwrite=True) as third:  # the lock went with the first writer
        (third.path / "model.safetensors").write_bytes(b"newer")
    assert (out / "model.safetensors").read_bytes() == b"newer"


def test_leftovers_of_a_killed_merge_are_cleaned_and_the_old_model_put_back(tmp_path: Path, caplog) -> None:
    from chinese_vicuna.export.tensors import StagingDir

    out = old_model(tmp_path / "merged")
    # kill -9 between the two renames: the old model in .old-*, the new one in .partial-*, no target
    os.rename(out, tmp_path / ".merged.old-abc")
    (tmp_path / ".merged.partial-def").mkdir()
    (tmp_path / ".merged.partial-def" / "model.safetensors").write_bytes(b"new, maybe half")
    (tmp_path / ".other.partial-x").mkdir()  # another target's: not ours to remove
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="already holds weights"):
        StagingDir(out)  # without --overwrite: refused, but the old model is back first
    assert (out / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-x", "merged"]
    assert f"{out}: put back the model an interrupted run was replacing" in caplog.text
    assert f"removed {tmp_path / '.merged.partial-def'}, left by an interrupted run" in caplog.text
    # a folder of the user's own files is never replaced without --overwrite
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    with pytest.raises(UserError, match=r"holds other files \(todo\.txt, \.\.\.\)"):
        StagingDir(notes)


# --- 6. issue 31: data tools stream, exit codes that tell, one writer per output ------------------


def test_a_json_list_is_read_incrementally_and_equals_json_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chinese_vicuna.data.records as records_module

    records = [{"instruction": f"第{i}题" * (i % 5 + 1), "input": "", "output": f"答{i}", "n": 10**12 + i, "x": i / 7} for i in range(200)]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    for block in (1, 7, 4096):  # windows smaller than one record, than a number, than the file
        monkeypatch.setattr(records_module, "READ_BLOCK", block)
        assert [r.data for r in read_records(path)] == records
        assert [r.where for r in read_records(path)][-1] == f"{path} record 200"
    bad = tmp_path / "bad.json"
    bad.write_text('[{"a": 1},\n {"a": 2} {"a": 3}]', encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{bad}:2: invalid JSON (Expecting ',' delimiter at column 11)")):
        read_records(bad)


def test_doctor_memory_does_not_grow_with_the_file(tok, tmp_path: Path) -> None:
    """Peak Python memory (tracemalloc: numpy arrays included) of a report on a file and on one 4× larger,
    as a .json list and as JSON lines: the larger file adds what its per-record digests need, not its size."""
    import tracemalloc

    from chinese_vicuna.datatools.doctor import diagnose

    template = load_template("alpaca", tok)

    def data(n: int, suffix: str) -> Path:
        rng = __import__("random").Random(n)
        records = [
            {
                "instruction": "".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(30)),
                "input": "",
                "output": "回答" * (100 + i * 37 % 300),  # every chunk alike: the same peak of one chunk's work
            }
            for i in range(n)
        ]
        path = tmp_path / f"d{n}{suffix}"
        text = (
            json.dumps(records, ensure_ascii=False)
            if suffix == ".json"
            else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        )
        path.write_text(text, encoding="utf-8")
        return path

    for suffix in (".json", ".jsonl"):
        peaks, sizes = [], []
        for n in (800, 3200):  # about 2 and 8 MB
            path = data(n, suffix)
            tracemalloc.start()
            report, _ = diagnose(path, tok, template, 256, 0.7, near_duplicate_window=100, chunk_records=256)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            assert report["valid_records"] == n
            sizes.append(path.stat().st_size)
        grown, added = peaks[1] - peaks[0], sizes[1] - sizes[0]
        # a digest per record (exact duplicates) grows; reading the file whole alone would add more than `added`
        assert grown < added / 4, (suffix, peaks, sizes)


def test_judge_that_failed_every_judgment_exits_non_zero_and_a_partial_failure_is_counted(tmp_path: Path, capsys) -> None:
    from eval_judge import main
    from test_eval_judge import QUESTIONS, ScriptedEndpoint, write_answers

    answers = write_answers(tmp_path / "alpha.jsonl", "alpha", lambda q, t: f"回答{q}-{t}")
    server = ScriptedEndpoint()
    import threading

    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        argv = ["--questions", str(QUESTIONS), "--judge_api_base", server.url, "--judge_model", "judge-x", "--answers", str(answers),
                "--progress", "false", "--parallel", "2"]  # fmt: skip
        server.script = lambda n, body: "I will not rate this."
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--output_dir", str(tmp_path / "none")])
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"error: --judge_api_base {server.url} --judge_model judge-x: all 11 judgments failed")
        server.script = lambda n, body: "Rating: [[6]]" if "回答1-" in body["messages"][-1]["content"] else "no verdict"
        results = main([*argv, "--output_dir", str(tmp_path / "some")])
        assert results == {"alpha": {"score": 6.0, "judged": 2, "failed": 9}}
    finally:
        server.shutdown()
        server.server_close()


def test_empty_replies_are_not_answers_and_are_asked_again(tmp_path: Path, capsys) -> None:
    import threading

    from gen_model_answer import main
    from test_eval_judge import ScriptedEndpoint, two_questions

    server = ScriptedEndpoint()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    out = tmp_path / "answers.jsonl"
    questions = two_questions(tmp_path)
    argv = ["--questions", str(questions), "--api_base", server.url, "--api_model", "m", "--answer_file", str(out), "--parallel", "1"]
    try:
        server.script = lambda n, body: None  # `content: null`
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: --api_base {server.url} --api_model m: all 2 replies were empty, none saved to {out}; check the model or endpoint and rerun"
        )
        assert len(server.requests) == 2  # no second turn asked after an empty first one
        assert not out.is_file() or read_jsonl_text(out) == []
        first_question = json.loads(questions.read_text(encoding="utf-8").splitlines()[0])["turns"][0]
        server.script = lambda n, body: "" if body["messages"][0]["content"] == first_question else "答"
        main(argv)  # one question answered, one empty: exit 0 with a count
        assert len(read_jsonl_text(out)) == 1
        server.script = lambda n, body: "答"
        main(argv)  # the empty one is asked again
        assert len(read_jsonl_text(out)) == 2
    finally:
        server.shutdown()
        server.server_close()


def read_jsonl_text(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_eval_choice_with_no_answer_column_is_one_line(tmp_path: Path, capsys) -> None:
    from eval_choice import main

    data = tmp_path / "ceval"
    (data / "val").mkdir(parents=True)
    (data / "dev").mkdir()
    header = "id,question,A,B,C,D"
    (data / "val" / "computer_network_val.csv").write_text(f"{header}\n0,1+1=?,1,2,3,4\n", encoding="utf-8")
    (data / "dev" / "computer_network_dev.csv").write_text(f"{header},answer,explanation\n0,2+2=?,1,2,3,4,D,\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["--base_model", "unused", "--data_dir", str(data), "--split", "val", "--ntrain", "0", "--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --data_dir {data} --split val: none of the 1 questions has an answer (no answer column), "
        "so nothing can be scored; use a split with answers (val or dev)"
    )


def test_self_instruct_names_a_non_json_endpoint_and_asks_only_for_what_is_missing(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from openai_stub import StubServer

    from chinese_vicuna.datatools.selfinstruct import SelfInstructConfig, generate

    arrivals = []

    class NotJson(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            arrivals.append(1)
            body = b"\x80\x81 <html>bad gateway</html>"  # neither JSON nor UTF-8
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NotJson)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        cfg = SelfInstructConfig(model="m", num_samples=1, output_file=str(tmp_path / "a.jsonl"), api_base=base, api_key="k",
                                 concurrency=4, max_retries=0, max_useless_requests=3, progress=False)  # fmt: skip
        with pytest.raises(UserError, match=rf"^{re.escape(base)}: the last 3 replies were not JSON .*check that --api_base is an OpenAI"):
            generate(cfg)
        assert len(arrivals) == 3  # one request at a time for one missing record, not one per worker
    finally:
        httpd.shutdown()
        httpd.server_close()
    out = tmp_path / "b.jsonl"
    with StubServer([], per_reply=3) as server:
        cfg = SelfInstructConfig(model="m", num_samples=4, output_file=str(out), api_base=server.base, api_key="k",
                                 concurrency=4, records_per_request=3, progress=False)  # fmt: skip
        generate(cfg)
    assert len(read_jsonl_text(out)) == 4 and len(server.arrivals) == 2  # 3 + 1 missing: two requests, not four


@pytest.mark.parametrize("case", ["self_instruct", "data_doctor"])
def test_an_output_under_a_file_is_one_line(case: str, tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    if case == "self_instruct":
        from self_instruct import main

        argv = ["--api_base", "http://127.0.0.1:9/v1", "--model", "m", "--num_samples", "3", "--output_file", str(a_file / "out.jsonl")]
        expected = f"error: --output_file {a_file / 'out.jsonl'}: {a_file} is a file, not a folder; choose another --output_file"
    else:
        from data_doctor import main

        argv = ["--data_path", str(a_file), "--base_model", "unused", "--cutoff_len", "64", "--output_dir", str(a_file)]
        expected = f"error: --output_dir {a_file}: is a file, not a folder; choose another --output_dir"
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == expected


def test_convert_data_names_the_output_it_cannot_write(tmp_path: Path, capsys) -> None:
    from convert_data import main

    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "问", "input": "", "output": "答"}])
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(src), "--output", "/proc/x.jsonl", "--to", "alpaca"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: /proc/x.jsonl: not found; check the path"


def hold_in_another_process(path: Path, flag: str) -> subprocess.Popen:
    """A process that holds `path`'s output lock until killed (it prints once it holds it)."""
    code = f"from chinese_vicuna.outputlock import hold_output_folder; hold_output_folder({str(path)!r}, {flag!r}); print('held', flush=True); input()"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("tool", ["convert_data", "data_doctor", "eval_judge", "gen_model_answer", "self_instruct"])
def test_every_tool_refuses_an_output_in_use_and_names_the_process(tool: str, tmp_path: Path, capsys) -> None:
    import importlib

    from test_eval_judge import QUESTIONS, write_answers

    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "问", "input": "", "output": "答"}])
    answers = write_answers(tmp_path / "alpha.jsonl", "alpha", lambda q, t: "答")
    out, flag = tmp_path / "out", "--output_dir"
    argv = {
        "convert_data": ["--input", str(src), "--to", "alpaca", "--output", str(out)],
        "data_doctor": ["--data_path", str(src), "--base_model", "unused", "--cutoff_len", "64", "--output_dir", str(out)],
        "eval_judge": ["--questions", str(QUESTIONS), "--answers", str(answers), "--judge_api_base", "http://127.0.0.1:9/v1",
                       "--judge_model", "j", "--judge_api_key", "k", "--output_dir", str(out)],
        "gen_model_answer": ["--questions", str(QUESTIONS), "--api_base", "http://127.0.0.1:9/v1", "--api_model", "m", "--answer_file", str(out)],
        "self_instruct": ["--api_base", "http://127.0.0.1:9/v1", "--model", "m", "--api_key", "k", "--num_samples", "3",
                          "--output_file", str(out)],
    }[tool]  # fmt: skip
    flag = argv[-2]
    holder = hold_in_another_process(out, flag)
    try:
        with pytest.raises(SystemExit) as exit_info:
            importlib.import_module(tool).main(argv)
        assert exit_info.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"error: {flag} {out}: in use by pid {holder.pid} (python")
        assert line.endswith(f"; wait for it to end, or choose another {flag}")
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()  # nothing was written while it was refused


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    from chinese_vicuna.outputlock import OutputLock, lock_file

    out = tmp_path / "out"
    holder = hold_in_another_process(out, "--output_dir")
    with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
        OutputLock(out)
    holder.send_signal(__import__("signal").SIGKILL)  # no chance to let go: the kernel releases its flock
    holder.wait()
    assert lock_file(out).is_file()  # what it left
    with OutputLock(out):
        pass
    assert not lock_file(out).exists()
