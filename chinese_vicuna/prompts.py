"""Prompt template registry shared by training and inference.

Templates are JSON files (`chinese_vicuna/templates/*.json`, or any path a user gives), so a
model is always asked in exactly the format it was trained on. Two kinds:

- instruction templates (`alpaca`, `chinese-alpaca`): `prompt_input` / `prompt_no_input`
  with `{instruction}` and `{input}`;
- chat templates (`chinese-vicuna-chat`, `vicuna_v1.1`, `llama2`, `chatml`, `llama3`):
  `system_format`, `user_format`, `assistant_prefix`, `assistant_format`, with `{system}`,
  `{content}`, and `{bos}` / `{eos}` standing for the tokenizer's special tokens;
- `auto`: the tokenizer's own `chat_template`.

Rendering produces `Segment`s: text plus whether its tokens are trained. Training and
inference both encode segment by segment (see `data.encode.encode_segments`: the first segment
whole, later ones as continuations of the text before them), so the ids the model
sees at inference equal those it was trained on.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError
from chinese_vicuna.files import atomic_write_text

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_FILE = "prompt_template.json"  # the template saved beside a trained adapter
GGUF_TEMPLATE_KEY = "chinese_vicuna.prompt_template"  # the same JSON inside a GGUF file
AUTO = "auto"
ROLES = ("system", "user", "assistant")
PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; `trainable` marks text whose tokens get labels."""

    text: str
    trainable: bool


def available_templates() -> list[str]:
    """Names of the built-in templates (plus `auto`)."""
    return [*sorted(p.stem for p in TEMPLATE_DIR.glob("*.json")), AUTO]


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """Join neighbours of the same kind and drop empty ones (one encoding unit per run)."""
    merged: list[Segment] = []
    for seg in segments:
        if not seg.text:
            continue
        if merged and merged[-1].trainable == seg.trainable:
            merged[-1] = Segment(merged[-1].text + seg.text, seg.trainable)
        else:
            merged.append(seg)
    return merged


def validate_messages(messages: list[dict[str, str]], where: str = "conversation") -> None:
    """Roles must be an optional system message, then user/assistant alternating."""
    if not messages:
        raise UserError(f"{where}: the conversation is empty")
    start = 1 if messages[0].get("role") == "system" else 0
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: message {i + 1} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i + 1} ({role}) content must be a string, got {type(content).__name__}")
        if i >= start:
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if role != expected:
                raise UserError(
                    f"{where}: message {i + 1} has role {role!r} where {expected!r} was expected "
                    "(after an optional system message, turns must alternate user/assistant)"
                )
    if len(messages) == start:
        raise UserError(f"{where}: the conversation has a system message but no user turn")


class PromptTemplate:
    """One template: renders instructions or conversations into segments."""

    def __init__(self, name: str, spec: dict[str, Any], tokenizer: Any = None) -> None:
        self.name = name
        self.spec = spec
        self.tokenizer = tokenizer
        self.description = spec.get("description", "")
        self.is_auto = name == AUTO
        self.is_chat = self.is_auto or "user_format" in spec
        self.default_system: str = spec.get("system", "")
        self._parsed: dict[str, list[str]] = {}
        self._special_tokens: dict[str, str] | None = None

    # --- the strings around special tokens -------------------------------------------------
    def _special(self) -> dict[str, str]:
        # Read once: the tokenizer's token attributes are slow lookups in transformers 5 and
        # this runs once per sample when a dataset is tokenized.
        if self._special_tokens is None:
            tok = self.tokenizer
            self._special_tokens = {
                "bos": (getattr(tok, "bos_token", None) or "<s>") if tok is not None else "<s>",
                "eos": (getattr(tok, "eos_token", None) or "</s>") if tok is not None else "</s>",
            }
        return self._special_tokens

    @property
    def special_tokens(self) -> dict[str, str]:
        """The text `{bos}` / `{eos}` stand for: the tokenizer's tokens (`<s>` / `</s>` without one)."""
        return dict(self._special())

    def _fmt(self, key: str, **values: str) -> str:
        # One pass over the template's own placeholders: user text may contain braces or
        # "{input}", which must stay as typed. The template string is split once and cached
        # (this runs once per sample when tokenizing a dataset).
        parts = self._parsed.get(key)
        if parts is None:
            # re.split with one group: literal, name, literal, name, ..., literal
            parts = self._parsed[key] = PLACEHOLDER.split(self.spec.get(key, ""))
        special = self._special()
        out = parts[:]
        for i in range(1, len(parts), 2):
            name = parts[i]
            out[i] = values[name] if name in values else special.get(name, "{" + name + "}")
        return "".join(out)

    def save(self, folder: str | Path) -> bool:
        """Write the template beside a model as `prompt_template.json` (`load_template` reads it back);
        False for `auto`, which lives in the tokenizer's own chat_template."""
        if self.is_auto:
            return False
        atomic_write_text(Path(folder) / TEMPLATE_FILE, json.dumps({**self.spec, "name": self.name}, ensure_ascii=False, indent=2) + "\n")
        return True

    # --- the template as a Jinja chat_template (merged models, GGUF files) ---------------
    def _jinja_format(self, key: str, names: dict[str, str]) -> str:
        """One format string as Jinja: literal text as quoted expressions (so no Jinja syntax or
        whitespace control can touch it), placeholders as the variables in `names`."""
        parts = PLACEHOLDER.split(self.spec.get(key, ""))
        out = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                if part:
                    out.append("{{ " + json.dumps(part, ensure_ascii=False) + " }}")
            elif part in names:
                out.append("{{ " + names[part] + " }}")
            else:  # as _fmt: an unknown placeholder stays as typed
                out.append("{{ " + json.dumps("{" + part + "}") + " }}")
        return "".join(out)

    def jinja(self, bos: bool = False, single_instruction: bool = False, after_bos: str = "plain") -> str:
        """A Jinja `chat_template` that renders exactly what this template renders (tested on the
        same matrix as the encoding): `apply_chat_template`, vLLM, TGI and llama.cpp servers then
        ask the model in its training format. Instruction templates: a user message is the
        instruction (no input), an assistant message the response. Without `bos` the text holds
        no BOS, as in training: `tokenizer(text)` adds it (docs/export.md).

        `bos`: begin the text with `{{ bos_token }}`, for the consumers that tokenize a rendered
        chat without adding special tokens (`apply_chat_template(tokenize=True)`, vLLM,
        llama-cpp-python), and `after_bos` (one of AFTER_BOS) says how the text goes on after it
        so that the consumer's tokenizer gets the training ids (`after_bos_for`). `single_instruction`:
        an instruction template accepts exactly one user message (after an optional system
        message) and raises otherwise, where a server cannot answer a multi-turn chat in an
        instruction format."""
        if self.is_auto:
            tpl = getattr(self.tokenizer, "chat_template", None)
            if not tpl:
                raise UserError("template 'auto' has no chat_template of its own; the tokenizer has none")
            return tpl
        if after_bos not in AFTER_BOS:
            raise ValueError(f"after_bos must be one of {', '.join(AFTER_BOS)}, got {after_bos!r}")
        body = self._jinja_body(single_instruction)
        if not bos:
            return body
        if after_bos == "plain":
            return "{{ bos_token }}" + body
        # the rendered text is needed whole to see how it begins
        captured = "{%- set body -%}" + body + "{%- endset -%}{{ bos_token }}"
        if after_bos == "space":
            return captured + "{{ body if body.startswith(' ') else ' ' + body }}"
        return captured + "{{ body[1:] if body.startswith(' ') else body }}"

    def _jinja_body(self, single_instruction: bool) -> str:
        """The Jinja of `jinja()` without BOS."""
        start = ""
        special = {"bos": "bos_token", "eos": "eos_token"}
        gen = "(add_generation_prompt is defined and add_generation_prompt)"
        if not self.is_chat:
            prompt = self._jinja_format("prompt_no_input", {**special, "instruction": "message['content']", "input": "''"})
            if single_instruction:
                start += (
                    "{%- set turns = messages[1:] if messages and messages[0]['role'] == 'system' else messages -%}"
                    "{%- if turns | length != 1 or turns[0]['role'] != 'user' -%}"
                    "{{ raise_exception('this model uses an instruction template: send one user message (after an optional system message)') }}"
                    "{%- endif -%}"
                )
            return (
                start + "{%- for message in messages -%}"
                "{%- if message['role'] == 'user' -%}"
                + prompt
                + "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{%- endif -%}"
                "{%- endfor -%}"
            )
        stripping = bool(self.spec.get("strip_content"))
        names = {**special, "system": "system", "content": "message['content'] | trim" if stripping else "message['content']"}
        empty_counts = "true" if self.spec.get("render_empty_system") else "false"
        given = "messages[0]['content'] | trim" if self.spec.get("strip_system") else "messages[0]['content']"
        head = (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = " + given + " -%}{%- set loop_messages = messages[1:] -%}"
            "{%- set has_system = (system | length > 0) or " + empty_counts + " -%}"
            "{%- else -%}{%- set system = " + json.dumps(self.default_system, ensure_ascii=False) + " -%}"
            "{%- set loop_messages = messages -%}{%- set has_system = system | length > 0 -%}"
            "{%- endif -%}"
        )
        if self.spec.get("system_format") and "first_user_format" not in self.spec:
            head += "{%- if has_system -%}" + self._jinja_format("system_format", names) + "{%- endif -%}"
        user = self._jinja_format("user_format", names)
        if "first_user_format" in self.spec:
            # Meta strips the joined "<<SYS>>…<</SYS>>\n\n" + message: only the message's end
            first_names = {**names, "content": "message['content'].rstrip()"} if stripping else names
            first = self._jinja_format("first_user_format", first_names)
            first_no_system = self._jinja_format("first_user_format_no_system", names)
            user = (
                "{%- if loop.first -%}{%- if has_system -%}" + first + "{%- else -%}" + first_no_system + "{%- endif -%}"
                "{%- else -%}" + user + "{%- endif -%}"
            )
        return (
            start + head + "{%- for message in loop_messages -%}"
            "{%- if message['role'] == 'user' -%}"
            + user
            + "{%- if not loop.last or "
            + gen
            + " -%}"
            + self._jinja_format("assistant_prefix", names)
            + "{%- endif -%}"
            "{%- else -%}" + self._jinja_format("assistant_format", names) + "{%- endif -%}"
            "{%- endfor -%}"
        )

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end generation; they are never shown to the user."""
        stops = list(self.spec.get("stop", []))
        if self.is_chat and not self.is_auto:
            eos = self._special()["eos"]
            if eos not in stops:
                stops.append(eos)
        return stops

    # --- instructions --------------------------------------------------------------------
    def instruction_prompt(self, instruction: str, input: str = "") -> str:
        """The prompt text for one instruction (everything before the response)."""
        if not self.is_chat:
            key = "prompt_input" if input else "prompt_no_input"
            return self._fmt(key, instruction=instruction, input=input)
        content = f"{instruction}\n{input}" if input else instruction
        return "".join(s.text for s in self.chat_segments([{"role": "user", "content": content}]))

    def instruction_segments(self, instruction: str, input: str = "", output: str | None = None) -> list[Segment]:
        """Prompt (not trained) and, when given, the response (trained)."""
        if self.is_chat:
            content = f"{instruction}\n{input}" if input else instruction
            messages = [{"role": "user", "content": content}]
            if output is not None:
                messages.append({"role": "assistant", "content": output})
            return self.chat_segments(messages, add_generation_prompt=output is None)
        segments = [Segment(self.instruction_prompt(instruction, input), False)]
        if output is not None:
            segments.append(Segment(output, True))
        return segments

    # --- conversations -------------------------------------------------------------------
    def chat_segments(
        self,
        messages: list[dict[str, str]],
        system: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[Segment]:
        """Render a conversation. Assistant turns (and their end markers) are trainable.

        `system` overrides the template's default system prompt; a leading system message
        overrides both. With `add_generation_prompt`, a conversation ending in a user turn
        gets the assistant prefix so the model answers next.
        """
        if not self.is_chat:
            raise UserError(f"template {self.name!r} is an instruction template; use a chat template for conversations")
        validate_messages(messages)
        explicit_system = system is not None or messages[0]["role"] == "system"
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        elif system is None:
            system = self.default_system
        if self.is_auto:
            return self._auto_segments(messages, system, add_generation_prompt)

        # Llama-2/3's official templates strip each message (Llama-3 the system prompt too)
        strip = str.strip if self.spec.get("strip_content") else str
        system = str.strip(system) if self.spec.get("strip_system") else system
        # an explicitly empty system prompt is rendered where the reference does (FastChat's
        # vicuna_v1.1: its separator, a leading space; Llama-2/3: an empty system block)
        has_system = bool(system) or (explicit_system and bool(self.spec.get("render_empty_system")))
        segments: list[Segment] = []
        if has_system and self.spec.get("system_format") and "first_user_format" not in self.spec:
            segments.append(Segment(self._fmt("system_format", system=system), False))
        for i, msg in enumerate(messages):
            if msg["role"] == "user":
                key, content = "user_format", strip(msg["content"])
                if i == 0 and "first_user_format" in self.spec:
                    key = "first_user_format" if has_system else "first_user_format_no_system"
                    if has_system and self.spec.get("strip_content"):
                        content = msg["content"].rstrip()  # Meta strips "<<SYS>>…<</SYS>>\n\n" + message as one text
                segments.append(Segment(self._fmt(key, system=system, content=content), False))
                if i + 1 < len(messages) or add_generation_prompt:
                    segments.append(Segment(self._fmt("assistant_prefix"), False))
            else:
                segments.append(Segment(self._fmt("assistant_format", content=strip(msg["content"])), True))
        return merge_segments(segments)

    def _auto_segments(self, messages: list[dict[str, str]], system: str, add_generation_prompt: bool) -> list[Segment]:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise UserError("template 'auto' needs a tokenizer with a chat_template; pick a named --prompt_template")
        full = ([{"role": "system", "content": system}] if system else []) + list(messages)
        offset = 1 if system else 0

        def render(msgs: list[dict[str, str]], gen: bool) -> str:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            bos = getattr(tok, "bos_token", None)
            # we add BOS as an id ourselves; drop it from the text so it is not doubled
            return text[len(bos) :] if bos and text.startswith(bos) else text

        segments: list[Segment] = []
        done = ""
        for i, msg in enumerate(messages):
            upto = full[: offset + i + 1]
            if msg["role"] == "assistant":
                before = render(full[: offset + i], True)
                after = render(upto, False)
                if not (before.startswith(done) and after.startswith(before)):
                    raise UserError(
                        "the tokenizer's chat_template does not render conversations incrementally; use a named --prompt_template"
                    )
                segments.append(Segment(before[len(done) :], False))
                segments.append(Segment(after[len(before) :], True))
                done = after
        if messages[-1]["role"] == "user":
            final = render(full, add_generation_prompt)
            segments.append(Segment(final[len(done) :], False))
        return merge_segments(segments)


# How a rendered chat goes on after the BOS text, so that a consumer that tokenizes it without
# adding special tokens gets the training ids `[bos] + tokenizer(text)`:
# - "plain": the text as it is (a tokenizer that treats the text after a special token as the start
#   of a text: sentencepiece's legacy mode, byte-level BPE);
# - "space": one space in front unless the text begins with one (transformers' converted LLaMA
#   tokenizers: their dummy prefix "▁" is added at the very start of a string only, never after a
#   special token, and not where the text already begins with a space);
# - "strip": a space the text begins with dropped (llama.cpp's SPM tokenizer adds the dummy prefix
#   after every special token itself, even where the text begins with a space).
AFTER_BOS = ("plain", "space", "strip")
# llama.cpp's SPM tokenizer set against the HF tokenizer of the same vocabulary (docs/export.md):
# llama.cpp puts the dummy prefix after BOS itself, so a leading space is dropped where HF folds
# it into its own prefix ("space"; "plain" with `"legacy": true`, see `llama_cpp_after_bos`).
LLAMA_CPP_AFTER_BOS = {"plain": "plain", "space": "strip"}
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # how transformers 5 saves a tokenizer's chat template


def after_bos_for(tokenizer: Any) -> str:
    """Which of AFTER_BOS makes `tokenizer(bos_token + text, add_special_tokens=False)` equal the
    training ids `[bos] + tokenizer(text, add_special_tokens=False)` for texts with and without a
    leading space; "plain" for a tokenizer without BOS (nothing is joined to it)."""
    bos = getattr(tokenizer, "bos_token", None)
    if tokenizer is None or bos is None or tokenizer.bos_token_id is None:
        return "plain"
    probes = ("Below", " Below", "\n你好", "  x")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    joins = {
        "plain": lambda t: t,
        "space": lambda t: t if t.startswith(" ") else " " + t,
    }
    for name, join in joins.items():
        if all(ids(bos + join(p)) == [tokenizer.bos_token_id, *ids(p)] for p in probes):
            return name
    logger.warning(
        "the tokenizer (%s) tokenizes text after its BOS token unlike text at the start; chat templates are written "
        "with BOS followed by the text as it is",
        type(tokenizer).__name__,
    )
    return "plain"


def hf_chat_template(template: PromptTemplate, tokenizer: Any = None) -> str:
    """The Jinja `chat_template` of a model or adapter folder: BOS once, joined as `tokenizer`
    needs it, for `apply_chat_template(tokenize=True)` and vLLM (which add no special tokens to a
    rendered chat)."""
    tokenizer = tokenizer if tokenizer is not None else template.tokenizer
    return template.jinja(bos=True, after_bos=after_bos_for(tokenizer))


def llama_cpp_chat_template(template: PromptTemplate, tokenizer: Any = None) -> str:
    """The Jinja `chat_template` a GGUF file carries: BOS once, joined as llama.cpp's tokenizer
    needs it for the ids `tokenizer` (HF, same vocabulary) gives (llama-cpp-python's chat handler
    and `llama-server --jinja` add no BOS of their own to a rendered chat)."""
    tokenizer = tokenizer if tokenizer is not None else template.tokenizer
    return template.jinja(bos=True, after_bos=llama_cpp_after_bos(tokenizer))


def llama_cpp_after_bos(tokenizer: Any) -> str:
    """The join after BOS for llama.cpp's tokenizer (`LLAMA_CPP_AFTER_BOS`). A sentencepiece-style
    tokenizer that folds a leading space into its dummy prefix (transformers 5 LLaMA, Metaspace:
    " Below" and "Below" give the same ids) needs "strip" even where its own join is "plain"
    (`"legacy": true`): llama.cpp gives a leading space a `▁` of its own beside the prefix."""
    from chinese_vicuna.data.fast_tokenize import folds_leading_space

    after = LLAMA_CPP_AFTER_BOS.get(after_bos_for(tokenizer), "plain")
    return "strip" if after == "plain" and tokenizer is not None and folds_leading_space(tokenizer) else after


def save_template_files(folder: str | Path, template: PromptTemplate, tokenizer: Any = None) -> None:
    """The template beside a model or adapter, for this toolkit (`prompt_template.json`) and for
    stock tools (`chat_template.jinja`, as transformers 5 saves a chat template: `AutoTokenizer`
    reads it, and vLLM serving the folder as a LoRA uses it). A `chat_template` that a copied
    `tokenizer_config.json` carries (the base's own) is removed, not kept beside ours. `auto`
    writes nothing: the tokenizer's own chat_template is the template."""
    if template.is_auto:
        return
    folder = Path(folder)
    template.save(folder)
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError:
            config = None
        if isinstance(config, dict) and config.pop("chat_template", None) is not None:
            atomic_write_text(config_path, json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    (folder / "chat_template.json").unlink(missing_ok=True)
    atomic_write_text(folder / CHAT_TEMPLATE_FILE, hf_chat_template(template, tokenizer))


def carry_template_files(source: str | Path, out: str | Path, tokenizer: Any = None) -> str | None:
    """The template files of a model folder into a converted copy of it (Meta `.pth` → HF): from
    `prompt_template.json` both files are written again for `tokenizer` (`save_template_files`); a
    folder with only a `chat_template.jinja` has it copied. Returns what was carried (for the log)."""
    source, out = Path(source), Path(out)
    if (source / TEMPLATE_FILE).is_file():
        template = load_template(str(source / TEMPLATE_FILE), tokenizer)
        save_template_files(out, template, tokenizer)
        return f"{TEMPLATE_FILE} ({template.name}) + {CHAT_TEMPLATE_FILE}"
    if (source / CHAT_TEMPLATE_FILE).is_file():
        atomic_write_text(out / CHAT_TEMPLATE_FILE, (source / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8"))
        return CHAT_TEMPLATE_FILE
    return None


def load_template(name_or_path: str, tokenizer: Any = None) -> PromptTemplate:
    """A built-in template by name, `auto`, or a JSON file path."""
    if name_or_path == AUTO:
        return PromptTemplate(AUTO, {}, tokenizer)
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = TEMPLATE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise UserError(
            f"unknown prompt template {name_or_path!r}; built-in: {', '.join(available_templates())}, or a path to a .json template"
        )
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: not a valid JSON template ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the template ({exc.strerror or exc})") from None
    validate_spec(spec, str(path))
    return PromptTemplate(spec.get("name", path.stem), spec, tokenizer)


# What each kind of template must have, and the placeholder each of those strings must use
# (a prompt_input without {input} would silently drop every record's input).
INSTRUCTION_KEYS = {"prompt_input": ("{instruction}", "{input}"), "prompt_no_input": ("{instruction}",)}
CHAT_KEYS = {"user_format": ("{content}",), "assistant_prefix": (), "assistant_format": ("{content}",)}
STRING_KEYS = ("name", "description", "system", "system_format", "first_user_format", "first_user_format_no_system")
BOOL_KEYS = ("strip_content", "strip_system", "render_empty_system")


def validate_spec(spec: Any, where: str) -> None:
    """A template's JSON: an object of one kind (instruction or chat) with all of that kind's
    strings, each with its placeholders, and the optional keys of the right JSON types."""
    if not isinstance(spec, dict):
        raise UserError(f"{where}: a template must be a JSON object, got {type(spec).__name__}")
    kind, required = ("chat", CHAT_KEYS) if "user_format" in spec else ("instruction", INSTRUCTION_KEYS)
    if kind == "instruction" and not any(k in spec for k in INSTRUCTION_KEYS):
        raise UserError(f"{where}: a template needs 'prompt_input' and 'prompt_no_input' (instruction) or 'user_format' (chat)")
    if "first_user_format" in spec:
        required = {**required, "first_user_format_no_system": ("{content}",)}
    for key, placeholders in required.items():
        if key not in spec:
            article = "an" if kind == "instruction" else "a"
            raise UserError(f"{where}: {article} {kind} template needs {key!r} (it has {', '.join(sorted(spec))})")
        if not isinstance(spec[key], str):
            raise UserError(f"{where}: {key!r} must be a string, got {type(spec[key]).__name__}")
        missing = [p for p in placeholders if p not in spec[key]]
        if missing:
            raise UserError(f"{where}: {key!r} has no {missing[0]} placeholder, so that text would never be in the prompt")
    for key in STRING_KEYS:
        if key in spec and not isinstance(spec[key], str):
            raise UserError(f"{where}: {key!r} must be a string, got {type(spec[key]).__name__}")
    for key in BOOL_KEYS:
        if key in spec and not isinstance(spec[key], bool):
            raise UserError(f"{where}: {key!r} must be true or false, got {json.dumps(spec[key])}")
    stop = spec.get("stop", [])
    if not (isinstance(stop, list) and all(isinstance(x, str) and x for x in stop)):
        raise UserError(f"{where}: 'stop' must be a list of non-empty strings, got {json.dumps(stop, ensure_ascii=False)}")


def _rendering_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The parts of a template that change what is rendered (not its name or description)."""
    return {k: v for k, v in spec.items() if k not in ("name", "description")}


def saved_template(folders: Sequence[str | Path | None], tokenizer: Any = None) -> PromptTemplate | None:
    """The template saved in the first folder that has a `prompt_template.json` (adapter first, then the model)."""
    for folder in folders:
        if folder and (Path(folder) / TEMPLATE_FILE).is_file():
            return load_template(str(Path(folder) / TEMPLATE_FILE), tokenizer)
    return None


def template_from_json(text: str, where: str, tokenizer: Any = None) -> PromptTemplate:
    """A template from the text of a `prompt_template.json` (as a GGUF file carries it)."""
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{where}: not a valid JSON template ({exc})") from None
    validate_spec(spec, where)
    return PromptTemplate(spec.get("name", "saved"), spec, tokenizer)


def resolve_template(
    requested: str | None, saved: PromptTemplate | None, fallback: str | None, tokenizer: Any = None
) -> PromptTemplate | None:
    """The template to ask a model in: the one it was trained with (`saved`) by default.

    `requested` (--prompt_template) wins when given, with a warning if it renders differently
    from the saved one; without it the saved one is used, and `fallback` only where nothing
    was saved (a model trained elsewhere); None when there is neither.
    """
    if requested is None:
        if saved is None:
            if fallback is not None:
                logger.info("no %s with the model; using the %r template (pass --prompt_template to choose)", TEMPLATE_FILE, fallback)
            return load_template(fallback, tokenizer) if fallback is not None else None
        logger.info("prompt template %r, saved with the model", saved.name)
        return saved
    template = load_template(requested, tokenizer)
    if saved is not None and _rendering_spec(saved.spec) != _rendering_spec(template.spec):
        logger.warning(
            "--prompt_template %s differs from the template the model was trained with (%r); using %s as asked",
            requested,
            saved.name,
            requested,
        )
    return template
