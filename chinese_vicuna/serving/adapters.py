"""Many LoRAs on one base model: a registry of served names, loaded on first use, evicted LRU.

The registry knows every adapter by its served name (`--lora_modules NAME=DIR`, or added at run
time) but holds at most `max_loras` of them in the model at once. Loading and eviction change
the model, so they run only on the engine's scheduler thread (between decoding steps); the
HTTP side only registers and unregisters names, under a lock.

Each adapter is asked in the template it was trained with: `prompt_template.json` in its
folder when present, else the base's (the server's `--prompt_template`), resolved by
`infer/engine.py` like every front end's.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError
from chinese_vicuna.infer.engine import INSTRUCTION, adapter_template, model_template
from chinese_vicuna.model.adapters import (
    adapter_files,
    adapter_vocab_rows,
    check_adapter_fits,
    check_adapter_matches_base,
    load_adapter_tensors,
    read_adapter_config,
)
from chinese_vicuna.prompts import PromptTemplate

logger = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


def parse_lora_modules(values: list[str] | None) -> dict[str, str]:
    """`NAME=DIR` pairs (vLLM's `--lora-modules` syntax) → {name: dir}."""
    modules: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--lora_modules {value!r}: expected NAME=DIR, e.g. medical=./lora-medical")
        if name in modules:
            raise UserError(f"--lora_modules: the name {name!r} is given twice")
        modules[name] = path
    return modules


def check_adapter_dir(name: str, path: str) -> None:
    """An adapter folder this server can serve, or a UserError naming what is wrong."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"LoRA {name!r}: {path} has no adapter_config.json; give a PEFT adapter folder (output_dir or checkpoint-N)")
    if adapter_vocab_rows(path) is not None:
        raise UserError(
            f"LoRA {name!r}: {path} carries its own embeddings (an expanded vocabulary); several LoRAs share one base vocabulary "
            "here: merge it (merge_lora.py) and serve the merged model as --base_model"
        )


def validate_adapter(name: str, path: str, base: Any, tokenizer: Any) -> None:
    """Everything loading `path` into `base` will need, checked before the name is served: the
    config parses as a PEFT config, the weights file reads whole with finite values, and every
    LoRA matrix fits the base layer it adapts. A UserError naming the LoRA and what is wrong."""
    import torch
    from peft import PeftConfig

    if not (Path(path) / "adapter_config.json").is_file():
        raise UserError(f"LoRA {name!r}: {path} has no adapter_config.json; give a PEFT adapter folder (output_dir or checkpoint-N)")
    try:
        cfg_file, weights = adapter_files(path)
        config = PeftConfig.from_peft_type(**read_adapter_config(cfg_file))
    except UserError as exc:
        raise UserError(f"LoRA {name!r}: {exc}") from None
    except Exception as exc:  # a config PEFT cannot take: wrong types, unknown peft_type
        raise UserError(f"LoRA {name!r}: {path}/adapter_config.json is not a valid PEFT adapter config ({_first_line(exc)})") from None
    if weights is None:
        raise UserError(f"LoRA {name!r}: {path} has no adapter_model.safetensors or adapter_model.bin; the folder is incomplete")
    try:
        tensors = load_adapter_tensors(weights)
    except UserError as exc:
        raise UserError(f"LoRA {name!r}: {exc}") from None
    except Exception as exc:
        raise UserError(f"LoRA {name!r}: {weights} cannot be read ({_first_line(exc)}); save or copy the adapter again") from None
    layers = {n.split("base_model.model.")[-1]: m for n, m in base.named_modules()}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"LoRA {name!r}: {weights}: {key} holds NaN or infinite values; the adapter is damaged")
        inner = key.split("base_model.model.", 1)[-1]
        for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in inner:
                continue
            module = inner.split(part)[0]
            layer = layers.get(module)
            layer = getattr(layer, "base_layer", layer)
            if layer is None or not hasattr(layer, "weight"):
                raise UserError(
                    f"LoRA {name!r}: {weights} adapts {module}, which the base model does not have: it was made for another base"
                )
            wanted = layer.in_features if dim == 1 else layer.out_features
            if tensor.dim() != 2 or tensor.shape[dim] != wanted:
                raise UserError(
                    f"LoRA {name!r}: {weights}: {key} has shape {tuple(tensor.shape)} but the base layer {module} needs "
                    f"{'inputs' if dim == 1 else 'outputs'} of size {wanted}: it was made for another base"
                )
    if getattr(config, "r", None) is not None and not isinstance(config.r, int):
        raise UserError(f"LoRA {name!r}: {cfg_file}: r must be an integer")
    check_adapter_dir(name, path)
    try:
        check_adapter_fits(base, path)
        check_adapter_matches_base(path, base, tokenizer)
    except UserError as exc:
        raise UserError(f"LoRA {name!r}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


class AdapterRegistry:
    """Served names → adapter folders and templates; at most `max_loras` loaded (LRU)."""

    def __init__(self, model: Any, tokenizer: Any, modules: dict[str, str], default_template: str, max_loras: int = 4) -> None:
        if max_loras < 1:
            raise UserError(f"--max_loras must be at least 1 (got {max_loras})")
        self.model = model  # becomes a PeftModel when the first adapter loads
        self.base = model
        self.tokenizer = tokenizer
        self.default_template = default_template
        self.max_loras = max_loras
        self.base_template = model_template(default_template, (), INSTRUCTION, tokenizer)
        self._lock = threading.Lock()
        self._paths: dict[str, str] = {}
        self._templates: dict[str, PromptTemplate] = {}
        self._loaded: OrderedDict[str, str] = OrderedDict()  # name → path, least recently used first
        # PEFT names of loaded adapters: served names may hold dots or be substrings of "lora_",
        # which PEFT cannot take as adapter names
        self._peft_names: dict[str, str] = {}
        self._loads = 0
        for name, path in modules.items():
            self.register(name, path)

    # --- names (any thread) ------------------------------------------------------------------
    def register(self, name: str, path: str) -> None:
        """Make `name` servable; its weights load on first use. The adapter is validated now
        (`validate_adapter`): a bad one never reaches the engine."""
        if name == BASE:
            raise UserError(f"{BASE!r} is reserved")
        validate_adapter(name, path, self.base, self.tokenizer)
        template = adapter_template(path, self.base_template, self.tokenizer)
        with self._lock:
            if name in self._paths and self._paths[name] != path:
                raise UserError(f"LoRA {name!r} is already served from {self._paths[name]}; unload it first")
            self._paths[name] = path
            self._templates[name] = template

    def unregister(self, name: str) -> None:
        """Stop serving `name`; its weights leave the model at the next eviction point."""
        with self._lock:
            if name not in self._paths:
                raise KeyError(name)
            del self._paths[name]
            del self._templates[name]

    def names(self) -> dict[str, str]:
        with self._lock:
            return dict(self._paths)

    def template(self, name: str | None) -> PromptTemplate:
        if name is None:
            return self.base_template
        with self._lock:
            return self._templates[name]

    def loaded(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        with self._lock:
            return list(self._loaded)

    # --- weights (scheduler thread only) -------------------------------------------------------
    def ensure_loaded(self, name: str, in_use: set[str]) -> bool:
        """Load `name` if needed, evicting the least recently used idle adapter beyond `max_loras`.

        False when every loaded adapter is in use and none can make room (the request waits).
        Raises UserError when `name` is not served or its weights do not fit the base.
        """
        with self._lock:
            path = self._paths.get(name)
            if path is None:
                raise UserError(f"the model {name!r} is not served")
            if name in self._loaded and self._loaded[name] == path:
                self._loaded.move_to_end(name)
                return True
        self.evict_unregistered(in_use)
        if name in self._loaded:  # re-registered under another path
            if name in in_use:
                return False
            self._evict(name)
        while len(self._loaded) >= self.max_loras:
            idle = next((n for n in self._loaded if n not in in_use), None)
            if idle is None:
                return False
            self._evict(idle)
        self._load(name, path)
        return True

    def evict_unregistered(self, in_use: set[str]) -> None:
        """Drop the weights of adapters that were unregistered and are no longer in use."""
        with self._lock:
            gone = [n for n, p in self._loaded.items() if self._paths.get(n) != p and n not in in_use]
        for name in gone:
            self._evict(name)

    def _load(self, name: str, path: str) -> None:
        from peft import PeftModel

        check_adapter_fits(self.base, path)
        check_adapter_matches_base(path, self.base, self.tokenizer)
        self._loads += 1
        peft_name = f"cv{self._loads}"
        try:
            if self.model is self.base:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=peft_name)
            else:
                self.model.load_adapter(path, adapter_name=peft_name)
        except (OSError, ValueError, RuntimeError):
            logger.exception("LoRA %s: loading %s failed", name, path)
            raise UserError(f"LoRA {name!r}: cannot load it (the server log has the details)") from None
        self.model.eval()
        with self._lock:
            self._loaded[name] = path
            self._peft_names[name] = peft_name
        logger.info("loaded LoRA %s from %s (%d of at most %d loaded)", name, path, len(self._loaded), self.max_loras)

    def _evict(self, name: str) -> None:
        if len(self._loaded) == 1:
            # PEFT keeps at least one adapter; without any, serve the plain base again
            self.model = self.model.unload()
            self.base = self.model
        else:
            self.model.delete_adapter(self._peft_names[name])
        with self._lock:
            del self._loaded[name]
            del self._peft_names[name]
        logger.info("evicted LoRA %s", name)

    def adapter_names(self, names: list[str | None]) -> list[str] | None:
        """PEFT's per-row `adapter_names` for a batch (None when no adapter is loaded)."""
        if self.model is self.base:
            return None
        with self._lock:
            return [self._peft_names[n] if n is not None else BASE for n in names]
