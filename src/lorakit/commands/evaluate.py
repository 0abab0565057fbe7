"""Evaluation of a causal LM (base or with adapter) on records: loss, perplexity, exact-match accuracy.

- **loss**: the token-weighted mean cross-entropy over the tokens that carry a label, exactly as training labels
  them (``data_tokenize.tokenize_records``): completions / assistant turns, or every token of ``text`` records.
  ``perplexity = exp(loss)``.
- **exact match**: for prompt/completion and messages records, the greedy answer (``generate.generate``) to the
  prompt (for messages: the conversation before the last assistant turn) equals the reference (the completion, or
  the last assistant turn's content) after ``.strip()``. ``text`` records have no reference and are skipped.
  By default (``exact_match=None``) it is computed only when every reference is short (at most
  ``SHORT_ANSWER_TOKENS`` tokens: a date, a label, a number), where an exact answer can be expected; long answers
  (definitions, explanations) almost never match exactly, and generating them is most of an evaluation's time.
  ``exact_match=True`` forces it. Answers are generated up to the longest reference plus ``ANSWER_MARGIN`` tokens
  (``max_new_tokens=None``): enough to see an answer that goes on past the reference, no more.

Example::

    records = load_records("eval.jsonl")
    evaluate(model, tokenizer, records)
    # {"loss": 1.73, "perplexity": 5.64, "n_examples": 50, "n_tokens": 812, "exact_match": 0.42, "n_exact_match": 50}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit.commands.generate import Prompt, generate
from lorakit.data.records import detect_dataset_format, is_conversational
from lorakit.data.tokenize import tokenize_records
from lorakit.training.loss import loss_over_examples


def exact_match_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after ``.strip()``.

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references; pass one per reference")
    if not references:
        raise ValueError("exact match of zero examples is undefined; pass at least one prediction")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def prompts_and_references(records: Sequence[dict[str, Any]]) -> tuple[list[Prompt], list[str]]:
    """The (prompt, reference answer) pairs of records with a reference; ``text`` records give none.

    prompt/completion: ``(prompt, completion)``; for message lists, the prompt is the conversation before the last
    assistant turn of the completion. messages: the messages before the last assistant turn, and its content.
    Records without an assistant turn are left out.
    """
    fmt = detect_dataset_format(records)
    prompts: list[Prompt] = []
    references: list[str] = []
    if fmt == "text":
        return prompts, references
    for record in records:
        if fmt == "prompt_completion" and not (
            is_conversational(record["prompt"]) or is_conversational(record["completion"])
        ):
            prompts.append(record["prompt"])
            references.append(record["completion"])
            continue
        messages = record["messages"] if fmt == "messages" else [*record["prompt"], *record["completion"]]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or not isinstance(messages[last]["content"], str):
            continue
        prompts.append(messages[:last])
        references.append(messages[last]["content"])
    return prompts, references


SHORT_ANSWER_TOKENS = 32  # references up to this long are scored by exact match unless told otherwise
ANSWER_MARGIN = 8  # tokens generated past the longest reference: an answer that goes on is seen to differ


def exact_match_plan(
    tokenizer: PreTrainedTokenizerBase, references: Sequence[str], exact_match: bool | None, max_new_tokens: int | None
) -> tuple[int | None, str]:
    """(tokens to generate per answer, or None for no exact match; why) for these references: off without
    references or when asked (``exact_match=False``); under None, off when a reference is longer than
    SHORT_ANSWER_TOKENS; the answer length ``max_new_tokens``, else the longest reference + ANSWER_MARGIN."""
    if not references:
        return None, "no prompt/completion or messages records"
    if exact_match is False:
        return None, "--no-exact-match"
    longest = max(len(tokenizer(r.strip(), add_special_tokens=False)["input_ids"]) for r in references)
    if exact_match is None and longest > SHORT_ANSWER_TOKENS:
        return None, (
            f"references up to {longest} tokens, longer than {SHORT_ANSWER_TOKENS}: long answers rarely match "
            "exactly; --exact-match scores them anyway"
        )
    if max_new_tokens is not None:
        return max_new_tokens, f"answers of up to {max_new_tokens} tokens"
    return longest + ANSWER_MARGIN, f"answers of up to {longest + ANSWER_MARGIN} tokens (longest reference + margin)"


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf  # exp overflows a float above ~709.8


def eval_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, Any]],
    max_length: int = 512,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float | int]:
    """Token-weighted mean loss over the labelled tokens of ``records``, with the counts behind it (``progress``:
    a progress display over the batches)."""
    examples, stats = tokenize_records(records, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shown = "eval loss" if progress else None
    total, n_tokens = loss_over_examples(model, examples, batch_size, pad_id, progress=shown)
    loss = total / n_tokens
    return {
        "loss": loss,
        "perplexity": _safe_exp(loss),
        "n_examples": len(examples),
        "n_tokens": n_tokens,
        "n_records": stats.n_records,
        "n_dropped": stats.n_dropped,
    }


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, Any]],
    max_length: int = 512,
    batch_size: int = 8,
    exact_match: bool | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss and perplexity on ``records``, plus greedy exact-match accuracy: with ``exact_match`` True, None (the
    default) when the references are short, not with False; answers up to ``max_new_tokens`` tokens, by default
    the longest reference + ANSWER_MARGIN (see module doc and ``exact_match_plan``).

    Returns ``{"loss", "perplexity", "n_examples", "n_tokens", "n_records", "n_dropped", "exact_match",
    "n_exact_match", "exact_match_note"}``; ``exact_match`` is None (and ``n_exact_match`` 0) when it was not
    computed, and the note says why (else how long the answers could be). ``progress``: progress displays for the
    loss and the answers (``lorakit.io.progress``).

    Raises:
        DataError: records in no known format, or none with a labelled token after truncation to ``max_length``.
    """
    result: dict[str, Any] = dict(eval_loss(model, tokenizer, records, max_length, batch_size, progress))
    prompts, references = prompts_and_references(records)
    n_new, note = exact_match_plan(tokenizer, references, exact_match, max_new_tokens)
    result.update(exact_match=None, n_exact_match=0, exact_match_note=note)
    if n_new is not None:
        predictions = generate(model, tokenizer, prompts, max_new_tokens=n_new, do_sample=False, batch_size=batch_size,
                               progress="exact-match answers" if progress else None)  # fmt: skip
        result.update(exact_match=exact_match_score(predictions, references), n_exact_match=len(references))
    return result
