"""VeLoRA (lorakit.ops.velora, lorakit.adapters.variant_velora): the compression maths against a loop reference, the
variant's forward (plain LoRA's), its backward (A's gradient from the reconstructed input), the projection updates,
merge, several adapters, mixed batches, and PEFT interop (files both ways, keys, config)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_adapter_config, both_ways, input_ids, perturb_, tiny_llama
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.adapters.linear import LoraLinear
from lorakit.config import ConfigError
from lorakit.ops import velora

ATOL = 1e-5


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 12)
        self.lin1 = nn.Linear(12, 5)
        self.emb = nn.Embedding(7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _x_hat_reference(x: torch.Tensor, v: torch.Tensor, groups: int, scale: float) -> torch.Tensor:
    """Eqs. (1)-(2) token by token, group by group: each sub-token replaced by <sub-token, v> * v."""
    tokens = x.reshape(-1, x.shape[-1])
    d = v.numel()
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for g in range(groups):
            part = tokens[t, g * d : (g + 1) * d]  # the last one may be short: zero padding
            coefficient = (part * v[: part.numel()]).sum()
            out[t, g * d : (g + 1) * d] = coefficient * v[: part.numel()] * scale
    return out


# -- the maths --------------------------------------------------------------------------------------------------
def test_sub_tokens_zero_pad_the_last_group():
    x = torch.arange(10.0).reshape(2, 5)
    assert velora.sub_tokens(x, 3).tolist() == [[[0, 1], [2, 3], [4, 0]], [[5, 6], [7, 8], [9, 0]]]
    assert velora.group_dim(5, 3) == 2


@pytest.mark.parametrize("in_features, groups", [(12, 4), (10, 3), (7, 7), (16, 1)])
def test_compress_then_reconstruct_equals_the_loop_reference(in_features, groups):
    torch.manual_seed(0)
    x = torch.randn(2, 3, in_features)
    v = velora.normalized(torch.randn(velora.group_dim(in_features, groups)))
    c = velora.compress(x, v, groups)
    assert c.shape == (6, groups)
    expected = _x_hat_reference(x, v, groups, scale=0.5)
    assert torch.allclose(velora.reconstruct(c, v, in_features, 0.5), expected, atol=1e-6)


def test_normalized_is_a_unit_vector_and_zero_becomes_ones():
    assert torch.allclose(torch.linalg.vector_norm(velora.normalized(torch.tensor([3.0, 4.0]))), torch.tensor(1.0))
    assert torch.allclose(velora.normalized(torch.zeros(4)), torch.full((4,), 0.5))


def test_linear_forward_and_input_gradient_are_exact_weight_gradient_from_x_hat():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, requires_grad=True)
    weight = torch.randn(4, 10, requires_grad=True)
    v = velora.normalized(torch.randn(velora.group_dim(10, 3)))
    grad = torch.randn(2, 3, 4)
    out = velora.linear(x, weight, v, 3, 0.5)
    assert torch.allclose(out, F.linear(x, weight))
    out.backward(grad)
    g = grad.reshape(-1, 4)
    assert torch.allclose(x.grad, (g @ weight).reshape(x.shape).detach(), atol=1e-6)  # exact
    x_hat = _x_hat_reference(x.detach(), v, 3, 0.5)
    assert torch.allclose(weight.grad, g.T @ x_hat, atol=1e-5)
    assert not torch.allclose(weight.grad, g.T @ x.detach().reshape(-1, 10), atol=1e-2)  # an approximation


def test_one_feature_per_group_reconstructs_exactly():
    """D = 1 (G = in): each sub-token is one feature, v = [1], so x_hat = x and the gradient is plain LoRA's."""
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    weight = torch.randn(3, 6, requires_grad=True)
    velora.linear(x, weight, velora.normalized(torch.ones(1)), 6, 1.0).sum().backward()
    assert torch.allclose(weight.grad, torch.ones(5, 3).T @ x, atol=1e-6)


# -- the variant ------------------------------------------------------------------------------------------------
def _model(module: type = lorakit, init_type: str = "random", groups: int = 3, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    config = module.LoraConfig(
        target_modules=["lin0", "lin1"],
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        velora_config=module.VeloraConfig(num_groups=groups, init_type=init_type, scale=0.5),
        **kwargs,
    )
    return module.get_peft_model(MLP(), config)


def test_forward_is_plain_lora_in_training_and_eval():
    model = _model()
    x = torch.randn(4, 10)
    for train in (True, False):
        model.train(train)
        layer = model.base_model.model.lin0
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        h = layer.base_layer(x) + layer.scaling["default"] * x @ A.T @ B.T
        expected = model.base_model.model.lin1.base_layer(torch.relu(h))
        lin1 = model.base_model.model.lin1
        expected = expected + lin1.scaling["default"] * torch.relu(h) @ lin1.lora_A["default"].weight.T @ (
            lin1.lora_B["default"].weight.T
        )
        assert torch.allclose(model(x), expected, atol=ATOL)
        assert layer._fast is None  # the single-adapter fast path stays off


def test_backward_gives_A_the_reconstructed_input_gradient_and_B_the_exact_one():
    model = _model().train()
    layer = model.base_model.model.lin0
    x = torch.randn(2, 3, 10)
    grad = torch.randn(2, 3, 12)
    layer(x).backward(grad)
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s, v = layer.scaling["default"], layer.lora_velora_embed["default"]
    g = grad.reshape(-1, 12) * s  # (T, out): at B's output, times s
    x_hat = _x_hat_reference(x, v, 3, 0.5)
    assert torch.allclose(layer.lora_A["default"].weight.grad, (g @ B).T @ x_hat, atol=1e-5)
    assert torch.allclose(layer.lora_B["default"].weight.grad, g.T @ (x.reshape(-1, 10) @ A.T), atol=1e-5)
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("init_type, every_batch", [("batch_average", True), ("batch_average_once", False)])
def test_projection_follows_the_training_batches(init_type, every_batch):
    model = _model(init_type=init_type)
    layer = model.base_model.model.lin0
    assert torch.equal(layer.lora_velora_embed["default"], torch.zeros(4))
    x0, x1 = torch.randn(3, 10), torch.randn(3, 10) + 5
    model.eval()
    model(x0)  # not training: no update
    assert torch.equal(layer.lora_velora_embed["default"], torch.zeros(4))
    model.train()
    model(x0)
    assert torch.allclose(layer.lora_velora_embed["default"], velora.batch_projection(x0, 3))
    model(x1)
    expected = velora.batch_projection(x1 if every_batch else x0, 3)
    assert torch.allclose(layer.lora_velora_embed["default"], expected)


def test_random_projection_is_a_unit_vector_that_stays():
    model = _model(init_type="random").train()
    v = model.base_model.model.lin1.lora_velora_embed["default"].clone()  # D = ceil(12 / 3) = 4
    assert v.shape == (4,) and torch.allclose(torch.linalg.vector_norm(v), torch.tensor(1.0))
    model(torch.randn(3, 10))
    assert torch.equal(model.base_model.model.lin1.lora_velora_embed["default"], v)


def test_merge_round_trip():
    model = _model().eval()
    x = torch.randn(4, 10)
    before = model(x)
    weight = model.base_model.model.lin0.base_layer.weight.detach().clone()
    model.merge_adapter()
    assert torch.allclose(model(x), before, atol=ATOL)
    model.unmerge_adapter()
    assert torch.allclose(model.base_model.model.lin0.base_layer.weight, weight, atol=1e-6)
    merged = model.merge_and_unload()
    assert isinstance(merged.lin0, nn.Linear) and torch.allclose(merged(x), before, atol=ATOL)


def test_several_adapters_and_delete():
    model = _model()
    config = lorakit.LoraConfig(target_modules=["lin0"], velora_config=lorakit.VeloraConfig(num_groups=2))
    model.add_adapter("other", config)
    layer = model.base_model.model.lin0
    assert layer.lora_velora_embed["other"].shape == (5,)
    assert set(layer.lora_velora_embed.keys()) == {"default", "other"}
    model.delete_adapter("other")
    assert set(layer.lora_velora_embed.keys()) == {"default"}
    assert "lin0.lora_velora_embed.other" not in " ".join(model.state_dict())


def test_mixed_batch_equals_one_adapter_at_a_time():
    model = _model()
    model.add_adapter(
        "other",
        lorakit.LoraConfig(
            target_modules=["lin0"], init_lora_weights=False, velora_config=lorakit.VeloraConfig(num_groups=2)
        ),
    )
    model.eval()
    x = torch.randn(3, 10)
    mixed = model(x, adapter_names=["default", "other", "__base__"])
    for row, name in enumerate(["default", "other"]):
        model.set_adapter(name)
        assert torch.allclose(mixed[row], model(x[row : row + 1])[0], atol=ATOL)
    with model.disable_adapter():
        assert torch.allclose(mixed[2], model(x[2:3])[0], atol=ATOL)


def test_refusals_name_the_fix():
    with pytest.raises(ConfigError, match="`num_groups` should be positive, got 0"):
        lorakit.VeloraConfig(num_groups=0)
    with pytest.raises(ConfigError, match="`scale` should be positive, got 0.0"):
        lorakit.VeloraConfig(scale=0.0)
    with pytest.raises(ConfigError, match="Unsupported `init_type` 'x'"):
        lorakit.VeloraConfig(init_type="x")
    with pytest.raises(ConfigError, match=r"variant combination: \('use_dora', 'velora_config'\).*keep one"):
        lorakit.LoraConfig(use_dora=True, velora_config={})
    config = lorakit.LoraConfig(target_modules=["emb"], velora_config=lorakit.VeloraConfig())
    with pytest.raises(ConfigError, match="VeLoRA does not support adapting Embedding layers.*leave this layer out"):
        lorakit.get_peft_model(MLP(), config)
    with pytest.raises(TypeError, match="velora_config must be a `VeloraConfig`, a dict, or None"):
        lorakit.LoraConfig(velora_config=3)


def test_a_direct_update_layer_call_takes_the_variant():
    from lorakit.adapters.variants import for_config

    config = lorakit.LoraConfig(velora_config={"num_groups": 2, "init_type": "random"})
    layer = LoraLinear(nn.Linear(6, 4))
    layer.update_layer("a", 2, 2, 0.0, True, variant=for_config(config, "x"))
    assert layer.variants["a"].name == "velora" and layer.lora_velora_embed["a"].shape == (3,)


# -- PEFT interop ----------------------------------------------------------------------------------------------
def _llama(module: type, seed: int = 0) -> nn.Module:
    config = module.LoraConfig(
        target_modules=["q_proj", "v_proj"],
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        velora_config=module.VeloraConfig(num_groups=4, init_type="batch_average"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = module.get_peft_model(tiny_llama(seed), config)
    model.train()
    model(input_ids=input_ids())  # one training forward: the projections hold this batch's average
    perturb_([p for n, p in model.named_parameters() if "lora_" in n], seed=3)
    return model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids(seed=1)).logits


def _embeds(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_velora_embed" in k}


@both_ways
def test_files_load_both_ways_with_equal_outputs_and_projections(writer, reader, tmp_path):
    model = _llama(writer)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = reader.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert (_logits(loaded) - _logits(model)).abs().max() < ATOL
    ours, theirs = _embeds(model), _embeds(loaded)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    assert all(torch.allclose(ours[k], theirs[k]) and ours[k].abs().sum() > 0 for k in ours)


def test_same_file_keys_and_config_as_peft(tmp_path):
    _llama(lorakit).save_pretrained(tmp_path / "lorakit")
    _llama(peft).save_pretrained(tmp_path / "peft")
    shapes = lambda d: {k: tuple(v.shape) for k, v in load_file(d / "adapter_model.safetensors").items()}  # noqa: E731
    assert shapes(tmp_path / "lorakit") == shapes(tmp_path / "peft")
    assert any(k.endswith("q_proj.lora_velora_embed") for k in shapes(tmp_path / "lorakit"))
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")
    loaded = lorakit.LoraConfig.from_pretrained(tmp_path / "peft")
    assert loaded.velora_config == lorakit.VeloraConfig(num_groups=4, init_type="batch_average")
