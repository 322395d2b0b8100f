"""board.py, the training page, in headless Chromium on the tiny model: a malformed data file
shows the data doctor's line and starts nothing; an SFT run from sample/ data starts, its step
counter and loss curve advance, a reload finds it still running, a second run into its folder is
refused, Stop (Ctrl-C) and Resume carry it to the end, the command shown is the child's argv,
and the chat tab answers with what the run memorized. The flags file the page saves, run by hand
with finetune.py unchanged, trains the same loss curve. Screenshots (Chinese and English) go to
$CHINESE_VICUNA_SCREENSHOTS (docs/images)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
from test_generate_app import browser_page, screenshot, serve

from conftest import read_jsonl, run_script

# conftest.memorize_args' settings: the tiny model memorizes 8 records in 120 steps
SETTINGS = {
    "#length": "256", "#num_epochs": "60", "#learning_rate": "0.003", "#micro_batch_size": "4", "#batch_size": "4",
    "#val_set_size": "0", "#lora_r": "16", "#lora_alpha": "32", "#lora_dropout": "0", "#warmup_steps": "0",
    "#logging_steps": "1", "#save_steps": "40",
}  # fmt: skip
TOTAL_STEPS = 120


def child_argv(runs_dir: Path) -> list[str]:
    """The argv of the running child, as the kernel has it."""
    (run,) = [json.loads(p.read_text()) for p in runs_dir.glob("*/run.json")]
    raw = Path(f"/proc/{run['pid']}/cmdline").read_bytes()
    return [a.decode() for a in raw.split(b"\0")[:-1]]


def step_shown(page) -> int:
    match = re.search(r"(?:步数|step) (\d+)/", page.locator("#progress").inner_text())
    return int(match.group(1)) if match else 0


def wait_for_step(page, at_least: int) -> None:
    page.wait_for_function(
        "n => { const m = document.querySelector('#progress').innerText.match(/(?:步数|step) (\\d+)\\//); return m && +m[1] >= n }",
        arg=at_least,
        timeout=300_000,
    )


def wait_for_checkpoint(folder: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (folder / "adapter_model.safetensors").is_file():
        assert time.monotonic() < deadline, f"no {folder} within {timeout} s"
        time.sleep(0.05)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_board_runs_stops_resumes_and_chats(tiny_model_dir: Path, memorized_data: Path, tmp_path: Path):
    runs_dir, out = tmp_path / "runs", tmp_path / "lora"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "1+1=", "output": "2"}\nnot json\n', encoding="utf-8")
    first = json.loads(memorized_data.read_text(encoding="utf-8").splitlines()[0])
    args = ["board.py", "--runs_dir", str(runs_dir), "--base_model", str(tiny_model_dir)]
    with serve(*args) as (url, _), browser_page() as page:
        page.goto(url)
        # a malformed file: the doctor's line (file:line), and no run
        page.locator("#data_path textarea").fill(str(bad))
        page.locator("#output_dir textarea").fill(str(out))
        page.locator("#start-btn").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('✗')")
        assert f"{bad}:2: invalid JSON" in page.locator("#status").inner_text()
        assert not list(runs_dir.glob("*/run.json")) and not out.exists()

        # configure: the model's summary, the preview through the template, the doctor's report
        page.locator("#data_path textarea").fill(str(memorized_data))
        for selector, value in SETTINGS.items():
            page.locator(f"{selector} input").fill(value)
        page.locator("#lora_target_modules textarea").fill("all-linear")
        page.locator("#check-btn").click()
        page.wait_for_function("document.querySelector('#doctor').innerText.includes('✓')")
        assert "LlamaForCausalLM" in page.locator("#model-info").inner_text()
        assert "8 条记录" in page.locator("#doctor").inner_text()
        assert page.locator("#preview .trained").first.inner_text() == first["output"]
        assert first["instruction"] in page.locator("#preview .masked").first.inner_text()
        page.wait_for_function(  # the command follows every setting (the last ones filled)
            "['--lora_target_modules all-linear', '--save_steps 40', '--seed 42'].every("
            "f => document.querySelector('#command textarea').value.includes(f))"
        )
        shown = page.locator("#command textarea").input_value()
        screenshot(page, "board-configure.png")

        # the flags file of these settings
        flags = tmp_path / "flags.yaml"
        page.locator("#flags_file textarea").fill(str(flags))
        page.locator("#save-flags").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('finetune.py')")

        # start: the child runs exactly the command shown
        page.locator("#start-btn").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('已开始运行')")
        assert child_argv(runs_dir) == shlex.split(shown)
        open_tab(page, "运行")
        wait_for_step(page, 3)
        assert page.locator("#run-command textarea").input_value() == shown
        # a second run into the same folder is refused while this one writes it
        open_tab(page, "配置")
        page.locator("#start-btn").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('is being written by run')")
        assert len(list(runs_dir.glob("*/run.json"))) == 1

        # a reload finds the same run, still advancing
        before = step_shown(page)
        page.reload()
        open_tab(page, "运行")
        wait_for_step(page, before + 1)
        assert "运行中" in page.locator("#progress").inner_text()

        # Stop = Ctrl-C: exit 130, resumable; Resume = the same command continuing to the end
        wait_for_checkpoint(out / "checkpoint-40")  # the tiny run is fast: stop as soon as there is a checkpoint
        page.locator("#stop-btn").click()
        page.wait_for_function("document.querySelector('#progress').innerText.includes('已停止')", timeout=300_000)
        assert "退出码 130" in page.locator("#progress").inner_text()
        stopped_at = step_shown(page)
        assert 40 <= stopped_at < TOTAL_STEPS
        page.wait_for_function("document.querySelector('#loss-plot img') !== null")
        screenshot(page, "board-run.png")
        page.locator("#resume-btn").click()
        page.wait_for_function("document.querySelector('#progress').innerText.includes('运行中')")
        assert child_argv(runs_dir) == [*shlex.split(shown), "--resume_from_checkpoint", "true"]
        assert page.locator("#run-command textarea").input_value() == shlex.join(child_argv(runs_dir))
        page.wait_for_function("document.querySelector('#progress').innerText.includes('已完成')", timeout=600_000)
        assert step_shown(page) == TOTAL_STEPS
        assert (out / "adapter_model.safetensors").is_file()

        # chat with the result (streamed through Engine): the memorized answer
        open_tab(page, "对话")
        assert page.locator("#chat-adapter textarea").input_value() == str(out)
        page.locator("#message textarea").fill(first["instruction"])
        page.locator("#send-btn").click()
        bot = page.locator("#chatbot [data-testid=bot]")
        page.wait_for_function(
            "t => { const b = document.querySelector('#chatbot [data-testid=bot]'); return b && b.innerText.trim() === t }",
            arg=first["output"],
        )
        assert bot.first.inner_text().strip() == first["output"]
        screenshot(page, "board-chat.png")

        # export: merge_lora.py's command, shown
        open_tab(page, "导出")
        page.wait_for_function("document.querySelector('#export-command textarea').value.includes('merge_lora.py')")
        assert f"--lora_weights {out}" in page.locator("#export-command textarea").input_value()

    # the flags file, run by hand unchanged, trains the same loss curve (same seed)
    board_log = read_jsonl(out / "trainer_log.jsonl")
    shutil.move(out, tmp_path / "lora-board")
    proc = run_script("finetune.py", str(flags))
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_hand = read_jsonl(out / "trainer_log.jsonl")
    board_curve = [(e["step"], e["loss"]) for e in board_log if "loss" in e]
    hand_curve = [(e["step"], e["loss"]) for e in by_hand if "loss" in e]
    assert [s for s, _ in hand_curve] == [s for s, _ in board_curve] == list(range(1, TOTAL_STEPS + 1))
    assert [loss for _, loss in hand_curve] == pytest.approx([loss for _, loss in board_curve], rel=1e-4)


def test_board_in_english(tiny_model_dir: Path, tmp_path: Path):
    args = ["board.py", "--runs_dir", str(tmp_path / "runs"), "--base_model", str(tiny_model_dir), "--ui_language", "en"]
    with serve(*args) as (url, _), browser_page() as page:
        page.goto(url)
        assert page.locator("#start-btn").inner_text().strip() == "Start training"
        page.locator("#check-btn").click()
        page.wait_for_function("document.querySelector('#doctor').innerText.includes('data doctor')")
        assert "LlamaForCausalLM" in page.locator("#model-info").inner_text()
        assert page.locator("#command textarea").input_value().split()[1:3] == ["finetune.py", "--base_model"]
        screenshot(page, "board-en.png")


def fields_of(args: object) -> dict:
    """An argument dataclass's values (TrainingArguments' cached distributed state has no equality)."""
    return {k: v for k, v in vars(args).items() if k != "distributed_state"}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_flags_file_parses_as_the_command_line_does(tmp_path: Path, suffix: str):
    """Each stage's flags file gives the scripts' parser the same arguments as the command the
    board shows; a flags file reads back into the same stage and settings."""
    import finetune
    import finetune_chat
    from chinese_vicuna.args import parse_args
    from chinese_vicuna.board import command_argv, read_flags_file, resume_argv, settings_of_flags, stage_flags, write_flags_file

    groups = {"sft": finetune.FLAG_GROUPS, "chat_sft": finetune_chat.FLAG_GROUPS}  # the scripts' own flag groups
    data = {"sft": "sample/instruct/data_sample.jsonl", "chat_sft": "sample/chat/chat_sample.jsonl"}
    for stage, classes in groups.items():
        settings = {
            "base_model": "tiny", "prompt_template": "alpaca" if stage == "sft" else "chinese-vicuna-chat", "data": data[stage],
            "output_dir": str(tmp_path / stage), "length": 128, "num_epochs": 2.0, "max_steps": 0, "learning_rate": 0.003,
            "micro_batch_size": 2, "batch_size": 4, "lora_dropout": 0.0, "lora_target_modules": "all-linear", "seed": 7,
        }  # fmt: skip
        flags = stage_flags(stage, settings)
        assert "max_steps" not in flags  # 0: by epochs, the script's default
        path = write_flags_file(tmp_path / f"{stage}{suffix}", flags)
        from_file = parse_args(classes, [str(path)])
        from_argv = parse_args(classes, command_argv(stage, flags)[2:])
        assert [fields_of(a) for a in from_file] == [fields_of(a) for a in from_argv]
        assert settings_of_flags(read_flags_file(path)) == (stage, {k: v for k, v in settings.items() if k != "max_steps"})
    pretrain = stage_flags("pretrain", {"base_model": "tiny", "prompt_template": "alpaca", "data": "sample/pretrain", "length": 64})
    assert pretrain == {"base_model": "tiny", "dataset_dir": "sample/pretrain", "block_size": 64}
    assert command_argv("pretrain", pretrain)[1:3] == ["tools/pretrain.py", "--base_model"]
    assert resume_argv(["py", "finetune.py", "--overwrite_output_dir", "true", "--seed", "1"]) == [
        "py", "finetune.py", "--seed", "1", "--resume_from_checkpoint", "true",
    ]  # fmt: skip
