"""Behaviours PEFT's own tests expect of the core API (issue 14), checked on lorakit's own terms."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import input_ids, tiny_llama

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.io.files import AdapterError


def _model(**config: object) -> lorakit.PeftModel:
    torch.manual_seed(0)
    return get_peft_model(
        tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, **config)
    )


def test_from_pretrained_is_in_eval_mode_unless_trainable(tmp_path: Path) -> None:
    _model(lora_dropout=0.5).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(m.training for m in loaded.modules())
    with torch.no_grad():  # dropout off: two calls agree
        torch.testing.assert_close(loaded(input_ids()).logits, loaded(input_ids()).logits, atol=0, rtol=0)
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).training


def test_from_pretrained_keeps_the_config_it_is_given(tmp_path: Path) -> None:
    _model().save_pretrained(tmp_path)
    config = LoraConfig.from_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode


def test_load_adapter_returns_an_empty_load_result_and_sets_eval_mode(tmp_path: Path) -> None:
    _model().save_pretrained(tmp_path)
    model = _model().train()
    result = model.load_adapter(tmp_path, adapter_name="other")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not model.training


def test_a_merged_adapter_cannot_be_deleted_and_nothing_changes() -> None:
    model = _model()
    model.add_adapter("two", LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.set_adapter("two")
    model.merge_adapter()
    with pytest.raises(AdapterError, match=r"Cannot delete adapter\(s\) \['two'\] while they are merged"):
        model.delete_adapter("two")
    assert set(model.peft_config) == {"default", "two"}
    model.delete_adapter("default")  # not merged: allowed, the merge stays
    assert set(model.peft_config) == {"two"}
    assert all(m.merged_adapters == ["two"] for _, m in model.base_model._lora_layers())


def test_disable_adapter_block_restores_each_layer_and_nests() -> None:
    model = _model()
    layers = [m for _, m in model.base_model._lora_layers()]
    assert model.has_active_enabled_adapter
    with model.disable_adapter():
        with model.disable_adapter():
            assert all(m.disable_adapters for m in layers)
        assert all(m.disable_adapters for m in layers) and not model.has_active_enabled_adapter
    assert not any(m.disable_adapters for m in layers) and model.has_active_enabled_adapter
    model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert all(m.disable_adapters for m in layers)  # disabled before the block: still disabled after it


def test_only_one_adapter_may_train_biases() -> None:
    model = _model(bias="all")
    with pytest.raises(AdapterError, match="only 1 adapter with bias"):
        model.add_adapter("two", LoraConfig(target_modules=["q_proj"], bias="lora_only"))
    assert list(model.peft_config) == ["default"]
    model.add_adapter("three", LoraConfig(target_modules=["q_proj"], bias="none"))  # no bias: fine


def test_safe_serialization_false_writes_a_bin_that_both_libraries_load(tmp_path: Path) -> None:
    import peft

    model = _model().eval()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".md") == [
        "adapter_config.json",
        "adapter_model.bin",
    ]
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(PeftModel.from_pretrained(tiny_llama(), tmp_path)(ids).logits, expected)
        torch.testing.assert_close(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(ids).logits, expected)
    model.save_pretrained(tmp_path)  # back to safetensors: the .bin goes
    assert not (tmp_path / "adapter_model.bin").exists() and (tmp_path / "adapter_model.safetensors").exists()


def _card(folder: Path) -> dict:
    import yaml

    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1])


def test_save_pretrained_writes_a_model_card_and_keeps_a_users_text(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.get_base_model().name_or_path = "org/base"
    model.save_pretrained(tmp_path)
    card = _card(tmp_path)
    assert card["library_name"] == "peft" and card["base_model"] == "org/base"
    assert card["pipeline_tag"] == "text-generation"
    assert {"lora", "lorakit", "transformers", "base_model:adapter:org/base"} <= set(card["tags"])
    text = (tmp_path / "README.md").read_text().replace("# LoRA adapter", "# Mine\n\nmy notes")
    (tmp_path / "README.md").write_text(text.replace("tags:", "license: mit\ntags:"))
    model.save_pretrained(tmp_path)
    again = (tmp_path / "README.md").read_text()
    assert "my notes" in again and again.count("- lorakit ") == 1 and _card(tmp_path)["license"] == "mit"


def test_a_custom_model_card_names_no_base(tmp_path: Path) -> None:
    from torch import nn

    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"]))
    model.save_pretrained(tmp_path)
    card = _card(tmp_path)
    assert "base_model" not in card and "lora" in card["tags"] and "transformers" not in card["tags"]


def test_push_to_hub_uploads_the_saved_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    uploaded: dict[str, object] = {}

    class FakeApi:
        def __init__(self, token: object = None) -> None:
            uploaded["token"] = token

        def create_repo(self, repo_id: str, private: object = None, exist_ok: bool = False) -> None:
            uploaded["created"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id: str, folder_path: str, **kwargs: object) -> str:
            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            uploaded["upload"] = (repo_id, kwargs["commit_message"])
            return "commit"

    model = _model()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="needs the network, but HF_HUB_OFFLINE is set"):
        model.push_to_hub("me/adapter")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert model.push_to_hub("me/adapter", private=True, token="t") == "commit"
    assert uploaded == {
        "token": "t",
        "created": ("me/adapter", True, True),
        "files": ["README.md", "adapter_config.json", "adapter_model.safetensors"],
        "upload": ("me/adapter", "Upload adapter"),
    }


def test_set_adapter_in_inference_mode_freezes_it() -> None:
    model = _model()
    model.add_adapter("two", LoraConfig(target_modules=["q_proj"]))
    model.set_adapter("two", inference_mode=True)
    two = [p for n, p in model.named_parameters() if ".two." in n]
    assert two and not any(p.requires_grad for p in two)
    model.set_adapter("two")
    assert all(p.requires_grad for p in two)


def test_low_cpu_mem_usage_injection_is_empty_until_a_state_dict_fills_it() -> None:
    config = LoraConfig(target_modules=["q_proj", "v_proj"])
    trained = lorakit.inject_adapter_in_model(
        LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False), tiny_llama()
    )
    tensors = lorakit.get_peft_model_state_dict(trained)
    model = lorakit.inject_adapter_in_model(config, tiny_llama(), low_cpu_mem_usage=True)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.is_meta for p in lora.values())
    assert not any(p.is_meta for n, p in model.named_parameters() if "lora_" not in n)
    lorakit.set_peft_model_state_dict(model, tensors)
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, trained(input_ids()).logits)
    filled = lorakit.inject_adapter_in_model(config, tiny_llama(), low_cpu_mem_usage=True, state_dict=tensors)
    assert not any(p.is_meta for p in filled.parameters())
    assert lorakit.PEFT_TYPE_TO_TUNER_MAPPING["LORA"] is lorakit.LoraModel


def test_get_peft_model_on_a_model_already_holding_lora_layers_warns() -> None:
    base = torch.nn.Sequential(torch.nn.Linear(10, 2), torch.nn.Linear(2, 10))
    first = get_peft_model(base, LoraConfig(target_modules=["0"]))
    with pytest.warns(UserWarning, match="for a second time.*unload"):
        get_peft_model(base, LoraConfig(target_modules=["1"]))
    first.unload()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(base, LoraConfig(target_modules=["0"]))  # unloaded: a base model again, no warning


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(6, 6)


class _OldLayout(torch.nn.Module):  # an older module layout: visual at the top, the language model as .model
    def __init__(self) -> None:
        super().__init__()
        self.visual = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([_Block(), _Block()])})
        self.model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([_Block()])})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in [*self.visual["blocks"], *self.model["layers"]]:
            x = block.attn(x)
        return x


class _NewLayout(torch.nn.Module):  # the same weights under model.visual / model.language_model, with the renames
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.ModuleDict({
            "visual": torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([_Block(), _Block()])}),
            "language_model": torch.nn.ModuleDict({"layers": torch.nn.ModuleList([_Block()])}),
        })
        self._checkpoint_conversion_mapping = {
            "^visual": "model.visual", "^model(?!\\.(language_model|visual))": "model.language_model",
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in [*self.model["visual"]["blocks"], *self.model["language_model"]["layers"]]:
            x = block.attn(x)
        return x


def _new_layout_like(old: dict[str, torch.Tensor]) -> _NewLayout:
    """A _NewLayout holding the base weights ``old`` of an _OldLayout."""
    new = _NewLayout()
    rename = {"visual.": "model.visual.", "model.": "model.language_model."}
    new.load_state_dict({
        next(to + k[len(frm):] for frm, to in rename.items() if k.startswith(frm)): v for k, v in old.items()
    })
    return new


def test_an_adapter_saved_on_an_old_module_layout_loads_into_the_new_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = _OldLayout()
    old_state = {k: v.clone() for k, v in old.state_dict().items()}
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(_new_layout_like(old_state)(x), old(x))  # the same base model
    trained = get_peft_model(old, LoraConfig(target_modules=["attn"], init_lora_weights=False)).eval()
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_new_layout_like(old_state), tmp_path)
    second = get_peft_model(_new_layout_like(old_state), LoraConfig(target_modules=["attn"]), "first")
    second.load_adapter(tmp_path, "saved")
    second.set_adapter("saved")
    with torch.no_grad():
        for model in (loaded, second):
            torch.testing.assert_close(model(x), trained(x))
    with pytest.raises(lorakit.io.untrusted.AdapterFileError):  # no renames: the file's keys do not fit this layout
        PeftModel.from_pretrained(_new_layout_like(old_state), tmp_path, key_mapping={})


def test_remap_keys_applies_the_first_matching_pattern_past_the_prefix() -> None:
    from lorakit.adapters.state import remap_keys

    t = torch.zeros(1)
    mapping = {"^visual": "model.visual", "^model(?!\\.(language_model|visual))": "model.language_model"}
    keys = ["base_model.model.visual.a.lora_A.weight", "base_model.model.model.layers.0.lora_B.weight",
            "base_model.model.model.visual.b.lora_A.weight", "other.key"]
    assert list(remap_keys(dict.fromkeys(keys, t), mapping)) == [
        "base_model.model.model.visual.a.lora_A.weight", "base_model.model.model.language_model.layers.0.lora_B.weight",
        "base_model.model.model.visual.b.lora_A.weight", "other.key"]
    with pytest.raises(lorakit.io.untrusted.AdapterFileError, match="renames two tensors"):
        remap_keys({"base_model.model.x.w": t, "base_model.model.y.w": t}, {"^x": "y"})


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["embed_tokens"]])
def test_adapter_layer_names_hold_each_adapters_weights(targets: list[str]) -> None:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=targets, use_dora="q_proj" in targets), "one")
    model.add_adapter("two", LoraConfig(target_modules=targets))
    model.base_model.set_requires_grad("two", True)
    layers = [m for m in model.modules() if isinstance(m, lorakit.LoraLayer)]
    for layer in layers:
        held = {id(p) for name in layer.adapter_layer_names for p in _params(getattr(layer, name), "two")}
        assert held and held == {id(p) for p in layer.adapter_parameters("two")}
        assert all(hasattr(layer, name) for name in layer.other_param_names)


def _params(container: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    if adapter not in container:
        return []
    value = container[adapter]
    return list(value.parameters()) if isinstance(value, torch.nn.Module) else [value]


def test_modules_to_save_names_those_of_the_adapters_held() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "a")
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"]))
    assert model.modules_to_save == {"lm_head"}
    wrapper = model.base_model.model.lm_head
    assert [name for name in wrapper.adapter_layer_names] == ["modules_to_save"] and "a" in wrapper.modules_to_save
    model.delete_adapter("a")
    assert model.modules_to_save is None


def test_a_new_adapter_names_its_base_model_and_warns_when_it_replaces_another_name() -> None:
    class Custom(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no name given: nothing replaced, no warning
        unnamed = get_peft_model(Custom(), LoraConfig(target_modules=["lin"]))
    assert unnamed.peft_config["default"].base_model_name_or_path is None
    kept = get_peft_model(Custom(), LoraConfig(target_modules=["lin"], base_model_name_or_path="mine"))
    assert kept.peft_config["default"].base_model_name_or_path == "mine"  # a model without a name keeps the config's
    named = Custom()
    named.name_or_path = "foobar"
    with pytest.warns(UserWarning, match="was renamed from 'mine' to 'foobar'"):
        model = get_peft_model(named, LoraConfig(target_modules=["lin"], base_model_name_or_path="mine"))
    assert model.peft_config["default"].base_model_name_or_path == "foobar"
