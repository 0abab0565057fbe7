"""Interop with HF PEFT for the initializers that move part of the base weight into the adapter (PiSSA, OLoRA), the
random ones (pissa_niter_K, orthogonal), and ``save_pretrained(path_initial_model_for_weight_conversion=DIR)``.

* Both libraries, from the same base weights and the same seed, make the same residual base and the same A, B (the
  randomized ones draw from the global RNG in the same order, so they agree too).
* The PEFT workflow: save the adapter to DIR right after get_peft_model, train, save with the conversion. The
  converted adapter (rank 2r, plain LoRA) loads onto the ORIGINAL base, in either library, and gives the trained
  model's logits; both libraries write the same file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from helpers import input_ids, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn

import lorakit

ATOL = 1e-5


def _build(lib, factory: Callable[..., nn.Module], seed: int = 7, **kwargs) -> nn.Module:
    """``factory(0)`` wrapped by ``lib`` (lorakit or peft) with LoraConfig(**kwargs), the global RNG seeded first."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out note for Conv1D
        return lib.get_peft_model(factory(0), lib.LoraConfig(**kwargs))


def _train_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Stand-in for training: add noise to every trainable tensor, in parameter-name order (the same in both
    libraries), so both get the same update."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(n for n, p in params.items() if p.requires_grad):
            params[name].add_(torch.randn(params[name].shape, generator=gen) * 0.1)
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _original_weights_kept(loaded: nn.Module, factory: Callable[..., nn.Module]) -> bool:
    """True if every base weight of ``loaded`` equals the untouched base's (whatever the library's wrapper names)."""
    original = factory(0).state_dict()
    for key, value in loaded.get_base_model().state_dict().items():
        plain = key.replace(".base_layer", "")
        if plain in original and not torch.equal(value, original[plain]):
            return False
    return True


# -- same initial state --------------------------------------------------------------------------------------------
LLAMA = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
GPT2 = dict(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8)
SAME_INIT = [
    pytest.param(factory, options, name, id=f"{factory.__name__}-{name}")
    for factory, options, names in [
        (tiny_llama, LLAMA, ["pissa", "pissa_niter_4", "olora", "orthogonal"]),
        (tiny_gpt2, GPT2, ["pissa", "pissa_niter_4", "orthogonal"]),  # olora on Conv1D: see the test below
    ]
    for name in names
]


@pytest.mark.parametrize("factory, options, name", SAME_INIT)
def test_same_residual_base_and_adapter_as_peft(factory, options, name):
    theirs = _build(peft, factory, **options, init_lora_weights=name).state_dict()
    model = _build(lorakit, factory, **options, init_lora_weights=name)
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        assert _max_diff(ours[key], theirs[key]) < ATOL, key
    # guards the comparison: PiSSA / OLoRA did change the base
    assert _original_weights_kept(model, factory) == (name == "orthogonal")


def test_olora_on_conv1d_works_where_peft_fails():
    """PEFT's OLoRA decomposes a Conv1D weight in its (in, out) storage layout, giving A (r, out) and B (in, r) that
    cannot multiply the input; lorakit decomposes the (out, in) view, as for nn.Linear."""
    model = _build(lorakit, tiny_gpt2, **GPT2, init_lora_weights="olora")
    assert not _original_weights_kept(model, tiny_gpt2)
    assert _max_diff(_logits(model), _logits(tiny_gpt2(0))) < ATOL
    theirs = _build(peft, tiny_gpt2, **GPT2, init_lora_weights="olora")
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # when this stops failing, compare with PEFT
        _logits(theirs)


# -- conversion to a plain LoRA on the original base ---------------------------------------------------------------
CONVERSIONS = [
    pytest.param(tiny_llama, dict(LLAMA, init_lora_weights="pissa"), id="pissa"),
    pytest.param(tiny_llama, dict(LLAMA, init_lora_weights="pissa_niter_4"), id="pissa_niter_4"),
    pytest.param(
        tiny_llama,
        dict(LLAMA, init_lora_weights="olora", rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0}),
        id="olora_patterns",
    ),
    pytest.param(tiny_llama, dict(LLAMA, init_lora_weights="pissa", use_rslora=True), id="pissa_rslora"),
    pytest.param(tiny_gpt2, dict(GPT2, init_lora_weights="pissa"), id="pissa_gpt2_conv1d"),
]


def _trained_and_converted(lib, factory: Callable[..., nn.Module], options: dict, root: Path) -> torch.Tensor:
    """PEFT's documented workflow with ``lib``: save the initial adapter, train, save with conversion to
    ``root / 'converted'``. Returns the trained model's logits."""
    model = _build(lib, factory, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(root / "init")
        _train_(model)
        model.save_pretrained(root / "converted", path_initial_model_for_weight_conversion=root / "init")
    assert model.peft_config["default"].init_lora_weights == options["init_lora_weights"]  # the model's config kept
    return _logits(model)


def _load(lib, factory: Callable[..., nn.Module], folder: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(factory(0), folder)


@pytest.mark.parametrize("factory, options", CONVERSIONS)
def test_conversion_matches_peft_both_ways(factory, options, tmp_path):
    ours = _trained_and_converted(lorakit, factory, options, tmp_path / "lorakit")
    theirs = _trained_and_converted(peft, factory, options, tmp_path / "peft")
    assert _max_diff(ours, theirs) < ATOL  # same start, same training stand-in
    assert _max_diff(ours, _logits(factory(0))) > 1e-3, "the training stand-in must change the logits"

    # the same file ...
    ours_t = load_file(tmp_path / "lorakit/converted/adapter_model.safetensors")
    theirs_t = load_file(tmp_path / "peft/converted/adapter_model.safetensors")
    assert ours_t.keys() == theirs_t.keys()
    for key in ours_t:
        assert ours_t[key].shape == theirs_t[key].shape, key
        assert _max_diff(ours_t[key], theirs_t[key]) < ATOL, key
    ours_c = json.loads((tmp_path / "lorakit/converted/adapter_config.json").read_text())
    theirs_c = json.loads((tmp_path / "peft/converted/adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora"):
        assert ours_c[key] == theirs_c[key], key

    # ... that each library loads onto the ORIGINAL base, with the trained model's logits
    for lib, folder, expected in [(peft, "lorakit", ours), (lorakit, "peft", theirs)]:
        loaded = _load(lib, factory, tmp_path / folder / "converted")
        assert _original_weights_kept(loaded, factory), lib.__name__
        config = loaded.peft_config["default"]
        assert (config.r, config.init_lora_weights) == (2 * options["r"], True), lib.__name__
        assert _max_diff(_logits(loaded), expected) < ATOL, lib.__name__


@pytest.mark.parametrize("lib", [lorakit, peft], ids=["lorakit", "peft"])
def test_rslora_with_rank_pattern_is_refused_like_peft(lib, tmp_path):
    model = _build(lib, tiny_llama, **dict(LLAMA, init_lora_weights="pissa", use_rslora=True, rank_pattern={"v": 2}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match=r"rank_pattern`? or `?alpha_pattern"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")


def test_embedding_and_modules_to_save_survive_the_conversion(tmp_path):
    """lorakit converts the embedding's factors too and keeps modules_to_save copies; PEFT drops both from its
    converted file (which it then cannot load itself). lorakit's file loads in PEFT with the trained logits."""
    options = dict(LLAMA, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    expected = _trained_and_converted(lorakit, tiny_llama, dict(options, init_lora_weights="olora"), tmp_path / "ours")
    loaded = _load(peft, tiny_llama, tmp_path / "ours/converted")
    assert _original_weights_kept(loaded, tiny_llama)
    assert _max_diff(_logits(loaded), expected) < ATOL

    _trained_and_converted(peft, tiny_llama, dict(options, init_lora_weights="olora"), tmp_path / "peft")
    theirs = load_file(tmp_path / "peft/converted/adapter_model.safetensors")
    # the documented PEFT difference; when this fails, PEFT keeps them: compare the files as above
    assert not any("lora_embedding" in k or "lm_head" in k for k in theirs)


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_unconverted_peft_adapter_loads_in_lorakit(name, tmp_path):
    model = _train_(_build(peft, tiny_llama, **LLAMA, init_lora_weights=name))
    model.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert _max_diff(_logits(loaded), _logits(model)) < ATOL


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_embedding_factors_equal_peft_s_from_the_same_seed(init):
    """An embedding's adapter: A = 0, B ~ N(0, 1), the same values as PEFT's from the same seed (the factors are
    created from N(0, 1) draws as PEFT creates them, so B is the same next draw); the linear target after it too."""
    kwargs = dict(target_modules=["embed_tokens", "q_proj"], init_lora_weights=init)
    ours, theirs = _build(lorakit, tiny_llama, **kwargs).state_dict(), _build(peft, tiny_llama, **kwargs).state_dict()
    factors = [k for k in ours if "lora_" in k]
    assert any("lora_embedding_B" in k for k in factors) and any("lora_A" in k for k in factors)
    for key in factors:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0)


def test_embedding_without_init_is_random_normal_as_in_peft():
    """init_lora_weights=False on an embedding: both A and B ~ N(0, 1), as PEFT (not Kaiming-uniform, which a linear
    target gets): mean ~0 and std ~1 over 8 x 1000 draws each."""
    model = _build(lorakit, lambda seed: nn.Sequential(nn.Embedding(1000, 1000)), target_modules=["0"],
                   init_lora_weights=False)
    A, B = model.base_model.model[0].lora_weights("default")
    for factor in (A, B):
        assert abs(factor.mean().item()) < 0.05 and abs(factor.std().item() - 1) < 0.05
