"""chat.py: a two-turn conversation on the web page (headless Chromium) and in the terminal
(pexpect), with the tiny model that memorized its sample instructions.

The LoRA was trained with the alpaca template; `ALPACA_AS_CHAT` is a chat template (a user
JSON file) whose single turn renders to exactly alpaca's prompt, so the first question gets
its memorized answer; the second is asked after the first turn, and the UIs must show what
greedy decoding of that two-turn prompt gives (computed here without any UI).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from test_generate_app import browser_page, page_words, screenshot, serve, server_log

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.infer.generation import chat_prompt_ids, generate_text
from chinese_vicuna.model.build import load_for_inference
from chinese_vicuna.prompts import load_template
from conftest import REPO, read_jsonl, run_script

ALPACA_AS_CHAT = {
    "name": "alpaca-chat",
    "description": "alpaca's prompt as a chat turn (tests)",
    "system": "",
    "user_format": "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{content}\n\n### Response:\n",
    "assistant_prefix": "",
    "assistant_format": "{content}{eos}",
    "stop": ["### Instruction:"],
}


@pytest.fixture(scope="module")
def chat_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "alpaca-chat.json"
    path.write_text(json.dumps(ALPACA_AS_CHAT), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def conversation(tiny_model_dir: Path, memorized_lora: Path, memorized_data: Path, chat_template: Path) -> list[dict[str, str]]:
    """Two turns and the answers greedy decoding gives, computed without any UI."""
    first, second = (json.loads(line) for line in memorized_data.read_text(encoding="utf-8").splitlines()[:2])
    model, tok = load_for_inference(str(tiny_model_dir), str(memorized_lora), "fp32")
    template = load_template(str(chat_template), tok)
    history: list[dict[str, str]] = []
    for question in (first["instruction"], second["instruction"]):
        ids, dropped = chat_prompt_ids(tok, template, history, question)
        assert dropped == 0
        reply = generate_text(model, tok, ids, DecodingArguments(), template.stop_strings, strip=True)
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    # the first answer is the memorized one; the second is asked after the first turn (which
    # the tiny model may or may not see past), so it is compared with this reference only
    assert history[1]["content"] == first["output"]
    assert history[3]["content"]
    return history


def wait_until_answered(page, answers: int) -> None:
    """`answers` bot messages and a finished generation: the status line gets its figures in
    the same update as the final answer; the first piece of an answer replaces them with
    'generating…' in the same update as the new message, so the old figures never count."""
    page.wait_for_function(
        "n => document.querySelectorAll('#chatbot [data-testid=bot]').length === n"
        " && document.querySelector('#status').innerText.includes('tokens/s')",
        arg=answers,
    )


def test_chat_page_holds_a_two_turn_conversation(tiny_model_dir: Path, memorized_lora: Path, chat_template: Path, conversation):
    args = ["chat.py", "--base_model", str(tiny_model_dir), "--lora_weights", str(memorized_lora), "--prompt_template", str(chat_template)]
    with serve(*args) as (url, _), browser_page() as page:
        page.goto(url)
        bot, users = page.locator("#chatbot [data-testid=bot]"), page.locator("#chatbot [data-testid=user]")
        for turn in range(2):
            page.locator("#message textarea").fill(conversation[2 * turn]["content"])
            page.locator("#send-btn").click()
            wait_until_answered(page, turn + 1)
            assert bot.nth(turn).inner_text().strip() == conversation[2 * turn + 1]["content"]
        screenshot(page, "chat.png")
        assert page_words(page, CHAT_WORDS) == CHAT_WORDS_ZH  # the default language
        assert page.locator("#message textarea").get_attribute("placeholder") == "输入消息，按 Enter 发送"
        assert [users.nth(i).inner_text().strip() for i in range(2)] == [conversation[0]["content"], conversation[2]["content"]]

        # save: the conversation as one JSONL line in the chat data format
        page.locator("#save-btn").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('已保存 2 轮')")
        with page.expect_download() as download:
            page.locator("#saved a").first.click()
        saved = [json.loads(line) for line in Path(download.value.path()).read_text(encoding="utf-8").splitlines()]
        assert saved == [{"messages": conversation}]
        first_name = download.value.suggested_filename

        # undo drops the last whole turn; regenerate answers the last question again
        page.locator("#undo-btn").click()
        page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=bot]').length === 1")
        page.locator("#regen-btn").click()
        wait_until_answered(page, 1)
        assert bot.count() == 1 and bot.nth(0).inner_text().strip() == conversation[1]["content"]

        # a second save is a file of its own holding this conversation only (never appended)
        page.locator("#save-btn").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('已保存 1 轮')")
        with page.expect_download() as download:
            page.locator("#saved a").first.click()
        assert download.value.suggested_filename != first_name
        assert read_jsonl(Path(download.value.path())) == [{"messages": conversation[:2]}]
        # Clear empties the conversation and the saved-file box
        page.locator("#clear-btn").click()
        page.wait_for_function("!document.querySelector('#saved a') && !document.querySelector('#chatbot [data-testid=bot]')")


LEFT, RIGHT, UP = "\x1b[D", "\x1b[C", "\x1b[A"  # what a terminal sends for the arrow keys


def test_terminal_chat_two_turns_undo_save(tiny_model_dir: Path, memorized_lora: Path, chat_template: Path, conversation, tmp_path: Path):
    """Two turns typed with line editing (arrow keys move the cursor, never end up in the
    message; ↑ recalls an earlier line), /save, /undo."""
    pexpect = pytest.importorskip("pexpect")
    args = ["chat.py", "--cli", "--base_model", str(tiny_model_dir), "--lora_weights", str(memorized_lora)]
    args += ["--prompt_template", str(chat_template)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = pexpect.spawn(sys.executable, args, cwd=str(REPO), encoding="utf-8", timeout=240, env=env)
    saved = tmp_path / "saved.jsonl"

    def answer() -> str:
        child.expect_exact("助手：")
        child.expect_exact("用户：")
        return child.before.strip()

    try:
        child.expect_exact("用户：")  # the default language
        first = conversation[0]["content"]
        child.send(first[:-1] + LEFT + RIGHT + first[-1] + "\r")  # the cursor goes back and forth
        assert answer() == conversation[1]["content"]
        child.sendline(conversation[2]["content"])
        assert answer() == conversation[3]["content"]
        child.sendline(f"/save {saved}")
        child.expect_exact(f"[已保存到 {saved}]")
        child.sendline("/undo")
        child.expect_exact("[已撤销；剩余 1 轮]")
        child.sendline(f"/save {saved}")  # a second line: the same file collects conversations
        child.expect_exact(f"[已保存到 {saved}]")
        child.expect_exact("用户：")
        child.send(UP * 4 + "\r")  # ↑ goes back through /save, /undo, /save to the second question
        assert answer() == conversation[3]["content"]
        child.sendline(f"/save {saved}")
        child.expect_exact(f"[已保存到 {saved}]")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert read_jsonl(saved) == [{"messages": conversation}, {"messages": conversation[:2]}, {"messages": conversation}]


CHAT_WORDS = {
    "#chatbot": "label",
    "#send-btn": "text",
    "#stop-btn": "text",
    "#regen-btn": "text",
    "#undo-btn": "text",
    "#clear-btn": "text",
    "#save-btn": "text",
}
CHAT_WORDS_ZH = {
    "#chatbot": "对话",
    "#send-btn": "发送",
    "#stop-btn": "停止",
    "#regen-btn": "重新生成",
    "#undo-btn": "撤销上一轮",
    "#clear-btn": "清空",
    "#save-btn": "保存为 JSONL",
}
CHAT_WORDS_EN = {
    "#chatbot": "Conversation",
    "#send-btn": "Send",
    "#stop-btn": "Stop",
    "#regen-btn": "Regenerate",
    "#undo-btn": "Undo last turn",
    "#clear-btn": "Clear",
    "#save-btn": "Save JSONL",
}


def test_chat_page_in_english_private_saves_and_one_line_errors(tiny_model_dir: Path):
    """English words; two API clients (two Gradio sessions) that save in the same second get
    different files, each holding its own conversation only; user mistakes are page errors
    with one console line each and no traceback."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    args = ["chat.py", "--base_model", str(tiny_model_dir), "--ui_language", "en", "--max_new_tokens", "8"]
    with serve(*args) as (url, proc):
        with browser_page() as page:
            page.goto(url)
            page.locator("#send-btn").wait_for()
            screenshot(page, "chat-en.png")
            assert page_words(page, CHAT_WORDS) == CHAT_WORDS_EN
            assert page.locator("#message textarea").get_attribute("placeholder") == "Type a message, Enter to send"
            page.locator("#regen-btn").click()  # nothing said yet: the error in English
            page.get_by_text("Nothing to regenerate yet.").wait_for()

        a, b = Client(url, verbose=False), Client(url, verbose=False)
        questions = {a: "问题甲", b: "问题乙"}
        answers = {c: c.predict(q, api_name="/respond")[0][-1]["content"][0]["text"] for c, q in questions.items()}
        jobs = {c: c.submit(api_name="/save") for c in (a, b)}  # at the same time
        files = {c: Path(job.result()[0]) for c, job in jobs.items()}
        again = Path(a.predict(api_name="/save")[0])  # a later save: a new file, not appended to
        assert len({files[a].name, files[b].name, again.name}) == 3
        for c, path in [*files.items(), (a, again)]:
            (record,) = read_jsonl(path)
            assert record["messages"][1:] == [{"role": "user", "content": questions[c]}, {"role": "assistant", "content": answers[c]}]

        for bad in ({"message": ""}, {"template_name": "nope"}, {"max_memory": -5}):
            with pytest.raises(AppError):
                a.predict(**{"message": "你好", **bad}, api_name="/respond")
        with pytest.raises(AppError, match="Nothing to save yet"):
            Client(url, verbose=False).predict(api_name="/save")  # a new session has nothing to save
    log = server_log(proc)
    assert "Traceback" not in log
    assert len([line for line in log.splitlines() if " page: " in line]) == 5, log[-3000:]
    (folder,) = re.findall(r"files saved from the page go to (\S+),", log)
    assert not Path(folder).exists()  # removed when the server stopped (SIGTERM)


def test_session_folders_are_private_per_session_and_save_and_removed(tmp_path: Path):
    from types import SimpleNamespace

    from chinese_vicuna.infer.webui import SessionFolders

    folders = SessionFolders("chat-saves-test-")
    a, b = SimpleNamespace(session_hash="a"), SimpleNamespace(session_hash="b")
    a1, a2, b1 = folders.new_file(a, "chat-", ".jsonl"), folders.new_file(a, "chat-", ".jsonl"), folders.new_file(b, "chat-", ".jsonl")
    assert a1 != a2 and a1.parent == a2.parent != b1.parent and a1.parent.parent == folders.root
    assert (folders.root.stat().st_mode & 0o077) == 0  # the server user's only
    folders.end(a)  # demo.unload
    assert not a1.parent.exists() and b1.exists()
    # the rest goes when the server exits
    code = "from chinese_vicuna.infer.webui import SessionFolders; print(SessionFolders('chat-saves-test-').new_file(None, 'c', '.jsonl'))"
    done = run_script("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    made = Path(done.stdout.strip())
    assert made.name.startswith("c") and not made.parent.parent.exists()


def test_terminal_chat_in_english_ctrl_c_and_bad_input(tiny_model_dir: Path, tmp_path: Path):
    """Commands in English; a line of invalid UTF-8 is refused and the chat goes on; Ctrl-C
    during an answer stops it and the prompt comes back, the stopped turn not kept (nothing to
    save); Ctrl-C at the prompt ends the chat with one line and status 130. --min_new_tokens
    makes the answer 1900 tokens long, so it is still being generated when Ctrl-C arrives."""
    pexpect = pytest.importorskip("pexpect")
    args = ["chat.py", "--cli", "--base_model", str(tiny_model_dir), "--ui_language", "en"]
    args += ["--max_new_tokens", "1900", "--min_new_tokens", "1900"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # the terminal echoes the invalid bytes back: read them as U+FFFD
    child = pexpect.spawn(sys.executable, args, cwd=str(REPO), encoding="utf-8", codec_errors="replace", timeout=240, env=env)
    try:
        child.expect_exact("User: ")
        child.sendline("/undo")
        child.expect_exact("[undone; 0 turn(s) left]")
        child.sendline("/regen")
        child.expect_exact("[nothing to regenerate]")
        child.sendline("/frobnicate")
        child.expect_exact("[unknown command /frobnicate; commands: /reset")
        os.write(child.child_fd, b"\xff\xfe\r")
        child.expect_exact("[that line is not valid UTF-8 text and was ignored; check the terminal's encoding]")
        child.expect_exact("User: ")
        child.sendline("你好")
        child.expect_exact("Assistant: ")
        child.expect(r"\S")  # the answer has started
        child.sendintr()
        child.expect_exact("[stopped; this turn is not kept]")
        child.expect_exact("User: ")
        child.sendline(f"/save {tmp_path / 'saved.jsonl'}")
        child.expect_exact("[not saved: nothing to save yet: the conversation is empty]")
        child.expect_exact("User: ")
        child.sendintr()
        child.expect_exact("[bye]")
        child.expect(pexpect.EOF)
        output = child.before
    finally:
        child.close(force=True)
    assert child.exitstatus == 130 and "Traceback" not in output
    assert not (tmp_path / "saved.jsonl").exists()
