"""README.md and README_zh.md stay in step: each links to the other at the top, they have the
same sections, every command line in README.md's fenced blocks appears in README_zh.md's
(comments are translated, so a line is compared without its `# comment`), and every script
name (`*.py`, `*.sh`) README.md mentions appears in README_zh.md.

A section added to README.md fails these tests until it is translated: the failure names what
is missing."""

from __future__ import annotations

import re

from conftest import REPO

README, README_ZH = REPO / "README.md", REPO / "README_zh.md"
SCRIPT_NAME = re.compile(r"[\w./*-]*\w\.(?:py|sh)\b")


def fenced_lines(text: str) -> list[str]:
    """The lines inside ``` blocks, without comments; blank and comment-only lines left out."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if inside:
            command = re.split(r"\s#\s|\s#$", f" {line.strip()}", maxsplit=1)[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def sections(text: str) -> list[str]:
    """Markdown headings (outside code blocks) as their level: '##', '###', ..."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [m.group(1) for m in re.finditer(r"^(#{2,6}) ", text, flags=re.M)]


def test_each_readme_links_to_the_other_at_the_top():
    en, zh = README.read_text(encoding="utf-8"), README_ZH.read_text(encoding="utf-8")
    assert "(README_zh.md)" in "\n".join(en.splitlines()[:5])
    assert "(README.md)" in "\n".join(zh.splitlines()[:5])


def test_same_sections_in_the_same_order():
    en, zh = README.read_text(encoding="utf-8"), README_ZH.read_text(encoding="utf-8")
    assert sections(zh) == sections(en)


def test_every_command_line_is_in_the_chinese_readme():
    en, zh = README.read_text(encoding="utf-8"), README_ZH.read_text(encoding="utf-8")
    zh_lines = set(fenced_lines(zh))
    assert [line for line in fenced_lines(en) if line not in zh_lines] == []
    # the two commands come first in both
    assert fenced_lines(zh)[:2] == fenced_lines(en)[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_every_script_name_is_in_the_chinese_readme():
    en, zh = README.read_text(encoding="utf-8"), README_ZH.read_text(encoding="utf-8")
    zh_names = set(SCRIPT_NAME.findall(zh))
    assert sorted({name for name in SCRIPT_NAME.findall(en) if name not in zh_names}) == []


def test_fenced_lines_drop_comments_only():
    text = "```bash\n# a comment\npython a.py --x 1   # explained\nGGUF=a#b bash b.sh\n\n```\nnot code\n"
    assert fenced_lines(text) == ["python a.py --x 1", "GGUF=a#b bash b.sh"]
