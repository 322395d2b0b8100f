"""What a new training stage builds on: groups of sequences (pairs) in the store and the cache's
format, packed or padded like single sequences, per-sequence log-probabilities that packing does
not change, its own Trainer arguments through build_trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Trainer

from chinese_vicuna.data.collate import PackedCollator, PaddingCollator
from chinese_vicuna.data.datasets import split_train_val
from chinese_vicuna.data.encode import IGNORE_INDEX, tokenize_instructions
from chinese_vicuna.data.records import read_records, validate_instruction
from chinese_vicuna.data.store import SequenceGroups, StoreWriter, TokenizedDataset
from chinese_vicuna.model.adapters import add_lora
from chinese_vicuna.prompts import load_template
from chinese_vicuna.train.packing import (
    PACKED_SDPA,
    LengthSamplingMixin,
    TokenBudgetBatchSampler,
    dataset_lengths,
    sequence_log_probs,
    use_packed_attention,
)

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "instruct" / "data_sample.jsonl"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from chinese_vicuna.model.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pairs(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> SequenceGroups:
    """6 preference pairs: each prompt with its own answer (chosen) and the next record's (rejected),
    written to a store as consecutive sequences, as a preference loader writes them."""
    records = [validate_instruction(r) for r in read_records(SAMPLE)[:7]]
    rejected = [{**r, "output": records[i + 1]["output"]} for i, r in enumerate(records[:6])]
    template = load_template("alpaca", tokenizer)
    chosen_samples = tokenize_instructions(records[:6], tokenizer, template, 256)
    rejected_samples = tokenize_instructions(rejected, tokenizer, template, 256)
    folder = tmp_path_factory.mktemp("pairs")
    writer = StoreWriter(folder)
    for c, r in zip(chosen_samples, rejected_samples, strict=True):
        writer.add_samples([c, r])
    writer.close()
    return SequenceGroups(TokenizedDataset(folder), 2)


def test_pairs_are_read_split_and_measured_as_groups(pairs: SequenceGroups) -> None:
    store = pairs.sequences
    assert len(pairs) == 6 and len(store) == 12
    pair = pairs[4]
    assert [x.tolist() for x in pair["input_ids"]] == [store[8]["input_ids"].tolist(), store[9]["input_ids"].tolist()]
    assert [x.tolist() for x in pair["labels"]] == [store[8]["labels"].tolist(), store[9]["labels"].tolist()]
    assert pairs.lengths.tolist() == [len(store[2 * i]["input_ids"]) + len(store[2 * i + 1]["input_ids"]) for i in range(6)]
    train, val = split_train_val(pairs, 2, seed=3)
    assert isinstance(train, SequenceGroups) and (len(train), len(val)) == (4, 2)
    assert sorted([*train.groups.tolist(), *val.groups.tolist()]) == list(range(6))
    assert val.to_list() == [pairs.to_list()[int(g)] for g in val.groups]
    assert dataset_lengths(train) == [int(pairs.lengths[g]) for g in train.groups]
    # a token budget cuts rows of whole pairs
    rows = list(TokenBudgetBatchSampler(dataset_lengths(pairs), int(pairs.lengths.max()) * 2, shuffle=False))
    assert sorted(i for row in rows for i in row) == list(range(6))


def test_collators_lay_out_every_sequence_of_a_pair(pairs: SequenceGroups, tokenizer) -> None:
    batch = [pairs[i] for i in range(3)]
    sequences = [(ids, labels) for pair in batch for ids, labels in zip(pair["input_ids"], pair["labels"], strict=True)]
    packed = PackedCollator()(batch)
    spans = packed["sequence_spans"].tolist()
    assert len(spans) == 6 and spans[0][0] == 0 and spans[-1][1] == packed["input_ids"].shape[1]
    for (start, end), (ids, labels) in zip(spans, sequences, strict=True):
        assert packed["input_ids"][0, start:end].tolist() == ids.tolist()
        assert packed["labels"][0, start:end].tolist() == labels.tolist()
        assert packed["position_ids"][0, start:end].tolist() == list(range(end - start))
        assert packed["shift_labels"][0, start:end].tolist() == [*labels[1:].tolist(), IGNORE_INDEX]
    padded = PaddingCollator(tokenizer.pad_token_id)(batch)
    assert padded["input_ids"].shape == (6, max(len(ids) for ids, _ in sequences))
    for row, (ids, _) in enumerate(sequences):
        assert padded["input_ids"][row, : len(ids)].tolist() == ids.tolist()
    # single sequences: the same row as before (no new keys other than the spans)
    single = PackedCollator()([pairs.sequences[0], pairs.sequences[1]])
    assert single["sequence_spans"].tolist() == spans[:2]
    assert single["input_ids"].tolist() == [packed["input_ids"][0, : spans[1][1]].tolist()]


@pytest.mark.parametrize("attention", ["sdpa-mask", "sdpa-per-sample", "eager"])
def test_packed_pair_log_probs_equal_unpacked(attention: str, pairs: SequenceGroups, tokenizer, tiny_model_dir: Path) -> None:
    """Per-sequence log-probabilities of pairs packed in one row (last layer at trained positions
    only) equal each sequence's own forward, and the padded batch's, in fp32: per token to 1e-5,
    the sums (about -150) to a few fp32 roundings (1e-6 relative; one rounding there is 1.5e-5)."""
    from chinese_vicuna.model.build import load_checked_model

    model = load_checked_model(str(tiny_model_dir), tokenizer, "fp32", attn_implementation="eager" if attention == "eager" else None)
    torch.manual_seed(0)
    model = add_lora(model, 8, 16, 0.0, "all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    if attention == "sdpa-per-sample":
        use_packed_attention(model)
        assert model.get_base_model().config._attn_implementation == PACKED_SDPA
    model.eval()
    batch = [pairs[i] for i in range(4)]
    with torch.no_grad():
        packed, packed_counts = sequence_log_probs(model, PackedCollator()(batch))
        padded, padded_counts = sequence_log_probs(model, PaddingCollator(tokenizer.pad_token_id)(batch))
        alone = []
        for pair in batch:
            for ids, labels in zip(pair["input_ids"], pair["labels"], strict=True):
                logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0, :-1].float()
                target = torch.as_tensor(labels[1:])
                trained = target != IGNORE_INDEX
                alone.append(torch.log_softmax(logits, -1)[trained].gather(1, target[trained, None]).sum())
    alone = torch.stack(alone)
    assert packed.shape == (8,) and packed_counts.tolist() == padded_counts.tolist()
    assert packed_counts.tolist() == [int((torch.as_tensor(lab[1:]) != IGNORE_INDEX).sum()) for p in batch for lab in p["labels"]]
    assert (alone < -1).all()  # real sums of many tokens, not zeros
    counts = packed_counts.float()
    for ours in (packed, padded):
        torch.testing.assert_close(ours / counts, alone / counts, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours, alone, atol=0, rtol=1e-6)
    # the chosen and rejected answers differ, and so do their log-probabilities
    assert (packed.view(4, 2)[:, 0] != packed.view(4, 2)[:, 1]).all()


class RecordingTrainer(Trainer):
    """A stage's Trainer with an argument of its own."""

    def __init__(self, *args, beta: float, **kwargs) -> None:
        self.beta = beta
        super().__init__(*args, **kwargs)


def test_build_trainer_passes_the_stage_arguments_and_adds_atomic_checkpoints(
    tiny_model_dir: Path, tokenizer, pairs, tmp_path: Path
) -> None:
    from chinese_vicuna.args import TrainArguments, parse_args
    from chinese_vicuna.model.build import load_checked_model
    from chinese_vicuna.train.checkpointing import AtomicCheckpointMixin
    from chinese_vicuna.train.trainer import build_trainer

    (train_args,) = parse_args((TrainArguments,), ["--output_dir", str(tmp_path), "--report_to", "none"])
    model = add_lora(load_checked_model(str(tiny_model_dir), tokenizer, "fp32"), 8, 16, 0.0, "all-linear")
    trainer = build_trainer(RecordingTrainer, model, tokenizer, train_args, pairs, data_collator=PackedCollator(), beta=0.25)
    assert trainer.beta == 0.25
    assert isinstance(trainer, RecordingTrainer) and isinstance(trainer, AtomicCheckpointMixin)


def test_length_grouping_measures_a_pair_by_all_its_tokens(tiny_model_dir: Path, tokenizer, pairs, tmp_path: Path) -> None:
    """--packing false --group_by_length true: batches grouped by each pair's tokens (Trainer's own
    sampler would count its sequences: 2 for every pair)."""
    from chinese_vicuna.args import TrainArguments, parse_args
    from chinese_vicuna.model.build import load_checked_model
    from chinese_vicuna.train.packing import sequence_collator
    from chinese_vicuna.train.trainer import build_trainer

    flags = ["--output_dir", str(tmp_path), "--report_to", "none", "--packing", "false", "--group_by_length", "true"]
    (train_args,) = parse_args((TrainArguments,), flags)
    model = add_lora(load_checked_model(str(tiny_model_dir), tokenizer, "fp32"), 8, 16, 0.0, "all-linear")
    trainer = build_trainer(
        MarginTrainer, model, tokenizer, train_args, pairs, None, sequence_collator(False, tokenizer), margin_weight=1.0
    )
    sampler = trainer._get_train_sampler()
    assert sampler.lengths == pairs.lengths.tolist() and len(set(sampler.lengths)) > 1


class MarginTrainer(LengthSamplingMixin, Trainer):
    """A toy preference stage in a few lines: raise log p(chosen) - log p(rejected) of each pair."""

    def __init__(self, *args, margin_weight: float, **kwargs) -> None:
        self.margin_weight = margin_weight
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        log_probs, counts = sequence_log_probs(model, inputs)
        per_token = (log_probs / counts.clamp(min=1)).view(-1, 2)
        loss = -torch.nn.functional.logsigmoid(self.margin_weight * (per_token[:, 0] - per_token[:, 1])).mean()
        return (loss, {}) if return_outputs else loss


@pytest.mark.parametrize("max_tokens", [0, 600])
def test_a_pair_stage_trains_through_build_trainer(max_tokens: int, tiny_model_dir: Path, tokenizer, pairs, tmp_path: Path) -> None:
    """The plug-in path end to end: pairs from the store, Trainer's column filter, packed rows
    (by sample count or token budget), the stage's own argument, atomic checkpoints: after
    training every chosen answer is more likely than its rejected one."""
    from chinese_vicuna.args import LoraArguments, TrainArguments, parse_args
    from chinese_vicuna.model.build import load_checked_model
    from chinese_vicuna.train.model import apply_training_speedups
    from chinese_vicuna.train.packing import sequence_collator
    from chinese_vicuna.train.trainer import build_trainer

    flags = ["--output_dir", str(tmp_path), "--report_to", "none", "--learning_rate", "3e-3", "--num_train_epochs", "8"]
    flags += ["--per_device_train_batch_size", "3", "--save_steps", "8", "--warmup_steps", "0", "--disable_tqdm", "true"]
    (train_args,) = parse_args((TrainArguments,), [*flags, "--packing_max_tokens", str(max_tokens)])
    torch.manual_seed(0)
    model = add_lora(load_checked_model(str(tiny_model_dir), tokenizer, "fp32"), 8, 16, 0.0, "all-linear")
    assert apply_training_speedups(model, LoraArguments(), train_args)  # the same model changes as SFT

    def margins() -> list[float]:
        model.eval()
        with torch.no_grad():
            log_probs, counts = sequence_log_probs(model, sequence_collator(False, tokenizer)(list(pairs)))
        per_token = (log_probs / counts).view(-1, 2)
        return (per_token[:, 0] - per_token[:, 1]).tolist()

    assert min(margins()) < 0  # some rejected answers start out more likely
    trainer = build_trainer(MarginTrainer, model, tokenizer, train_args, pairs, None, sequence_collator(True, tokenizer), margin_weight=1.0)
    trainer.train()
    assert min(margins()) > 0.5, margins()
    assert (tmp_path / "checkpoint-8" / "adapter_model.safetensors").is_file()
