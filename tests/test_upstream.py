"""Upstream layouts read in place: `adapter_model.bin` LoRAs (Chinese-Vicuna, Chinese-LLaMA-Alpaca)
with the 2023 PEFT keys, a checkpoint-N with only pytorch_model.bin, `--low_mem` refusing what it
cannot merge, and the upstream scripts' flag names."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from chinese_vicuna.args import DataArguments, ModelArguments, parse_args
from chinese_vicuna.errors import UserError


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def make_lora(base: Path, out: Path, safe: bool, **config: object) -> None:
    """A LoRA with non-zero B (so merging changes the logits), saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM", **config)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.2)
    peft_model.save_pretrained(str(out), safe_serialization=safe)


@pytest.fixture(scope="module")
def bin_lora(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter as the 2023 PEFT wrote it: adapter_model.bin, enable_lora / merge_weights keys."""
    out = tmp_path_factory.mktemp("upstream") / "lora-bin"
    make_lora(tiny_model_dir, out, safe=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update({"enable_lora": None, "merge_weights": False})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    assert (out / "adapter_model.bin").is_file() and not (out / "adapter_model.safetensors").exists()
    return out


def reference_logits(base: Path, lora: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, str(lora)).eval()
    with torch.no_grad():
        return peft_model(input_ids=ids).logits


@pytest.mark.parametrize("low_mem", [False, True])
def test_bin_adapter_merges_in_place_equal_to_base_plus_lora(tiny_model_dir: Path, bin_lora: Path, tmp_path: Path, low_mem: bool) -> None:
    from transformers import AutoModelForCausalLM

    import merge_lora

    before = folder_digest(bin_lora)
    out = tmp_path / "merged"
    merge_lora.main(
        ["--base_model", str(tiny_model_dir), "--lora_weights", str(bin_lora), "--output_dir", str(out), "--low_mem", str(low_mem).lower()]
    )
    assert folder_digest(bin_lora) == before  # nothing in the user's folder renamed or rewritten
    ids = torch.tensor([[1, 50, 300, 7, 900, 42, 3]])
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(input_ids=ids).logits - got).abs().max() > 1e-3  # the LoRA does change the model
    assert (reference_logits(tiny_model_dir, bin_lora, ids) - got).abs().max() < 1e-4


def test_bin_adapter_loads_for_inference_without_version_warnings(tiny_model_dir: Path, bin_lora: Path, caplog) -> None:
    from chinese_vicuna.model.build import load_for_inference

    before = folder_digest(bin_lora)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_for_inference(str(tiny_model_dir), str(bin_lora), "fp32")
    messages = caplog.text + " ".join(str(w.message) for w in caught)
    assert "higher version" not in messages and "enable_lora" not in messages and "merge_weights" not in messages
    ids = torch.tensor([[1, 50, 300, 7]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - reference_logits(tiny_model_dir, bin_lora, ids)).abs().max() < 1e-5
    assert folder_digest(bin_lora) == before


def test_chinese_vicuna_checkpoint_loads_with_its_named_config(tiny_model_dir: Path, bin_lora: Path, tmp_path: Path) -> None:
    """checkpoint-N/pytorch_model.bin (the LoRA state dict, no adapter_config.json): an error that
    names --lora_config without it; with it, inference and merge equal base + LoRA, read in place."""
    import merge_lora
    from chinese_vicuna.model.build import load_for_inference

    ckpt = tmp_path / "checkpoint-200"
    ckpt.mkdir()
    (ckpt / "pytorch_model.bin").write_bytes((bin_lora / "adapter_model.bin").read_bytes())
    config = tmp_path / "config-sample" / "adapter_config.json"
    config.parent.mkdir()
    config.write_bytes((bin_lora / "adapter_config.json").read_bytes())
    before = folder_digest(ckpt)
    with pytest.raises(
        UserError, match=r"pytorch_model\.bin without adapter_config\.json .*--lora_config config-sample/adapter_config\.json"
    ):
        load_for_inference(str(tiny_model_dir), str(ckpt), "fp32")
    model, _ = load_for_inference(str(tiny_model_dir), str(ckpt), "fp32", lora_config=str(config))
    ids = torch.tensor([[1, 50, 300, 7]])
    want = reference_logits(tiny_model_dir, bin_lora, ids)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - want).abs().max() < 1e-5
    out = tmp_path / "merged"
    merge_lora.main(
        ["--base_model", str(tiny_model_dir), "--lora_weights", str(ckpt), "--lora_config", str(config), "--output_dir", str(out)]
    )
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - want).abs().max() < 1e-4
    assert folder_digest(ckpt) == before


def test_low_mem_refuses_a_lora_bias(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    import merge_lora

    lora = tmp_path / "lora-bias"
    make_lora(tiny_model_dir, lora, safe=True, lora_bias=True)
    with pytest.raises(SystemExit) as exit_info:
        merge_lora.main(
            ["--base_model", str(tiny_model_dir), "--lora_weights", str(lora), "--output_dir", str(tmp_path / "m"), "--low_mem", "true"]
        )
    assert exit_info.value.code == 2
    assert "lora_bias is set; --low_mem merges LoRA, rsLoRA and DoRA only: drop --low_mem" in capsys.readouterr().err
    assert not list((tmp_path / "m").glob("*.safetensors"))  # nothing written


def test_upstream_flag_names() -> None:
    model, data = parse_args((ModelArguments, DataArguments), ["--model_path", "/m", "--test_size", "7", "--lora_model", "user/l"])
    assert (model.base_model, model.lora_weights, data.val_set_size) == ("/m", "user/l", 7)  # a hub id: not checked locally
    with pytest.raises(UserError, match=r"--output_path \(upstream name of --output_dir, which this script does not take\)"):
        parse_args((ModelArguments,), ["--output_path", "/o"])
