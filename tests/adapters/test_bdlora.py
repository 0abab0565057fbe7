"""BD-LoRA (lorakit.ops.block_diagonal, lorakit.adapters.variant_bdlora): the packed block-diagonal maths against
dense matrices, the variant's shapes, forward and merge against the dense reference W + s * B @ A, errors, several
adapters, mixed batches, and PEFT interop (files both ways, keys, config)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from helpers import assert_same_adapter_config, both_ways, logits, perturb_, tiny_llama
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.adapters.variant_bdlora import BlockDiagonalLinear
from lorakit.config import ConfigError
from lorakit.ops import block_diagonal

ATOL = 1e-5


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


# -- the maths --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out, cols, n", [(8, 4, 2), (12, 2, 4), (6, 5, 1)])
def test_dense_packed_and_apply_agree(out, cols, n):
    torch.manual_seed(0)
    P = torch.randn(out, cols)
    M = block_diagonal.dense(P, n)
    assert M.shape == (out, cols * n)
    rows = out // n
    for k in range(n):  # block k on the diagonal, zeros beside it
        assert torch.equal(M[k * rows : (k + 1) * rows, k * cols : (k + 1) * cols], P[k * rows : (k + 1) * rows])
    assert M.count_nonzero() == P.count_nonzero()
    assert torch.equal(block_diagonal.packed(M, n), P)
    x = torch.randn(2, 3, cols * n)
    assert torch.allclose(block_diagonal.apply(x, P, n), x @ M.T, atol=1e-6)


def test_indivisible_sizes_are_refused():
    with pytest.raises(ValueError, match="not divisible by nblocks=3"):
        block_diagonal.check_divisible(10, 4, 3)


# -- the variant ------------------------------------------------------------------------------------------------
def _model(bd_a=("lin0",), bd_b=("lin1",), nblocks=2, strict=True, module=lorakit, seed=0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    bd = module.BdLoraConfig(
        target_modules_bd_a=list(bd_a), target_modules_bd_b=list(bd_b), nblocks=nblocks, match_strict=strict
    )
    config = module.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, use_bdlora=bd, **kwargs)
    model = module.get_peft_model(MLP(), config)
    perturb_([p for n, p in model.named_parameters() if "lora_" in n], seed=seed + 1, scale=0.3)
    return model


def _dense_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP with W + s * B @ A in each layer, the factors' block-diagonal matrices built by hand."""
    h = x
    for name in ("lin0", "lin1"):
        layer = getattr(model.base_model.model, name)
        A, B = (m["default"] for m in (layer.lora_A, layer.lora_B))
        dense = [block_diagonal.dense(m.weight, m.nblocks) if isinstance(m, BlockDiagonalLinear) else m.weight
                 for m in (A, B)]  # fmt: skip
        weight = layer.base_layer.weight + layer.scaling["default"] * dense[1] @ dense[0]
        h = nn.functional.linear(h, weight, layer.base_layer.bias)
        h = torch.relu(h) if name == "lin0" else h
    return h


def test_packed_shapes_and_trainable_parameters_are_peft_s():
    model = _model()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert shapes == {
        "base_model.model.lin0.lora_A.default.weight": (4, 5),  # block-diagonal A: (r, in / n)
        "base_model.model.lin0.lora_B.default.weight": (20, 4),
        "base_model.model.lin1.lora_A.default.weight": (4, 20),
        "base_model.model.lin1.lora_B.default.weight": (4, 2),  # block-diagonal B: (out, r / n)
    }
    theirs = _model(module=peft)
    assert shapes == {n: tuple(p.shape) for n, p in theirs.named_parameters() if p.requires_grad}


def test_forward_and_merge_equal_the_dense_reference():
    model = _model().eval()
    x = torch.randn(2, 3, 10)
    expected = _dense_reference(model, x)
    assert torch.allclose(model(x), expected, atol=ATOL)
    assert model.base_model.model.lin0._fast is None  # the single-adapter fast path stays off
    weight = model.base_model.model.lin0.base_layer.weight.detach().clone()
    model.merge_adapter()
    assert torch.allclose(model(x), expected, atol=ATOL)
    model.unmerge_adapter()
    assert torch.allclose(model.base_model.model.lin0.base_layer.weight, weight, atol=1e-6)
    assert torch.allclose(model.merge_and_unload()(x), expected, atol=ATOL)


def test_gradients_reach_the_packed_blocks():
    model = _model().train()
    model(torch.randn(5, 10)).sum().backward()
    A = model.base_model.model.lin0.lora_A["default"].weight
    B = model.base_model.model.lin1.lora_B["default"].weight
    assert A.grad is not None and A.grad.shape == (4, 5) and A.grad.abs().sum() > 0
    assert B.grad is not None and B.grad.shape == (4, 2) and B.grad.abs().sum() > 0


def test_block_diagonal_factors_start_as_peft_s():
    """A block-diagonal A is drawn (Kaiming-uniform), a block-diagonal B is zero, whatever init_lora_weights says."""
    torch.manual_seed(0)
    bd = lorakit.BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2)
    config = lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=4, use_bdlora=bd, init_lora_weights=False)
    model = lorakit.get_peft_model(MLP(), config)
    A0 = model.base_model.model.lin0.lora_A["default"].weight
    assert A0.abs().max() <= (6 / 5) ** 0.5 and A0.abs().sum() > 0  # bound sqrt(6 / fan_in), fan_in = 10 / 2
    assert model.base_model.model.lin1.lora_B["default"].weight.abs().sum() == 0


def test_one_block_is_plain_lora():
    torch.manual_seed(0)
    bd = _model(bd_a=("lin0", "lin1"), bd_b=(), nblocks=1).eval()
    plain = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8))
    for name in ("lin0", "lin1"):
        src, dst = getattr(bd.base_model.model, name), getattr(plain.base_model.model, name)
        dst.base_layer.load_state_dict(src.base_layer.state_dict())
        dst.load_factors("default", *src.lora_weights("default"))
    x = torch.randn(3, 10)
    assert torch.allclose(bd(x), plain.eval()(x), atol=ATOL)


def test_not_strict_leaves_unmatched_targets_plain():
    model = _model(bd_a=("lin0",), bd_b=(), strict=False)
    assert model.base_model.model.lin0.variants["default"].name == "bdlora"
    assert model.base_model.model.lin1.variants["default"].name == "lora"


def test_errors_name_the_fix_before_anything_is_wrapped():
    with pytest.raises(ConfigError, match="Found overlapping modules in target_modules_bd lists.*one list only"):
        lorakit.BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin0"])
    mlp = MLP()
    config = lorakit.LoraConfig(target_modules=["lin0", "lin1"], use_bdlora={"target_modules_bd_a": ["lin0"]})
    with pytest.raises(ConfigError, match="Target lin1 matches neither A nor B block-diagonal patterns.*match_strict"):
        lorakit.get_peft_model(mlp, config)
    assert isinstance(mlp.lin0, nn.Linear)  # nothing wrapped
    both = {"target_modules_bd_a": ["lin"], "target_modules_bd_b": ["1"]}
    with pytest.raises(ConfigError, match="Target lin1 matches both A and B"):
        lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin1"], use_bdlora=both))
    odd = {"target_modules_bd_a": ["lin0"], "nblocks": 3}
    with pytest.raises(ValueError, match="not divisible by"):
        lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], r=3, use_bdlora=odd))
    with pytest.raises(ConfigError, match="lora_bias=True is not supported there"):
        _model(bd_a=(), bd_b=("lin0", "lin1"), lora_bias=True)
    for init_name in ("pissa", "olora", "loftq"):  # their pair fits W; replacing one factor would change the model
        with pytest.raises(ConfigError, match=f"use_bdlora with init_lora_weights='{init_name}' is not supported"):
            lorakit.LoraConfig(init_lora_weights=init_name, use_bdlora={"target_modules_bd_a": ["x"]})
    with pytest.raises(ConfigError, match=r"variant combination: \('use_bdlora', 'use_dora'\)"):
        lorakit.LoraConfig(use_dora=True, use_bdlora={"target_modules_bd_a": ["x"]})


def test_combining_refuses_block_diagonal_adapters():
    model = _model()
    model.add_adapter("other", model.peft_config["default"])
    with pytest.raises(ValueError, match="BD-LoRA"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum", combination_type="cat")


def test_several_adapters_and_mixed_batch():
    model = _model()
    model.add_adapter("other", model.peft_config["default"])
    perturb_([p for n, p in model.named_parameters() if ".other." in n], seed=7, scale=0.3)
    model.eval()
    x = torch.randn(3, 10)
    mixed = model(x, adapter_names=["other", "default", "__base__"])
    for row, name in enumerate(["other", "default"]):
        model.set_adapter(name)
        assert torch.allclose(mixed[row], model(x[row : row + 1])[0], atol=ATOL)
    with model.disable_adapter():
        assert torch.allclose(mixed[2], model(x[2:3])[0], atol=ATOL)
    model.delete_adapter("other")
    assert list(model.base_model.model.lin0.lora_A) == ["default"]


# -- PEFT interop ----------------------------------------------------------------------------------------------
def _llama(module: type, seed: int = 0) -> nn.Module:
    bd = module.BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj", "v_proj"], nblocks=2)
    config = module.LoraConfig(target_modules=["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8, use_bdlora=bd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = module.get_peft_model(tiny_llama(seed), config)
    perturb_([p for n, p in model.named_parameters() if "lora_" in n], seed=3)
    return model.eval()


@both_ways
def test_files_load_both_ways_with_equal_outputs(writer, reader, tmp_path):
    model = _llama(writer)
    expected = logits(model)
    with torch.no_grad():
        assert (expected - logits(tiny_llama(0))).abs().max() > 1e-3  # the adapter matters
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = reader.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert (logits(loaded) - expected).abs().max() < ATOL
    loaded.merge_adapter()
    assert (logits(loaded) - expected).abs().max() < ATOL


def test_same_file_keys_and_config_as_peft(tmp_path):
    _llama(lorakit).save_pretrained(tmp_path / "lorakit")
    _llama(peft).save_pretrained(tmp_path / "peft")
    shapes = lambda d: {k: tuple(v.shape) for k, v in load_file(d / "adapter_model.safetensors").items()}  # noqa: E731
    assert shapes(tmp_path / "lorakit") == shapes(tmp_path / "peft")
    assert shapes(tmp_path / "lorakit")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == (32, 2)
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")
    loaded = lorakit.LoraConfig.from_pretrained(tmp_path / "peft")
    assert loaded.use_bdlora.nblocks == 2 and loaded.use_bdlora.target_modules_bd_a == ["o_proj"]


# -- exports ----------------------------------------------------------------------------------------------------
class _IdentityArch:
    """A stand-in GgufArch: every module has a GGUF tensor of its own name, rows in PyTorch's order."""

    def tensor_name(self, module: str) -> str:
        return module

    def to_gguf_rows(self, module: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _file_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in lorakit.get_peft_model_state_dict(model).items()}


def test_exports_expand_the_packed_factor_or_refuse():
    from lorakit.adapters.variant_bdlora import dense_factors
    from lorakit.export.gguf_adapter import gguf_lora_tensors
    from lorakit.export.gguf_merged import merged_rows
    from lorakit.export.vllm import vllm_problems

    model = _model()
    config, tensors = model.peft_config["default"], _file_tensors(model)
    key = "base_model.model.{}.lora_{}.weight"
    for name in ("lin0", "lin1"):
        layer = getattr(model.base_model.model, name)
        A, B = dense_factors(config.use_bdlora, name, tensors[key.format(name, "A")], tensors[key.format(name, "B")])
        dense_A, dense_B = layer.lora_weights("default")
        assert torch.equal(A, dense_A.detach()) and torch.equal(B, dense_B.detach())
    rows = merged_rows(config, tensors, _IdentityArch())
    assert torch.allclose(rows["lin0"], model.base_model.model.lin0.delta_out_in("default").detach(), atol=1e-6)
    pairs = dict(gguf_lora_tensors(config, tensors, _IdentityArch()))
    assert pairs["lin0.lora_a"].shape == (4, 10) and pairs["lin1.lora_b"].shape == (4, 4)
    assert any("BD-LoRA" in p.rule for p in vllm_problems(config))
    assert not any("BD-LoRA" in p.rule for p in vllm_problems(lorakit.LoraConfig(target_modules=["lin0"])))
