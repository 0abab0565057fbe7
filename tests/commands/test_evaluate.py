"""commands.evaluate: token-weighted eval loss against a per-example reference, exact match, prompt extraction."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import silence_eos_, tiny_llama, tiny_tokenizer
from torch import nn

from lorakit.commands import evaluate as evaluate_module
from lorakit.commands.evaluate import evaluate, exact_match_score, prompts_and_references
from lorakit.commands.generate import generate
from lorakit.data.tokenize import IGNORE_INDEX, tokenize_records

MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "the cat"},
            {"role": "user", "content": "what is two plus four"},
            {"role": "assistant", "content": "six"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"},
        ]
    },
    {"messages": [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on a mat"}]},
    {"messages": [{"role": "user", "content": "what is"}, {"role": "assistant", "content": "two"}]},
]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return silence_eos_(tiny_llama(0))


@pytest.fixture(scope="module")
def sharp() -> nn.Module:
    """A tiny llama with 10x logits: per-token losses vary a lot, so token weighting changes the mean."""
    model = tiny_llama(0)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)
    return model


# -- exact_match_score ---------------------------------------------------------------------------------------------
def test_exact_match_score_strips_and_averages() -> None:
    assert exact_match_score([" six\n", "seven", "a b"], ["six", "six", "a  b"]) == pytest.approx(1 / 3)
    assert exact_match_score(["x"], [" x "]) == 1.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match_score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="zero examples"):
        exact_match_score([], [])


# -- prompts and references ----------------------------------------------------------------------------------------
def test_prompts_and_references_per_format() -> None:
    prompts, refs = prompts_and_references(MESSAGES[:1])
    assert prompts == [MESSAGES[0]["messages"][:4]] and refs == ["hello world"]  # up to the last assistant turn

    plain = [{"prompt": "what is two plus four", "completion": " six"}]
    assert prompts_and_references(plain) == (["what is two plus four"], [" six"])

    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    conversational = [{"prompt": [user], "completion": [answer]}]
    assert prompts_and_references(conversational) == ([[user]], ["hello"])

    assert prompts_and_references([{"text": "the cat sat"}]) == ([], [])
    assert prompts_and_references([{"messages": [user]}]) == ([], [])  # no assistant turn: no reference


# -- loss ----------------------------------------------------------------------------------------------------------
def reference_loss(model: nn.Module, tokenizer: Any, records: list[dict[str, Any]]) -> tuple[float, float, int]:
    """(token-weighted mean, plain mean of per-example means, n tokens), one unpadded example at a time with HF's
    own loss (the mean over labelled tokens of one example)."""
    examples, _ = tokenize_records(records, tokenizer, max_length=512)
    sums, means, counts = 0.0, [], 0
    with torch.no_grad():
        for ex in examples:
            loss = model(torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss.item()
            n = sum(label != IGNORE_INDEX for label in ex.labels[1:])
            sums, counts = sums + loss * n, counts + n
            means.append(loss)
    return sums / counts, sum(means) / len(means), counts


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_loss_is_token_weighted_mean_over_assistant_tokens(sharp: nn.Module, batch_size: int) -> None:
    tokenizer = tiny_tokenizer()
    expected, unweighted, n_tokens = reference_loss(sharp, tokenizer, MESSAGES)
    assert abs(expected - unweighted) > 0.01  # >> the rel=1e-5 tolerance: weighting is tested
    result = evaluate(sharp, tokenizer, MESSAGES, batch_size=batch_size, exact_match=False)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert (result["n_examples"], result["n_tokens"]) == (3, n_tokens)
    assert result["exact_match"] is None and result["n_exact_match"] == 0


def test_text_records_score_every_token_and_skip_exact_match(sharp: nn.Module) -> None:
    tokenizer = tiny_tokenizer(chat=False)
    records = [{"text": "the cat sat on a mat"}, {"text": "hello world"}]
    expected, _, n_tokens = reference_loss(sharp, tokenizer, records)
    result = evaluate(sharp, tokenizer, records, batch_size=2)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert n_tokens == (6 + 1) + (2 + 1)  # [BOS] words EOS: every token after BOS is scored
    assert result["exact_match"] is None and result["n_exact_match"] == 0


def test_model_mode_is_restored(model: nn.Module) -> None:
    model.train()
    try:
        evaluate(model, tiny_tokenizer(), MESSAGES[1:], exact_match=False)
        assert model.training
    finally:
        model.eval()


# -- exact match ---------------------------------------------------------------------------------------------------
def test_exact_match_asks_for_greedy_answers_to_the_prompts(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_generate(model: nn.Module, tokenizer: Any, prompts: list[Any], **kwargs: Any) -> list[str]:
        seen.update(prompts=prompts, **kwargs)
        return [" hello world\n", "on a rug", "two"]

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)
    result = evaluate(model, tiny_tokenizer(), MESSAGES, max_new_tokens=7)
    assert seen["prompts"] == [r["messages"][:-1] for r in MESSAGES]
    assert seen["do_sample"] is False and seen["max_new_tokens"] == 7
    assert result["exact_match"] == pytest.approx(2 / 3) and result["n_exact_match"] == 3


def test_exact_match_end_to_end_with_real_generation(model: nn.Module) -> None:
    tokenizer = tiny_tokenizer()
    prompts = ["what is two plus four", "hello"]
    answers = generate(model, tokenizer, prompts, max_new_tokens=3)
    assert all(len(a.split()) == 3 for a in answers)
    right = [{"prompt": p, "completion": f" {a} "} for p, a in zip(prompts, answers)]
    assert evaluate(model, tokenizer, right, max_new_tokens=3)["exact_match"] == 1.0
    wrong = [{"prompt": p, "completion": a + " x"} for p, a in zip(prompts, answers)]
    assert evaluate(model, tokenizer, [right[0], wrong[1]], max_new_tokens=3)["exact_match"] == 0.5


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replaces generate; records each call's prompts and options and answers the references' first word."""
    calls: list[dict[str, Any]] = []

    def fake_generate(model: nn.Module, tokenizer: Any, prompts: list[Any], **kwargs: Any) -> list[str]:
        calls.append({"prompts": prompts, **kwargs})
        return ["hello" for _ in prompts]

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)
    return calls


def test_answer_length_follows_the_references(model: nn.Module, spy: list[dict[str, Any]]) -> None:
    result = evaluate(model, tiny_tokenizer(), MESSAGES)  # references: 'hello world', 'on a mat', 'two'
    assert spy[0]["max_new_tokens"] == 3 + evaluate_module.ANSWER_MARGIN  # 'on a mat' is 3 tokens
    assert result["n_exact_match"] == 3 and "up to 11 tokens" in result["exact_match_note"]


def test_long_references_get_no_exact_match_unless_asked(model: nn.Module, spy: list[dict[str, Any]]) -> None:
    tokenizer = tiny_tokenizer()
    long_answer = " ".join(["the cat sat on a mat"] * 6)  # 36 tokens
    records = [{"prompt": "what is a cat", "completion": long_answer}, {"prompt": "what is two", "completion": "two"}]
    result = evaluate(model, tokenizer, records)
    assert spy == [] and result["exact_match"] is None and result["n_exact_match"] == 0
    assert result["exact_match_note"].startswith("references up to 36 tokens, longer than 32")
    assert math.isfinite(result["loss"])
    result = evaluate(model, tokenizer, records, exact_match=True)
    assert spy[0]["max_new_tokens"] == 36 + evaluate_module.ANSWER_MARGIN and result["n_exact_match"] == 2
    evaluate(model, tokenizer, MESSAGES, exact_match=False)
    assert len(spy) == 1
