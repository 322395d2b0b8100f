"""The Ollama Modelfile written beside a GGUF file: its TEMPLATE, executed by Go's own
text/template (the engine Ollama renders prompts with, set up as Ollama sets it up), renders
byte-identically to the registry template over the template matrix; FROM / SYSTEM / PARAMETER
lines as Ollama's Modelfile parser reads them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_template_travels import NAMED, matrix, registry_text

from chinese_vicuna.export.ollama import go_string, model_template, modelfile, modelfile_value, write_modelfile
from chinese_vicuna.prompts import PromptTemplate, load_template
from conftest import run_script

# Executes each case as Ollama's template.Execute does for a template that uses .Messages:
# Parse with missingkey=zero and the json function, system messages also joined into .System,
# consecutive messages of one role merged, .Messages as []*api.Message.
GO_PROGRAM = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func main() {
	data, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var cases []Case
	if err := json.Unmarshal(data, &cases); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	out := make([]string, len(cases))
	for i, c := range cases {
		tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
		if err != nil {
			out[i] = "PARSE ERROR: " + err.Error()
			continue
		}
		var system []string
		var msgs []*Message
		for j := range c.Messages {
			m := c.Messages[j]
			if m.Role == "system" {
				system = append(system, m.Content)
			}
			if len(msgs) > 0 && msgs[len(msgs)-1].Role == m.Role {
				msgs[len(msgs)-1].Content += "\n\n" + m.Content
			} else {
				msgs = append(msgs, &m)
			}
		}
		var b strings.Builder
		values := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": msgs, "Tools": nil, "Response": ""}
		if err := tmpl.Execute(&b, values); err != nil {
			out[i] = "EXEC ERROR: " + err.Error()
			continue
		}
		out[i] = b.String()
	}
	enc, _ := json.Marshal(out)
	os.Stdout.Write(enc)
}
"""


def go_render(cases: list[tuple[str, list[dict[str, str]]]], tmp_path: Path) -> list[str]:
    """(TEMPLATE, messages) → Go's rendering of each, in one `go run`."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("needs Go (apt-get install golang-go; scripts/install_test_system_deps.sh installs it)")
    (tmp_path / "main.go").write_text(GO_PROGRAM, encoding="utf-8")
    (tmp_path / "cases.json").write_text(
        json.dumps([{"template": t, "messages": m} for t, m in cases], ensure_ascii=False), encoding="utf-8"
    )
    # offline and self-contained: the standard library only, Go's caches under tmp_path
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GO111MODULE": "off"}
    proc = subprocess.run([go, "run", "main.go", "cases.json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def unstripped(template: PromptTemplate) -> PromptTemplate:
    """The template with its whitespace trimming off: what the Go template renders."""
    spec = {k: v for k, v in template.spec.items() if k not in ("strip_content", "strip_system")}
    return PromptTemplate(template.name, spec, template.tokenizer)


def ollama_cases(template: PromptTemplate) -> list[tuple[list[dict[str, str]], str]]:
    """The matrix of test_template_travels as Ollama asks: the assistant prefix after every user
    message (whole conversations, and open ones with the generation prompt)."""
    out = []
    for messages, gen in matrix(template):
        if messages[-1]["role"] == "user" and not gen and template.is_chat:
            continue
        out.append((messages, registry_text(template, messages, True) if template.is_chat else registry_text(template, messages, gen)))
    return out


def test_go_template_renders_like_the_registry(tmp_path: Path) -> None:
    """Every built-in template; llama2 / llama3 trim whitespace, which Go templates cannot: the
    Go rendering equals the registry where no message has whitespace at its ends, and the
    registry without trimming everywhere (docs/export.md)."""
    cases, expected, labels = [], [], []
    for name in NAMED:
        template = load_template(name)
        tpl = modelfile(template, "m.gguf").split('TEMPLATE """', 1)[1].split('"""', 1)[0]
        stripping = bool(template.spec.get("strip_content"))
        for messages, want in ollama_cases(template):
            trimmed = all(m["content"] == m["content"].strip() for m in messages)
            if stripping and not trimmed:
                want = registry_text(unstripped(template), messages, True)
            cases.append((tpl, messages))
            expected.append(want)
            labels.append((name, trimmed))
    for name in NAMED:  # the cases that hold with trimming on: enough of them for each template
        assert sum(1 for n, t in labels if n == name and t) >= 6, name
    rendered = go_render(cases, tmp_path)
    assert len(rendered) == len(cases) >= 400
    for got, want, (name, _), (_, messages) in zip(rendered, expected, labels, cases):
        assert got == want, (name, messages)


def test_go_strings_keep_user_text_literal(tmp_path: Path) -> None:
    """Template syntax, quotes, backslashes and non-ASCII inside the template's own text or a
    message stay text; the TEMPLATE value is printable ASCII on one line."""
    spec = {
        "system": 'sys "q" \\ {{ .System }} 系统 😀',
        "system_format": '<<{system}>>\n\t"""',
        "user_format": "U{{ .Prompt }}: {content} {unknown}\n",
        "assistant_prefix": "A:",
        "assistant_format": "{content}{eos}",
    }
    template = PromptTemplate("odd", spec)
    tpl = modelfile(template, "m.gguf").split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert tpl.isascii() and tpl.isprintable()
    messages = [{"role": "user", "content": '{{ .System }} "x" \\n 你好'}]
    with_system = [{"role": "system", "content": "{{ printf }}"}, *messages]
    got = go_render([(tpl, messages), (tpl, with_system)], tmp_path)
    assert got == [registry_text(template, messages, True), registry_text(template, with_system, True)]
    assert go_string('a"b\\c\n中😀') == '"a\\x22b\\\\c\\n\\u4e2d\\U0001f600"'


def test_modelfile_lines() -> None:
    text = modelfile(load_template("chinese-vicuna-chat"), "model-q4_0.gguf")
    lines = text.splitlines()
    assert lines[1] == "FROM ./model-q4_0.gguf"
    assert lines[2].startswith('TEMPLATE """{{ $system := ') and lines[2].endswith('{{ end }}{{ end }}"""')
    system = load_template("chinese-vicuna-chat").default_system
    assert lines[3:] == [f'SYSTEM "{system}"', 'PARAMETER stop "User:"', 'PARAMETER stop "', 'User"', 'PARAMETER stop "</s>"']
    assert modelfile(load_template("alpaca"), "a.gguf").splitlines()[3:] == ['PARAMETER stop "### Instruction:"', 'PARAMETER stop "</s>"']
    llama2 = modelfile(load_template("llama2"), "a.gguf").splitlines()
    assert not any(line.startswith("SYSTEM") for line in llama2)  # its default system prompt is empty
    assert llama2[3:] == ['PARAMETER stop "[INST]"', 'PARAMETER stop "</s>"']
    assert modelfile_value('say "hi"') == '"""say "hi""""'
    assert modelfile_value('a """ b') is None and modelfile_value("a\u00a0b") is None  # Ollama's parser would end or drop these


def test_convert_to_gguf_writes_the_modelfile(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    model = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "gguf" / "tiny.gguf"
    proc = run_script("tools/convert_to_gguf.py", "--model_dir", str(model), "--outfile", str(out), "--ollama_modelfile", "true")
    assert proc.returncode == 2 and not out.exists()  # refused before converting
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {model}: no prompt_template.json")
    load_template("vicuna_v1.1").save(model)
    proc = run_script("tools/convert_to_gguf.py", "--model_dir", str(model), "--outfile", str(out), "--ollama_modelfile", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = (out.parent / "Modelfile").read_text(encoding="utf-8")
    assert written == modelfile(model_template(model), "tiny.gguf")
    assert "FROM ./tiny.gguf\n" in written and 'PARAMETER stop "USER:"\n' in written
    assert write_modelfile(out, load_template("alpaca")) == out.parent / "Modelfile"
