"""Architectures beyond the Llama / GPT-2 / BERT shapes, against HF PEFT on the same weights.

Each tiny model is built from a config (no download), with the base model's own dropout at 0 so that a training
step is deterministic. For each case both libraries wrap the same modules; lorakit's adapter weights are copied
into PEFT's model, and one training step (lorakit's fast paths on, LoRA dropout 0) must give PEFT's loss and
gradients. PEFT is only the reference here, imported in tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import peft
import pytest
import torch
from helpers import VOCAB, input_ids
from torch import nn
from transformers import FalconConfig, FalconForCausalLM

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
