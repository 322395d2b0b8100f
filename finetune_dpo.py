"""Preference training (DPO, IPO, hinge, ORPO, SimPO, KTO) with LoRA / QLoRA → a PEFT adapter.

    python finetune_dpo.py --base_model MODEL --lora_weights SFT_ADAPTER --data_path pairs.jsonl --output_dir lora-Vicuna-dpo

Data: chosen/rejected pairs (LLaMA-Factory alpaca or ShareGPT, TRL with an explicit or an implicit
prompt) or, for `--pref_loss kto`, single answers with `kto_tag` / `label`
(chinese_vicuna/data/preference.py; docs/preference.md). The reference is the starting point:
the `--lora_weights` adapter (loaded again, frozen) or the base (the adapter disabled); ORPO and
SimPO need none. The same model / LoRA / batch / training flags as finetune.py; every
TrainingArguments flag works too (`python finetune_dpo.py --help`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chinese_vicuna.args import (
    BatchArguments,
    DataArguments,
    LoraArguments,
    TemplateArguments,
    TrainArguments,
    TrainModelArguments,
    parse_args,
)
from chinese_vicuna.checkpoints import RunIdentity
from chinese_vicuna.data.preference import load_kto_dataset, load_preference_dataset, stored_reference_log_probs
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from chinese_vicuna.run import prepare_run
from chinese_vicuna.train.data import load_training_data
from chinese_vicuna.train.model import apply_training_speedups, load_model_for_training
from chinese_vicuna.train.packing import sequence_collator
from chinese_vicuna.train.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_ADAPTER,
    REFERENCE_FREE,
    PreferenceCollator,
    PreferenceTrainer,
    WithReference,
    add_reference_adapter,
    check_kto_batch,
    precompute_reference,
    reference_key,
)
from chinese_vicuna.train.trainer import build_trainer, train_and_save


@dataclass
class PreferenceArguments:
    """LLaMA-Factory's flag names; TRL's --loss_type / --beta work as aliases."""

    pref_loss: str = field(
        default="sigmoid",
        metadata={"help": f"Preference loss: {', '.join(PREFERENCE_LOSSES)} (sigmoid = DPO).", "aliases": ["--loss_type"]},
    )
    pref_beta: float = field(default=0.1, metadata={"help": "beta: strength of the preference (DPO's KL weight, ORPO's ratio weight).", "aliases": ["--beta"]})  # fmt: skip
    pref_ftx: float = field(default=0.0, metadata={"help": "Weight of an SFT loss on the chosen answers added to the preference loss."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin."})
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probabilities once before training (one forward per sample less each step); "
            "stored with the tokenized data, reused by a later run of the same reference."
        },
    )
    pref_split_sequences: bool = field(
        default=False,
        metadata={
            "help": "Chosen and rejected through the model one after the other: the activations of one answer per pair "
            "at a time (about SFT's peak), one more no-grad forward; the same gradients. Single process, no DeepSpeed."
        },
    )
    kto_chosen_weight: float = field(default=1.0, metadata={"help": "KTO: weight of the desirable answers' loss."})
    kto_rejected_weight: float = field(default=1.0, metadata={"help": "KTO: weight of the undesirable answers' loss."})

    def __post_init__(self) -> None:
        if self.pref_loss not in PREFERENCE_LOSSES:
            raise UserError(f"--pref_loss {self.pref_loss}: pick one of {', '.join(PREFERENCE_LOSSES)}")
        if self.pref_beta <= 0:
            raise UserError(f"--pref_beta {self.pref_beta}: must be > 0 (0.1 is usual for DPO)")


@dataclass
class PreferenceDataArguments(DataArguments):
    data_path: str = field(
        default="sample/preference/pairs_sample.jsonl",
        metadata={"help": "Preference data: .json (list) or .jsonl file, or a folder of them; format detected per record."},
    )
    cutoff_len: int = field(default=512, metadata={"help": "Most tokens per sequence; longer pairs lose prompt tokens first."})


@dataclass
class PreferenceTrainArguments(TrainArguments):
    output_dir: str = field(default="lora-Vicuna-dpo", metadata={"help": "Where the adapter and checkpoints go."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (preference training wants less than SFT)."})


FLAG_GROUPS = (
    TrainModelArguments, TemplateArguments, PreferenceDataArguments, LoraArguments, BatchArguments, PreferenceArguments, PreferenceTrainArguments,
)  # fmt: skip
# The flags that identify a run: a resume must share them (run_fingerprint.json).
RUN_IDENTITY = RunIdentity(
    data=("data_path", "val_data_path"),
    models=("base_model", "tokenizer_path", "lora_weights"),
    settings=("prompt_template", "cutoff_len", "val_set_size", "data_weights", "data_mix_size",
              "lora_r", "lora_alpha", "lora_target_modules", "modules_to_save", "packing", "batch_size", "seed",
              "pref_loss", "pref_beta", "pref_ftx", "simpo_gamma", "kto_chosen_weight", "kto_rejected_weight"),
    data_choice=("data_path", "val_data_path", "data_weights", "data_mix_size", "val_set_size"),
)  # fmt: skip


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    # 0. flags (parsed once: precision and batch arithmetic are final here), then the run's set-up:
    #    logging, seed, the checkpoint to resume from, the output folder
    flags = parse_args(FLAG_GROUPS, argv)
    model_args, template_args, data_args, lora_args, _batch, pref_args, train_args = flags  # _batch: applied to train_args
    run = prepare_run(flags, RUN_IDENTITY)
    kto = pref_args.pref_loss == "kto"
    check_kto_batch(pref_args.pref_loss, train_args.per_device_train_batch_size, train_args.packing_max_tokens)
    needs_reference = pref_args.pref_loss not in REFERENCE_FREE
    if pref_args.pref_split_sequences and (train_args.deepspeed or train_args.world_size > 1):
        raise UserError("--pref_split_sequences runs each answer's backward inside the loss's: one process without DeepSpeed only")
    if pref_args.precompute_ref_log_probs and kto:
        raise UserError("--precompute_ref_log_probs: KTO's KL pairs change with every batch; compute the reference as it trains")

    # 1. tokenizer and pairs first: a bad record fails in seconds, before a 13B model loads
    tokenizer = load_tokenizer(model_args.tokenizer_path or model_args.base_model, model_args.trust_remote_code)
    template = load_template(template_args.template_or_fallback, tokenizer)
    with train_args.main_process_first(desc="tokenize"):
        # pairs (chosen, rejected) with the template applied once to the prompt; KTO: single judged answers
        def load(path: str) -> Any:
            loader = load_kto_dataset if kto else load_preference_dataset
            return loader(path, tokenizer, template, data_args.cutoff_len, data_args.cache_dir, data_args.use_data_cache)

        train_data, val_data = load_training_data(data_args, load, train_args.seed)

    # 2. base model and a new or continued LoRA; the reference is that starting point, never a second base
    model = load_model_for_training(model_args, lora_args, train_args, tokenizer)
    apply_training_speedups(model, lora_args, train_args)  # fast LoRA dropout, attention within packed samples (same results)
    reference = None
    if needs_reference and model_args.lora_weights:
        add_reference_adapter(model, model_args.lora_weights)
        reference = REFERENCE_ADAPTER

    # 3. train: pairs packed in rows unless --packing false (then padded); the reference computed per batch or once
    collator = PreferenceCollator(sequence_collator(train_args.packing, tokenizer), kto=kto, split=pref_args.pref_split_sequences)
    trainer = build_trainer(
        PreferenceTrainer, model, tokenizer, train_args, train_data, val_data, collator,
        loss_type=pref_args.pref_loss, beta=pref_args.pref_beta, ftx=pref_args.pref_ftx, simpo_gamma=pref_args.simpo_gamma,
        reference_adapter=reference, kto_weights=(pref_args.kto_chosen_weight, pref_args.kto_rejected_weight),
    )  # fmt: skip
    if pref_args.precompute_ref_log_probs and needs_reference:
        # stored with the tokenized pairs, keyed by the reference: a second run (or a resume) reads them
        key = reference_key(model, model_args.base_model, model_args.lora_weights if reference else None, template, train_args)

        def compute(samples: Any) -> Any:
            return precompute_reference(trainer, samples, collator, train_args.per_device_eval_batch_size)

        with train_args.main_process_first(desc="reference log-probabilities"):
            trainer.train_dataset = WithReference(train_data, stored_reference_log_probs(train_data, compute, key))
            if val_data is not None and len(val_data):
                trainer.eval_dataset = WithReference(val_data, stored_reference_log_probs(val_data, compute, key))
    train_and_save(trainer, tokenizer, template, run.resume_from_checkpoint, run.fingerprint)


if __name__ == "__main__":
    main()
