"""lorakit.commands.generate: prompt formatting, batched left-padded decoding, streaming, loading, prompt files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    CHATML,
    PROMPT_SPECIALS,
    save_tiny_adapter,
    save_tiny_folder,
    silence_eos_,
    tiny_bert_cls,
    tiny_llama,
    tiny_tokenizer,
)
from torch import nn

from lorakit import AdapterFileError, LoraConfig, PeftModel, get_peft_model
from lorakit.commands.generate import format_prompt, generate, load_pretrained
from lorakit.data.records import read_prompts


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return silence_eos_(tiny_llama(0))


PROMPTS = ["hello", "what is two plus four", "the cat sat on a mat with the cat"]


# -- format_prompt -------------------------------------------------------------------------------------------------
def test_format_prompt_uses_chat_template_unless_disabled() -> None:
    chat = tiny_tokenizer(chat=True)
    assert format_prompt(chat, "hello") == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(chat, "hello", chat=False) == "hello"
    assert format_prompt(tiny_tokenizer(chat=False), "hello") == "hello"
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "six"},
        {"role": "user", "content": "x"},
    ]
    assert format_prompt(chat, messages).endswith("x<|im_end|>\n<|im_start|>assistant\n")


def test_format_prompt_without_template_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="no chat_template.*chat=False"):
        format_prompt(tiny_tokenizer(chat=False), "hello", chat=True)


# -- generate ------------------------------------------------------------------------------------------------------
class Spy:
    """Wraps model.generate to record what it was given and returned."""

    def __init__(self, model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        real = model.generate

        def spy(**kwargs: Any) -> torch.Tensor:
            out = real(**kwargs)
            self.calls.append((kwargs["input_ids"], kwargs["attention_mask"], out))
            return out

        monkeypatch.setattr(model, "generate", spy)


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_tokens_match_training_format(model: nn.Module, chat: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer, spy = tiny_tokenizer(chat), Spy(model, monkeypatch)
    generate(model, tokenizer, ["hello world"], max_new_tokens=2)
    ids = spy.calls[0][0][0].tolist()
    if chat:  # the template writes its own special tokens: no BOS added on top
        assert ids == tokenizer("<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        assert ids[0] == 4
    else:  # plain text gets the tokenizer's BOS, as data_tokenize does for plain prompt/completion records
        assert ids == [1, tokenizer.convert_tokens_to_ids("hello"), tokenizer.convert_tokens_to_ids("world")]


def test_batch_is_left_padded_and_equals_one_by_one(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = tiny_tokenizer()
    one_by_one = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    spy = Spy(model, monkeypatch)
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    input_ids, attention_mask, _ = spy.calls[0]
    assert attention_mask[0, 0] == 0 and attention_mask[:, -1].all()  # padding on the left
    assert input_ids[0, 0] == tokenizer.pad_token_id
    assert batched == one_by_one
    assert all(len(text.split()) == 6 for text in batched)  # eos silenced: exactly max_new_tokens words


def test_batches_keep_prompt_order(model: nn.Module) -> None:
    tokenizer = tiny_tokenizer()
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=2) == generate(
        model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=8
    )


def test_returns_only_new_text_without_special_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_llama(0), tiny_tokenizer()  # eos not silenced: this seed emits <pad> (id 0) for "hello"
    spy = Spy(model, monkeypatch)
    (text,) = generate(model, tokenizer, ["hello"], max_new_tokens=5)
    input_ids, _, out = spy.calls[0]
    new = out[0, input_ids.shape[1] :].tolist()
    assert any(i < len(PROMPT_SPECIALS) for i in new)  # so that skipping special tokens is tested
    assert text == tokenizer.decode(new, skip_special_tokens=True)
    assert not any(special in text for special in PROMPT_SPECIALS)


def test_stream_callback_receives_the_returned_text(model: nn.Module) -> None:
    pieces: list[str] = []
    (text,) = generate(model, tiny_tokenizer(), ["hello"], max_new_tokens=6, stream=pieces.append)
    assert len(pieces) >= 1 and "".join(pieces).strip() == text.strip() != ""


def test_stream_needs_one_prompt(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="exactly one prompt"):
        generate(model, tiny_tokenizer(), PROMPTS, stream=print)


def test_sampling_is_seeded_and_differs_from_greedy(model: nn.Module) -> None:
    tokenizer = tiny_tokenizer()
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=8)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(generate(model, tokenizer, PROMPTS, max_new_tokens=8, do_sample=True, temperature=5.0, top_p=1.0))
    assert runs[0] == runs[1] and runs[0] != greedy
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tokenizer, PROMPTS, do_sample=True, temperature=0)


def test_sets_missing_pad_and_restores_model_and_tokenizer_state(model: nn.Module) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    model.train()
    try:
        generate(model, tokenizer, PROMPTS[:2], max_new_tokens=2)
        assert model.training and tokenizer.padding_side == "right"
        assert tokenizer.pad_token == tokenizer.eos_token
    finally:
        model.eval()


# -- loading and prompt files --------------------------------------------------------------------------------------
def test_load_pretrained_puts_the_adapter_on_its_recorded_base(tmp_path: Path) -> None:
    base_dir = save_tiny_folder(tmp_path / "base")
    adapter_dir = save_tiny_adapter(base_dir, tmp_path / "adapter")
    ids = torch.tensor([[7, 8, 9, 10]])
    base, _ = load_pretrained(str(base_dir))
    tuned, tokenizer = load_pretrained(adapter=adapter_dir)  # base from adapter_config.json
    assert tokenizer.chat_template == CHATML
    assert not tuned.training
    base_logits, tuned_logits = base(ids).logits, tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)
    with tuned.disable_adapter():
        torch.testing.assert_close(tuned(ids).logits, base_logits)


def save_bert_adapter(folder: Path) -> Path:
    """A LoRA adapter on the query / value projections of a tiny BERT recorded as all-MiniLM-L6-v2."""
    bert = tiny_bert_cls()
    bert.name_or_path = bert.config._name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    config = LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    get_peft_model(bert, config).save_pretrained(folder)
    return folder


def test_an_adapter_for_another_base_is_named_as_such(tmp_path: Path) -> None:
    """Not "target module 'query' matched nothing; did you mean '0' or '1' ...": the recorded base and the first
    module of the file the model lacks, with its shape."""
    bert_adapter = save_bert_adapter(tmp_path / "bert-adapter")
    base_dir = save_tiny_folder(tmp_path / "base")
    expected = (
        rf"{bert_adapter} was made for another base model: it records base_model_name_or_path "
        r"'sentence-transformers/all-MiniLM-L6-v2', and its module 'bert.encoder.layer.0.attention.self.query' "
        rf"\(32 x 32\) is not in this LlamaForCausalLM \('{base_dir}'\); load it onto its own base"
    )
    with pytest.raises(AdapterFileError, match=expected):
        load_pretrained(str(base_dir), bert_adapter)
    peft = PeftModel.from_pretrained(tiny_llama(), save_tiny_adapter(base_dir, tmp_path / "llama-adapter"))
    with pytest.raises(AdapterFileError, match="was made for another base model.*'bert.encoder.layer.0"):
        peft.load_adapter(bert_adapter, adapter_name="bert")
    assert list(peft.peft_config) == ["default"]


def test_read_prompts_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("hello\n\nwhat is two\n")
    assert read_prompts(tmp_path / "p.txt") == ["hello", "what is two"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "x": 1}) + "\n")
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "match"), [('{"prompt": "a"}\n{"prompt": \n', "line 2: invalid JSON"), ('{"text": "a"}\n', "line 1")]
)
def test_read_prompts_bad_jsonl_names_line(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(ValueError, match=match):
        read_prompts(tmp_path / "p.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
