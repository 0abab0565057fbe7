"""lorakit.api.functions and the config helpers PEFT scripts call: get/set_peft_model_state_dict (round trip, values
from a given state dict, all-or-nothing loading, both ways with HF PEFT), prepare_model_for_kbit_training,
PeftConfig / LoraConfig.from_pretrained / save_pretrained, PeftType and get_peft_config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import peft
import pytest
import torch
from helpers import input_ids, perturb_, tiny_llama
from safetensors.torch import load_file

import lorakit
from lorakit import (
    AdapterFileError,
    ConfigError,
    LoraConfig,
    PeftConfig,
    PeftType,
    get_peft_config,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from lorakit.quant.half import HalfEmbedding
from lorakit.quant.linear import QuantLinear


def _config(**kw) -> dict:
    return dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **kw)


def _model(seed: int = 1):
    model = get_peft_model(tiny_llama(seed=0), LoraConfig(**_config()))
    perturb_([p for n, p in model.named_parameters() if "lora_" in n], seed=seed)
    return model


def test_state_dict_is_what_save_pretrained_writes(tmp_path: Path) -> None:
    model = _model()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    state = get_peft_model_state_dict(model)
    assert state.keys() == saved.keys() and len(state) == 2 * 3 * 2  # A and B, three modules, two layers
    for key in state:
        assert ".default." not in key
        torch.testing.assert_close(state[key], saved[key], rtol=0, atol=0)


def test_state_dict_values_come_from_a_given_state_dict() -> None:
    model = _model()
    full = {k: v + 1.0 for k, v in model.state_dict().items()}
    state = get_peft_model_state_dict(model, state_dict=full)
    own = get_peft_model_state_dict(model)
    for key in own:
        torch.testing.assert_close(state[key], own[key] + 1.0)
    del full["base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    with pytest.raises(ValueError, match="state_dict lacks .*layers.1.self_attn.v_proj.lora_B.*model.state_dict"):
        get_peft_model_state_dict(model, state_dict=full)


def test_set_round_trip_restores_outputs() -> None:
    source, target = _model(seed=1), _model(seed=2)
    ids = input_ids()
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        assert not torch.allclose(target(input_ids=ids).logits, expected)
        result = set_peft_model_state_dict(target, get_peft_model_state_dict(source))
        assert result.missing_keys == [] and result.unexpected_keys == []
        torch.testing.assert_close(target(input_ids=ids).logits, expected, rtol=0, atol=0)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("damage", ["shape", "missing", "surplus"])
def test_set_is_all_or_nothing(damage: str) -> None:
    source, target = _model(seed=1), _model(seed=2)
    state = get_peft_model_state_dict(source)
    last = list(state)[-1]  # the last module in model order: all the others would be copied before it
    if damage == "shape":
        state[last] = torch.zeros(state[last].shape[0] + 1, state[last].shape[1])
    elif damage == "missing":
        del state[last]
    else:
        state["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    before = _params(target)
    with pytest.raises(AdapterFileError):
        set_peft_model_state_dict(target, state)
    after = _params(target)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_state_dict_functions_name_the_fix() -> None:
    model = _model()
    with pytest.raises(ValueError, match="no adapter 'other'.*add_adapter"):
        get_peft_model_state_dict(model, adapter_name="other")
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        set_peft_model_state_dict(model, get_peft_model_state_dict(model), ignore_mismatched_sizes=True)
    with pytest.raises(TypeError, match="PeftModel"):
        get_peft_model_state_dict(tiny_llama())


@pytest.mark.parametrize("direction", ["lorakit->peft", "peft->lorakit"])
def test_state_dicts_move_between_lorakit_and_peft(direction: str) -> None:
    ours = _model(seed=1)
    theirs = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(**_config()))
    perturb_([p for n, p in theirs.named_parameters() if "lora_" in n], seed=3)
    ids = input_ids()
    with torch.no_grad():
        if direction == "lorakit->peft":
            peft.set_peft_model_state_dict(theirs, get_peft_model_state_dict(ours))
        else:
            set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    assert get_peft_model_state_dict(ours).keys() == peft.get_peft_model_state_dict(theirs).keys()


def test_inject_adapter_in_model_as_peft() -> None:
    """The model itself gets the wrappers and a peft_config; state-dict keys (no base_model.model. prefix), the
    trainable set and, with the same tensors, the logits equal PEFT's inject_adapter_in_model."""
    ours = lorakit.inject_adapter_in_model(LoraConfig(**_config()), tiny_llama(seed=0))
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**_config()), tiny_llama(seed=0))
    assert type(ours).__name__ == "LlamaForCausalLM" and list(ours.peft_config) == ["default"]
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    perturb_([p for n, p in theirs.named_parameters() if "lora_" in n], seed=3)
    state = peft.get_peft_model_state_dict(theirs)
    assert get_peft_model_state_dict(ours).keys() == state.keys()
    assert next(iter(state)).startswith("model.layers.0.")
    set_peft_model_state_dict(ours, state)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    again = lorakit.inject_adapter_in_model(LoraConfig(**_config()), tiny_llama(seed=0), state_dict=state)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, theirs(input_ids=ids).logits)
    with pytest.raises(ValueError, match="already has adapters"):
        lorakit.inject_adapter_in_model(LoraConfig(**_config()), ours)


def test_prepare_for_kbit_training_plain_bf16_model() -> None:
    model = tiny_llama().to(torch.bfloat16)
    model.model.norm.weight.requires_grad_(True)
    assert prepare_model_for_kbit_training(model) is model
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert not model.is_activation_checkpointing  # not quantized: no checkpointing, as in PEFT


def test_prepare_for_kbit_training_quantized_model_then_train() -> None:
    model = lorakit.quantize(tiny_llama(), bits=4)
    model.model.norm.weight.data = model.model.norm.weight.data.to(torch.bfloat16)
    prepare_model_for_kbit_training(model)
    assert model.model.norm.weight.dtype == torch.float32
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, HalfEmbedding) and embedding.weight.dtype == torch.bfloat16  # storage kept
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert model.is_activation_checkpointing
    assert embedding(input_ids()).requires_grad  # reentrant checkpointing needs a graph from the inputs
    wrapped = get_peft_model(model, LoraConfig(**_config()))
    wrapped.train()
    perturb_([p for n, p in wrapped.named_parameters() if "lora_B" in n], seed=4)
    ids = input_ids()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad)


def test_prepare_for_kbit_training_without_checkpointing_or_reentrant() -> None:
    model = prepare_model_for_kbit_training(lorakit.quantize(tiny_llama()), use_gradient_checkpointing=False)
    assert not model.is_activation_checkpointing
    assert not model.get_input_embeddings()(input_ids()).requires_grad  # frozen, no hook
    model = lorakit.quantize(tiny_llama())
    prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    layer = model.model.layers[0]
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}  # the caller's choice kept


def test_config_from_and_save_pretrained(tmp_path: Path) -> None:
    model = _model()
    model.save_pretrained(tmp_path)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path, selected_adapters=["second"])
    for cls in (PeftConfig, LoraConfig):
        config = cls.from_pretrained(tmp_path)
        assert isinstance(config, LoraConfig) and config.r == 4
        assert cls.from_pretrained(tmp_path, subfolder="second").r == 2
    config = LoraConfig(r=6, lora_alpha=12, target_modules=["k_proj"], lora_dropout=0.1)
    config.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    theirs = peft.LoraConfig.from_pretrained(tmp_path / "new")
    assert (theirs.r, theirs.lora_alpha, theirs.target_modules, theirs.lora_dropout) == (6, 12, {"k_proj"}, 0.1)
    assert LoraConfig.from_pretrained(tmp_path / "new") == config
    journal = {"config": {**config.to_dict(), "r": 9}, "weights_sha256": hashlib.sha256(b"w").hexdigest()}
    (tmp_path / "new" / ".adapter_config.next.json").write_text(json.dumps(journal))  # left by a crashed save
    (tmp_path / "new" / "adapter_model.safetensors").write_bytes(b"w")
    assert LoraConfig.from_pretrained(tmp_path / "new").r == 9  # the journal fits the weights: it wins ...
    config.save_pretrained(tmp_path / "new")
    assert LoraConfig.from_pretrained(tmp_path / "new").r == 6  # ... until a config is saved explicitly
    with pytest.raises(AdapterFileError, match="does not exist"):
        LoraConfig.from_pretrained(tmp_path / "missing")


def test_peft_type_and_get_peft_config() -> None:
    assert PeftType.LORA == "LORA" and LoraConfig().peft_type is PeftType.LORA
    assert LoraConfig().peft_type == peft.PeftType.LORA
    config = get_peft_config({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"})
    assert isinstance(config, LoraConfig) and config.r == 4 and config.task_type == "CAUSAL_LM"
    with pytest.raises(ConfigError, match="LoRA adapters only"):
        get_peft_config({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4})


class _HeadNamedLikeLora(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(5, 5)
        self.lora_head = torch.nn.Linear(5, 5)  # a base module whose name starts as LoRA's tensors do

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_head(self.lin0(x))


def test_module_named_like_a_lora_tensor_round_trips_as_modules_to_save() -> None:
    """A modules_to_save copy of a module called 'lora_head' is not taken for a LoRA tensor: set_peft_model_state_dict
    loads its trained weight; a file without a LoRA factor still fails, naming it."""
    config = dict(target_modules=["lin0"], modules_to_save=["lora_head"])
    torch.manual_seed(0)
    source = get_peft_model(_HeadNamedLikeLora(), LoraConfig(**config))
    with torch.no_grad():
        source.base_model.model.lora_head.modules_to_save["default"].weight.fill_(123.0)
    state = get_peft_model_state_dict(source)
    torch.manual_seed(0)  # the same base weights; the adapter's come from the state dict
    target = get_peft_model(_HeadNamedLikeLora(), LoraConfig(**config))
    result = set_peft_model_state_dict(target, state)
    assert not [k for k in result.unexpected_keys if "lora_head" in k]
    weight = target.base_model.model.lora_head.modules_to_save["default"].weight
    torch.testing.assert_close(weight, torch.full_like(weight, 123.0))
    x = torch.randn(3, 5)
    torch.testing.assert_close(target(x), source(x))
    del state["base_model.model.lin0.lora_B.weight"]
    with pytest.raises(AdapterFileError, match="lacks 1 adapter tensors, e.g. 'base_model.model.lin0.lora_B.weight'"):
        set_peft_model_state_dict(get_peft_model(_HeadNamedLikeLora(), LoraConfig(**config)), state)


@pytest.mark.parametrize("auto_clear_cache, calls", [(True, 1), (False, 0)])
def test_kbit_preparation_empties_the_accelerator_cache_after_the_casts(auto_clear_cache, calls) -> None:
    """auto_clear_cache (the default True): the CUDA allocator's cache is emptied once, after the fp32 casts."""
    from unittest.mock import patch

    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).half()
    with patch("torch.cuda.is_available", return_value=True), patch("torch.cuda.empty_cache") as empty_cache:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False, auto_clear_cache=auto_clear_cache)
    assert empty_cache.call_count == calls
    assert model[0].weight.dtype == torch.float32
