"""LoRA on nn.MultiheadAttention (lorakit.adapters.attention): the packed q/k/v projection and out_proj, against a
dense reference (a plain nn.MultiheadAttention whose two weights have the updates added), merge, several adapters,
refusals, and files both ways with PEFT.

PEFT 0.21.2 adds out_proj's update twice (its MultiheadAttention.merge writes W + dW into out_proj and then calls
out_proj.merge(), which adds dW again; its forward merges that way too: huggingface/peft PR #3774, open). lorakit
computes W + dW. The files are the same both ways; outputs agree with PEFT's where out_proj's update is zero, and the
last test pins down PEFT's behaviour, so that it fails the day PEFT changes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from helpers import assert_same_adapter_config, perturb_
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.adapters.attention import LoraMultiheadAttention

E, HEADS = 12, 3


class Attend(nn.Module):
    def __init__(self, batch_first: bool = False) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        self.lin0 = nn.Linear(E, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y, _ = self.mha(x, x, x, key_padding_mask=mask)
        return self.lin0(y)


def _base(seed: int = 0, batch_first: bool = False) -> Attend:
    torch.manual_seed(seed)
    return Attend(batch_first).eval()


def _x(batch_first: bool = False) -> torch.Tensor:
    x = torch.randn(4, 5, E, generator=torch.Generator().manual_seed(1))  # (T, B, E)
    return x.transpose(0, 1) if batch_first else x


def _adapted(base: nn.Module, name: str = "default", **config: object) -> lorakit.PeftModel:
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["mha"], **config), name)
    perturb_([p for n, p in model.named_parameters() if "lora_" in n], seed=3)
    return model.eval()


def _reference(base: Attend, layer: LoraMultiheadAttention, names: list[str]) -> Attend:
    """The base with each named adapter's s * B @ A added to in_proj_weight and out_proj.weight."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name in names:
            A, B = layer.lora_weights(name)
            ref.mha.in_proj_weight += layer.scaling[name] * B @ A  # (3E, r) @ (r, E)
            A_o, B_o = layer.lora_out_proj.lora_weights(name)
            ref.mha.out_proj.weight += layer.lora_out_proj.scaling[name] * B_o @ A_o  # (E, r) @ (r, E)
    return ref


@pytest.mark.parametrize("batch_first", [False, True])
def test_forward_equals_the_dense_reference(batch_first: bool) -> None:
    base = _base(batch_first=batch_first)
    model = _adapted(base, lora_alpha=16, r=4)
    layer = model.base_model.model.mha
    assert isinstance(layer, LoraMultiheadAttention)
    x = _x(batch_first)
    mask = torch.zeros(5, 4, dtype=torch.bool)
    mask[0, -1] = True
    ref = _reference(base, layer, ["default"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model(x, mask), ref(x, mask), atol=1e-6, rtol=1e-5)
        assert (model(x) - base(x)).abs().max() > 1e-3  # the adapter changes the output


def test_gradients_reach_both_projections_and_only_the_adapter() -> None:
    base = _base()
    model = _adapted(base).train()
    layer = model.base_model.model.mha
    ref = _reference(base, layer, ["default"]).train()
    x = _x()
    model(x).square().sum().backward()
    for p in (layer.base_layer.in_proj_weight, layer.out_proj.weight):
        assert not p.requires_grad and p.grad is None
    # dL/dB = s * dL/dW' @ A.T, with dL/dW' the reference's weight gradient
    ref.mha.in_proj_weight.requires_grad_(True)
    ref(x).square().sum().backward()
    A, B = layer.lora_weights("default")
    torch.testing.assert_close(B.grad, layer.scaling["default"] * ref.mha.in_proj_weight.grad @ A.detach().T)
    A_o, B_o = layer.lora_out_proj.lora_weights("default")
    expected = layer.lora_out_proj.scaling["default"] * ref.mha.out_proj.weight.grad @ A_o.detach().T
    torch.testing.assert_close(B_o.grad, expected)


def test_merge_unmerge_and_merge_and_unload() -> None:
    base = _base()
    model = _adapted(base)
    layer = model.base_model.model.mha
    x = _x()
    before = (layer.base_layer.in_proj_weight.clone(), layer.out_proj.weight.clone())
    with torch.no_grad():
        unmerged = model(x)
        layer.merge()  # on the layer itself: out_proj follows
        assert layer.merged and layer.lora_out_proj.merged
        torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(layer.base_layer.in_proj_weight, before[0], atol=1e-7, rtol=0)
        torch.testing.assert_close(layer.out_proj.weight, before[1], atol=1e-7, rtol=0)
        plain = copy.deepcopy(model).merge_and_unload()
        assert type(plain.mha) is nn.MultiheadAttention and type(plain.mha.out_proj) is not type(layer.lora_out_proj)
        assert isinstance(plain.mha.out_proj, nn.Linear)
        torch.testing.assert_close(plain(x), unmerged, atol=1e-6, rtol=1e-5)
        assert set(dict(plain.named_parameters())) == set(dict(base.named_parameters()))


def test_several_adapters_disable_and_delete() -> None:
    base = _base()
    model = _adapted(base, "one")
    model.add_adapter("two", lorakit.LoraConfig(target_modules=["mha"], r=2, init_lora_weights=False))
    layer = model.base_model.model.mha
    x = _x()
    with torch.no_grad():
        model.set_adapter("two")
        torch.testing.assert_close(model(x), _reference(base, layer, ["two"])(x), atol=1e-6, rtol=1e-5)
        model.base_model.set_adapter(["one", "two"])
        torch.testing.assert_close(model(x), _reference(base, layer, ["one", "two"])(x), atol=1e-6, rtol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=1e-5)
        model.delete_adapter("two")
        assert layer.adapter_names == ["one"] and layer.lora_out_proj.adapter_names == ["one"]
        torch.testing.assert_close(model(x), _reference(base, layer, ["one"])(x), atol=1e-6, rtol=1e-5)


def test_refusals_name_the_fix() -> None:
    base = _base()
    with pytest.raises(ValueError, match="MultiheadAttention does not support DoRA"):
        lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["mha"], use_dora=True))
    with pytest.raises(ValueError, match="Only same embed for query/key/value"):
        LoraMultiheadAttention(nn.MultiheadAttention(E, HEADS, kdim=5, vdim=5))
    model = _adapted(_base(batch_first=True), "a")
    model.add_adapter("b", lorakit.LoraConfig(target_modules=["mha"], init_lora_weights=False))
    with pytest.raises(TypeError, match="lora.MultiheadAttention does not support mixed adapter batches"):
        model(_x(batch_first=True), adapter_names=["a", "b", "a", "b", "a"])


def _zero_out_proj_update(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "out_proj.lora_B" in name:
                p.zero_()


def test_files_move_both_ways_with_peft(tmp_path: Path) -> None:
    base = _base()
    ours = _adapted(base, lora_alpha=16, r=4, init_lora_weights=False)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["mha"], lora_alpha=16, r=4, init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path / "theirs")
    assert_same_adapter_config(tmp_path / "ours", tmp_path / "theirs")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in theirs_file.items()}

    x = _x()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    back = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs").eval()
    theirs.eval()
    for name, p in loaded.named_parameters():  # the same tensors in both libraries
        if "lora_" in name:
            torch.testing.assert_close(p, dict(ours.named_parameters())[name], atol=0, rtol=0)
    for model in (ours, loaded, back, theirs):
        _zero_out_proj_update(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_peft_adds_the_out_proj_update_twice() -> None:
    """The one deliberate difference (module docstring): PEFT 0.21.2 computes out_proj as W + 2 dW."""
    base = _base()
    ours = _adapted(base)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["mha"])).eval()
    theirs.load_state_dict(ours.state_dict())
    layer = ours.base_model.model.mha
    doubled = _reference(base, layer, ["default"])
    with torch.no_grad():
        doubled.mha.out_proj.weight += layer.lora_out_proj.delta_weight("default")
        x = _x()
        torch.testing.assert_close(theirs(x), doubled(x), atol=1e-5, rtol=1e-5)
        assert (theirs(x) - ours(x)).abs().max() > 1e-3


def test_a_base_weight_the_user_unfroze_trains_through_the_forward() -> None:
    """The forward never replaces the base parameters (PEFT's merge-unmerge forward did, hence its _restore_weights,
    here a no-op): a base weight the user unfroze stays the same Parameter, trainable, and gets the dense gradient."""
    base = _base()
    model = _adapted(base).train()
    layer = model.base_model.model.mha
    in_proj = layer.base_layer.in_proj_weight
    in_proj.requires_grad_(True)
    x = _x()
    model(x).square().sum().backward()
    layer._restore_weights()
    assert layer.base_layer.in_proj_weight is in_proj and in_proj.requires_grad
    assert not layer.out_proj.weight.requires_grad
    ref = _reference(base, layer, ["default"]).train()
    ref.mha.in_proj_weight.requires_grad_(True)
    ref(x).square().sum().backward()
    torch.testing.assert_close(in_proj.grad, ref.mha.in_proj_weight.grad)  # d/dW of W + s*B@A is d/dW'
