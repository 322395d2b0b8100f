"""Multi-process details: DeepSpeed's config after our batch arithmetic, and ZeRO-3 saving.

`TrainingArguments.__post_init__` fills a DeepSpeed config's `"auto"` batch values from the
flags as they were parsed, before `apply_batch_arguments` turns `--batch_size` into the
accumulation steps; `refresh_deepspeed_config` fills them again from the final values.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def refresh_deepspeed_config(args: Any) -> None:
    """Re-read `--deepspeed` so its batch values match the final TrainingArguments.

    Also: ZeRO-3 keeps every rank's shard of a tensor apart, and a save without gathering
    writes empty tensors (an adapter that does nothing). Trainer.save_model gathers a PEFT
    model's trainable weights itself (transformers 5.23: the adapter is whole even without the
    flag below), but its other ZeRO-3 save paths need the flag: turn it on.
    """
    if not getattr(args, "deepspeed", None):
        return
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    ds_config = HfTrainerDeepSpeedConfig(args.deepspeed)
    zero = ds_config.config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        logger.warning(
            "%s: ZeRO-3 without stage3_gather_16bit_weights_on_model_save would save empty adapters; turning it on",
            args.deepspeed if isinstance(args.deepspeed, str) else "--deepspeed",
        )
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds_config.trainer_config_process(args)
    args.hf_deepspeed_config = ds_config
    # The plugin also registers the config for from_pretrained (ZeRO-3 loads partitioned).
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    init_deepspeed_comm(args)


def init_deepspeed_comm(args: Any) -> None:
    """Let DeepSpeed see the process group before the model loads.

    On the CPU, Accelerate starts torch.distributed itself (gloo, `use_cpu`); ZeRO-3's
    partitioned loading asks deepspeed.comm for the world size, which answers 1 until
    it has been initialised, and then rejects the batch sizes.
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), timeout=args.ddp_timeout_delta)


def check_deepspeed(config: Any) -> None:
    """`--deepspeed FILE` needs the package and the file; say so in one line."""
    import importlib.util
    from pathlib import Path

    from chinese_vicuna.errors import UserError

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("--deepspeed needs DeepSpeed: pip install -r requirements-deepspeed.txt")
    if isinstance(config, str) and not config.lstrip().startswith("{") and not Path(config).is_file():
        raise UserError(f"--deepspeed {config}: file not found (samples: config-sample/ds_zero2.json, ds_zero3.json, ...)")
