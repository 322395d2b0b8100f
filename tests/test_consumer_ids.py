"""Every consumer feeds the model the ids HF gives (issue 30, pitfall 19) for a base whose
tokenizer is in the hub's legacy form (`"legacy": true` in tokenizer_config.json, as
LLaMA-1/2-era folders that set it): transformers 5 then starts the text after every special
token with sentencepiece's dummy prefix `▁`, as llama.cpp's tokenizer does, so llama.cpp's
`create_chat_completion` on the GGUF, `apply_chat_template(tokenize=True)`, the project's
Engine prompts and its training ids are one and the same for every built-in template, history
included; so are they for the hub's `tokenizer.json` pipeline read as it is. (The default form — `legacy` false or unset, what transformers 5 builds from a bare
`tokenizer.model` — continues the text there and llama.cpp cannot: that one difference is
pinned in tests/test_gguf.py::test_create_chat_completion_feeds_hf_ids; docs/export.md.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="optional group: bash scripts/setup_env.sh --llamacpp")

from test_gguf import chat_matrix, fed_ids  # noqa: E402

from chinese_vicuna.data.cache import tokenizer_fingerprint  # noqa: E402
from chinese_vicuna.data.chat import template_trains_eos, tokenize_conversations  # noqa: E402
from chinese_vicuna.data.encode import encode_segments  # noqa: E402
from chinese_vicuna.data.fast_tokenize import (  # noqa: E402
    GGUF_FOLDS_SPACE_KEY,
    GGUF_RESTARTS_KEY,
    BatchEncoder,
    restarts_after_special,
    sample_starts,
)
from chinese_vicuna.data.formats import Conversation  # noqa: E402
from chinese_vicuna.export.gguf import convert  # noqa: E402
from chinese_vicuna.infer.generation import chat_prompt_ids, prompt_ids  # noqa: E402
from chinese_vicuna.infer.llamacpp import LlamaCppTokenizer  # noqa: E402
from chinese_vicuna.model.loading import load_tokenizer  # noqa: E402
from chinese_vicuna.prompts import (  # noqa: E402
    available_templates,
    hf_chat_template,
    llama_cpp_chat_template,
    load_template,
    save_template_files,
)
from chinese_vicuna.serving.llamacpp_server import register_template_format  # noqa: E402

NAMED = [t for t in available_templates() if t != "auto"]


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tools/make_tiny_model.py --legacy_tokenizer true (the defaults otherwise)."""
    from make_tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("legacy") / "legacy-llama", legacy_tokenizer=True)


@pytest.fixture(scope="module")
def legacy_tokenizer(legacy_dir: Path):
    return load_tokenizer(str(legacy_dir))


@pytest.fixture(scope="module")
def pipeline_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hub's LLaMA-1/2 `tokenizer.json` pipeline read as it is (transformers 4, the tokenizers
    library; transformers 5 for `tokenizer_class: PreTrainedTokenizerFast`): a `Prepend("▁")` +
    `Replace(" ", "▁")` normalizer, no pre-tokenizer — the dummy prefix after every special token,
    and a leading space a `▁` of its own beside it, both as sentencepiece and llama.cpp."""
    folder = tmp_path_factory.mktemp("pipeline") / "pipeline-llama"
    shutil.copytree(tiny_model_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    prepend = [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    spec.update(normalizer={"type": "Sequence", "normalizers": prepend}, pre_tokenizer=None)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}), encoding="utf-8")
    return folder


FORMS = {"legacy": "legacy_dir", "pipeline": "pipeline_dir"}


def form_dir(request: pytest.FixtureRequest, form: str) -> Path:
    return request.getfixturevalue(FORMS[form])


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_forms_of_the_llama_tokenizer(tiny_model_dir: Path, legacy_dir: Path, legacy_tokenizer, pipeline_dir: Path) -> None:
    """Same sentencepiece model and weights; only `"legacy": true` differs, and with it what
    transformers 5 does after a special token. llama.cpp (one GGUF vocabulary for all) does
    what the legacy form does there, and what the hub's tokenizer.json pipeline does everywhere."""
    default = load_tokenizer(str(tiny_model_dir))
    pipeline = load_tokenizer(str(pipeline_dir))
    assert (legacy_dir / "tokenizer.model").read_bytes() == (tiny_model_dir / "tokenizer.model").read_bytes()
    assert json.loads((legacy_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["legacy"] is True
    assert "legacy" not in json.loads((tiny_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert json.loads(legacy_tokenizer.backend_tokenizer.pre_tokenizer.__getstate__())["prepend_scheme"] == "always"
    assert json.loads(default.backend_tokenizer.pre_tokenizer.__getstate__())["prepend_scheme"] == "first"
    eos = default.eos_token_id
    text = "你好</s>USER: hi"
    assert ids(legacy_tokenizer, text) == [*ids(legacy_tokenizer, "你好"), eos, *ids(legacy_tokenizer, "USER: hi")]
    assert ids(default, text) == [*ids(default, "你好"), eos, *ids(default, "\nUSER: hi")[len(ids(default, "\n")) :]]
    assert ids(default, text) != ids(legacy_tokenizer, text)
    gguf = convert(tiny_model_dir, legacy_dir.parent / "vocab.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, verbose=False, vocab_only=True)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids(legacy_tokenizer, text)
    assert restarts_after_special(legacy_tokenizer) and not restarts_after_special(default)
    assert tokenizer_fingerprint(legacy_tokenizer) != tokenizer_fingerprint(default)  # no tokenized-data cache shared by the two
    assert not restarts_after_special(LlamaCppTokenizer(llm))  # the file says: converted from the default form
    assert llm.metadata[GGUF_RESTARTS_KEY] == "false" and llm.metadata[GGUF_FOLDS_SPACE_KEY] == "true"
    legacy_gguf = convert(legacy_dir, legacy_dir.parent / "legacy-vocab.gguf", "f16")
    legacy_llm = llama_cpp.Llama(model_path=str(legacy_gguf), n_ctx=64, verbose=False, vocab_only=True)
    assert legacy_llm.metadata[GGUF_RESTARTS_KEY] == "true" and restarts_after_special(LlamaCppTokenizer(legacy_llm))
    pipeline_llm = llama_cpp.Llama(
        model_path=str(convert(pipeline_dir, legacy_dir.parent / "pipeline-vocab.gguf", "f16")), n_ctx=64, verbose=False, vocab_only=True
    )
    assert (pipeline_llm.metadata[GGUF_RESTARTS_KEY], pipeline_llm.metadata[GGUF_FOLDS_SPACE_KEY]) == ("true", "false")
    forms = ((default, LlamaCppTokenizer(llm)), (legacy_tokenizer, LlamaCppTokenizer(legacy_llm)), (pipeline, LlamaCppTokenizer(pipeline_llm)))
    for probe in (text, " USER: hi", "x</s><s>[INST] hi", "</s> 你好"):
        for tokenizer, cpp in forms:  # the project's llama.cpp wrapper: each file's HF ids
            assert cpp(probe)["input_ids"] == ids(tokenizer, probe), probe
        assert llm.tokenize(probe.encode("utf-8"), add_bos=False, special=True) == ids(pipeline, probe), probe  # llama.cpp itself
    assert ids(pipeline, " USER: hi") != ids(legacy_tokenizer, " USER: hi")  # ▁▁USER vs ▁USER: a leading space


def engine_prompt_ids(tokenizer, template, messages: list[dict[str, str]]) -> list[int]:
    """What generate.py / chat.py / serve.py build for an open prompt (the Engine's functions)."""
    if not template.is_chat:
        return prompt_ids(tokenizer, template, messages[-1]["content"])
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    if system == "":
        # chat_prompt_ids reads "" as "no system"; the template's own rendering of an empty one is training's
        return encode_segments(tokenizer, template.chat_segments(messages, add_generation_prompt=True))[0]
    return chat_prompt_ids(tokenizer, template, rest[:-1], rest[-1]["content"], system=system)[0]


def model_with_template(legacy_dir: Path, tokenizer, name: str, root: Path) -> Path:
    """The tiny model folder as merge_lora.py leaves a merged one: its template files beside it."""
    folder = root / name
    shutil.copytree(legacy_dir, folder)
    save_template_files(folder, load_template(name, tokenizer), tokenizer)
    return folder


@pytest.mark.parametrize(
    ("form", "name"), [("legacy", name) for name in NAMED] + [("pipeline", name) for name in ("vicuna_v1.1", "llama2", "alpaca")]
)
def test_create_chat_completion_on_the_gguf_feeds_hf_ids(request: pytest.FixtureRequest, tmp_path: Path, form: str, name: str) -> None:
    """tools/convert_to_gguf.py's file, stock `Llama(gguf).create_chat_completion` with the
    template it carries (llama-cpp-python's default handler): the ids it evaluates are exactly
    stock `AutoTokenizer(folder).apply_chat_template(tokenize=True)`'s, and the Engine's and
    training's for the same open prompt — 1 and 3 turns, without / with / with an empty system
    message, history with `</s>` and `<s>` inside (vicuna_v1.1, llama2) included; so are
    tools/cpu_chat.py's and serve.py --engine llamacpp's."""
    from transformers import AutoTokenizer

    legacy_dir = form_dir(request, form)
    legacy_tokenizer = load_tokenizer(str(legacy_dir))
    template = load_template(name, legacy_tokenizer)
    folder = model_with_template(legacy_dir, legacy_tokenizer, name, tmp_path)
    stock = AutoTokenizer.from_pretrained(str(folder))
    assert stock.chat_template == hf_chat_template(template, legacy_tokenizer)
    gguf = convert(folder, tmp_path / f"{name}.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, verbose=False)
    assert llm.chat_format == "chat_template.default"
    assert llm.metadata["tokenizer.chat_template"] == llama_cpp_chat_template(template, legacy_tokenizer)
    checked = with_eos_inside = 0
    for messages in chat_matrix():
        if not template.is_chat and sum(m["role"] == "user" for m in messages) > 1:
            continue  # an instruction template answers one instruction
        want = stock.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert want[0] == legacy_tokenizer.bos_token_id != want[1], messages  # BOS once
        assert fed_ids(llm, messages) == want, messages
        assert engine_prompt_ids(legacy_tokenizer, template, messages) == want, messages
        # tools/cpu_chat.py: the Engine's prompt building over llama.cpp's tokenizer (the GGUF
        # records that this tokenizer starts the text after a special token anew)
        assert engine_prompt_ids(LlamaCppTokenizer(llm), load_template(name, None), messages) == want, messages
        checked += 1
        with_eos_inside += legacy_tokenizer.eos_token_id in want
    assert checked == (6 if template.is_chat else 3)
    assert with_eos_inside == (3 if name in ("vicuna_v1.1", "llama2") else 0)  # the 3-turn cases: </s> in the history
    llm.chat_handler, llm.chat_format = None, register_template_format(name)  # serve.py --engine llamacpp
    for messages in chat_matrix():
        if template.is_chat or sum(m["role"] == "user" for m in messages) == 1:
            assert fed_ids(llm, messages) == stock.apply_chat_template(messages, add_generation_prompt=True, return_dict=False), messages


THREE_TURNS = [*chat_matrix()[1], {"role": "assistant", "content": "春眠不觉晓。"}]  # no system message; added below


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", [t for t in NAMED if load_template(t).is_chat])
def test_training_ids_are_hf_whole_text_ids_at_three_turns(request: pytest.FixtureRequest, form: str, name: str) -> None:
    """finetune_chat.py's samples (tokenize_conversations: the batched, sentencepiece path) for
    whole 3-turn conversations are `apply_chat_template(tokenize=True)` of the same conversation
    (+ the trained EOS where the template has none): the text after `</s>` starts with `▁` in
    training as in HF and llama.cpp."""
    legacy_tokenizer = load_tokenizer(str(form_dir(request, form)))
    template = load_template(name, legacy_tokenizer)
    jinja = hf_chat_template(template, legacy_tokenizer)
    add_eos = not template_trains_eos(template, legacy_tokenizer)
    for system in (None, "你是一个乐于助人的助手。", ""):
        messages = ([] if system is None else [{"role": "system", "content": system}]) + THREE_TURNS
        want = legacy_tokenizer.apply_chat_template(messages, chat_template=jinja, return_dict=False)
        want += [legacy_tokenizer.eos_token_id] if add_eos else []
        (sample,) = tokenize_conversations([Conversation(messages, "test")], legacy_tokenizer, template, cutoff_len=2048)
        assert sample["input_ids"] == want, (name, system)
        segments = template.chat_segments(messages, add_generation_prompt=False)
        assert encode_segments(legacy_tokenizer, segments, add_eos=add_eos)[0] == want, (name, system)
        encoder = BatchEncoder(legacy_tokenizer)  # the sentencepiece path itself, not its fallback to HF
        by_sentencepiece = encoder([s.text for s in segments], sample_starts([len(segments)]))
        assert [i for seg in by_sentencepiece for i in seg] == want[1 : len(want) - add_eos], (name, system)
        assert encoder.fast == (form == "legacy")  # sentencepiece serves a LlamaTokenizer only
        if name == "vicuna_v1.1":  # the `▁` after `</s>`: "USER:" as at the start of a text
            eos_at = want.index(legacy_tokenizer.eos_token_id)
            assert want[eos_at + 1 : eos_at + 1 + len(ids(legacy_tokenizer, "USER:"))] == ids(legacy_tokenizer, "USER:")
