"""AutoPeftModel* for each task: the base model named in the adapter's config is loaded with the task's transformers
auto class, then the adapter; files from lorakit and from PEFT, against PEFT's own auto classes."""

from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch
from helpers import VOCAB, assert_same_adapter_config, input_ids, perturb_
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForQuestionAnswering,
    BertModel,
    T5Config,
    T5ForConditionalGeneration,
)

import lorakit
from lorakit.api.peft_model import MODEL_TYPE_TO_PEFT_MODEL


def _bert_config() -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)


def _t5_config() -> T5Config:
    return T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    decoder_start_token_id=0, pad_token_id=0)


def _outputs(model: nn.Module) -> torch.Tensor:
    """The task's output tensor for a fixed batch: logits, span start logits, or hidden states."""
    model.eval()
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=input_ids(), decoder_input_ids=input_ids(seq=4, seed=1)).logits
        out = model(input_ids=input_ids())
    return out.start_logits if hasattr(out, "start_logits") else out.last_hidden_state


# (lorakit auto class name, transformers model class, its config, task_type, the modules the task saves in full)
CASES = [
    pytest.param("AutoPeftModelForSeq2SeqLM", T5ForConditionalGeneration, _t5_config, "SEQ_2_SEQ_LM", set(),
                 id="seq2seq_t5"),
    pytest.param("AutoPeftModelForQuestionAnswering", BertForQuestionAnswering, _bert_config, "QUESTION_ANS",
                 {"qa_outputs"}, id="question_answering_bert"),
    pytest.param("AutoPeftModelForFeatureExtraction", BertModel, _bert_config, "FEATURE_EXTRACTION", set(),
                 id="feature_extraction_bert"),
]


def _saved_base(folder: Path, model_cls: type[nn.Module], config_fn) -> Path:
    config = config_fn()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    return folder


def _adapted(lib, base_dir: Path, model_cls: type[nn.Module], task_type: str) -> nn.Module:
    base = model_cls.from_pretrained(base_dir)
    targets = ["q", "v"] if base.config.is_encoder_decoder else ["query", "value"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type,
                                init_lora_weights=False)
        model = lib.get_peft_model(base, config)
    perturb_([p for p in model.parameters() if p.requires_grad], seed=1)  # the head copies too
    return model


@pytest.mark.parametrize("auto_name, model_cls, config_fn, task_type, saved", CASES)
def test_auto_class_loads_lorakit_and_peft_adapters(auto_name, model_cls, config_fn, task_type, saved, tmp_path):
    base_dir = _saved_base(tmp_path / "base", model_cls, config_fn)
    ours, theirs = _adapted(lorakit, base_dir, model_cls, task_type), _adapted(peft, base_dir, model_cls, task_type)
    copies = {n.split(".")[-4] for n, p in ours.named_parameters() if p.requires_grad and ".modules_to_save." in n}
    assert copies == saved
    ours.save_pretrained(tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")

    auto = getattr(lorakit, auto_name)
    for folder, model in ((tmp_path / "lorakit", ours), (tmp_path / "peft", theirs)):
        loaded = auto.from_pretrained(folder)
        assert isinstance(loaded, MODEL_TYPE_TO_PEFT_MODEL[lorakit.TaskType(task_type)])
        assert isinstance(loaded.get_base_model(), model_cls)
        torch.testing.assert_close(_outputs(loaded), _outputs(model), atol=1e-5, rtol=1e-5)
    in_peft = getattr(peft, auto_name).from_pretrained(tmp_path / "lorakit")
    torch.testing.assert_close(_outputs(in_peft), _outputs(ours), atol=1e-5, rtol=1e-5)


def test_question_answering_model_class_is_peft_s_name():
    assert lorakit.PeftModelForQuestionAnswering.__name__ == peft.PeftModelForQuestionAnswering.__name__
    model = lorakit.get_peft_model(
        BertForQuestionAnswering(_bert_config()), lorakit.LoraConfig(target_modules=["query"], task_type="QUESTION_ANS")
    )
    assert type(model) is lorakit.PeftModelForQuestionAnswering
    assert model.peft_config["default"].modules_to_save == ["qa_outputs"]



def test_generic_auto_class_loads_the_base_class_auto_mapping_names(tmp_path):
    """No task_type: PEFT records the base model's class (auto_mapping) and AutoPeftModel loads that class."""
    import json

    from helpers import save_tiny_adapter, save_tiny_folder

    base = save_tiny_folder(tmp_path / "base")
    adapter = save_tiny_adapter(base, tmp_path / "adapter")
    mapping = json.loads((adapter / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping == {
        "base_model_class": "LlamaForCausalLM",
        "parent_library": "transformers.models.llama.modeling_llama",
    }
    model = lorakit.AutoPeftModel.from_pretrained(adapter)
    assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"  # AutoModel alone would give LlamaModel
    reference = lorakit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, reference(input_ids()).logits)


def test_auto_mapping_outside_transformers_is_not_imported(tmp_path):
    import json

    from helpers import save_tiny_adapter, save_tiny_folder

    adapter = save_tiny_adapter(save_tiny_folder(tmp_path / "base"), tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["auto_mapping"] = {"base_model_class": "system", "parent_library": "os"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorakit.AdapterFileError, match="outside transformers"):
        lorakit.AutoPeftModel.from_pretrained(adapter)


def test_auto_class_of_another_task_is_refused_naming_the_right_one(tmp_path):
    from helpers import save_tiny_adapter, save_tiny_folder

    adapter = save_tiny_adapter(save_tiny_folder(tmp_path / "base"), tmp_path / "adapter", task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="task_type CAUSAL_LM: load it with AutoPeftModelForCausalLM"):
        lorakit.AutoPeftModelForSequenceClassification.from_pretrained(adapter)
