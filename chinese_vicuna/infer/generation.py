"""Text generation shared by the inference scripts (generate.py, chat.py, tools).

- `DecodingArguments`: greedy / sampling / beam search settings, as command-line flags.
- `stream_generate`: an answer as a stream of text pieces, on transformers' public streamer
  API (`BaseStreamer`, generation in a thread). Pieces never hold broken UTF-8 (byte-fallback
  tokens of a Chinese character are held until the character is complete), never show a stop
  string (text that could be the start of one is held back), and a `threading.Event` ends
  generation within one decoding step.
- `generate_text`: the same answer without streaming (batch mode).
- `chat_prompt_ids`: a conversation's prompt ids within a token budget (`max_memory`),
  dropping the oldest whole turns first, never the current question.
- `load_for_inference`: base model (+ LoRA) for generation, with checks that the LoRA fits.

Prompts are built from template segments with `data.encode_segments`, exactly as in training.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from chinese_vicuna.args import DecodingArguments
from chinese_vicuna.data.encode import encode_segments
from chinese_vicuna.data.fast_tokenize import literal_specials, protect_messages
from chinese_vicuna.errors import UserError
from chinese_vicuna.prompts import PromptTemplate


class IncrementalDecoder:
    """Token ids in, text pieces out; the pieces joined equal `tokenizer.decode(all ids)`.

    Decodes a small window (the tokens since the last emitted piece plus the ones before
    them) instead of all ids each step, as text-generation servers do: SentencePiece drops a
    leading space at the start of what it decodes, so both texts compared start at the same
    token. A piece is held while the text ends in U+FFFD: byte-fallback tokens of a character
    that is not complete yet (a Chinese character can be three byte tokens).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False)

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is held (an incomplete character at the very end decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def finish_text(text: str, stop_strings: Sequence[str], strip: bool = False) -> str:
    """The answer shown for a whole generated text: cut at the first stop string (and stripped
    for chat templates, whose turns end in separators). Streaming shows exactly this."""
    text, _ = cut_at_stop(text, stop_strings)
    return text.strip() if strip else text


class StopStringFilter:
    """Text pieces in, the pieces a user may see out: `finish_text` of everything, piece by piece.

    Text that could be the start of a stop string is held back until it is clearly not one;
    once a stop string appears, `stopped` turns true and nothing after it is ever shown.
    With `strip`, leading whitespace is dropped and trailing whitespace held until more text follows.
    """

    def __init__(self, stop_strings: Sequence[str], strip: bool = False) -> None:
        self.stop_strings = [s for s in stop_strings if s]
        self.strip = strip
        self.text = ""
        self.shown = 0  # characters of self.text already emitted
        self.stopped = False

    def _held_tail(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def push(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        self.text += piece
        if self.strip and self.shown == 0:
            # never show leading whitespace: skip it as if it had been shown
            self.text = self.text.lstrip()
        text, self.stopped = cut_at_stop(self.text, self.stop_strings)
        if self.stopped:
            self.text = text
            end = len(text.rstrip()) if self.strip else len(text)
        else:
            end = len(text) - self._held_tail(text)
            if self.strip:
                end = min(end, len(text[:end].rstrip()))
        return self._emit(end)

    def flush(self) -> str:
        """At the end of generation: the held text that did not turn into a stop string."""
        end = len(self.text.rstrip()) if self.strip else len(self.text)
        return self._emit(end)

    def _emit(self, end: int) -> str:
        if end <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown : end], end
        return piece


class AnswerText:
    """Generated token ids in, the answer text a user may see out, piece by piece: no broken UTF-8
    (`IncrementalDecoder`), no stop string (`StopStringFilter`). Every decoding loop (streamed
    generation, serve.py's batched engine, llama.cpp) turns ids into text through this."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = (), strip: bool = False) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.filter = StopStringFilter(stop_strings, strip)

    @property
    def stopped(self) -> bool:
        """A stop string appeared: nothing after it is ever shown."""
        return self.filter.stopped

    def push(self, ids: Sequence[int]) -> str:
        return self.filter.push(self.decoder.push(ids))

    def finish(self) -> str:
        """At the end of generation: what was held back (an unfinished character, a possible stop string)."""
        return self.filter.push(self.decoder.flush()) + self.filter.flush()


class StopOnEvent(StoppingCriteria):
    """Ends generation at the next decoding step once `event` is set (the UI's stop button)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class StopOnStrings(StoppingCriteria):
    """Ends a sequence once the text it generated contains a stop string (non-streaming path).

    Decodes only the last tokens: a stop string of n characters spans at most 4n tokens
    (byte-fallback tokens are one UTF-8 byte each).
    """

    def __init__(self, tokenizer: Any, prompt_len: int, stop_strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop_strings = [s for s in stop_strings if s]
        self.window = 4 * max((len(s) for s in self.stop_strings), default=0) + 4

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop_strings:
            return done
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        for row, ids in enumerate(input_ids[:, start:].tolist()):
            tail = self.tokenizer.decode(ids, skip_special_tokens=True)
            done[row] = any(s in tail for s in self.stop_strings)
        return done


@dataclass
class GenerationStats:
    """What one generation did: tokens, time, and why it ended."""

    new_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None
    stopped_by: str = ""  # eos | stop_string | max_new_tokens | stop_signal

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return f"{self.new_tokens} tokens in {self.seconds:.1f} s ({self.tokens_per_second:.1f} tokens/s), ended by {self.stopped_by}"


def model_device(model: Any) -> torch.device:
    """Where input ids go: the embedding's device (also right for `device_map="auto"`)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _generate_inputs(model: Any, tokenizer: Any, input_ids: Sequence[int], decoding: DecodingArguments) -> dict[str, Any]:
    decoding.validate()
    device = model_device(model)
    return {
        "input_ids": torch.tensor([list(input_ids)], dtype=torch.long, device=device),
        "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long, device=device),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **decoding.generate_kwargs(),
    }


def _ended_by(new_ids: list[int], eos_id: int | None, decoding: DecodingArguments, stop_string: bool, signal: bool) -> str:
    if stop_string:
        return "stop_string"
    if new_ids and new_ids[-1] == eos_id:
        return "eos"
    if len(new_ids) >= decoding.max_new_tokens:
        return "max_new_tokens"
    return "stop_signal" if signal else "eos"


def generate_text(
    model: Any,
    tokenizer: Any,
    input_ids: Sequence[int],
    decoding: DecodingArguments | None = None,
    stop_strings: Sequence[str] = (),
    strip: bool = False,
    stop_event: threading.Event | None = None,
    stats: GenerationStats | None = None,
) -> str:
    """One answer, not streamed: ends on EOS, a stop string, `max_new_tokens` or `stop_event`."""
    events = () if stop_event is None else (stop_event,)
    return _generate_text(model, tokenizer, input_ids, decoding or DecodingArguments(), stop_strings, strip, events, stats)


@torch.inference_mode()
def _generate_text(
    model: Any,
    tokenizer: Any,
    input_ids: Sequence[int],
    decoding: DecodingArguments,
    stop_strings: Sequence[str],
    strip: bool,
    events: Sequence[threading.Event],
    stats: GenerationStats | None,
) -> str:
    kwargs = _generate_inputs(model, tokenizer, input_ids, decoding)
    criteria: list[StoppingCriteria] = []
    if decoding.num_beams == 1:
        # beams are cut afterwards: a stop criterion would end the search on any one beam
        criteria.append(StopOnStrings(tokenizer, len(input_ids), stop_strings))
    if events:
        criteria.append(StopOnEvent(*events))
    start = time.perf_counter()
    out = model.generate(**kwargs, stopping_criteria=StoppingCriteriaList(criteria))
    new_ids = out[0, len(input_ids) :].tolist()
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        # beam search pads finished beams
        while new_ids and new_ids[-1] == tokenizer.pad_token_id:
            new_ids.pop()
    text = tokenizer.decode(new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    answer = finish_text(text, stop_strings, strip)
    if stats is not None:
        stats.new_tokens = len(new_ids)
        stats.seconds = time.perf_counter() - start
        _, found = cut_at_stop(text, stop_strings)
        stats.stopped_by = _ended_by(new_ids, tokenizer.eos_token_id, decoding, found, any(e.is_set() for e in events))
    return answer


class _QueueStreamer(BaseStreamer):
    """Receives token ids from `generate` (its thread) and queues the text a user may see."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], strip: bool, stop: threading.Event) -> None:
        self.text = AnswerText(tokenizer, stop_strings, strip)
        self.stop = stop
        self.queue: queue.Queue[Any] = queue.Queue()
        self.prompt_seen = False
        self.new_ids: list[int] = []
        self.first_token_time: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.text.stopped:
            return  # the step after a stop string: generation is ending
        ids = value.reshape(-1).tolist()
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.new_ids.extend(ids)
        piece = self.text.push(ids)
        if self.text.stopped:
            self.stop.set()
        if piece:
            self.queue.put(piece)

    def end(self) -> None:
        if not self.text.stopped:
            piece = self.text.finish()
            if piece:
                self.queue.put(piece)


_END = object()


def stream_generate(
    model: Any,
    tokenizer: Any,
    input_ids: Sequence[int],
    decoding: DecodingArguments | None = None,
    stop_strings: Sequence[str] = (),
    strip: bool = False,
    stop_event: threading.Event | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """The answer as text pieces while it is generated; joined they equal `generate_text`.

    Generation runs in a thread; setting `stop_event` (or closing this iterator, as a web UI
    does when a page goes away) ends it at the next decoding step. With beam search the
    whole answer comes as one piece at the end.
    """
    decoding = decoding or DecodingArguments()
    stats = stats if stats is not None else GenerationStats()
    ending = threading.Event()  # set by a stop string, a closed iterator, or the caller's event
    events = (ending,) if stop_event is None else (ending, stop_event)
    out: queue.Queue[Any] = queue.Queue()
    streamer: _QueueStreamer | None = None
    start = time.perf_counter()

    if decoding.streams:
        streamer = _QueueStreamer(tokenizer, stop_strings, strip, ending)
        kwargs = _generate_inputs(model, tokenizer, input_ids, decoding)
        out = streamer.queue

        def work() -> None:
            with torch.inference_mode():
                model.generate(**kwargs, streamer=streamer, stopping_criteria=StoppingCriteriaList([StopOnEvent(*events)]))

    else:
        beam_stats = GenerationStats()

        def work() -> None:
            text = _generate_text(model, tokenizer, input_ids, decoding, stop_strings, strip, events, beam_stats)
            if text:
                out.put(text)

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the consumer, raised there
            out.put(exc)
        finally:
            out.put(_END)

    thread = threading.Thread(target=run, name="generate", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        ending.set()  # the consumer is gone or done: stop generating at the next step
        thread.join()
        stats.seconds = time.perf_counter() - start
        if streamer is not None:
            stats.new_tokens = len(streamer.new_ids)
            if streamer.first_token_time is not None:
                stats.first_token_seconds = streamer.first_token_time - start
            signal = bool(stop_event is not None and stop_event.is_set())
            stats.stopped_by = _ended_by(streamer.new_ids, tokenizer.eos_token_id, decoding, streamer.text.stopped, signal)
        else:
            stats.new_tokens, stats.stopped_by = beam_stats.new_tokens, beam_stats.stopped_by


def prompt_ids(tokenizer: Any, template: PromptTemplate, instruction: str, input: str = "") -> list[int]:
    """The ids the model saw before its answer in training: `[bos] + prompt` segments (special-token
    text in the user's strings stays text, as in training)."""
    protect = literal_specials(tokenizer).protect
    ids, _ = encode_segments(tokenizer, template.instruction_segments(protect(instruction), protect(input)))
    return ids


def turns_of(history: Sequence[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Split a history of alternating user/assistant messages into whole turns."""
    turns: list[list[dict[str, str]]] = []
    for msg in history:
        if msg["role"] == "user" or not turns:
            turns.append([msg])
        else:
            turns[-1].append(msg)
    return turns


def chat_prompt_ids(
    tokenizer: Any,
    template: PromptTemplate,
    history: Sequence[dict[str, str]],
    question: str,
    system: str | None = None,
    max_memory: int | None = None,
) -> tuple[list[int], int]:
    """Prompt ids for `question` after `history`, and how many old turns were dropped.

    `max_memory` bounds the whole prompt (system + kept turns + question) in tokens: the
    oldest whole turns go first; the current question is never dropped, and if it does not
    fit alone that is a UserError (the prompt never exceeds the budget).
    """
    if not template.is_chat:
        raise UserError(f"template {template.name!r} is an instruction template; chat needs a chat template (e.g. chinese-vicuna-chat)")
    turns = turns_of(history)
    question_msg = {"role": "user", "content": question}
    for dropped in range(len(turns) + 1):
        messages = [m for turn in turns[dropped:] for m in turn] + [question_msg]
        messages = protect_messages(tokenizer, messages)  # "<s>" typed by the user stays text
        system_text = literal_specials(tokenizer).protect(system) if system else system
        ids, _ = encode_segments(tokenizer, template.chat_segments(messages, system=system_text))
        if max_memory is None or len(ids) <= max_memory:
            return ids, dropped
    raise UserError(
        f"the question alone needs {len(ids)} prompt tokens but max_memory is {max_memory}: shorten it or raise max_memory (--max_memory)"
    )


def generate_answer(
    model: Any,
    tokenizer: Any,
    template: PromptTemplate,
    instruction: str,
    input: str = "",
    decoding: DecodingArguments | None = None,
) -> str:
    """An instruction's answer, not streamed (batch mode, tools); greedy unless `decoding` says otherwise."""
    ids = prompt_ids(tokenizer, template, instruction, input)
    return generate_text(model, tokenizer, ids, decoding, template.stop_strings, strip=template.is_chat)
