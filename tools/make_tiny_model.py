"""Build a tiny, randomly initialised LLaMA and a sentencepiece tokenizer, locally.

The tokenizer is trained on `sample/tokenizer/corpus.txt` (Chinese and English, byte
fallback, unk=0 bos=1 eos=2 as in LLaMA). The output directory loads with
`AutoModelForCausalLM` / `AutoTokenizer`. Same arguments → same files (seeded).

`--legacy_tokenizer true` writes `"legacy": true` into tokenizer_config.json, as the hub's
LLaMA-1/2-era folders that set it do: transformers 5 then builds the
tokenizer with sentencepiece's dummy prefix `▁` on the text after every special token, as
llama.cpp does. The default (no `legacy` key, read as false) gives no prefix there
(docs/export.md, "Text after a special token").

    python tools/make_tiny_model.py OUT_DIR [--hidden_size 128 --num_layers 2 ...]
    python tools/make_tiny_model.py --output_dir OUT_DIR [...]
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from chinese_vicuna.args import parse_args
from chinese_vicuna.errors import UserError, exit_on_user_error
from chinese_vicuna.files import follow_umask
from chinese_vicuna.logs import configure_logging
from chinese_vicuna.model.vocab import train_sentencepiece_model

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_CORPUS = REPO_ROOT / "sample" / "tokenizer" / "corpus.txt"

logger = logging.getLogger("make_tiny_model")


def make_tiny_model(
    out_dir: str | os.PathLike,
    vocab_size: int = 3000,
    hidden_size: int = 128,
    intermediate_size: int = 384,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    max_position_embeddings: int = 2048,
    corpus: list[Path] | None = None,
    seed: int = 0,
    lm_head_std: float = 0.15,
    legacy_tokenizer: bool = False,
) -> Path:
    """Write a tiny LLaMA + tokenizer to `out_dir` and return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # LLaMA's tokenizer options (BPE, byte fallback, digits split, identity normalization)
    sp_bytes = train_sentencepiece_model(corpus or [DEFAULT_CORPUS], vocab_size, max_sentence_length=4192)
    (out / "tokenizer.model").write_bytes(sp_bytes)
    # transformers 5 converts tokenizer.model into a fast tokenizer; saving writes tokenizer.json
    # next to it, and we keep tokenizer.model for sentencepiece-based tools (GGUF, vocab merging).
    tokenizer = LlamaTokenizer.from_pretrained(str(out), add_bos_token=True, add_eos_token=False, legacy=legacy_tokenizer)
    tokenizer.save_pretrained(str(out))
    if legacy_tokenizer:
        # transformers 5 does not save `legacy`, and rebuilds a LlamaTokenizer's pipeline from it
        # at every load (tokenizer.json's pre-tokenizer is not what decides): write it as the hub does.
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config_path.write_text(json.dumps({**config, "legacy": True}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # A random lm_head with std 0.02 caps every logit near 2-3, so a LoRA (which cannot
        # touch lm_head) could never make a confident prediction. A trained model's output
        # layer is much larger; give this one a scale where memorization is possible.
        model.lm_head.weight.normal_(0.0, lm_head_std)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    follow_umask(out / "model.safetensors")  # safetensors writes 0600
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("wrote %s: %d parameters, vocabulary %d", out, n_params, len(tokenizer))
    return out


@dataclass
class TinyModelArguments:
    output_dir: str = field(metadata={"help": "Where the model folder goes; also the first argument, without the flag."})
    vocab_size: int = field(default=3000, metadata={"help": "Sentencepiece pieces (trained on --corpus)."})
    hidden_size: int = field(default=128)
    intermediate_size: int = field(default=384, metadata={"help": "A multiple of 64: bitsandbytes 4-bit CPU kernels quantize in blocks of 64."})
    num_layers: int = field(default=2)
    num_heads: int = field(default=4)
    num_kv_heads: int | None = field(default=None, metadata={"help": "Fewer than --num_heads: grouped-query attention."})
    max_position_embeddings: int = field(default=2048)
    corpus: list[str] | None = field(default=None, metadata={"help": "Text files (default: sample/tokenizer/corpus.txt)."})
    seed: int = field(default=0)
    legacy_tokenizer: bool = field(
        default=False,
        metadata={"help": "Write \"legacy\": true (the dummy prefix after special tokens, as llama.cpp and hub folders that set it)."},
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((TinyModelArguments,), argv, positional="--output_dir")
    configure_logging(plain=True)
    for path in args.corpus or []:
        if not Path(path).is_file():
            raise UserError(f"--corpus {path}: file not found")
    make_tiny_model(
        args.output_dir,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        corpus=[Path(c) for c in args.corpus] if args.corpus else None,
        seed=args.seed,
        legacy_tokenizer=args.legacy_tokenizer,
    )

if __name__ == "__main__":
    main()
