"""tools/estimate_memory.py: the parts of a training step's memory from config.json alone
(docs/memory.md compares them with measured peaks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chinese_vicuna.train.memory import GIB, estimate_training_memory


def run_tool(capsys: pytest.CaptureFixture, *args: str) -> dict[str, float]:
    import estimate_memory

    estimate_memory.main([*args, "--json", "true"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_tool_reads_a_model_folder_and_sums_its_parts(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    parts = run_tool(capsys, "--base_model", str(tiny_model_dir), "--precision", "fp32", "--device", "cpu", "--bf16", "false")
    assert set(parts) == {"weights", "adapter + gradients + AdamW", "activations", "logits (loss)", "framework", "total"}
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"), abs=0.01)
    # the tiny model: 1.2M fp32 parameters
    assert parts["weights"] == pytest.approx(1_194_624 * 4 / GIB, abs=0.001)


def test_each_setting_moves_its_own_part() -> None:
    llama7b = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000}
    base = estimate_training_memory(llama7b, "bf16", 16, "all-linear", 2048, 4, gradient_checkpointing=False)
    qlora = estimate_training_memory(llama7b, "4bit", 16, "all-linear", 2048, 4, gradient_checkpointing=False)
    checkpointed = estimate_training_memory(llama7b, "bf16", 16, "all-linear", 2048, 4, gradient_checkpointing=True)
    unchunked = estimate_training_memory(llama7b, "bf16", 16, "all-linear", 2048, 4, gradient_checkpointing=False, loss_chunk_size=0)
    assert 3 < base.weights / qlora.weights < 4 and base.activations == qlora.activations
    assert checkpointed.activations < base.activations / 10 and checkpointed.weights == base.weights
    # unchunked: 8192 positions × 32000 × (bf16 logits + fp32 log-softmax + fp32 gradient)
    assert unchunked.logits == pytest.approx(8192 * 32000 * 10, rel=0.01) and base.logits < unchunked.logits / 5


def test_unknown_base_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    import estimate_memory

    with pytest.raises(SystemExit) as exit_info:
        estimate_memory.main(["--base_model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no config.json" in capsys.readouterr().err
