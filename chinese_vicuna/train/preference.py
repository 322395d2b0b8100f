"""Preference training on LoRA: DPO (sigmoid), IPO, hinge, ORPO, SimPO and KTO losses, the
reference model without a second copy of the base, and TRL's metric names.

Every loss is computed in fp32 from per-sequence log-probabilities (`train/packing.py
sequence_log_probs`, packed or padded: the same values; through lm_head in `--loss_chunk_size`
chunks, no `[tokens, vocab]` logits), in forms that stay finite where a naive one overflows
(log-sigmoids, log(1 - p) through `log1mexp`).

The reference (DPO, IPO, hinge, KTO) is the policy itself: the trained adapter disabled
(starting from the base), or the starting adapter loaded a second time, frozen, under the name
`REFERENCE_ADAPTER` (starting from `--lora_weights`): switched on for a no-grad forward, in eval
mode (no dropout), then back, before the policy's forward (its activations are gone by then).
`precompute_reference` computes it once before training instead (stored with the tokenized
pairs under `reference_key`: data/preference.py `stored_reference_log_probs`).
`--pref_split_sequences`: the members of the samples (chosen, rejected) in separate batches,
each run again in backward (`parts_log_probs`): one member's activations at a time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer

from chinese_vicuna.errors import UserError
from chinese_vicuna.train.losses import DEFAULT_CHUNK
from chinese_vicuna.train.packing import LengthSamplingMixin, sequence_log_probs

logger = logging.getLogger(__name__)

PAIR_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")
PREFERENCE_LOSSES = (*PAIR_LOSSES, "kto")
REFERENCE_FREE = ("orpo", "simpo")
REFERENCE_ADAPTER = "reference"
TRAINED_ADAPTER = "default"
# --pref_split_sequences batches: a list of batches, one per member of a sample (parts_log_probs)
SEQUENCE_PARTS = "sequence_parts"
# KTO estimates its KL term from each prompt paired with another sample's answer in the batch.
KTO_MIN_BATCH = 2


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation near 0 nor underflow far below it."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass
class PreferenceOutput:
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def pair_loss(
    loss_type: str,
    beta: float,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> PreferenceOutput:
    """The per-pair loss (mean over pairs) and rewards from summed log-probabilities (fp32).

    sigmoid/hinge/IPO as TRL's DPOTrainer (IPO on per-token averages, as TRL); ORPO: the SFT
    term (negative per-token average log-probability of chosen) minus beta × log σ(log odds
    ratio) of the per-token averages, rewards beta × average log-probabilities; SimPO:
    -log σ(beta × (average chosen - average rejected) - gamma)."""
    chosen, rejected = chosen.float(), rejected.float()
    chosen_avg, rejected_avg = chosen / chosen_counts.clamp(min=1), rejected / rejected_counts.clamp(min=1)
    if loss_type in REFERENCE_FREE:
        if loss_type == "orpo":
            log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
            losses = -chosen_avg - beta * F.logsigmoid(log_odds)
        else:
            losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg) - simpo_gamma)
        return PreferenceOutput(losses.mean(), beta * chosen_avg.detach(), beta * rejected_avg.detach())
    assert ref_chosen is not None and ref_rejected is not None
    chosen_ratio, rejected_ratio = chosen - ref_chosen.float(), rejected - ref_rejected.float()
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        delta = chosen_ratio / chosen_counts.clamp(min=1) - rejected_ratio / rejected_counts.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown pair loss {loss_type!r}")
    return PreferenceOutput(losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def kto_loss(
    beta: float,
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    kl_log_probs: torch.Tensor,
    ref_kl_log_probs: torch.Tensor,
    desirable: torch.Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[PreferenceOutput, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, as TRL): the KL reference point estimated from mismatched
    prompt/answer pairs of the batch (detached, at least 0); rewards beta × log-ratio.
    Returns the output (rewards of the desirable and the undesirable samples) and the KL estimate."""
    kl = (kl_log_probs.float() - ref_kl_log_probs.float()).mean().clamp(min=0).detach()
    ratio = log_probs.float() - ref_log_probs.float()
    good, bad = ratio[desirable], ratio[~desirable]
    losses = torch.cat(
        [desirable_weight * (1 - torch.sigmoid(beta * (good - kl))), undesirable_weight * (1 - torch.sigmoid(beta * (kl - bad)))]
    )
    return PreferenceOutput(losses.mean(), beta * good.detach(), beta * bad.detach()), kl


@contextlib.contextmanager
def reference_model(model: Any, adapter: str | None) -> Iterator[None]:
    """The reference for the span of a no-grad forward: the trained adapter disabled, or the
    frozen `adapter` active; dropout off. Trainable flags and mode are restored after."""
    peft_model = getattr(model, "module", model)  # DDP-wrapped or not
    was_training = peft_model.training
    peft_model.eval()
    try:
        if adapter is None:
            with peft_model.disable_adapter():
                yield
        else:
            active = peft_model.active_adapter
            peft_model.set_adapter(adapter, inference_mode=True)
            try:
                yield
            finally:
                peft_model.set_adapter(active)  # trainable again; the reference stays frozen
    finally:
        peft_model.train(was_training)


def add_reference_adapter(model: Any, adapter_dir: str) -> None:
    """The starting adapter loaded a second time, frozen, beside the trained one (a few MB, not a
    second base); saving keeps only the trained adapter (`save_pretrained` bound to select it)."""
    model.load_adapter(adapter_dir, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter(TRAINED_ADAPTER)
    model.save_pretrained = functools.partial(model.save_pretrained, selected_adapters=[TRAINED_ADAPTER])


class PreferenceCollator:
    """The stage's batches: the sequence collator's row(s) plus what a sample carries beside its
    sequences: precomputed reference log-probabilities (`ref_log_probs`), and for KTO the flag
    (`label`) and each sample's mismatched sequence (its prompt, the next sample's answer)."""

    def __init__(self, sequences: Any, kto: bool = False, split: bool = False) -> None:
        self.sequences, self.kto, self.split = sequences, kto, split

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch_extra: dict[str, torch.Tensor] = {}
        if "ref_log_probs" in features[0]:
            batch_extra["ref_log_probs"] = torch.as_tensor(np.stack([f["ref_log_probs"] for f in features]), dtype=torch.float32).reshape(
                -1
            )
        if self.kto:
            # a batch of one (the last of an epoch or of the held-out set) has no mismatched pair: its KL term is 0
            batch_extra["kto_kl_valid"] = torch.tensor(len(features) >= KTO_MIN_BATCH)
            batch_extra["kto_desirable"] = torch.tensor([bool(f["label"]) for f in features])
            features = [_with_mismatched(f, features[(i + 1) % len(features)]) for i, f in enumerate(features)]
        else:
            features = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        if self.split:  # --pref_split_sequences: member j of every sample in batch j (all chosen, then all rejected)
            members = len(features[0]["input_ids"])
            parts = [self.sequences([{k: f[k][j] for k in ("input_ids", "labels")} for f in features]) for j in range(members)]
            return {SEQUENCE_PARTS: parts, **batch_extra}
        return {**self.sequences(features), **batch_extra}


def _with_mismatched(sample: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    from chinese_vicuna.data.preference import prompt_length

    own, theirs = prompt_length(sample["labels"]), prompt_length(other["labels"])
    ids = np.concatenate([np.asarray(sample["input_ids"][:own]), np.asarray(other["input_ids"][theirs:])])
    labels = np.concatenate([np.asarray(sample["labels"][:own]), np.asarray(other["labels"][theirs:])])
    return {"input_ids": [np.asarray(sample["input_ids"]), ids], "labels": [np.asarray(sample["labels"]), labels]}


def parts_log_probs(model: Any, parts: list[dict[str, Any]], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_log_probs` of a batch given as parts (part j: member j of every sample), in the
    joint batch's order (sequence g * k + j). With grad enabled, each part runs again in backward
    (`_RecomputedParts`): one part's activations at a time."""
    if torch.is_grad_enabled():
        anchor = torch.ones((), requires_grad=True)  # makes autograd call the recomputation
        return _RecomputedParts.apply(anchor, model, parts, chunk)
    results = [sequence_log_probs(model, part, chunk) for part in parts]
    return torch.stack([r[0] for r in results], dim=1).reshape(-1), torch.stack([r[1] for r in results], dim=1).reshape(-1)


class _RecomputedParts(torch.autograd.Function):
    """Log-probabilities of the parts computed without grad; backward runs each part's forward again
    with grad and back-propagates that part's share of the incoming gradient (reentrant, as
    activation checkpointing). The random state is restored first, so dropout draws the same masks:
    the gradients are those of one forward with grad over the parts, at the peak of one part."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, model: Any, parts: list[dict[str, Any]], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ctx.model, ctx.parts, ctx.chunk = model, parts, chunk
        device = parts[0]["input_ids"].device
        ctx.devices = [device] if device.type == "cuda" else []
        ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.devices])
        ctx.autocast = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        log_probs, counts = parts_log_probs(model, parts, chunk)
        ctx.mark_non_differentiable(counts)
        return log_probs, counts

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor, _grad_counts: Any) -> tuple[None, None, None, None]:  # type: ignore[override]
        grads = grad_log_probs.view(-1, len(ctx.parts))
        device_type, enabled, dtype = ctx.autocast
        autocast = torch.autocast(device_type, dtype=dtype) if enabled else contextlib.nullcontext()
        with torch.random.fork_rng(devices=ctx.devices, enabled=True):
            torch.set_rng_state(ctx.rng[0])
            for d, state in zip(ctx.devices, ctx.rng[1], strict=True):
                torch.cuda.set_rng_state(state, d)
            for j, part in enumerate(ctx.parts):
                with torch.enable_grad(), autocast:
                    log_probs, _ = sequence_log_probs(ctx.model, part, ctx.chunk)
                torch.autograd.backward(log_probs, grads[:, j].to(log_probs.dtype))
                del log_probs
        return None, None, None, None


class WithReference:
    """A dataset view whose samples also carry their reference log-probabilities (one per sequence)."""

    def __init__(self, samples: Any, ref_log_probs: np.ndarray) -> None:
        self.samples, self.ref_log_probs = samples, ref_log_probs

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.samples[i], "ref_log_probs": self.ref_log_probs[i]}

    @property
    def lengths(self) -> Any:
        return self.samples.lengths


class PreferenceTrainer(LengthSamplingMixin, Trainer):
    """Trainer whose loss is a preference loss on per-sequence log-probabilities of pairs
    (chosen, rejected) or, for KTO, of single answers with their mismatched sequences.
    Logs TRL's `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
    `logps/chosen`, `logps/rejected` (`eval_` prefixed on held-out data), averaged since the last log."""

    # compute_loss returns a mean over this micro-batch: Trainer divides by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        ftx: float = 0.0,
        simpo_gamma: float = 0.5,
        reference_adapter: str | None = None,
        kto_weights: tuple[float, float] = (1.0, 1.0),
        **kwargs: Any,
    ) -> None:
        if loss_type not in PREFERENCE_LOSSES:
            raise UserError(f"--pref_loss {loss_type}: pick one of {', '.join(PREFERENCE_LOSSES)}")
        self.loss_type, self.beta, self.ftx, self.simpo_gamma = loss_type, beta, ftx, simpo_gamma
        self.reference_adapter, self.kto_weights = reference_adapter, kto_weights
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if train_args is not None:
            # the stage's collator reads its own keys (reference log-probs, the KTO flag): keep them
            train_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)

    @property
    def loss_chunk_size(self) -> int:
        return getattr(self.args, "loss_chunk_size", DEFAULT_CHUNK)

    def sequence_log_probs(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if SEQUENCE_PARTS in inputs:
            return parts_log_probs(model, inputs[SEQUENCE_PARTS], self.loss_chunk_size)
        return sequence_log_probs(model, inputs, self.loss_chunk_size)

    def reference_log_probs(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        if "ref_log_probs" in inputs:
            return inputs["ref_log_probs"]
        with torch.no_grad(), reference_model(model, self.reference_adapter):
            return self.sequence_log_probs(model, inputs)[0]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        # The reference first: its no-grad forward's activations are gone before the policy's
        # forward keeps its own for backward (the peak is the policy's, not the sum of both).
        ref = None if self.loss_type in REFERENCE_FREE else self.reference_log_probs(model, inputs)
        log_probs, counts = self.sequence_log_probs(model, inputs)
        metrics: dict[str, float] = {}
        if self.loss_type == "kto":
            own, kl = log_probs.view(-1, 2).unbind(1)
            ref_own, ref_kl = ref.view(-1, 2).unbind(1)
            desirable = inputs["kto_desirable"].to(own.device)
            if not bool(inputs["kto_kl_valid"]):
                kl = ref_kl  # no mismatched pair: the estimate is its lower bound, 0
            out, kl_value = kto_loss(self.beta, own, ref_own, kl, ref_kl, desirable, *self.kto_weights)
            loss = out.loss
            metrics["kl"] = float(kl_value)
            own_counts = counts.view(-1, 2)[:, 0]
            if self.ftx and desirable.any():
                loss = loss + self.ftx * (-(own[desirable] / own_counts[desirable].clamp(min=1)).mean())
            chosen_logps, rejected_logps = own[desirable].detach(), own[~desirable].detach()
        else:
            chosen, rejected = log_probs.view(-1, 2).unbind(1)
            chosen_counts, rejected_counts = counts.view(-1, 2).unbind(1)
            ref_chosen, ref_rejected = (None, None) if ref is None else ref.view(-1, 2).unbind(1)
            out = pair_loss(self.loss_type, self.beta, chosen, rejected, chosen_counts, rejected_counts, ref_chosen, ref_rejected, self.simpo_gamma)  # fmt: skip
            loss = out.loss
            if self.ftx and self.loss_type != "orpo":  # ORPO's loss has its SFT term already
                loss = loss + self.ftx * (-(chosen / chosen_counts.clamp(min=1)).mean())
            chosen_logps, rejected_logps = chosen.detach(), rejected.detach()
            metrics["rewards/accuracies"] = float((out.chosen_rewards > out.rejected_rewards).float().mean())
            metrics["rewards/margins"] = float((out.chosen_rewards - out.rejected_rewards).mean())
        for name, values in (
            ("rewards/chosen", out.chosen_rewards), ("rewards/rejected", out.rejected_rewards),
            ("logps/chosen", chosen_logps), ("logps/rejected", rejected_logps),
        ):  # fmt: skip
            if values.numel():
                metrics[name] = float(values.float().mean())
        mode = "train" if model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None) -> Any:
        if SEQUENCE_PARTS not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        # split batches carry no top-level labels, by which Trainer would decide to skip the loss
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        averaged = {f"{prefix}{k}": sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        self._metrics[mode].clear()
        super().log({**logs, **averaged}, start_time)


def check_kto_batch(loss_type: str, micro_batch: int, packing_max_tokens: int) -> None:
    """KTO's KL estimate needs another sample in every batch: refuse a setting that gives fewer."""
    if loss_type != "kto":
        return
    if packing_max_tokens:
        raise UserError("--pref_loss kto needs batches of a fixed number of samples for its KL estimate; drop --packing_max_tokens")
    if micro_batch < KTO_MIN_BATCH:
        raise UserError(
            f"--pref_loss kto estimates its KL term from mismatched pairs within a batch: --micro_batch_size {micro_batch} "
            f"is too small; the minimum is {KTO_MIN_BATCH}"
        )


def precompute_reference(trainer: PreferenceTrainer, samples: Any, collator: Any, batch_size: int) -> np.ndarray:
    """Reference log-probabilities of every sequence of `samples`, computed once (no grad): an
    array (samples, sequences per sample) in the view's order."""
    model = trainer.model
    out = []
    for start in range(0, len(samples), batch_size):
        batch = collator([samples[i] for i in range(start, min(start + batch_size, len(samples)))])
        batch = _on_device(batch, trainer.args.device)
        out.append(trainer.reference_log_probs(model, batch).cpu().numpy())
    group = len(samples[0]["input_ids"]) if len(samples) else 2
    return np.concatenate(out).reshape(-1, group) if out else np.zeros((0, group), dtype=np.float32)


# Bump when the reference log-probabilities' computation changes (the stored ones are keyed by it).
REFERENCE_LOG_PROBS_VERSION = "1"


def reference_key(model: Any, base_model: str, reference_adapter_dir: str | None, template: Any, train_args: Any) -> str:
    """What the reference's log-probabilities depend on besides the tokenized pairs (whose cache key
    holds data, tokenizer, template and cutoff): the base's files (by content), the reference
    adapter's files (or none: the adapter disabled), the loaded model's config (dtype, quantization,
    RoPE), the mixed precision and the template. Another reference never reads them."""
    from chinese_vicuna.checkpoints import data_identity

    peft_model = getattr(model, "module", model)
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    config = {k: v for k, v in base.config.to_dict().items() if k != "_name_or_path"}
    identity = {
        "version": REFERENCE_LOG_PROBS_VERSION,
        "base": data_identity(base_model),
        "reference_adapter": data_identity(reference_adapter_dir) if reference_adapter_dir else "adapter disabled",
        "config": config,
        "weights_dtype": str(base.get_input_embeddings().weight.dtype),
        "mixed_precision": {"bf16": bool(getattr(train_args, "bf16", False)), "fp16": bool(getattr(train_args, "fp16", False))},
        "template": getattr(template, "name", None),
        "template_spec": getattr(template, "spec", None),
    }
    text = json.dumps(identity, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _on_device(value: Any, device: Any) -> Any:
    """Tensors of a batch (nested in parts) on `device`."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _on_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_on_device(v, device) for v in value]
    return value
