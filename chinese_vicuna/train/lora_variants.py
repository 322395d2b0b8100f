"""LoRA variants of the training stage (docs/lora_variants.md): DoRA, rsLoRA, PiSSA / OLoRA / LoftQ /
Gaussian initialisation, LoRA+ learning rates. NEFTune is TrainingArguments' own `--neftune_noise_alpha`.

Everything that changes the adapter itself lives in `adapter_config.json` (PEFT's own fields), so stock
PEFT, `merge_lora.py`, the server and the exporters load it as they load any LoRA. PiSSA and OLoRA
train against a *residual* base (the base minus the adapter's initial value); the final adapter is saved
through PEFT's conversion (`path_initial_model_for_weight_conversion`: rank 2r, plain LoRA) so that it
applies to the original base. `checkpoint-N` folders keep the training form, which resumes as it is and
which PEFT loads by recomputing the same initial value from the base (exact for pissa and olora).
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from chinese_vicuna.args import LoraArguments
from chinese_vicuna.errors import UserError
from chinese_vicuna.model.rope import save_rope_settings

logger = logging.getLogger(__name__)

# The folder of a PiSSA/OLoRA adapter's initial value, kept on the PeftModel for the final save.
INITIAL_ADAPTER_ATTR = "_initial_adapter_dir"


def converts_on_save(init: str) -> bool:
    """Initialisations that mutate the base (residual form) and are saved converted for the original base."""
    return init.startswith("pissa") or init == "olora"


def lora_variant_config(lora_args: LoraArguments) -> dict[str, Any]:
    """The LoraConfig fields of the chosen variant. LoftQ starts from PEFT's default (B = 0) and is
    then replaced by `init_loftq` against the quantized base."""
    init: Any = lora_args.init_lora_weights
    if init in ("default", "true", "loftq"):
        init = True
    return {"use_dora": lora_args.use_dora, "use_rslora": lora_args.use_rslora, "init_lora_weights": init}


def check_lora_variant(lora_args: LoraArguments, precision: str, lora_weights: str | None) -> None:
    """Combinations that cannot work, refused before the base loads."""
    init = lora_args.init_lora_weights
    if lora_weights:
        asked = [f for f, on in (("--use_dora", lora_args.use_dora), ("--use_rslora", lora_args.use_rslora)) if on]
        if init not in ("default", "true"):
            asked.append(f"--init_lora_weights {init}")
        if asked:
            raise UserError(
                f"{' '.join(asked)} with --lora_weights {lora_weights}: a continued adapter keeps its own variant "
                "(its adapter_config.json); drop the flag"
            )
        return
    quantized = precision in ("4bit", "8bit")
    if init == "loftq" and precision != "4bit":
        raise UserError("--init_lora_weights loftq initialises against the 4-bit quantized base: add --precision 4bit")
    if converts_on_save(init) and quantized:
        raise UserError(
            f"--init_lora_weights {init} needs the base in fp32/bf16 (PEFT initialises it from the full weights); "
            "with --precision 4bit use --init_lora_weights loftq"
        )
    if converts_on_save(init) and lora_args.use_dora:
        raise UserError(f"--init_lora_weights {init} with --use_dora: PEFT cannot convert a DoRA adapter for the original base; pick one")


def init_loftq(model: Any, base_model: str) -> None:
    """LoftQ (one step, as PEFT's `replace_lora_weights_loftq`, whose kernels are CUDA-only): each 4-bit
    layer's LoRA starts at the best rank-r approximation of its quantization error, read from the
    base's safetensors, so that base(4-bit) + LoRA starts at the full-precision weights."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit

    from chinese_vicuna.export.tensors import TensorIndex

    index = TensorIndex(base_model, "base model")
    prefix = "base_model.model."
    done = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        for adapter in module.lora_A:
            weight = module.get_base_layer().weight
            dequantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
            original = index.get(name.removeprefix(prefix) + ".weight").float().to(dequantized.device)
            u, s, vh = torch.linalg.svd(original - dequantized, full_matrices=False)
            r, scale = module.r[adapter], module.scaling[adapter]
            root = torch.sqrt(s[:r] / scale)
            module.lora_A[adapter].weight.data = (root[:, None] * vh[:r]).to(module.lora_A[adapter].weight.dtype)
            module.lora_B[adapter].weight.data = (u[:, :r] * root[None, :]).to(module.lora_B[adapter].weight.dtype)
            done += 1
    if not done:
        raise UserError("--init_lora_weights loftq: no 4-bit layer carries a LoRA; check --lora_target_modules")
    logger.info("LoftQ: %d LoRA layers start at the rank-r part of their 4-bit quantization error", done)


def keep_initial_adapter(model: Any) -> None:
    """Save a PiSSA/OLoRA adapter's initial value (a temporary folder, removed at exit) for the final
    save's conversion. Every run recomputes it from the base, a resumed one too."""
    folder = Path(tempfile.mkdtemp(prefix="initial-adapter-"))
    atexit.register(shutil.rmtree, folder, True)
    initial = folder / "initial"
    model.save_pretrained(str(initial))
    setattr(model, INITIAL_ADAPTER_ATTR, str(initial))


def prepare_variant(model: Any, lora_args: LoraArguments, base_model: str) -> None:
    """After a fresh LoRA is added: LoftQ's initial value, or the initial value a PiSSA/OLoRA save converts against."""
    if lora_args.init_lora_weights == "loftq":
        init_loftq(model, base_model)
    elif converts_on_save(lora_args.init_lora_weights):
        keep_initial_adapter(model)


class LoraVariantsMixin:
    """Trainer mixin: LoRA+ optimizer groups (`--loraplus_lr_ratio`), the final adapter of a
    PiSSA/OLoRA run saved for the original base, and every saved adapter's `rope_scaling.json`."""

    def create_optimizer(self, model: Any = None) -> Any:
        ratio = getattr(self.args, "loraplus_lr_ratio", 0.0)  # type: ignore[attr-defined]
        if not ratio or self.optimizer is not None:  # type: ignore[attr-defined]
            return super().create_optimizer(model)  # type: ignore[misc]
        from peft.optimizers import create_loraplus_optimizer

        opt_model = self.model if model is None else model  # type: ignore[attr-defined]
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)  # type: ignore[attr-defined]
        # PEFT's groups: A (and full modules) at lr; B and 1-D parameters (DoRA magnitudes) at lr × ratio
        self.optimizer = create_loraplus_optimizer(
            opt_model,
            optimizer_cls,
            loraplus_lr_ratio=ratio,
            loraplus_weight_decay=self.args.weight_decay,
            **kwargs,  # type: ignore[attr-defined]
        )
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)  # type: ignore[attr-defined]
        initial = getattr(model, INITIAL_ADAPTER_ATTR, None)
        folder = output_dir or args.output_dir
        if args.should_save:
            save_rope_settings(folder, model)  # the adapter says which RoPE scaling it was trained with
        if initial is None or Path(folder).resolve() != Path(args.output_dir).resolve():
            return  # checkpoints keep the training form (module docstring)
        model.save_pretrained(folder, path_initial_model_for_weight_conversion=initial, is_main_process=args.should_save)
        logger.info(
            "%s: saved converted for the original base (rank %d → %d)",
            folder,
            model.peft_config["default"].r,
            2 * model.peft_config["default"].r,
        )


def with_lora_variants(trainer_class: type[Trainer]) -> type[Trainer]:
    """`trainer_class` itself when it already has the mixin, else a subclass with it."""
    if issubclass(trainer_class, LoraVariantsMixin):
        return trainer_class
    return type(trainer_class.__name__, (LoraVariantsMixin, trainer_class), {"__doc__": trainer_class.__doc__})
