"""ensure_weight_tying (lorakit.adapters.weight_tying) on a tiny Llama with tie_word_embeddings=True: the output layer
shares the embedding's modules_to_save copy or its LoRA factors, stays equal to it through training steps and merging,
writes PEFT's adapter_config.json and files, and loads both ways with equal logits; PEFT's warnings."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from helpers import _build, _llama_config, assert_same_adapter_config, input_ids, perturb_
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM

import lorakit
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.modules_to_save import ModulesToSaveWrapper

ATOL = 1e-5
SAVE = dict(target_modules=["q_proj"], modules_to_save=["lm_head"])
LORA = dict(target_modules=["q_proj", "lm_head"])


def tiny_llama(seed: int = 0, tied: bool = True) -> LlamaForCausalLM:
    return _build(LlamaForCausalLM, _llama_config(tie_word_embeddings=tied), seed)


def _made(lib, kwargs: dict, seed: int = 1) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = lib.LoraConfig(**kwargs, ensure_weight_tying=True, init_lora_weights=False)
        model = lib.get_peft_model(tiny_llama(0), config)
    perturb_([p for p in model.parameters() if p.requires_grad], seed=seed, scale=0.2)
    return model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def _effective(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(the embedding's effective weight (V, d), the output layer's (V, d)) as the adapted model computes them."""
    inner = model.base_model.model
    emb, head = inner.model.embed_tokens, inner.lm_head
    if isinstance(emb, ModulesToSaveWrapper):
        return emb.modules_to_save["default"].weight, head.modules_to_save["default"].weight
    A, B = emb.lora_weights("default")  # (r, V), (d, r)
    A_h, B_h = head.lora_weights("default")  # (r, d), (V, r)
    E = emb.base_layer.weight
    return E + emb.scaling["default"] * A.T @ B.T, head.base_layer.weight + head.scaling["default"] * B_h @ A_h


@pytest.mark.parametrize("kwargs", [SAVE, LORA], ids=["modules_to_save", "target_modules"])
def test_output_layer_stays_tied_through_training_and_merging(kwargs):
    torch.manual_seed(0)
    model = _made(lorakit, kwargs).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    x = input_ids()
    emb_before, _ = _effective(model)
    emb_before = emb_before.detach().clone()
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    emb, head = _effective(model)
    assert (emb - emb_before).abs().max() > 1e-3, "training moved the embedding's adapter"
    torch.testing.assert_close(head, emb, atol=1e-6, rtol=0)
    model.eval()
    expected = _logits(model)
    # the shared weight gets the update once (twice would be off by the update itself); rtol: the embedding's
    # init_lora_weights=False factors are N(0, 1), as PEFT's, and the logits reach ~140, where an fp32 ulp is 1.5e-5
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), expected, atol=ATOL, rtol=1e-5)
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), expected, atol=ATOL, rtol=1e-5)
    if kwargs is LORA:
        assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_lora_factors_share_the_embeddings_storage():
    model = _made(lorakit, LORA)
    inner = model.base_model.model
    assert isinstance(inner.lm_head, LoraLayer) and inner.lm_head.weight_tied_to == "model.embed_tokens"
    A, B = inner.model.embed_tokens.lora_weights("default")
    A_h, B_h = inner.lm_head.lora_weights("default")
    assert A_h.data_ptr() == B.data_ptr() and B_h.data_ptr() == A.data_ptr()
    torch.testing.assert_close(A_h, B.T)


def test_modules_to_save_copies_are_one_parameter():
    inner = _made(lorakit, SAVE).base_model.model
    assert inner.lm_head.modules_to_save["default"].weight is inner.model.embed_tokens.modules_to_save["default"].weight


@pytest.mark.parametrize("kwargs", [SAVE, LORA], ids=["modules_to_save", "target_modules"])
def test_same_config_files_and_trainable_parameters_as_peft(kwargs, tmp_path):
    ours, theirs = _made(lorakit, kwargs), _made(peft, kwargs)
    trainable = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(ours) == trainable(theirs)
    ours.save_pretrained(tmp_path / "lorakit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    shapes = lambda d: {k: tuple(v.shape) for k, v in load_file(d / "adapter_model.safetensors").items()}  # noqa: E731
    assert shapes(tmp_path / "lorakit") == shapes(tmp_path / "peft")
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")


@pytest.mark.parametrize("kwargs", [SAVE, LORA], ids=["modules_to_save", "target_modules"])
def test_files_load_both_ways_with_equal_logits(kwargs, tmp_path):
    ours = _made(lorakit, kwargs)
    ours.save_pretrained(tmp_path / "lorakit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "lorakit")
        theirs = _made(peft, kwargs)
        theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    assert (_logits(in_peft) - _logits(ours)).abs().max() < ATOL
    in_lorakit = lorakit.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft")
    assert (_logits(in_lorakit) - _logits(theirs)).abs().max() < ATOL
    inner = in_lorakit.base_model.model
    if kwargs is LORA:
        assert (
            inner.lm_head.lora_weights("default")[0].data_ptr()
            == inner.model.embed_tokens.lora_weights("default")[1].data_ptr()
        )


def test_warnings_as_peft():
    with pytest.warns(UserWarning, match="`ensure_weight_tying` is not set to True"):
        lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(**LORA))
    with pytest.warns(UserWarning, match="no tied modules were found in the model"):
        lorakit.get_peft_model(tiny_llama(0, tied=False), lorakit.LoraConfig(**LORA, ensure_weight_tying=True))
    with pytest.warns(UserWarning, match="no tied modules are added in either"):
        lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(target_modules=["q_proj"], ensure_weight_tying=True))
    model = lorakit.get_peft_model(tiny_llama(0, tied=False), lorakit.LoraConfig(**LORA, ensure_weight_tying=True))
    assert model.base_model.model.lm_head.weight_tied_to is None  # nothing tied on an untied model
