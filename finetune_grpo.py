"""RL with verifiable rewards (GRPO, Dr. GRPO, DAPO) on LoRA / QLoRA → a PEFT adapter.

    python finetune_grpo.py --base_model MODEL --lora_weights SFT_ADAPTER --data_path sample/rl/arithmetic.jsonl \\
        --reward_funcs accuracy,format --output_dir lora-Vicuna-grpo

Data: prompts (`instruction`/`input` alpaca style, TRL's `prompt` as text or messages, or
`conversations` without the last assistant turn) with the columns the rewards read, e.g. `answer`
(chinese_vicuna/data/rl.py; docs/rl.md). Rewards: built-in `accuracy`, `format`, `length`, or
`path/to/file.py:function` with TRL's signature (chinese_vicuna/train/rewards.py). Rollouts: the
inference owner samples each prompt's group with the adapter as it is now (`Engine.sample_groups`),
or a vLLM server does, given the adapter each step (`--rollout_engine vllm --vllm_server_url URL`).
The reference (β > 0) is the starting point: the `--lora_weights` adapter loaded again, frozen, or
the base (the adapter disabled). The same model / LoRA / batch / training flags as finetune.py;
`--micro_batch_size` and `--batch_size` count prompts (each with --num_generations completions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chinese_vicuna.args import BatchArguments, LoraArguments, TemplateArguments, TrainArguments, TrainModelArguments, parse_args
from chinese_vicuna.checkpoints import RunIdentity
from chinese_vicuna.data.rl import load_prompt_dataset
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.infer.engine import Engine
from chinese_vicuna.infer.vllm_rollouts import VllmServerRollouts, check_server
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from chinese_vicuna.run import prepare_run
from chinese_vicuna.train.grpo import GRPO_LOSSES, GrpoTrainer, collate_prompts
from chinese_vicuna.train.model import apply_training_speedups, load_model_for_training
from chinese_vicuna.train.packing import sequence_collator
from chinese_vicuna.train.preference import REFERENCE_ADAPTER, add_reference_adapter
from chinese_vicuna.train.rewards import DEFAULT_FORMAT_PATTERN, check_columns, load_reward_functions
from chinese_vicuna.train.trainer import build_trainer, train_and_save

ROLLOUT_ENGINES = ("builtin", "vllm")


@dataclass
class GrpoArguments:
    """TRL's GRPOConfig names (--loss_type works as an alias of --grpo_loss)."""

    reward_funcs: str = field(
        default="accuracy", metadata={"help": "Comma list: accuracy, format, length, or path/to/file.py:function (TRL's signature)."}
    )
    reward_weights: str | None = field(default=None, metadata={"help": "Comma list of weights, one per reward function (default all 1)."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (the group its advantages compare)."})
    max_completion_length: int = field(default=256, metadata={"help": "Most tokens per completion; longer ones are cut and marked truncated."})  # fmt: skip
    grpo_loss: str = field(
        default="grpo",
        metadata={"help": f"Loss: {', '.join(GRPO_LOSSES)} (docs/rl.md).", "aliases": ["--loss_type"]},
    )
    beta: float = field(default=0.04, metadata={"help": "KL weight to the reference (0: no reference, no reference forward)."})
    epsilon: float = field(default=0.2, metadata={"help": "Clipping range of the probability ratio (lower side; both sides unless --epsilon_high)."})  # fmt: skip
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping range (default: 0.28 for dapo, else --epsilon)."})
    scale_rewards: bool | None = field(
        default=None, metadata={"help": "Divide advantages by the group's reward std (default: true, false for dr_grpo)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts (and of the log-probabilities)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the rollouts."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of the rollouts (0: off)."})
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Completions cut at --max_completion_length carry no loss (DAPO's advice)."}
    )
    format_pattern: str = field(default=DEFAULT_FORMAT_PATTERN, metadata={"help": "Regular expression the `format` reward matches."})
    length_target: int = field(
        default=0, metadata={"help": "`length` reward: tokens without penalty (default 3/4 of --max_completion_length)."}
    )
    rollout_engine: str = field(
        default="builtin", metadata={"help": "builtin (the project's batched sampler) or vllm (a vLLM server: --vllm_server_url)."}
    )
    vllm_server_url: str | None = field(
        default=None,
        metadata={"help": "--rollout_engine vllm: the vLLM server, e.g. http://127.0.0.1:8000, with runtime LoRA loading (docs/rl.md)."},
    )
    log_completions_steps: int = field(
        default=10, metadata={"help": "Every N steps append prompts, completions and rewards to OUTPUT_DIR/completions.jsonl (0: never)."}
    )

    def __post_init__(self) -> None:
        if self.grpo_loss not in GRPO_LOSSES:
            raise UserError(f"--grpo_loss {self.grpo_loss}: pick one of {', '.join(GRPO_LOSSES)}")
        if self.num_generations < 2:
            raise UserError(
                f"--num_generations {self.num_generations}: GRPO compares each completion with the others of its group; "
                "give at least 2 (8 is usual)"
            )
        if self.max_completion_length < 1 or self.beta < 0 or self.epsilon <= 0 or self.temperature < 0:
            raise UserError("--max_completion_length must be ≥ 1, --beta ≥ 0, --epsilon > 0 and --temperature ≥ 0")
        if self.rollout_engine not in ROLLOUT_ENGINES:
            raise UserError(f"--rollout_engine {self.rollout_engine}: pick one of {', '.join(ROLLOUT_ENGINES)}")
        if self.vllm_server_url and self.rollout_engine != "vllm":
            raise UserError(f"--vllm_server_url {self.vllm_server_url}: pass --rollout_engine vllm too (or drop the URL)")
        if self.epsilon_high is None:
            self.epsilon_high = 0.28 if self.grpo_loss == "dapo" else self.epsilon
        if self.scale_rewards is None:
            self.scale_rewards = self.grpo_loss != "dr_grpo"
        if not self.length_target:
            self.length_target = self.max_completion_length * 3 // 4

    def weights(self, functions: int) -> list[float] | None:
        if self.reward_weights is None:
            return None
        try:
            weights = [float(w) for w in self.reward_weights.split(",")]
        except ValueError:
            raise UserError(f"--reward_weights {self.reward_weights}: give numbers, e.g. 1,0.5") from None
        if len(weights) != functions:
            raise UserError(f"--reward_weights {self.reward_weights}: {len(weights)} weights for {functions} reward functions")
        return weights


@dataclass
class RlDataArguments:
    data_path: str = field(default="sample/rl/arithmetic.jsonl", metadata={"help": "Prompts: .json/.jsonl file(s) or a folder; comma-separated: all."})  # fmt: skip
    max_prompt_length: int = field(default=512, metadata={"help": "Prompts longer than this many tokens are dropped (counted)."})
    val_set_size: int = field(default=0, metadata={"help": "Must be 0: GRPO has no held-out evaluation yet."})

    def __post_init__(self) -> None:
        if self.val_set_size:
            raise UserError(f"--val_set_size {self.val_set_size}: GRPO has no held-out evaluation yet; pass 0 (the rewards are logged per step)")


@dataclass
class GrpoBatchArguments(BatchArguments):
    micro_batch_size: int = field(default=2, metadata={"help": "Prompts per device per step (each with --num_generations completions)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per optimizer step: micro_batch_size × accumulation × processes."})
    num_epochs: float = field(default=1, metadata={"help": "Passes over the prompts."})


@dataclass
class GrpoTrainArguments(TrainArguments):
    output_dir: str = field(default="lora-Vicuna-grpo", metadata={"help": "Where the adapter and checkpoints go."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (RL wants far less than SFT)."})
    warmup_steps: float = field(default=0, metadata={"help": "Linear warm-up steps."})
    logging_steps: float = field(default=1, metadata={"help": "Log the rewards every N steps."})
    save_steps: float = field(default=50, metadata={"help": "Save checkpoint-N every N steps."})


FLAG_GROUPS = (TrainModelArguments, TemplateArguments, RlDataArguments, LoraArguments, GrpoBatchArguments, GrpoArguments, GrpoTrainArguments)  # fmt: skip
# The flags that identify a run: a resume must share them (run_fingerprint.json).
RUN_IDENTITY = RunIdentity(
    data=("data_path",),
    models=("base_model", "tokenizer_path", "lora_weights"),
    settings=("prompt_template", "max_prompt_length", "lora_r", "lora_alpha", "lora_target_modules", "modules_to_save",
              "packing", "batch_size", "seed", "reward_funcs", "reward_weights", "num_generations", "max_completion_length",
              "grpo_loss", "beta", "epsilon", "epsilon_high", "scale_rewards", "temperature", "top_p", "top_k",
              "mask_truncated_completions", "format_pattern", "length_target"),
    data_choice=("data_path",),
)  # fmt: skip


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    # 0. flags (parsed once), then the run's set-up: logging, seed, the checkpoint to resume from, the output folder
    flags = parse_args(FLAG_GROUPS, argv)
    model_args, template_args, data_args, lora_args, _batch, grpo_args, train_args = flags  # _batch: applied to train_args
    run = prepare_run(flags, RUN_IDENTITY)
    if grpo_args.rollout_engine == "vllm" and not grpo_args.vllm_server_url:
        refuse_colocated_vllm()
    if grpo_args.vllm_server_url:
        check_server(grpo_args.vllm_server_url)  # a missing server: one line now, not after the model loads

    # 1. rewards, tokenizer and prompts first: a bad reward file or record fails in seconds, before the model loads
    rewards = load_reward_functions(grpo_args.reward_funcs, grpo_args.format_pattern, grpo_args.length_target, grpo_args.max_completion_length)  # fmt: skip
    weights = grpo_args.weights(len(rewards))
    tokenizer = load_tokenizer(model_args.tokenizer_path or model_args.base_model, model_args.trust_remote_code)
    template = load_template(template_args.template_or_fallback, tokenizer)
    prompts = Engine.for_model(None, tokenizer, template)  # prompt ids exactly as generate.py builds them
    train_data = load_prompt_dataset(data_args.data_path, prompts, data_args.max_prompt_length)
    for sample in train_data:
        check_columns(rewards, list(sample["columns"]), sample["where"])

    # 2. base model and a new or continued LoRA; the reference is that starting point, never a second base
    model = load_model_for_training(model_args, lora_args, train_args, tokenizer)
    apply_training_speedups(model, lora_args, train_args)
    reference = None
    if grpo_args.beta and model_args.lora_weights:
        add_reference_adapter(model, model_args.lora_weights)
        reference = REFERENCE_ADAPTER

    # 3. train: each micro-batch's prompts sampled by the engine over the model being trained (no copy),
    #    or by a vLLM server that gets the adapter as it is at each step
    engine = Engine.for_model(model, tokenizer, template)
    if grpo_args.rollout_engine == "vllm":
        engine = VllmServerRollouts(engine, grpo_args.vllm_server_url, train_args.output_dir)
    trainer = build_trainer(
        GrpoTrainer, model, tokenizer, train_args, train_data, None, collate_prompts,
        engine=engine, reward_functions=rewards, reward_weights=weights,
        num_generations=grpo_args.num_generations, max_completion_length=grpo_args.max_completion_length,
        loss_type=grpo_args.grpo_loss, beta=grpo_args.beta, epsilon=grpo_args.epsilon, epsilon_high=grpo_args.epsilon_high,
        scale_rewards=grpo_args.scale_rewards, temperature=grpo_args.temperature, top_p=grpo_args.top_p, top_k=grpo_args.top_k,
        mask_truncated_completions=grpo_args.mask_truncated_completions, reference_adapter=reference,
        sequence_collator=sequence_collator(train_args.packing, tokenizer), log_completions_steps=grpo_args.log_completions_steps,
    )  # fmt: skip
    train_and_save(trainer, tokenizer, template, run.resume_from_checkpoint, run.fingerprint)
    if isinstance(engine, VllmServerRollouts):
        engine.close()  # the server forgets the run's last adapter


def refuse_colocated_vllm() -> None:
    """vLLM in this process (colocated) is not supported: only a vLLM server is. Say so before anything loads."""
    import importlib.util

    serve = "run a vLLM server (docs/rl.md) and pass --vllm_server_url http://127.0.0.1:8000, or use --rollout_engine builtin"
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"--rollout_engine vllm: vLLM is not installed here, and colocated vLLM is not supported: {serve}")
    raise UserError(f"--rollout_engine vllm: colocated vLLM (in the training process) is not supported: {serve}")


if __name__ == "__main__":
    main()
