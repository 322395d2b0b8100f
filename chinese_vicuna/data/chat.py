"""Chat samples: conversations rendered with a chat template, split at turn boundaries, tokenized.

Labels (docs/finetune_chat.md): every assistant turn and its end marker is trained, user and
system text is -100. When the template's assistant turn does not already end with the
tokenizer's EOS, a trained EOS follows the last assistant turn of every sample.
`train_on_last_turn_only` (Chinese-Vicuna's own behaviour) masks all but the last assistant turn.
Conversations longer than `cutoff_len` tokens are split at turn boundaries into several samples,
each starting at a user turn and repeating the system prompt; one round longer than the cutoff
on its own is truncated (and counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chinese_vicuna.data.encode import TokenizeStats, tokenize_segment_lists
from chinese_vicuna.data.fast_tokenize import encode_segment_texts, protect_messages, sample_starts
from chinese_vicuna.data.formats import Conversation
from chinese_vicuna.errors import UserError
from chinese_vicuna.prompts import PromptTemplate, Segment

# Bump when the chat samples' form changes (the tokenized-data cache key includes it).
CHAT_DATA_VERSION = "1"


def template_trains_eos(template: PromptTemplate, tokenizer: Any) -> bool:
    """Whether the template's assistant turn already ends with the tokenizer's EOS."""
    eos = getattr(tokenizer, "eos_token", None)
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    last = template.chat_segments(probe, add_generation_prompt=False)[-1]
    return bool(eos) and last.trainable and last.text.rstrip().endswith(eos)


def split_system(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[list[dict[str, str]]]]:
    """(the system message as a list of 0 or 1, the rounds [user, assistant])."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(head) :]
    return head, [turns[i : i + 2] for i in range(0, len(turns), 2)]


def plan_chunks(first_lens: Sequence[int], mid_lens: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Greedy split of rounds into [start, end) chunks whose token count fits `budget`.

    `first_lens[i]`: tokens of round i when it opens a sample (with the system prompt);
    `mid_lens[i]`: tokens of round i after another round. A round that does not fit alone
    gets a chunk of its own (truncated later).
    """
    chunks = []
    start = 0
    while start < len(first_lens):
        total, end = first_lens[start], start + 1
        while end < len(first_lens) and total + mid_lens[end] <= budget:
            total += mid_lens[end]
            end += 1
        chunks.append((start, end))
        start = end
    return chunks


def _lengths(tokenizer: Any, segment_lists: Sequence[Sequence[Segment]], batch_size: int = 1000) -> list[list[int]]:
    """Token counts of every segment, encoded in batches (only the counts are kept)."""
    out: list[list[int]] = []
    for start in range(0, len(segment_lists), batch_size):
        batch = segment_lists[start : start + batch_size]
        ids = encode_segment_texts(tokenizer, [s.text for segs in batch for s in segs], sample_starts(len(segs) for segs in batch))
        pos = 0
        for segs in batch:
            out.append([len(x) for x in ids[pos : pos + len(segs)]])
            pos += len(segs)
    return out


def round_lengths(segments: Sequence[Segment], lengths: Sequence[int]) -> list[int]:
    """Tokens per round of a rendered conversation (segments alternate prompt / answer)."""
    if len(segments) % 2 or any(s.trainable == (i % 2 == 0) for i, s in enumerate(segments)):
        raise UserError("the chat template does not render user and assistant turns as alternating segments; pick another template")
    return [lengths[i] + lengths[i + 1] for i in range(0, len(lengths), 2)]


def conversation_segment_lists(
    conversations: Sequence[Conversation],
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    add_eos: bool,
    train_on_last_turn_only: bool = False,
    stats: TokenizeStats | None = None,
) -> list[list[Segment]]:
    """Rendered samples: one per conversation, or several where one exceeds `cutoff_len`."""
    stats = stats if stats is not None else TokenizeStats()
    rendered = [template.chat_segments(c.messages, add_generation_prompt=False) for c in conversations]
    budget = cutoff_len - 1 - int(add_eos)  # BOS and the trained EOS count too
    # A segment never has more tokens than UTF-8 bytes + 1 (a prefix space): only conversations
    # above that bound need counting (the final tokenization would still truncate and count).
    maybe_long = [i for i, segs in enumerate(rendered) if sum(len(s.text.encode("utf-8")) + 1 for s in segs) > budget]
    lengths = dict(zip(maybe_long, _lengths(tokenizer, [rendered[i] for i in maybe_long]), strict=True))
    samples: list[list[Segment]] = []
    split = split_samples = 0
    for i, (conv, segs) in enumerate(zip(conversations, rendered, strict=True)):
        mid = round_lengths(segs, lengths.get(i, [0] * len(segs)))
        if i not in lengths or sum(mid) <= budget or len(mid) == 1:
            samples.append(list(segs))
            continue
        head, rounds = split_system(conv.messages)
        # Round i opening a sample renders differently (system prompt, first-turn format).
        openers = [template.chat_segments(head + r, add_generation_prompt=False) for r in rounds[1:]]
        first = [mid[0]] + [sum(x) for x in _lengths(tokenizer, openers)]
        chunks = plan_chunks(first, mid, budget)
        for start, end in chunks:
            msgs = head + [m for r in rounds[start:end] for m in r]
            samples.append(template.chat_segments(msgs, add_generation_prompt=False))
        if len(chunks) > 1:
            split += 1
            split_samples += len(chunks)
    if split:
        stats.extra["conversations split at turn boundaries"] = stats.extra.get("conversations split at turn boundaries", 0) + split
        stats.extra["samples from split conversations"] = stats.extra.get("samples from split conversations", 0) + split_samples
    if train_on_last_turn_only:
        # Mask earlier answers without merging segments: the ids stay those inference builds.
        last_only = []
        for segs in samples:
            last = max(i for i, s in enumerate(segs) if s.trainable)
            last_only.append([Segment(s.text, s.trainable and i == last) for i, s in enumerate(segs)])
        samples = last_only
    return samples


def tokenize_conversations(
    conversations: Sequence[Conversation],
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool = False,
    train_on_last_turn_only: bool = False,
    stats: TokenizeStats | None = None,
) -> list[dict[str, list[int]]]:
    """Conversations → samples `[bos] segments... [eos?]` with assistant-only labels."""
    if not template.is_chat:
        raise UserError(f"--prompt_template {template.name}: an instruction template; finetune_chat.py needs a chat template")
    if train_on_inputs and train_on_last_turn_only:
        raise UserError("--train_on_inputs and --train_on_last_turn_only contradict each other; pick one")
    stats = stats if stats is not None else TokenizeStats()
    add_eos = not template_trains_eos(template, tokenizer)
    # "<s>" / "</s>" typed in a message stay text; the template's special tokens stay ids
    conversations = [Conversation(protect_messages(tokenizer, c.messages), c.where) for c in conversations]
    segment_lists = conversation_segment_lists(conversations, tokenizer, template, cutoff_len, add_eos, train_on_last_turn_only, stats)
    before = stats.total
    samples = tokenize_segment_lists(tokenizer, segment_lists, cutoff_len, add_eos, train_on_inputs, stats)
    stats.total = before + len(conversations)  # records, not the samples they became
    return samples
