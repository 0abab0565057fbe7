"""MiCA (init_lora_weights="mica": lorakit.ops.init.mica, lorakit.adapters.variant_mica): B from the base weight's
minor left singular vectors and frozen, A = 0 and the only trained factor; PEFT interop (files both ways, keys,
config, trainable parameters)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from helpers import assert_same_adapter_config, both_ways, input_ids, perturb_, tiny_llama
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.config import ConfigError
from lorakit.ops import init

ATOL = 1e-5


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 10)
        self.fc1 = nn.Linear(10, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_initializer_takes_the_minor_singular_vectors():
    torch.manual_seed(0)
    W = torch.randn(12, 10)
    A, B, residual = init.mica(W, 4, 2.0)
    assert residual is None and A.shape == (4, 10) and torch.all(A == 0)
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(B @ B.T, U[:, -4:] @ U[:, -4:].T, atol=1e-5)  # the span of the smallest 4
    assert not torch.allclose(B @ B.T, U[:, :4] @ U[:, :4].T, atol=1e-2)
    assert torch.allclose(B.T @ B, torch.eye(4), atol=1e-5)
    assert torch.allclose(torch.linalg.norm(W.T @ B, dim=0), S[-4:], atol=1e-4)  # ||W^T u_i|| = s_i
    with pytest.raises(ValueError, match=r"MiCA requires `r` <= min\(in_features, out_features\).*lower r"):
        init.mica(torch.randn(3, 2), 3, 1.0)


def test_linear_and_embedding_start_as_the_identity_with_B_frozen():
    torch.manual_seed(0)
    base = MLP()
    ids = torch.randint(0, 7, (2, 5))
    expected = base(ids)
    config = lorakit.LoraConfig(target_modules=["emb", "fc1"], init_lora_weights="mica", r=3)
    model = lorakit.get_peft_model(base, config)
    assert torch.allclose(model(ids), expected, atol=1e-6)
    assert _trainable(model) == [
        "base_model.model.emb.lora_embedding_A.default",
        "base_model.model.fc1.lora_A.default.weight",
    ]
    B_emb = model.base_model.model.emb.lora_embedding_B["default"]  # (dim, r): minor vectors of E.T (10, 7)
    U, _, _ = torch.linalg.svd(base.emb.base_layer.weight.T.detach(), full_matrices=False)
    assert torch.allclose(B_emb @ B_emb.T, U[:, -3:] @ U[:, -3:].T, atol=1e-5)
    assert model.base_model.model.fc1._fast is not None  # plain forward: the fast path runs


def test_training_moves_A_only_and_merge_round_trips():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(
        MLP(), lorakit.LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights="mica", r=3)
    )
    B = model.base_model.model.fc1.lora_B["default"].weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 7, (4, 5))
    for _ in range(3):
        opt.zero_grad()
        model(ids).pow(2).mean().backward()
        opt.step()
    layer = model.base_model.model.fc1
    assert torch.equal(layer.lora_B["default"].weight, B) and layer.lora_B["default"].weight.grad is None
    assert layer.lora_A["default"].weight.abs().sum() > 0
    model.eval()
    before = model(ids)
    model.merge_adapter()
    assert torch.allclose(model(ids), before, atol=ATOL)
    model.unmerge_adapter()
    assert torch.allclose(model(ids), before, atol=ATOL)


def test_B_stays_frozen_when_switching_adapters_and_in_set_requires_grad():
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["fc1"], init_lora_weights="mica", r=4))
    assert _trainable(model) == ["base_model.model.fc1.lora_A.default.weight"]
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights="mica", r=4))
    model.set_adapter("other")
    assert _trainable(model) == ["base_model.model.fc1.lora_A.other.weight", "base_model.model.fc2.lora_A.other.weight"]
    model.set_adapter("default")
    model.set_requires_grad("other")
    assert not any(".lora_B." in n for n in _trainable(model))
    names = model.base_model.model.fc1.frozen_peft_weight_names  # PEFT's attribute, a live view
    assert names == {"default": ("lora_B",), "other": ("lora_B",)}
    model.delete_adapter("other")
    assert names == {"default": ("lora_B",)} and "other" not in names
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["fc1"], r=4))
    model.set_adapter("other")
    assert _trainable(model) == ["base_model.model.fc1.lora_A.other.weight", "base_model.model.fc1.lora_B.other.weight"]


def test_refusals():
    with pytest.raises(ConfigError, match=r"variant combination: \('mica', 'use_dora'\)"):
        lorakit.LoraConfig(init_lora_weights="mica", use_dora=True)
    model = nn.Sequential(nn.Conv1d(4, 4, 3))
    with pytest.raises(ValueError, match="init_lora_weights='mica' is not available for a Conv1d target"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["0"], init_lora_weights="mica", r=2))


# -- PEFT interop ----------------------------------------------------------------------------------------------
def _llama(module: type) -> nn.Module:
    config = module.LoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, init_lora_weights="mica")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = module.get_peft_model(tiny_llama(0), config)
    perturb_([p for p in model.parameters() if p.requires_grad], seed=3)  # the trained A's
    return model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids(seed=1)).logits


def test_same_initial_B_and_trainable_parameters_as_peft():
    ours, theirs = _llama(lorakit), _llama(peft)
    assert _trainable(ours) == _trainable(theirs)
    b = lambda m: {n: p for n, p in m.named_parameters() if "lora_B" in n or "lora_embedding_B" in n}  # noqa: E731
    ob, tb = b(ours), b(theirs)
    assert ob.keys() == tb.keys() and len(ob) == 5
    for name in ob:  # the same subspace (signs of singular vectors may differ)
        assert torch.allclose(ob[name] @ ob[name].T, tb[name] @ tb[name].T, atol=1e-4)


@both_ways
def test_files_load_both_ways_with_equal_outputs(writer, reader, tmp_path):
    model = _llama(writer)
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = reader.PeftModel.from_pretrained(tiny_llama(0), tmp_path, is_trainable=True)
    assert (_logits(loaded) - _logits(model)).abs().max() < ATOL
    assert not any("lora_B" in n or "lora_embedding_B" in n for n in _trainable(loaded))


def test_same_file_keys_and_config_as_peft(tmp_path):
    _llama(lorakit).save_pretrained(tmp_path / "lorakit", save_embedding_layers=False)
    _llama(peft).save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    shapes = lambda d: {k: tuple(v.shape) for k, v in load_file(d / "adapter_model.safetensors").items()}  # noqa: E731
    assert shapes(tmp_path / "lorakit") == shapes(tmp_path / "peft")
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")
