"""tools/make_delta.py + tools/apply_delta.py: base + (target − base) gives the target bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chinese_vicuna.export.tensors import TensorIndex
from conftest import manifest_problems, run_script


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = TensorIndex(folder)
    return {name: index.get(name) for name in index.shapes}


def write_model(folder: Path, tensors: dict[str, torch.Tensor], like: Path, shards: int = 2) -> Path:
    """A model folder (config + tokenizer of `like`) holding `tensors` in `shards` files."""
    folder.mkdir(parents=True)
    for item in like.iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            shutil.copyfile(item, folder / item.name)
    names = sorted(tensors)
    for i in range(shards):
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"), metadata={"format": "pt"})
    import json

    weight_map = {n: f"model-{names.index(n) % shards + 1:05d}-of-{shards:05d}.safetensors" for n in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_delta_round_trip_is_exact(tiny_model_dir: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    from chinese_vicuna.export.delta import apply_delta, make_delta

    torch.manual_seed(0)
    base_t = {n: t.to(dtype) for n, t in load_file(str(tiny_model_dir / "model.safetensors")).items()}
    target_t = {n: (t.float() + torch.randn(t.shape) * 0.01).to(dtype) for n, t in base_t.items()}
    # a resized vocabulary (new rows), a tensor the base lacks, and values of very different size
    emb = base_t["model.embed_tokens.weight"]
    target_t["model.embed_tokens.weight"] = torch.cat([target_t["model.embed_tokens.weight"], torch.randn(7, emb.shape[1]).to(dtype)])
    target_t["lm_head.weight"] = torch.cat([target_t["lm_head.weight"], torch.randn(7, emb.shape[1]).to(dtype)])
    target_t["extra.weight"] = torch.randn(3, 5).to(dtype)
    target_t["model.norm.weight"][0] = 1e-30 if dtype != torch.float16 else 1e-7
    base_t["model.norm.weight"][0] = 3e4
    base = write_model(tmp_path / "base", base_t, tiny_model_dir)
    target = write_model(tmp_path / "target", target_t, tiny_model_dir, shards=3)

    make_delta(base, target, tmp_path / "delta", max_shard_size=200_000)
    assert len(list((tmp_path / "delta").glob("delta-*.safetensors"))) > 1
    apply_delta(base, tmp_path / "delta", tmp_path / "rebuilt")
    rebuilt = all_tensors(tmp_path / "rebuilt")
    assert set(rebuilt) == set(target_t)
    for name, t in target_t.items():
        assert rebuilt[name].dtype == t.dtype and torch.equal(rebuilt[name], t), name
    assert (tmp_path / "rebuilt" / "tokenizer.model").read_bytes() == (tiny_model_dir / "tokenizer.model").read_bytes()
    assert manifest_problems(tmp_path / "rebuilt") == []


def test_delta_cli_and_wrong_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    base_t = load_file(str(tiny_model_dir / "model.safetensors"))
    target_t = {n: t + 0.5 for n, t in base_t.items()}
    target = write_model(tmp_path / "target", target_t, tiny_model_dir)
    delta = tmp_path / "delta"
    import make_delta

    make_delta.main(["--base_model", str(tiny_model_dir), "--target_model", str(target), "--delta_path", str(delta)])
    # the delta alone is not the model: it is target − base
    d = all_tensors(delta)
    assert not torch.equal(d["lm_head.weight"], target_t["lm_head.weight"])

    wrong_t = dict(base_t)
    wrong_t["model.layers.1.mlp.up_proj.weight"] = wrong_t["model.layers.1.mlp.up_proj.weight"] * 1.001
    wrong = write_model(tmp_path / "wrong-base", wrong_t, tiny_model_dir)
    proc = run_script(
        "tools/apply_delta.py", "--base_model", str(wrong), "--delta_path", str(delta), "--target_model", str(tmp_path / "out")
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.layers.1.mlp.up_proj.weight differs from the base this delta was made from" in proc.stderr
    assert not any((tmp_path / "out").glob("*.safetensors"))
