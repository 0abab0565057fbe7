"""LoRA-GA's preprocessing (lorakit.adapters.lora_ga.preprocess_loraga) and initializer on tiny models: the mean
gradient over train_step's backward passes (state restored, also when train_step raises), the adapter made from it
(the gradient's singular vectors; the model unchanged at start, the base the residual), the cache file, the errors,
and PEFT interop: the same gradients and cache files, converted adapters loaded both ways with equal outputs."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from helpers import both_ways, input_ids, logits, perturb_, save_trained_and_converted, tiny_gpt2, tiny_llama
from peft.tuners.lora import preprocess_loraga as peft_preprocess_loraga
from torch import nn

import lorakit
from lorakit.adapters.inject import LORA_GA_GRAD
from lorakit.adapters.lora_ga import mean_gradients
from lorakit.ops import lora_ga as ops

TARGETS = ["q_proj", "v_proj"]
R = 8  # q = min(4r, min(out, in)) = min(out, in) for q_proj (32, 32) and v_proj (16, 32): PEFT's SVD is exact too
BATCHES = [input_ids(batch=2, seq=8, seed=s) for s in range(3)]
NAMES = [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS]


def _train_step(model: nn.Module):  # noqa: ANN202
    def step() -> None:
        for ids in BATCHES:
            model(input_ids=ids, labels=ids).loss.backward()

    return step


def _config(lib, direction: str = "ArB2r", scale: str = "stable", **kwargs: object):  # noqa: ANN202
    settings = lib.LoraGAConfig(direction=direction, scale=scale)
    return lib.LoraConfig(r=R, lora_alpha=16, target_modules=TARGETS, init_lora_weights="lora_ga",
                          lora_ga_config=settings, **kwargs)


def _preprocess(lib, model: nn.Module, config: object, **kwargs: object) -> None:
    (peft_preprocess_loraga if lib is peft else lorakit.preprocess_loraga)(model, config, _train_step(model), **kwargs)


def _made(lib, seed: int = 0, cache_file: str | None = None, **kwargs: object) -> nn.Module:
    model, config = tiny_llama(seed), _config(lib, **kwargs)
    _preprocess(lib, model, config, **({"cache_file": cache_file} if cache_file else {}))
    return lib.get_peft_model(model, config)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: getattr(model.get_submodule(name), LORA_GA_GRAD) for name in NAMES}


def test_the_gradient_is_the_mean_over_the_backward_passes_and_the_state_is_restored():
    model, reference = tiny_llama(0), tiny_llama(0)
    model.model.layers[1].train()  # a mixed mode, kept
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen part, kept
    sentinel = torch.ones_like(model.model.layers[0].self_attn.q_proj.weight)
    model.model.layers[0].self_attn.q_proj.weight.grad = sentinel  # a gradient the user had, kept (and not added)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lorakit.preprocess_loraga(model, _config(lorakit), _train_step(model))
    reference.train()
    _train_step(reference)()
    for name, grad in _grads(model).items():
        expected = reference.get_submodule(name).weight.grad / len(BATCHES)
        assert grad.shape == expected.shape and torch.allclose(grad, expected, atol=1e-6), name
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.model.layers[0].self_attn.q_proj.weight.grad is sentinel
    assert all(p.grad is None for n, p in model.named_parameters() if "layers.0.self_attn.q_proj" not in n)
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


def test_state_is_restored_when_train_step_raises():
    model = tiny_llama(0)
    model.model.norm.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    targets = {name: model.get_submodule(name) for name in NAMES}

    def broken() -> None:
        model(input_ids=BATCHES[0], labels=BATCHES[0]).loss.backward()
        assert model.training and not model.lm_head.weight.requires_grad  # only the targets' weights train
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader failed"):
        mean_gradients(model, targets, broken)
    assert not model.training and not any(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None and not p._post_accumulate_grad_hooks for p in model.parameters())
    assert not any(hasattr(m, LORA_GA_GRAD) for m in model.modules())


# every direction (with the default scale) and every scale (with the default direction); all 16 pairs: tests/ops
@pytest.mark.parametrize(
    "direction, scale", [(d, "stable") for d in ops.DIRECTIONS] + [("ArB2r", s) for s in ops.SCALES if s != "stable"]
)
def test_adapter_starts_as_the_base_from_the_gradients_singular_vectors(direction, scale):
    base, model = tiny_llama(0), tiny_llama(0)
    config = _config(lorakit, direction, scale)
    lorakit.preprocess_loraga(model, config, _train_step(model))
    grads = _grads(model)
    torch.manual_seed(0)
    peft_model = lorakit.get_peft_model(model, config)
    assert torch.allclose(logits(peft_model), logits(base), atol=1e-5)
    for name in NAMES:
        layer = peft_model.base_model.model.get_submodule(name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        original = base.get_submodule(name).weight
        assert torch.allclose(layer.base_layer.weight + layer.scaling["default"] * B @ A, original, atol=1e-6)
        assert (layer.base_layer.weight - original).abs().max() > 1e-6  # the base holds the residual
        assert not hasattr(layer.base_layer, LORA_GA_GRAD)  # taken off: used once
        _, _, Vh = torch.linalg.svd(grads[name], full_matrices=False)  # the dense reference
        overlap = A @ Vh[: 2 * R].T  # (r, 2r): each row of A is one of the top 2r right-singular vectors, up to sign
        scaled = scale == "gd_scale"
        norm = 1 / layer.scaling["default"] if scaled else 1.0
        assert torch.allclose(overlap.abs().sum(dim=1), torch.full((R,), norm), atol=1e-3)
        assert torch.allclose(overlap.abs().max(dim=1).values, torch.full((R,), norm), atol=1e-3)


def test_the_same_gradients_as_peft_and_the_same_factors_up_to_sign():
    ours_model, theirs_model = tiny_llama(0), tiny_llama(0)
    _preprocess(lorakit, ours_model, _config(lorakit))
    _preprocess(peft, theirs_model, _config(peft))
    ours_grads, theirs_grads = _grads(ours_model), _grads(theirs_model)
    assert all(torch.allclose(ours_grads[n], theirs_grads[n], atol=1e-7) for n in NAMES)
    ours = lorakit.get_peft_model(ours_model, _config(lorakit))
    theirs = peft.get_peft_model(theirs_model, _config(peft))
    for name in NAMES:
        a = ours.base_model.model.get_submodule(name)
        b = theirs.base_model.model.get_submodule(name)
        for which, dim in (("lora_A", 1), ("lora_B", 0)):  # PEFT's randomized SVD leaves each sign random
            x, y = getattr(a, which)["default"].weight, getattr(b, which)["default"].weight
            sign = torch.sign((x * y).sum(dim=dim, keepdim=True))
            assert torch.allclose(x, y * sign, atol=1e-3), (name, which)


def test_conv1d_targets_as_peft():
    def made(lib):  # noqa: ANN001, ANN202
        model = tiny_gpt2(0)
        config = lib.LoraConfig(r=8, target_modules=["c_attn"], init_lora_weights="lora_ga", fan_in_fan_out=True,
                                lora_ga_config=lib.LoraGAConfig())
        _preprocess(lib, model, config)
        grad = getattr(model.transformer.h[0].attn.c_attn, LORA_GA_GRAD)
        assert grad.shape == model.transformer.h[0].attn.c_attn.weight.shape == (32, 96)  # Conv1D: (in, out)
        return lib.get_peft_model(model, config), grad

    (ours, ours_grad), (theirs, theirs_grad) = made(lorakit), made(peft)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-7)
    assert torch.allclose(logits(ours), logits(tiny_gpt2(0)), atol=1e-5)
    A = ours.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight  # (r, in)
    _, _, Vh = torch.linalg.svd(ours_grad.T, full_matrices=False)  # the gradient as (out, in)
    assert torch.allclose((A @ Vh[:8].T).abs(), torch.eye(8), atol=1e-3)  # ArB2r: A = the top r of V^T
    theirs_A = theirs.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
    assert torch.allclose((A @ theirs_A.T).abs(), torch.eye(8), atol=1e-3)


def test_cache_file_round_trip_and_peft_reads_it_both_ways(tmp_path):
    cache = tmp_path / "c" / "grads.pt"
    first = _made(lorakit, cache_file=str(cache))
    assert list(cache.parent.iterdir()) == [cache]  # no temp file left
    stored = torch.load(cache, weights_only=True)
    assert sorted(stored) == sorted(f"{n}.{LORA_GA_GRAD}" for n in NAMES)

    def never() -> None:
        raise AssertionError("train_step ran although the cache file exists")

    for lib in (lorakit, peft):
        model, config = tiny_llama(0), _config(lib)
        (peft_preprocess_loraga if lib is peft else lorakit.preprocess_loraga)(model, config, never, str(cache))
        assert all(torch.equal(g, stored[f"{n}.{LORA_GA_GRAD}"]) for n, g in _grads(model).items())
    again = lorakit.get_peft_model(model, _config(lorakit))  # the last one: a PEFT-read cache on lorakit's model
    mine = {n: p for n, p in first.named_parameters() if "lora_" in n}
    assert all(torch.allclose(p, dict(again.named_parameters())[n], atol=1e-6) for n, p in mine.items())
    peft_cache = tmp_path / "peft.pt"
    _made(peft, cache_file=str(peft_cache))  # PEFT's own file, read by lorakit
    model = tiny_llama(0)
    lorakit.preprocess_loraga(model, _config(lorakit), never, cache_file=peft_cache)
    assert all(torch.allclose(g, stored[f"{n}.{LORA_GA_GRAD}"], atol=1e-7) for n, g in _grads(model).items())


def test_a_cache_file_for_other_targets_is_refused(tmp_path):
    cache = tmp_path / "grads.pt"
    torch.save({"elsewhere._peft_loraga_grad": torch.zeros(2, 2)}, cache)
    with pytest.raises(ValueError, match="made for other target modules"):
        lorakit.preprocess_loraga(tiny_llama(0), _config(lorakit), lambda: None, cache_file=cache)
    torch.save([torch.zeros(2)], cache)
    with pytest.raises(ValueError, match="no LoRA-GA cache file"):
        lorakit.preprocess_loraga(tiny_llama(0), _config(lorakit), lambda: None, cache_file=cache)


def test_errors_and_warnings_say_what_to_do():
    with pytest.raises(ValueError, match="If you want to use LoRA-GA"):
        lorakit.preprocess_loraga(tiny_llama(0), lorakit.LoraConfig(target_modules=TARGETS), lambda: None)
    quantized = lorakit.quantize(tiny_llama(0), bits=8)
    with pytest.raises(ValueError, match="does not support quantized models.*lorakit.quantize"):
        lorakit.preprocess_loraga(quantized, _config(lorakit), lambda: None)
    embedding_only = lorakit.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="lora_ga",
                                        lora_ga_config=lorakit.LoraGAConfig())
    with pytest.raises(ValueError, match="No supported layers found.*embed_tokens"):
        lorakit.preprocess_loraga(tiny_llama(0), embedding_only, lambda: None)
    model = tiny_llama(0)
    lorakit.preprocess_loraga(model, _config(lorakit), _train_step(model))
    bare = lorakit.LoraConfig(r=R, target_modules=TARGETS, init_lora_weights="lora_ga")
    with pytest.raises(ValueError, match="lora_ga_config must be provided"):
        lorakit.get_peft_model(model, bare)
    assert all(not isinstance(m, lorakit.LoraLayer) for m in model.modules())  # refused before any change
    with pytest.warns(UserWarning, match="Using Rank-Stabilized LoRA"):
        _config(lorakit, use_rslora=True, rank_pattern={"q_proj": 4})

    fresh = tiny_llama(0)

    def no_loss() -> None:  # only layer 0's q_proj reaches a loss: 3 targets get no gradient
        fresh.model.layers[0].self_attn.q_proj(torch.randn(2, 32)).sum().backward()

    with pytest.warns(UserWarning, match=r"no gradient reached 3 target\(s\)"):
        lorakit.preprocess_loraga(fresh, _config(lorakit), no_loss)
    assert hasattr(fresh.model.layers[0].self_attn.q_proj, LORA_GA_GRAD)
    assert not hasattr(fresh.model.layers[0].self_attn.v_proj, LORA_GA_GRAD)


def test_without_preprocessing_the_adapter_starts_as_plain_lora_with_a_warning():
    with pytest.warns(UserWarning, match="hold no gradient from lorakit.preprocess_loraga"):
        model = lorakit.get_peft_model(tiny_llama(0), _config(lorakit))
    assert torch.allclose(logits(model), logits(tiny_llama(0)), atol=1e-6)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.all(layer.lora_B["default"].weight == 0)
    assert torch.equal(layer.base_layer.weight, tiny_llama(0).model.layers[0].self_attn.q_proj.weight)


def test_other_targets_start_as_plain_lora_as_in_peft():
    model = tiny_llama(0)
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights="lora_ga",
                                lora_ga_config=lorakit.LoraGAConfig())
    lorakit.preprocess_loraga(model, config, _train_step(model))
    assert not hasattr(model.model.embed_tokens, LORA_GA_GRAD)
    peft_model = lorakit.get_peft_model(model, config)
    assert torch.allclose(logits(peft_model), logits(tiny_llama(0)), atol=1e-5)
    embedding = peft_model.base_model.model.model.embed_tokens
    assert torch.all(embedding.lora_embedding_A["default"] == 0)  # PEFT's embedding default: A = 0, B random


@both_ways
def test_converted_adapter_loads_on_the_original_base_with_equal_outputs(writer, reader, tmp_path):
    model = _made(writer, direction="ArBr", scale="weight_svd")
    expected = save_trained_and_converted(model, tmp_path)
    converted = reader.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "converted")  # the original base
    assert converted.peft_config["default"].r == 2 * R
    assert torch.allclose(logits(converted), expected, atol=1e-5)
    residual = model.get_base_model()  # the unconverted adapter fits the residual base it was trained on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lorakit says the loaded targets hold no gradient
        loaded = reader.PeftModel.from_pretrained(_unwrapped(residual), tmp_path / "lora_ga")
    assert torch.allclose(logits(loaded), expected, atol=1e-5)


def _unwrapped(model: nn.Module) -> nn.Module:
    """A fresh tiny llama holding ``model``'s residual base weights (without its LoRA wrappers)."""
    fresh = tiny_llama(0)
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    fresh.load_state_dict(state)
    return fresh


def test_a_saved_adapter_rebuilds_its_residual_base_from_the_cache_file(tmp_path):
    cache = str(tmp_path / "grads.pt")
    model = _made(lorakit, cache_file=cache)
    perturb_([p for n, p in model.named_parameters() if "lora_" in n], seed=4)
    expected = logits(model)
    model.save_pretrained(tmp_path / "a")
    base = tiny_llama(0)  # the original base: the same gradients give the same factors and residual
    lorakit.preprocess_loraga(base, _config(lorakit), lambda: None, cache_file=cache)
    loaded = lorakit.PeftModel.from_pretrained(base, tmp_path / "a")
    assert torch.allclose(logits(loaded), expected, atol=1e-5)
