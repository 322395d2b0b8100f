"""Reward functions for RL with verifiable rewards (finetune_grpo.py), with TRL's signature:

    def reward(prompts, completions, **columns) -> list[float | None]

`prompts[i]` and `completions[i]` are one prompt and one of its completions (a prompt given as
messages gives messages: `completions[i] == [{"role": "assistant", "content": text}]`, as TRL);
every other column of the data record arrives as a keyword list of the same length (e.g.
`answer`), with TRL's `completion_ids` (the generated token ids), `trainer_state`, `log_metric`
and `log_extra` beside them. None means "not
scored by this function" (TRL's convention). So a reward file written for TRL's `GRPOTrainer`
runs here unchanged.

`--reward_funcs` takes a built-in name or `path/to/file.py:function`, comma-separated:
- `accuracy`: 1.0 when the completion's final answer equals the record's `answer` (or `solution`):
  the last `\\boxed{...}`, else what follows the last `答案：`/`答案:`/`Answer:`, else the last
  number; compared as numbers where both are numbers (`1,000` = `1000`, `3/4` = `0.75`), else as text.
- `format`: 1.0 when the whole completion matches `--format_pattern` (default
  `<think>…</think><answer>…</answer>`), else 0.0.
- `length`: 0 up to `--length_target` tokens, then falling linearly to -1 at
  `--max_completion_length` (DAPO's soft overlong penalty).

A function that raises, returns something that is not a list of numbers, or returns the wrong
number of rewards ends the run with one line naming it (`RewardError`).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from chinese_vicuna.errors import UserError

DEFAULT_FORMAT_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"
# What TRL passes every reward function besides the record's columns (never a column it needs).
TRAINER_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


class RewardError(UserError):
    """A reward function failed: one line naming it (the run ends)."""


@dataclass
class RewardFunction:
    name: str  # what the logs call it: rewards/<name>/mean
    fn: Callable[..., Any]
    needs: tuple[str, ...]  # record columns it cannot do without
    needs_one_of: tuple[str, ...] = ()  # record columns of which it needs at least one

    def missing(self, columns: Sequence[str]) -> str | None:
        """Which column of those it needs a record with `columns` lacks (None: none)."""
        for column in self.needs:
            if column not in columns:
                return repr(column)
        if self.needs_one_of and not any(c in columns for c in self.needs_one_of):
            return " or ".join(repr(c) for c in self.needs_one_of)
        return None


# --- the built-in rewards -----------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_MARK = re.compile(r"(?:答案|最终答案|answer)\s*(?:是|为)?\s*[:：]?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"[-+−]?\d[\d,，]*(?:\.\d+)?(?:\s*/\s*\d+)?%?")
_TRAILING = " \t\n。．.，,；;！!？?）)\"'“”"


def completion_text(completion: Any) -> str:
    """The text of a completion, given as a string or as TRL's assistant messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), or None."""
    found = list(_BOXED.finditer(text))
    if not found:
        return None
    start, depth = found[-1].end(), 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def final_answer(text: str) -> str:
    """The final answer a completion gives: the last \\boxed{}, else after the last 答案：/Answer:
    (up to the end of that line), else the last number, else the whole text; trimmed."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip(_TRAILING)
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        rest = text[marks[-1].end() :].strip().split("\n")[0]
        inner = _boxed(rest)
        return (inner if inner is not None else rest).strip(_TRAILING)
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].strip()
    return text.strip(_TRAILING)


def as_number(text: str) -> Fraction | None:
    """`text` as an exact number (thousands separators, a fraction `a/b`, a percent), or None."""
    value = text.strip().replace(",", "").replace("，", "").replace("−", "-").replace(" ", "")
    percent = value.endswith("%")
    value = value.rstrip("%")
    try:
        number = Fraction(value)
    except (ValueError, ZeroDivisionError):
        return None
    return number / 100 if percent else number


def answers_match(given: str, reference: str) -> bool:
    """Numerically where both are numbers, else as text (spaces and end punctuation ignored)."""
    a, b = as_number(given), as_number(final_answer(reference) if not as_number(reference) else reference)
    if a is not None and b is not None:
        return a == b
    normalize = lambda s: re.sub(r"\s+", "", s).strip(_TRAILING).lower()  # noqa: E731
    return normalize(given) == normalize(final_answer(reference)) or normalize(given) == normalize(reference)


def accuracy_reward(prompts: list[Any], completions: list[Any], answer: list[Any] | None = None, solution: list[Any] | None = None, **kwargs: Any) -> list[float | None]:  # fmt: skip
    references = answer if answer is not None else solution
    assert references is not None  # checked on every record before training
    return [
        None if ref is None else float(answers_match(final_answer(completion_text(c)), str(ref)))
        for c, ref in zip(completions, references, strict=True)
    ]


def format_reward(pattern: str) -> Callable[..., list[float | None]]:
    compiled = re.compile(pattern, re.DOTALL)

    def format(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        return [1.0 if compiled.fullmatch(completion_text(c)) else 0.0 for c in completions]

    return format


def length_reward(target: int, limit: int) -> Callable[..., list[float | None]]:
    window = max(limit - target, 1)

    def length(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **kwargs: Any) -> list[float | None]:
        return [-min(1.0, max(0, len(ids) - target) / window) for ids in completion_ids]

    return length


BUILT_IN = ("accuracy", "format", "length")


def load_reward_functions(refs: str, format_pattern: str, length_target: int, max_completion_length: int) -> list[RewardFunction]:
    """`--reward_funcs` → the functions, each checked to exist and be callable (one line if not)."""
    names = [r.strip() for r in refs.split(",") if r.strip()]
    if not names:
        raise UserError(f"--reward_funcs {refs!r}: give at least one of {', '.join(BUILT_IN)} or path/to/file.py:function")
    out = []
    for ref in names:
        if ref == "accuracy":
            out.append(RewardFunction("accuracy", accuracy_reward, (), ("answer", "solution")))
        elif ref == "format":
            try:
                re.compile(format_pattern)
            except re.error as exc:
                raise UserError(f"--format_pattern {format_pattern!r}: not a regular expression ({exc})") from None
            out.append(RewardFunction("format", format_reward(format_pattern), ()))
        elif ref == "length":
            out.append(RewardFunction("length", length_reward(length_target, max_completion_length), ()))
        elif ":" in ref:
            fn = _load_from_file(ref)
            out.append(RewardFunction(fn.__name__ if hasattr(fn, "__name__") else ref, fn, required_columns(fn)))
        else:
            raise UserError(f"--reward_funcs {ref}: not a built-in reward ({', '.join(BUILT_IN)}) nor path/to/file.py:function")
    if len({f.name for f in out}) != len(out):
        raise UserError(f"--reward_funcs {refs}: two reward functions have the same name; the logs could not tell them apart")
    return out


def _load_from_file(ref: str) -> Callable[..., Any]:
    path_text, _, name = ref.rpartition(":")
    path = Path(path_text)
    if not path.is_file() or path.suffix != ".py":
        raise UserError(f"--reward_funcs {ref}: {path} is not a Python file (give path/to/file.py:function)")
    module_name = f"chinese_vicuna_reward_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling inside the file look their module up
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: any error is theirs to fix, in one line
        raise UserError(f"--reward_funcs {ref}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward_funcs {ref}: {path} has no function {name!r}")
    return fn


def required_columns(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The record columns a reward function cannot run without: its parameters without a default,
    other than what the trainer passes itself (prompts, completions, completion_ids...)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(
        p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty and p.name not in TRAINER_KEYWORDS
    )


def check_columns(functions: Sequence[RewardFunction], columns: Sequence[str], where: str) -> None:
    """Every reward's columns are in a record (`where`: file:line), else one line saying which."""
    for f in functions:
        missing = f.missing(columns)
        if missing:
            raise UserError(f"{where}: no {missing} column, which reward {f.name!r} needs; add it to every record or drop the reward")


def score(
    functions: Sequence[RewardFunction],
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, list[Any]],
    completion_ids: list[list[int]],
    **extra: Any,
) -> list[list[float]]:
    """Rewards [completion][function] (NaN where a function returned None), each function called
    once on all completions with TRL's keywords. A failing function is a `RewardError`."""
    table: list[list[float]] = [[] for _ in completions]
    for f in functions:
        try:
            values = f.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns, **extra)
        except Exception as exc:  # the user's reward code: name it, not a traceback from inside the trainer
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise RewardError(f"reward function {f.name!r} raised {type(exc).__name__}: {first}; fix the function") from None
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward function {f.name!r} returned {type(values).__name__}, not a list of numbers") from None
        if len(values) != len(completions):
            raise RewardError(
                f"reward function {f.name!r} returned {len(values)} rewards for {len(completions)} completions; return one per completion"
            )
        for i, value in enumerate(values):
            if value is None:
                table[i].append(math.nan)
            elif not isinstance(value, int | float) and not hasattr(value, "__float__"):
                raise RewardError(f"reward function {f.name!r} returned {value!r} (a {type(value).__name__}) for completion {i}; return numbers or None")  # fmt: skip
            else:
                table[i].append(float(value))
    return table
