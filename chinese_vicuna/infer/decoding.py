"""Decoding settings: greedy, sampling or beam search, and their `model.generate` keywords.

A value the generation layer takes as it is; the scripts parse it from flags (it is the flag
group `--max_new_tokens`, `--do_sample`, ... of chinese_vicuna/args.py, defined here once).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from chinese_vicuna.errors import UserError


@dataclass
class DecodingArguments:
    """Decoding flags; the web pages start from them and batch mode uses them.

    Defaults stream well and reproduce what a model was trained to say: greedy (the same
    answer every time), one beam (beam search cannot stream), no repetition penalty.
    """

    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens to generate per answer."})
    min_new_tokens: int = field(default=0, metadata={"help": "Do not stop (EOS) before this many tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (with temperature/top_p/top_k) instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling: keep the smallest set of tokens with this mass."})
    top_k: int = field(default=40, metadata={"help": "Sample among the k most likely tokens (0 = all)."})
    num_beams: int = field(default=1, metadata={"help": "Beam search with this many beams (>1 cannot stream: shown when done)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalize repeated tokens (1.0 = off; 1.1-1.3 against loops)."})

    def validate(self) -> None:
        """Bad values are user errors, named with their flag."""
        checks = [
            (self.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "--min_new_tokens must be between 0 and --max_new_tokens"),
            (self.num_beams >= 1, "--num_beams must be at least 1"),
            (self.repetition_penalty > 0, "--repetition_penalty must be > 0 (1.0 = off)"),
            (not self.do_sample or self.temperature > 0, "--temperature must be > 0 when sampling"),
            (0 < self.top_p <= 1, "--top_p must be in (0, 1]"),
            (self.top_k >= 0, "--top_k must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message} (got {asdict(self)})")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`; sampling knobs only when sampling."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(self.max_new_tokens),
            "min_new_tokens": int(self.min_new_tokens),
            "num_beams": int(self.num_beams),
            "repetition_penalty": float(self.repetition_penalty),
            "do_sample": bool(self.do_sample),
        }
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k))
        else:
            # the model's generation_config may carry sampling defaults; neutral values keep
            # transformers from warning that they are ignored
            kwargs.update(temperature=1.0, top_p=1.0, top_k=50)
        return kwargs

    @property
    def streams(self) -> bool:
        """Beam search picks its answer only at the end, so it cannot stream token by token."""
        return self.num_beams == 1
