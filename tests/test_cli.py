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
