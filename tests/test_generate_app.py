"""generate.py: the web page in headless Chromium (streams the memorized answer), batch mode
(one line per input; a run killed with SIGKILL resumes with every line exactly once), and
clear errors for a LoRA made for another base."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, free_port, read_jsonl, run_script

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(os.environ.get("CHINESE_VICUNA_SCREENSHOTS", "")) if os.environ.get("CHINESE_VICUNA_SCREENSHOTS") else None

# Records every value the page's script assigns to a textarea inside `#answer`: how the test
# sees the answer arrive piece by piece (streaming), not just its final value.
RECORD_ANSWER_VALUES = """
(() => {
  window.__answerValues = [];
  const d = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value');
  Object.defineProperty(HTMLTextAreaElement.prototype, 'value', {
    get() { return d.get.call(this); },
    set(v) { if (this.closest('#answer')) window.__answerValues.push(v); d.set.call(this, v); },
  });
})();
"""



@contextlib.contextmanager
def serve(*args: str, timeout: float = 240) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start a Gradio script on a free 127.0.0.1 port; yield its URL; stop it afterwards."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.Popen(
        [sys.executable, *args, "--server_port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{args[0]} exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{args[0]} did not serve {url} within {timeout} s")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def listening_addresses(pid: int, port: int) -> set[str]:
    """Local addresses the process listens on for `port` (from /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, state, inode = fields[1], fields[3], fields[9]
            host, hexport = addr.split(":")
            if state == "0A" and inode in inodes and int(hexport, 16) == port:
                found.add(host)
    return found


@contextlib.contextmanager
def browser_page() -> Iterator:
    """A page in Debian's headless Chromium (never a downloaded browser)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (bash scripts/install_test_system_deps.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            yield page
        finally:
            browser.close()


def screenshot(page, name: str) -> None:
    if SCREENSHOTS is not None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


# --------------------------------------------------------------------------------------------
def test_page_streams_the_memorized_answer(tiny_model_dir: Path, memorized_lora: Path, memorized_data: Path):
    record = json.loads(memorized_data.read_text(encoding="utf-8").splitlines()[0])
    with serve("generate.py", "--base_model", str(tiny_model_dir), "--lora_weights", str(memorized_lora)) as (url, proc):
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert listening_addresses(proc.pid, port) == {"0100007F"}  # 127.0.0.1 only
        with browser_page() as page:
            page.add_init_script(RECORD_ANSWER_VALUES)
            page.goto(url)
            page.locator("#instruction textarea").fill(record["instruction"])
            page.locator("#generate-btn").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('tokens/s')")
            screenshot(page, "generate.png")
            assert page.locator("#answer textarea").input_value() == record["output"]
            values = [v for v in page.evaluate("window.__answerValues") if v]
            assert len(values) >= 3, values  # it arrived piece by piece
            assert all(record["output"].startswith(v) for v in values)
            assert "结束原因：eos" in page.locator("#status").inner_text()  # the status line in the default language
            assert page_words(page, GENERATE_WORDS) == GENERATE_WORDS_ZH


# What the generate page shows, by elem_id, in each language (--ui_language zh is the default).
GENERATE_WORDS = {"#instruction": "label", "#input": "label", "#answer": "label", "#generate-btn": "text", "#stop-btn": "text"}
GENERATE_WORDS_ZH = {"#instruction": "指令", "#input": "输入（可选）", "#answer": "回答", "#generate-btn": "生成", "#stop-btn": "停止"}
GENERATE_WORDS_EN = {
    "#instruction": "Instruction",
    "#input": "Input (optional)",
    "#answer": "Answer",
    "#generate-btn": "Generate",
    "#stop-btn": "Stop",
}


def page_words(page, where: dict[str, str]) -> dict[str, str]:
    """The label of each component or the text of each button, by elem_id."""
    words = {}
    for selector, kind in where.items():
        element = page.locator(selector)
        if kind == "label":
            element = element.locator("[data-testid=block-info], [data-testid=block-label]").first  # textbox, chatbot
        words[selector] = element.inner_text().strip()
    return words


def server_log(proc: subprocess.Popen) -> str:
    """What a served script printed (after `serve` has stopped it)."""
    return proc.stdout.read()


def test_page_in_english_user_mistakes_and_sessions(tiny_model_dir: Path):
    """English words; Generate disabled while answering and enabled again after an error or a
    Stop; user mistakes in the page and from API clients are page errors with one console
    line each, no traceback; each API client is its own session, so one's Stop ends only its
    own answer. --min_new_tokens makes every answer 1900 tokens long, so it is still being
    generated when the Stop arrives (the prompt + 1900 fits the tiny model's 2048)."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    args = [
        "generate.py",
        "--base_model",
        str(tiny_model_dir),
        "--ui_language",
        "en",
        "--max_new_tokens",
        "1900",
        "--min_new_tokens",
        "1900",
    ]
    enabled = "!document.querySelector('#generate-btn').disabled"
    with serve(*args) as (url, proc):
        with browser_page() as page:
            page.goto(url)
            page.locator("#generate-btn").wait_for()
            screenshot(page, "generate-en.png")
            assert page_words(page, GENERATE_WORDS) == GENERATE_WORDS_EN
            page.locator("#generate-btn").click()  # no instruction: the error in English
            page.get_by_text("Type an instruction first.").wait_for()
            page.wait_for_function(enabled)

            page.locator("#instruction textarea").fill("你好")
            page.locator("#generate-btn").click()
            page.wait_for_function("document.querySelector('#answer textarea').value.length > 0")
            assert page.locator("#generate-btn").is_disabled()  # while answering
            page.locator("#stop-btn").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('ended by stop_signal')")
            page.wait_for_function(enabled)

            page.locator("#instruction textarea").fill("长" * 300)  # with max_new_tokens 1900: past the context
            page.locator("#generate-btn").click()
            page.get_by_text("together more than the model's context of 2048 tokens").first.wait_for()
            page.wait_for_function(enabled)

        a, b = Client(url, verbose=False), Client(url, verbose=False)
        job = a.submit("你好", "", api_name="/generate")
        while len(job.outputs()) < 3 and not job.done():
            time.sleep(0.05)
        b.predict(api_name="/stop")  # another client's Stop: a's answer goes on
        seen = len(job.outputs())
        while len(job.outputs()) < seen + 20 and not job.done():
            time.sleep(0.05)
        assert not job.done()
        a.predict(api_name="/stop")
        assert job.result()[1].endswith("ended by stop_signal")
        for bad in ({"param_2": None}, {"param_2": 100000}, {"param_6": 5.0}):  # max_new_tokens None, past the context; top_p 5
            with pytest.raises(AppError):
                a.predict("你好", "", api_name="/generate", **bad)
    log = server_log(proc)
    assert "Traceback" not in log
    assert len([line for line in log.splitlines() if " page: " in line]) == 5, log[-3000:]


def test_batch_mode_resumes_after_sigkill(tiny_model_dir: Path, memorized_lora: Path, memorized_data: Path, tmp_path: Path):
    records = [json.loads(line) for line in memorized_data.read_text(encoding="utf-8").splitlines()]
    questions = [{**r, "output": "to be replaced"} for r in records * 2]  # 16 records
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    cmd = ["generate.py", "--base_model", str(tiny_model_dir), "--lora_weights", str(memorized_lora)]
    # micro-batches of 2, windows of 8 records: lines come 8 at a time, in input order
    cmd += ["--data_file", str(data), "--output_file", str(out), "--batch_size", "2"]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "batch run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = out.read_bytes().count(b"\n")
    assert 3 <= killed_at < len(questions), "the kill was not midway"

    done = run_script(*cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{killed_at} of {len(questions)} records already answered" in done.stderr
    lines = read_jsonl(out)
    assert [line["instruction"] for line in lines] == [q["instruction"] for q in questions]  # each exactly once, in order
    assert [line["output"] for line in lines] == [r["output"] for r in records * 2]  # the memorized answers


def test_batch_output_for_other_data_is_refused(tiny_model_dir: Path, memorized_data: Path, tmp_path: Path):
    from chinese_vicuna.args import ServerArguments
    from chinese_vicuna.data.records import read_records
    from chinese_vicuna.errors import UserError
    from chinese_vicuna.infer.jsonl import resume_point

    records = read_records(memorized_data)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"instruction": records[0].data["instruction"], "output": "x"}) + "\n" + '{"instruction": "半行', "utf-8")
    assert resume_point(out, records) == 1 and out.read_text("utf-8").count("\n") == 1  # the torn line is cut off
    out.write_text(json.dumps({"instruction": "另一个问题", "output": "x"}) + "\n", "utf-8")
    with pytest.raises(UserError, match=r"out.jsonl:1: does not answer"):
        resume_point(out, records)
    assert ServerArguments().server_name == "127.0.0.1" and not ServerArguments().share


def test_lora_for_another_base_exits_with_one_line(
    tiny_model_dir: Path, memorized_lora: Path, memorized_data: Path, tmp_path: Path, capsys
):
    import generate
    from chinese_vicuna.model.loading import load_tokenizer

    adapter = tmp_path / "expanded"
    shutil.copytree(memorized_lora, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    tok = load_tokenizer(str(tiny_model_dir))
    tok.add_tokens(["小羊驼"])
    tok.save_pretrained(adapter)
    argv = ["--base_model", str(tiny_model_dir), "--lora_weights", str(adapter)]
    with pytest.raises(SystemExit) as exit_info:
        generate.main([*argv, "--data_file", str(memorized_data), "--output_file", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert err[-1].startswith(f"error: {adapter}: the tokenizer saved with this LoRA has 3001 tokens")
    assert not (tmp_path / "o.jsonl").exists()
