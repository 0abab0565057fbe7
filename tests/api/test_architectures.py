"""Architectures beyond the Llama / GPT-2 / BERT shapes, against HF PEFT on the same weights.

Each tiny model is built from a config (no download), with the base model's own dropout at 0 so that a training
step is deterministic. For each case both libraries wrap the same modules; lorakit's adapter weights are copied
into PEFT's model, and one training step (lorakit's fast paths on, LoRA dropout 0) must give PEFT's loss and
gradients. PEFT is only the reference here, imported in tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from helpers import VOCAB, assert_same_adapter_config, input_ids
from torch import nn
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    FalconConfig,
    FalconForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import lorakit

ATOL = 1e-5


# -- tiny models -----------------------------------------------------------------------------------------------------
def _build(cls: type[nn.Module], config: object, seed: int) -> nn.Module:
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(config).eval()


def tiny_falcon(seed: int = 0) -> FalconForCausalLM:
    """FalconForCausalLM, the new decoder architecture (parallel attention and MLP, whose output the model adds to
    in place: ``mlp_output += attention_output``); its Linear layers are ``FalconLinear``, a subclass."""
    config = FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, attention_dropout=0.0, hidden_dropout=0.0,
    )
    return _build(FalconForCausalLM, config, seed)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """T5ForConditionalGeneration, gated feed-forward: its forward reads ``self.wo.weight.dtype`` of the (wrapped)
    output projection."""
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return _build(T5ForConditionalGeneration, config, seed)


def tiny_phi(seed: int = 0) -> PhiForCausalLM:
    """PhiForCausalLM (model_type 'phi'): q/k/v/dense attention, fc1 / fc2 MLP."""
    config = PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, max_position_embeddings=64,
    )
    return _build(PhiForCausalLM, config, seed)


def tiny_phi3(seed: int = 0) -> Phi3ForCausalLM:
    """Phi3ForCausalLM: fused qkv_proj (a default target of lorakit's, not of PEFT's)."""
    config = Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, max_position_embeddings=64,
        pad_token_id=0,
    )
    return _build(Phi3ForCausalLM, config, seed)


def tiny_distilbert_cls(seed: int = 0) -> DistilBertForSequenceClassification:
    """DistilBertForSequenceClassification: its head is pre_classifier then classifier (both Linear)."""
    config = DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=3,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
    )
    return _build(DistilBertForSequenceClassification, config, seed)


def _lm_batch() -> dict[str, torch.Tensor]:
    ids = input_ids()
    return dict(input_ids=ids, labels=ids)


# -- two libraries, one set of weights -------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _twins(factory: Callable[[int], nn.Module], kwargs: dict) -> tuple[nn.Module, nn.Module]:
    """(lorakit model, PEFT model) on two copies of one base, with the same trainable parameter names and values
    (lorakit's random adapter weights copied into PEFT's model)."""
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(factory(0), lorakit.LoraConfig(**kwargs, init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(factory(0), peft.LoraConfig(**kwargs, init_lora_weights=False))
    assert sorted(_trainable(ours)) == sorted(_trainable(theirs))
    with torch.no_grad():
        for name, param in _trainable(theirs).items():
            param.copy_(_trainable(ours)[name])
    return ours, theirs


def _step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, gradient of each trainable parameter) of one training-mode forward and backward."""
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in _trainable(model).items()}


def _assert_same_step(ours: nn.Module, theirs: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    loss, grads = _step(ours, batch)
    ref_loss, ref_grads = _step(theirs, batch)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and ref_grads[name] is not None, name
        torch.testing.assert_close(grad, ref_grads[name], atol=ATOL, rtol=1e-4, msg=name)


# -- fast paths that must not crash ----------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [None, "all-linear"], ids=["default_targets", "all_linear"])
def test_falcon_trains_like_peft(targets):
    """Falcon adds to its MLP output in place; with all-linear that output is a LoRA layer's (dense_4h_to_h)."""
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0)
    if targets is not None:
        kwargs["target_modules"] = targets
    ours, theirs = _twins(tiny_falcon, kwargs)
    _assert_same_step(ours, theirs, _lm_batch())


# -- wrappers that answer like the wrapped layer ---------------------------------------------------------------------
T5_CASES = [
    pytest.param(dict(task_type="SEQ_2_SEQ_LM"), id="default_targets"),
    pytest.param(dict(target_modules="all-linear", task_type="SEQ_2_SEQ_LM"), id="all_linear"),
]


def _seq2seq_batch() -> dict[str, torch.Tensor]:
    return dict(input_ids=input_ids(seed=0), labels=input_ids(seq=5, seed=1))


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("kwargs", T5_CASES)
def test_t5_forward_and_training_step_like_peft(kwargs):
    ours, theirs = _twins(tiny_t5, dict(r=4, lora_alpha=8, lora_dropout=0.0, **kwargs))
    batch = _seq2seq_batch()
    torch.testing.assert_close(_logits(ours, batch), _logits(theirs, batch), atol=ATOL, rtol=1e-5)
    _assert_same_step(ours, theirs, batch)


@pytest.mark.parametrize("kwargs", T5_CASES)
def test_t5_files_load_both_ways(kwargs, tmp_path: Path):
    ours, theirs = _twins(tiny_t5, dict(r=4, lora_alpha=8, **kwargs))
    batch = _seq2seq_batch()
    ours.save_pretrained(tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    in_peft = peft.PeftModel.from_pretrained(tiny_t5(0), tmp_path / "lorakit")
    in_lorakit = lorakit.PeftModel.from_pretrained(tiny_t5(0), tmp_path / "peft")
    expected = _logits(ours, batch)
    with ours.disable_adapter():
        assert (_logits(ours, batch) - expected).abs().max() > 1e-3, "the adapter must matter, or the test is void"
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(_logits(in_lorakit, batch), expected, atol=1e-4, rtol=1e-5)


# -- default targets and modules_to_save like PEFT's -----------------------------------------------------------------
def test_phi_default_targets_like_peft():
    """PEFT's default for phi is q_proj, v_proj, fc1, fc2 (lorakit had none: TargetError)."""
    ours, theirs = _twins(tiny_phi, dict(r=4, lora_alpha=8, lora_dropout=0.0))
    assert {n.split(".")[-4] for n in _trainable(ours)} == {"q_proj", "v_proj", "fc1", "fc2"}
    _assert_same_step(ours, theirs, _lm_batch())


def _saved_copies(model: nn.Module) -> set[str]:
    return {n.split(".modules_to_save.")[0] for n in _trainable(model) if ".modules_to_save." in n}


def test_distilbert_seq_cls_saves_the_modules_peft_saves(tmp_path: Path):
    """For SEQ_CLS both libraries add 'classifier' to modules_to_save, and PEFT matches its entries as a string
    suffix of the module name: DistilBERT's pre_classifier is trained in full and saved as well."""
    ours, theirs = _twins(tiny_distilbert_cls, dict(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS"))
    assert _saved_copies(ours) == {"base_model.model.pre_classifier", "base_model.model.classifier"}
    batch = dict(input_ids=input_ids(), labels=torch.tensor([0, 2]))
    _assert_same_step(ours, theirs, batch)
    ours.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_distilbert_cls(0), tmp_path)
    torch.testing.assert_close(_logits(loaded, batch), _logits(ours, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", ["all-linear", ["q_lin", "pre_classifier"]])
def test_distilbert_a_module_to_save_is_no_lora_target(targets):
    """A module that modules_to_save names stays a full copy even when the targets name it too (all-linear takes
    pre_classifier). PEFT wraps it with LoRA first and then fails ("modules_to_save cannot be applied to modules of
    type lora.Linear"): a deliberate difference, lorakit trains it as PEFT would with explicit targets."""
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS")
    model = lorakit.get_peft_model(tiny_distilbert_cls(0), config)
    assert _saved_copies(model) == {"base_model.model.pre_classifier", "base_model.model.classifier"}
    assert not any("pre_classifier" in n and "lora_" in n for n in _trainable(model))


# -- adapter_config.json like PEFT's ---------------------------------------------------------------------------------
CONFIG_CASES = [
    pytest.param(tiny_falcon, dict(), id="falcon_default"),
    pytest.param(tiny_falcon, dict(target_modules="all-linear"), id="falcon_all_linear"),
    pytest.param(tiny_t5, dict(task_type="SEQ_2_SEQ_LM"), id="t5_default"),
    pytest.param(tiny_t5, dict(target_modules="all-linear"), id="t5_all_linear_no_task"),
    pytest.param(tiny_phi, dict(), id="phi_default"),
    pytest.param(tiny_distilbert_cls, dict(target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS"), id="distilbert"),
    pytest.param(
        tiny_distilbert_cls, dict(target_modules=["q_lin"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
        id="distilbert_head_listed_twice",
    ),
]


@pytest.mark.parametrize("factory, kwargs", CONFIG_CASES)
def test_same_adapter_config_as_peft(factory, kwargs, tmp_path: Path):
    ours, theirs = _twins(factory, dict(r=4, lora_alpha=8, **kwargs))
    ours.save_pretrained(tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")


def test_a_default_peft_lacks_is_recorded_so_peft_loads_the_adapter(tmp_path: Path):
    """Phi-3's default (qkv_proj) is lorakit's own; the file names it, so PEFT (which has no default for phi3)
    loads the adapter."""
    model = lorakit.get_peft_model(tiny_phi3(0), lorakit.LoraConfig(r=4, init_lora_weights=False))
    assert model.peft_config["default"].target_modules == ["qkv_proj"]
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_phi3(0), tmp_path)
    batch = _lm_batch()
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)
