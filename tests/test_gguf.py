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
    converter as tokenizer.chat_template; both render the registry's text byte for byte (with
    transformers and with llama-cpp-python's Jinja chat handler)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, tokenizer = hf
    template = load_template("alpaca", tokenizer)
    assert (merged_dir / "prompt_template.json").is_file()
    assert (merged_dir / "chat_template.jinja").read_text(encoding="utf-8") == template.jinja()
    llm = load_gguf(str(f16_gguf), n_ctx=256)
    assert llm.metadata["tokenizer.chat_template"] == template.jinja()
    assert load_template("alpaca").spec == {**__import__("json").loads(llm.metadata["chinese_vicuna.prompt_template"]), "name": "alpaca"}
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    for r in RECORDS[:MEMORIZED_COUNT]:
        messages = [{"role": "user", "content": r["instruction"]}]
        want = template.instruction_prompt(r["instruction"])
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
        assert formatter(messages=messages).prompt == want


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
