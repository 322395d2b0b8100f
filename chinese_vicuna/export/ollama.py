"""An Ollama `Modelfile` beside a GGUF file: the model is asked in its training template.

The file has `FROM ./model.gguf`, `TEMPLATE` (our template as a Go text/template), `SYSTEM`
(the template's default system prompt, where it has one) and a `PARAMETER stop` line for each
stop string and EOS; `ollama create NAME -f Modelfile` reads it. Ollama renders chats with Go's text/template over
`.Messages` (each with `.Role` and `.Content`); `go_template` writes one from a template of our
registry the way `PromptTemplate.jinja` writes Jinja: literal text as quoted Go string constants
(so nothing a user types is parsed as template syntax), placeholders as variables. Go templates
have no string functions, so `strip_content` / `strip_system` (llama2, llama3) are not applied:
messages render as given (docs/export.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError
from chinese_vicuna.files import atomic_write_text
from chinese_vicuna.prompts import PLACEHOLDER, TEMPLATE_FILE, PromptTemplate, saved_template

logger = logging.getLogger(__name__)

MODELFILE = "Modelfile"


def go_string(text: str) -> str:
    """`text` as a Go interpreted string literal in printable ASCII: no newline, quote or other
    character that Ollama's Modelfile parser would end a value at or drop."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append("\\x22")  # no quote inside: `"""` cannot appear in the TEMPLATE value
        elif ch == "\\":
            out.append("\\\\")
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif ch in "\n\t":
            out.append("\\n" if ch == "\n" else "\\t")
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _go_format(template: PromptTemplate, key: str, names: dict[str, str]) -> str:
    """One format string of the template as Go template actions: placeholders in `names` as those
    expressions, the rest as literal text; `{bos}` / `{eos}` are the tokenizer's token text
    (Ollama's llama.cpp tokenizes special tokens in the prompt)."""
    parts = PLACEHOLDER.split(template.spec.get(key, ""))
    special = template.special_tokens
    out, literal = [], ""
    for i, part in enumerate(parts):
        if i % 2 == 0:
            literal += part
        elif part in names:
            if literal:
                out.append("{{ " + go_string(literal) + " }}")
            out.append("{{ " + names[part] + " }}")
            literal = ""
        else:  # as _fmt: an unknown placeholder stays as typed
            literal += special.get(part, "{" + part + "}")
    if literal:
        out.append("{{ " + go_string(literal) + " }}")
    return "".join(out)


def go_template(template: PromptTemplate) -> str:
    """Ollama's TEMPLATE for `template`: renders `.Messages` as `PromptTemplate.chat_segments` (a
    system message, else the default system prompt; the assistant prefix after every user
    message, as Ollama always asks for an answer). Instruction templates: a user message is the
    instruction (no input), an assistant message the response, system messages are ignored."""
    if template.is_auto:
        raise UserError("template 'auto' is the tokenizer's own Jinja chat_template; Ollama needs a named template (--prompt_template)")
    if not template.is_chat:
        prompt = _go_format(template, "prompt_no_input", {"instruction": "$m.Content", "input": '""'})
        return (
            '{{ range $m := .Messages }}{{ if eq $m.Role "user" }}'
            + prompt
            + '{{ else if eq $m.Role "assistant" }}{{ $m.Content }}{{ end }}{{ end }}'
        )
    names = {"system": "$system", "content": "$m.Content"}
    given = "true" if template.spec.get("render_empty_system") else "gt (len .Content) 0"
    head = (
        "{{ $system := " + go_string(template.default_system) + " }}"
        "{{ $has := " + ("true" if template.default_system else "false") + " }}{{ $start := 0 }}"
        '{{ with .Messages }}{{ with index . 0 }}{{ if eq .Role "system" }}'
        "{{ $system = .Content }}{{ $has = " + given + " }}{{ $start = 1 }}"
        "{{ end }}{{ end }}{{ end }}"
    )
    if template.spec.get("system_format") and "first_user_format" not in template.spec:
        head += "{{ if $has }}" + _go_format(template, "system_format", names) + "{{ end }}"
    user = _go_format(template, "user_format", names)
    if "first_user_format" in template.spec:
        user = (
            "{{ if eq $i $start }}{{ if $has }}" + _go_format(template, "first_user_format", names) + "{{ else }}"
            + _go_format(template, "first_user_format_no_system", names) + "{{ end }}{{ else }}" + user + "{{ end }}"
        )  # fmt: skip
    return (
        head + '{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}' + user + _go_format(template, "assistant_prefix", names)
        + '{{ else if eq $m.Role "assistant" }}' + _go_format(template, "assistant_format", names) + "{{ end }}{{ end }}"
    )  # fmt: skip


def modelfile_value(text: str) -> str | None:
    """`text` quoted so that Ollama's Modelfile parser reads it back exactly, or None where it
    cannot (characters the parser drops, or a `\"\"\"` inside)."""
    if not all(ch.isprintable() or ch in "\n\t" for ch in text):
        return None
    if '"' not in text:
        return '"' + text + '"'
    return '"""' + text + '"""' if '"""' not in text else None


def modelfile(template: PromptTemplate, gguf_name: str) -> str:
    """The Modelfile text for the GGUF file `gguf_name` in the same folder."""
    if not gguf_name.isprintable() or gguf_name != gguf_name.strip():
        raise UserError(f"{gguf_name!r}: Ollama's Modelfile cannot name this file; rename it (printable, no spaces at the ends)")
    lines = [
        f"# Ollama: ollama create NAME -f {MODELFILE} (template {template.name!r}, written by tools/convert_to_gguf.py)",
        f"FROM ./{gguf_name}",
        'TEMPLATE """' + go_template(template) + '"""',
    ]
    if template.is_chat and template.default_system:
        system = modelfile_value(template.default_system)
        if system is None:  # the TEMPLATE falls back to the default system prompt itself
            logger.warning("the default system prompt cannot be written as a Modelfile SYSTEM line; the TEMPLATE still uses it")
        else:
            lines.append(f"SYSTEM {system}")
    eos = template.special_tokens["eos"]
    for stop in [*template.stop_strings, *([eos] if eos not in template.stop_strings else [])]:
        value = modelfile_value(stop)
        if value is None:
            logger.warning("stop string %r cannot be written in a Modelfile; left out", stop)
        else:
            lines.append(f"PARAMETER stop {value}")
    return "\n".join(lines) + "\n"


def model_template(model_dir: str | Path, tokenizer: Any = None) -> PromptTemplate:
    """The template saved with a merged model (its `prompt_template.json`), with the model's
    tokenizer for the text of `{bos}` / `{eos}`."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    template = saved_template([model_dir], tokenizer)
    if template is None:
        raise UserError(
            f"{model_dir}: no {TEMPLATE_FILE}, so the Modelfile would not know the prompt format; "
            "merge with merge_lora.py (it writes the adapter's template; --prompt_template NAME names one)"
        )
    return template


def write_modelfile(gguf: str | Path, template: PromptTemplate) -> Path:
    """`Modelfile` beside the GGUF file (atomic write)."""
    gguf = Path(gguf)
    path = gguf.parent / MODELFILE
    atomic_write_text(path, modelfile(template, gguf.name))
    logger.info("wrote %s (ollama create NAME -f %s)", path, path)
    return path
