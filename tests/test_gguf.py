"""GGUF export run by the real llama.cpp (llama-cpp-python): the same token ids as HF on Chinese
text, the memorized answers reproduced by greedy decoding, top-1 agreement with HF, quantization,
and the terminal chat tool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import MEMORIZED_COUNT, SAMPLE_INSTRUCT, read_jsonl, run_script

llama_cpp = pytest.importorskip("llama_cpp", reason="optional group: bash scripts/setup_env.sh --llamacpp")

from chinese_vicuna.data.fast_tokenize import encode_continuations  # noqa: E402
from chinese_vicuna.export.gguf import convert  # noqa: E402
from chinese_vicuna.infer.generation import chat_prompt_ids, prompt_ids  # noqa: E402
from chinese_vicuna.infer.llamacpp import LlamaCppTokenizer, greedy_answer, load_gguf  # noqa: E402
from chinese_vicuna.prompts import available_templates, load_template  # noqa: E402

RECORDS = read_jsonl(SAMPLE_INSTRUCT)


@pytest.fixture(scope="module")
def merged_dir(tiny_model_dir: Path, memorized_lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import merge_lora

    out = tmp_path_factory.mktemp("gguf") / "merged"
    merge_lora.main(["--base_model", str(tiny_model_dir), "--lora_weights", str(memorized_lora), "--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def f16_gguf(merged_dir: Path) -> Path:
    """Written by the tool in llama.cpp's form: `convert_hf_to_gguf.py DIR --outfile F --outtype T`."""
    import convert_to_gguf

    out = merged_dir.parent / "model-f16.gguf"
    convert_to_gguf.main([str(merged_dir), "--outfile", str(out), "--outtype", "f16"])
    return out


def test_the_folder_flag_and_the_positional_folder_write_the_same_file(merged_dir: Path, f16_gguf: Path) -> None:
    import convert_to_gguf

    flagged = merged_dir.parent / "model-f16-flag.gguf"
    convert_to_gguf.main(["--model_dir", str(merged_dir), "--outfile", str(flagged)])  # --outtype f16 is the default
    assert flagged.read_bytes() == f16_gguf.read_bytes()


@pytest.fixture(scope="module")
def hf(merged_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(merged_dir))


def test_llama_cpp_tokenizes_chinese_like_hf(f16_gguf: Path, hf) -> None:
    _, tokenizer = hf
    llm = load_gguf(str(f16_gguf), n_ctx=256)
    texts = [r["instruction"] + r["input"] + r["output"] for r in RECORDS]
    texts += [
        "全角标点：（括号）“引号”、顿号；分号！",
        "数字 2023 年 12 月 31 日, English words and 中文 mixed.",
        "换行\n\n### Response:\n结束",
    ]
    for text in texts:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == tokenizer(text)["input_ids"], text
    # prompts built segment by segment (as in training) agree too
    template = load_template("alpaca", tokenizer)
    for r in RECORDS[:MEMORIZED_COUNT]:
        assert prompt_ids(LlamaCppTokenizer(llm), template, r["instruction"], r["input"]) == prompt_ids(
            tokenizer, template, r["instruction"], r["input"]
        )


def test_greedy_llama_cpp_reproduces_trained_answers(f16_gguf: Path) -> None:
    llm = load_gguf(str(f16_gguf), n_ctx=512)
    tokenizer = LlamaCppTokenizer(llm)
    template = load_template("alpaca", None)
    for r in RECORDS[:3]:
        assert greedy_answer(llm, tokenizer, template, r["instruction"], r["input"]) == r["output"]


@torch.inference_mode()
def test_top1_agreement_with_hf(f16_gguf: Path, hf) -> None:
    model, tokenizer = hf
    llm = load_gguf(str(f16_gguf), n_ctx=512, logits_all=True)
    template = load_template("alpaca", tokenizer)
    agree = total = 0
    for r in RECORDS:
        ids = prompt_ids(tokenizer, template, r["instruction"], r["input"]) + encode_continuations(tokenizer, [r["output"]])[0]
        hf_top = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
        llm.reset()
        llm.eval(ids)
        cpp_top = llm.scores[: len(ids)].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(hf_top, cpp_top))
        total += len(ids)
    print(f"top-1 agreement HF vs llama.cpp (f16): {agree}/{total} = {agree / total:.4f}")
    assert agree / total >= 0.99


def test_quantized_files(merged_dir: Path, f16_gguf: Path) -> None:
    q8 = convert(merged_dir, merged_dir.parent / "model-q8_0.gguf", "q8_0")
    q4 = convert(merged_dir, merged_dir.parent / "model-q4_0.gguf", "q4_0")
    sizes = {p.name: p.stat().st_size for p in (f16_gguf, q8, q4)}
    print("GGUF sizes:", sizes)
    assert sizes["model-q4_0.gguf"] < sizes["model-q8_0.gguf"] < sizes["model-f16.gguf"]
    llm = load_gguf(str(q8), n_ctx=512)
    r = RECORDS[0]
    assert greedy_answer(llm, LlamaCppTokenizer(llm), load_template("alpaca", None), r["instruction"]) == r["output"]


def test_cpu_chat_terminal(f16_gguf: Path) -> None:
    questions = "".join(r["instruction"] + "\n" for r in RECORDS[:2])
    # no --prompt_template: the alpaca template the LoRA was trained with travels inside the GGUF
    # (cpu_chat's own default is chinese-vicuna-chat, which would not give these answers)
    proc = run_script("tools/cpu_chat.py", "--gguf", str(f16_gguf), "--show_speed", stdin=questions)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [RECORDS[0]["output"], RECORDS[1]["output"]]
    assert "tokens/s" in proc.stderr
    # a --max_new_tokens past the context is lowered (to half of it), with a message
    proc = run_script("tools/cpu_chat.py", "--gguf", str(f16_gguf), "--n_ctx", "512", "--max_new_tokens", "4096", stdin=questions)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [RECORDS[0]["output"], RECORDS[1]["output"]]
    assert "[max_new_tokens=4096 does not fit the context n_ctx=512; using 256]" in proc.stderr
    proc = run_script("tools/cpu_chat.py", "--gguf", str(f16_gguf.parent / "missing.gguf"), stdin="")
    assert proc.returncode == 2 and "GGUF file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_merged_model_and_gguf_carry_the_template(merged_dir: Path, f16_gguf: Path, hf) -> None:
    """merge_lora.py writes the training template as the merged tokenizer's chat_template, the GGUF
    converter as tokenizer.chat_template; both render the registry's text byte for byte after BOS
    (with transformers and with llama-cpp-python's Jinja chat handler), BOS joined to it as each
    tokenizer needs (transformers' converted tokenizer: a space, which it reads as the dummy prefix;
    llama.cpp adds the dummy prefix after BOS itself)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, tokenizer = hf
    template = load_template("alpaca", tokenizer)
    assert (merged_dir / "prompt_template.json").is_file()
    assert (merged_dir / "chat_template.jinja").read_text(encoding="utf-8") == template.jinja(bos=True, after_bos="space")
    llm = load_gguf(str(f16_gguf), n_ctx=256)
    assert llm.metadata["tokenizer.chat_template"] == template.jinja(bos=True, after_bos="strip")
    assert load_template("alpaca").spec == {**__import__("json").loads(llm.metadata["chinese_vicuna.prompt_template"]), "name": "alpaca"}
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    for r in RECORDS[:MEMORIZED_COUNT]:
        messages = [{"role": "user", "content": r["instruction"]}]
        want = template.instruction_prompt(r["instruction"])
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "<s> " + want
        assert formatter(messages=messages).prompt == "<s>" + want


@pytest.mark.parametrize("name", [t for t in available_templates() if t != "auto"])
def test_cpu_chat_prompt_ids_equal_hf(f16_gguf: Path, hf, name: str) -> None:
    """tools/cpu_chat.py builds prompts with llama.cpp's tokenizer: the same ids as HF for every
    template, special tokens (</s>, <s> in vicuna_v1.1 and llama2 history) included."""
    _, tokenizer = hf
    llm = load_gguf(str(f16_gguf), n_ctx=512)
    history = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": " What is 2+2? "},
        {"role": "assistant", "content": "4"},
    ]
    hf_template, cpp_template = load_template(name, tokenizer), load_template(name, None)
    if hf_template.is_chat:
        want, _ = chat_prompt_ids(tokenizer, hf_template, history, "写一首诗。", None, 400)
        got, _ = chat_prompt_ids(LlamaCppTokenizer(llm), cpp_template, history, "写一首诗。", None, 400)
    else:
        want = prompt_ids(tokenizer, hf_template, "写一首诗。", "关于春天")
        got = prompt_ids(LlamaCppTokenizer(llm), cpp_template, "写一首诗。", "关于春天")
    assert got == want


@pytest.mark.parametrize("name", ["alpaca", "vicuna_v1.1", "llama2"])
def test_cpu_chat_keeps_special_token_text_as_text_like_hf(f16_gguf: Path, hf, name: str) -> None:
    """Special-token text typed by the user ("<s>", "</s>") is characters on both engines; the template's stay ids."""
    _, tokenizer = hf
    llm = load_gguf(str(f16_gguf), n_ctx=512)
    history = [{"role": "user", "content": "写 <s>删除线</s>"}, {"role": "assistant", "content": "好的：</s>"}]
    hf_template, cpp_template = load_template(name, tokenizer), load_template(name, None)
    if hf_template.is_chat:
        want, _ = chat_prompt_ids(tokenizer, hf_template, history, "</s>再来", None, 400)
        got, _ = chat_prompt_ids(LlamaCppTokenizer(llm), cpp_template, history, "</s>再来", None, 400)
        assert want.count(tokenizer.eos_token_id) == 1  # the template's, ending the one answer
    else:
        want = prompt_ids(tokenizer, hf_template, "写 <s>删除线</s>", "</s>")
        got = prompt_ids(LlamaCppTokenizer(llm), cpp_template, "写 <s>删除线</s>", "</s>")
        assert want.count(tokenizer.eos_token_id) == 0
    assert got == want


def chat_matrix() -> list[list[dict[str, str]]]:
    """1 and 3 user turns, without / with / with an empty system message, Chinese and English."""
    turns = [
        {"role": "user", "content": "中国的首都是哪里？"},
        {"role": "assistant", "content": "北京。"},
        {"role": "user", "content": "What about France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "写一首诗。"},
    ]
    cases = []
    for system in (None, "你是一个乐于助人的助手。", ""):
        head = [] if system is None else [{"role": "system", "content": system}]
        cases += [head + turns[:1], head + turns]
    return cases


def fed_ids(llm, messages: list[dict[str, str]]) -> list[int]:
    """The ids `create_chat_completion` fed the model (it evaluates the prompt, then samples the
    one token asked for without evaluating it)."""
    llm.reset()
    llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
    return [int(i) for i in llm.input_ids[: llm.n_tokens]]


def special_text_breaks(template) -> bool:
    """Whether the template puts text right after a special token inside a conversation
    (vicuna_v1.1's `</s>USER:`, llama2's `</s><s>[INST]`): there llama.cpp's tokenizer adds its
    dummy-prefix space, which HF's converted tokenizer in the default form (`legacy` unset, as
    the tiny model's) does not (docs/export.md; `"legacy": true`: tests/test_consumer_ids.py)."""
    return any("{eos}" in template.spec.get(k, "") or "{bos}" in template.spec.get(k, "") for k in ("assistant_format", "user_format"))


@pytest.mark.parametrize("name", [t for t in available_templates() if t != "auto"])
def test_create_chat_completion_feeds_hf_ids(f16_gguf: Path, hf, name: str) -> None:
    """Stock llama-cpp-python `create_chat_completion` with the GGUF's Jinja template (built as
    Llama builds its handler from `tokenizer.chat_template`) feeds the model HF's ids: BOS
    exactly once, then the text as HF tokenizes it (1 and 3 turns, with and without system)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from chinese_vicuna.prompts import hf_chat_template, llama_cpp_chat_template

    _, tokenizer = hf
    template = load_template(name, tokenizer)
    llm = load_gguf(str(f16_gguf), n_ctx=512)
    formatter = Jinja2ChatFormatter(template=llama_cpp_chat_template(template), eos_token="</s>", bos_token="<s>")
    llm.chat_handler = formatter.to_chat_handler()
    checked = 0
    for messages in chat_matrix():
        if not template.is_chat and sum(m["role"] == "user" for m in messages) > 1:
            continue  # an instruction template answers one instruction
        want = tokenizer.apply_chat_template(
            messages, chat_template=hf_chat_template(template), add_generation_prompt=True, return_dict=False
        )
        got = fed_ids(llm, messages)
        assert got[0] == tokenizer.bos_token_id != got[1]
        if len(messages) > 3 and special_text_breaks(template):
            # llama.cpp's one difference from the default form: its tokenizer starts the text after
            # each special token inside the history with the dummy-prefix "▁" (as `"legacy": true` does)
            text = tokenizer.apply_chat_template(
                messages, chat_template=hf_chat_template(template), add_generation_prompt=True, tokenize=False
            )
            assert got != want and got == legacy_ids(tokenizer, text), messages
        else:
            assert got == want, messages
        checked += 1
    assert checked >= 3


def legacy_ids(tokenizer, text: str) -> list[int]:
    """`text` tokenized piece by piece between special tokens, each piece as the start of a text."""
    import re

    specials = {tokenizer.bos_token: tokenizer.bos_token_id, tokenizer.eos_token: tokenizer.eos_token_id}
    ids: list[int] = []
    for i, piece in enumerate(re.split("(" + "|".join(map(re.escape, specials)) + ")", text)):
        if i % 2:
            ids.append(specials[piece])
        elif piece:
            ids += tokenizer(piece.removeprefix(" ") if ids else piece, add_special_tokens=False)["input_ids"]
    return ids


def test_the_gguf_carries_a_template_that_feeds_hf_ids(tiny_model_dir: Path, two_loras: dict[str, Path], tmp_path: Path) -> None:
    """End to end with no project code at inference: merge a vicuna_v1.1 LoRA, convert to GGUF,
    `Llama(gguf).create_chat_completion` (the embedded template, llama-cpp-python's default
    handler) feeds HF's ids and answers the memorized question."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    import merge_lora
    from serve_helpers import ANSWERS_B, INSTRUCTIONS

    merged = tmp_path / "merged"
    merge_lora.main(["--base_model", str(tiny_model_dir), "--lora_weights", str(two_loras["b"]), "--output_dir", str(merged)])
    gguf = convert(merged, tmp_path / "b.gguf", "f16")
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    llm = Llama(model_path=str(gguf), n_ctx=512, verbose=False)
    assert llm.chat_format == "chat_template.default"
    for messages in chat_matrix()[:1] + chat_matrix()[2:3]:
        want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert fed_ids(llm, messages) == want, messages
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": INSTRUCTIONS[0]}], max_tokens=96, temperature=0.0)
    assert reply["choices"][0]["message"]["content"].strip() == ANSWERS_B[0].strip()


@pytest.mark.parametrize("name", ["vicuna_v1.1", "llama2", "alpaca"])
def test_serve_llamacpp_chat_format_feeds_hf_ids_in_history_too(f16_gguf: Path, hf, name: str) -> None:
    """`serve.py --engine llamacpp`'s chat format (chinese_vicuna/serving/llamacpp_server.py): the
    rendered chat tokenized as HF does, so even a history with special tokens gets HF's ids."""
    from chinese_vicuna.prompts import hf_chat_template
    from chinese_vicuna.serving.llamacpp_server import register_template_format

    _, tokenizer = hf
    template = load_template(name, tokenizer)
    llm = load_gguf(str(f16_gguf), n_ctx=512)
    llm.chat_handler = None
    llm.chat_format = register_template_format(name)
    for messages in chat_matrix():
        if not template.is_chat and sum(m["role"] == "user" for m in messages) > 1:
            continue
        want = tokenizer.apply_chat_template(
            messages, chat_template=hf_chat_template(template), add_generation_prompt=True, return_dict=False
        )
        assert fed_ids(llm, messages) == want, messages


# --------------------------------------------------------------------------------------------
# RoPE scaling: llama.cpp's logits equal HF's past the original window
# --------------------------------------------------------------------------------------------
WINDOW = 64  # the tiny model's weights do not depend on its window: config.json says 64 here


def _with_rope(tiny_model_dir: Path, out: Path, kind: str | None) -> Path:
    """A copy of the tiny model with a 64-position window, scaled ×2 by `kind` (None: unscaled)."""
    import json
    import shutil

    from chinese_vicuna.model.rope import rope_settings, scaled_config

    shutil.copytree(tiny_model_dir, out)
    config = {**json.loads((out / "config.json").read_text()), "max_position_embeddings": WINDOW}
    if kind:
        config = scaled_config(config, rope_settings(kind, 2, None))
    (out / "config.json").write_text(json.dumps(config))
    return out


def _hf_and_llama_cpp_logits(model_dir: Path, ids: list[int]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([ids])).logits[0]
    llm = load_gguf(str(convert(model_dir, model_dir / "model-f32.gguf", "f32")), n_ctx=2 * WINDOW, logits_all=True)
    llm.eval(ids)
    return hf_logits, torch.tensor(llm.scores[: len(ids)]), llm.metadata


@pytest.fixture(scope="module")
def long_ids(tiny_model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = tokenizer("".join(r["instruction"] + r["output"] for r in RECORDS))["input_ids"][: 2 * WINDOW - 8]
    assert len(ids) == 2 * WINDOW - 8  # well past the 64-position window
    return ids


@pytest.fixture(scope="module")
def unscaled_gap(tiny_model_dir: Path, long_ids: list[int], tmp_path_factory: pytest.TempPathFactory) -> tuple[float, torch.Tensor]:
    """How far llama.cpp's logits are from HF's for the unscaled model (its KV cache is f16), and HF's logits."""
    hf_logits, cpp_logits, _ = _hf_and_llama_cpp_logits(
        _with_rope(tiny_model_dir, tmp_path_factory.mktemp("rope") / "none", None), long_ids
    )
    return float((hf_logits - cpp_logits).abs().max()), hf_logits


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
def test_scaled_rope_logits_equal_hf_past_the_window(
    tiny_model_dir: Path, long_ids: list[int], unscaled_gap: tuple[float, torch.Tensor], kind: str, tmp_path: Path
) -> None:
    gap, unscaled_hf = unscaled_gap
    hf_logits, cpp_logits, metadata = _hf_and_llama_cpp_logits(_with_rope(tiny_model_dir, tmp_path / kind, kind), long_ids)
    assert int(metadata["llama.context_length"]) == 2 * WINDOW
    if kind == "llama3":  # llama.cpp's form: per-pair divisors in rope_freqs.weight, no scaling keys
        assert "llama.rope.scaling.type" not in metadata
    else:
        assert metadata["llama.rope.scaling.type"] == kind and float(metadata["llama.rope.scaling.factor"]) == 2.0
        assert int(metadata["llama.rope.scaling.original_context_length"]) == WINDOW
    past = slice(WINDOW, None)
    # the scaling matters past the window (far more than llama.cpp's rounding) ...
    assert float((hf_logits[past] - unscaled_hf[past]).abs().max()) > 20 * gap
    # ... and llama.cpp follows it: as close to HF as the unscaled model is (f16 KV cache; 2× for rounding in other places)
    assert float((hf_logits - cpp_logits).abs().max()) < 2 * gap
    assert torch.equal(hf_logits.argmax(-1), cpp_logits.argmax(-1))


def test_llama3_divisors_are_transformers_frequencies(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from chinese_vicuna.export.gguf import llama3_rope_divisors
    from chinese_vicuna.model.rope import rope_settings, scaled_config

    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    scaled = scaled_config({**config.to_dict(), "max_position_embeddings": WINDOW}, rope_settings("llama3", 4, None))
    config.rope_parameters, config.max_position_embeddings = scaled["rope_parameters"], scaled["max_position_embeddings"]
    llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    unscaled = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    divisors = torch.from_numpy(llama3_rope_divisors(scaled["rope_parameters"], 32, 10000.0))
    torch.testing.assert_close(unscaled / divisors, llama3, rtol=2e-6, atol=0)  # fp32 rounding of the two ways
    assert divisors[0] == 1.0 and divisors[-1] == 4.0 and ((divisors > 1) & (divisors < 4)).any()  # all three bands


def test_dynamic_ntk_is_written_unscaled_with_the_original_window(
    tiny_model_dir: Path, long_ids: list[int], unscaled_gap: tuple[float, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """llama.cpp has no dynamic NTK; transformers' equals no scaling while the sequence fits the
    original window, so the GGUF is that model, declared with that window, and says so."""
    ids = long_ids[: WINDOW - 4]
    with caplog.at_level("WARNING"):
        hf_logits, cpp_logits, metadata = _hf_and_llama_cpp_logits(_with_rope(tiny_model_dir, tmp_path / "dynamic", "dynamic"), ids)
    assert any("no llama.cpp equivalent" in r.getMessage() and "linear or yarn" in r.getMessage() for r in caplog.records)
    assert int(metadata["llama.context_length"]) == WINDOW and "llama.rope.scaling.type" not in metadata
    assert float((hf_logits - cpp_logits).abs().max()) < 2 * unscaled_gap[0]
    assert torch.equal(hf_logits.argmax(-1), cpp_logits.argmax(-1))
