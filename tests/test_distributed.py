"""Multi-process training on the CPU: torchrun (gloo) and DeepSpeed ZeRO-2 / ZeRO-3 against one process.

The same global batch (8) and data order in every run: one process does 4 × 2 accumulation,
two processes 4 × 1 each. fp32 and no dropout, so the runs agree to float rounding: losses to
a relative 1e-5 (measured: equal to the last digit), adapter weights to 1e-4 absolute
(measured: torchrun and ZeRO-2 1e-6 apart, ZeRO-3 with everything partitioned 4e-5; Adam
magnifies rounding in near-zero gradients). Two gloo processes whose gradients are not synced
(no `use_cpu`) log every step twice and end 2.7e-2 apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_launchers import run_launcher
from transformers import AutoModelForCausalLM

import finetune
from conftest import REPO, SAMPLE_INSTRUCT, free_port, read_jsonl

LOSS_RTOL = 1e-5
# Weights: sums over the two ranks' gradients run in another order than in one process (fp32
# rounding, ~1e-7 relative). Adam divides each gradient by its own running RMS, so an element whose
# gradient is near zero can turn that rounding into a step of up to the learning rate either way:
# such elements may differ by up to LR × STEPS; all the others stay within WEIGHT_ATOL.
LR, STEPS = 3e-3, 4
WEIGHT_ATOL = 1e-4
OUTLIER_SHARE = 1e-3  # at most this share of an adapter's elements may be such near-zero-gradient ones


def train_flags(base: Path, data: Path, out: Path) -> list[str]:
    return [
        "--base_model", str(base), "--data_path", str(data), "--output_dir", str(out),
        "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--lora_target_modules", "all-linear",
        "--learning_rate", str(LR), "--warmup_steps", "0",
        "--micro_batch_size", "4", "--batch_size", "8", "--num_epochs", "2",
        "--val_set_size", "0", "--save_steps", "100", "--logging_steps", "1", "--disable_tqdm", "true",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dist-data") / "data16.jsonl"
    path.write_text("\n".join(SAMPLE_INSTRUCT.read_text(encoding="utf-8").splitlines()[:16]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single_process_run(tiny_model_dir: Path, data16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, 4 × 2 accumulation (in this process: no interpreter start-up)."""
    out = tmp_path_factory.mktemp("dist-single") / "lora"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes; a busy 2-core machine slows 2 threads down a lot
    try:
        finetune.main([*train_flags(tiny_model_dir, data16, out), "--precision", "fp32"])
    finally:
        torch.set_num_threads(threads)
    return out


def losses(out: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_jsonl(out / "trainer_log.jsonl") if "loss" in e]


def assert_same_training(run: Path, reference: Path) -> None:
    """Same loss at every step (each step logged once: only rank 0 logs) and the same adapter."""
    got, want = losses(run), losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=LOSS_RTOL), f"step {step}: loss {a} vs {b} in one process"
    ours, theirs = load_file(str(run / "adapter_model.safetensors")), load_file(str(reference / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    outliers = total = 0
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape and tensor.dtype == torch.float32, name
        diff = (tensor - theirs[name]).abs()
        assert diff.max() <= LR * STEPS, f"{name}: max diff {diff.max()} exceeds what {STEPS} Adam steps of lr {LR} can move"
        outliers += int((diff > WEIGHT_ATOL).sum())
        total += diff.numel()
    assert outliers <= OUTLIER_SHARE * total, f"{outliers} of {total} adapter elements differ by more than {WEIGHT_ATOL}"


def assert_loads_in_stock_peft(base: Path, adapter: Path) -> None:
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert all(v.numel() > 0 for v in weights.values())
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # trained, not the zero init
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    ids = torch.tensor([[1, 100, 200, 300, 400]])
    with torch.no_grad():
        before = model(ids).logits
        after = PeftModel.from_pretrained(model, str(adapter)).eval()(ids).logits
    assert (after - before).abs().max() > 1e-3


def two_processes(launcher: str, base: Path, data: Path, out: Path, **variables: str) -> subprocess.CompletedProcess:
    proc = run_launcher(
        launcher,
        *train_flags(base, data, out)[6:],  # the launcher passes base, data and output from its variables
        TOT_CUDA="", NPROC_PER_NODE="2", PORT=str(free_port()), PRECISION="fp32",
        MODEL_PATH=str(base), DATA_PATH=str(data), OUTPUT_PATH=str(out), TEST_SIZE="0", SAVE_STEPS="100",
        **variables,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "global batch 8 = 4 × 1 accumulation × 2 processes" in proc.stderr
    assert proc.stderr.count("adapter saved to") == 1  # rank 0 only
    return proc


def test_torchrun_two_processes_match_one_process(tiny_model_dir: Path, data16: Path, single_process_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    two_processes("finetune.sh", tiny_model_dir, data16, out)
    assert_same_training(out, single_process_run)
    assert_loads_in_stock_peft(tiny_model_dir, out)
    # the checkpoint written at the end is a loadable adapter too
    assert_loads_in_stock_peft(tiny_model_dir, out / "checkpoint-4")


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(
    stage: int, tiny_model_dir: Path, data16: Path, single_process_run: Path, tmp_path: Path
) -> None:
    config = json.loads((REPO / "config-sample" / f"ds_zero{stage}.json").read_text())
    if stage == 3:
        # ZeRO-3 keeps tensors under this size whole on every rank ("auto" = 10 × hidden size,
        # which covers the tiny model's LoRA matrices): 0 makes it partition everything.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_config = tmp_path / f"ds_zero{stage}.json"
    ds_config.write_text(json.dumps(config))
    out = tmp_path / "lora"
    two_processes("finetune_deepspeed.sh", tiny_model_dir, data16, out, DS_CONFIG=str(ds_config))

    assert_same_training(out, single_process_run)
    assert_loads_in_stock_peft(tiny_model_dir, out)
    assert_loads_in_stock_peft(tiny_model_dir, out / "checkpoint-4")
    # DeepSpeed's own checkpoint shows what was split over the two ranks
    engine_dir = out / "checkpoint-4" / "global_step4"
    assert sorted(p.name for p in engine_dir.glob("*optim_states.pt")) == [
        f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)
    ]  # optimizer states: one partition per rank (ZeRO-2 and 3)
    states_file = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    states = torch.load(engine_dir / states_file, weights_only=False)
    lora = {k: v.numel() for k, v in states["module"].items() if "lora_" in k}
    assert lora
    if stage == 3:
        # parameters partitioned: rank 0's copy of the module holds empty shards, which is what a
        # bare save_pretrained would have written; the adapter above is whole
        # (the base weights, larger than any LoRA matrix, are above any threshold the LoRA is)
        assert set(lora.values()) == {0}
    else:
        assert 0 not in lora.values()  # ZeRO-2 keeps whole parameters on every rank


@pytest.mark.parametrize(
    ("name", "stage", "offload"),
    [("ds_zero2.json", 2, False), ("ds_zero2_offload.json", 2, True), ("ds_zero3.json", 3, False), ("ds_zero3_offload.json", 3, True)],
)
def test_deepspeed_sample_configs(name: str, stage: int, offload: bool) -> None:
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config = HfTrainerDeepSpeedConfig(str(REPO / "config-sample" / name))
    assert config.get_value("zero_optimization.stage") == stage and config.is_offload() == offload
    # batch and precision come from the flags (our --batch_size arithmetic), never the file
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16.enabled", "fp16.enabled"):
        assert config.get_value(key) == "auto", key
    if stage == 3:
        assert config.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True


def test_accelerate_fsdp_sample_config() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from transformers.models.llama import modeling_llama

    config = load_config_from_file(str(REPO / "config-sample" / "accelerate_fsdp.yaml"))
    assert config.distributed_type == "FSDP" and config.use_cpu is False
    assert hasattr(modeling_llama, config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    # LoRA mixes frozen and trained weights in one wrapped unit; saving gathers a whole adapter
    assert config.fsdp_config["fsdp_use_orig_params"] is True
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_missing_deepspeed_config_is_a_one_line_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--base_model", str(tiny_model_dir), "--output_dir", str(tmp_path), "--deepspeed", "no/such/ds.json"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --deepspeed no/such/ds.json: file not found (samples: config-sample/ds_zero2.json, ds_zero3.json, ...)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_accelerate_fsdp_sample_config_builds_a_plugin() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin

    options = {
        k.removeprefix("fsdp_"): v
        for k, v in load_config_from_file(str(REPO / "config-sample" / "accelerate_fsdp.yaml")).fsdp_config.items()
    }
    options["transformer_cls_names_to_wrap"] = [options.pop("transformer_layer_cls_to_wrap")]
    options["cpu_offload"] = options.pop("offload_params")
    plugin = FullyShardedDataParallelPlugin(**options)
    assert plugin.use_orig_params and "FULL_STATE_DICT" in str(plugin.state_dict_type)


@pytest.mark.gpu
@pytest.mark.timeout(3600)  # four runs, each loading and quantizing 13.5 GB of weights
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llama_7b_shaped_kbit_peak_gpu_memory(tiny_model_dir: Path, tmp_path: Path) -> None:
    """8-bit and 4-bit LoRA on a LLaMA-7B-shaped model (random weights), cutoff 256 and 512, micro-batch 4.

    Peak memory over the whole run (loading and quantizing included) lands in $GPU_MEMORY_REPORT
    (default: tmp) and on stdout (pytest -s).
    Anchors: Chinese-Vicuna trains 7B int8 at cutoff 256 in 11 GB; 7B QLoRA 4-bit in about 6 GB.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "llama-7b-shaped"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    # LLaMA's 32000-token vocabulary, so that embeddings, lm_head and logits cost what they do in 7B
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(32000 - len(tokenizer))])
    tokenizer.save_pretrained(str(model_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
    )  # fmt: skip
    torch.set_default_dtype(torch.float16)  # built in fp16 on the GPU: 13.5 GB, not 27 GB in fp32
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    del model
    torch.cuda.empty_cache()

    # samples longer than 512 tokens, so that every micro-batch is cutoff_len long
    text = "".join(SAMPLE_INSTRUCT.read_text(encoding="utf-8").splitlines()[:40])
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"第{i}题", "input": "", "output": text}, ensure_ascii=False) for i in range(16)))

    report = {}
    for precision in ("8bit", "4bit"):
        for cutoff in (256, 512):
            out = tmp_path / f"lora-{precision}-{cutoff}"
            code = (
                "import sys, json, torch, finetune\n"
                "finetune.main(sys.argv[1:])\n"
                "print('PEAK ' + json.dumps({'allocated_gib': torch.cuda.max_memory_allocated() / 2**30,"
                " 'reserved_gib': torch.cuda.max_memory_reserved() / 2**30}))\n"
            )
            proc = subprocess.run(
                [sys.executable, "-c", code, "--base_model", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
                 "--precision", precision, "--cutoff_len", str(cutoff), "--micro_batch_size", "4", "--batch_size", "4",
                 "--max_steps", "3", "--val_set_size", "0", "--save_steps", "1000", "--logging_steps", "1", "--packing", "false",
                 *(["--optim", "paged_adamw_8bit"] if precision == "4bit" else [])],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
            peak = json.loads(proc.stdout.split("PEAK ", 1)[1].splitlines()[0])
            report[f"{precision}@{cutoff}"] = {k: round(v, 2) for k, v in peak.items()}
    report["device"] = torch.cuda.get_device_name()
    path = Path(os.environ.get("GPU_MEMORY_REPORT", tmp_path / "gpu_memory.json"))
    path.write_text(json.dumps(report, indent=2))
    print("peak GPU memory (GiB):", json.dumps(report, indent=2))
    for cutoff in (256, 512):
        assert report[f"4bit@{cutoff}"]["allocated_gib"] < report[f"8bit@{cutoff}"]["allocated_gib"]
    assert report["8bit@256"]["allocated_gib"] < 11  # fits an 11 GB 2080Ti, as Chinese-Vicuna's
    assert report["4bit@256"]["allocated_gib"] < 8
