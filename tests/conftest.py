"""Shared fixtures: a tiny LLaMA built locally, and a LoRA that memorized sample instructions."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from warm_python import run_python, set_server_environment

REPO = Path(__file__).resolve().parent.parent

SAMPLE_INSTRUCT = REPO / "sample" / "instruct" / "data_sample.jsonl"
MEMORIZED_COUNT = 8

# Keep tests on the CPU and quiet; the tokenized-data cache goes to a per-session folder.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def run_script(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: int = 600, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run a repository script with this interpreter (forked from a warm one: tests/warm_python.py);
    returns the completed process (no check)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return run_python(list(args), cwd=cwd, env=full_env, timeout=timeout, stdin=stdin)


# Each pytest-xdist worker hands out loopback ports from its own block of 1000, below the kernel's
# ephemeral range (32768-60999 by default), so neither another worker nor a client socket holds a port
# between free_port() and the server binding it.
_PORT_BLOCK = 20000 + 1000 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
_port_turn = itertools.count()


def free_port() -> int:
    """A loopback port for a server a test starts."""
    for _ in range(1000):
        port = _PORT_BLOCK + next(_port_turn) % 1000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # held by something outside this test run
                continue
            return port
    raise AssertionError(f"no free loopback port in {_PORT_BLOCK}-{_PORT_BLOCK + 999}")


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["CHINESE_VICUNA_CACHE"] = str(tmp_path_factory.mktemp("cv-cache"))
    set_server_environment({**os.environ, "PYTHONPATH": str(REPO)})  # before any test changes os.environ


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tools/make_tiny_model.py with its defaults (seconds)."""
    from make_tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def memorized_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first MEMORIZED_COUNT short sample instructions, as a .jsonl file."""
    lines = SAMPLE_INSTRUCT.read_text(encoding="utf-8").splitlines()[:MEMORIZED_COUNT]
    path = tmp_path_factory.mktemp("data") / "memorize.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def memorize_args(base: Path, data: Path, out: Path, epochs: int = 60, save_steps: int = 40) -> list[str]:
    """finetune.py flags that make the tiny model memorize `data` (r=16 all-linear, lr 3e-3)."""
    return [
        "finetune.py",
        "--base_model", str(base),
        "--data_path", str(data),
        "--output_dir", str(out),
        "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0",
        "--lora_target_modules", "all-linear",
        "--learning_rate", "3e-3", "--warmup_steps", "0",
        "--micro_batch_size", "4", "--batch_size", "4", "--num_epochs", str(epochs),
        "--val_set_size", "0", "--save_steps", str(save_steps), "--logging_steps", "10",
        "--disable_tqdm", "true",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def memorized_lora(tiny_model_dir: Path, memorized_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (finetune.py output_dir) that memorized `memorized_data`."""
    out = tmp_path_factory.mktemp("lora") / "memorized"
    proc = run_script(*memorize_args(tiny_model_dir, memorized_data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


@pytest.fixture(scope="session")
def english_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA whose 600-piece tokenizer saw only English: Chinese falls back to bytes."""
    from make_tiny_model import DEFAULT_CORPUS, make_tiny_model

    root = tmp_path_factory.mktemp("en-base")
    lines = [line for line in DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip() and line.isascii()]
    (root / "english.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return make_tiny_model(root / "en-llama", vocab_size=600, corpus=[root / "english.txt"])


@pytest.fixture(scope="session")
def expanded_tokenizer_dir(english_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tools/train_tokenizer.py on sample/pretrain/zh_1-3, merged into english_base_dir's tokenizer
    by tools/merge_tokenizers.py (zh_4 is the test text); its JSON report is `merge_report.json` beside it."""
    root = tmp_path_factory.mktemp("expanded")
    texts = [str(REPO / "sample" / "pretrain" / f"zh_{i}.txt") for i in (1, 2, 3)]
    proc = run_script("tools/train_tokenizer.py", "--input", *texts, "--model_prefix", str(root / "zh"), "--vocab_size", "2500")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "merged-tokenizer"
    proc = run_script(
        "tools/merge_tokenizers.py", "--base_tokenizer", str(english_base_dir), "--chinese_sp_model", str(root / "zh.model"),
        "--output_dir", str(out), "--test_text", str(REPO / "sample" / "pretrain" / "zh_4.txt"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "merge_report.json").write_text(proc.stdout.strip().splitlines()[-1], encoding="utf-8")
    return out


def manifest_problems(out_dir: Path) -> list[str]:
    """Files whose SHA-256 no longer matches the `manifest.json` an export wrote (empty: all good)."""
    from chinese_vicuna.export.tensors import sha256_file

    manifest = json.loads((Path(out_dir) / "manifest.json").read_text(encoding="utf-8"))
    return [name for name, entry in manifest["files"].items() if sha256_file(Path(out_dir) / name) != entry["sha256"]]


@pytest.fixture(scope="session")
def two_loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRAs memorized on the same 4 questions with different answers ("a": alpaca,
    "b": vicuna_v1.1, each with its prompt_template.json); see tests/serve_helpers.py."""
    from serve_helpers import train_two_loras

    return train_two_loras(tiny_model_dir, tmp_path_factory.mktemp("two-loras"))
