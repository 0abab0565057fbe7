"""CorDA's preprocessing (lorakit.adapters.corda.preprocess_corda) on tiny models: covariances from forward hooks
(removed afterwards, also when run_model raises), the adapter made from them (identity at start, base = residual),
the cache and covariance files, and PEFT interop: the same data gives PEFT's tensors, files are read both ways."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from helpers import (
    assert_same_adapter_config,
    both_ways,
    input_ids,
    logits,
    save_trained_and_converted,
    tiny_gpt2,
    tiny_llama,
)
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda
from torch import nn

import lorakit
from lorakit.adapters.corda import collect_covariances
from lorakit.config import ConfigError

TARGETS = ["q_proj", "v_proj"]
SAMPLES = [input_ids(batch=1, seq=16, seed=s) for s in range(6)]  # batch 1: PEFT's hook squeezes dim 0


def _run(model: nn.Module) -> None:
    for ids in SAMPLES:
        model(input_ids=ids)


def _corda(lib, method: str, r: int = 4, **corda: object):  # noqa: ANN202 - the library's own LoraConfig
    cfg = (PeftCordaConfig if lib is peft else lorakit.CordaConfig)(corda_method=method, **corda)
    return lib.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda", corda_config=cfg)


def _preprocess(lib, model: nn.Module, config: object, **kwargs: object) -> None:
    (peft_preprocess_corda if lib is peft else lorakit.preprocess_corda)(model, config, **kwargs)


def _made(lib, method: str, seed: int = 0, **corda: object) -> nn.Module:
    model = tiny_llama(seed)
    config = _corda(lib, method, **corda)
    _preprocess(lib, model, config, run_model=lambda: _run(model))
    return lib.get_peft_model(model, config)


def _lora(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n or "base_layer" in n}


def test_covariance_is_the_mean_of_the_scaled_input_products_and_hooks_are_removed():
    model = tiny_llama(0)
    layer = model.model.layers[0].self_attn.q_proj
    seen: list[torch.Tensor] = []
    layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    config = _corda(lorakit, "ipm", prune_temporary_fields=False)
    lorakit.preprocess_corda(model, config, run_model=lambda: _run(model))
    dense = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in seen) / len(seen)
    assert layer.sample_count == len(SAMPLES) == len(seen)
    assert torch.allclose(layer.covariance_matrix, dense, rtol=1e-5, atol=1e-6)
    model(input_ids=SAMPLES[0])  # the CorDA hooks are gone, the user's hook stays
    assert layer.sample_count == len(SAMPLES) and len(seen) == len(SAMPLES) + 1
    assert len(layer._forward_hooks) == 1


def test_hooks_are_removed_and_mode_restored_when_run_model_raises():
    model = tiny_llama(0)
    model.train()

    def broken() -> None:
        model(input_ids=SAMPLES[0])
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader failed"):
        collect_covariances(model, ["model.layers.0.self_attn.q_proj"], broken)
    assert not any(m._forward_hooks for m in model.modules()) and model.training
    with pytest.raises(ValueError, match="never ran"):
        collect_covariances(model, ["model.layers.0.self_attn.q_proj"], lambda: None)
    with pytest.raises(ValueError, match="hooked_model has no module"):
        collect_covariances(nn.Linear(2, 2), ["model.layers.0.self_attn.q_proj"], lambda: None)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_adapter_starts_as_the_base_with_the_residual_as_base_weight(method):
    base = tiny_llama(0)
    model = _made(lorakit, method)
    assert torch.allclose(logits(model), logits(base), atol=1e-4)
    for name, module in model.named_modules():
        if isinstance(module, lorakit.LoraLinear):
            original = base.get_submodule(name.removeprefix("base_model.model.")).weight
            delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            assert not torch.allclose(module.base_layer.weight, original, atol=1e-3)  # the base holds the residual
            assert torch.allclose(module.base_layer.weight + delta, original, atol=1e-5)
            for field in ("eigens", "covariance_matrix", "sample_count"):
                assert not hasattr(module.base_layer, field)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_same_adapter_and_residual_as_peft_from_the_same_data(method):
    ours, theirs = _lora(_made(lorakit, method)), _lora(_made(peft, method))
    assert ours.keys() == theirs.keys() and len(ours) == 12
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-4), key


def test_conv1d_targets_as_peft():
    def made(lib):  # noqa: ANN001, ANN202
        model = tiny_gpt2(0)
        cfg = (PeftCordaConfig if lib is peft else lorakit.CordaConfig)(corda_method="ipm")
        config = lib.LoraConfig(r=4, target_modules=["c_fc"], init_lora_weights="corda", corda_config=cfg,
                                fan_in_fan_out=True)
        _preprocess(lib, model, config, run_model=lambda: _run(model))
        return lib.get_peft_model(model, config)

    ours, theirs = made(lorakit), made(peft)
    assert torch.allclose(logits(ours), logits(tiny_gpt2(0)), atol=1e-4)
    a, b = _lora(ours), _lora(theirs)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_cache_and_covariance_files_rebuild_the_same_adapter_and_peft_reads_them(method, tmp_path):
    files = {"cache_file": str(tmp_path / "c" / "cache.pt"), "covariance_file": str(tmp_path / "cov.pt")}
    first = _lora(_made(lorakit, method, **files))
    for which in files:  # each file alone, without run_model
        for lib in (lorakit, peft):
            model, config = tiny_llama(0), _corda(lib, method, **{which: files[which]})
            _preprocess(lib, model, config)
            again = _lora(lib.get_peft_model(model, config))
            assert all(torch.allclose(first[k], again[k], atol=1e-5) for k in first), (which, lib.__name__)


def test_peft_cache_file_is_read_by_lorakit(tmp_path):
    cache = str(tmp_path / "peft_cache.pt")
    theirs = _lora(_made(peft, "kpm", cache_file=cache))
    model, config = tiny_llama(0), _corda(lorakit, "kpm", cache_file=cache)
    lorakit.preprocess_corda(model, config)
    ours = _lora(lorakit.get_peft_model(model, config))
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)


@both_ways
def test_files_both_ways_converted_and_with_the_decomposition(writer, reader, tmp_path):
    cache = str(tmp_path / "cache.pt")
    model = _made(writer, "ipm", cache_file=cache)
    expected = save_trained_and_converted(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = reader.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "converted")  # the original base
        assert torch.allclose(logits(converted), expected, atol=1e-4)
        base = tiny_llama(0)  # the saved adapter fits the residual base: rebuild it from the cache
        _preprocess(reader, base, _corda(reader, "ipm", cache_file=cache))
        loaded = reader.PeftModel.from_pretrained(base, tmp_path / "corda")
    assert torch.allclose(logits(loaded), expected, atol=1e-4)


def test_loading_without_the_decomposition_says_to_preprocess(tmp_path):
    _made(lorakit, "ipm").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="preprocess_corda"):
        lorakit.PeftModel.from_pretrained(tiny_llama(0), tmp_path)


def test_config_round_trip_checks_and_same_file_as_peft(tmp_path):
    _made(lorakit, "kpm").save_pretrained(tmp_path / "lorakit")
    _made(peft, "kpm").save_pretrained(tmp_path / "peft")
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")
    saved = json.loads((tmp_path / "lorakit" / "adapter_config.json").read_text())["corda_config"]
    assert saved["corda_method"] == "kpm" and saved["prune_temporary_fields"] is True
    loaded = lorakit.LoraConfig.from_pretrained(tmp_path / "lorakit")
    assert isinstance(loaded.corda_config, lorakit.CordaConfig) and loaded.corda_config.corda_method == "kpm"
    with pytest.raises(ConfigError, match="'ipm' or 'kpm'"):
        lorakit.CordaConfig(corda_method="middle")
    with pytest.raises(ConfigError, match="corda_config"):
        lorakit.preprocess_corda(tiny_llama(0), lorakit.LoraConfig(target_modules=TARGETS), run_model=lambda: None)
    with pytest.raises(ValueError, match="run_model"):
        lorakit.preprocess_corda(tiny_llama(0), _corda(lorakit, "ipm"))
    with pytest.warns(UserWarning, match="Using default CorDA config"):
        assert lorakit.LoraConfig(init_lora_weights="corda").corda_config == lorakit.CordaConfig()
    with pytest.warns(UserWarning, match="`corda_config` specified but will be ignored"):
        lorakit.LoraConfig(corda_config=lorakit.CordaConfig())


def test_hooked_model_gives_the_same_adapter():
    model, hooked = tiny_llama(0), tiny_llama(0)
    config = _corda(lorakit, "ipm")
    lorakit.preprocess_corda(model, config, run_model=lambda: _run(hooked), hooked_model=hooked)
    assert not any(m._forward_hooks for m in hooked.modules())
    ours = _lora(lorakit.get_peft_model(model, config))
    reference = _lora(_made(lorakit, "ipm"))
    assert all(torch.allclose(ours[k], reference[k], atol=1e-6) for k in ours)
    assert copy.deepcopy(config).corda_config == config.corda_config
