"""chinese_vicuna.infer.generation: streaming equals plain generation, stop strings never shown,
UTF-8-safe incremental decoding, the stop signal, the history budget, and loading checks."""

from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.data.encode import encode_segments
from chinese_vicuna.data.fast_tokenize import encode_continuations
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.generation import (
    GenerationStats,
    IncrementalDecoder,
    StopStringFilter,
    _QueueStreamer,
    chat_prompt_ids,
    finish_text,
    generate_answer,
    generate_text,
    prompt_ids,
    stream_generate,
)
from chinese_vicuna.model.build import load_for_inference
from chinese_vicuna.prompts import load_template

MAX_POS_SAFE = 1500  # the tiny model has 2048 positions


@pytest.fixture(scope="module")
def memorized(tiny_model_dir: Path, memorized_lora: Path):
    return load_for_inference(str(tiny_model_dir), str(memorized_lora), "fp32")


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path):
    return load_for_inference(str(tiny_model_dir), None, "fp32")


@pytest.fixture(scope="module")
def records(memorized_data: Path) -> list[dict]:
    return [json.loads(line) for line in memorized_data.read_text(encoding="utf-8").splitlines()]


def raw_generate(model, tokenizer, ids: list[int], **kwargs) -> str:
    """Plain `model.generate` + decode: the reference the streamed text must equal."""
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# Streaming equals plain generation
# --------------------------------------------------------------------------------------------
def test_greedy_stream_equals_generate_and_memorized_answers(memorized, records):
    model, tok = memorized
    template = load_template("alpaca", tok)
    for rec in records:
        ids = prompt_ids(tok, template, rec["instruction"], rec["input"])
        stats = GenerationStats()
        pieces = list(stream_generate(model, tok, ids, DecodingArguments(), template.stop_strings, stats=stats))
        plain = raw_generate(model, tok, ids, max_new_tokens=256, do_sample=False)
        assert "".join(pieces) == plain == rec["output"]
        assert len(pieces) > 1  # it streamed, piece by piece
        # the answer's tokens as trained: a continuation of the prompt (no dummy-prefix "▁")
        assert stats.stopped_by == "eos" and stats.new_tokens == len(encode_continuations(tok, [rec["output"]])[0]) + 1
        assert generate_answer(model, tok, template, rec["instruction"], rec["input"]) == rec["output"]


@pytest.mark.parametrize(
    "decoding",
    [
        DecodingArguments(max_new_tokens=40),
        DecodingArguments(max_new_tokens=40, repetition_penalty=1.3),
        DecodingArguments(max_new_tokens=40, min_new_tokens=30),
    ],
    ids=["greedy", "repetition_penalty", "min_new_tokens"],
)
def test_stream_equals_generate_with_stop_strings(base, decoding):
    """Random base model, chat template: both paths cut at the same stop string, or run to the limit."""
    model, tok = base
    template = load_template("chinese-vicuna-chat", tok)
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你的吗？"}]
    ids, _ = chat_prompt_ids(tok, template, history, "你叫什么名字？")
    kwargs = {k: v for k, v in decoding.generate_kwargs().items() if k in ("max_new_tokens", "min_new_tokens", "repetition_penalty")}
    reference = finish_text(raw_generate(model, tok, ids, do_sample=False, **kwargs), template.stop_strings, strip=True)
    streamed = "".join(stream_generate(model, tok, ids, decoding, template.stop_strings, strip=True))
    assert streamed == reference == generate_text(model, tok, ids, decoding, template.stop_strings, strip=True)
    if decoding.min_new_tokens:
        stats = GenerationStats()
        list(stream_generate(model, tok, ids, decoding, stats=stats))
        assert stats.new_tokens >= decoding.min_new_tokens


def test_sampling_with_a_seed_matches_generate(base):
    model, tok = base
    ids = prompt_ids(tok, load_template("alpaca", tok), "写一首诗")
    decoding = DecodingArguments(max_new_tokens=30, do_sample=True, temperature=0.9, top_p=0.8, top_k=20)
    torch.manual_seed(7)
    reference = raw_generate(model, tok, ids, do_sample=True, max_new_tokens=30, temperature=0.9, top_p=0.8, top_k=20)
    torch.manual_seed(7)
    streamed = "".join(stream_generate(model, tok, ids, decoding))
    torch.manual_seed(8)
    other = "".join(stream_generate(model, tok, ids, decoding))
    assert streamed == reference and other != reference


def test_beam_search_comes_as_one_piece(memorized, records):
    model, tok = memorized
    template = load_template("alpaca", tok)
    ids = prompt_ids(tok, template, records[0]["instruction"])
    decoding = DecodingArguments(num_beams=3)
    stats = GenerationStats()
    pieces = list(stream_generate(model, tok, ids, decoding, template.stop_strings, stats=stats))
    reference = raw_generate(model, tok, ids, max_new_tokens=256, num_beams=3, do_sample=False)
    assert not decoding.streams
    assert pieces == [records[0]["output"]] == [reference]
    assert stats.stopped_by == "eos"


# --------------------------------------------------------------------------------------------
# Incremental decoding and stop strings
# --------------------------------------------------------------------------------------------
def test_incremental_decoding_never_breaks_utf8(tiny_model_dir: Path):
    from chinese_vicuna.model.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    text = "北京是中国的首都。𠀋龘 emoji😀 Hello world，「引号」！"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces_of = tok.convert_ids_to_tokens(ids)
    assert sum(p.startswith("<0x") for p in pieces_of) >= 10  # byte-fallback tokens are in there
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text


def test_stop_strings_are_never_shown():
    stops = ["### Instruction:", "User:"]
    text = "答案是四。\n\n### Instr 不是停止词 ### Instruction: 这段不该出现"
    expected = finish_text(text, stops)
    assert expected == "答案是四。\n\n### Instr 不是停止词 "
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 8))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        filt, shown = StopStringFilter(stops), ""
        for chunk in chunks:
            shown += filt.push(chunk)
            assert expected.startswith(shown)  # never a character that is later taken back
            assert "### Instruction:"[:5] not in shown[len("答案是四。\n\n### Instr 不是停止词 ") :]
        shown += filt.flush()
        assert shown == expected and filt.stopped


def test_chat_answers_are_stripped_like_plain_ones():
    stops = ["User:", "\nUser"]
    text = "  你好！\n\n我在。 \n\nUser: 下一轮"
    filt = StopStringFilter(stops, strip=True)
    shown = [filt.push(c) for c in text] + [filt.flush()]
    assert "".join(shown) == finish_text(text, stops, strip=True) == "你好！\n\n我在。"


def test_streamer_holds_partial_characters_and_stop_strings(tiny_model_dir: Path):
    """The streamer generate() drives: token by token, with byte-fallback tokens and a stop string."""
    from chinese_vicuna.model.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    stops = load_template("alpaca", tok).stop_strings
    text = "龘𠀋是生僻字。\n\n### Instruction:\n再来"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stop = threading.Event()
    streamer = _QueueStreamer(tok, stops, False, stop)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt comes first and is not shown
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    pieces = list(streamer.queue.queue)
    assert all("\ufffd" not in p and "#" not in p for p in pieces)
    assert "".join(pieces) == "龘𠀋是生僻字。\n\n" and stop.is_set()


# --------------------------------------------------------------------------------------------
# The stop signal
# --------------------------------------------------------------------------------------------
def test_stop_signal_ends_generation_promptly(base):
    model, tok = base
    ids = prompt_ids(tok, load_template("alpaca", tok), "讲一个很长的故事")
    decoding = DecodingArguments(max_new_tokens=MAX_POS_SAFE, min_new_tokens=MAX_POS_SAFE)  # would run to 1500 tokens

    already = threading.Event()
    already.set()
    stats = GenerationStats()
    list(stream_generate(model, tok, ids, decoding, stop_event=already, stats=stats))
    assert stats.new_tokens == 1 and stats.stopped_by == "stop_signal"  # checked after every token

    event, stats = threading.Event(), GenerationStats()
    pieces = stream_generate(model, tok, ids, decoding, stop_event=event, stats=stats)
    next(pieces)
    event.set()
    rest = list(pieces)
    assert stats.stopped_by == "stop_signal" and stats.new_tokens < MAX_POS_SAFE
    assert isinstance(rest, list)

    # closing the stream (a page that went away) ends the generation thread too
    stats = GenerationStats()
    pieces = stream_generate(model, tok, ids, decoding, stats=stats)
    next(pieces)
    pieces.close()
    assert 0 < stats.new_tokens < MAX_POS_SAFE
    assert not any(t.name == "generate" and t.is_alive() for t in threading.enumerate())


def test_bad_decoding_settings_are_user_errors():
    for bad in (DecodingArguments(max_new_tokens=0), DecodingArguments(do_sample=True, temperature=0), DecodingArguments(top_p=1.5)):
        with pytest.raises(UserError):
            bad.validate()


# --------------------------------------------------------------------------------------------
# History budget
# --------------------------------------------------------------------------------------------
HISTORY = [
    {"role": "user", "content": "推荐一种水果"},
    {"role": "assistant", "content": "推荐苹果，营养丰富又好买。"},
    {"role": "user", "content": "还有别的吗？"},
    {"role": "assistant", "content": "香蕉也不错，可以补充钾。"},
    {"role": "user", "content": "哪个更甜？"},
    {"role": "assistant", "content": "一般来说香蕉更甜一些。"},
    {"role": "user", "content": "一周有几天？"},
    {"role": "assistant", "content": "一周有七天。"},
]


@pytest.mark.parametrize("name", ["chinese-vicuna-chat", "vicuna_v1.1", "llama2"])
def test_history_budget_drops_oldest_turns_first(tiny_model_dir: Path, name: str):
    from chinese_vicuna.model.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    template = load_template(name, tok)
    system = "你是一个乐于助人的助手。"
    question = "周末是哪两天？"

    def ids_keeping(turns: int) -> list[int]:
        kept = HISTORY[len(HISTORY) - 2 * turns :] if turns else []
        ids, _ = encode_segments(tok, template.chat_segments([*kept, {"role": "user", "content": question}], system=system))
        return ids

    full, alone = len(ids_keeping(4)), len(ids_keeping(0))
    assert alone < len(ids_keeping(1)) < len(ids_keeping(2)) < full
    for budget in range(alone, full + 3):
        ids, dropped = chat_prompt_ids(tok, template, HISTORY, question, system, budget)
        assert len(ids) <= budget  # never over the budget
        assert ids == ids_keeping(4 - dropped)  # the newest turns kept, whole
        if dropped:
            assert len(ids_keeping(4 - dropped + 1)) > budget  # and no older turn would have fit
        assert question in tok.decode(ids) and system in tok.decode(ids)  # the question and system always stay
    assert chat_prompt_ids(tok, template, HISTORY, question, system, None)[1] == 0
    with pytest.raises(UserError, match="max_memory"):
        chat_prompt_ids(tok, template, HISTORY, question, system, alone - 1)


def test_history_prompt_ids_match_chat_training(tiny_model_dir: Path, tmp_path: Path):
    """The prompt for turn k is exactly the training sample's ids before answer k."""
    from chinese_vicuna.data.chat import tokenize_conversations
    from chinese_vicuna.data.formats import read_conversations
    from chinese_vicuna.model.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    template = load_template("chinese-vicuna-chat", tok)
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps({"messages": HISTORY}, ensure_ascii=False) + "\n", encoding="utf-8")
    (sample,) = tokenize_conversations(read_conversations(path), tok, template, cutoff_len=4096)
    labels = sample["labels"]
    starts = [i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100]
    assert len(starts) == 4
    for k, start in enumerate(starts):
        ids, dropped = chat_prompt_ids(tok, template, HISTORY[: 2 * k], HISTORY[2 * k]["content"])
        assert dropped == 0 and ids == sample["input_ids"][:start]


def test_instruction_template_is_refused_for_chat(tiny_model_dir: Path):
    from chinese_vicuna.model.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(UserError, match="chat template"):
        chat_prompt_ids(tok, load_template("alpaca", tok), [], "你好")


# --------------------------------------------------------------------------------------------
# Loading: checkpoints, stock PEFT, merged models, and LoRAs for another base
# --------------------------------------------------------------------------------------------
def test_checkpoint_and_merged_model_load(memorized, tiny_model_dir: Path, memorized_lora: Path, records, tmp_path: Path):
    model, tok = memorized
    checkpoints = sorted(memorized_lora.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpt_model, ckpt_tok = load_for_inference(str(tiny_model_dir), str(checkpoints[-1]), "fp32")
    template = load_template("alpaca", ckpt_tok)
    assert generate_answer(ckpt_model, ckpt_tok, template, records[0]["instruction"]) == records[0]["output"]

    merged_dir = tmp_path / "merged"
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(merged_dir)
    tok.save_pretrained(merged_dir)
    merged_model, merged_tok = load_for_inference(str(merged_dir), None, "fp32")
    assert generate_answer(merged_model, merged_tok, template, records[1]["instruction"]) == records[1]["output"]


def test_stock_peft_adapter_loads(tiny_model_dir: Path, tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "stock")  # adapter files only, no tokenizer
    model, _ = load_for_inference(str(tiny_model_dir), str(tmp_path / "stock"), "fp32")
    assert type(model).__name__.startswith("Peft")


def test_lora_for_another_base_is_a_clear_error(tiny_model_dir: Path, memorized_lora: Path, tmp_path: Path):
    # 1. adapter_config.json names a base with another vocabulary size
    other_base = tmp_path / "other-base"
    other_base.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (other_base / "config.json").write_text(json.dumps({**cfg, "vocab_size": 49953}))
    adapter = tmp_path / "named-other"
    shutil.copytree(memorized_lora, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**acfg, "base_model_name_or_path": str(other_base)}))
    with pytest.raises(UserError, match=r"\(vocab_size=49953\) but the base model has vocab_size=3000"):
        load_for_inference(str(tiny_model_dir), str(adapter), "fp32")

    # 2. the adapter carries the (expanded) tokenizer it was trained with
    from chinese_vicuna.model.loading import load_tokenizer

    adapter2 = tmp_path / "expanded-tokenizer"
    shutil.copytree(memorized_lora, adapter2, ignore=shutil.ignore_patterns("checkpoint-*"))
    expanded = load_tokenizer(str(tiny_model_dir))
    expanded.add_tokens(["小羊驼", "羊驼"])
    expanded.save_pretrained(adapter2)
    with pytest.raises(UserError, match=r"has 3002 tokens but the one in use has 3000"):
        load_for_inference(str(tiny_model_dir), str(adapter2), "fp32")

    # 3. shapes from another base (hidden size 64 instead of 128)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(**{**cfg, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}))
    get_peft_model(small, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).save_pretrained(tmp_path / "narrow")
    with pytest.raises(UserError, match="another base"):
        load_for_inference(str(tiny_model_dir), str(tmp_path / "narrow"), "fp32")


# --------------------------------------------------------------------------------------------
# Flags reach the model; the public entry point
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["generate.py", "chat.py"])
def test_attn_implementation_reaches_the_inference_model(tiny_model_dir: Path, script: str) -> None:
    """--attn_implementation was once accepted by generate.py / chat.py and silently dropped."""
    import importlib

    from chinese_vicuna.run import load_from_args

    module = importlib.import_module(script.removesuffix(".py"))
    captured = {}

    def load_and_stop(model_args):  # the script's own parsing, up to the model load
        captured["model"] = load_from_args(model_args)[0]
        raise SystemExit(0)

    for attn in ("eager", "sdpa"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, "load_from_args", load_and_stop)
            with pytest.raises(SystemExit):
                module.main(["--base_model", str(tiny_model_dir), "--attn_implementation", attn, "--precision", "fp32"])
        assert captured["model"].config._attn_implementation == attn


def test_engine_answers_messages_in_the_saved_template(tiny_model_dir: Path, memorized_lora: Path, records) -> None:
    """Engine reads prompt_template.json from the adapter; an instruction template takes one user message."""
    from chinese_vicuna import Engine

    assert (memorized_lora / "prompt_template.json").is_file()
    engine = Engine(str(tiny_model_dir), str(memorized_lora), precision="fp32")
    assert engine.template.name == "alpaca"
    rec = next(r for r in records if not r.get("input"))
    assert engine.generate([{"role": "user", "content": rec["instruction"]}]) == rec["output"]
    assert engine.generate([{"role": "system", "text": "ignored by alpaca"}, {"role": "user", "text": rec["instruction"]}]) == rec["output"]
    assert "".join(engine.stream([{"role": "user", "content": rec["instruction"]}])) == rec["output"]
    with pytest.raises(UserError, match="instruction template: give one user message"):
        engine.generate([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
