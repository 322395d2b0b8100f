"""Merge LoRAs into a base model and export it: HF safetensors, Meta `.pth`, delta weights.

Shared by merge_lora.py, tools/make_delta.py, tools/apply_delta.py and tools/convert_to_gguf.py:

- `plan_merge` checks every size (tokenizers, embeddings, each adapter's shapes, resized
  vocabularies carried by `modules_to_save`) from file headers, before any weight is loaded.
- `merge_with_peft` merges with PEFT's own `merge_and_unload`, adapter after adapter;
  `merge_low_mem` streams the base one safetensors shard at a time (W + scale·B·A itself).
- `hf_to_meta` / `meta_to_hf` convert between HF and Meta's `consolidated.NN.pth` layout
  (q/k rotary permutation, model-parallel shards); `unpermute_qk` is also what GGUF needs.
- `ShardWriter`, `TensorIndex`, `write_manifest`: bounded-memory reading and writing of shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chinese_vicuna.errors import UserError
from chinese_vicuna.files import atomic_write_text
from chinese_vicuna.modeling import unused_vocab_rows

logger = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
DELTA_MANIFEST = "delta_manifest.json"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Meta's model-parallel degree by hidden size (7B, 13B, 33B, 65B/70B).
META_SHARDS_BY_DIM = {4096: 1, 5120: 2, 6656: 4, 8192: 8}
VERIFY_PROMPTS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n中国的首都是哪里？\n\n### Response:\n",
    "你好，请用一句话介绍一下你自己。",
    "User:一年有几个季节？\n\nAssistant:",
    "The quick brown fox jumps over the lazy dog.",
)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def parse_size(value: str | int) -> int:
    """`5GB`, `500MB`, `10KB` or a byte count → bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", value.upper())
    if not m:
        raise UserError(f"--max_shard_size {value!r}: use a size like 5GB, 500MB or a byte count")
    unit = (m.group(2) or "B").replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit])


def split_list(value: str) -> list[str]:
    """`A,B` → ["A", "B"] (the order of application)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UserError("--lora_weights is empty; give one adapter folder or a comma list A,B applied in that order")
    return items


def resolve_dtype(name: str, config: dict[str, Any]) -> torch.dtype:
    """`auto`: the base's own dtype (config.json), fp32 when it says nothing."""
    if name == "auto":
        stored = config.get("dtype") or config.get("torch_dtype") or "float32"
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(stored, torch.float32)
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: use auto, fp32, fp16 or bf16")
    return DTYPES[name]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def write_json(path: Path, data: Any) -> None:
    """Atomic: a reader never sees half a file."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_manifest(out_dir: Path, info: dict[str, Any] | None = None) -> Path:
    """`manifest.json`: SHA-256 and size of every file written in `out_dir`, plus provenance."""
    files = {}
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")):
        files[str(path.relative_to(out_dir))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = out_dir / "manifest.json"
    write_json(manifest, {**(info or {}), "files": files})
    return manifest


def check_manifest(out_dir: Path) -> list[str]:
    """Files whose SHA-256 no longer matches `manifest.json` (empty: all good)."""
    manifest = read_json(Path(out_dir) / "manifest.json")
    return [name for name, entry in manifest["files"].items() if sha256_file(Path(out_dir) / name) != entry["sha256"]]


class StagingDir:
    """Write into `out/.partial-*`, then move finished files into `out` (a crash leaves no half model)."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False) -> None:
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--output_dir {self.out}: exists and is not a folder")
        old = [p.name for p in self.out.glob("*") if p.suffix in (".safetensors", ".pth", ".bin")] if self.out.is_dir() else []
        if old and not overwrite:
            raise UserError(f"--output_dir {self.out}: already holds weights ({old[0]}, ...); pick an empty folder or pass --overwrite")
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=self.out, prefix=".partial-"))

    def commit(self) -> None:
        for old in self.out.glob("*"):
            if old.is_file() and (old.suffix in (".safetensors", ".pth", ".bin") or old.name in (SAFE_INDEX, "manifest.json")):
                old.unlink()  # stale shards of an earlier run would shadow the new index
        for item in self.path.iterdir():
            os.replace(item, self.out / item.name)
        self.path.rmdir()

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagingDir:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config, tokenizer and other small files; not weights, indexes or manifests."""
    for item in Path(src).iterdir():
        weights = item.suffix in (".safetensors", ".bin", ".pth") or item.name.endswith(".index.json")
        if item.is_file() and not weights and item.name not in ("manifest.json", DELTA_MANIFEST):
            shutil.copyfile(item, dst / item.name)


# --------------------------------------------------------------------------------------------
# Reading weights without loading them
# --------------------------------------------------------------------------------------------
class TensorIndex:
    """Names, shapes and files of a model folder's safetensors weights; tensors read one at a time."""

    def __init__(self, model_dir: str | os.PathLike, what: str = "model") -> None:
        from safetensors import safe_open

        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise UserError(f"{self.dir}: {what} folder not found")
        index = self.dir / SAFE_INDEX
        if index.is_file():
            names = sorted(set(read_json(index)["weight_map"].values()))
            self.files = [self.dir / n for n in names]
        else:
            self.files = sorted(self.dir.glob("*.safetensors"))
        if not self.files:
            bins = sorted(self.dir.glob("pytorch_model*.bin"))
            hint = " (it has pytorch_model*.bin: load and save it once with save_pretrained(safe_serialization=True))" if bins else ""
            raise UserError(f"{self.dir}: no *.safetensors weights{hint}")
        self.location: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for path in self.files:
            if not path.is_file():
                raise UserError(f"{index}: lists {path.name}, which is missing")
            with safe_open(str(path), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    sl = f.get_slice(name)
                    self.location[name] = path
                    self.shapes[name] = tuple(sl.get_shape())
                    self.dtypes[name] = sl.get_dtype()
        self._open: dict[Path, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.location[name]
        if path not in self._open:
            self._open = {path: safe_open(str(path), "pt")}  # keep one file open: bounded memory
        return self._open[path].get_tensor(name)

    def iter_files(self) -> Iterator[tuple[Path, list[str]]]:
        for path in self.files:
            yield path, [n for n, p in self.location.items() if p == path]

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


class ShardWriter:
    """Safetensors shards of at most `max_shard_size` bytes, named and indexed as HF does."""

    def __init__(self, out_dir: Path, max_shard_size: int, prefix: str = "model") -> None:
        self.out, self.max, self.prefix = out_dir, max_shard_size, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out / f".{self.prefix}-part{len(self.written):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Rename parts to `model-0000i-of-0000n.safetensors` (or `model.safetensors`) + index."""
        self.flush()
        n = len(self.written)
        weight_map, final = {}, []
        for i, (path, names) in enumerate(self.written, 1):
            name = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out / name)
            final.append(self.out / name)
            weight_map.update(dict.fromkeys(names, name))
        if n > 1:
            write_json(
                self.out / f"{self.prefix}.safetensors.index.json", {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            )
        return final


# --------------------------------------------------------------------------------------------
# Checking sizes before any work
# --------------------------------------------------------------------------------------------
def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def tokenizer_length(folder: Path) -> int:
    from chinese_vicuna.modeling import load_tokenizer

    return len(load_tokenizer(str(folder)))


@dataclass
class AdapterInfo:
    path: Path
    config: dict[str, Any]
    weights: Path
    shapes: dict[str, tuple[int, ...]]
    embed_rows: int | None = None  # full embed_tokens saved (modules_to_save, resized vocabulary)
    head_rows: int | None = None  # full lm_head saved
    tokenizer_len: int | None = None


@dataclass
class MergePlan:
    base: Path
    config: dict[str, Any]
    adapters: list[AdapterInfo]
    vocab_at: list[int]  # embedding rows the model must have when adapter i is applied
    final_vocab: int
    tokenizer_dir: Path
    tokenizer_len: int
    notes: list[str] = field(default_factory=list)


def inner_name(adapter_key: str) -> str:
    """`base_model.model.model.layers.0.q_proj.lora_A.weight` → `model.layers.0.q_proj.lora_A.weight`."""
    return adapter_key.split("base_model.model.", 1)[-1]


def read_adapter(folder: str | os.PathLike) -> AdapterInfo:
    from safetensors import safe_open

    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--lora_weights {path}: folder not found (give a PEFT adapter folder: the output_dir or a checkpoint-N)")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path}: no adapter_config.json; --lora_weights must be a PEFT adapter folder")
    config = read_json(cfg_path)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        hint = " (only adapter_model.bin: load it with PEFT and save_pretrained it again)" if (path / "adapter_model.bin").is_file() else ""
        raise UserError(f"{path}: no adapter_model.safetensors; the adapter folder is incomplete{hint}")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {config.get('peft_type')!r}; only LoRA adapters can be merged")
    shapes = {}
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            shapes[inner_name(key)] = tuple(f.get_slice(key).get_shape())
    info = AdapterInfo(path, config, weights, shapes)
    for name, shape in shapes.items():
        if name.endswith("embed_tokens.weight"):
            info.embed_rows = shape[0]
        elif name.endswith("lm_head.weight"):
            info.head_rows = shape[0]
    if has_tokenizer(path):
        info.tokenizer_len = tokenizer_length(path)
    return info


def _lora_module_checks(info: AdapterInfo, base_shapes: dict[str, tuple[int, ...]], vocab: int) -> None:
    """Every LoRA pair must fit the module it adapts: a LoRA for another base fails here."""
    for name, shape in info.shapes.items():
        m = re.match(r"(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?\.weight$", name) or re.match(
            r"(.*)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$", name
        )
        if not m:
            continue
        module, kind = m.group(1), m.group(2)
        target = base_shapes.get(module + ".weight")
        if target is None:
            raise UserError(
                f"{info.weights}: adapts {module}, which the base model does not have: this LoRA was made for another model architecture"
            )
        rows, cols = target
        if module.endswith(("embed_tokens", "lm_head")):
            rows = vocab
        if kind == "lora_A" and shape[1] != cols:
            raise UserError(
                f"{info.weights}: {module} expects inputs of size {shape[1]} but the base model's layer has {cols}: "
                "this LoRA was made for another base model"
            )
        if kind == "lora_B" and shape[0] != rows:
            raise UserError(
                f"{info.weights}: {module} outputs {shape[0]} values but the base model's layer has {rows}: "
                "this LoRA was made for another base model (or another vocabulary)"
            )
        if kind == "lora_embedding_A" and shape[1] != vocab:
            raise UserError(
                f"{info.weights}: {module} has a LoRA over {shape[1]} tokens but the model has {vocab} embedding rows at this point: "
                "apply the adapter that resized the vocabulary first, or use the matching base"
            )


def plan_merge(base_model: str | os.PathLike, lora_dirs: list[str]) -> MergePlan:
    """Check tokenizers, embeddings and every adapter against each other; say which file disagrees."""
    base = Path(base_model)
    if not base.is_dir():
        raise UserError(f"--base_model {base}: folder not found (merging needs a local Hugging Face model folder)")
    config = read_json(base / "config.json")
    index = TensorIndex(base, "base model")
    base_shapes = {n: s for n, s in index.shapes.items() if len(s) == 2}
    vocab = int(config.get("vocab_size") or base_shapes.get("model.embed_tokens.weight", (0,))[0])
    embed = base_shapes.get("model.embed_tokens.weight")
    if embed is not None and embed[0] != vocab:
        raise UserError(f"{base / 'config.json'}: vocab_size {vocab} but model.embed_tokens.weight has {embed[0]} rows; fix config.json")
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in base_shapes
    base_tok = tokenizer_length(base) if has_tokenizer(base) else None
    if base_tok is not None and base_tok > vocab:
        raise UserError(
            f"{base}: the tokenizer has {base_tok} tokens but the model has {vocab} embedding rows; use this model's own tokenizer"
        )
    plan = MergePlan(base, config, [], [], vocab, base, base_tok or 0)
    tokenizer_dir, tokenizer_len = (base, base_tok) if base_tok is not None else (None, None)
    for folder in lora_dirs:
        info = read_adapter(folder)
        rows = info.embed_rows
        if rows is not None and rows != vocab:
            if info.head_rows is None and not tied:
                raise UserError(
                    f"{info.weights}: embed_tokens has {rows} rows (the model has {vocab}) but no lm_head is saved: a resized "
                    "vocabulary needs both embed_tokens and lm_head in modules_to_save"
                )
            if info.head_rows is not None and info.head_rows != rows:
                raise UserError(
                    f"{info.weights}: embed_tokens has {rows} rows but lm_head has {info.head_rows}; the adapter is inconsistent"
                )
            plan.notes.append(f"{info.path.name}: vocabulary resized {vocab} → {rows}")
        elif rows is None and info.head_rows is not None and info.head_rows != vocab:
            raise UserError(
                f"{info.weights}: lm_head has {info.head_rows} rows but the model has {vocab} at this point: this LoRA belongs to another "
                "vocabulary; apply the adapter that resized it first"
            )
        new_vocab = rows if rows is not None else vocab
        plan.vocab_at.append(new_vocab)
        _lora_module_checks(info, base_shapes, new_vocab)
        if info.tokenizer_len is not None:
            if info.tokenizer_len > new_vocab:
                raise UserError(
                    f"{info.path}: its tokenizer has {info.tokenizer_len} tokens but the model has {new_vocab} embedding rows after "
                    f"applying it (base {base} and the adapters before it): merge the pretraining LoRA that resized the vocabulary first, "
                    "or use the matching base"
                )
            tokenizer_dir, tokenizer_len = info.path, info.tokenizer_len
        vocab = new_vocab
        plan.adapters.append(info)
    if tokenizer_dir is None:
        raise UserError(f"{base}: no tokenizer (tokenizer.json / tokenizer.model) in the base or any adapter folder")
    if tokenizer_len is not None and tokenizer_len > vocab:
        raise UserError(f"{tokenizer_dir}: the tokenizer has {tokenizer_len} tokens but the merged model has {vocab} embedding rows")
    if tokenizer_len is not None and unused_vocab_rows(tokenizer_len, vocab):
        raise UserError(
            f"{tokenizer_dir}: the tokenizer has {tokenizer_len} tokens but the merged model has {vocab} embedding rows (a resized "
            "vocabulary): put the expanded tokenizer in the adapter folder that resized it (save it there with save_pretrained)"
        )
    plan.final_vocab, plan.tokenizer_dir, plan.tokenizer_len = vocab, tokenizer_dir, tokenizer_len or 0
    return plan


def copy_tokenizer(plan: MergePlan, out: Path) -> None:
    """The tokenizer files of the last folder that has a tokenizer, byte for byte.

    Adapter folders written by transformers 5 hold tokenizer.json but no tokenizer.model; the
    GGUF converter needs the sentencepiece file, so take it from an earlier folder when its
    pieces are exactly the tokenizer's (same vocabulary), never otherwise.
    """
    for name in TOKENIZER_FILES:
        src = plan.tokenizer_dir / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    if (out / "tokenizer.model").is_file():
        return
    candidates = [a.path for a in reversed(plan.adapters)] + [plan.base]
    for folder in candidates:
        sp = folder / "tokenizer.model"
        if sp.is_file() and sentencepiece_matches(sp, out):
            shutil.copyfile(sp, out / "tokenizer.model")
            return


def sentencepiece_matches(sp_model: Path, tokenizer_dir: Path) -> bool:
    import sentencepiece as spm

    from chinese_vicuna.modeling import load_tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_tokenizer(str(tokenizer_dir))
    n = sp.get_piece_size()
    return n <= len(tok) and tok.convert_ids_to_tokens(list(range(n))) == [sp.id_to_piece(i) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Merging with PEFT
# --------------------------------------------------------------------------------------------
def verify_ids(tokenizer: Any, vocab: int) -> list[list[int]]:
    """Token ids of the verification prompts (ids past an intermediate vocabulary → unk)."""
    unk = tokenizer.unk_token_id or 0
    out = []
    for text in VERIFY_PROMPTS:
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        out.append([i if i < vocab else unk for i in ids if i is not None])
    return out


@torch.inference_mode()
def prompt_logits(model: Any, batches: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in batches]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def merge_with_peft(plan: MergePlan, tokenizer: Any, verify: bool = False) -> tuple[Any, list[dict[str, Any]]]:
    """Base in fp32 + each adapter in order through PEFT's merge_and_unload.

    With `verify`, the unmerged PeftModel's logits are compared with the merged model's at
    every step (the same model object, so nothing else differs).
    """
    from chinese_vicuna.modeling import check_special_tokens, load_base_model, load_lora

    model = load_base_model(str(plan.base), "fp32")
    check_special_tokens(model, tokenizer, str(plan.base))
    model.eval()
    report = []
    for info, vocab in zip(plan.adapters, plan.vocab_at, strict=True):
        if model.get_input_embeddings().weight.shape[0] != vocab:
            # The adapter's full embed_tokens/lm_head (modules_to_save) fill every row.
            model.resize_token_embeddings(vocab, mean_resizing=False)
        peft_model = load_lora(model, str(info.path))
        peft_model.eval()
        ids = verify_ids(tokenizer, vocab) if verify else []
        before = prompt_logits(peft_model, ids) if verify else []
        model = peft_model.merge_and_unload()
        logger.info("merged %s", info.path)
        if verify:
            diff = max_diff(before, prompt_logits(model, ids))
            report.append({"adapter": str(info.path), "max_abs_diff_merged_vs_unmerged": diff})
            print(f"verify: {info.path}: max |logits(merged) - logits(base + LoRA)| = {diff:.3g}", flush=True)
    model.config.vocab_size = plan.final_vocab
    return model, report


def config_for_output(plan: MergePlan, dtype: torch.dtype) -> dict[str, Any]:
    cfg = dict(plan.config)
    cfg["vocab_size"] = plan.final_vocab
    cfg["dtype"] = DTYPE_NAMES[dtype]
    cfg.pop("torch_dtype", None)
    return cfg


# --------------------------------------------------------------------------------------------
# Low-memory merge: one base shard at a time
# --------------------------------------------------------------------------------------------
def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name or its suffix (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def adapter_ops(info: AdapterInfo) -> dict[str, list[tuple[str, Any]]]:
    """Per base tensor name, what this adapter does to it: ("add", (A, B, scale, transpose)) or ("replace", tensor)."""
    from safetensors.torch import load_file

    cfg = info.config
    for flag in ("use_dora",):
        if cfg.get(flag):
            raise UserError(f"{info.path}/adapter_config.json: {flag} is set; --low_mem merges plain LoRA only: drop --low_mem")
    tensors = {inner_name(k): v for k, v in load_file(str(info.weights)).items()}
    ops: dict[str, list[tuple[str, Any]]] = {}
    for name, t in tensors.items():
        m = re.match(r"(.*)\.(lora_A|lora_embedding_A)(?:\.[^.]+)?(\.weight)?$", name)
        if m:
            module, kind = m.group(1), m.group(2)
            b_name = name.replace(kind, kind[:-1] + "B")
            a, b = t, tensors[b_name]
            r = a.shape[0]
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            # the full-size delta is computed when its tensor streams by, never all at once
            transpose = kind == "lora_embedding_A" or bool(cfg.get("fan_in_fan_out"))
            ops.setdefault(module + ".weight", []).append(("add", (a, b, scale, transpose)))
        elif ".lora_" not in name and name.endswith(".weight") and ".original_module." not in name:
            # modules_to_save: a full trained copy (PEFT may store it both as X.weight and
            # X.modules_to_save.weight, next to the untouched X.original_module.weight)
            target = name.replace(".modules_to_save.", ".")
            if not any(kind == "replace" for kind, _ in ops.get(target, [])):
                ops.setdefault(target, []).append(("replace", t))
    return ops


def merge_low_mem(plan: MergePlan, out: Path, dtype: torch.dtype, max_shard_size: int) -> list[Path]:
    """W + scale·B·A per tensor while streaming the base shard by shard; peak ≈ one shard + adapters."""
    from tqdm import tqdm

    index = TensorIndex(plan.base)
    all_ops = [adapter_ops(info) for info in plan.adapters]
    writer = ShardWriter(out, max_shard_size)
    for path, names in tqdm(list(index.iter_files()), desc="merge shards"):
        for name in names:
            t = index.get(name)
            ops = [op for adapter in all_ops for op in adapter.get(name, [])]
            if ops:
                w = t.float()
                for kind, value in ops:
                    if kind == "replace":
                        w = value.float().clone()
                    else:
                        a, b, scale, transpose = value
                        delta = (b.float() @ a.float()) * scale  # PEFT's get_delta_weight: B·A·scale
                        w = w + (delta.T if transpose else delta)
                t = w
            writer.add(name, t.to(dtype) if t.is_floating_point() else t)
        writer.flush()  # output shards follow input shards: memory holds one at a time
        logger.info("merged %s", path.name)
    return writer.finish()


# --------------------------------------------------------------------------------------------
# Meta's consolidated.NN.pth layout
# --------------------------------------------------------------------------------------------
def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q/k rows (rotary halves) → Meta's / llama.cpp's interleaved rotary pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows → HF's (what transformers' convert_llama_weights_to_hf does)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


HF_TO_META = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Which dimension Meta's model-parallel shards split (None: replicated), as fairscale does:
# column-parallel layers split rows, row-parallel ones (wo, w2) and the embedding split columns.
META_SPLIT_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "attention.wq": 0,
    "attention.wk": 0,
    "attention.wv": 0,
    "attention.wo": 1,
    "feed_forward.w1": 0,
    "feed_forward.w2": 1,
    "feed_forward.w3": 0,
}


META_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}


def _meta_module(name: str) -> str:
    """`layers.3.attention.wq.weight` → `attention.wq`; `tok_embeddings.weight` → `tok_embeddings`."""
    return name.removesuffix(".weight").split(".", 2)[-1] if name.startswith("layers.") else name.split(".")[0]


def meta_params(config: dict[str, Any]) -> dict[str, Any]:
    """params.json whose FFN formula (Meta's model.py) reproduces intermediate_size exactly."""
    dim, hidden = int(config["hidden_size"]), int(config["intermediate_size"])
    params: dict[str, Any] = {
        "dim": dim,
        "n_layers": int(config["num_hidden_layers"]),
        "n_heads": int(config["num_attention_heads"]),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "vocab_size": int(config["vocab_size"]),
    }
    n_kv = config.get("num_key_value_heads")
    if n_kv and int(n_kv) != params["n_heads"]:
        params["n_kv_heads"] = int(n_kv)
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    if theta and float(theta) != 10000.0:
        params["rope_theta"] = float(theta)
    base = int(2 * 4 * dim / 3)
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_ffn_dim(dim, multiple_of, None) == hidden:
            params["multiple_of"] = multiple_of
            break
    else:
        # LLaMA-2 70B: multiple_of 4096 and ffn_dim_multiplier 1.3 give 28672; prefer the short
        # multiplier Meta wrote over the exact ratio when both reproduce the size
        multiple_of = math.gcd(hidden, 4096)
        ratio = hidden / base
        for multiplier in (round(ratio, 1), round(ratio, 2), round(ratio, 3), ratio):
            if meta_ffn_dim(dim, multiple_of, multiplier) == hidden:
                break
        else:
            raise UserError(f"intermediate_size {hidden} cannot be written as Meta's params.json (dim {dim})")
        params["multiple_of"], params["ffn_dim_multiplier"] = multiple_of, multiplier
    return dict(sorted(params.items()))


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_num_shards(config: dict[str, Any]) -> int:
    return META_SHARDS_BY_DIM.get(int(config["hidden_size"]), 1)


def hf_to_meta(state: dict[str, torch.Tensor], config: dict[str, Any], num_shards: int = 1) -> list[dict[str, torch.Tensor]]:
    """HF LlamaForCausalLM tensors → Meta key names, q/k unpermuted, split into `num_shards`."""
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    meta: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name in META_TOP:
            meta[META_TOP[name]] = t
        elif name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            if module not in HF_TO_META:
                continue  # e.g. rotary_emb.inv_freq buffers of old checkpoints
            if module == "self_attn.q_proj":
                t = unpermute_qk(t, n_heads)
            elif module == "self_attn.k_proj":
                t = unpermute_qk(t, n_kv)
            meta[f"layers.{layer}.{HF_TO_META[module]}.weight"] = t
    if "output.weight" not in meta:  # tied embeddings: Meta's format always has its own output
        meta["output.weight"] = meta["tok_embeddings.weight"]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for name, t in meta.items():
        dim = META_SPLIT_DIM.get(_meta_module(name))
        if dim is None or num_shards == 1:
            for shard in shards:
                shard[name] = t.clone()
        else:
            if t.shape[dim] % num_shards:
                raise UserError(f"{name}: dimension {t.shape[dim]} does not split into {num_shards} shards")
            for shard, piece in zip(shards, t.chunk(num_shards, dim=dim), strict=True):
                shard[name] = piece.clone()
    return shards


def meta_to_hf(shards: list[dict[str, torch.Tensor]], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Meta's consolidated shards → HF tensor names and q/k layout (the inverse of hf_to_meta)."""
    n_heads = int(params["n_heads"])
    n_kv = int(params.get("n_kv_heads", n_heads))
    inverse = {v: k for k, v in HF_TO_META.items()}
    top = {v: k for k, v in META_TOP.items()}
    hf: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        if name == "rope.freqs":
            continue
        dim = META_SPLIT_DIM.get(_meta_module(name))
        t = shards[0][name] if dim is None or len(shards) == 1 else torch.cat([s[name] for s in shards], dim=dim)
        if name in top:
            hf[top[name]] = t
        else:
            _, layer, rest = name.split(".", 2)
            module = inverse[rest.rsplit(".", 1)[0]]
            if module == "self_attn.q_proj":
                t = permute_qk(t, n_heads)
            elif module == "self_attn.k_proj":
                t = permute_qk(t, n_kv)
            hf[f"model.layers.{layer}.{module}.weight"] = t
    return hf


def save_meta(state: dict[str, torch.Tensor], config: dict[str, Any], out: Path, num_shards: int | None = None) -> list[Path]:
    """consolidated.NN.pth + params.json, sharded by model size as Meta's checkpoints are."""
    n = num_shards or meta_num_shards(config)
    written = []
    for i, shard in enumerate(hf_to_meta(state, config, n)):
        path = out / f"consolidated.{i:02d}.pth"
        torch.save(shard, path)
        written.append(path)
    write_json(out / "params.json", meta_params(config))
    return written


def load_meta(folder: str | os.PathLike) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    folder = Path(folder)
    paths = sorted(folder.glob("consolidated.*.pth"))
    if not paths:
        raise UserError(f"{folder}: no consolidated.NN.pth files")
    return [torch.load(p, map_location="cpu", weights_only=True) for p in paths], read_json(folder / "params.json")


# --------------------------------------------------------------------------------------------
# Delta weights (Vicuna's way of shipping a fine-tune of a base that cannot be redistributed)
# --------------------------------------------------------------------------------------------
def _delta_of(target: torch.Tensor, base: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The smallest-precision delta whose `(base + delta).to(target dtype)` is bit-exact.

    fp16/bf16 weights: a float32 difference is nearly always exact; where it is not (values
    of very different magnitude), float64; if even that rounds, the target itself ("copy").
    Elementwise CPU arithmetic is deterministic, so apply_delta repeats exactly this check.
    """
    for dtype in (torch.float32, torch.float64):
        delta = target.to(dtype) - base.to(dtype)
        if torch.equal((base.to(dtype) + delta).to(target.dtype), target):
            return "add", delta
    return "copy", target


def _padded(base: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The base grown with zero rows to a resized target's shape (an expanded vocabulary)."""
    if tuple(base.shape) == tuple(shape):
        return base
    if base.dim() != len(shape) or any(b > s for b, s in zip(base.shape, shape, strict=True)):
        raise UserError(f"cannot make a delta between shapes {tuple(base.shape)} and {shape}")
    out = torch.zeros(shape, dtype=base.dtype)
    out[tuple(slice(0, n) for n in base.shape)] = base
    return out


def make_delta(
    base_dir: str | os.PathLike, target_dir: str | os.PathLike, out_dir: str | os.PathLike, max_shard_size: int = 5 * 10**9
) -> Path:
    """delta = target − base, tensor by tensor (bounded memory); non-weight files of the target copied."""
    from tqdm import tqdm

    base, target = TensorIndex(base_dir, "base model"), TensorIndex(target_dir, "target model")
    with StagingDir(out_dir) as stage:
        writer = ShardWriter(stage.path, max_shard_size, prefix="delta")
        entries: dict[str, dict[str, Any]] = {}
        for _, names in tqdm(list(target.iter_files()), desc="delta shards"):
            for name in names:
                t = target.get(name)
                entry = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "target_sha256": tensor_sha256(t)}
                if name in base.shapes and t.is_floating_point():
                    b = base.get(name)
                    entry["base_sha256"] = tensor_sha256(b)
                    entry["base_shape"] = list(b.shape)
                    entry["mode"], stored = _delta_of(t, _padded(b, tuple(t.shape)))
                else:
                    entry["mode"], stored = "copy", t
                writer.add(name, stored)
                entries[name] = entry
        writer.finish()
        copy_side_files(Path(target_dir), stage.path)
        modes = [e["mode"] for e in entries.values()]
        write_json(
            stage.path / DELTA_MANIFEST, {"base": str(base_dir), "counts": {m: modes.count(m) for m in set(modes)}, "tensors": entries}
        )
        write_manifest(stage.path, {"kind": "delta", "base": str(base_dir), "target": str(target_dir)})
    return Path(out_dir)


def apply_delta(
    base_dir: str | os.PathLike, delta_dir: str | os.PathLike, out_dir: str | os.PathLike, max_shard_size: int = 5 * 10**9
) -> Path:
    """target = base + delta, tensor by tensor; every base tensor and every result checked by SHA-256."""
    from tqdm import tqdm

    delta_dir = Path(delta_dir)
    spec = read_json(delta_dir / DELTA_MANIFEST)["tensors"]
    base, delta = TensorIndex(base_dir, "base model"), TensorIndex(delta_dir, "delta")
    with StagingDir(out_dir) as stage:
        writer = ShardWriter(stage.path, max_shard_size)
        for _, names in tqdm(list(delta.iter_files()), desc="apply shards"):
            for name in names:
                entry, d = spec[name], delta.get(name)
                if entry["mode"] == "copy":
                    t = d
                else:
                    if name not in base.shapes:
                        raise UserError(
                            f"{base_dir}: has no tensor {name}; this delta needs the base it was made from ({read_json(delta_dir / DELTA_MANIFEST)['base']})"
                        )
                    b = base.get(name)
                    if tensor_sha256(b) != entry["base_sha256"]:
                        raise UserError(
                            f"{base_dir}: tensor {name} differs from the base this delta was made from: use the exact original base weights"
                        )
                    dtype = getattr(torch, entry["dtype"])
                    b = _padded(b, tuple(entry["shape"]))
                    t = (b.to(d.dtype) + d).to(dtype)
                if tensor_sha256(t) != entry["target_sha256"]:
                    raise UserError(f"{delta_dir}: {name} does not reproduce the target (SHA-256 differs); the delta files are damaged")
                writer.add(name, t)
        writer.finish()
        copy_side_files(delta_dir, stage.path)
        write_manifest(stage.path, {"kind": "base+delta", "base": str(base_dir), "delta": str(delta_dir)})
    return Path(out_dir)
