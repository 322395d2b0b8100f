"""notebooks/: committed without outputs, and executed top to bottom (papermill) with the tiny
model on the CPU, the way CI keeps them from rotting: the quickstart trains a LoRA that
memorizes its data, and its executed outputs show the memorized answers, then (its optional GRPO
section) runs finetune_grpo.py from that LoRA for two steps and prints the rewards it logged; the
CPU notebook merges a memorized LoRA, writes f16 and quantized GGUF files and answers with llama.cpp."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REPO, memorize_args, read_jsonl

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
QUICKSTART = REPO / "notebooks" / "quickstart.ipynb"
CPU_GGUF = REPO / "notebooks" / "cpu_gguf.ipynb"
QUICKSTART_EPOCHS = 40
# the quickstart's GRPO section, as cheap as GRPO gets: two prompts a step, two short completions each
GRPO_ARGS = ["--num_generations", "2", "--max_completion_length", "8", "--micro_batch_size", "2", "--batch_size", "2", "--disable_tqdm", "true"]  # fmt: skip
REQUIRED_PARAMETERS = ("INSTALL", "BASE_MODEL", "DATA_PATH", "OUTPUT_DIR", "NUM_EPOCHS", "LAUNCH_UI", "RUN_GRPO")


def test_there_are_notebooks():
    assert QUICKSTART in NOTEBOOKS and CPU_GGUF in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count") is not None] == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_is_tagged_parameters(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "parameters" in first["metadata"].get("tags", [])
    source = "".join(first["source"])
    required = REQUIRED_PARAMETERS if path == QUICKSTART else ("INSTALL",)
    assert [name for name in required if f"\n{name} = " not in f"\n{source}"] == []


@pytest.mark.slow
def test_quickstart_trains_and_shows_the_memorized_answers(tiny_model_dir: Path, memorized_data: Path, tmp_path: Path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel and the scripts import this checkout
    data = tmp_path / "three.jsonl"  # three records: one optimizer step per epoch keeps the CPU run short
    records = [json.loads(line) for line in memorized_data.read_text(encoding="utf-8").splitlines()[:3]]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    # the memorize flags after base, data and output_dir
    flags = memorize_args(tiny_model_dir, data, tmp_path / "unused", epochs=QUICKSTART_EPOCHS, save_steps=1000)[7:]
    epochs = flags.index("--num_epochs")
    make_gguf = importlib.util.find_spec("llama_cpp") is not None  # requirements-llamacpp.txt
    out, executed = tmp_path / "lora", tmp_path / "quickstart.out.ipynb"
    papermill.execute_notebook(
        str(QUICKSTART),
        str(executed),
        parameters={
            "INSTALL": False,
            "BASE_MODEL": str(tiny_model_dir),
            "PRECISION": "fp32",
            "DATA_PATH": str(data),
            "OUTPUT_DIR": str(out),
            "NUM_EPOCHS": int(flags[epochs + 1]),
            "EXTRA_TRAIN_ARGS": flags[:epochs] + flags[epochs + 2 :],
            "NUM_QUESTIONS": 3,
            "MAX_NEW_TOKENS": 48,
            "LAUNCH_UI": False,
            "MERGE": True,
            "MAKE_GGUF": make_gguf,
            "GGUF_OUTTYPE": "q8_0",
            "RUN_GRPO": True,
            "GRPO_STEPS": 2,
            "GRPO_ARGS": GRPO_ARGS,
        },
        cwd=str(REPO),
        kernel_name="python3",
        progress_bar=False,
    )
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (Path(f"{out}-merged") / "config.json").is_file()

    shown = executed_stdout(executed)
    for record in records:
        assert f"训练后 / after:  {record['output']}\n" in shown
    assert shown.count("✓") == 3
    # GRPO from the memorized LoRA: the rewards printed are the ones its trainer logged, step by step
    grpo_log = [e for e in read_jsonl(Path(f"{out}-grpo") / "trainer_log.jsonl") if "reward" in e]
    assert [e["step"] for e in grpo_log] == [1, 2] and (Path(f"{out}-grpo") / "adapter_model.safetensors").is_file()
    for e in grpo_log:
        assert f"GRPO step {e['step']}: reward {e['reward']:.3f}, accuracy {e['rewards/accuracy/mean']:.3f}\n" in shown
    if make_gguf:  # the merged model as GGUF, answered by llama.cpp on the CPU
        assert f"CPU (llama.cpp): {records[0]['instruction']} → {records[0]['output']}\n" in shown


def executed_stdout(path: Path) -> str:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return "".join(
        "".join(o.get("text", ""))
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if o.get("name") == "stdout"
    )


@pytest.mark.slow
def test_cpu_notebook_merges_converts_and_answers(
    tiny_model_dir: Path, memorized_lora: Path, memorized_data: Path, tmp_path: Path, monkeypatch
):
    papermill = pytest.importorskip("papermill")
    pytest.importorskip("llama_cpp", reason="requirements-llamacpp.txt not installed")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    records = [json.loads(line) for line in memorized_data.read_text(encoding="utf-8").splitlines()[:2]]
    out, executed = tmp_path / "cpu-model", tmp_path / "cpu_gguf.out.ipynb"
    papermill.execute_notebook(
        str(CPU_GGUF),
        str(executed),
        parameters={
            "INSTALL": False,
            "BASE_MODEL": str(tiny_model_dir),
            "LORA_WEIGHTS": str(memorized_lora),
            "OUTPUT_DIR": str(out),
            "QUANT": "q8_0",  # the finer quantization: the answers are compared exactly
            "QUESTIONS": [r["instruction"] for r in records],
            "MAX_NEW_TOKENS": 48,
        },
        cwd=str(REPO),
        kernel_name="python3",
        progress_bar=False,
    )
    assert (out / "model-f16.gguf").stat().st_size > (out / "model-q8_0.gguf").stat().st_size > 0
    shown = executed_stdout(executed)
    for outtype in ("f16", "q8_0"):
        for record in records:
            assert f"{outtype} | {record['instruction']} → {record['output']}\n" in shown
