"""Records -> token ids and labels for causal-LM fine-tuning (labels are -100 where no loss is taken).

How each format is tokenized (``completion_only_loss=True``):

- ``text``: ``[BOS] text EOS``, loss on every token.
- ``prompt_completion``, plain strings, tokenizer *without* a chat template (or ``use_chat_template=False``):
  ``[BOS] prompt completion EOS``; prompt and completion are tokenized *separately* and concatenated, so the mask
  boundary is exact and the prompt tokens are the ones the model sees at generation time. Loss on completion + EOS.
- ``prompt_completion``, plain strings, tokenizer *with* a chat template: rendered as a user turn (the prompt) and
  an assistant turn (the completion), exactly like ``messages``; so an -Instruct model is tuned in the format it
  is prompted with at inference (``apply_chat_template(..., add_generation_prompt=True)``).
- ``prompt_completion`` with message lists: ``prompt + completion`` rendered by the chat template; loss on the
  completion's assistant turns.
- ``messages``: rendered by the chat template; loss on every assistant turn: its content and end-of-turn token
  (e.g. ``<|im_end|>``), not the role header, not whitespace the template puts after the end-of-turn token.

Assistant spans are found by rendering prefixes of the conversation with ``apply_chat_template`` (as text, then
tokenized without special tokens): the tokens of ``messages[:i]`` + generation prompt mark where turn ``i`` starts,
the tokens of ``messages[:i + 1]`` where it ends. Each prefix must tokenize to a prefix of the full conversation's
tokens. Some templates break that (e.g. ones that rewrite earlier turns once a later turn exists); such a turn gets
no loss (counted in ``TokenizeStats.n_skipped_turns``, logged) rather than a loss on mis-aligned tokens.

With ``completion_only_loss=False`` every token has a label.

``labels[0]`` is always -100: no token predicts the first one, and masking it keeps an example packed after another
from training the previous example's last token to predict it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.data.records import DataError, detect_dataset_format, is_conversational

IGNORE_INDEX = -100

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One tokenized example: ``input_ids`` and ``labels`` of the same length, ``labels`` -100 where masked."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trainable(self) -> int:
        """Number of labels that take part in the loss (labels[0] never does: nothing predicts it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class TokenizeStats:
    """What ``tokenize_records`` did; ``summary()`` is a one-line report for logs."""

    max_length: int
    n_records: int = 0
    n_examples: int = 0  # kept
    n_truncated: int = 0  # longer than max_length (kept or dropped)
    n_dropped: int = 0  # no trainable label left (after truncation)
    n_skipped_turns: int = 0  # assistant turns without loss because the template is not prefix-consistent
    n_tokens: int = 0  # in kept examples
    n_trainable_tokens: int = 0  # in kept examples
    longest: int = 0  # longest example before truncation, in tokens

    def summary(self) -> str:
        """E.g. ``'100 records -> 98 examples (5 truncated to 512, 2 dropped), 40000 tokens, 21000 trainable'``."""
        text = (
            f"{self.n_records} records -> {self.n_examples} examples ({self.n_truncated} truncated to "
            f"{self.max_length}, {self.n_dropped} dropped), {self.n_tokens} tokens, {self.n_trainable_tokens} trainable"
        )
        return text + (f", {self.n_skipped_turns} assistant turns skipped" if self.n_skipped_turns else "")


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    completion_only_loss: bool = True,
    *,
    use_chat_template: bool = True,
) -> tuple[list[Example], TokenizeStats]:
    """Tokenize records (all in one format, see the module docstring) into truncated, label-masked examples.

    Args:
        records: dicts as returned by ``load_records``.
        tokenizer: a Hugging Face tokenizer (``__call__``, ``decode``, ``apply_chat_template``).
        max_length: examples are truncated to this many tokens (from the right).
        completion_only_loss: loss only on completions / assistant turns (else on every token).
        use_chat_template: render plain-string prompt/completion with the chat template if the tokenizer has one.

    Returns:
        The kept examples (in record order) and the statistics. Examples with no trainable label left after
        truncation are dropped and counted in ``stats.n_dropped``.

    Raises:
        DataError: bad records, a conversational record without a chat template, or every example dropped.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {max_length}; pass e.g. --max-length 1024")
    fmt = detect_dataset_format(records)
    no_template = None  # or why the chat template cannot be used
    if not use_chat_template:
        no_template = "use_chat_template=False"
    elif not getattr(tokenizer, "chat_template", None):
        no_template = f"{type(tokenizer).__name__} has no chat_template"
    bos = _bos_prefix(tokenizer)
    stats = TokenizeStats(max_length=max_length, n_records=len(records))
    examples = []
    for row, record in enumerate(records, start=1):
        ids, labels, skipped = _tokenize_one(record, fmt, tokenizer, bos, no_template, completion_only_loss, row)
        stats.n_skipped_turns += skipped
        stats.longest = max(stats.longest, len(ids))
        stats.n_truncated += len(ids) > max_length
        example = Example(ids[:max_length], [IGNORE_INDEX] + labels[1:max_length])
        if example.n_trainable == 0:
            stats.n_dropped += 1
            continue
        examples.append(example)
        stats.n_tokens += len(example)
        stats.n_trainable_tokens += example.n_trainable
    stats.n_examples = len(examples)
    if stats.n_skipped_turns:
        logger.warning(
            "%d assistant turns got no loss: the chat template renders a conversation prefix differently from the "
            "full conversation (see lorakit.data.tokenize)",
            stats.n_skipped_turns,
        )
    if not examples:
        skipped_note = f" ({stats.n_skipped_turns} assistant turns skipped by the template check)"
        raise DataError(
            f"all {stats.n_records} examples were dropped: none has a trainable token within max_length="
            f"{max_length} (longest example: {stats.longest} tokens); raise --max-length, and check that the "
            "records have completions / assistant turns" + (skipped_note if stats.n_skipped_turns else "")
        )
    return examples, stats


def _tokenize_one(
    record: dict[str, Any],
    fmt: str,
    tokenizer: Any,
    bos: list[int],
    no_template: str | None,
    completion_only_loss: bool,
    row: int,
) -> tuple[list[int], list[int], int]:
    """One record -> (ids, labels, n_skipped_turns), untruncated. ``no_template``: why the template is unusable."""
    if fmt == "text":
        ids = _with_eos(tokenizer, bos + _encode(tokenizer, record["text"]))
        return ids, list(ids), 0
    if fmt == "messages":
        messages, first_trained = record["messages"], 0
    elif is_conversational(record["prompt"]):
        messages, first_trained = record["prompt"] + record["completion"], len(record["prompt"])
    elif no_template is None:
        messages, first_trained = [{"role": "user", "content": record["prompt"]}], 1
        messages.append({"role": "assistant", "content": record["completion"]})
    else:
        prompt = bos + _encode(tokenizer, record["prompt"])
        completion = _with_eos(tokenizer, _encode(tokenizer, record["completion"]))
        labels = ([IGNORE_INDEX] * len(prompt) if completion_only_loss else prompt) + completion
        return prompt + completion, labels, 0
    if no_template is not None:
        raise DataError(
            f"row {row}: conversational records (lists of messages) need a chat template, but {no_template}; use a "
            "tokenizer that ships one (e.g. an -Instruct model), set `tokenizer.chat_template`, or convert the data "
            'to {"prompt": str, "completion": str} or {"text": str}'
        )
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_trained]
    return _chat_example(tokenizer, messages, turns, completion_only_loss, row)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` if the tokenizer itself starts encoded text with BOS (Llama), else ``[]`` (GPT-2, SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and len(probe) > 0 and probe[0] == bos else []


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_example(
    tokenizer: Any, messages: list[dict[str, Any]], turns: list[int], completion_only_loss: bool, row: int
) -> tuple[list[int], list[int], int]:
    """Tokenize a conversation with labels on the assistant turns at indices ``turns``; -> (ids, labels, n_skipped)."""
    try:
        ids = _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=False))
    except Exception as e:  # jinja2 errors (e.g. raise_exception in the template) have no common base class
        raise DataError(f"row {row}: the chat template cannot render this conversation ({e}); fix the messages") from e
    if not completion_only_loss:
        return ids, list(ids), 0
    labels = [IGNORE_INDEX] * len(ids)
    skipped = 0
    for i in turns:
        start = _prefix_length(tokenizer, messages[:i], True, ids)
        end = _prefix_length(tokenizer, messages[: i + 1], False, ids)
        if start is None or end is None or end <= start:
            skipped += 1
            continue
        while end > start + 1 and not tokenizer.decode([ids[end - 1]]).strip():
            end -= 1  # whitespace after the end-of-turn token, e.g. the "\n" after "<|im_end|>"
        labels[start:end] = ids[start:end]
    return ids, labels, skipped


def _prefix_length(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, full_ids: list[int]
) -> int | None:
    """Token count of the rendered ``messages`` if they tokenize to a prefix of ``full_ids``, else None."""
    try:
        prefix = _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt))
    except Exception:  # a template may refuse a prefix (e.g. "conversation must start with user")
        return None
    return len(prefix) if full_ids[: len(prefix)] == prefix else None
