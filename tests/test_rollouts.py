"""GRPO's rollouts (infer/rollouts.py, `Engine.sample_groups`): greedy groups are generate.py's
answers token for token (a LoRA on the tiny model, no merge); sampling is reproducible with a
seeded generator and draws from the model's own tempered, top-k / top-p cut distribution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.infer.engine import Engine
from chinese_vicuna.infer.rollouts import Rollouts, next_tokens, sample_groups
from conftest import read_jsonl

G = 3


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir: Path, memorized_lora: Path) -> Engine:
    """The tiny model with the memorized LoRA as a PeftModel (not merged), in train mode as a trainer holds it."""
    from chinese_vicuna.model.build import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_model_dir), str(memorized_lora))
    return Engine.around(model, tokenizer, None, [str(memorized_lora), str(tiny_model_dir)], "instruction")


def prompts_of(engine: Engine, memorized_data: Path) -> list[list[int]]:
    """Memorized instructions (answers that end in EOS early) and new ones (run to the limit), of different lengths."""
    records = read_jsonl(memorized_data)[:4]
    questions = [r["instruction"] for r in records] + ["讲一个关于小羊驼的很长很长的故事", "1+1="]
    return [engine.instruction_ids(q) for q in questions]


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["llama-step", "model-forward"])
def test_greedy_groups_are_generate_py_answers_token_for_token(
    lora_engine: Engine, memorized_data: Path, shared_prefix: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both decoders: the LLaMA step with shared prompt caches, and any model's own forward."""
    from peft import PeftModel

    from chinese_vicuna.infer import rollouts as rollouts_module

    assert rollouts_module._SharedPrefixLlama.supports(lora_engine.model)
    if not shared_prefix:
        monkeypatch.setattr(rollouts_module._SharedPrefixLlama, "supports", staticmethod(lambda model: False))
    engine = lora_engine
    model, tokenizer = engine.model, engine.tokenizer
    assert isinstance(model, PeftModel)
    model.train()
    prompts = prompts_of(engine, memorized_data)
    max_new = 12
    rollouts = engine.sample_groups(prompts, G, max_new, temperature=0)
    assert model.training  # its mode is given back
    assert len(rollouts.completion_ids) == len(rollouts.truncated) == len(rollouts.texts) == G * len(prompts)
    decoding = DecodingArguments(max_new_tokens=max_new)
    eos = tokenizer.eos_token_id
    lengths: set[int] = set()
    model.eval()
    for i, ids in enumerate(prompts):
        alone = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        expected = alone[0, len(ids) :].tolist()
        expected = expected[: expected.index(eos) + 1] if eos in expected else expected
        answer = engine.answer(ids, decoding)  # generate.py's answer
        for j in range(G):
            row = i * G + j
            assert rollouts.completion_ids[row] == expected, (i, j)
            assert rollouts.truncated[row] == (eos not in expected) == (len(expected) == max_new)
            assert rollouts.texts[row] == answer
        lengths.add(len(expected))
    print(sorted(lengths))
    assert len(lengths) > 2 and max_new in lengths  # rows left the batch early while others went on; some were cut
    memorized = read_jsonl(memorized_data)
    assert rollouts.texts[0] == memorized[0]["output"]
    model.train()


def test_messages_and_ids_give_the_same_rollouts(lora_engine: Engine) -> None:
    messages = [[{"role": "user", "content": "你好"}], [{"role": "user", "content": "中国的首都是哪里？"}]]
    by_messages = lora_engine.sample_groups(messages, 2, 8, temperature=0)
    by_ids = lora_engine.sample_groups([lora_engine.prompt_ids(m) for m in messages], 2, 8, temperature=0)
    assert by_messages == by_ids


def test_sampling_is_reproducible_with_a_seeded_generator(lora_engine: Engine, memorized_data: Path) -> None:
    prompts = prompts_of(lora_engine, memorized_data)

    def run(seed: int) -> Rollouts:
        return lora_engine.sample_groups(prompts, 4, 16, temperature=1.5, generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert run(0) == first
    assert run(1).completion_ids != first.completion_ids
    assert len({tuple(c) for c in first.completion_ids}) > len(prompts)  # a group's samples differ
    for ids, truncated in zip(first.completion_ids, first.truncated):
        eos = lora_engine.tokenizer.eos_token_id
        assert eos not in ids[:-1] and truncated == (ids[-1] != eos) and (not truncated or len(ids) == 16)
    # top_k 1 and a tiny top_p leave one token: greedy
    greedy = lora_engine.sample_groups(prompts, 2, 16, temperature=0)
    assert lora_engine.sample_groups(prompts, 2, 16, temperature=1.5, top_k=1) == greedy
    assert lora_engine.sample_groups(prompts, 2, 16, temperature=1.5, top_p=1e-6) == greedy


def test_sampled_groups_equal_the_models_own_forward(lora_engine: Engine, memorized_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling leaves groups uneven as rows end (the shared-prefix step's padded slots): with the same
    draws, the LLaMA step and the model's own forward give the same completions."""
    from chinese_vicuna.infer import rollouts as rollouts_module

    prompts = prompts_of(lora_engine, memorized_data)

    def run() -> Rollouts:
        return lora_engine.sample_groups(prompts, 5, 16, temperature=1.5, generator=torch.Generator().manual_seed(3))

    fast = run()
    lengths = [len(c) for c in fast.completion_ids]
    assert any(len(set(lengths[i : i + 5])) > 1 for i in range(0, len(lengths), 5))  # a group ended unevenly
    monkeypatch.setattr(rollouts_module._SharedPrefixLlama, "supports", staticmethod(lambda model: False))
    assert run() == fast


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir: Path):
    """The tiny base with lm_head scaled so its next-token distribution is far from flat: a wrong
    temperature or cut would show in the frequencies."""
    from chinese_vicuna.model.build import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_model_dir))
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    return model, tokenizer


DRAWS = 6000


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_first_tokens_follow_the_models_distribution(sharp_model, temperature: float, top_k: int, top_p: float) -> None:
    model, tokenizer = sharp_model
    short, long = [1, 100, 200], [1, 300, 400, 500, 600, 700, 800]  # left padding under the short one
    rollouts = sample_groups(
        model, [short, long], DRAWS, 1, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=0, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for i, ids in enumerate([short, long]):
        with torch.no_grad():  # the prompt alone, no cache, no padding
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double() / temperature
        probs = torch.softmax(logits, -1)
        sorted_probs, order = probs.sort(descending=True)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if top_k:
            keep[order[top_k:]] = False
        if top_p < 1:
            keep[order[(sorted_probs.cumsum(0) - sorted_probs) >= top_p]] = False
        expected = torch.where(keep, probs, 0.0)
        expected /= expected.sum()
        assert expected.max() > 0.05 and (expected > 0.01).sum() >= 3  # neither flat nor one token
        counts = torch.bincount(torch.tensor([c[0] for c in rollouts.completion_ids[i * DRAWS : (i + 1) * DRAWS]]), minlength=len(probs))
        assert counts[~keep].sum() == 0  # nothing outside the cut
        # each count is Binomial(DRAWS, p): within 5 standard deviations for the tokens expected at
        # least 5 times; the rarer ones (where the normal bound does not hold) pooled into one bucket
        common = DRAWS * expected >= 5
        observed = torch.cat([counts[common].double(), counts[~common].sum()[None].double()])
        mass = torch.cat([expected[common], expected[~common].sum()[None]])
        assert ((observed - DRAWS * mass).abs() <= 5 * (DRAWS * mass * (1 - mass)).sqrt()).all()
        assert common.sum() >= 5


def test_next_tokens_greedy_and_cuts() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert next_tokens(logits, 0.0, 1.0, 0, None).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([next_tokens(logits, 1.0, 1.0, 2, g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) <= {0, 1, 2, 3}


def test_bad_arguments_are_refused(sharp_model) -> None:
    model, _ = sharp_model
    for kwargs in ({"prompt_ids": []}, {"prompt_ids": [[]]}, {"num_generations": 0}, {"max_new_tokens": 0}, {"top_p": 0.0}):
        args = {"prompt_ids": [[1, 2]], "num_generations": 2, "max_new_tokens": 2, **kwargs}
        with pytest.raises(ValueError):
            sample_groups(model, **args, eos_token_id=2, pad_token_id=0)
