"""Vocabulary expansion: tools/train_tokenizer.py + tools/merge_tokenizers.py, and resizing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from chinese_vicuna.errors import UserError
from chinese_vicuna.model.adapters import resize_to_adapter
from chinese_vicuna.model.loading import check_vocab, load_tokenizer, resize_embeddings
from chinese_vicuna.model.vocab import merge_sentencepiece_models, tokens_per_chinese_char
from conftest import REPO, run_script

TEST_TEXT = REPO / "sample" / "pretrain" / "zh_4.txt"  # not used to train the Chinese model


def proto(path: Path) -> sp_pb2.ModelProto:
    m = sp_pb2.ModelProto()
    m.ParseFromString(path.read_bytes())
    return m


def test_merged_tokenizer_keeps_old_ids_appends_new_and_is_denser(english_base_dir: Path, expanded_tokenizer_dir: Path) -> None:
    base, merged = proto(english_base_dir / "tokenizer.model"), proto(expanded_tokenizer_dir / "tokenizer.model")
    n_base = len(base.pieces)
    # every old piece keeps its id, score and type; the base's normalizer is kept
    assert [(p.piece, p.score, p.type) for p in merged.pieces[:n_base]] == [(p.piece, p.score, p.type) for p in base.pieces]
    assert merged.normalizer_spec == base.normalizer_spec
    new = merged.pieces[n_base:]
    assert len(new) > 1000
    assert all(p.type == sp_pb2.ModelProto.SentencePiece.NORMAL for p in new)
    assert len({p.piece for p in merged.pieces}) == len(merged.pieces)  # no duplicate piece
    assert {"中国", "茶叶", "长江"} <= {p.piece for p in new}

    report = json.loads((expanded_tokenizer_dir.parent / "merge_report.json").read_text())
    print("merge report:", report)
    assert report["base_pieces"] == n_base and report["added_pieces"] == len(new)
    assert report["tokens_per_chinese_char_after"] < 0.5 * report["tokens_per_chinese_char_before"]

    sp_base = spm.SentencePieceProcessor(model_file=str(english_base_dir / "tokenizer.model"))
    sp_merged = spm.SentencePieceProcessor(model_file=str(expanded_tokenizer_dir / "tokenizer.model"))
    text = TEST_TEXT.read_text(encoding="utf-8")
    paragraphs = "\n".join(line for line in text.splitlines() if line.strip())  # what the tool measures
    assert tokens_per_chinese_char(sp_merged.encode, paragraphs) == pytest.approx(report["tokens_per_chinese_char_after"], abs=1e-4)
    assert tokens_per_chinese_char(sp_base.encode, paragraphs) == pytest.approx(report["tokens_per_chinese_char_before"], abs=1e-4)
    # English text is cut exactly as before: the base's merges keep priority
    english = (english_base_dir.parent / "english.txt").read_text(encoding="utf-8").splitlines()
    assert [sp_merged.encode(line) for line in english] == [sp_base.encode(line) for line in english]

    # the Hugging Face tokenizer (converted by transformers from tokenizer.model) gives sentencepiece's ids
    tok = load_tokenizer(str(expanded_tokenizer_dir))
    assert len(tok) == len(merged.pieces)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    lines = [line for line in text.splitlines() if line.strip()]
    lines += ["中文与English混排，标点：「」（）！？……", "数字2024年和3.14。", "茶叶 tea 茶\n第二行"]
    for line in lines:
        assert tok(line, add_special_tokens=False)["input_ids"] == sp_merged.encode(line), line
    assert tok("中国")["input_ids"][0] == tok.bos_token_id
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_merge_protobuf_rules(english_base_dir: Path, expanded_tokenizer_dir: Path) -> None:
    base_bytes = (english_base_dir / "tokenizer.model").read_bytes()
    zh_bytes = (expanded_tokenizer_dir.parent / "zh.model").read_bytes()
    result = merge_sentencepiece_models(base_bytes, zh_bytes)
    assert result.model == (expanded_tokenizer_dir / "tokenizer.model").read_bytes()  # the tool wrote exactly this
    # merging again adds nothing: every piece is already there
    again = merge_sentencepiece_models(result.model, zh_bytes)
    assert again.added == [] and again.model == result.model
    # new pieces score below every base piece, in the Chinese model's order
    merged = sp_pb2.ModelProto()
    merged.ParseFromString(result.model)
    scores = [p.score for p in merged.pieces]
    assert max(scores[result.base_size :]) < min(scores[: result.base_size])
    assert scores[result.base_size :] == sorted(scores[result.base_size :], reverse=True)


def test_merge_tokenizers_user_errors(tmp_path: Path, english_base_dir: Path, expanded_tokenizer_dir: Path) -> None:
    zh = str(expanded_tokenizer_dir.parent / "zh.model")
    proc = run_script(
        "tools/merge_tokenizers.py", "--base_tokenizer", str(tmp_path), "--chinese_sp_model", zh, "--output_dir", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and f"error: {tmp_path}: no tokenizer.model" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    proc = run_script(
        "tools/merge_tokenizers.py",
        "--base_tokenizer",
        str(english_base_dir),
        "--chinese_sp_model",
        str(bad),
        "--output_dir",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2 and f"error: {bad}: not a sentencepiece model" in proc.stderr
    proc = run_script(
        "tools/train_tokenizer.py", "--input", str(tmp_path / "missing.txt"), "--model_prefix", str(tmp_path / "zh"), "--vocab_size", "500"
    )
    assert proc.returncode == 2 and "missing.txt: text file not found" in proc.stderr


def test_resize_mean_rows_and_vocab_mismatch_messages(english_base_dir: Path, expanded_tokenizer_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(english_base_dir))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    big = load_tokenizer(str(expanded_tokenizer_dir))
    small = load_tokenizer(str(english_base_dir))
    with pytest.raises(UserError, match=rf"tokenizer has {len(big)} tokens but {english_base_dir} has {len(small)} embedding rows"):
        check_vocab(model, big, str(english_base_dir))

    assert resize_embeddings(model, len(big)) == len(big) - len(small)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(emb[: len(small)], old_in) and torch.equal(out[: len(small)], old_out)
    assert torch.allclose(emb[len(small) :], old_in.mean(0).expand(len(big) - len(small), -1))
    assert torch.allclose(out[len(small) :], old_out.mean(0).expand(len(big) - len(small), -1))
    assert model.config.vocab_size == len(big)
    # the expanded model with the old tokenizer: both sizes and the file to fix
    with pytest.raises(UserError, match=rf"{english_base_dir} has {len(small)} tokens but M/config.json has vocab_size {len(big)}"):
        check_vocab(model, small, "M")
    check_vocab(model, big, "M")


def test_adapter_with_expanded_vocab_needs_its_tokenizer(tmp_path: Path, english_base_dir: Path, expanded_tokenizer_dir: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    big = load_tokenizer(str(expanded_tokenizer_dir))
    small = load_tokenizer(str(english_base_dir))
    (tmp_path / "adapter_config.json").write_text("{}")
    save_file({"base_model.model.model.embed_tokens.weight": torch.zeros(len(big), 128)}, str(tmp_path / "adapter_model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(english_base_dir))
    with pytest.raises(UserError, match=rf"has {len(big)} embedding rows but the tokenizer {english_base_dir} has {len(small)} tokens"):
        resize_to_adapter(model, str(tmp_path), small)
    resize_to_adapter(model, str(tmp_path), big)
    assert model.get_input_embeddings().weight.shape[0] == len(big)
