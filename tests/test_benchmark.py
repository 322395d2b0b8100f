"""tools/benchmark.py: the precision it picks per machine; quick mode: both configurations train,
the JSON and the plot are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chinese_vicuna.devices import native_train_precision, this_machine_train_precision
from conftest import run_script

# /proc/cpuinfo flags of the two CPU classes the docs measure on.
AVX2_ONLY = {"fpu", "sse4_2", "avx", "avx2", "fma"}
AVX512_NO_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_vnni"}


@pytest.mark.parametrize(
    ("flags", "cuda_bf16", "expected"),
    [
        (AVX2_ONLY, None, "fp32"),
        (AVX512_NO_BF16, None, "fp32"),  # AVX-512 alone emulates bf16: an order of magnitude slower
        (AVX512_NO_BF16 | {"avx512_bf16"}, None, "bf16"),
        (AVX2_ONLY | {"amx_bf16", "amx_tile"}, None, "bf16"),
        (set(), None, "fp32"),  # no /proc/cpuinfo (macOS, containers without it)
        (AVX2_ONLY, True, "bf16"),  # a GPU decides, whatever the host CPU
        (AVX512_NO_BF16 | {"avx512_bf16"}, False, "fp32"),  # a pre-Ampere GPU
    ],
)
def test_native_train_precision(flags: set[str], cuda_bf16: bool | None, expected: str) -> None:
    assert native_train_precision(flags, cuda_bf16) == expected


def test_quick_benchmark_writes_json_and_plot(tiny_model_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "bench"
    proc = run_script("tools/benchmark.py", "quick", str(work), "--model", str(tiny_model_dir), "--samples", "16", "--max_steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((work / "benchmark-quick.json").read_text())
    assert (work / "benchmark-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {r["config"]: r for r in result["runs"]}
    assert set(runs) == {"recipe", "ours"}
    assert result["precision"] == this_machine_train_precision()
    # Same samples in the same order: the two losses agree closely (different LoRA dropout masks and kernels).
    assert abs(runs["ours"]["train_loss"] / runs["recipe"]["train_loss"] - 1) < 0.02, runs
    for r in runs.values():
        # MFU is measured against a matmul peak timed in the same process: on a loaded machine (or a CPU
        # without native bf16) the two timings need not agree, so only its sign is certain here.
        assert r["tokens_per_s"] > 0 and r["peak_mib"] > 100 and r["mfu"] > 0
    assert result["recipe_padding_fraction_est"] > 0.1  # long-tailed lengths: the recipe pads a lot
    assert result["data_tokens"]["tokens"] > 0 and result["matmul_peak_flops"] > 0
    summary = result["summary"]
    assert summary["speedup_per_pair"] and summary["peak_memory_ratio"] > 0
