"""A user's own module class wrapped by a user's own LoRA layer (LoraConfig._register_custom_module, read by
lorakit.adapters.kinds): the wrapper is used, computes x @ (W + s * B @ A).T, trains, saves and loads."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit import ConfigError, LoraConfig, LoraLinear, PeftModel, get_peft_model
from lorakit.adapters.targets import TargetError


class LinearLike(nn.Module):
    """A linear layer that is no nn.Linear: weight (out, in), no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 6, 5
        self.weight = nn.Parameter(torch.randn(5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class MyLora(LoraLinear):
    pass


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(4, 6)
        self.mine = LinearLike()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mine(torch.relu(self.lin0(x)))


def _config(**kwargs: object) -> LoraConfig:
    config = LoraConfig(target_modules=["lin0", "mine"], init_lora_weights=False, r=2, lora_alpha=4, **kwargs)
    config._register_custom_module({LinearLike: MyLora})
    return config


def test_a_registered_class_gets_its_wrapper_and_the_dense_lora_output() -> None:
    torch.manual_seed(0)
    net = Net()
    with pytest.warns(UserWarning, match="Unsupported layer type .*LinearLike"):
        model = get_peft_model(net, _config())
    mine = model.base_model.model.mine
    assert type(mine) is MyLora and isinstance(mine.base_layer, LinearLike) and not mine.fan_in_fan_out
    assert type(model.base_model.model.lin0) is LoraLinear  # the other kinds as before
    A, B = mine.lora_A["default"].weight, mine.lora_B["default"].weight  # (2, 6), (5, 2)
    h = torch.randn(3, 6)
    dense = h @ (mine.base_layer.weight + 2.0 * B @ A).T  # s = 4 / 2
    torch.testing.assert_close(mine(h), dense)
    x = torch.randn(3, 4)
    expected = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_a_registered_layer_trains_saves_and_loads_with_the_mapping_registered_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = get_peft_model(Net(), _config())
    before = model.base_model.model.mine.lora_A["default"].weight.detach().clone()
    model(torch.randn(8, 4)).square().sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, model.base_model.model.mine.lora_A["default"].weight)
    model.save_pretrained(tmp_path)
    x = torch.randn(3, 4)
    expected = model(x)
    torch.manual_seed(0)
    with pytest.raises(Exception, match="_register_custom_module"):  # the mapping is not in the file
        PeftModel.from_pretrained(Net(), tmp_path)
    torch.manual_seed(0)
    config = LoraConfig.from_pretrained(tmp_path)
    config._register_custom_module({LinearLike: MyLora})
    loaded = PeftModel.from_pretrained(Net(), tmp_path, config=config)
    assert type(loaded.base_model.model.mine) is MyLora
    torch.testing.assert_close(loaded(x), expected)


def test_a_registered_nn_linear_replaces_lora_linear_and_all_linear_still_finds_it() -> None:
    config = LoraConfig(target_modules="all-linear")
    config._register_custom_module({nn.Linear: MyLora})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a class lorakit wraps anyway: no "unsupported layer type" warning
        model = get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), config)
    assert [type(m) for m in model.base_model.model if not isinstance(m, nn.ReLU)] == [MyLora, MyLora]


def test_without_registration_the_error_names_the_way_to_register_and_bad_mappings_are_refused() -> None:
    with pytest.raises(TargetError, match=r"_register_custom_module\({its class: a LoraLayer subclass}\)"):
        get_peft_model(Net(), LoraConfig(target_modules=["mine"]))
    with pytest.raises(ConfigError, match="map module classes to LoRA layer classes"):
        LoraConfig()._register_custom_module({"mine": MyLora})
    same = LoraConfig(target_modules=["lin0", "mine"], init_lora_weights=False, r=2, lora_alpha=4)
    assert _config() == same  # not a field: configs compare and save as before
    assert "_custom_modules" not in _config().to_dict()
