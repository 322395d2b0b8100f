"""Padding-free packing: same loss and gradients as padded batches, no attention across samples."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chinese_vicuna.data.collate import PackedCollator, PaddingCollator
from chinese_vicuna.data.encode import IGNORE_INDEX, tokenize_instructions
from chinese_vicuna.data.records import read_records, validate_instruction
from chinese_vicuna.model.adapters import add_lora
from chinese_vicuna.model.build import load_for_inference
from chinese_vicuna.prompts import load_template
from chinese_vicuna.train.losses import chunked_cross_entropy
from chinese_vicuna.train.packing import (
    PACKED_SDPA,
    TokenBudgetBatchSampler,
    _last_llama_layer,
    packed_forward,
    packed_loss,
    token_budget_batches,
    use_packed_attention,
)
from conftest import memorize_args, read_jsonl, run_script

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "instruct" / "data_sample.jsonl"


@pytest.fixture(scope="module", params=["sdpa-mask", "sdpa-per-sample", "eager"])
def model_and_samples(tiny_model_dir: Path, request: pytest.FixtureRequest) -> tuple:
    """The generic block-diagonal mask path, the per-sample sdpa PackedTrainer switches to, and
    eager attention (--attn_implementation eager), whose mask transformers builds from position_ids."""
    from chinese_vicuna.model.build import load_checked_model
    from chinese_vicuna.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    attn = "eager" if request.param == "eager" else None
    model = load_checked_model(str(tiny_model_dir), tokenizer, "fp32", attn_implementation=attn)
    assert model.config._attn_implementation == (attn or "sdpa")
    torch.manual_seed(0)
    model = add_lora(model, 8, 16, 0.0, "all-linear")
    if request.param == "sdpa-per-sample":
        use_packed_attention(model)
        assert model.get_base_model().config._attn_implementation == PACKED_SDPA
    # LoRA B starts at zero; give it values so LoRA gradients flow through both factors.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    records = [validate_instruction(r) for r in read_records(SAMPLE)[:8]]
    samples = tokenize_instructions(records, tokenizer, load_template("alpaca", tokenizer), 256)
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) > 3, lengths  # different lengths, so the padded batch has padding
    return model, tokenizer, samples


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def test_packed_loss_and_grads_equal_unpacked_with_accumulation(model_and_samples: tuple) -> None:
    model, tokenizer, samples = model_and_samples
    model.train()
    pad = PaddingCollator(tokenizer.pad_token_id)
    # Unpacked: HF's own loss over one padded batch of 8 = per-token mean over all trainable tokens.
    batch = pad(samples)
    ref = model(**batch).loss
    ref.backward()
    ref_grads = _grads(model)
    n_items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    # Packed: two micro-batches of 4 (gradient accumulation), each divided by the whole count,
    # exactly as Trainer passes num_items_in_batch.
    packed_total = 0.0
    packer = PackedCollator()
    for micro in (samples[:4], samples[4:]):
        inputs = packer(micro)
        assert inputs["input_ids"].shape == (1, sum(len(s["input_ids"]) for s in micro))  # no padding at all
        assert int((inputs["shift_labels"] != IGNORE_INDEX).sum()) == int((pad(micro)["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss, _, _ = packed_loss(model, inputs, torch.tensor(n_items))
        loss.backward()
        packed_total += loss.item()
    grads = _grads(model)
    assert abs(packed_total - ref.item()) < 1e-4, (packed_total, ref.item())
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-3, msg=name)


@contextlib.contextmanager
def rows_seen(**modules: torch.nn.Module) -> Iterator[dict[str, int]]:
    """How many rows each named module's forward received (its last call)."""
    rows: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: rows.__setitem__(name, i[0].shape[1])) for name, m in modules.items()]
    try:
        yield rows
    finally:
        for hook in hooks:
            hook.remove()


def test_last_layer_runs_only_at_trained_positions(model_and_samples: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last LLaMA layer's query, o_proj and MLP see only the positions with a target, also
    when they are not one suffix per sample (chat turns); loss and gradients equal the full layer's."""
    model, _, samples = model_and_samples
    model.train()
    inputs = PackedCollator()(samples[:3])
    targets = inputs["shift_labels"][0]
    trained = (targets != IGNORE_INDEX).nonzero().flatten()
    targets[trained[1::3]] = IGNORE_INDEX  # holes: several spans per sample, like a multi-turn chat
    keep = int((targets != IGNORE_INDEX).sum())
    assert 0 < keep < targets.numel() // 2

    layer = _last_llama_layer(model)
    assert layer is not None
    with rows_seen(mlp=layer.mlp, q_proj=layer.self_attn.q_proj, k_proj=layer.self_attn.k_proj) as rows:
        loss, _, _ = packed_loss(model, inputs, torch.tensor(keep))
    assert rows == {"mlp": keep, "q_proj": keep, "k_proj": targets.numel()}
    loss.backward()
    grads = _grads(model)

    # A forward set on the instance (accelerate's device hooks do this) is left in charge, and kept.
    wrapper = functools.partial(type(layer).forward, layer)
    layer.forward = wrapper
    with rows_seen(mlp=layer.mlp) as rows, torch.no_grad():
        packed_loss(model, inputs, torch.tensor(keep))
    assert rows["mlp"] == targets.numel() and layer.forward is wrapper
    del layer.forward
    # Nearly every position trained (pretraining, --train_on_inputs): the layer runs whole.
    everything = {**inputs, "shift_labels": torch.where(inputs["position_ids"].roll(-1) == 0, IGNORE_INDEX, inputs["input_ids"].roll(-1))}
    with rows_seen(mlp=layer.mlp) as rows, torch.no_grad():
        packed_loss(model, everything)
    assert rows["mlp"] == targets.numel()

    monkeypatch.setattr("chinese_vicuna.train.packing._last_llama_layer", lambda model: None)
    full, _, _ = packed_loss(model, inputs, torch.tensor(keep))
    full.backward()
    torch.testing.assert_close(loss, full, atol=1e-5, rtol=0)
    for name, g in _grads(model).items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_no_attention_across_packed_samples(model_and_samples: tuple) -> None:
    model, _, samples = model_and_samples
    model.eval()
    a, b, c = samples[0], samples[1], samples[2]
    changed_b = {"input_ids": [b["input_ids"][0]] + [t + 7 for t in b["input_ids"][1:]], "labels": b["labels"]}
    packer = PackedCollator()

    def logits(*feats: dict) -> torch.Tensor:
        inputs = packer(list(feats))
        with torch.no_grad():
            return packed_forward(model, inputs).logits[0]

    la, lb = len(a["input_ids"]), len(b["input_ids"])
    ab = logits(a, b, c)
    ab2 = logits(a, changed_b, c)
    # The samples before and after the changed one are untouched...
    torch.testing.assert_close(ab2[:la], ab[:la], atol=1e-5, rtol=0)
    torch.testing.assert_close(ab2[la + lb :], ab[la + lb :], atol=1e-5, rtol=0)
    # ...the changed one did change, and each sample's logits equal those of the sample alone.
    assert (ab2[la : la + lb] - ab[la : la + lb]).abs().max() > 1e-2
    torch.testing.assert_close(ab[la + lb :], logits(c), atol=1e-4, rtol=0)
    torch.testing.assert_close(ab[la : la + lb], logits(b), atol=1e-4, rtol=0)


def test_chunked_cross_entropy_matches_torch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(37, 101, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    targets[[3, 10]] = IGNORE_INDEX
    ours = chunked_cross_entropy(logits, targets, chunk=8)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 37, 512, 600])
def test_cpu_bf16_causal_attention_matches_sdpa(n: int) -> None:
    """The bf16 matmul path (n <= 512) and the fp32 flash path (longer) against fp32 sdpa."""
    from chinese_vicuna.train.packing import CPU_MATMUL_ATTENTION_MAX_LEN, _causal_attention

    assert CPU_MATMUL_ATTENTION_MAX_LEN == 512
    torch.manual_seed(n)
    q, k, v = (torch.randn(1, 4, n, 32).to(torch.bfloat16).requires_grad_() for _ in range(3))
    out = _causal_attention(q, k, v, 0.0, 32**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, is_causal=True, scale=32**-0.5)
    ref.backward(grad_out.float())
    # bf16 rounding of inputs to the matmuls: a few 1e-2 on values of order 1.
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)
    for ours, theirs in zip((q, k, v), (q32, k32, v32), strict=True):
        torch.testing.assert_close(ours.grad.float(), theirs.grad, atol=5e-2, rtol=0)


def test_no_attention_across_packed_samples_bf16(tiny_model_dir: Path) -> None:
    """The bf16 CPU path training uses: per-sample matmul attention, still no cross-sample leak."""
    model, tokenizer = load_for_inference(str(tiny_model_dir), None, "bf16")
    use_packed_attention(model)
    model.eval()
    records = [validate_instruction(r) for r in read_records(SAMPLE)[:3]]
    a, b, c = tokenize_instructions(records, tokenizer, load_template("alpaca", tokenizer), 256)
    changed_b = {"input_ids": [b["input_ids"][0]] + [t + 7 for t in b["input_ids"][1:]], "labels": b["labels"]}
    packer = PackedCollator()

    def logits(*feats: dict) -> torch.Tensor:
        with torch.no_grad():
            return packed_forward(model, packer(list(feats))).logits[0].float()

    la, lb = len(a["input_ids"]), len(b["input_ids"])
    abc, abc2 = logits(a, b, c), logits(a, changed_b, c)
    # Row-wise bf16 matmuls may round differently with a different row count: bf16-level noise only.
    torch.testing.assert_close(abc2[:la], abc[:la], atol=3e-2, rtol=0)
    torch.testing.assert_close(abc2[la + lb :], abc[la + lb :], atol=3e-2, rtol=0)
    assert (abc2[la : la + lb] - abc[la : la + lb]).abs().max() > 0.5
    # Alone, a sample goes through sdpa's own kernel: a different bf16 rounding, same values.
    for packed, alone in ((abc[la + lb :], logits(c)), (abc[:la], logits(a))):
        torch.testing.assert_close(packed, alone, atol=0.1, rtol=0)
        assert (packed - alone).abs().mean() < 2e-2


def test_chunked_cross_entropy_bf16_logits() -> None:
    """bf16 logits (what lm_head gives under autocast): fp32 math inside, bf16 gradient out."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(50, 3000)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 3000, (50,))
    ours = chunked_cross_entropy(logits, targets, chunk=16)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref_logits = logits.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits, targets, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, ref_logits)
    assert ours.dtype == torch.float32 and g_ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(g_ours.float(), g_ref, atol=4e-3, rtol=1e-2)


# --------------------------------------------------------------------------------------------
# Token-budget rows (--packing_max_tokens)
# --------------------------------------------------------------------------------------------
def test_token_budget_batches_fill_rows_in_order() -> None:
    lengths = [5, 3, 4, 9, 2, 2, 12, 1]
    # Next-fit in the given order: 5+3 (then +4 > 10), 4, 9 (+2 > 10), 2+2 (+12 > 10), 12 alone (longer than the budget), 1.
    assert token_budget_batches(lengths, 10, range(8)) == [[0, 1], [2], [3], [4, 5], [6], [7]]
    assert token_budget_batches(lengths, 10, [7, 4, 5, 0, 1, 2, 3, 6]) == [[7, 4, 5, 0], [1, 2], [3], [6]]
    assert token_budget_batches(lengths, 100, range(8)) == [list(range(8))]


def test_token_budget_sampler_epochs_and_processes() -> None:
    lengths = [(7 * i) % 23 + 1 for i in range(40)]
    sampler = TokenBudgetBatchSampler(lengths, 30, seed=3)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        rows = list(sampler)
        assert len(rows) == len(sampler)
        assert sorted(i for row in rows for i in row) == list(range(40))  # every sample once per epoch
        assert all(sum(lengths[i] for i in row) <= 30 for row in rows)
        epochs.append(rows)
    # Same rows every epoch (so Trainer's steps per epoch hold), in another order.
    assert sorted(map(tuple, epochs[0])) == sorted(map(tuple, epochs[1])) and epochs[0] != epochs[1]
    # Two processes: the same rows split between them, equal counts (padded by repeating the first rows).
    n = len(sampler.batches)
    parts = []
    for rank in range(2):
        s = TokenBudgetBatchSampler(lengths, 30, seed=3, rank=rank, world=2)
        s.set_epoch(1)
        parts.append(list(s))
        assert len(parts[-1]) == len(s) == -(-n // 2)
    assert {i for part in parts for row in part for i in row} == set(range(40))
    # Without shuffling (--train_sampling_strategy sequential): data order, rows in order.
    assert list(TokenBudgetBatchSampler(lengths, 30, shuffle=False)) == token_budget_batches(lengths, 30, range(40))


def test_token_budget_row_labels_and_positions() -> None:
    """A row of three samples as the collator builds it: exact ids, positions, labels, targets."""
    samples = [
        {"input_ids": [1, 10, 11, 2], "labels": [-100, -100, 11, 2]},
        {"input_ids": [1, 20, 2], "labels": [-100, 20, 2]},
        {"input_ids": [1, 30, 31, 32, 2], "labels": [-100, -100, -100, 32, 2]},
    ]
    rows = token_budget_batches([len(s["input_ids"]) for s in samples], 12, range(3))
    assert rows == [[0, 1, 2]]  # 4 + 3 + 5 = 12 tokens: one full row
    row = PackedCollator()([samples[i] for i in rows[0]])
    assert row["input_ids"].tolist() == [[1, 10, 11, 2, 1, 20, 2, 1, 30, 31, 32, 2]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]]
    assert row["labels"].tolist() == [[-100, -100, 11, 2, -100, 20, 2, -100, -100, -100, 32, 2]]
    # Position t predicts the next token of its own sample; each sample's last token predicts nothing.
    assert row["shift_labels"].tolist() == [[-100, 11, 2, -100, 20, 2, -100, -100, -100, 32, 2, -100]]


def test_token_budget_loss_equals_unpacked(model_and_samples: tuple) -> None:
    """Rows of varying sample counts, accumulated: the per-token mean over all of them equals HF's
    loss over the same samples in one padded batch."""
    model, tokenizer, samples = model_and_samples
    model.train()
    lengths = [len(s["input_ids"]) for s in samples]
    rows = token_budget_batches(lengths, max(lengths) + min(lengths), range(len(samples)))
    assert len(rows) >= 3 and len({len(r) for r in rows}) > 1, rows  # several rows, unequal sample counts
    batch = PaddingCollator(tokenizer.pad_token_id)(samples)
    with torch.no_grad():
        ref = model(**batch).loss.item()
        n_items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        inputs = [PackedCollator()([samples[i] for i in row]) for row in rows]
        assert sum(int((x["shift_labels"] != IGNORE_INDEX).sum()) for x in inputs) == n_items
        total = sum(packed_loss(model, x, torch.tensor(n_items))[0].item() for x in inputs)
    # Both are sums of the same n_items token losses (each ≈ ln(vocab) ≈ 8) over n_items. Per-token
    # losses agree to the fp32 logit noise of different kernels (1e-5 relative, as above); the
    # fp32 sums add at most n_items × 2^-24 relative each. Bound: (1e-5 + 2·n_items·2^-24) × loss.
    tol = (1e-5 + 2 * n_items * 2**-24) * ref
    assert abs(total - ref) <= tol, (total, ref, tol)


def test_token_budget_training_memorizes(tiny_model_dir: Path, memorized_data: Path, tmp_path: Path) -> None:
    """finetune.py --packing_max_tokens 1024: the 8 samples (~100 tokens each) fill one row per step and are learnt."""
    from chinese_vicuna.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    records = [validate_instruction(r) for r in read_records(memorized_data)]
    lengths = [len(s["input_ids"]) for s in tokenize_instructions(records, tokenizer, load_template("alpaca", tokenizer), 256)]
    assert len(lengths) == 8 and sum(lengths) <= 1024  # one row, where --micro_batch_size 4 makes two
    out = tmp_path / "budget"
    args = memorize_args(tiny_model_dir, memorized_data, out, epochs=60, save_steps=1000)
    proc = run_script(*args, "--packing_max_tokens", "1024", "--logging_steps", "1", "--save_strategy", "no")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [e["loss"] for e in read_jsonl(out / "trainer_log.jsonl") if "loss" in e]
    assert len(losses) == 60  # one optimizer step (one row) per epoch
    assert losses[0] > 3 and losses[-1] < 0.05, losses


def test_packing_max_tokens_needs_packing(tmp_path: Path) -> None:
    from chinese_vicuna.args import TrainArguments, parse_args
    from chinese_vicuna.errors import UserError

    (train,) = parse_args((TrainArguments,), ["--output_dir", str(tmp_path), "--packing_max_tokens", "2048"])
    assert train.packing and train.packing_max_tokens == 2048
    for flags in (["--packing", "false", "--packing_max_tokens", "2048"], ["--packing_max_tokens", "-1"]):
        with pytest.raises(UserError, match="--packing_max_tokens"):
            parse_args((TrainArguments,), ["--output_dir", str(tmp_path), *flags])


# --------------------------------------------------------------------------------------------
# bf16 on the CPU: bucketed row lengths, bf16 logits into the loss
# --------------------------------------------------------------------------------------------
def _bf16_lora_model(tiny_model_dir: Path) -> tuple:
    from chinese_vicuna.model.build import load_checked_model
    from chinese_vicuna.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_checked_model(str(tiny_model_dir), tokenizer, "bf16")
    torch.manual_seed(0)
    model = add_lora(model, 8, 16, 0.0, "q_proj,v_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    use_packed_attention(model)
    model.train()
    records = [validate_instruction(r) for r in read_records(SAMPLE)[:3]]
    return model, tokenize_instructions(records, tokenizer, load_template("alpaca", tokenizer), 256)


def test_bf16_row_padded_to_bucket_same_loss_and_grads(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 row is padded to a multiple of ROW_LENGTH_MULTIPLE tokens by a sample of its own
    that trains nothing: the loss and the LoRA gradients are those of the unpadded row."""
    import chinese_vicuna.train.packing as packing

    model, samples = _bf16_lora_model(tiny_model_dir)
    inputs = PackedCollator()(samples)
    n = inputs["input_ids"].shape[1]
    assert n % packing.ROW_LENGTH_MULTIPLE, n  # the row needs padding
    padded = packing.pad_row_to_bucket(model, inputs)
    assert padded["input_ids"].shape[1] == -(-n // packing.ROW_LENGTH_MULTIPLE) * packing.ROW_LENGTH_MULTIPLE
    assert padded["position_ids"][0, n:].tolist() == list(range(padded["input_ids"].shape[1] - n))  # a sample of its own
    assert (padded["shift_labels"][0, n:] == IGNORE_INDEX).all()

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor], int]:
        seen = []
        hook = model.get_input_embeddings().register_forward_hook(lambda mod, i, o: seen.append(i[0].shape[1]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = packed_loss(model, inputs)
        loss.backward()
        hook.remove()
        return loss.item(), _grads(model), seen[0]

    loss, grads, rows = loss_and_grads()
    assert rows == padded["input_ids"].shape[1]
    monkeypatch.setattr(packing, "pad_row_to_bucket", lambda model, inputs: inputs)
    ref_loss, ref_grads, ref_rows = loss_and_grads()
    assert ref_rows == n
    assert abs(loss / ref_loss - 1) < 1e-3, (loss, ref_loss)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name].float(), g.float(), atol=2e-3, rtol=2e-2, msg=name)


def test_fp32_row_is_not_padded(model_and_samples: tuple) -> None:
    """fp32 rows keep their length: MKL's fp32 matmuls have no per-shape kernels to reuse."""
    from chinese_vicuna.train.packing import pad_row_to_bucket

    model, _, samples = model_and_samples
    inputs = PackedCollator()(samples[:3])
    assert pad_row_to_bucket(model, inputs) is inputs


def test_packed_loss_takes_bf16_logits_from_a_prepared_model(tiny_model_dir: Path) -> None:
    """accelerate's bf16 preparation converts the model's outputs to fp32; the packed trainer drops
    that conversion (the loss computes in fp32 chunks itself) and keeps autocast: same loss."""
    from accelerate import Accelerator

    from chinese_vicuna.train.mixed_precision import keep_logits_dtype

    model, samples = _bf16_lora_model(tiny_model_dir)
    model = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    inputs = PackedCollator()(samples)
    with torch.no_grad():  # chunk 0: the model's own logits (the chunked loss builds none)
        fp32_loss, outputs, _ = packed_loss(model, inputs, chunk=0)
        assert outputs.logits.dtype == torch.float32
        assert keep_logits_dtype(model) and not keep_logits_dtype(model)  # once; a second call finds nothing
        loss, outputs, _ = packed_loss(model, inputs, chunk=0)
        chunked, _, _ = packed_loss(model, inputs)
    assert outputs.logits.dtype == torch.bfloat16
    assert loss.item() == fp32_loss.item()
    assert abs(chunked.item() - loss.item()) < 1e-2 * loss.item()
