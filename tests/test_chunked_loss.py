"""The loss through lm_head in chunks (train/losses.py): the same fp32 loss and gradients as the
unchunked cross-entropy of full logits, packed and padded, with any head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_packing import _grads

from chinese_vicuna.data.collate import PackedCollator, PaddingCollator
from chinese_vicuna.data.encode import IGNORE_INDEX, tokenize_instructions
from chinese_vicuna.data.records import read_records, validate_instruction
from chinese_vicuna.errors import UserError
from chinese_vicuna.model.adapters import add_lora
from chinese_vicuna.prompts import load_template
from chinese_vicuna.train.losses import lm_head_cross_entropy
from chinese_vicuna.train.packing import packed_loss

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "instruct" / "data_sample.jsonl"


def reference(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """The unchunked form: full fp32 logits, PyTorch's cross-entropy (sum)."""
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def loss_and_grads(fn, hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    hidden = hidden.detach().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    count = int((targets != IGNORE_INDEX).sum())
    loss = fn(hidden, head, targets) / count
    loss.backward()
    return loss.item(), [hidden.grad.clone(), *(p.grad.clone() for p in head.parameters() if p.requires_grad)]


@pytest.mark.parametrize("head_kind", ["linear", "trained-linear", "lora-head"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_equals_unchunked_in_fp32(head_kind: str, chunk: int) -> None:
    torch.manual_seed(0)
    rows, width, vocab = 200, 32, 1000
    head: torch.nn.Module = torch.nn.Linear(width, vocab, bias=False)
    head.weight.requires_grad_(head_kind == "trained-linear")
    if head_kind == "lora-head":  # not a plain Linear: the checkpointed path
        from peft import LoraConfig, get_peft_model

        wrapper = torch.nn.Module()
        wrapper.lm_head = head
        peft = get_peft_model(wrapper, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
        head = peft.base_model.model.lm_head
    hidden = torch.randn(rows, width)
    targets = torch.randint(0, vocab, (rows,))
    targets[::5] = IGNORE_INDEX  # untrained rows are skipped
    ref_loss, ref_grads = loss_and_grads(reference, hidden, head, targets)
    loss, grads = loss_and_grads(lambda h, m, t: lm_head_cross_entropy(h, m, t, chunk), hidden, head, targets)
    assert abs(loss - ref_loss) < 1e-6, (loss, ref_loss)
    assert len(grads) == len(ref_grads) == {"linear": 1, "trained-linear": 2, "lora-head": 3}[head_kind]
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).abs().max() < 1e-5


def test_bf16_autocast_matches_the_unchunked_loss() -> None:
    """Under CPU autocast the logits and their gradient are bf16 as lm_head's would be, the loss fp32."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 500, bias=False)
    hidden, targets = torch.randn(100, 64), torch.randint(0, 500, (100,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = loss_and_grads(reference, hidden, head, targets)
        loss, grads = loss_and_grads(lambda h, m, t: lm_head_cross_entropy(h, m, t, 16), hidden, head, targets)
    assert abs(loss - ref_loss) < 1e-5
    assert (grads[0] - ref_grads[0]).abs().max() < 2e-2 * ref_grads[0].abs().max()  # bf16: about 3 significant digits


@pytest.fixture(scope="module")
def lora_model_and_samples(tiny_model_dir: Path) -> tuple:
    from chinese_vicuna.model.build import load_checked_model
    from chinese_vicuna.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_checked_model(str(tiny_model_dir), tokenizer, "fp32")
    torch.manual_seed(0)
    model = add_lora(model, 8, 16, 0.0, "all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    records = [validate_instruction(r) for r in read_records(SAMPLE)[:6]]
    samples = tokenize_instructions(records, tokenizer, load_template("alpaca", tokenizer), 256)
    return model, tokenizer, samples


def test_packed_training_loss_and_gradients(lora_model_and_samples: tuple) -> None:
    """Packed rows: the chunked loss through lm_head equals the loss of the model's own logits."""
    model, _, samples = lora_model_and_samples
    model.train()
    inputs = PackedCollator()(samples)
    unchunked, outputs, _ = packed_loss(model, inputs, chunk=0)
    assert outputs.logits is not None and outputs.logits.shape[-1] == model.config.vocab_size
    unchunked.backward()
    ref = _grads(model)
    chunked, outputs, _ = packed_loss(model, inputs, chunk=16)
    assert outputs.logits is None  # no logits were ever built for the batch
    chunked.backward()
    got = _grads(model)
    assert abs(chunked.item() - unchunked.item()) < 1e-6
    assert max(float((got[n] - g).abs().max()) for n, g in ref.items()) < 1e-5


def test_padded_training_loss_and_gradients(lora_model_and_samples: tuple, tmp_path: Path) -> None:
    """Padded batches (--packing false): the trainer's chunked loss equals HF's own loss."""
    from chinese_vicuna.args import TrainArguments, parse_args
    from chinese_vicuna.train.checkpointing import CheckpointTrainer

    model, tokenizer, samples = lora_model_and_samples
    model.train()
    batch = PaddingCollator(tokenizer.pad_token_id)(samples)
    ref = model(**batch).loss  # HF's ForCausalLMLoss over full fp32 logits
    ref.backward()
    ref_grads = _grads(model)
    (args,) = parse_args((TrainArguments,), ["--output_dir", str(tmp_path), "--loss_chunk_size", "8"])
    trainer = CheckpointTrainer(model=model, args=args)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    got = _grads(model)
    assert abs(loss.item() - ref.item()) < 1e-6
    assert max(float((got[n] - g).abs().max()) for n, g in ref_grads.items()) < 1e-5


def test_mixed_precision_model_whose_forward_alone_runs_under_autocast(tiny_model_dir: Path) -> None:
    """Accelerate's bf16 wraps only model.forward in autocast (outputs upcast to fp32): lm_head's
    chunks run under the same autocast, with bf16 weights (--precision bf16 --bf16 true)."""
    from accelerate.utils import convert_outputs_to_fp32

    from chinese_vicuna.model.build import load_checked_model
    from chinese_vicuna.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = add_lora(load_checked_model(str(tiny_model_dir), tokenizer, "bf16"), 8, 16, 0.0, "all-linear")
    model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    records = [validate_instruction(r) for r in read_records(SAMPLE)[:4]]
    inputs = PackedCollator()(tokenize_instructions(records, tokenizer, load_template("alpaca", tokenizer), 256))
    unchunked, _, _ = packed_loss(model, inputs, chunk=0)
    chunked, _, _ = packed_loss(model, inputs, chunk=16)
    chunked.backward()
    assert abs(chunked.item() - unchunked.item()) < 1e-2 * unchunked.item()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# --loss_kernel: Liger's fused kernel on CUDA where installed, the chunks elsewhere
# --------------------------------------------------------------------------------------------
def test_loss_kernel_decision() -> None:
    from chinese_vicuna.devices import decide_loss_kernel

    assert decide_loss_kernel("auto", cuda=True, liger=True) == "liger"
    for cuda, liger in [(False, True), (True, False), (False, False)]:
        assert decide_loss_kernel("auto", cuda=cuda, liger=liger) == "chunked"
        assert decide_loss_kernel("chunked", cuda=cuda, liger=liger) == "chunked"
    assert decide_loss_kernel("liger", cuda=True, liger=True) == "liger"
    with pytest.raises(UserError, match="no CUDA device here; use --loss_kernel chunked"):
        decide_loss_kernel("liger", cuda=False, liger=True)
    with pytest.raises(UserError, match="liger-kernel is not installed"):
        decide_loss_kernel("liger", cuda=True, liger=False)
    with pytest.raises(UserError, match="use one of auto, chunked, liger"):
        decide_loss_kernel("fused")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's decision")
def test_the_training_flags_pick_chunked_here_and_refuse_liger() -> None:
    from chinese_vicuna.args import TrainArguments, parse_args

    (auto,) = parse_args((TrainArguments,), ["--output_dir", "unused"])
    assert auto.loss_kernel == "chunked"
    with pytest.raises(UserError, match=r"^--loss_kernel liger: Liger's fused kernel runs on CUDA"):
        parse_args((TrainArguments,), ["--output_dir", "unused", "--loss_kernel", "liger"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("trained_head", [False, True])
def test_liger_equals_the_chunked_loss_on_cuda(trained_head: bool) -> None:
    pytest.importorskip("liger_kernel", reason="pip install liger-kernel")
    torch.manual_seed(0)
    rows, width, vocab = 600, 64, 32000
    head = torch.nn.Linear(width, vocab, bias=False).cuda()
    head.weight.requires_grad_(trained_head)
    hidden = torch.randn(rows, width, device="cuda")
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    targets[::5] = IGNORE_INDEX
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls on both sides
    ref_loss, ref_grads = loss_and_grads(lambda h, m, t: lm_head_cross_entropy(h, m, t, 128, "chunked"), hidden, head, targets)
    loss, grads = loss_and_grads(lambda h, m, t: lm_head_cross_entropy(h, m, t, 128, "liger"), hidden, head, targets)
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss), (loss, ref_loss)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
