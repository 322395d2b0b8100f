"""tools/convert_meta_to_hf.py: Meta checkpoints → HF. Round trips HF → merge_lora.py --output_type pth
→ back are bit-identical for 1 and 2 shards, GQA, and a vocabulary that does not divide by the
shard count (Chinese-LLaMA-13B's 49953 rows over 2 shards); checksums are checked first."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from test_upstream import make_lora

from chinese_vicuna.errors import UserError


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def odd_vocab_base(tiny_model_dir: Path, out: Path) -> Path:
    """The tiny model with one added token: 3001 rows, as Chinese-LLaMA adds 17953 to LLaMA's 32000."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.add_tokens(["新词甲"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "tokenizer.model").write_bytes((tiny_model_dir / "tokenizer.model").read_bytes())
    return out


@pytest.mark.parametrize(("case", "shards"), [("plain", 1), ("plain", 2), ("gqa", 2), ("odd-vocab", 2)])
def test_round_trip_is_bit_identical(tiny_model_dir: Path, tmp_path: Path, case: str, shards: int) -> None:
    from convert_meta_to_hf import main as convert_main

    import merge_lora

    if case == "gqa":
        from make_tiny_model import make_tiny_model

        base = make_tiny_model(tmp_path / "gqa-base", num_kv_heads=2)
    elif case == "odd-vocab":
        base = odd_vocab_base(tiny_model_dir, tmp_path / "odd-base")
    else:
        base = tiny_model_dir
    lora = tmp_path / "lora"
    make_lora(base, lora, safe=True)
    hf, pth, back = tmp_path / "hf", tmp_path / "pth", tmp_path / "back"
    merge_lora.main(["--base_model", str(base), "--lora_weights", str(lora), "--output_dir", str(hf)])
    merge_lora.main(
        [
            "--base_model",
            str(base),
            "--lora_weights",
            str(lora),
            "--output_dir",
            str(pth),
            "--output_type",
            "pth",
            "--num_shards",
            str(shards),
        ]
    )
    assert len(list(pth.glob("consolidated.*.pth"))) == shards
    if case == "odd-vocab":
        parts = [torch.load(p, weights_only=True)["output.weight"].shape[0] for p in sorted(pth.glob("consolidated.*.pth"))]
        assert parts == [1500, 1501]  # the last shard takes the remainder, as Chinese-LLaMA-Alpaca splits 49953
    convert_main(["--input_dir", str(pth), "--output_dir", str(back)])
    want, got = load_state(hf), load_state(back)
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    from transformers import AutoConfig, AutoTokenizer

    a, b = AutoConfig.from_pretrained(str(hf)), AutoConfig.from_pretrained(str(back))
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
    ):
        assert getattr(a, key) == getattr(b, key), key
    text = "中国的首都是北京。Hello 123"
    assert (
        AutoTokenizer.from_pretrained(str(back))(text)["input_ids"] == AutoTokenizer.from_pretrained(str(tiny_model_dir))(text)["input_ids"]
    )


def test_checksums_are_checked_before_converting(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from convert_meta_to_hf import main as convert_main

    import merge_lora

    lora = tmp_path / "lora"
    make_lora(tiny_model_dir, lora, safe=True)
    pth = tmp_path / "pth"
    merge_lora.main(["--base_model", str(tiny_model_dir), "--lora_weights", str(lora), "--output_dir", str(pth), "--output_type", "pth"])
    md5 = hashlib.md5((pth / "consolidated.00.pth").read_bytes(), usedforsecurity=False).hexdigest()
    sha = hashlib.sha256((pth / "params.json").read_bytes()).hexdigest()
    (pth / "checklist.chk").write_text(f"{md5}  consolidated.00.pth\n{sha}  params.json\n")
    convert_main(["--input_dir", str(pth), "--output_dir", str(tmp_path / "ok")])
    assert (tmp_path / "ok" / "model.safetensors").is_file()
    (pth / "checklist.chk").write_text(f"{'0' * 32}  consolidated.00.pth\n")
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--input_dir", str(pth), "--output_dir", str(tmp_path / "bad")])
    assert exit_info.value.code == 2 and "the download is damaged" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_missing_files_are_clear_errors(tmp_path: Path) -> None:
    from convert_meta_to_hf import ConvertMetaArguments, convert_meta

    with pytest.raises(UserError, match=r"no consolidated\.NN\.pth|no params\.json"):
        convert_meta(ConvertMetaArguments(input_dir=str(tmp_path), output_dir=str(tmp_path / "out")))


def test_round_trip_keeps_the_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    """merge_lora.py --output_type pth writes the template files beside the .pth; converting back
    carries them, so the HF folder asks the model exactly as the one merged directly (same ids
    from stock `apply_chat_template`)."""
    from convert_meta_to_hf import main as convert_main
    from transformers import AutoTokenizer

    import merge_lora

    lora = tmp_path / "lora"
    make_lora(tiny_model_dir, lora, safe=True)
    hf, pth, back = tmp_path / "hf", tmp_path / "pth", tmp_path / "back"
    common = ["--base_model", str(tiny_model_dir), "--lora_weights", str(lora), "--prompt_template", "chinese-vicuna-chat"]
    merge_lora.main([*common, "--output_dir", str(hf)])
    merge_lora.main([*common, "--output_dir", str(pth), "--output_type", "pth"])
    assert (pth / "prompt_template.json").is_file() and (pth / "chat_template.jinja").is_file()
    convert_main(["--input_dir", str(pth), "--output_dir", str(back)])
    for name in ("prompt_template.json", "chat_template.jinja"):
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "Hi"}]
    want = AutoTokenizer.from_pretrained(str(hf)).apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert AutoTokenizer.from_pretrained(str(back)).apply_chat_template(chat, add_generation_prompt=True, return_dict=False) == want

    # a Meta folder with only a Jinja template (from another tool): copied as it is
    (pth / "prompt_template.json").unlink()
    (pth / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    convert_main(["--input_dir", str(pth), "--output_dir", str(tmp_path / "back2")])
    assert not (tmp_path / "back2" / "prompt_template.json").exists()
    assert (tmp_path / "back2" / "chat_template.jinja").read_bytes() == (pth / "chat_template.jinja").read_bytes()
