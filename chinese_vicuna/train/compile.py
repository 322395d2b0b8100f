"""Regional compilation (`--torch_compile`): each decoder layer's forward through one compiled
code object, the chunked loss's per-chunk work compiled, the compile cache beside the data cache.

Whole-model `torch.compile` (what TrainingArguments' own flag does through accelerate) traces every
layer separately, so its compile time grows with depth, and it wraps the model in an
`OptimizedModule` whose state-dict keys carry `_orig_mod.` (pitfall 11). Here the model stays as
it is; each decoder layer module gets `torch.compile` on its `_call_impl` (`nn.Module.compile`).
The layers share one code object (`LlamaDecoderLayer.forward` and the LoRA layers inside it), and
dynamo treats their parameters as inputs (`inline_inbuilt_nn_modules`), so the graphs compiled
for layer 0 serve every other layer: the number of compiled frames does not grow with depth
(tests/test_compile.py). Row lengths are marked dynamic, so packed rows of ever different lengths
reuse one graph instead of recompiling. Per-sample attention of packed rows, whose number of
samples changes every step, stays eager (`torch.compiler.disable` on its call: one graph break).

The FX-graph and AOT-autograd caches are on and live under `<data cache>/compile` (or the
`TORCHINDUCTOR_CACHE_DIR` a user set): a second run with the same shapes loads the compiled
kernels instead of compiling them again.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def compile_cache_dir() -> Path:
    """`compile/` beside the tokenized-data cache (`CHINESE_VICUNA_CACHE`, default ~/.cache/chinese_vicuna)."""
    from chinese_vicuna.data.cache import default_cache_dir

    return default_cache_dir().parent / "compile"


def use_compile_cache(folder: Path | None = None) -> Path:
    """Inductor's FX-graph cache and the AOT-autograd cache on, in `folder` (default
    `compile_cache_dir()`) unless the user set TORCHINDUCTOR_CACHE_DIR; returns the folder used.
    Inductor writes its default (/tmp/torchinductor_USER) into the environment the first time it
    looks (bitsandbytes' import compiles), so that value counts as unset."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given and os.path.abspath(given) != os.path.abspath(default_cache_dir()) and folder is None:
        path = Path(given)
    else:
        path = folder or compile_cache_dir()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    path.mkdir(parents=True, exist_ok=True)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return path


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers of a (PEFT-wrapped) causal LM: `model.model.layers` of LLaMA-family models."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    return list(layers) if layers is not None else []


def compile_decoder_layers(model: Any, backend: str | None = None, mode: str | None = None) -> int:
    """Every decoder layer's call through `torch.compile` of `Module._call_impl` (as
    `nn.Module.compile` does: one code object, so one set of graphs for all layers, shapes dynamic);
    returns the number of layers. A layer whose forward is replaced for one call (the packed loss'
    `last_layer_at_targets`) runs that call eagerly, and packed attention's per-sample loop always
    does (`keep_packed_work_eager`)."""
    from chinese_vicuna.train import packing

    keep_packed_work_eager(packing)
    layers = decoder_layers(model)
    for layer in layers:
        compiled = torch.compile(layer._call_impl, backend=backend or "inductor", mode=mode, dynamic=True)
        layer._compiled_call_impl = functools.partial(_compiled_unless_patched, layer, compiled)
    return len(layers)


def _compiled_unless_patched(layer: torch.nn.Module, compiled: Any, *args: Any, **kwargs: Any) -> Any:
    if "forward" in vars(layer):  # a forward set on the instance for one call: not the code compiled
        return layer._call_impl(*args, **kwargs)
    return compiled(*args, **kwargs)


def keep_packed_work_eager(packing: Any) -> None:
    """The packed rows' per-sample attention out of the compiled graphs (a graph break at its call):
    its loop runs once per sample of the row, a different count every step, which would otherwise
    compile a graph per count."""
    attention = packing.packed_sdpa_attention
    if getattr(attention, "_torchdynamo_disable", False):
        return
    from transformers import AttentionInterface

    eager = torch.compiler.disable(attention, recursive=True)
    packing.packed_sdpa_attention = eager
    AttentionInterface.register(packing.PACKED_SDPA, eager)


def compile_loss_chunks() -> None:
    """The chunked loss' per-chunk work (fp32 log-softmax over the vocabulary, the target's
    log-probability, softmax - one_hot: train/losses.py `_chunk_loss_and_grad`) as one compiled
    function, its number of rows dynamic. The matmuls through lm_head stay as they are."""
    from chinese_vicuna.train import losses

    if getattr(losses._chunk_loss_and_grad, "_compiled_for_training", False):
        return
    compiled = torch.compile(losses._chunk_loss_and_grad, dynamic=True)
    compiled._compiled_for_training = True
    losses._chunk_loss_and_grad = compiled


def compile_for_training(model: Any, backend: str | None = None, mode: str | None = None) -> str:
    """The compile cache, the decoder layers and the loss' chunks (above); returns what was done, for the log."""
    folder = use_compile_cache()
    layers = compile_decoder_layers(model, backend, mode)
    compile_loss_chunks()
    atexit.register(log_compile_stats)
    return f"torch.compile of {layers} decoder layers through one compiled forward, and the loss' chunks (cache {folder})"


def compiled_frames() -> int:
    """Frames dynamo compiled so far in this process (`torch._dynamo.utils.counters`)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_stats() -> dict[str, float]:
    """Graphs compiled in this process, seconds spent compiling them, and the compile caches' hits
    and misses (inductor's FX-graph cache, the AOT-autograd cache)."""
    from torch._dynamo.utils import calculate_time_spent, counters

    stats: dict[str, float] = {"graphs": compiled_frames(), "seconds": calculate_time_spent().get("entire_frame_compile", 0.0)}
    for group, prefix in (("inductor", "fxgraph_cache_"), ("aot_autograd", "autograd_cache_")):
        for key in ("hit", "miss"):
            stats[prefix + key] = int(counters[group][prefix + key])
    return stats


def log_compile_stats() -> None:
    stats = compile_stats()
    logger.info(
        "torch.compile: %d graphs in %.1f s; FX-graph cache %d hits, %d misses; AOT-autograd cache %d hits, %d misses",
        stats["graphs"], stats["seconds"], stats["fxgraph_cache_hit"], stats["fxgraph_cache_miss"],
        stats["autograd_cache_hit"], stats["autograd_cache_miss"],
    )  # fmt: skip
