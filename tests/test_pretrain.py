"""tools/pretrain.py: text blocks (cached), --stage embeddings, perplexity, vocabulary checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chinese_vicuna.data.datasets import load_pretrain_dataset
from chinese_vicuna.data.encode import IGNORE_INDEX
from chinese_vicuna.data.pretrain import group_into_blocks
from chinese_vicuna.model.loading import load_tokenizer
from conftest import REPO

PRETRAIN_DIR = REPO / "sample" / "pretrain"


def pretrain_args(base: Path, tokenizer: Path, out: Path, stage: str, max_steps: int, *extra: str) -> list[str]:
    return [
        "tools/pretrain.py",
        "--base_model", str(base), "--tokenizer_path", str(tokenizer),
        "--dataset_dir", str(PRETRAIN_DIR), "--output_dir", str(out),
        "--stage", stage, "--block_size", "64", "--val_set_size", "16",
        "--micro_batch_size", "8", "--batch_size", "8", "--max_steps", str(max_steps),
        "--learning_rate", "1e-2", "--warmup_steps", "0", "--logging_steps", "5",
        "--save_steps", "1000", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def embeddings_run(english_base_dir: Path, expanded_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pretrain import main  # in-process: the chain test runs the script as a subprocess

    out = tmp_path_factory.mktemp("pt") / "pt-embeddings"
    main(pretrain_args(english_base_dir, expanded_tokenizer_dir, out, "embeddings", 20)[1:])
    return out


def test_text_blocks_are_concatenated_documents_and_cached(expanded_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(expanded_tokenizer_dir))
    blocks = load_pretrain_dataset(PRETRAIN_DIR, tok, 64, cache_dir=tmp_path).to_list()
    # every paragraph is [bos] ids [eos]; the stream is cut into 64-token blocks, the tail dropped
    stream: list[int] = []
    for path in sorted(PRETRAIN_DIR.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                stream += [tok.bos_token_id, *tok(line, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert len(blocks) == len(stream) // 64
    assert [b["input_ids"] for b in blocks] == [stream[i * 64 : (i + 1) * 64] for i in range(len(blocks))]
    assert all(b["labels"] == b["input_ids"] and IGNORE_INDEX not in b["labels"] for b in blocks)
    # the second load comes from the cache file (same blocks), a new block size does not
    (cached,) = tmp_path.iterdir()
    assert load_pretrain_dataset(PRETRAIN_DIR, tok, 64, cache_dir=tmp_path).to_list() == blocks
    assert not (cached / "labels.bin").exists()  # labels are the ids: stored once
    first = np.memmap(cached / "input_ids.bin", dtype=np.int32, mode="r+", shape=(1,))
    first[0] = 7  # proof that the cache is what is read
    first.flush()
    del first
    assert load_pretrain_dataset(PRETRAIN_DIR, tok, 64, cache_dir=tmp_path)[0]["labels"][0] == 7
    assert len(load_pretrain_dataset(PRETRAIN_DIR, tok, 32, cache_dir=tmp_path)) == len(stream) // 32
    assert group_into_blocks([[1, 2, 3], [4, 5]], 2) == ([[1, 2], [3, 4]], 1)


def test_stage_embeddings_trains_only_embeddings_and_lowers_perplexity(
    embeddings_run: Path, english_base_dir: Path, expanded_tokenizer_dir: Path
) -> None:
    report = json.loads((embeddings_run / "perplexity.json").read_text())
    print("stage embeddings, held-out perplexity:", report)
    assert report["stage"] == "embeddings" and report["eval_blocks"] == 16
    assert report["perplexity_after"] < 0.5 * report["perplexity_before"]

    base = load_file(str(english_base_dir / "model.safetensors"))
    trained = load_file(str(embeddings_run / "model.safetensors"))
    assert trained.keys() == base.keys()
    n_old, n_new = base["model.embed_tokens.weight"].shape[0], len(load_tokenizer(str(expanded_tokenizer_dir)))
    for name, weight in base.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert trained[name].shape == (n_new, weight.shape[1])
            assert not torch.equal(trained[name][:n_old], weight), name  # trained
        else:
            assert torch.equal(trained[name], weight), f"{name} changed in --stage embeddings"
    # the output folder is a complete model for the next stage: config, tokenizer (with tokenizer.model)
    assert json.loads((embeddings_run / "config.json").read_text())["vocab_size"] == n_new
    assert (embeddings_run / "tokenizer.model").read_bytes() == (expanded_tokenizer_dir / "tokenizer.model").read_bytes()
    assert len(load_tokenizer(str(embeddings_run))) == n_new


def test_tokenizer_smaller_than_model_stops_with_both_sizes(
    embeddings_run: Path, english_base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pretrain import main

    with pytest.raises(SystemExit) as exit_info:
        main(pretrain_args(embeddings_run, english_base_dir, tmp_path / "o", "lora", 1)[1:])
    n_model = json.loads((embeddings_run / "config.json").read_text())["vocab_size"]
    assert exit_info.value.code == 2
    assert f"error: {english_base_dir} has 600 tokens but {embeddings_run}/config.json has vocab_size {n_model}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stage", "full"], "error: --stage 'full': use embeddings or lora"),
        (
            ["--stage", "embeddings", "--precision", "8bit"],
            "error: --stage embeddings saves the whole model and cannot train a quantized one",
        ),
        (["--stage", "lora", "--dataset_dir", "missing-dir"], "error: --dataset_dir missing-dir: folder not found"),
    ],
)
def test_pretrain_user_errors(
    extra: list[str], message: str, english_base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pretrain import main

    args = pretrain_args(english_base_dir, english_base_dir, tmp_path / "o", "lora", 1)[1:]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_interrupted_lora_stage_resumes_to_the_same_adapter(english_base_dir: Path, expanded_tokenizer_dir: Path, tmp_path: Path) -> None:
    import shutil

    from pretrain import main

    def run(out: Path, *extra: str) -> dict[str, torch.Tensor]:
        args = pretrain_args(english_base_dir, expanded_tokenizer_dir, out, "lora", 6, "--save_steps", "3", "--val_set_size", "0")[1:]
        main([*args, "--lora_dropout", "0", *extra])
        return load_file(str(out / "adapter_model.safetensors"))

    whole = run(tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    # an interrupted run: only checkpoint-3 exists; resuming trains steps 4-6
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = run(tmp_path / "resumed", "--resume_from_checkpoint", "true")
    assert resumed.keys() == whole.keys()
    for name, weight in whole.items():
        assert torch.allclose(resumed[name], weight, atol=1e-6), name
    # the pretraining adapter (resized vocabulary + full embeddings) works for inference unmerged:
    # its own tokenizer is picked up and the base grows to its vocabulary
    from chinese_vicuna.model.build import load_for_inference

    model, tok = load_for_inference(str(english_base_dir), str(tmp_path / "whole"), "fp32")
    assert len(tok) == len(load_tokenizer(str(expanded_tokenizer_dir)))
    assert model.get_input_embeddings().weight.shape[0] == whole["base_model.model.lm_head.weight"].shape[0]
    assert torch.equal(model.get_output_embeddings().weight, whole["base_model.model.lm_head.weight"])
    ids = tok("茶的历史", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    # and steps 4-6 did train: the result is not checkpoint-3's adapter
    at_3 = load_file(str(tmp_path / "resumed" / "checkpoint-3" / "adapter_model.safetensors"))
    assert not torch.equal(at_3["base_model.model.lm_head.weight"], resumed["base_model.model.lm_head.weight"])
