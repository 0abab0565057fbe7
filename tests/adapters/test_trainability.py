"""Which parameters train after add_adapter / load_adapter / set_adapter / delete_adapter, and what the adapter
verbs leave alone: a base weight the user unfroze, an adapter parameter the user froze (PEFT 0.21.2's rules)."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 8) -> (B, 4)
        return self.lin1(torch.relu(self.lin0(x)))


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _saved(tmp_path, **kw) -> str:
    get_peft_model(TwoLayers(), LoraConfig(target_modules=["lin0"], **kw)).save_pretrained(tmp_path)
    return str(tmp_path)


def test_the_constructor_freezes_the_base_and_trains_the_adapter():
    model = get_peft_model(TwoLayers(), LoraConfig(target_modules=["lin0"]))
    assert _trainable(model) == {"base_model.model.lin0.lora_A.default.weight",
                                 "base_model.model.lin0.lora_B.default.weight"}


def test_load_adapter_keeps_what_the_user_set(tmp_path):
    path = _saved(tmp_path)
    model = get_peft_model(TwoLayers(), LoraConfig(target_modules=["lin0"]))
    model.base_model.model.lin1.weight.requires_grad_(True)  # the user fine-tunes a base weight
    model.base_model.model.lin0.base_layer.weight.requires_grad_(True)  # and the wrapped one
    model.base_model.model.lin0.lora_A["default"].weight.requires_grad_(False)  # and freezes one adapter factor
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.load_adapter(path, adapter_name="other")
    assert all(model.get_parameter(n).requires_grad is rg for n, rg in before.items())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)


def test_a_base_weight_the_user_unfroze_trains_through_set_adapter_and_its_gradient_flows(tmp_path):
    model = get_peft_model(TwoLayers(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    model.add_adapter("second", LoraConfig(target_modules=["lin0"]))
    head = model.base_model.model.lin1.weight
    head.requires_grad_(True)
    model.set_adapter("second")
    model.set_adapter("default")
    assert head.requires_grad
    model(torch.randn(3, 8)).sum().backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    assert model.base_model.model.lin0.lora_A["second"].weight.grad is None  # inactive: frozen, no gradient


def test_load_adapter_is_trainable_trains_the_inactive_adapter_until_the_next_set_adapter(tmp_path):
    path = _saved(tmp_path)
    model = PeftModel.from_pretrained(TwoLayers(), path, is_trainable=True)
    model.load_adapter(path, adapter_name="other", is_trainable=True)
    assert model.active_adapters == ["default"]
    assert _trainable(model) == {f"base_model.model.lin0.lora_{f}.{a}.weight" for f in "AB" for a in ("default",
                                                                                                      "other")}
    model.load_adapter(path, adapter_name="frozen", is_trainable=False)
    model.add_adapter("added", LoraConfig(target_modules=["lin0"]))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".frozen" in n or ".added" in n)
    assert len(_trainable(model)) == 4  # default and other untouched
    model.set_adapter("other")  # set_adapter decides again: only the active adapter trains
    assert _trainable(model) == {f"base_model.model.lin0.lora_{f}.other.weight" for f in "AB"}


def test_load_adapter_not_trainable_leaves_everything_frozen(tmp_path):
    path = _saved(tmp_path)
    model = PeftModel.from_pretrained(TwoLayers(), path)
    model.load_adapter(path, adapter_name="other")
    assert not _trainable(model)


def test_set_adapter_trains_an_adapter_loaded_for_inference_as_peft(tmp_path):
    path = _saved(tmp_path)
    model = PeftModel.from_pretrained(TwoLayers(), path)  # is_trainable=False: frozen
    model.load_adapter(path, adapter_name="other")
    model.set_adapter("other")  # PEFT's PeftModel.set_adapter: the active adapter trains unless inference_mode=True
    assert _trainable(model) == {f"base_model.model.lin0.lora_{f}.other.weight" for f in "AB"}
    model.set_adapter("default", inference_mode=True)
    assert not _trainable(model)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_base_biases_train_with_the_bias_mode_and_stop_when_its_adapter_goes(bias):
    model = get_peft_model(TwoLayers(), LoraConfig(target_modules=["lin0"], bias=bias))
    expected = {"base_model.model.lin0.base_layer.bias"} | ({"base_model.model.lin1.bias"} if bias == "all" else set())
    assert expected <= _trainable(model)
    model.add_adapter("plain", LoraConfig(target_modules=["lin0"]))
    model.set_adapter("plain")  # its mode is 'none': the biases stop training
    assert not any(n.endswith("bias") for n in _trainable(model))
    model.set_adapter("default")
    assert expected <= _trainable(model)
    model.delete_adapter("default")
    assert not any(n.endswith("bias") for n in _trainable(model))
