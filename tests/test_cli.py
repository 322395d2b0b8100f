"""Every recipe and tool parses its flags the same way: `--help` works and names the flags, booleans
take true/false, one .json file of flags works in their place, and help texts fit the script."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = sorted(
    [p.relative_to(REPO).as_posix() for p in REPO.glob("*.py")]
    + [p.relative_to(REPO).as_posix() for p in (REPO / "tools").glob("*.py")]
)
# benchmark.py takes a command and a work folder first: COMMAND WORK --help
HELP_ARGS = {"tools/benchmark.py": ["quick", "WORK", "--help"]}


def load(script: str):
    name = Path(script).stem + "_under_test"
    spec = importlib.util.spec_from_file_location(name, REPO / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def help_text(script: str, capsys: pytest.CaptureFixture[str]) -> str:
    module = load(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(HELP_ARGS.get(script, ["--help"]))
    assert exit_info.value.code in (0, None), script
    return capsys.readouterr().out


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "tools/__init__.py"])
def test_help_lists_the_flags(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(script, capsys)
    assert "usage:" in text and "--" in text, script


def test_help_texts_fit_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert "Continue training this adapter" in help_text("finetune.py", capsys)
    for script in ("generate.py", "chat.py"):
        text = help_text(script, capsys)
        assert "Continue training" not in text and "--lora_weights" in text and "--attn_implementation" in text


def test_training_help_calls_no_flag_of_ours_deprecated(capsys: pytest.CaptureFixture[str]) -> None:
    # transformers 5 calls gradient_checkpointing a deprecated alias; it is alpaca-lora's name and ours
    for script in ("finetune.py", "finetune_chat.py", "tools/pretrain.py"):
        text = " ".join(help_text(script, capsys).split())
        assert "Deprecated alias" not in text, script
        assert "--gradient-checkpointing [GRADIENT_CHECKPOINTING] Recompute activations" in text


def test_booleans_and_a_json_file_of_flags(tmp_path: Path) -> None:
    from chinese_vicuna.args import ModelArguments, ServerArguments, parse_args

    model, server = parse_args((ModelArguments, ServerArguments), ["--base_model", "b", "--share", "false", "--trust_remote_code", "true"])
    assert server.share is False and model.trust_remote_code is True
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({"base_model": "b", "share": True, "precision": "fp32"}))
    model, server = parse_args((ModelArguments, ServerArguments), [str(flags)])
    assert server.share is True and model.precision == "fp32" and model.base_model == "b"


# ---------------------------------------------------------------- parsing is only parsing (issue 26)


def tree(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under `folder`: its mtime and content (folders: empty)."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"") for p in sorted(folder.rglob("*"))
    }


def test_parse_args_on_a_folder_holding_a_run_moves_nothing_writes_nothing_configures_nothing(tmp_path: Path) -> None:
    import logging

    import torch

    import finetune
    from chinese_vicuna.run import prepare_run

    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"x")
    (out / "adapter_model.safetensors").write_bytes(b"y")
    (out / "trainer_log.jsonl").write_text('{"step": 3}\n')
    before, rng, handlers = tree(tmp_path), torch.random.get_rng_state(), list(logging.getLogger().handlers)
    flags = ["--base_model", "b", "--output_dir", str(out), "--overwrite_output_dir", "true", "--seed", "7"]
    groups = finetune.parse_args(finetune.FLAG_GROUPS, flags)
    assert tree(tmp_path) == before and not list(tmp_path.glob("**/.write-probe-*"))
    assert torch.equal(torch.random.get_rng_state(), rng) and logging.getLogger().handlers == handlers
    assert groups[-1].resume_from_checkpoint is None and groups[-1].overwrite_output_dir is True
    # the set-up step, called in view, is what moves the previous run aside
    prepare_run(groups, finetune.RUN_IDENTITY)
    [aside] = out.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["adapter_model.safetensors", "checkpoint-3", "trainer_log.jsonl"]


def test_pages_and_the_api_server_take_each_others_listen_flags() -> None:
    from chinese_vicuna.args import ApiServerArguments, ServerArguments, parse_args

    for flags in (["--server_name", "0.0.0.0", "--server_port", "9000"], ["--host", "0.0.0.0", "--port", "9000"]):
        (page,) = parse_args((ServerArguments,), flags)
        (api,) = parse_args((ApiServerArguments,), flags)
        assert (page.server_name, page.server_port, api.host, api.port) == ("0.0.0.0", 9000, "0.0.0.0", 9000)
    assert (parse_args((ServerArguments,), [])[0].server_port, parse_args((ApiServerArguments,), [])[0].port) == (7860, 8000)


def test_every_script_takes_the_one_template_and_base_model_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """One definition each: the same help line wherever the flag is taken."""
    import re

    lines: dict[str, dict[str, str]] = {"--prompt_template": {}, "--base_model": {}}
    for script in [s for s in SCRIPTS if s != "tools/__init__.py"]:
        text = " ".join(help_text(script, capsys).split())
        for flag, seen in lines.items():
            if match := re.search(rf"{flag} [A-Z_]+, \S+ [A-Z_]+ (.{{25}})", text):  # the help's first line
                seen[script] = match.group(1)
    assert len(set(lines["--prompt_template"].values())) == 1 and len(lines["--prompt_template"]) >= 10, lines
    assert len(set(lines["--base_model"].values())) == 1 and len(lines["--base_model"]) >= 15, lines


def test_make_tiny_model_takes_its_folder_first_or_as_a_flag(tmp_path: Path) -> None:
    tool = load("tools/make_tiny_model.py")
    small = ["--hidden_size", "64", "--intermediate_size", "128", "--num_layers", "1"]
    tool.main([str(tmp_path / "positional"), *small])
    tool.main(["--output_dir", str(tmp_path / "flag"), *small])
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        assert (tmp_path / "positional" / name).read_bytes() == (tmp_path / "flag" / name).read_bytes(), name


def test_pip_install_e_declares_the_runtime_requirements() -> None:
    """`pip install -e .` installs what requirements.txt pins, torch as a lower bound only (an installed build is kept)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pinned = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    assert project["dependencies"] == [line for line in pinned if line]
    assert "torch>=2.4" in project["dependencies"]
    extras = {name: (REPO / f"requirements-{name}.txt").read_text(encoding="utf-8") for name in project["optional-dependencies"]}
    for name, text in extras.items():
        assert project["optional-dependencies"][name] == [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_resume_is_resolved_by_the_set_up_step_not_by_parsing(tmp_path: Path) -> None:
    import finetune
    from chinese_vicuna.errors import UserError
    from chinese_vicuna.run import prepare_run

    flags = finetune.parse_args(finetune.FLAG_GROUPS, ["--base_model", "b", "--output_dir", str(tmp_path), "--resume_from_checkpoint", "true"])
    assert flags[-1].resume_from_checkpoint == "true" and list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match=f"--resume_from_checkpoint true: no complete checkpoint-N folder in {tmp_path}"):
        prepare_run(flags, finetune.RUN_IDENTITY)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU's decisions")
def test_precision_is_decided_in_one_function_from_the_flags_as_given() -> None:
    from chinese_vicuna.devices import Precision, decide_precision
    from chinese_vicuna.errors import UserError

    assert decide_precision() == Precision("fp32")
    assert decide_precision("auto", training=True, bf16=True) == Precision("bf16", bf16=True, use_cpu=True)
    assert decide_precision("auto", training=True) == Precision("fp32", use_cpu=True)
    assert decide_precision("fp32", load_in_4bit=True).weights == "4bit"
    assert decide_precision("auto", whole_model="--stage embeddings").weights == "fp32"
    with pytest.raises(UserError, match="--stage embeddings saves the whole model and cannot train a quantized one"):
        decide_precision("8bit", whole_model="--stage embeddings")
    with pytest.raises(UserError, match="--fp16 needs a CUDA GPU"):
        decide_precision(training=True, fp16=True)
    # what parsing derives from it: the weights follow the training's bf16 (nothing rewrites them later)
    from chinese_vicuna.args import ModelArguments, TrainArguments, parse_args

    model, train = parse_args((ModelArguments, TrainArguments), ["--bf16", "true", "--output_dir", "o"])
    assert (model.precision, train.bf16, train.fp16, train.use_cpu) == ("bf16", True, False, True)
