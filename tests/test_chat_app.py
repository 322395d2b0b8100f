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
import sys
from pathlib import Path

import pytest
from test_generate_app import browser_page, page_words, screenshot, serve

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.infer.generation import chat_prompt_ids, generate_text
from chinese_vicuna.model.build import load_for_inference
from chinese_vicuna.prompts import load_template
from conftest import REPO, read_jsonl

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

        # undo drops the last whole turn; regenerate answers the last question again
        page.locator("#undo-btn").click()
        page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=bot]').length === 1")
        page.locator("#regen-btn").click()
        wait_until_answered(page, 1)
        assert bot.count() == 1 and bot.nth(0).inner_text().strip() == conversation[1]["content"]


def test_terminal_chat_two_turns_undo_save(tiny_model_dir: Path, memorized_lora: Path, chat_template: Path, conversation, tmp_path: Path):
    pexpect = pytest.importorskip("pexpect")
    args = ["chat.py", "--cli", "--base_model", str(tiny_model_dir), "--lora_weights", str(memorized_lora)]
    args += ["--prompt_template", str(chat_template)]
    child = pexpect.spawn(sys.executable, args, cwd=str(REPO), encoding="utf-8", timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        child.expect_exact("用户：")  # the default language
        for turn in range(2):
            child.sendline(conversation[2 * turn]["content"])
            child.expect_exact("助手：")
            child.expect_exact("用户：")
            assert child.before.strip() == conversation[2 * turn + 1]["content"]
        saved = tmp_path / "saved.jsonl"
        child.sendline(f"/save {saved}")
        child.expect_exact(f"[已保存到 {saved}]")
        child.sendline("/undo")
        child.expect_exact("[已撤销；剩余 1 轮]")
        child.sendline(f"/save {saved}")  # a second line: the same file collects conversations
        child.expect_exact(f"[已保存到 {saved}]")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert read_jsonl(saved) == [{"messages": conversation}, {"messages": conversation[:2]}]


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


def test_chat_page_in_english_with_ui_language_en(tiny_model_dir: Path):
    with serve("chat.py", "--base_model", str(tiny_model_dir), "--ui_language", "en") as (url, _), browser_page() as page:
        page.goto(url)
        page.locator("#send-btn").wait_for()
        screenshot(page, "chat-en.png")
        assert page_words(page, CHAT_WORDS) == CHAT_WORDS_EN
        assert page.locator("#message textarea").get_attribute("placeholder") == "Type a message, Enter to send"
        page.locator("#regen-btn").click()  # nothing said yet: the error in English
        page.get_by_text("Nothing to regenerate yet.").wait_for()


def test_terminal_chat_in_english(tiny_model_dir: Path):
    pexpect = pytest.importorskip("pexpect")
    args = ["chat.py", "--cli", "--base_model", str(tiny_model_dir), "--ui_language", "en"]
    child = pexpect.spawn(sys.executable, args, cwd=str(REPO), encoding="utf-8", timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        child.expect_exact("User: ")
        child.sendline("/undo")
        child.expect_exact("[undone; 0 turn(s) left]")
        child.sendline("/regen")
        child.expect_exact("[nothing to regenerate]")
        child.sendline("/frobnicate")
        child.expect_exact("[unknown command /frobnicate; commands: /reset")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
