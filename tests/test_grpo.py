"""finetune_grpo.py: prompts through the inference owner, rewards with TRL's signature, the loss and
advantages against TRL's GRPOTrainer, one-line errors, and a tiny model that learns a rewarded ending."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import finetune_grpo
from chinese_vicuna.data.rl import column_lists, load_prompt_dataset
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.engine import Engine
from chinese_vicuna.infer.rollouts import Rollouts
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from chinese_vicuna.train.grpo import GrpoTrainer, collate_prompts, group_advantages, weighted_rewards
from chinese_vicuna.train.rewards import RewardError, RewardFunction, load_reward_functions, required_columns, score
from conftest import REPO, SAMPLE_INSTRUCT, memorize_args, read_jsonl, run_script


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


# ---------------------------------------------------------------- data and rewards (fast)


def test_every_prompt_format_gives_the_engines_ids_and_keeps_the_other_columns(tokenizer, tmp_path: Path) -> None:
    q, system = "12 + 30 等于多少？", "你是数学老师。"
    records = [
        {"instruction": q, "input": "", "answer": "42"},
        {"prompt": q, "answer": "42"},
        {"prompt": [{"role": "user", "content": q}], "answer": "42"},
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "42"}], "answer": "42"},
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}], "answer": "42"},
    ]
    path = write_jsonl(tmp_path / "rl.jsonl", records)
    alpaca = Engine.for_model(None, tokenizer, load_template("alpaca", tokenizer))
    with pytest.raises(UserError, match=r"rl.jsonl:5: a prompt with a system message .* needs a chat --prompt_template"):
        load_prompt_dataset(str(path), alpaca, 512)
    write_jsonl(path, records[:4])
    samples = list(load_prompt_dataset(str(path), alpaca, 512))
    assert all(s["prompt_ids"] == alpaca.instruction_ids(q) for s in samples)
    assert [s["prompt"] for s in samples] == [q, q, [{"role": "user", "content": q}], [{"role": "user", "content": q}]]
    assert all(s["columns"] == {"answer": "42"} for s in samples)
    chat = Engine.for_model(None, tokenizer, load_template("chinese-vicuna-chat", tokenizer))
    write_jsonl(path, records)
    samples = list(load_prompt_dataset(str(path), chat, 512))
    assert samples[0]["prompt_ids"] == chat.prompt_ids([{"role": "user", "content": q}]) == samples[3]["prompt_ids"]
    assert samples[4]["prompt_ids"] == chat.prompt_ids([{"role": "system", "content": system}, {"role": "user", "content": q}])
    assert samples[0]["prompt_ids"][0] == tokenizer.bos_token_id and samples[0]["prompt_ids"].count(tokenizer.bos_token_id) == 1
    assert column_lists(samples[:2], 3) == {"answer": ["42"] * 6}


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("12加30，得到42。\n答案：42", "42", 1.0),
        ("先算个位……\n答案: 42。", "42", 1.0),
        ("所以结果是 \\boxed{42}", "42", 1.0),
        ("答案：\\boxed{0.5}", "0.5", 1.0),
        ("一共 1,200 个", "1200", 1.0),
        ("答案：3/4", "0.75", 1.0),
        ("大概是 41 吧", "42", 0.0),
        ("答案：北京", "北京。", 1.0),
        ("答案：上海", "北京", 0.0),
        ("没有数字", "42", 0.0),
    ],
)
def test_accuracy_extracts_the_final_answer_and_compares_numbers_or_text(completion: str, answer: str, expected: float) -> None:
    [accuracy] = load_reward_functions("accuracy", "", 0, 16)
    assert accuracy.fn(prompts=["q"], completions=[completion], answer=[answer]) == [expected]
    # a conversational prompt's completion arrives as messages, as TRL passes it
    assert accuracy.fn(prompts=[[]], completions=[[{"role": "assistant", "content": completion}]], solution=[answer]) == [expected]


def test_format_and_length_rewards() -> None:
    fmt, length = load_reward_functions("format,length", finetune_grpo.DEFAULT_FORMAT_PATTERN, 4, 8)
    texts = ["<think>12+30=42</think>\n<answer>42</answer>", "<think>x</think>42", "答案：42"]
    assert fmt.fn(prompts=["q"] * 3, completions=texts) == [1.0, 0.0, 0.0]
    assert length.fn(prompts=["q"] * 4, completions=["a"] * 4, completion_ids=[[1] * 3, [1] * 4, [1] * 6, [1] * 8]) == [0.0, 0.0, -0.5, -1.0]  # fmt: skip


TRL_REWARDS = '''
def ends_with_ok(completions, **kwargs):
    """Written for TRL's GRPOTrainer (standard format: completions are strings)."""
    return [1.0 if c.endswith("好的") else 0.0 for c in completions]


def matches_answer(prompts, completions, answer, **kwargs):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


def unscored(completions, **kwargs):
    return [None] * len(completions)


def broken(completions, **kwargs):
    raise KeyError("solution")


def short(completions, **kwargs):
    return [1.0]


def words(completions, **kwargs):
    return ["good"] * len(completions)
'''


def test_reward_files_with_trls_signature_and_their_failures_in_one_line(tmp_path: Path) -> None:
    path = write_text(tmp_path / "rewards.py", TRL_REWARDS)
    ok, match, unscored = load_reward_functions(f"{path}:ends_with_ok,{path}:matches_answer,{path}:unscored", "", 0, 16)
    assert (ok.name, match.needs, required_columns(ok.fn)) == ("ends_with_ok", ("answer",), ())
    table = score([ok, match, unscored], ["q"] * 2, ["好的", "42"], {"answer": ["42", "42"]}, [[1], [2]])
    assert [row[:2] for row in table] == [[1.0, 0.0], [0.0, 1.0]] and all(math.isnan(row[2]) for row in table)
    for name, says in (
        ("broken", "reward function 'broken' raised KeyError: 'solution'; fix the function"),
        ("short", "reward function 'short' returned 1 rewards for 2 completions; return one per completion"),
        ("words", "reward function 'words' returned 'good' (a str) for completion 0; return numbers or None"),
    ):
        [fn] = load_reward_functions(f"{path}:{name}", "", 0, 16)
        with pytest.raises(RewardError) as err:
            score([fn], ["q"] * 2, ["a", "b"], {}, [[1], [2]])
        assert str(err.value) == says
    with pytest.raises(UserError, match="has no function 'missing'"):
        load_reward_functions(f"{path}:missing", "", 0, 16)
    with pytest.raises(UserError, match="not a built-in reward"):
        load_reward_functions("correctness", "", 0, 16)


def test_advantages_are_group_normalized_with_unscored_completions_left_out() -> None:
    per_function = torch.tensor([[1.0, 1.0], [0.0, math.nan], [1.0, 0.0], [math.nan, math.nan], [2.0, 2.0], [2.0, 2.0]])
    rewards = weighted_rewards(per_function, torch.tensor([1.0, 0.5]))
    assert rewards[:3].tolist() == [1.5, 0.0, 1.0] and math.isnan(rewards[3])
    advantages, zero_std = group_advantages(rewards, 3, scale=True)
    group = torch.tensor([1.5, 0.0, 1.0])
    expected = (group - group.mean()) / (group.std() + 1e-4)
    torch.testing.assert_close(advantages[:3], expected)
    assert advantages[3:].tolist() == [0.0, 0.0, 0.0] and zero_std.tolist() == [False, True]
    unscaled, _ = group_advantages(rewards, 3, scale=False)
    torch.testing.assert_close(unscaled[:3], group - group.mean())


# ---------------------------------------------------------------- the recipe's one-line errors


def grpo_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--base_model", str(base), "--data_path", str(data), "--output_dir", str(out),
        "--micro_batch_size", "2", "--batch_size", "2", "--num_generations", "4", "--max_completion_length", "8",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def test_the_recipe_ends_in_one_line_for_each_user_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])
    rewards = write_text(tmp_path / "rewards.py", TRL_REWARDS)
    cases = [
        (["--reward_funcs", "accuracy"], f"error: {data}:2: no 'answer' or 'solution' column, which reward 'accuracy' needs"),
        (["--reward_funcs", f"{rewards}:matches_answer"], f"error: {data}:2: no 'answer' column, which reward 'matches_answer' needs"),
        (["--reward_funcs", "format", "--num_generations", "1"], "error: --num_generations 1: GRPO compares each completion"),
        (["--reward_funcs", f"{rewards}:broken", "--max_steps", "1"], "error: reward function 'broken' raised KeyError: 'solution'"),
        (["--reward_funcs", f"{rewards}:short", "--max_steps", "1"], "error: reward function 'short' returned 1 rewards for 8 completions"),
        (["--rollout_engine", "vllm"], "error: --rollout_engine vllm: vLLM is not installed"),
    ]
    for i, (flags, says) in enumerate(cases):
        proc = run_script("finetune_grpo.py", *grpo_args(tiny_model_dir, data, tmp_path / f"out{i}", *flags))
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith(says), (flags, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr


def test_launcher_passes_the_sft_adapter_and_the_rl_flags() -> None:
    import os
    import shlex
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("TOT_CUDA", "PRECISION", "LORA_PATH", "DS_CONFIG", "VLLM_SERVER_URL")}
    cmd = subprocess.run(
        ["bash", str(REPO / "scripts" / "finetune_grpo.sh")],
        env={**env, "DRY_RUN": "1", "GRPO_LOSS": "dapo", "REWARD_FUNCS": "accuracy,format"}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cmd = shlex.split(cmd)
    assert cmd[:3] == ["CUDA_VISIBLE_DEVICES=0", "python", "finetune_grpo.py"]
    for flag, value in (("--lora_weights", "lora-Vicuna"), ("--grpo_loss", "dapo"), ("--reward_funcs", "accuracy,format"), ("--val_set_size", "0")):  # fmt: skip
        assert cmd[cmd.index(flag) + 1] == value
    args = finetune_grpo.FLAG_GROUPS
    from chinese_vicuna.args import parse_args

    flags = cmd[3 : cmd.index("--lora_weights")] + cmd[cmd.index("--lora_weights") + 2 :]  # the adapter folder is not here
    parsed = parse_args(args, [*flags, "--precision", "fp32"])  # every flag the launcher passes is one the recipe takes
    assert parsed[5].grpo_loss == "dapo" and parsed[5].epsilon_high == 0.28
    assert "--rollout_engine" not in cmd
    served = subprocess.run(
        ["bash", str(REPO / "scripts" / "finetune_grpo.sh")],
        env={**env, "DRY_RUN": "1", "VLLM_SERVER_URL": "http://127.0.0.1:8000"}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    served = shlex.split(served)
    assert served[served.index("--rollout_engine") + 1] == "vllm"
    assert served[served.index("--vllm_server_url") + 1] == "http://127.0.0.1:8000"


# ---------------------------------------------------------------- the loss and advantages against TRL


class FixedRollouts:
    """A stand-in for Engine.sample_groups that returns given completions (the comparison needs the same ones)."""

    def __init__(self, completion_ids: list[list[int]], truncated: list[bool], texts: list[str]) -> None:
        self.rollouts = Rollouts(completion_ids, truncated, texts)

    def sample_groups(self, prompt_ids, num_generations, max_new_tokens, **sampling) -> Rollouts:
        assert len(prompt_ids) * num_generations == len(self.rollouts.completion_ids)
        return self.rollouts


REWARDS = [1.0, 0.0, 0.5, 0.0]  # one group of 4: not all equal (DAPO keeps it)
MAX_COMPLETION = 8
TEMPERATURE = 0.9


def fixed_reward(completions, **kwargs):
    return list(REWARDS)


@pytest.fixture(scope="module")
def start_adapter(tiny_model_dir: Path, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from chinese_vicuna.model.adapters import add_lora
    from chinese_vicuna.model.build import load_checked_model

    torch.manual_seed(0)
    model = add_lora(load_checked_model(str(tiny_model_dir), tokenizer, "fp32"), 8, 16, 0.0, "all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("start") / "adapter"
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize(
    ("loss_type", "beta", "mask_truncated"),
    [("grpo", 0.04, False), ("grpo", 0.0, False), ("dr_grpo", 0.04, False), ("dr_grpo", 0.0, False), ("dapo", 0.04, False),
     ("dapo", 0.0, False), ("grpo", 0.04, True), ("dapo", 0.04, True)],
)  # fmt: skip
def test_loss_and_advantages_equal_trl_grpo_trainer(loss_type: str, beta: float, mask_truncated: bool, tiny_model_dir: Path, tokenizer, start_adapter: Path, tmp_path: Path) -> None:  # fmt: skip
    """The same model, adapter (moved away from its starting point, which is the reference),
    prompt, completions (ended by EOS, one cut at the limit) and rewards: our trainer's loss
    against TRL's `_generate_and_score_completions` + `_compute_loss` (TRL's generation replaced by
    the same completions), to 1e-5; with `mask_truncated_completions` too (the cut one carries no loss)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from chinese_vicuna.args import TrainArguments, parse_args
    from chinese_vicuna.model.adapters import load_lora
    from chinese_vicuna.model.build import load_checked_model
    from chinese_vicuna.train.packing import sequence_collator
    from chinese_vicuna.train.preference import REFERENCE_ADAPTER, add_reference_adapter
    from chinese_vicuna.train.trainer import build_trainer

    model = load_lora(load_checked_model(str(tiny_model_dir), tokenizer, "fp32"), str(start_adapter), is_trainable=True)
    add_reference_adapter(model, str(start_adapter))
    epsilon_high = 0.28 if loss_type == "dapo" else 0.2
    config = GRPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=MAX_COMPLETION, loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=epsilon_high,
        temperature=TEMPERATURE, scale_rewards="none" if loss_type == "dr_grpo" else "group", gradient_checkpointing=False,
        mask_truncated_completions=mask_truncated,
    )  # fmt: skip
    trl = GRPOTrainer(model=model, reward_funcs=[fixed_reward], args=config, train_dataset=Dataset.from_list([{"prompt": "x"}] * 4), processing_class=tokenizer)  # fmt: skip
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.add_(torch.randn_like(p) * 0.01)
    model.train()

    engine = Engine.for_model(None, tokenizer, load_template("alpaca", tokenizer))
    prompt_ids = engine.instruction_ids("12 + 30 等于多少？")
    eos = tokenizer.eos_token_id
    completions = [[300, 301, eos], [302, 303, 304, 305, 306, eos], [307, eos], list(range(310, 310 + MAX_COMPLETION))]
    truncated = [False, False, False, True]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]

    # TRL: its generation replaced by the same completions
    trl._generate = lambda prompts: ([prompt_ids] * 4, completions, None, texts, None, {}, None, None)
    trl.current_gradient_accumulation_steps = 1
    scored = trl._generate_and_score_completions([{"prompt": "12 + 30 等于多少？"}] * 4)
    theirs = trl._compute_loss(model, scored)

    (train_args,) = parse_args((TrainArguments,), ["--output_dir", str(tmp_path / "ours"), "--report_to", "none"])
    reward = RewardFunction("fixed_reward", fixed_reward, ())
    ours = build_trainer(
        GrpoTrainer, model, tokenizer, train_args, [{"prompt_ids": prompt_ids}], None, collate_prompts,
        engine=FixedRollouts(completions, truncated, texts), reward_functions=[reward], num_generations=4,
        max_completion_length=MAX_COMPLETION, loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=epsilon_high,
        scale_rewards=loss_type != "dr_grpo", temperature=TEMPERATURE, reference_adapter=REFERENCE_ADAPTER if beta else None,
        sequence_collator=sequence_collator(True, tokenizer), mask_truncated_completions=mask_truncated,
    )  # fmt: skip
    sample = {"prompt_ids": prompt_ids, "prompt": "12 + 30 等于多少？", "columns": {}}
    loss = ours.compute_loss(model, collate_prompts([sample]))
    advantages, _ = group_advantages(torch.tensor(REWARDS), 4, loss_type != "dr_grpo")
    torch.testing.assert_close(advantages, scored["advantages"].cpu(), atol=1e-5, rtol=0)
    assert abs(float(loss) - float(theirs)) < 1e-5, (float(loss), float(theirs))
    assert abs(float(loss)) > 1e-4 or beta == 0  # the KL term is there: the policy moved away from its reference
    if beta:
        assert abs(ours._metrics["kl"][-1] - trl._metrics["train"]["kl"][-1]) < 1e-6
        assert ours._metrics["kl"][-1] > 1e-5
    if beta:
        # TRL 1.16's fused CPU log-prob kernel gives the KL term another gradient than the finite
        # difference of its own loss value (ours agrees with it); only the policy term is compared
        return
    # the gradient of the policy term is the same too (so one optimizer step would be)
    grads = {}
    for name, compute in (("ours", lambda: ours.compute_loss(model, collate_prompts([sample]))), ("trl", lambda: trl._compute_loss(model, scored))):  # fmt: skip
        model.zero_grad()
        compute().backward()
        grads[name] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None])


# ---------------------------------------------------------------- the tiny model learns a rewarded ending

ENDING = "祝你好运！"
PROMPTS = 12
TRL_REWARD_FILE = f'''
def polite_ending(completions, **kwargs):
    """A reward file as written for TRL's GRPOTrainer: completions are strings, columns keyword lists."""
    return [1.0 if c.strip().endswith("{ENDING}") else 0.0 for c in completions]


def keeps_answer(prompts, completions, answer, log_metric=None, **kwargs):
    kept = [1.0 if c.startswith(a) else 0.0 for c, a in zip(completions, answer)]
    log_metric("answer_kept", sum(kept) / len(kept))  # TRL's keyword for a metric of the reward's own
    return kept
'''


@pytest.fixture(scope="module")
def half_ending_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SFT on each prompt's answer once with ENDING and once without: about half its samples end with it."""
    import finetune

    folder = tmp_path_factory.mktemp("sft")
    records = read_jsonl(SAMPLE_INSTRUCT)[:PROMPTS]
    data = write_jsonl(folder / "sft.jsonl", [x for r in records for x in (r, {**r, "output": r["output"] + ENDING})])
    out = folder / "adapter"
    finetune.main(memorize_args(tiny_model_dir, data, out, epochs=30, save_steps=1000)[1:])  # [0] is the script's name
    return out


def sampled_endings(base: Path, adapter: Path, samples: int = 16) -> tuple[float, float]:
    """Shares of answers sampled at temperature 1 (the engine's sampler, stock PEFT loading) that end
    with ENDING, and that start with the prompt's SFT answer."""
    from chinese_vicuna.model.build import load_for_inference

    model, tokenizer = load_for_inference(str(base), str(adapter))
    engine = Engine.around(model, tokenizer, None, [str(adapter), str(base)], "instruction")
    records = read_jsonl(SAMPLE_INSTRUCT)[:PROMPTS]
    rollouts = engine.sample_groups(
        [engine.instruction_ids(r["instruction"]) for r in records], samples, 48, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )  # fmt: skip
    answers = [r["output"] for r in records for _ in range(samples)]
    ends = [t.strip().endswith(ENDING) for t in rollouts.texts]
    starts = [t.startswith(a) for t, a in zip(rollouts.texts, answers, strict=True)]
    return sum(ends) / len(ends), sum(starts) / len(starts)


@pytest.mark.slow
def test_grpo_teaches_the_rewarded_ending(tiny_model_dir: Path, half_ending_adapter: Path, tmp_path: Path) -> None:
    """About half the SFT adapter's sampled answers end with ENDING; GRPO with a TRL-style reward file
    for it (and one for keeping the answer, reading the `answer` column) raises that to ≥ 85%, the
    logged reward rising; the adapter and its checkpoint load in stock PEFT; completions.jsonl holds
    the prompts, completions and rewards."""
    before, _ = sampled_endings(tiny_model_dir, half_ending_adapter)
    assert 0.2 <= before <= 0.8, before
    records = [{"instruction": r["instruction"], "input": "", "answer": r["output"]} for r in read_jsonl(SAMPLE_INSTRUCT)[:PROMPTS]]
    data = write_jsonl(tmp_path / "rl.jsonl", records)
    rewards = write_text(tmp_path / "rewards.py", TRL_REWARD_FILE)
    out = tmp_path / "grpo"
    finetune_grpo.main([
        "--base_model", str(tiny_model_dir), "--lora_weights", str(half_ending_adapter), "--data_path", str(data), "--output_dir", str(out),
        "--reward_funcs", f"{rewards}:polite_ending,{rewards}:keeps_answer", "--reward_weights", "1,0.5",
        "--num_generations", "8", "--max_completion_length", "48", "--learning_rate", "1e-3", "--lora_dropout", "0",
        "--micro_batch_size", "4", "--batch_size", "4", "--num_epochs", "5", "--logging_steps", "1", "--save_steps", "12",
        "--log_completions_steps", "5", "--disable_tqdm", "true",
    ])  # fmt: skip
    after, answered = sampled_endings(tiny_model_dir, out)
    print(f"ending share at temperature 1: before {before:.3f}, after {after:.3f}; answers kept {answered:.3f}")
    # most answers still start with the SFT answer (the second reward keeps them, at half weight)
    assert after >= 0.85 and answered >= 0.6, (before, after, answered)
    log = [e for e in read_jsonl(out / "trainer_log.jsonl") if "reward" in e]
    assert [e["step"] for e in log] == list(range(1, 16))
    first, last = log[0]["rewards/polite_ending/mean"], sum(e["rewards/polite_ending/mean"] for e in log[-3:]) / 3
    assert last >= 0.9 and last > first + 0.1, [e["rewards/polite_ending/mean"] for e in log]
    assert {"reward_std", "rewards/keeps_answer/std", "completions/mean_length", "completions/clipped_ratio", "kl", "clip_ratio/region_mean", "frac_reward_zero_std", "answer_kept"} <= set(log[-1])  # fmt: skip
    logged = read_jsonl(out / "completions.jsonl")
    assert {e["step"] for e in logged} == {5, 10, 15} and len(logged) == 3 * 4 * 8
    assert set(logged[0]) >= {"prompt", "completion", "rewards", "reward", "advantage", "truncated"}
    assert set(logged[0]["rewards"]) == {"polite_ending", "keeps_answer"}
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out / "checkpoint-12"))
    assert (out / "prompt_template.json").is_file() and not (out / "reference").exists()


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    """As SFT: --resume_from_checkpoint true continues from checkpoint-2; the logs keep one history."""
    data = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 18)])
    out = tmp_path / "out"
    common = grpo_args(tiny_model_dir, data, out, "--reward_funcs", "accuracy,length", "--save_steps", "2", "--logging_steps", "1", "--log_completions_steps", "1")  # fmt: skip
    finetune_grpo.main([*common, "--max_steps", "3"])
    import shutil

    shutil.rmtree(out / "checkpoint-3")  # as if killed after step 3, before its checkpoint
    finetune_grpo.main([*common, "--max_steps", "4", "--resume_from_checkpoint", "true"])
    assert [e["step"] for e in read_jsonl(out / "trainer_log.jsonl") if "reward" in e] == [1, 2, 3, 4]
    assert sorted({e["step"] for e in read_jsonl(out / "completions.jsonl")}) == [1, 2, 3, 4]
    assert len(read_jsonl(out / "completions.jsonl")) == 4 * 2 * 4


def test_dapo_drops_groups_without_reward_spread_and_counts_them(tiny_model_dir: Path, tokenizer, start_adapter: Path, tmp_path: Path) -> None:  # fmt: skip
    """Dynamic sampling: a group whose completions all scored the same carries no signal; DAPO drops
    it before the forward (the loss is that of the other group alone) and logs it as dropped."""
    from chinese_vicuna.args import TrainArguments, parse_args
    from chinese_vicuna.model.adapters import load_lora
    from chinese_vicuna.model.build import load_checked_model
    from chinese_vicuna.train.packing import sequence_collator
    from chinese_vicuna.train.trainer import build_trainer

    model = load_lora(load_checked_model(str(tiny_model_dir), tokenizer, "fp32"), str(start_adapter), is_trainable=True).train()
    engine = Engine.for_model(None, tokenizer, load_template("alpaca", tokenizer))
    eos = tokenizer.eos_token_id
    samples = [{"prompt_ids": engine.instruction_ids(q), "prompt": q, "columns": {}} for q in ("1+1=", "2+2=")]
    flat = [[300, eos], [301, 302, eos], [303, eos], [304, 305, eos]]
    (train_args,) = parse_args((TrainArguments,), ["--output_dir", str(tmp_path), "--report_to", "none"])

    def loss_of(completions: list[list[int]], rewards: list[float], prompts: list[dict]) -> tuple[float, GrpoTrainer]:
        reward = RewardFunction("fixed", lambda completions, **kwargs: list(rewards), ())
        trainer = build_trainer(
            GrpoTrainer, model, tokenizer, train_args, prompts, None, collate_prompts, engine=FixedRollouts(completions, [False] * len(completions), ["x"] * len(completions)),
            reward_functions=[reward], num_generations=2, max_completion_length=8, loss_type="dapo", beta=0.0,
            sequence_collator=sequence_collator(True, tokenizer),
        )  # fmt: skip
        with torch.no_grad():
            return float(trainer.compute_loss(model, collate_prompts(prompts))), trainer

    both, trainer = loss_of(flat, [1.0, 1.0, 1.0, 0.0], samples)
    alone, _ = loss_of(flat[2:], [1.0, 0.0], samples[1:])
    assert abs(both - alone) < 1e-6 and abs(alone) > 0
    assert trainer._metrics["groups_dropped"] == [1.0] and trainer._metrics["frac_reward_zero_std"] == [0.5]
    none, trainer = loss_of(flat[:2], [1.0, 1.0], samples[:1])
    assert none == 0.0 and trainer._metrics["groups_dropped"] == [1.0]
