"""delete_adapter leaves nothing keyed by the deleted name: no mapping attribute of the model or of a wrapper that
held it before still holds it after (a view such as LoraLayer.lora_variant included), for each variant."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, get_peft_model
from lorakit.adapters.inject import wrappers


class EmbMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 4)
        return self.lin1(torch.relu(self.lin0(self.emb(ids))))


def _holding(obj: object, name: str) -> dict[str, object]:
    """{attribute: value} of the public attributes of ``obj`` that are mappings holding key ``name``."""
    found = {}
    for attr in dir(obj):
        if attr.startswith("_"):
            continue
        try:
            value = getattr(obj, attr)
        except (AttributeError, RuntimeError):
            continue
        if callable(getattr(value, "keys", None)) and hasattr(value, "__getitem__") and hasattr(value, "__contains__"):
            if name in value:
                found[attr] = value
    return found


VARIANT_CONFIGS = {
    "lora": {},
    "dora": {"use_dora": True},
    "kasa": {"kasa_config": {}, "r": 2},
    "velora": {"velora_config": lorakit.VeloraConfig(num_groups=2)},
    "mica": {"init_lora_weights": "mica", "r": 2},
}


@pytest.mark.parametrize("variant", VARIANT_CONFIGS)
def test_nothing_holds_a_deleted_adapter(variant):
    config = LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["emb"], **VARIANT_CONFIGS[variant])
    model = get_peft_model(EmbMLP(), config, adapter_name="foo")
    before = [_holding(model, "foo")] + [_holding(m, "foo") for _, m in wrappers(model)]
    assert any(before)
    layer = model.base_model.model.lin0
    if variant != "lora":
        assert "foo" in layer.lora_variant  # a variant other than plain LoRA is listed, as PEFT's attribute
    model.delete_adapter("foo")
    dangling = sorted(attr for held in before for attr, value in held.items() if "foo" in value)
    assert not dangling


def test_lora_variant_is_a_live_view():
    model = get_peft_model(EmbMLP(), LoraConfig(target_modules=["lin0"], use_dora=True))
    model.add_adapter("plain", LoraConfig(target_modules=["lin0"]))
    model.add_adapter("dora2", LoraConfig(target_modules=["lin0"], use_dora=True))
    view = model.base_model.model.lin0.lora_variant
    assert sorted(view) == ["default", "dora2"] and len(view) == 2  # plain LoRA has no entry
    assert view["dora2"] is model.base_model.model.lin0.variants["dora2"]
    model.delete_adapter("dora2")
    assert list(view) == ["default"] and "dora2" not in view
    with pytest.raises(KeyError):
        view["dora2"]


def test_every_wrapper_lists_its_adapter_attributes_as_tuples():
    """PEFT's code (and tests) add ``adapter_layer_names + other_param_names``: both tuples, on each wrapper kind."""
    config = LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], trainable_token_indices={"emb": [0, 1]})
    model = get_peft_model(EmbMLP(), config)
    model.add_adapter("other", config)
    model.delete_adapter("other")
    kinds = set()
    for _, module in wrappers(model):
        names = module.adapter_layer_names + module.other_param_names
        assert isinstance(names, tuple) and names
        for path in names:  # each a path to a mapping that no longer holds the deleted adapter
            value = module
            for part in path.split("."):
                value = getattr(value, part)
            assert "other" not in value
        kinds.add(type(module).__name__)
    assert kinds == {"LoraLinear", "ModulesToSaveWrapper", "TrainableTokensWrapper"}
