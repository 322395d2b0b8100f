"""finetune_dpo.py: preference data formats, losses against TRL, the reference without a second
base, and a tiny model that learns to prefer the chosen answers after SFT taught the rejected ones."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import finetune
import finetune_dpo
from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.data.collate import PackedCollator, PaddingCollator
from chinese_vicuna.data.encode import IGNORE_INDEX
from chinese_vicuna.data.preference import load_kto_dataset, load_preference_dataset, prompt_length
from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.generation import generate_answer
from chinese_vicuna.model.adapters import add_lora
from chinese_vicuna.model.loading import load_tokenizer
from chinese_vicuna.prompts import load_template
from chinese_vicuna.train.packing import sequence_log_probs
from chinese_vicuna.train.preference import REFERENCE_ADAPTER, add_reference_adapter, pair_loss, reference_model
from conftest import REPO, SAMPLE_INSTRUCT, read_jsonl, run_script

PROMPTS = 12  # SFT teaches each its sample answer (Y); preference pairs prefer CHOSEN (X)
CHOSEN = "这个问题我不确定。"


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def pair_records() -> list[dict]:
    return [{**r, "chosen": CHOSEN, "rejected": r.pop("output")} for r in read_jsonl(SAMPLE_INSTRUCT)[:PROMPTS]]


def test_every_format_renders_the_prompt_once_and_each_answer_as_its_continuation(tokenizer, tmp_path: Path) -> None:
    """One pair in each format gives the same ids; the prompt is the tokenizer's ids of the rendered
    prompt after one BOS, masked; each answer ends with a trained EOS; KTO formats likewise."""
    q, good, bad, system = "一年有几个季节？", "四个。", "十二个。", "你是一个助手。"
    user, answer = {"role": "user", "content": q}, lambda text: {"role": "assistant", "content": text}
    same = {
        "alpaca": {"instruction": q, "input": "", "chosen": good, "rejected": bad},
        "sharegpt": {"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": good}, "rejected": {"from": "gpt", "value": bad}},
        "trl": {"prompt": q, "chosen": good, "rejected": bad},
        "trl-messages": {"prompt": [user], "chosen": [answer(good)], "rejected": [answer(bad)]},
        "trl-implicit": {"chosen": [user, answer(good)], "rejected": [user, answer(bad)]},
    }  # fmt: skip
    template = load_template("chinese-vicuna-chat", tokenizer)
    loaded = {name: load_preference_dataset(write_jsonl(tmp_path / f"{name}.jsonl", [r]), tokenizer, template, 256).to_list() for name, r in same.items()}  # fmt: skip
    [[chosen, rejected]] = [(p["input_ids"][0], p["input_ids"][1]) for p in loaded["alpaca"]]
    assert all(v == loaded["alpaca"] for v in loaded.values())
    labels = loaded["alpaca"][0]["labels"]
    n = prompt_length(labels[0])
    prompt_text = "".join(s.text for s in template.chat_segments([user]))
    assert chosen[:n] == rejected[:n] == [tokenizer.bos_token_id, *tokenizer(prompt_text, add_special_tokens=False)["input_ids"]]
    assert chosen.count(tokenizer.bos_token_id) == 1 and chosen[-1] == rejected[-1] == tokenizer.eos_token_id
    assert labels[0][:n] == [IGNORE_INDEX] * n and labels[0][n:] == chosen[n:] and labels[1][n:] == rejected[n:]
    whole = tokenizer(prompt_text + good + "\n\n", add_special_tokens=False)["input_ids"]
    assert chosen[1:-1] == whole  # the answer continues the prompt (no dummy-prefix space)

    # a system prompt and history: only the last answer is trained, the same in both layouts
    history = {"instruction": q, "input": "", "system": system, "history": [["你好", "你好！"]], "chosen": good, "rejected": bad}
    conv = [
        {"from": "system", "value": system},
        {"from": "human", "value": "你好"},
        {"from": "gpt", "value": "你好！"},
        {"from": "human", "value": q},
    ]
    sharegpt = {"conversations": conv, "chosen": {"from": "gpt", "value": good}, "rejected": {"from": "gpt", "value": bad}}
    a = load_preference_dataset(write_jsonl(tmp_path / "h1.jsonl", [history]), tokenizer, template, 256).to_list()
    b = load_preference_dataset(write_jsonl(tmp_path / "h2.jsonl", [sharegpt]), tokenizer, template, 256).to_list()
    assert a == b
    trained = [t for t in a[0]["labels"][0] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained).replace(" ", "").startswith(good[:2])  # only the last answer, not 你好！
    assert "你好" not in tokenizer.decode(trained)

    # KTO: one answer each, split by its flag
    kto = [
        {"instruction": q, "input": "", "output": good, "kto_tag": True},
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": bad}], "kto_tag": False},
        {"prompt": q, "completion": good, "label": True},
    ]
    samples = load_kto_dataset(write_jsonl(tmp_path / "kto.jsonl", kto), tokenizer, template, 256)
    assert [s["label"] for s in samples] == [True, True, False]
    assert [s["input_ids"].tolist() for s in samples] == [chosen, chosen, rejected]


def test_long_pairs_lose_prompt_tokens_first_or_are_dropped_with_a_count(tokenizer, tmp_path: Path, caplog) -> None:
    template = load_template("alpaca", tokenizer)
    records = [
        {"instruction": "很长的问题" * 20, "input": "", "chosen": "好。", "rejected": "不好。"},
        {"instruction": "问题", "input": "", "chosen": "答案" * 80, "rejected": "短。"},
        {"instruction": "问题", "input": "", "chosen": "一样。", "rejected": "一样。"},
    ]
    full = load_preference_dataset(write_jsonl(tmp_path / "full.jsonl", records[:1]), tokenizer, template, 4096).to_list()[0]
    with caplog.at_level("INFO"):
        [cut] = load_preference_dataset(write_jsonl(tmp_path / "p.jsonl", records), tokenizer, template, 48).to_list()
    assert max(len(x) for x in cut["input_ids"]) == 48
    for whole, short, labels in zip(full["input_ids"], cut["input_ids"], cut["labels"], strict=True):
        n = prompt_length(labels)
        assert short[0] == tokenizer.bos_token_id and short[n:] == whole[-(len(short) - n) :]  # answers whole
        assert short[1:n] == whole[len(whole) - len(short) + 1 : len(whole) - len(short) + n]  # the prompt's end kept
    log = caplog.text
    assert "3 records → 1 samples; 1 truncated" in log
    assert "1 dropped: answers alone longer than cutoff_len" in log and "1 dropped: chosen and rejected identical" in log


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"instruction": "q", "chosen": "a"}, "not a preference record in a known format"),
        ({"instruction": "q", "input": "", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a non-empty list of messages"),
        (
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}],
            },
            "share 0 messages",
        ),
        ({"prompt": "q", "completion": "a", "label": "yes"}, "'label' must be true or false"),
    ],
)
def test_a_malformed_record_is_one_line_naming_file_and_record(record: dict, says: str, tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}, record])
    template = load_template("alpaca", tokenizer)
    loader = load_kto_dataset if "label" in record else load_preference_dataset
    with pytest.raises(UserError) as err:
        loader(path, tokenizer, template, 256)
    assert str(err.value).startswith(f"{path}:2: ") and says in str(err.value) and "\n" not in str(err.value)


def test_the_recipe_refuses_a_malformed_record_and_a_small_kto_batch_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}, {"prompt": "x"}])
    base = ["finetune_dpo.py", "--base_model", str(tiny_model_dir), "--data_path", str(data)]
    proc = run_script(*base, "--output_dir", str(tmp_path / "a"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {data}:2: not a preference record")
    assert "Traceback" not in proc.stderr
    proc = run_script(*base, "--output_dir", str(tmp_path / "b"), "--pref_loss", "kto", "--micro_batch_size", "1", "--batch_size", "4")
    assert proc.returncode == 2 and "the minimum is 2" in proc.stderr.strip().splitlines()[-1]


def policy_with_adapter(tiny_model_dir: Path, tokenizer, seed: int = 0, dropout: float = 0.0):
    from chinese_vicuna.model.build import load_checked_model

    torch.manual_seed(seed)
    model = add_lora(load_checked_model(str(tiny_model_dir), tokenizer, "fp32"), 8, 16, dropout, "all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def sample_pairs(tokenizer, tmp_path_factory: pytest.TempPathFactory):
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_records())
    return load_preference_dataset(path, tokenizer, load_template("alpaca", tokenizer), 256)


def test_packed_and_padded_pairs_give_the_same_log_probs(tiny_model_dir: Path, tokenizer, sample_pairs) -> None:
    model = policy_with_adapter(tiny_model_dir, tokenizer)
    batch = [sample_pairs[i] for i in range(6)]
    with torch.no_grad():
        packed, packed_counts = sequence_log_probs(model, PackedCollator()(batch))
        padded, padded_counts = sequence_log_probs(model, PaddingCollator(tokenizer.pad_token_id)(batch))
    assert packed_counts.tolist() == padded_counts.tolist()
    torch.testing.assert_close(packed / packed_counts, padded / padded_counts, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed, padded, atol=1e-5 * float(packed.abs().max()), rtol=0)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [True, False])
def test_log_probs_through_lm_head_chunks_equal_the_unchunked_ones(packed: bool, tiny_model_dir: Path, tokenizer, sample_pairs) -> None:
    """--loss_chunk_size: the per-sequence log-probabilities (7 rows of logits at a time, so several
    chunks, some across two sequences) equal those of the model's own logits to 1e-6 of their size in fp32, and the
    LoRA gradients of a weighted sum to 1e-5 of theirs (fp32 matmuls of other row counts round apart)."""
    model = policy_with_adapter(tiny_model_dir, tokenizer)
    collate = PackedCollator() if packed else PaddingCollator(tokenizer.pad_token_id)
    batch = collate([sample_pairs[i] for i in range(6)])
    results = {}
    for chunk in (0, 7):
        model.zero_grad()
        log_probs, counts = sequence_log_probs(model, batch, chunk)
        (log_probs * torch.arange(1, log_probs.numel() + 1)).sum().backward()  # a different weight per sequence
        results[chunk] = (log_probs.detach(), counts, _grads(model))
    (whole, whole_counts, whole_grads), (chunked, chunked_counts, chunked_grads) = results[0], results[7]
    assert chunked_counts.tolist() == whole_counts.tolist() and sum(whole_counts.tolist()) > 3 * 7  # many chunks, across sequences
    torch.testing.assert_close(chunked, whole, atol=1e-6 * float(whole.abs().max()), rtol=0)
    scale = max(float(g.abs().max()) for g in whole_grads.values())
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5 * scale, rtol=0, msg=name)


@pytest.mark.parametrize("head", ["linear", "biased"])
def test_token_log_probs_and_their_gradients_equal_log_softmax(head: str) -> None:
    """`lm_head_token_log_probs` (what GRPO's per-token ratios take) against log_softmax of the
    whole logits: values to 1e-6, the gradients of hidden and of a trained head to 1e-5, for a
    plain head (fused pass) and any other (per-chunk checkpointing)."""
    from chinese_vicuna.train.losses import lm_head_token_log_probs

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 50, bias=head == "biased")
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    weights = torch.randn(23)  # an incoming gradient that differs per token
    expected = torch.log_softmax(lm_head(hidden), dim=-1).gather(1, targets[:, None]).squeeze(1)
    (expected * weights).sum().backward()
    want = (hidden.grad.clone(), lm_head.weight.grad.clone())
    hidden.grad, lm_head.weight.grad = None, None
    got = lm_head_token_log_probs(hidden, lm_head, targets, chunk=5)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden.grad, want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lm_head.weight.grad, want[1], atol=1e-5, rtol=0)


def test_split_sequences_give_the_joint_loss_and_gradients(tiny_model_dir: Path, tokenizer, sample_pairs) -> None:
    """--pref_split_sequences: chosen and rejected in separate batches, each run again in backward.
    The loss and the LoRA gradients equal those of the joint packed batch (no dropout: the same
    function; 1e-5 of their size, fp32 sums of rows in other orders), and with dropout the
    recomputation draws the masks of the no-grad pass (the gradients of one forward with grad)."""
    from chinese_vicuna.train.packing import sequence_collator
    from chinese_vicuna.train.preference import PreferenceCollator, parts_log_probs

    model = policy_with_adapter(tiny_model_dir, tokenizer).train()
    features = [sample_pairs[i] for i in range(6)]
    joint_batch = PreferenceCollator(sequence_collator(True, tokenizer))(features)
    split_batch = PreferenceCollator(sequence_collator(True, tokenizer), split=True)(features)
    assert set(split_batch) == {"sequence_parts"} and len(split_batch["sequence_parts"]) == 2

    def loss_and_grads(log_probs, counts):
        chosen, rejected = log_probs.view(-1, 2).unbind(1)
        ref = (chosen.detach() - 1.0, rejected.detach() + 1.0)  # a reference the policy differs from
        out = pair_loss("sigmoid", 0.1, chosen, rejected, *counts.view(-1, 2).unbind(1), *ref)
        loss = out.loss + 0.5 * (-(chosen / counts.view(-1, 2)[:, 0]).mean())  # --pref_ftx: a second gradient path
        model.zero_grad()
        loss.backward()
        return float(loss.detach()), _grads(model)

    joint_loss, joint = loss_and_grads(*sequence_log_probs(model, joint_batch, 7))
    split_loss, split = loss_and_grads(*parts_log_probs(model, split_batch["sequence_parts"], 7))
    assert abs(joint_loss - split_loss) < 1e-6 * abs(joint_loss)
    scale = max(float(g.abs().max()) for g in joint.values())
    assert all(torch.allclose(split[n], g, atol=1e-5 * scale, rtol=0) for n, g in joint.items())

    model = policy_with_adapter(tiny_model_dir, tokenizer, dropout=0.3).train()  # the recomputation must draw the same masks
    parts = split_batch["sequence_parts"]
    torch.manual_seed(5)
    direct = torch.stack([sequence_log_probs(model, part, 7)[0] for part in parts], dim=1).reshape(-1)
    with_grad_loss, with_grad = loss_and_grads(direct, parts_log_probs(model, parts, 7)[1].detach())
    torch.manual_seed(5)
    recomputed_loss, recomputed = loss_and_grads(*parts_log_probs(model, parts, 7))
    torch.manual_seed(6)
    other_masks_loss, _ = loss_and_grads(*parts_log_probs(model, parts, 7))
    assert recomputed_loss == with_grad_loss != other_masks_loss  # dropout is on, and drew the same masks
    scale = max(float(g.abs().max()) for g in with_grad.values())
    assert all(torch.allclose(recomputed[n], g, atol=1e-6 * scale, rtol=0) for n, g in with_grad.items())


def trl_batch(pairs: list[dict], tokenizer) -> dict:
    """Our token ids of the pairs, as TRL's collator lays them out (prompt, chosen, rejected)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = []
    for pair in pairs:
        chosen, rejected = (x.tolist() for x in pair["input_ids"])
        n = prompt_length(pair["labels"][0])
        examples.append({"prompt_ids": chosen[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]})
    return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)


def test_sigmoid_loss_and_rewards_equal_trl_dpo_trainer(tiny_model_dir: Path, tokenizer, sample_pairs, tmp_path: Path) -> None:
    """The same model, adapter and token ids: our packed forward and loss against TRL's DPOTrainer
    (its own collator, forward and `compute_loss`), per pair and for a batch. TRL continues a PEFT
    model's adapter with a frozen copy named "ref" as its reference, as we do with --lora_weights:
    the policy is moved away from it, and ours uses the same "ref" adapter."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    beta = 0.1
    model = policy_with_adapter(tiny_model_dir, tokenizer)
    config = DPOConfig(output_dir=str(tmp_path), beta=beta, report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=4)
    dummy = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = DPOTrainer(model=model, args=config, train_dataset=dummy, processing_class=tokenizer)
    assert "ref" in model.peft_config
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    pairs = [sample_pairs[i] for i in range(4)]
    ours = []
    with torch.no_grad():
        for batch in ([p] for p in pairs):
            logps, counts = sequence_log_probs(model, PackedCollator()(batch))
            with reference_model(model, "ref"):
                ref, _ = sequence_log_probs(model, PackedCollator()(batch))
            ours.append(pair_loss("sigmoid", beta, logps[0::2], logps[1::2], counts[0::2], counts[1::2], ref[0::2], ref[1::2]))
    for pair, mine in zip(pairs, ours, strict=True):
        with torch.no_grad():
            loss = trainer.compute_loss(model, trl_batch([pair], tokenizer))
        theirs = trainer._metrics["eval"]
        assert abs(float(loss) - float(mine.loss)) < 1e-5
        assert abs(theirs["rewards/chosen"][-1] - float(mine.chosen_rewards[0])) < 1e-5
        assert abs(theirs["rewards/rejected"][-1] - float(mine.rejected_rewards[0])) < 1e-5
        assert abs(float(mine.chosen_rewards[0])) > 1e-3  # the policy moved away from its reference
    with torch.no_grad():
        batch_loss = trainer.compute_loss(model, trl_batch(pairs, tokenizer))
    assert abs(float(batch_loss) - sum(float(o.loss) for o in ours) / len(ours)) < 1e-5


def test_orpo_odds_ratio_equals_trl() -> None:
    """ORPO's odds-ratio term against TRL's `ORPOTrainer.odds_ratio_loss` on the same per-token
    average log-probabilities (including near 0, where a naive log(1 - p) is -inf)."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    beta = 0.1
    counts = torch.tensor([3, 7, 12, 40])
    chosen = torch.tensor([-0.5, -3.0, -1e-4, -20.0]) * counts
    rejected = torch.tensor([-2.0, -0.1, -4.0, -1e-6]) * counts
    ours = pair_loss("orpo", beta, chosen, rejected, counts, counts)
    stub = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(stub, chosen / counts, rejected / counts)
    nll = (-chosen / counts).mean()
    assert torch.isfinite(ours.loss)
    assert abs(float(ours.loss) - float(nll - losses.mean())) < 1e-6
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)


def test_reference_from_an_sft_adapter_is_that_adapter_and_only_the_trained_one_is_saved(
    tiny_model_dir: Path, tokenizer, sample_pairs, tmp_path: Path
) -> None:
    """The starting adapter loaded again, frozen: before any step the reference equals the policy
    (rewards 0); it is not the bare base; its switch leaves the trained adapter trainable; the
    saved folder holds only the trained adapter, which stock PEFT loads."""
    start = tmp_path / "start"
    policy_with_adapter(tiny_model_dir, tokenizer).save_pretrained(str(start))
    from chinese_vicuna.model.adapters import load_lora
    from chinese_vicuna.model.build import load_checked_model

    model = load_lora(load_checked_model(str(tiny_model_dir), tokenizer, "fp32"), str(start), is_trainable=True)
    add_reference_adapter(model, str(start))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    batch = PackedCollator()([sample_pairs[i] for i in range(3)])
    model.train()
    with torch.no_grad():
        policy, _ = sequence_log_probs(model, batch)
        with reference_model(model, REFERENCE_ADAPTER):
            ref, _ = sequence_log_probs(model, batch)
        with reference_model(model, None):
            base, _ = sequence_log_probs(model, batch)
    assert model.training and {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(ref, policy, atol=0, rtol=0)
    assert (base - policy).abs().min() > 1e-3
    model.save_pretrained(str(tmp_path / "saved"))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (
        load_file(str(tmp_path / "saved" / "adapter_model.safetensors")).keys()
        == load_file(str(start / "adapter_model.safetensors")).keys()
    )


def test_precomputed_reference_gives_the_same_loss(tiny_model_dir: Path, tokenizer, sample_pairs, tmp_path: Path) -> None:
    from chinese_vicuna.args import TrainArguments, parse_args
    from chinese_vicuna.train.packing import sequence_collator
    from chinese_vicuna.train.preference import PreferenceCollator, PreferenceTrainer, WithReference, precompute_reference
    from chinese_vicuna.train.trainer import build_trainer

    (train_args,) = parse_args((TrainArguments,), ["--output_dir", str(tmp_path), "--report_to", "none"])
    model = policy_with_adapter(tiny_model_dir, tokenizer)
    collator = PreferenceCollator(sequence_collator(True, tokenizer))
    trainer = build_trainer(PreferenceTrainer, model, tokenizer, train_args, sample_pairs, None, collator, loss_type="sigmoid", beta=0.1)
    stored = WithReference(sample_pairs, precompute_reference(trainer, sample_pairs, collator, 4))
    assert stored.ref_log_probs.shape == (len(sample_pairs), 2)
    model.train()
    with torch.no_grad():
        live = trainer.compute_loss(model, collator([sample_pairs[i] for i in range(5)]))
        cached = trainer.compute_loss(model, collator([stored[i] for i in range(5)]))
    assert abs(float(live) - float(cached)) < 1e-6


def test_precomputed_reference_is_stored_with_the_pairs_and_read_back(tiny_model_dir: Path, tokenizer, tmp_path: Path, monkeypatch) -> None:
    """--precompute_ref_log_probs: computed once for the tokenized store (train and held-out pairs
    together) and stored in its cache folder; a second run on the same data and reference computes
    nothing and trains on exactly the stored values; another reference (an SFT adapter) computes
    and stores its own."""
    import numpy as np

    adapter = tmp_path / "adapter"
    policy_with_adapter(tiny_model_dir, tokenizer).save_pretrained(str(adapter))
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records())
    computed: list = []
    used: list = []
    compute, with_reference = finetune_dpo.precompute_reference, finetune_dpo.WithReference
    monkeypatch.setattr(finetune_dpo, "precompute_reference", lambda *a: computed.append(compute(*a)) or computed[-1])
    monkeypatch.setattr(finetune_dpo, "WithReference", lambda samples, ref: used.append(ref) or with_reference(samples, ref))

    def run(name: str, *extra: str) -> tuple[list, list]:
        computed.clear()
        used.clear()
        flags = ["--precompute_ref_log_probs", "true", "--max_steps", "2", "--val_set_size", "3", "--cache_dir", str(tmp_path / "cache")]
        finetune_dpo.main(dpo_args(tiny_model_dir, data, tmp_path / name, *flags, "--save_steps", "2", *extra))
        return list(computed), list(used)

    def stored() -> dict[str, np.ndarray]:
        return {p.name: np.load(p) for p in (tmp_path / "cache").glob("*/reference-log-probs/*.npy")}

    first, first_used = run("a")
    assert len(first) == 1 and first[0].shape == (PROMPTS, 2)  # one pass over the whole store
    [(name, values)] = stored().items()
    assert np.array_equal(values, first[0])  # stored exactly as computed
    train, val = first_used
    assert train.shape == (PROMPTS - 3, 2) and val.shape == (3, 2)
    assert sorted(map(tuple, np.concatenate([train, val]).tolist())) == sorted(map(tuple, values.tolist()))

    again, again_used = run("b")
    assert again == []  # nothing computed: read back
    assert all(np.array_equal(x, y) for x, y in zip(again_used, first_used, strict=True))

    other, _ = run("c", "--lora_weights", str(adapter))
    assert len(other) == 1  # another reference: computed and stored beside the first
    assert len(stored()) == 2 and np.array_equal(stored()[name], values)
    assert np.abs(other[0] - values).min() > 1e-4
    assert (tmp_path / "c" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- the tiny model learns its pairs


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter that answers Y (each prompt's sample answer) to the PROMPTS prompts."""
    folder = tmp_path_factory.mktemp("sft")
    data = write_jsonl(folder / "sft.jsonl", read_jsonl(SAMPLE_INSTRUCT)[:PROMPTS])
    out = folder / "adapter"
    finetune.main([
        "--base_model", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out),
        "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0", "--lora_target_modules", "all-linear",
        "--learning_rate", "3e-3", "--warmup_steps", "0", "--micro_batch_size", "4", "--batch_size", "4",
        "--num_epochs", "50", "--val_set_size", "0", "--save_steps", "1000", "--logging_steps", "50", "--disable_tqdm", "true",
    ])  # fmt: skip
    return out


def dpo_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--base_model", str(base), "--data_path", str(data), "--output_dir", str(out),
        "--learning_rate", "3e-3", "--warmup_steps", "0", "--micro_batch_size", "4", "--batch_size", "4",
        "--logging_steps", "5", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def answers_and_margins(base: Path, adapter: Path, tokenizer) -> tuple[list[str], list[float]]:
    """Greedy answers to the PROMPTS prompts and log p(X) - log p(Y), with stock PEFT loading the adapter."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    template = load_template("alpaca", tokenizer)
    records = pair_records()
    answers = [
        generate_answer(model, tokenizer, template, r["instruction"], r["input"], DecodingArguments(max_new_tokens=40)) for r in records
    ]
    path = write_jsonl(adapter.parent / f"{adapter.name}-probe.jsonl", records)
    pairs = load_preference_dataset(path, tokenizer, template, 256, use_cache=False)
    with torch.no_grad():
        logps, _ = sequence_log_probs(model, PaddingCollator(tokenizer.pad_token_id)(list(pairs)))
    return answers, (logps[0::2] - logps[1::2]).tolist()


def share(values: list[bool]) -> float:
    return sum(values) / len(values)


def test_dpo_after_sft_prefers_the_chosen_answers(tiny_model_dir: Path, sft_adapter: Path, tokenizer, tmp_path: Path) -> None:
    """SFT taught Y; DPO with the SFT adapter as its reference, --pref_ftx 1: X gets the higher
    log-probability and is the greedy answer for ≥ 90% of prompts; the held-out pairs reach
    rewards/accuracies 1.0; the adapter and its checkpoints load in stock PEFT with the template."""
    answers, margins = answers_and_margins(tiny_model_dir, sft_adapter, tokenizer)
    assert share([a == r["rejected"] for a, r in zip(answers, pair_records(), strict=True)]) >= 0.9  # SFT answers Y
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records())
    out = tmp_path / "dpo"
    flags = ["--lora_weights", str(sft_adapter), "--pref_ftx", "1", "--pref_beta", "0.5", "--num_epochs", "12"]
    finetune_dpo.main(dpo_args(tiny_model_dir, data, out, *flags, "--val_set_size", "2", "--eval_steps", "6", "--save_steps", "12"))
    answers, margins = answers_and_margins(tiny_model_dir, out, tokenizer)
    assert share([m > 0 for m in margins]) >= 0.9, margins
    assert share([a == CHOSEN for a in answers]) >= 0.9, answers
    log = read_jsonl(out / "trainer_log.jsonl")
    evals = [e for e in log if "eval_rewards/accuracies" in e]
    assert evals and evals[-1]["eval_rewards/accuracies"] == 1.0
    train = [e for e in log if "rewards/chosen" in e and "loss" in e]
    assert {"rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(train[-1])
    assert (out / "prompt_template.json").is_file() and not (out / REFERENCE_ADAPTER).exists()
    checkpoint = out / "checkpoint-12"
    assert (checkpoint / "prompt_template.json").is_file() and not (checkpoint / REFERENCE_ADAPTER).exists()
    assert (
        load_file(str(checkpoint / "adapter_model.safetensors")).keys() == load_file(str(sft_adapter / "adapter_model.safetensors")).keys()
    )
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(checkpoint))
    # merged as an SFT adapter is: verified logits, its template carried as the tokenizer's chat_template
    from transformers import AutoTokenizer

    import merge_lora

    merged = tmp_path / "merged"
    merge_lora.main(["--base_model", str(tiny_model_dir), "--lora_weights", str(out), "--output_dir", str(merged), "--verify"])
    assert json.loads((merged / "manifest.json").read_text())["verify"]["ok"]
    merged_tokenizer = AutoTokenizer.from_pretrained(str(merged))
    prompt = [{"role": "user", "content": "一年有几个季节？"}]
    rendered = merged_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith(load_template("alpaca").instruction_prompt("一年有几个季节？"))


def test_plain_dpo_after_sft_raises_the_chosen_log_probs(tiny_model_dir: Path, sft_adapter: Path, tokenizer, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records())
    out = tmp_path / "dpo"
    finetune_dpo.main(dpo_args(tiny_model_dir, data, out, "--lora_weights", str(sft_adapter), "--pref_beta", "0.1", "--num_epochs", "15", "--val_set_size", "0"))  # fmt: skip
    _, margins = answers_and_margins(tiny_model_dir, out, tokenizer)
    assert share([m > 0 for m in margins]) >= 0.9, margins


@pytest.mark.parametrize("flag", ["--load_in_8bit", "--load_in_4bit"])
def test_kbit_dpo_after_sft_raises_the_chosen_and_saves_a_stock_adapter(
    flag: str, tiny_model_dir: Path, sft_adapter: Path, tmp_path: Path
) -> None:
    """QLoRA / 8-bit DPO on the CPU (bitsandbytes): the base quantized, the SFT adapter trained on
    and loaded again as the frozen reference. The first step is log 2 (policy = reference), the loss
    falls and the chosen answers' log-probabilities rise; the adapter loads in stock PEFT on the
    unquantized base, with the SFT adapter's tensors, moved away from them."""
    import math

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records())
    out = tmp_path / "out"
    flags = ["--lora_weights", str(sft_adapter), flag, "true", "--lora_dropout", "0", "--pref_beta", "0.5"]  # no dropout: step 1 is exact
    flags += ["--max_steps", "6", "--logging_steps", "1", "--val_set_size", "0"]
    finetune_dpo.main(dpo_args(tiny_model_dir, data, out, *flags, "--save_steps", "6"))
    log = [e for e in read_jsonl(out / "trainer_log.jsonl") if "loss" in e and "logps/chosen" in e]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]
    # 4-bit: policy = reference to fp32 rounding. 8-bit: bitsandbytes runs LLM.int8 by another path in
    # training mode (the policy) than in eval mode (the reference), both with inputs cast to fp16
    # (2^-10 relative): the sequences' summed log-probabilities differ by a few 1e-3.
    tolerance = 1e-2 if flag == "--load_in_8bit" else 1e-4
    assert abs(log[0]["loss"] - math.log(2)) < tolerance and abs(log[0]["rewards/margins"]) < tolerance, log[0]
    assert log[-1]["loss"] < log[0]["loss"] - 0.05, log
    assert log[-1]["logps/chosen"] > log[0]["logps/chosen"] and log[-1]["rewards/accuracies"] == 1.0, log
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out))
    assert not any("Linear4bit" in type(m).__name__ or "Linear8bit" in type(m).__name__ for m in model.modules())
    trained, start = load_file(str(out / "adapter_model.safetensors")), load_file(str(sft_adapter / "adapter_model.safetensors"))
    assert trained.keys() == start.keys() and max(float((trained[k] - start[k]).abs().max()) for k in start) > 1e-4


def test_orpo_from_the_bare_base_answers_the_chosen(tiny_model_dir: Path, tokenizer, tmp_path: Path) -> None:
    """ORPO needs no reference; its SFT term teaches X from the bare base."""
    records = [{**r, "chosen": r["rejected"], "rejected": CHOSEN} for r in pair_records()]  # per-prompt answers to learn
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "orpo"
    lora = ["--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0", "--lora_target_modules", "all-linear"]
    finetune_dpo.main(dpo_args(tiny_model_dir, data, out, "--pref_loss", "orpo", "--num_epochs", "50", "--val_set_size", "0", *lora))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out)).eval()
    template = load_template("alpaca", tokenizer)
    answers = [
        generate_answer(model, tokenizer, template, r["instruction"], r["input"], DecodingArguments(max_new_tokens=40)) for r in records
    ]
    assert share([a == r["chosen"] for a, r in zip(answers, records, strict=True)]) >= 0.9, answers


@pytest.mark.parametrize("loss", ["ipo", "hinge", "simpo", "kto"])
def test_every_loss_and_format_trains(loss: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A folder with a file of every pair format (or every KTO format) trains two steps with a chat template."""
    q = [r["instruction"] for r in read_jsonl(SAMPLE_INSTRUCT)[:4]]
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    files = {
        "alpaca": [
            {"instruction": x, "input": "", "system": "你好", "history": [["在吗", "在"]], "chosen": "是", "rejected": "否"} for x in q
        ],
        "sharegpt": [
            {
                "conversations": [{"from": "human", "value": x}],
                "chosen": {"from": "gpt", "value": "是"},
                "rejected": {"from": "gpt", "value": "否"},
            }
            for x in q
        ],
        "trl": [{"prompt": [user(x)], "chosen": [bot("是")], "rejected": "否"} for x in q],
        "trl-implicit": [{"chosen": [user(x), bot("是")], "rejected": [user(x), bot("否")]} for x in q],
    }
    if loss == "kto":
        files = {
            "alpaca-kto": [{"instruction": x, "input": "", "output": "是", "kto_tag": i % 2 == 0} for i, x in enumerate(q)],
            "sharegpt-kto": [
                {"conversations": [{"from": "human", "value": x}, {"from": "gpt", "value": "否"}], "kto_tag": False} for x in q
            ],
            "trl-kto": [{"prompt": x, "completion": "是", "label": True} for x in q],
        }
    for name, records in files.items():
        write_jsonl(tmp_path / "data" / f"{name}.jsonl", records)
    out = tmp_path / "out"
    flags = [
        "--pref_loss",
        loss,
        "--prompt_template",
        "chinese-vicuna-chat",
        "--max_steps",
        "2",
        "--val_set_size",
        "2",
        "--eval_steps",
        "2",
    ]
    if loss in ("ipo", "kto"):
        flags += ["--pref_split_sequences", "true"]  # each answer (KTO: and its mismatched one) through the model apart
    finetune_dpo.main(dpo_args(tiny_model_dir, tmp_path / "data", out, *flags, "--save_steps", "2", "--logging_steps", "1"))
    log = read_jsonl(out / "trainer_log.jsonl")
    assert [e["step"] for e in log if "loss" in e] == [1, 2] and all(torch.isfinite(torch.tensor(e["loss"])) for e in log if "loss" in e)
    assert any("eval_rewards/chosen" in e or "eval_rewards/rejected" in e for e in log)
    if loss == "kto":
        assert all(e["kl"] >= 0 for e in log if "kl" in e)
    assert (out / "adapter_model.safetensors").is_file()


def test_launcher_passes_the_sft_adapter_and_the_loss() -> None:
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("TOT_CUDA", "PRECISION", "LORA_PATH", "DS_CONFIG")}
    cmd = subprocess.run(
        ["bash", str(REPO / "scripts" / "finetune_dpo.sh")], env={**env, "DRY_RUN": "1", "PREF_LOSS": "orpo"}, capture_output=True, text=True, check=True
    ).stdout.split()  # fmt: skip
    assert cmd[:3] == ["CUDA_VISIBLE_DEVICES=0", "python", "finetune_dpo.py"]
    for flag, value in (("--lora_weights", "lora-Vicuna"), ("--pref_loss", "orpo"), ("--precision", "8bit")):
        assert cmd[cmd.index(flag) + 1] == value


def test_trl_flag_names_are_aliases_and_a_bad_loss_is_one_line(tmp_path: Path) -> None:
    from chinese_vicuna.args import TrainArguments, parse_args

    common = ["--output_dir", str(tmp_path), "--report_to", "none"]
    prefs, _ = parse_args((finetune_dpo.PreferenceArguments, TrainArguments), ["--beta", "0.3", "--loss_type", "ipo", *common])
    assert (prefs.pref_beta, prefs.pref_loss) == (0.3, "ipo")
    with pytest.raises(UserError, match="--pref_loss dpo: pick one of sigmoid, ipo, hinge, orpo, simpo, kto"):
        parse_args((finetune_dpo.PreferenceArguments, TrainArguments), ["--pref_loss", "dpo", *common])
