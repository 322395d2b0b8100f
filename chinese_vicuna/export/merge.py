"""Merging LoRAs into a base: the plan (checked before any weight is read), PEFT's merge with
verification, and a low-memory merge that streams one tensor at a time.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chinese_vicuna.errors import UserError
from chinese_vicuna.export.tensors import DTYPE_NAMES, TOKENIZER_FILES, ShardWriter, TensorIndex, sha256_file
from chinese_vicuna.files import read_json
from chinese_vicuna.model.adapters import AdapterInfo, _lora_module_checks, inner_name, load_adapter_tensors, read_adapter
from chinese_vicuna.model.loading import has_tokenizer, tokenizer_length, unused_vocab_rows
from chinese_vicuna.prompts import save_template_files

logger = logging.getLogger(__name__)


VERIFY_PROMPTS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n中国的首都是哪里？\n\n### Response:\n",
    "你好，请用一句话介绍一下你自己。",
    "User:一年有几个季节？\n\nAssistant:",
    "The quick brown fox jumps over the lazy dog.",
)


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


def plan_merge(base_model: str | os.PathLike, lora_dirs: list[str], lora_config: str | None = None) -> MergePlan:
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
        info = read_adapter(folder, lora_config)
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


def adapter_fingerprint(info: AdapterInfo) -> str:
    """SHA-256 of an adapter's weights file: the same LoRA wherever its folder was moved or copied."""
    return sha256_file(info.weights)


def repeated_adapters(plan: MergePlan) -> list[str]:
    """Adapters that would be merged a second time: named twice in --lora_weights, or already
    listed in the base's `manifest.json` (a model this tool merged). Each one's delta would be
    added again (twice the LoRA's effect), which is never what a plain merge means."""
    seen: dict[str, str] = {}  # a weights digest or a resolved folder → how to name it
    manifest = plan.base / "manifest.json"
    if manifest.is_file():
        done = read_json(manifest)
        paths, digests = done.get("lora_weights") or [], done.get("lora_sha256") or []
        for i, path in enumerate(paths):
            name = f"{path} (already merged into {plan.base}, see its manifest.json)"
            seen[str(Path(path).resolve())] = name
            if i < len(digests):  # manifests of older versions list paths only
                seen[digests[i]] = name
    repeats = []
    for info in plan.adapters:
        keys = (adapter_fingerprint(info), str(info.path.resolve()))
        earlier = next((seen[k] for k in keys if k in seen), None)
        if earlier is not None:
            repeats.append(f"{info.path} is {earlier}")
        seen.update(dict.fromkeys(keys, str(info.path)))
    return repeats


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


def write_template(out: Path, template: Any) -> None:
    """The training template travels with the merged model (pitfall 17): `prompt_template.json`
    for this toolkit, and the same template as a Jinja `chat_template.jinja` (BOS once, joined as
    the tokenizer needs it) for apply_chat_template, vLLM, TGI and the GGUF converter
    (`prompts.save_template_files`, the one writer, as for adapter folders)."""
    save_template_files(out, template)


def sentencepiece_matches(sp_model: Path, tokenizer_dir: Path) -> bool:
    import sentencepiece as spm

    from chinese_vicuna.model.loading import load_tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_tokenizer(str(tokenizer_dir))
    n = sp.get_piece_size()
    return n <= len(tok) and tok.convert_ids_to_tokens(list(range(n))) == [sp.id_to_piece(i) for i in range(n)]


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
    from chinese_vicuna.model.adapters import load_lora
    from chinese_vicuna.model.loading import check_special_tokens, load_base_model

    model = load_base_model(str(plan.base), "fp32")
    check_special_tokens(model, tokenizer, str(plan.base))
    model.eval()
    report = []
    for info, vocab in zip(plan.adapters, plan.vocab_at, strict=True):
        if model.get_input_embeddings().weight.shape[0] != vocab:
            # The adapter's full embed_tokens/lm_head (modules_to_save) fill every row.
            model.resize_token_embeddings(vocab, mean_resizing=False)
        peft_model = load_lora(model, str(info.path), lora_config=info.lora_config)
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


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name or its suffix (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def adapter_ops(info: AdapterInfo) -> dict[str, list[tuple[str, Any]]]:
    """Per base tensor name, what this adapter does to it: ("add", (A, B, scale, transpose)) or ("replace", tensor)."""
    cfg = info.config
    # what W + scale·B·A does not cover: refused, never dropped (a dropped lora_bias moves the logits)
    for flag in ("use_dora", "lora_bias", "layer_replication"):
        if cfg.get(flag):
            raise UserError(f"{info.path}/adapter_config.json: {flag} is set; --low_mem merges plain LoRA only: drop --low_mem")
    if cfg.get("bias", "none") != "none":
        raise UserError(
            f"{info.path}/adapter_config.json: bias={cfg['bias']!r} (trained biases); --low_mem merges plain LoRA only: drop --low_mem"
        )
    tensors = {inner_name(k): v for k, v in load_adapter_tensors(info.weights).items()}
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
        elif re.search(r"\.(lora_B|lora_embedding_B)(\.weight)?$", name) or ".original_module." in name:
            continue  # B goes with its A; the untouched original of a modules_to_save copy
        elif ".lora_" in name or not name.endswith(".weight"):
            raise UserError(f"{info.weights}: {name} is not a plain LoRA A/B or a saved module; --low_mem cannot merge it: drop --low_mem")
        else:
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
