"""KaSA (kasa_config: lorakit.ops.kasa, lorakit.adapters.variant_kasa): the truncated base, the update
s * B @ diag(d) @ A against dense matrices, merge / unmerge, the regularization loss, refusals, and PEFT interop
(files both ways, keys, adapter_config.json, the loss)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from helpers import assert_same_adapter_config, both_ways, input_ids, perturb_, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.config import ConfigError
from lorakit.ops import kasa

ATOL = 1e-5


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 12)
        self.lin1 = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _config(module: type = lorakit, **kwargs: object) -> object:
    options = {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8, "kasa_config": module.KasaConfig()}
    return module.LoraConfig(**{**options, **kwargs})


# -- the maths -----------------------------------------------------------------------------------------------------
def test_truncate_drops_the_r_smallest_singular_components():
    torch.manual_seed(0)
    W = torch.randn(10, 7, dtype=torch.float64)
    kept, dropped = kasa.truncate(W, 3)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert kept.dtype == torch.float64  # the SVD itself runs in float32, as in PEFT
    assert torch.allclose(kept, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5)
    assert torch.allclose(kept + dropped, W, atol=1e-5)
    assert (
        torch.allclose(torch.linalg.svdvals(kept)[:4], S[:4], atol=1e-5)
        and torch.linalg.matrix_rank(kept, atol=1e-4) == 4
    )
    with pytest.raises(ValueError, match=r"KaSA requires `r` \(7\) to be smaller than min.*\(7\).*pass r < 7"):
        kasa.truncate(W, 7)


def test_delta_and_output_equal_the_dense_matrices():
    torch.manual_seed(0)
    A, B, d, x = torch.randn(3, 6), torch.randn(5, 3), torch.randn(3), torch.randn(4, 6)
    dense = 2.0 * B @ torch.diag(d) @ A  # (5, 6)
    assert torch.allclose(kasa.delta(A, B, d, 2.0), dense, atol=1e-6)
    assert torch.allclose(kasa.lora_output(x, A, B, d, 2.0), x @ dense.T, atol=1e-5)


def test_regularization_equals_its_closed_form_and_vanishes_on_orthonormal_factors():
    torch.manual_seed(0)
    A, B, d = torch.randn(3, 6), torch.randn(5, 3), torch.randn(3)
    eye = torch.eye(3)
    expected = 0.3 * (d**2).sum() + 0.7 * (
        torch.sqrt(((B.T @ B - eye) ** 2).sum()) + torch.sqrt(((A @ A.T - eye) ** 2).sum())
    )
    assert torch.allclose(kasa.regularization(A, B, d, 0.3, 0.7), expected, atol=1e-5)
    Q_a, _ = torch.linalg.qr(torch.randn(6, 3))
    Q_b, _ = torch.linalg.qr(torch.randn(5, 3))
    assert kasa.regularization(Q_a.T, Q_b, torch.zeros(3), 1.0, 1.0) < 1e-5


# -- the variant in a model ------------------------------------------------------------------------------------
def test_adding_the_adapter_truncates_the_base_and_starts_as_its_identity():
    torch.manual_seed(0)
    base = MLP()
    W = base.lin0.weight.detach().clone()
    x = torch.randn(5, 16)
    model = lorakit.get_peft_model(base, _config())
    layer = model.base_model.model.lin0
    assert torch.allclose(layer.base_layer.weight, kasa.truncate(W, 4)[0], atol=1e-6)
    assert layer.lora_diag["default"].shape == (4,) and layer.lora_diag["default"].requires_grad
    with torch.no_grad():
        active = model(x)
        with model.disable_adapter():
            disabled = model(x)
    assert torch.allclose(active, disabled, atol=1e-6)  # B = 0
    assert not torch.allclose(disabled, MLP.forward(_plain(W, base), x), atol=1e-4)  # but the base is truncated


def _plain(W: torch.Tensor, wrapped: MLP) -> MLP:
    """An MLP with lin0's original weight ``W`` and the other weights of ``wrapped``'s base layers."""
    plain = MLP()
    with torch.no_grad():
        plain.lin0.weight.copy_(W)
        plain.lin0.bias.copy_(wrapped.lin0.base_layer.bias)
        plain.lin1.weight.copy_(wrapped.lin1.base_layer.weight)
        plain.lin1.bias.copy_(wrapped.lin1.base_layer.bias)
    return plain


def test_forward_and_merge_equal_the_dense_reference():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(MLP(), _config(init_lora_weights=False, lora_dropout=0.0))
    model.eval()
    layer = model.base_model.model.lin0
    x = torch.randn(5, 16)
    A, B, d = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_diag["default"]
    W = layer.base_layer.weight.detach().clone()  # the truncated base
    dense = W + layer.scaling["default"] * B @ torch.diag(d) @ A  # (12, 16)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ dense.T + layer.base_layer.bias, atol=ATOL)
        out = model(x)
        model.merge_adapter()
        assert torch.allclose(layer.base_layer.weight, dense, atol=ATOL)
        assert torch.allclose(model(x), out, atol=ATOL)
        model.unmerge_adapter()
        assert torch.allclose(layer.base_layer.weight, W, atol=ATOL)  # back to the truncated base, not the original
        merged = model.merge_and_unload()
        assert torch.allclose(merged(x), out, atol=ATOL)


def test_d_gets_gradients_and_trains():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(MLP(), _config(init_lora_weights=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.model.lin0.lora_diag.default" in trainable and len(trainable) == 6
    model(torch.randn(4, 16)).sum().backward()
    assert model.base_model.model.lin1.lora_diag["default"].grad.abs().sum() > 0


def test_regularization_loss_sums_the_layers_with_each_adapters_coefficients():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(MLP(), _config(kasa_config=lorakit.KasaConfig(beta=0.3, gamma=0.0)))
    with torch.no_grad():
        for name in ("lin0", "lin1"):
            getattr(model.base_model.model, name).lora_diag["default"].copy_(torch.arange(1.0, 5.0))
    assert model._get_kasa_loss().item() == pytest.approx(2 * 0.3 * 30, rel=1e-6)
    model.add_adapter("other", _config(kasa_config={"beta": 0.0, "gamma": 1.0}, target_modules=["lin0"]))
    lin0 = model.base_model.model.lin0
    A, B = lin0.lora_A["other"].weight, lin0.lora_B["other"].weight
    expected = kasa.regularization(A, B, lin0.lora_diag["other"], 0.0, 1.0)
    assert torch.allclose(model._get_kasa_loss("other"), expected)
    plain = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"]))
    assert plain._get_kasa_loss() == 0.0


def test_mixed_batch_equals_one_adapter_at_a_time():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(MLP(), _config(init_lora_weights=False))
    model.add_adapter("other", _config(init_lora_weights=False))
    model.eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = []
        for name in ("default", "other"):
            model.set_adapter(name)
            expected.append(model(x))
        mixed = model(x, adapter_names=["default", "other", "other", "default"])
    assert torch.allclose(
        mixed, torch.stack([expected[0][0], expected[1][1], expected[1][2], expected[0][3]]), atol=ATOL
    )


def test_refusals_name_the_fix():
    with pytest.raises(ConfigError, match="`beta` must be non-negative, got -1.0"):
        lorakit.KasaConfig(beta=-1.0)
    with pytest.raises(TypeError, match="`KasaConfig` must be a `KasaConfig`, a dict, or None."):
        lorakit.LoraConfig(target_modules=["lin0"], kasa_config=123)
    with pytest.raises(ConfigError, match=r"variant combination: \('kasa_config', 'use_dora'\)"):
        _config(use_dora=True)
    base = MLP()
    W = base.lin0.weight.detach().clone()
    with pytest.raises(ValueError, match=r"KaSA requires `r` \(10\)"):  # lin1 (10 x 12); lin0 comes first
        lorakit.get_peft_model(base, _config(r=10))
    assert torch.equal(base.lin0.weight, W) and isinstance(base.lin0, nn.Linear)  # nothing changed before it
    model = lorakit.get_peft_model(MLP(), _config())
    with pytest.raises(
        ValueError, match="KaSA cannot be combined with adapters that don't use KaSA.*adapter 'default'"
    ):
        model.add_adapter("plain", lorakit.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="add_weighted_adapter cannot combine KaSA adapters"):
        model.add_weighted_adapter(["default"], [1.0], "sum", combination_type="linear")
    plain = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="the new adapter uses KaSA but adapter 'default' does not"):
        plain.add_adapter("kasa", _config())
    with pytest.raises(ConfigError, match="KaSA does not support `fan_in_fan_out=True` layers"):
        lorakit.get_peft_model(tiny_gpt2(0), lorakit.LoraConfig(target_modules=["c_attn"], r=2, kasa_config={}))
    with pytest.raises(ConfigError, match="KaSA does not support adapting Embedding layers"):
        lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(target_modules=["embed_tokens"], kasa_config={}))


# -- PEFT interop ----------------------------------------------------------------------------------------------
def _llama(module: type) -> nn.Module:
    config = module.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, kasa_config=module.KasaConfig(beta=0.2))
    torch.manual_seed(0)
    model = module.get_peft_model(tiny_llama(0), config)
    perturb_([p for p in model.parameters() if p.requires_grad], seed=3)  # trained A, B and d
    return model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids(seed=1)).logits


def test_same_truncated_base_and_loss_as_peft():
    ours, theirs = _llama(lorakit), _llama(peft)
    base = lambda m: {n: p for n, p in m.named_parameters() if "base_layer" in n}  # noqa: E731
    ob, tb = base(ours), base(theirs)
    assert ob.keys() == tb.keys() and len(ob) == 4
    assert all(torch.allclose(ob[n], tb[n], atol=ATOL) for n in ob)
    theirs.load_state_dict(ours.state_dict())
    assert torch.allclose(ours._get_kasa_loss(), theirs._get_kasa_loss(), atol=1e-6)
    assert (_logits(ours) - _logits(theirs)).abs().max() < ATOL


@both_ways
def test_files_load_both_ways_onto_the_original_base_with_equal_outputs(writer, reader, tmp_path):
    model = _llama(writer)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = reader.PeftModel.from_pretrained(tiny_llama(0), tmp_path)  # truncated again as it loads
    assert (_logits(loaded) - _logits(model)).abs().max() < ATOL
    loaded.merge_adapter()
    assert (_logits(loaded) - _logits(model)).abs().max() < ATOL


def test_same_file_keys_and_config_as_peft(tmp_path):
    _llama(lorakit).save_pretrained(tmp_path / "lorakit")
    _llama(peft).save_pretrained(tmp_path / "peft")
    shapes = lambda d: {k: tuple(v.shape) for k, v in load_file(d / "adapter_model.safetensors").items()}  # noqa: E731
    ours, theirs = shapes(tmp_path / "lorakit"), shapes(tmp_path / "peft")
    assert ours == theirs
    assert ours["base_model.model.model.layers.0.self_attn.q_proj.lora_diag"] == (4,)
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")


def test_exports_refuse_kasa_with_the_merged_model_as_the_fix():
    from lorakit.export.gguf_adapter import KASA, gguf_adapter_problems
    from lorakit.export.vllm import vllm_problems

    config = lorakit.LoraConfig(target_modules=["q_proj"], kasa_config={})
    (problem,) = vllm_problems(config)
    assert "vLLM does not support KaSA" in problem.rule and "--to merged" in problem.fix
    assert KASA in gguf_adapter_problems(config, {}, "unknown") and "--to merged " in KASA.fix
    assert not vllm_problems(lorakit.LoraConfig(target_modules=["q_proj"]))


def test_conversion_onto_the_original_base_is_refused(tmp_path):
    model = lorakit.get_peft_model(MLP(), _config(init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="cannot convert a KaSA adapter.*save without conversion"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
