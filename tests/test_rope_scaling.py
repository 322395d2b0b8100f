"""RoPE scaling (model/rope.py): a tiny model with a 64-position window, trained with linear ×2,
answers memorized records whose question lies past position 64, through HF (the adapter says its
scaling), from the merged model (config.json carries it) and through llama.cpp from the GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.errors import UserError
from chinese_vicuna.model.rope import rope_settings, scaled_config
from conftest import memorize_args, run_script

WINDOW = 64
PREAMBLE = "请先阅读下面这段很长的说明文字，然后只回答最后的问题。"  # with the template, pushes the question past the window
QUESTIONS = [
    ("最后的问题：中国的首都是哪里？", "北京。"),
    ("最后的问题：一年有几个季节？", "四个季节。"),
    ("最后的问题：太阳从哪边升起？", "东边。"),
]


@pytest.fixture(scope="module")
def short_window_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from make_tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("rope") / "tiny-64", max_position_embeddings=WINDOW)


@pytest.fixture(scope="module")
def long_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rope-data") / "long.jsonl"
    lines = [json.dumps({"instruction": PREAMBLE + q, "input": "", "output": a}, ensure_ascii=False) for q, a in QUESTIONS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scaled_adapter(short_window_base: Path, long_records: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rope-lora") / "adapter"
    args = memorize_args(short_window_base, long_records, out, epochs=80, save_steps=1000)
    args[args.index("--micro_batch_size") + 1] = args[args.index("--batch_size") + 1] = "3"
    proc = run_script(*args, "--rope_scaling", "linear", "--rope_factor", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_questions_lie_past_the_window(short_window_base: Path) -> None:
    from transformers import AutoTokenizer

    from chinese_vicuna.infer.generation import prompt_ids
    from chinese_vicuna.prompts import load_template

    tokenizer = AutoTokenizer.from_pretrained(str(short_window_base))
    template = load_template("alpaca", tokenizer)
    prompts = [prompt_ids(tokenizer, template, PREAMBLE + q) for q, _ in QUESTIONS]
    shared = next(n for n in range(min(map(len, prompts))) if len({tuple(p[: n + 1]) for p in prompts}) > 1)
    assert shared > WINDOW  # the questions differ only past the base's window
    assert all(len(p) + len(tokenizer(a)["input_ids"]) < 2 * WINDOW for p, (_, a) in zip(prompts, QUESTIONS, strict=True))


def test_trained_with_linear_scaling_answers_through_hf_merge_and_llama_cpp(
    scaled_adapter: Path, short_window_base: Path, tmp_path: Path
) -> None:
    from chinese_vicuna.infer.generation import generate_answer
    from chinese_vicuna.model.build import load_for_inference
    from chinese_vicuna.prompts import load_template

    assert json.loads((scaled_adapter / "rope_scaling.json").read_text())["rope_type"] == "linear"
    # HF: the adapter's rope_scaling.json is applied without flags
    model, tokenizer = load_for_inference(str(short_window_base), str(scaled_adapter))
    assert model.config.max_position_embeddings == 2 * WINDOW
    template = load_template("alpaca", tokenizer)
    decoding = DecodingArguments(max_new_tokens=16)
    for q, a in QUESTIONS:
        assert generate_answer(model, tokenizer, template, PREAMBLE + q, "", decoding) == a

    merged = tmp_path / "merged"
    proc = run_script(
        "merge_lora.py",
        "--base_model",
        str(short_window_base),
        "--lora_weights",
        str(scaled_adapter),
        "--output_dir",
        str(merged),
        "--verify",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    config = json.loads((merged / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0
    assert config["max_position_embeddings"] == 2 * WINDOW
    merged_model, merged_tokenizer = load_for_inference(str(merged))
    for q, a in QUESTIONS:
        assert generate_answer(merged_model, merged_tokenizer, template, PREAMBLE + q, "", decoding) == a

    pytest.importorskip("llama_cpp", reason="optional group: bash scripts/setup_env.sh --llamacpp")
    from chinese_vicuna.export.gguf import convert
    from chinese_vicuna.infer.llamacpp import LlamaCppTokenizer, greedy_answer, load_gguf

    gguf_path = convert(merged, tmp_path / "model-f16.gguf", "f16")
    llm = load_gguf(str(gguf_path), n_ctx=2 * WINDOW)
    assert llm.metadata.get("llama.rope.scaling.type") == "linear" and float(llm.metadata["llama.rope.scaling.factor"]) == 2.0
    for q, a in QUESTIONS:
        assert greedy_answer(llm, LlamaCppTokenizer(llm), template, PREAMBLE + q, "") == a


def test_scaled_config_and_refusals() -> None:
    settings = rope_settings("yarn", 4, None)
    config = scaled_config({"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, settings)
    assert config["max_position_embeddings"] == 16384
    assert config["rope_parameters"] == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
    }
    for kind, factor, length, message in [
        ("ntk", 2, None, "use one of"),
        ("linear", 1, None, "must be > 1"),
        (None, 1, 8192, "needs --rope_scaling"),
    ]:
        with pytest.raises(UserError, match=message):
            rope_settings(kind, factor, length)


def test_dynamic_ntk_keeps_the_original_window_and_scales_past_it(short_window_base: Path) -> None:
    """transformers' dynamic NTK starts past `max_position_embeddings`: scaling that too (as the other
    types) would make dynamic a no-op up to factor × the window."""
    import torch
    from transformers import AutoModelForCausalLM

    from chinese_vicuna.model.rope import apply_rope_scaling, context_length

    ids = torch.randint(3, 2000, (1, 2 * WINDOW - 8), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(str(short_window_base)).eval()
    dynamic = AutoModelForCausalLM.from_pretrained(str(short_window_base)).eval()
    apply_rope_scaling(dynamic, rope_settings("dynamic", 2, None))
    assert dynamic.config.max_position_embeddings == WINDOW and context_length(dynamic.config) == 2 * WINDOW
    with torch.no_grad():
        assert torch.equal(plain(ids[:, : WINDOW - 4]).logits, dynamic(ids[:, : WINDOW - 4]).logits)  # within the window: none
        assert (plain(ids).logits - dynamic(ids).logits).abs().max() > 1e-2  # past it: NTK-scaled
    with pytest.raises(UserError, match="dynamic NTK has no fixed window"):
        rope_settings("dynamic", 2, 4 * WINDOW)
