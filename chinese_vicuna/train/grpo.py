"""GRPO on LoRA: rollouts → rewards → group-normalized advantages → clipped policy loss + KL.

Each micro-batch is `--micro_batch_size` prompts. For each, the inference owner samples a group
of `--num_generations` completions with the adapter as it is now (`Engine.sample_groups`, no
merge, no copy); the reward functions (train/rewards.py) score them; a completion's advantage
is its reward minus its group's mean, divided by the group's standard deviation (+1e-4) unless
the loss is `dr_grpo`. The loss (Shao et al. 2024, as TRL's GRPOTrainer) is per token:

    -min(r·A, clip(r, 1-ε, 1+ε_high)·A) + β·KL,   r = π/π_old,   KL = exp(ref-logp) - (ref-logp) - 1  (k3)

over completion tokens only (the prompt is context; the EOS is a completion token when it was
generated; a completion cut at `--max_completion_length` is marked truncated, and with
`--mask_truncated_completions` carries no loss). Completions are sampled once per micro-batch
and trained on once, so π_old is the policy itself (r = 1 in value, its gradient ∇log π), as
in TRL with one iteration per generation. Aggregation per `--grpo_loss`:
- `grpo`: each completion's token mean, then the mean over completions;
- `dr_grpo` (Liu et al. 2025): the token sum / (completions × max_completion_length), rewards not
  divided by the group's std: no length or difficulty bias;
- `dapo` (Yu et al. 2025): the token sum / the micro-batch's completion tokens (token-level),
  clip-higher (ε_high, 0.28 by default), and groups whose rewards are all equal (no signal)
  dropped before the forward (dynamic sampling without resampling; counted in `groups_dropped`).

The reference (β > 0) is the starting point, as for DPO (train/preference.py `reference_model`):
the adapter disabled, or the starting adapter loaded again, frozen. β = 0: no reference forward.
Per-token log-probabilities come from `train/packing.py token_log_probs` (through lm_head in
`--loss_chunk_size` chunks, never [tokens, vocabulary] at once) on packed rows (or
padded ones with `--packing false`), at the sampling temperature (as TRL).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from chinese_vicuna.data.encode import IGNORE_INDEX
from chinese_vicuna.data.rl import column_lists
from chinese_vicuna.train.losses import DEFAULT_CHUNK
from chinese_vicuna.train.packing import LengthSamplingMixin, token_log_probs
from chinese_vicuna.train.preference import reference_model
from chinese_vicuna.train.rewards import RewardFunction, score
from chinese_vicuna.train.trainer import JsonlLogCallback

logger = logging.getLogger(__name__)

GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")
STD_EPSILON = 1e-4  # TRL's: advantages (r - mean) / (std + 1e-4)


def weighted_rewards(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(completions,) sum of the weighted rewards, NaN (TRL's "unscorable") where every function said None."""
    rewards = (per_function * weights.unsqueeze(0)).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(per_function).all(dim=1), math.nan)


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN below two values), as TRL."""
    dims = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims)
    variance = torch.nanmean((x - mean) ** 2, dim=dims) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, variance, torch.full_like(variance, math.nan)).sqrt()


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage of each completion, whether its group's rewards have zero spread per group).

    Completions of prompt i are rows i*group .. i*group+group-1. A completion no function scored
    (NaN) gets advantage 0 and stays out of its group's mean and std."""
    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1)
    std = nanstd(grouped, dim=1) if group > 1 else torch.zeros_like(mean)
    advantages = rewards - mean.repeat_interleave(group)
    if scale:
        advantages = advantages / (std.repeat_interleave(group) + STD_EPSILON)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), zero_std


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    kl: torch.Tensor | None  # the masked mean of the per-token KL (β > 0)
    clipped: dict[str, torch.Tensor]  # TRL's clip_ratio/low_mean, high_mean, region_mean


def policy_loss(
    loss_type: str,
    log_probs: torch.Tensor,
    owner: torch.Tensor,
    advantages: torch.Tensor,
    sequences: int,
    *,
    old_log_probs: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    max_completion_length: int = 256,
) -> PolicyLoss:
    """The clipped objective on flat per-token values: `log_probs` (targets,) of completion tokens,
    `owner` the completion each lies in, `advantages` (sequences,). `old_log_probs` None: on-policy
    (π_old = π, detached). Aggregated per `loss_type` (module docstring)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    old = log_probs.detach() if old_log_probs is None else old_log_probs
    ratio = torch.exp(log_probs - old)
    token_advantage = advantages[owner].to(ratio.dtype)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * token_advantage, clipped_ratio * token_advantage)
    kl = None
    if beta != 0.0:
        assert ref_log_probs is not None
        delta = ref_log_probs - log_probs
        per_token_kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * per_token_kl
        kl = per_token_kl.detach().mean() if per_token_kl.numel() else per_token_kl.new_zeros(())
    if loss_type == "grpo":
        sums = per_token.new_zeros(sequences).index_add(0, owner, per_token)
        counts = per_token.new_zeros(sequences).index_add(0, owner, torch.ones_like(per_token))
        loss = (sums / counts.clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (sequences * max_completion_length)
    elif loss_type == "dapo":
        loss = per_token.sum() / max(per_token.numel(), 1)
    else:
        raise ValueError(f"unknown GRPO loss {loss_type!r}")
    low = ((ratio < 1 - epsilon) & (token_advantage < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (token_advantage > 0)).float()
    mean = lambda x: x.mean() if x.numel() else x.new_zeros(())  # noqa: E731
    clipped = {"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high), "clip_ratio/region_mean": mean(low + high)}
    return PolicyLoss(loss, kl, clipped)


def completion_sequences(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], trained: Sequence[bool]
) -> list[dict[str, list[int]]]:
    """prompt + completion of every completion (`prompt_ids` one per completion), labels on the
    completion only (-100 on the prompt, and on the whole of a completion not `trained`)."""
    out = []
    for prompt, completion, train in zip(prompt_ids, completion_ids, trained, strict=True):
        labels = list(completion) if train else [IGNORE_INDEX] * len(completion)
        out.append({"input_ids": [*prompt, *completion], "labels": [IGNORE_INDEX] * len(prompt) + labels})
    return out


class CompletionLogCallback(JsonlLogCallback):
    """`completions.jsonl` in the output folder (written by the trainer every --log_completions_steps
    steps), cut back to the step training starts from on resume, as trainer_log.jsonl is."""

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / "completions.jsonl"

    def on_log(self, *args: Any, **kwargs: Any) -> None:
        return None

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        return None


class GrpoTrainer(LengthSamplingMixin, Trainer):
    """Trainer whose micro-batches are prompts (`data/rl.py PromptDataset`, collated by
    `collate_prompts`); `compute_loss` samples, scores and computes the loss (module docstring).
    Logs TRL's names, averaged since the last log: `reward`, `reward_std`, `rewards/<fn>/mean`,
    `rewards/<fn>/std`, `completions/mean_length` (min, max), `completions/clipped_ratio`, `kl`,
    `clip_ratio/low_mean` (high, region), `frac_reward_zero_std`, and `groups_dropped` (DAPO)."""

    # compute_loss returns a mean over this micro-batch: Trainer divides by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        engine: Any,
        reward_functions: Sequence[RewardFunction],
        reward_weights: Sequence[float] | None = None,
        num_generations: int = 8,
        max_completion_length: int = 256,
        loss_type: str = "grpo",
        beta: float = 0.04,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        scale_rewards: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        mask_truncated_completions: bool = False,
        reference_adapter: str | None = None,
        sequence_collator: Any = None,
        log_completions_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        if loss_type not in GRPO_LOSSES:
            raise ValueError(f"unknown GRPO loss {loss_type!r}")
        self.engine, self.reward_functions = engine, list(reward_functions)
        weights = list(reward_weights) if reward_weights else [1.0] * len(self.reward_functions)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.num_generations, self.max_completion_length = num_generations, max_completion_length
        self.loss_type, self.beta, self.epsilon, self.epsilon_high = loss_type, beta, epsilon, epsilon_high
        self.scale_rewards, self.mask_truncated_completions = scale_rewards, mask_truncated_completions
        self.sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        self.reference_adapter, self.sequence_collator = reference_adapter, sequence_collator
        self.log_completions_steps = log_completions_steps
        self._metrics: dict[str, list[float]] = defaultdict(list)
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if train_args is not None:
            # the batches are prompt records, not model inputs: keep every key
            train_args.remove_unused_columns = False
        callbacks = [*(kwargs.pop("callbacks", None) or [])]
        if train_args is not None and log_completions_steps:
            callbacks.append(CompletionLogCallback(train_args.output_dir))
        super().__init__(*args, callbacks=callbacks, **kwargs)

    # --- one micro-batch: rollouts → rewards → advantages → loss ------------------------------------
    def rollouts(self, samples: Sequence[dict[str, Any]]) -> Any:
        """The groups of completions of `samples`' prompts, from the adapter as it is now."""
        prompt_ids = [s["prompt_ids"] for s in samples]
        push_adapter = getattr(self.engine, "push_adapter", None)
        if push_adapter is not None:  # a vLLM server (infer/vllm_rollouts.py): the adapter of this step, once per step
            push_adapter(self.state.global_step)
        return self.engine.sample_groups(prompt_ids, self.num_generations, self.max_completion_length, **self.sampling)

    def rewards(self, samples: Sequence[dict[str, Any]], rollouts: Any) -> torch.Tensor:
        """(completions, functions) rewards, NaN where a function returned None."""
        group = self.num_generations
        prompts = [s["prompt"] for s in samples for _ in range(group)]
        texts = rollouts.texts
        # a conversational prompt gets its completion as messages, as TRL passes it
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts, strict=True)]
        table = score(
            self.reward_functions, prompts, completions, column_lists(samples, group), [list(c) for c in rollouts.completion_ids],
            trainer_state=self.state, log_metric=self._log_metric, log_extra=self._log_extra,
        )  # fmt: skip
        return torch.tensor(table, dtype=torch.float32).reshape(len(completions), len(self.reward_functions))

    def _log_metric(self, name: str, value: float) -> None:
        """TRL's `log_metric` keyword of a reward function: a scalar averaged into the step's logs."""
        self._metrics[name].append(float(value))

    def _log_extra(self, column: str, values: list[Any]) -> None:
        """TRL's `log_extra` keyword: columns for TRL's completions table, which this trainer does not keep."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        samples, group = inputs["prompts"], self.num_generations
        rollouts = self.rollouts(samples)
        per_function = self.rewards(samples, rollouts)
        rewards = weighted_rewards(per_function, self.reward_weights)
        advantages, zero_std = group_advantages(rewards, group, self.scale_rewards)
        keep_groups = ~zero_std if self.loss_type == "dapo" else torch.ones_like(zero_std)
        self._record(per_function, rewards, zero_std, keep_groups, rollouts)
        self._log_completions(samples, rollouts, per_function, rewards, advantages)

        # the completions that take part: DAPO drops the groups without signal before the forward
        rows = keep_groups.repeat_interleave(group).nonzero().squeeze(1).tolist()
        if not rows:
            return self._no_signal_loss(model)
        trained = [not (self.mask_truncated_completions and rollouts.truncated[r]) for r in rows]
        prompt_ids = [samples[r // group]["prompt_ids"] for r in rows]
        completions = [rollouts.completion_ids[r] for r in rows]
        batch = self.sequence_collator(completion_sequences(prompt_ids, completions, trained))
        batch = {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        temperature = self.sampling["temperature"] or 1.0
        ref = None
        if self.beta != 0.0:
            # before the policy's forward: its no-grad activations come and go before the policy's are held
            with torch.no_grad(), reference_model(model, self.reference_adapter):
                ref, _ = token_log_probs(model, batch, self.loss_chunk_size, temperature)
        log_probs, owner = token_log_probs(model, batch, self.loss_chunk_size, temperature)
        out = policy_loss(
            self.loss_type, log_probs, owner, advantages[rows].to(log_probs.device), len(rows),
            ref_log_probs=ref, beta=self.beta, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
            max_completion_length=self.max_completion_length,
        )  # fmt: skip
        if out.kl is not None:
            self._metrics["kl"].append(float(out.kl))
        for name, value in out.clipped.items():
            self._metrics[name].append(float(value))
        return (out.loss, {}) if return_outputs else out.loss

    @property
    def loss_chunk_size(self) -> int:
        """`--loss_chunk_size`: completion logits go through lm_head this many rows at a time."""
        return getattr(self.args, "loss_chunk_size", DEFAULT_CHUNK)

    def _no_signal_loss(self, model: Any) -> torch.Tensor:
        """A zero loss with a graph (Trainer calls backward on it): every group of the micro-batch was dropped."""
        first = next(p for p in model.parameters() if p.requires_grad)
        return first.sum() * 0.0

    def _record(self, per_function: torch.Tensor, rewards: torch.Tensor, zero_std: torch.Tensor, keep: torch.Tensor, rollouts: Any) -> None:  # fmt: skip
        for i, f in enumerate(self.reward_functions):
            column = per_function[:, i]
            self._metrics[f"rewards/{f.name}/mean"].append(float(torch.nanmean(column)))
            self._metrics[f"rewards/{f.name}/std"].append(float(nanstd(column)))
        self._metrics["reward"].append(float(torch.nanmean(rewards)))
        self._metrics["reward_std"].append(float(nanstd(rewards)))
        self._metrics["frac_reward_zero_std"].append(float(zero_std.float().mean()))
        lengths = torch.tensor([len(c) for c in rollouts.completion_ids], dtype=torch.float32)
        self._metrics["completions/mean_length"].append(float(lengths.mean()))
        self._metrics["completions/min_length"].append(float(lengths.min()))
        self._metrics["completions/max_length"].append(float(lengths.max()))
        self._metrics["completions/clipped_ratio"].append(sum(rollouts.truncated) / len(rollouts.truncated))
        if self.loss_type == "dapo":
            self._metrics["groups_dropped"].append(float((~keep).sum()))

    def _log_completions(self, samples: Sequence[dict[str, Any]], rollouts: Any, per_function: torch.Tensor, rewards: torch.Tensor, advantages: torch.Tensor) -> None:  # fmt: skip
        step = self.state.global_step + 1  # the optimizer step these completions train
        if not self.log_completions_steps or step % self.log_completions_steps or not self.is_world_process_zero():
            return
        path = Path(self.args.output_dir) / "completions.jsonl"
        names = [f.name for f in self.reward_functions]
        with path.open("a", encoding="utf-8") as f:
            for row, text in enumerate(rollouts.texts):
                sample = samples[row // self.num_generations]
                entry = {
                    "step": step, "prompt": sample["prompt"], "completion": text,
                    "rewards": {n: (None if math.isnan(v) else v) for n, v in zip(names, per_function[row].tolist(), strict=True)},
                    "reward": None if math.isnan(float(rewards[row])) else float(rewards[row]), "advantage": float(advantages[row]),
                    "truncated": bool(rollouts.truncated[row]), "tokens": len(rollouts.completion_ids[row]),
                }  # fmt: skip
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        averaged = {k: sum(v) / len(v) for k, v in self._metrics.items() if v}
        if "loss" in logs:  # training logs only: evaluation has no rollouts
            self._metrics.clear()
            logs = {**logs, **averaged}
        super().log(logs, start_time)


def collate_prompts(features: list[dict[str, Any]]) -> dict[str, Any]:
    """A micro-batch of prompt samples, passed to `compute_loss` as they are."""
    return {"prompts": features}
