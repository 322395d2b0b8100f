"""board.py, the training page, in headless Chromium on the tiny model: a malformed data file
shows the data doctor's line and starts nothing; the memory estimate of the settings shows; an
SFT run from sample/ data starts, its step counter, tokens/s, memory and loss curve advance, a
reload finds it still running, a second run into its folder is refused, Stop (Ctrl-C) and Resume
carry it to the end, the command shown is the child's argv, and the chat tab answers with what
the run memorized. The evaluation tab runs tools/eval_choice.py on the base and the adapter and
shows their choices and accuracy; the export tab's GGUF is a file llama-cpp-python loads. The
flags files the page saves, run by hand unchanged (finetune.py, finetune_dpo.py), train the same
loss curve / a preference adapter. Screenshots (Chinese and English) go to
$CHINESE_VICUNA_SCREENSHOTS (docs/images)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from html import escape
from pathlib import Path

import pytest
from test_generate_app import browser_page, screenshot, serve

from conftest import REPO, read_jsonl, run_script

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


def newest_run(runs_dir: Path, kind: str) -> dict:
    return max(
        (r for r in (json.loads(p.read_text()) for p in runs_dir.glob("*/run.json")) if r["kind"] == kind), key=lambda r: r["started"]
    )


def wait_for_run(runs_dir: Path, run_id: str, timeout: float = 600) -> dict:
    """The run's record once its chain of commands has ended (the board's own record)."""
    deadline = time.monotonic() + timeout
    while True:
        run = json.loads((runs_dir / run_id / "run.json").read_text())
        if run["status"] != "running":
            return run
        assert time.monotonic() < deadline, f"run {run_id} still running after {timeout} s"
        time.sleep(0.2)


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
        # the memory estimate of these settings: the package's estimator (tools/estimate_memory.py's), as the page says it
        from chinese_vicuna.board import memory_estimate, memory_text

        settings = {"precision": "auto", "lora_r": 16, "lora_target_modules": "all-linear", "length": 256, "micro_batch_size": 4}
        total = memory_estimate(str(tiny_model_dir), "sft", {**settings, "lora_dropout": 0.0}).total
        page.wait_for_function("t => document.querySelector('#memory').innerText.includes(t)", arg=memory_text(total))
        assert "预计内存" in page.locator("#memory").inner_text()
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
        # tokens/s from the run's trainer_log.jsonl (HF Trainer's count), the child's RSS from /proc
        page.wait_for_function(r"/\d+ tokens\/s/.test(document.querySelector('#progress').innerText)")
        rss = re.search(r"RSS ([0-9.]+) (MiB|GiB)", page.locator("#progress").inner_text())
        assert rss and float(rss.group(1)) * (1024 if rss.group(2) == "GiB" else 1) > 100  # MiB: a Python with torch and the model
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
        page.wait_for_function(  # the list of runs: this one, stopped, with its folder
            "t => document.querySelector('#runs-list').innerText.includes(t)", arg=f"指令微调\t已停止（可继续）\t{out}"
        )
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

        # evaluation: eval_choice.py on the base, then with the adapter; the command shown is the one run
        open_tab(page, "评测")
        assert page.locator("#eval-adapter textarea").input_value() == str(out)
        page.wait_for_function("document.querySelector('#choice-command textarea').value.includes('--lora_weights')")
        shown_eval = page.locator("#choice-command textarea").input_value()
        page.locator("#choice-btn").click()
        page.wait_for_function("document.querySelector('#eval-status').innerText.includes('已开始运行')")
        evaluation = wait_for_run(runs_dir, newest_run(runs_dir, "eval")["id"])
        assert evaluation["status"] == "finished" and evaluation["command"] == shown_eval
        assert [shlex.join(step) for step in evaluation["steps"]] == shown_eval.split(" && ")
        choice = Path(f"{out}-eval/choice")
        results = {side: json.loads((choice / side / "results.json").read_text()) for side in ("base", "adapter")}
        page.wait_for_function(  # the accuracy row, before and after, as eval_choice computed it
            "t => document.querySelector('#choice-results').innerText.includes(t)",
            arg=f"{results['base']['average']:.1f}%\t{results['adapter']['average']:.1f}%",
        )
        table = page.locator("#choice-results").inner_text()
        for base_prediction, adapter_prediction in zip(
            read_jsonl(choice / "base" / "predictions.jsonl"), read_jsonl(choice / "adapter" / "predictions.jsonl"), strict=True
        ):
            row = f"{base_prediction['subject']} #{base_prediction['id']}\t{base_prediction['answer']}\t"
            assert f"{row}{base_prediction['prediction']}\t{adapter_prediction['prediction']}" in table
        screenshot(page, "board-evaluate.png")

        # export: GGUF at q4_0 (merge_lora.py, then tools/convert_to_gguf.py), a file llama.cpp loads
        open_tab(page, "导出")
        page.get_by_label("GGUF（llama.cpp）").check()
        page.wait_for_function("document.querySelector('#export-command textarea').value.includes('--outtype q4_0')")
        shown_export = page.locator("#export-command textarea").input_value()
        assert f"--lora_weights {out}" in shown_export and "convert_to_gguf.py" in shown_export
        page.locator("#export-btn").click()
        page.wait_for_function("document.querySelector('#export-status').innerText.includes('已开始运行')")
        export = wait_for_run(runs_dir, newest_run(runs_dir, "export")["id"])
        assert export["status"] == "finished" and export["command"] == shown_export
        gguf = Path(f"{out}-merged-q4_0.gguf")
        page.wait_for_function("t => document.querySelector('#export-files').innerText.includes(t)", arg=str(gguf))
        from llama_cpp import Llama

        llm = Llama(model_path=str(gguf), n_ctx=128, verbose=False)
        assert llm.n_vocab() == 3000 and llm.metadata["general.file_type"] == "2"  # LLAMA_FTYPE_MOSTLY_Q4_0

        # the preference stage: chosen and rejected as training renders them; its flags file (run below)
        pair = json.loads((REPO / "sample/preference/pairs_sample.jsonl").read_text(encoding="utf-8").splitlines()[0])
        open_tab(page, "配置")
        page.get_by_label("偏好训练（DPO 等）").check()
        page.wait_for_function("document.querySelector('#data_path textarea').value.endsWith('pairs_sample.jsonl')")
        page.locator("#lora_weights textarea").fill(str(out))
        page.locator("#output_dir textarea").fill(str(tmp_path / "dpo"))
        page.locator("#max_steps input").fill("4")
        page.locator("#length input").fill("128")
        page.locator("#logging_steps input").fill("1")  # the reload above brought back the page's defaults
        page.locator("#check-btn").click()
        page.wait_for_function("document.querySelector('#doctor').innerText.includes('偏好数据检查')")
        assert page.locator("#preview .chosen .trained").first.inner_text() == pair["chosen"]
        assert page.locator("#preview .rejected .trained").first.inner_text() == pair["rejected"]
        assert pair["instruction"] in page.locator("#preview .chosen .masked").first.inner_text()
        dpo_flags = tmp_path / "dpo.yaml"
        page.locator("#flags_file textarea").fill(str(dpo_flags))
        page.wait_for_function(
            "['--max_steps 4', '--logging_steps 1', '--pref_loss sigmoid'].every(f => document.querySelector('#command textarea').value.includes(f))"
        )
        page.locator("#save-flags").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('finetune_dpo.py')")

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

    # the preference stage's flags file, by hand: DPO from the SFT adapter (the reference) for 4 steps
    proc = run_script("finetune_dpo.py", str(dpo_flags))
    assert proc.returncode == 0, proc.stderr[-3000:]
    dpo_log = read_jsonl(tmp_path / "dpo" / "trainer_log.jsonl")
    assert [e["step"] for e in dpo_log if "loss" in e] == [1, 2, 3, 4] and all("rewards/margins" in e for e in dpo_log if "loss" in e)
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()


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
        # a preference flags file loads as that stage, its own data and settings kept
        from chinese_vicuna.board import stage_flags, write_flags_file

        flags = {
            "base_model": str(tiny_model_dir),
            "lora_weights": str(tmp_path),
            "prompt_template": "chatml",
            "data": str(tmp_path / "p.jsonl"),
        }
        write_flags_file(tmp_path / "dpo.yaml", stage_flags("dpo", {**flags, "pref_loss": "orpo", "pref_beta": 0.5}))
        page.locator("#flags_file textarea").fill(str(tmp_path / "dpo.yaml"))
        page.locator("#load-flags").click()
        page.wait_for_function("document.querySelector('#command textarea').value.includes('finetune_dpo.py')")
        command = page.locator("#command textarea").input_value()
        assert f"--data_path {tmp_path / 'p.jsonl'}" in command and "--prompt_template chatml" in command
        assert "--pref_loss orpo --pref_beta 0.5" in command and f"--lora_weights {tmp_path}" in command
        assert page.locator("#lora_weights textarea").is_visible()


def fields_of(args: object) -> dict:
    """An argument dataclass's values (TrainingArguments' cached distributed state has no equality)."""
    return {k: v for k, v in vars(args).items() if k != "distributed_state"}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_flags_file_parses_as_the_command_line_does(tmp_path: Path, suffix: str):
    """Each stage's flags file gives the scripts' parser the same arguments as the command the
    board shows; a flags file reads back into the same stage and settings."""
    import finetune
    import finetune_chat
    import finetune_dpo
    import finetune_grpo
    from chinese_vicuna.args import parse_args
    from chinese_vicuna.board import command_argv, read_flags_file, resume_argv, settings_of_flags, stage_flags, write_flags_file

    # the scripts' own flag groups
    groups = {
        "sft": finetune.FLAG_GROUPS, "chat_sft": finetune_chat.FLAG_GROUPS, "dpo": finetune_dpo.FLAG_GROUPS,
        "grpo": finetune_grpo.FLAG_GROUPS,
    }  # fmt: skip
    data = {
        "sft": "sample/instruct/data_sample.jsonl",
        "chat_sft": "sample/chat/chat_sample.jsonl",
        "dpo": "sample/preference/pairs_sample.jsonl",
        "grpo": "sample/rl/arithmetic.jsonl",
    }
    preference = {"lora_weights": str(tmp_path), "pref_loss": "ipo", "pref_beta": 0.2, "pref_ftx": 1.0}
    rl = {"reward_funcs": "accuracy,format", "num_generations": 4, "max_completion_length": 64, "grpo_loss": "dr_grpo", "beta": 0.0}
    own = {"dpo": preference, "grpo": {"lora_weights": str(tmp_path), **rl}}
    for stage, classes in groups.items():
        settings = {
            "base_model": "tiny", "prompt_template": "chinese-vicuna-chat" if stage == "chat_sft" else "alpaca", "data": data[stage],
            "output_dir": str(tmp_path / stage), "length": 128, "num_epochs": 2.0, "max_steps": 0, "learning_rate": 0.003,
            "micro_batch_size": 2, "batch_size": 4, "val_set_size": 0, "lora_dropout": 0.0, "lora_target_modules": "all-linear", "seed": 7,
            **own.get(stage, {}),
        }  # fmt: skip
        # another stage's own settings stay out of its flags; GRPO's val_set_size stays the script's 0
        flags = stage_flags(stage, {**preference, **rl, **settings})
        assert "max_steps" not in flags  # 0: by epochs, the script's default
        assert ("pref_beta" in flags) == (stage == "dpo") and ("num_generations" in flags) == (stage == "grpo")
        assert ("lora_weights" in flags) == (stage in ("dpo", "grpo")) and ("val_set_size" in flags) == (stage != "grpo")
        assert ("max_prompt_length" in flags) == (stage == "grpo") != ("cutoff_len" in flags)
        assert flags["include_num_input_tokens_seen"] is True  # the Runs tab's tokens/s
        path = write_flags_file(tmp_path / f"{stage}{suffix}", flags)
        from_file = parse_args(classes, [str(path)])
        from_argv = parse_args(classes, command_argv(stage, flags)[2:])
        assert [fields_of(a) for a in from_file] == [fields_of(a) for a in from_argv]
        if stage == "grpo":  # the page's settings reached the script's fields
            rl_args = from_file[[type(a).__name__ for a in from_file].index("GrpoArguments")]
            assert (rl_args.num_generations, rl_args.max_completion_length, rl_args.grpo_loss, rl_args.beta) == (4, 64, "dr_grpo", 0.0)
        shown = {k: v for k, v in settings.items() if k != "max_steps" and (k, stage) != ("val_set_size", "grpo")}
        assert settings_of_flags(read_flags_file(path)) == (stage, shown)
    pretrain = stage_flags("pretrain", {"base_model": "tiny", "prompt_template": "alpaca", "data": "sample/pretrain", "length": 64})
    assert pretrain == {"base_model": "tiny", "dataset_dir": "sample/pretrain", "block_size": 64, "include_num_input_tokens_seen": True}
    assert command_argv("pretrain", pretrain)[1:3] == ["tools/pretrain.py", "--base_model"]
    assert resume_argv(["py", "finetune.py", "--overwrite_output_dir", "true", "--seed", "1"]) == [
        "py", "finetune.py", "--seed", "1", "--resume_from_checkpoint", "true",
    ]  # fmt: skip


def test_model_summary_of_a_hub_id_from_the_cache(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A hub id is read from the local Hugging Face cache (no network): summary and memory estimate
    as for its folder; an id not in the cache is one line saying so."""
    from huggingface_hub import constants

    from chinese_vicuna.board import memory_estimate, model_summary
    from chinese_vicuna.errors import UserError

    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    by_id, by_folder = model_summary("someone/tiny-llama"), model_summary(str(tiny_model_dir))
    assert Path(by_id.pop("folder")) == snapshot
    by_folder.pop("folder")
    assert by_id == by_folder and by_id["architecture"] == "LlamaForCausalLM" and by_id["vocab_size"] == 3000
    settings = {"precision": "fp32", "lora_r": 8, "length": 64, "micro_batch_size": 2}
    assert memory_estimate("someone/tiny-llama", "sft", settings) == memory_estimate(str(tiny_model_dir), "sft", settings)
    # a pair is two sequences: the preference stage's activations count both
    assert (
        memory_estimate(str(tiny_model_dir), "dpo", settings).activations
        > memory_estimate(str(tiny_model_dir), "sft", settings).activations
    )
    with pytest.raises(UserError, match=r"^--base_model someone/elsewhere: not in the local Hugging Face cache .*huggingface-cli download"):
        model_summary("someone/elsewhere")


def test_export_and_evaluation_commands_are_the_tools_own(tmp_path: Path):
    """Each export format is merge_lora.py and/or tools/convert_to_gguf.py with their documented flags
    (a merged folder already there is converted as it is); evaluation before/after is the same tool
    on the base and with the adapter; the judge's key never appears on the command line."""
    from chinese_vicuna.board import choice_eval_steps, export_steps, judge_steps

    merged = tmp_path / "m"
    scripts = {fmt: [step[1] for step in export_steps("b", "a", str(merged), fmt, "q8_0")] for fmt in ("hf", "pth", "gguf", "ollama")}
    assert scripts == {
        "hf": ["merge_lora.py"], "pth": ["merge_lora.py"], "gguf": ["merge_lora.py", "tools/convert_to_gguf.py"],
        "ollama": ["merge_lora.py", "tools/convert_to_gguf.py"],
    }  # fmt: skip
    assert export_steps("b", "a", str(merged), "pth")[0][-2:] == ["--output_type", "pth"]
    ollama = export_steps("b", "a", str(merged), "ollama", "q8_0")[1]
    assert ollama[-6:] == ["--outfile", f"{merged}-ollama/m-q8_0.gguf", "--outtype", "q8_0", "--ollama_modelfile", "true"]
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"")
    assert [step[1] for step in export_steps("b", "a", str(merged), "gguf")] == ["tools/convert_to_gguf.py"]
    before, after = choice_eval_steps("b", "a", "cmmlu", "d", "test", 5, "anatomy", "o")
    assert after == [*before[:4], "--lora_weights", "a", *before[4:-1], "o/adapter"] and before[-1] == "o/base"
    judge = judge_steps("b", "a", "q.jsonl", "http://127.0.0.1:1/v1", "judge", "o")
    assert [step[1] for step in judge] == ["tools/gen_model_answer.py", "tools/gen_model_answer.py", "tools/eval_judge.py"]
    assert not any("api_key" in arg for step in judge for arg in step)


def test_grpo_stage_checks_previews_estimates_and_its_flags_file_runs_by_hand(tiny_model_dir: Path, tmp_path: Path):
    """The RL stage: the prompt preview is data/rl.py's prompt ids decoded, with the reward columns; the
    check names a record that lacks the column a reward reads; the memory estimate counts each prompt's
    group of completions (prompt + completion long); the flags file the board writes, run by hand
    (`python finetune_grpo.py flags.yaml`), trains 2 steps logging the reward."""
    from chinese_vicuna.board import (
        check_rl_data,
        memory_estimate,
        preview_html,
        read_flags_file,
        settings_of_flags,
        stage_flags,
        write_flags_file,
    )
    from chinese_vicuna.data.rl import load_prompt_dataset
    from chinese_vicuna.errors import UserError
    from chinese_vicuna.infer.engine import Engine
    from chinese_vicuna.model.loading import load_tokenizer
    from chinese_vicuna.prompts import load_template

    tokenizer = load_tokenizer(str(tiny_model_dir))
    template = load_template("alpaca", tokenizer)
    sample = REPO / "sample/rl/arithmetic.jsonl"
    first = json.loads(sample.read_text(encoding="utf-8").splitlines()[0])
    ids = Engine.for_model(None, tokenizer, template).instruction_ids(first["instruction"], first["input"])
    preview = preview_html(str(sample), tokenizer, template, "grpo", records=2)
    assert preview.count('<pre class="sample prompt">') == 2 and f"answer = &quot;{first['answer']}&quot;" in preview
    assert f'<span class="masked">{escape(tokenizer.decode(ids[1:]))}</span>' in preview and first["instruction"] in preview
    report = check_rl_data(str(sample), tokenizer, template, 512, "accuracy,format")
    lengths = load_prompt_dataset(str(sample), Engine.for_model(None, tokenizer, template), 512).lengths
    assert report == {"records": 120, "prompts": 120, "too_long": 0, "max_prompt_length": 512, "longest": max(lengths),
                      "rewards": ["accuracy", "format"]}  # fmt: skip
    assert check_rl_data(str(sample), tokenizer, template, sorted(lengths)[59], "format")["too_long"] == sum(
        n > sorted(lengths)[59] for n in lengths
    )
    data = tmp_path / "rl.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"rl.jsonl:2: no 'answer' or 'solution' column, which reward 'accuracy' needs"):
        check_rl_data(str(data), tokenizer, template, 512, "accuracy")

    settings = {"precision": "fp32", "lora_r": 8, "length": 48, "micro_batch_size": 2, "num_generations": 4, "max_completion_length": 16}
    grpo, sft = memory_estimate(str(tiny_model_dir), "grpo", settings), memory_estimate(str(tiny_model_dir), "sft", settings)
    as_sft = memory_estimate(str(tiny_model_dir), "sft", {**settings, "length": 64, "micro_batch_size": 8})
    assert grpo.activations == as_sft.activations > sft.activations  # 2 prompts × 4 completions of 48 + 16 tokens

    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(10, 14)), encoding="utf-8")
    out = tmp_path / "grpo"
    page = {
        "base_model": str(tiny_model_dir), "prompt_template": "alpaca", "data": str(data), "output_dir": str(out), "length": 256,
        "num_epochs": 1.0, "max_steps": 2, "learning_rate": 1e-4, "micro_batch_size": 2, "batch_size": 2, "val_set_size": 0,
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "precision": "fp32", "reward_funcs": "accuracy", "num_generations": 2,
        "max_completion_length": 4, "grpo_loss": "grpo", "beta": 0.0, "warmup_steps": 0, "logging_steps": 1, "save_steps": 50, "seed": 3,
    }  # fmt: skip
    flags = write_flags_file(tmp_path / "grpo.yaml", stage_flags("grpo", page))
    written = read_flags_file(flags)
    assert settings_of_flags(written)[0] == "grpo" and "val_set_size" not in written  # the script's own 0
    proc = run_script("finetune_grpo.py", str(flags))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [e for e in read_jsonl(out / "trainer_log.jsonl") if "reward" in e]
    assert [e["step"] for e in log] == [1, 2] and all(0.0 <= e["reward"] <= 1.0 and "rewards/accuracy/mean" in e for e in log)
    assert (out / "adapter_model.safetensors").is_file()
