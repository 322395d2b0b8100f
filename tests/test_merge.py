"""merge_lora.py: PEFT merges of one and several LoRAs, resized vocabularies, low-memory mode,
Meta .pth layout, and one clear error per wrong input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chinese_vicuna.export.meta import load_meta, meta_params, meta_to_hf
from chinese_vicuna.export.names import permute_qk, unpermute_qk
from conftest import manifest_problems, run_script

PROMPTS = ["中国的首都是哪里？", "Below is an instruction.\n\n### Response:\n北京", "一年有几个季节？春、夏、秋、冬。"]


def make_lora(
    base: Path, out: Path, targets: list[str], seed: int, modules_to_save=None, new_tokens=None, save_embedding_layers="auto"
) -> Path:
    """A LoRA with non-zero B (so a merge is never trivially equal); optionally an expanded vocabulary."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    tokenizer = None
    if new_tokens:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        tokenizer.add_tokens(new_tokens)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=modules_to_save, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)  # a "trained" full copy, unlike the base
    peft_model.save_pretrained(str(out), save_embedding_layers=save_embedding_layers)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("merge-loras")
    base = tiny_model_dir
    out = {
        "A": make_lora(base, d / "A", ["q_proj", "v_proj"], 1),
        "B": make_lora(base, d / "B", ["q_proj", "k_proj", "o_proj", "gate_proj"], 2),
        # order matters: a full lm_head copy (modules_to_save) vs a LoRA on lm_head
        "H": make_lora(base, d / "H", ["v_proj"], 3, modules_to_save=["lm_head"]),
        "L": make_lora(base, d / "L", ["q_proj", "lm_head"], 4),
        # a pretraining LoRA that resized the vocabulary: expanded tokenizer in the folder
        "V": make_lora(base, d / "V", ["q_proj", "v_proj"], 5, ["embed_tokens", "lm_head"], ["新词甲", "新词乙", "新词丙"]),
    }
    return out


def ids_for(tokenizer) -> list[torch.Tensor]:
    return [torch.tensor([[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]]) for p in PROMPTS]


@torch.inference_mode()
def logits(model, batches) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=b).logits[0] for b in batches]


def max_abs(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def merge(*args: str) -> None:
    import merge_lora

    merge_lora.main(list(args))


def test_one_lora_cli_verify_and_manifest(tiny_model_dir: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    proc = run_script(
        "merge_lora.py", "--base_model", str(tiny_model_dir), "--lora_weights", str(loras["A"]), "--output_dir", str(out), "--verify"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verify: written model vs base + LoRAs: max abs logit diff" in proc.stdout
    tok = AutoTokenizer.from_pretrained(str(out))
    batches = ids_for(tok)
    reference = PeftModel.from_pretrained(load(tiny_model_dir), str(loras["A"]))
    base_logits = logits(load(tiny_model_dir), batches)
    merged_logits = logits(load(out), batches)
    assert max_abs(merged_logits, logits(reference, batches)) < 1e-4
    assert max_abs(merged_logits, base_logits) > 1e-2  # the LoRA really changed the model
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer.model"} <= set(manifest["files"])
    assert manifest["verify"]["ok"] and manifest["verify"]["max_abs_diff_written_vs_reference"] < 1e-4
    assert manifest_problems(out) == []


def test_two_loras_in_order(tiny_model_dir: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    out = tmp_path / "AB"
    merge("--base_model", str(tiny_model_dir), "--lora_weights", f"{loras['A']},{loras['B']}", "--output_dir", str(out))
    # reference: both adapters active at once in one PeftModel, nothing merged
    reference = PeftModel.from_pretrained(load(tiny_model_dir), str(loras["A"]), adapter_name="a")
    reference.load_adapter(str(loras["B"]), adapter_name="b")
    reference.base_model.set_adapter(["a", "b"])
    batches = ids_for(AutoTokenizer.from_pretrained(str(out)))
    assert max_abs(logits(load(out), batches), logits(reference, batches)) < 1e-4

    # order matters when one adapter replaces a module the other adapts: H saves a full lm_head
    hl, lh = tmp_path / "HL", tmp_path / "LH"
    merge("--base_model", str(tiny_model_dir), "--lora_weights", f"{loras['H']},{loras['L']}", "--output_dir", str(hl), "--verify")
    merge("--base_model", str(tiny_model_dir), "--lora_weights", f"{loras['L']},{loras['H']}", "--output_dir", str(lh), "--verify")
    w_hl, w_lh = load(hl).lm_head.weight, load(lh).lm_head.weight
    assert float((w_hl - w_lh).abs().max()) > 1e-3
    # L after H adds its delta onto H's full lm_head copy; H after L overwrites L's delta
    from safetensors.torch import load_file

    h_full = load_file(str(loras["H"] / "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    assert torch.equal(w_lh, h_full)
    assert not torch.equal(w_hl, h_full)


def test_resized_vocabulary_modules_to_save(tiny_model_dir: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    v = tmp_path / "V"
    merge("--base_model", str(tiny_model_dir), "--lora_weights", str(loras["V"]), "--output_dir", str(v), "--verify")
    tok = AutoTokenizer.from_pretrained(str(v))
    assert len(tok) == 3003 and tok.convert_tokens_to_ids("新词乙") == 3001  # the adapter's expanded tokenizer
    assert json.loads((v / "config.json").read_text())["vocab_size"] == 3003
    merged = load(v)
    assert merged.get_input_embeddings().weight.shape == (3003, 128) and merged.lm_head.weight.shape == (3003, 128)
    # reference: the base resized, V loaded by PEFT and not merged (its full embed_tokens/lm_head)
    base = load(tiny_model_dir)
    base.resize_token_embeddings(3003, mean_resizing=False)
    reference = PeftModel.from_pretrained(base, str(loras["V"]))
    batches = [*ids_for(tok), torch.tensor([[1, *tok("新词甲新词丙", add_special_tokens=False)["input_ids"]]])]
    assert max(int(b.max()) for b in batches) >= 3000  # the new rows are exercised
    assert max_abs(logits(merged, batches), logits(reference, batches)) < 1e-4

    # the chain V then A, merged by PEFT and by the low-memory path (W + s·B·A per shard): equal
    std, low = tmp_path / "VA", tmp_path / "VA-low"
    merge("--base_model", str(tiny_model_dir), "--lora_weights", f"{loras['V']},{loras['A']}", "--output_dir", str(std))
    merge(
        "--base_model", str(tiny_model_dir), "--lora_weights", f"{loras['V']},{loras['A']}", "--output_dir", str(low),
        "--low_mem", "--max_shard_size", "200KB",
    )  # fmt: skip
    assert len(list(low.glob("model-*.safetensors"))) > 1 and (low / "model.safetensors.index.json").is_file()
    assert len(AutoTokenizer.from_pretrained(str(low))) == 3003
    std_state = load(std).state_dict()
    low_model = load(low)
    worst = max(float((t - std_state[n]).abs().max()) for n, t in low_model.state_dict().items())
    assert worst < 1e-4, f"low-memory merge differs from PEFT's merge by {worst}"
    assert (
        float(
            (std_state["model.layers.0.self_attn.q_proj.weight"] - merged.state_dict()["model.layers.0.self_attn.q_proj.weight"])
            .abs()
            .max()
        )
        > 1e-3
    )


def test_pth_layout_round_trip(tiny_model_dir: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    hf, pth = tmp_path / "hf", tmp_path / "pth"
    merge("--base_model", str(tiny_model_dir), "--lora_weights", str(loras["B"]), "--output_dir", str(hf))
    merge(
        "--base_model",
        str(tiny_model_dir),
        "--lora_weights",
        str(loras["B"]),
        "--output_dir",
        str(pth),
        "--output_type",
        "pth",
        "--num_shards",
        "2",
    )
    assert sorted(p.name for p in pth.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    shards, params = load_meta(pth)
    assert params == {"dim": 128, "multiple_of": 128, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-06, "vocab_size": 3000}
    assert "layers.1.attention.wq.weight" in shards[0] and "tok_embeddings.weight" in shards[1]
    assert shards[0]["layers.0.feed_forward.w2.weight"].shape == (128, 192)  # row-parallel: split columns
    assert shards[0]["layers.0.feed_forward.w1.weight"].shape == (192, 128)  # column-parallel: split rows
    back = meta_to_hf(shards, params)
    state = load(hf).state_dict()
    assert set(back) == set(state)
    for name, t in state.items():
        assert torch.equal(back[name], t), name
    # q rows really moved (Meta's interleaved rotary layout), and the permutations are inverse
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(unpermute_qk(q, 4), q) and torch.equal(permute_qk(unpermute_qk(q, 4), 4), q)


def test_meta_params_of_known_models() -> None:
    llama7b = {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "rms_norm_eps": 1e-6,
        "vocab_size": 32000,
    }
    assert meta_params(llama7b) == {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": 32000}
    llama70b = {
        **llama7b,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
    }
    p = meta_params(llama70b)
    assert p["n_kv_heads"] == 8 and p["multiple_of"] == 4096 and abs(p["ffn_dim_multiplier"] - 1.3) < 1e-3


def test_verify_fails_above_tolerance(tiny_model_dir: Path, loras: dict[str, Path], tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        merge(
            "--base_model", str(tiny_model_dir), "--lora_weights", str(loras["A"]), "--output_dir", str(tmp_path / "o"),
            "--dtype", "bf16", "--verify", "--tolerance", "0",
        )  # fmt: skip
    assert exc.value.code == 1
    assert "verification failed" in capsys.readouterr().out


def test_clear_errors(tiny_model_dir: Path, loras: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from make_tiny_model import make_tiny_model

    other = make_tiny_model(tmp_path / "other-base", hidden_size=64, intermediate_size=176, num_layers=2)
    foreign = make_lora(other, tmp_path / "foreign", ["q_proj", "v_proj"], 7)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "adapter_config.json").write_text((loras["A"] / "adapter_config.json").read_text())
    # trained on a resized vocabulary (lm_head LoRA of 3001 rows) without the LoRA that resized it
    needs_resize = make_lora(
        tiny_model_dir, tmp_path / "needs-resize", ["q_proj", "lm_head"], 8, new_tokens=["新词甲"], save_embedding_layers=False
    )
    cases = {
        str(foreign): "was made for another base model",
        str(needs_resize): "lm_head outputs 3001 values but the base model's layer has 3000",
        str(incomplete): "no adapter_model.safetensors",
        str(tmp_path / "missing"): "folder not found",
    }
    for i, (lora, message) in enumerate(cases.items()):
        out = tmp_path / "x"
        argv = ["--base_model", str(tiny_model_dir), "--lora_weights", lora, "--output_dir", str(out)]
        if i == 0:  # the real command line once: exit code 2, one line, no traceback
            proc = run_script("merge_lora.py", *argv)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            err = proc.stderr
        else:
            with pytest.raises(SystemExit) as exc:
                merge(*argv)
            assert exc.value.code == 2
            err = capsys.readouterr().err
        assert message in err, err[-1000:]
        assert not out.exists() or not any(out.glob("*.safetensors"))


def test_repeated_lora_is_refused_unless_asked(
    tiny_model_dir: Path, loras: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import shutil

    twice = f"{loras['A']},{loras['B']},{loras['A']}"
    with pytest.raises(SystemExit) as exc:
        merge("--base_model", str(tiny_model_dir), "--lora_weights", twice, "--output_dir", str(tmp_path / "twice"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: --lora_weights: {loras['A']} is {loras['A']}: this LoRA would be merged twice (its delta added again); "
        "drop it, or pass --allow_repeated_lora true if that is meant"
    )
    merged = tmp_path / "merged-A"
    merge("--base_model", str(tiny_model_dir), "--lora_weights", str(loras["A"]), "--output_dir", str(merged))
    moved = shutil.copytree(loras["A"], tmp_path / "A-copy")  # the same LoRA under another name: found by its weights
    with pytest.raises(SystemExit):
        merge("--base_model", str(merged), "--lora_weights", str(moved), "--output_dir", str(tmp_path / "again"))
    assert f"already merged into {merged}, see its manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    with caplog.at_level(logging.WARNING):
        merge(
            "--base_model", str(merged), "--lora_weights", str(moved), "--output_dir", str(tmp_path / "again"),
            "--allow_repeated_lora", "true",
        )  # fmt: skip
    assert f"merging a LoRA again (--allow_repeated_lora): {moved} is {loras['A']}" in caplog.text
    assert (tmp_path / "again" / "model.safetensors").is_file()
