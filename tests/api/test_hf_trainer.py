"""transformers.Trainer given a lorakit model: the label columns it finds, as with PEFT's model, and eval_loss."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import transformers
from helpers import input_ids, tiny_bert_cls, tiny_llama
from transformers import BertConfig, BertForQuestionAnswering, BertModel

import lorakit


def _bert_config() -> BertConfig:
    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)


def _args(tmp_path) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=2, save_strategy="no"
    )


CASES = [
    pytest.param(tiny_llama, dict(target_modules=["q_proj"]), id="causal_lm_no_task_type"),
    pytest.param(tiny_llama, dict(target_modules=["q_proj"], task_type="CAUSAL_LM"), id="causal_lm"),
    pytest.param(tiny_bert_cls, dict(target_modules=["query"], task_type="SEQ_CLS"), id="seq_cls"),
    pytest.param(lambda seed: BertForQuestionAnswering(_bert_config()), dict(target_modules=["query"],
                 task_type="QUESTION_ANS"), id="question_answering"),
    pytest.param(lambda seed: BertModel(_bert_config()), dict(target_modules=["query"],
                 task_type="FEATURE_EXTRACTION"), id="feature_extraction"),
]


@pytest.mark.parametrize("factory, kwargs", CASES)
def test_trainer_finds_the_label_columns_it_finds_for_peft(factory, kwargs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lorakit.get_peft_model(factory(0), lorakit.LoraConfig(**kwargs))
        theirs = peft.get_peft_model(factory(0), peft.LoraConfig(**kwargs))
        expected = transformers.Trainer(model=theirs, args=_args(tmp_path)).label_names
        assert transformers.Trainer(model=ours, args=_args(tmp_path)).label_names == expected


def test_trainer_evaluate_reports_eval_loss(tmp_path):
    """The seed's config (no task_type) on a causal LM: evaluate() computes the loss from the labels column."""
    model = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(target_modules=["q_proj"], lora_alpha=32))
    ids = input_ids(batch=4)
    rows = [dict(input_ids=row, labels=row) for row in ids]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = transformers.Trainer(model=model, args=_args(tmp_path), eval_dataset=rows).evaluate()
    with torch.no_grad():
        want = torch.stack([model(input_ids=ids[i:i + 2], labels=ids[i:i + 2]).loss for i in (0, 2)]).mean()
    assert metrics["eval_loss"] == pytest.approx(want.item(), rel=1e-5)
