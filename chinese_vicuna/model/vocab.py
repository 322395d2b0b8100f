"""Chinese vocabulary expansion: train a sentencepiece model, merge it into a base tokenizer.

The merge works on sentencepiece's protobuf (as Chinese-LLaMA-Alpaca did): the base model's
pieces, normalizer and special pieces stay exactly as they are (so every old id keeps its
meaning and the base model's embeddings stay valid); the Chinese model's pieces that the base
lacks are appended after them.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chinese_vicuna.data.records import read_text_lines
from chinese_vicuna.errors import UserError

# Base-tokenizer files copied next to the merged tokenizer.model (special tokens, chat template,
# add_bos/add_eos); tokenizer.json is NOT copied: it is rebuilt from the merged model.
TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def is_chinese_char(ch: str) -> bool:
    """CJK unified ideographs (basic block and extensions A–F, compatibility ideographs)."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2EBEF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )


def count_chinese_chars(text: str) -> int:
    return sum(1 for ch in text if is_chinese_char(ch))


def tokens_per_chinese_char(encode: Callable[[str], Sequence[int]], text: str) -> float:
    """Tokens of `text` divided by its Chinese characters (lower = a denser Chinese vocabulary)."""
    n_chars = count_chinese_chars(text)
    if n_chars == 0:
        raise UserError("the test text has no Chinese characters; pass a Chinese text file")
    return len(encode(text)) / n_chars


def train_sentencepiece_model(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    character_coverage: float = 0.9995,
    max_sentence_length: int = 16384,
    num_threads: int = 1,
) -> bytes:
    """A BPE sentencepiece model with byte fallback (Chinese-LLaMA's settings), as bytes.

    Options that decide how text is cut follow LLaMA's tokenizer (digits split, identity
    normalization, dummy prefix), so that its pieces look like the base model's and merge.
    """
    import sentencepiece as spm

    lines = read_text_lines(files)
    if not lines:
        raise UserError(f"no text in {', '.join(map(str, files))}")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=max_sentence_length,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,  # a small corpus may not support vocab_size pieces
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise UserError(f"sentencepiece training failed: {str(exc).splitlines()[0]}") from None
    return buf.getvalue()


def load_model_proto(data: bytes, where: str) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError, whose module path varies by version
        raise UserError(f"{where}: not a sentencepiece model (protobuf parse failed)") from None
    if not proto.pieces:
        raise UserError(f"{where}: a sentencepiece model with no pieces")
    return proto


@dataclass
class MergeResult:
    model: bytes  # the merged sentencepiece model
    base_size: int
    added: list[str]  # pieces appended, in order (ids base_size, base_size + 1, ...)
    skipped_special: int  # control/unknown/byte pieces of the Chinese model, not copied

    @property
    def size(self) -> int:
        return self.base_size + len(self.added)


def merge_sentencepiece_models(base: bytes, chinese: bytes, base_where: str = "base", chinese_where: str = "chinese") -> MergeResult:
    """Append `chinese`'s normal pieces that `base` lacks to `base`.

    Everything of the base model is kept (trainer/normalizer specs, special and byte pieces,
    scores), so old ids and the way old text is normalized do not change. New pieces get
    scores below every base score, in the Chinese model's order: sentencepiece's BPE merges by
    score, so base merges keep priority and the new pieces' relative order is the one they
    were learned in.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    base_proto = load_model_proto(base, base_where)
    zh_proto = load_model_proto(chinese, chinese_where)
    if base_proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        # Unigram scores are log-probabilities; appending BPE-ranked pieces would be meaningless.
        raise UserError(f"{base_where}: the base tokenizer is not a BPE sentencepiece model; vocabulary merging needs LLaMA-style BPE")
    existing = {p.piece for p in base_proto.pieces}
    base_size = len(base_proto.pieces)
    lowest = min(p.score for p in base_proto.pieces)
    added: list[str] = []
    skipped = 0
    normal = sp_pb2.ModelProto.SentencePiece.NORMAL
    for piece in zh_proto.pieces:
        if piece.type != normal:
            skipped += 1
            continue
        if piece.piece in existing:
            continue
        new = base_proto.pieces.add()
        new.piece = piece.piece
        new.score = lowest - 1.0 - len(added)
        new.type = normal
        existing.add(piece.piece)
        added.append(piece.piece)
    base_proto.trainer_spec.vocab_size = len(base_proto.pieces)
    return MergeResult(base_proto.SerializeToString(), base_size, added, skipped)


def sp_model_path(tokenizer_dir: str | os.PathLike) -> Path:
    """`tokenizer.model` of a tokenizer folder (the sentencepiece model merging starts from)."""
    path = Path(tokenizer_dir)
    if path.is_file():
        return path
    model = path / "tokenizer.model"
    if not model.is_file():
        raise UserError(
            f"{path}: no tokenizer.model; vocabulary merging needs the base's sentencepiece model (LLaMA 1/2-style tokenizers ship one)"
        )
    return model


def write_hf_tokenizer(sp_model: bytes, out_dir: str | os.PathLike, like: str | os.PathLike | None = None) -> Any:
    """A Hugging Face tokenizer folder for a sentencepiece model; returns the loaded tokenizer.

    The base folder's `tokenizer_config.json` etc. (`like`) are copied first so that special
    tokens and add_bos/add_eos carry over; transformers then converts tokenizer.model into a
    fast tokenizer and writes tokenizer.json. Written to a temporary folder, then moved in.
    """
    from transformers import LlamaTokenizer

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if like is not None and Path(like).is_dir():
        for name in TOKENIZER_CONFIG_FILES:
            if (Path(like) / name).is_file():
                shutil.copy2(Path(like) / name, tmp / name)
    (tmp / "tokenizer.model").write_bytes(sp_model)
    add_bos, add_eos = adds_bos_eos(like) if like is not None else (True, False)
    tokenizer = LlamaTokenizer.from_pretrained(str(tmp), add_bos_token=add_bos, add_eos_token=add_eos)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        for child in tmp.iterdir():  # keep other files of an existing folder, replace ours
            os.replace(child, out / child.name)
        tmp.rmdir()
    else:
        os.replace(tmp, out)
    return LlamaTokenizer.from_pretrained(str(out))


def adds_bos_eos(tokenizer_dir: str | os.PathLike) -> tuple[bool, bool]:
    """Whether a tokenizer folder's tokenizer adds BOS / EOS to encoded text.

    transformers 5 keeps this in tokenizer.json's post-processor, not in tokenizer_config.json,
    so a rebuilt tokenizer would silently lose it; ask the base tokenizer itself.
    """
    from transformers import AutoTokenizer

    if not Path(tokenizer_dir).is_dir() or not any(
        (Path(tokenizer_dir) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")
    ):
        return True, False  # LLaMA's behaviour
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id, bool(ids) and ids[-1] == tok.eos_token_id


def sp_hf_mismatches(sp_model: bytes, tokenizer: Any, texts: Iterable[str], limit: int = 5) -> list[str]:
    """Texts whose ids differ between sentencepiece and the HF tokenizer (no special tokens)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    bad: list[str] = []
    for text in texts:
        want = sp.encode(text)
        have = tokenizer(text, add_special_tokens=False)["input_ids"]
        if want != have:
            bad.append(text)
            if len(bad) >= limit:
                break
    return bad
