"""LoRA on nn.Conv1d / Conv2d / Conv3d (lorakit.adapters.conv, lorakit.ops.conv_math): the forward against a dense
reference conv, merge / unmerge, DoRA, grouped convs, several adapters, mixed batches, and interop with HF PEFT
through the adapter files (both directions, same tensors and adapter_config.json)."""

from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch
from helpers import assert_same_adapter_config
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import lorakit
from lorakit.adapters.conv import LoraConv
from lorakit.ops import conv_math

ATOL = 1e-5
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCTIONAL = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# (id, dims, conv kwargs): kernel 3, channels 6 -> 8, with stride / padding / groups where said
CASES = [
    ("conv1d", 1, dict(padding=1)),
    ("conv2d", 2, dict(stride=2, padding=1)),
    ("conv3d", 3, dict(padding=(1, 0, 1))),
    ("conv2d_groups2", 2, dict(padding=1, groups=2)),
]
IDS = [c[0] for c in CASES]


class Net(nn.Module):
    """A conv between two other layers, as in PEFT's test models: the conv is the target."""

    def __init__(self, dims: int, **conv: object) -> None:
        super().__init__()
        self.conv = CONVS[dims](6, 8, 3, **conv)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def base(dims: int, conv: dict) -> Net:
    torch.manual_seed(0)
    return Net(dims, **conv)


def inputs(dims: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 6, *([7] * dims), generator=torch.Generator().manual_seed(1))


def adapted(dims: int, conv: dict, **config: object) -> lorakit.PeftModel:
    """A lorakit model with non-zero A and B (init_lora_weights=False) on the conv, in eval mode."""
    torch.manual_seed(2)
    kwargs = dict(target_modules=["conv"], r=4, lora_alpha=8, init_lora_weights=False) | config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the grouped-conv warning
        return lorakit.get_peft_model(base(dims, conv), lorakit.LoraConfig(**kwargs)).eval()


def layer_of(model: nn.Module) -> LoraConv:
    layer = model.base_model.model.conv
    assert isinstance(layer, LoraConv)
    return layer


# -- the maths (lorakit.ops.conv_math) -------------------------------------------------------------------------------
@pytest.mark.parametrize("dims,groups", [(1, 1), (2, 1), (3, 1), (2, 2), (2, 4)])
def test_delta_weight_is_the_conv_of_B_after_A(dims: int, groups: int) -> None:
    """conv(x, delta_weight(A, B, s)) == s * conv1x1(conv(x, A), B): the two LoRA convs are one conv."""
    g = torch.Generator().manual_seed(0)
    r, k = 4, (3,) * dims
    A = torch.randn(r, 6, *k, generator=g)
    B = torch.randn(8, r // groups, *(1,) * dims, generator=g)
    x = torch.randn(2, 6, *(6,) * dims, generator=g)
    conv = FUNCTIONAL[dims]
    reference = 0.5 * conv(conv(x, A, padding=1), B, groups=groups)
    assert torch.allclose(conv(x, conv_math.delta_weight(A, B, 0.5, groups), padding=1), reference, atol=ATOL)


def test_peft_dora_delta_is_the_update_without_groups() -> None:
    """PEFT's DoRA delta of a conv is s * B @ A for groups=1 (with groups, its own reading: see conv_math)."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 6, 3, 3, generator=g), torch.randn(8, 4, 1, 1, generator=g)
    W = torch.randn(8, 6, 3, 3, generator=g)
    assert torch.allclose(conv_math.peft_dora_delta(A, B, 0.5, W.shape), conv_math.delta_weight(A, B, 0.5), atol=ATOL)


def test_grouped_weights_as_dense_matrices() -> None:
    """A grouped conv equals the dense conv of its block-diagonal weight; dense_to_grouped inverts grouped_to_dense."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 3, 3, 3, generator=g)  # groups=2, 6 input channels
    x = torch.randn(2, 6, 5, 5, generator=g)
    dense = conv_math.grouped_weight_dense(W, 2)
    assert dense.shape == (8, 6, 3, 3)
    assert torch.allclose(F.conv2d(x, dense), F.conv2d(x, W, groups=2), atol=ATOL)
    B = torch.randn(8, 2, generator=g)  # r=4, groups=2
    full = conv_math.grouped_to_dense(B, 2)
    assert full.shape == (8, 4) and full[:4, 2:].abs().sum() == 0 and full[4:, :2].abs().sum() == 0
    assert torch.equal(conv_math.dense_to_grouped(full, 2), B)


# -- the layer -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_is_base_plus_the_dense_reference(case: tuple) -> None:
    """y = conv(x, W) + b + conv(x, s * B @ A) with the base's stride / padding (groups: the dense update)."""
    _, dims, conv = case
    model = adapted(dims, conv)
    layer = layer_of(model)
    x = inputs(dims)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (4, 6, *(3,) * dims) and B.shape == (8, 4 // layer.groups, *(1,) * dims)  # PEFT's layout
    delta = conv_math.delta_weight(A, B, layer.scaling["default"], layer.groups)
    opts = dict(stride=layer.stride, padding=layer.padding)
    reference = layer.base_layer(x) + FUNCTIONAL[dims](x, delta, **opts)
    with torch.no_grad():
        assert torch.allclose(layer(x), reference, atol=ATOL)
        assert not torch.allclose(layer(x), layer.base_layer(x), atol=1e-3)  # the adapter does something


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_round_trip(case: tuple, use_dora: bool) -> None:
    """Merged output == unmerged output; unmerge gives the base weight back within 1e-6; get_delta_weight has the
    base weight's shape; safe_merge is the same merge."""
    _, dims, conv = case
    model = adapted(dims, conv, use_dora=use_dora)
    if use_dora:  # a magnitude away from ||W + dW||, so that DoRA's rescaling shows
        with torch.no_grad():
            layer_of(model).lora_magnitude_vector["default"].weight.mul_(1.5)
    layer = layer_of(model)
    x = inputs(dims)
    W0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        assert layer.get_delta_weight("default").shape == W0.shape
        model.merge_adapter()
        assert layer.merged and not torch.allclose(layer.base_layer.weight, W0)
        assert torch.allclose(model(x), unmerged, atol=ATOL)
        model.unmerge_adapter()
        assert torch.allclose(layer.base_layer.weight, W0, atol=1e-6)
        assert torch.allclose(model(x), unmerged, atol=ATOL)
        layer.merge(safe_merge=True)
        assert torch.allclose(model(x), unmerged, atol=ATOL)
        layer.unmerge()
        merged = model.merge_and_unload()
    assert isinstance(merged.conv, CONVS[dims])
    with torch.no_grad():
        assert torch.allclose(merged(x), unmerged, atol=ATOL)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_dora_forward_is_the_rescaled_conv(dims: int) -> None:
    """DoRA: y = conv(x, (m / ||W + dW||_row) * (W + dW)) + b, the norm over (in, *k) of each output channel."""
    model = adapted(dims, dict(padding=1), use_dora=True)
    layer = layer_of(model)
    m = layer.lora_magnitude_vector["default"].weight
    assert m.shape == (1, 8, *(1,) * dims)  # PEFT's shape
    with torch.no_grad():
        m.mul_(torch.linspace(0.5, 1.5, 8).view(m.shape))
        W = layer.base_layer.weight
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        adapted_w = W + conv_math.delta_weight(A, B, layer.scaling["default"])
        norm = adapted_w.flatten(1).norm(dim=1).view(-1, *(1,) * (dims + 1))
        x = inputs(dims)
        reference = FUNCTIONAL[dims](
            x, m.view(-1, *(1,) * (dims + 1)) / norm * adapted_w, layer.base_layer.bias, padding=1
        )
        assert torch.allclose(layer(x), reference, atol=ATOL)


def test_dropout_in_training_and_not_in_eval() -> None:
    model = adapted(2, dict(padding=1), lora_dropout=0.5)
    x = inputs(2)
    with torch.no_grad():
        eval_out = model(x)
        model.train()
        torch.manual_seed(0)
        train_out = model(x)
    assert not torch.allclose(eval_out, train_out)


def test_several_adapters_disable_delete() -> None:
    """Two adapters: each alone, both active (their updates add up), disable_adapter, delete_adapter."""
    model = adapted(2, dict(padding=1))
    torch.manual_seed(3)
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False))
    layer, x = layer_of(model), inputs(2)
    with torch.no_grad():
        base_out = layer.base_layer(x)
        first = layer(x) - base_out
        model.set_adapter("other")
        second = layer(x) - base_out
        layer.set_adapter(["default", "other"])
        assert torch.allclose(layer(x) - base_out, first + second, atol=ATOL)
        with model.disable_adapter():
            assert torch.allclose(model(x), torch.relu(base_out), atol=ATOL)
        model.delete_adapter("other")
        assert "other" not in layer.lora_A and "other" not in layer.lora_B
        model.set_adapter("default")
        assert torch.allclose(layer(x) - base_out, first, atol=ATOL)


@pytest.mark.parametrize("groups", [1, 2])
def test_mixed_batch_rows_use_their_adapter(groups: int) -> None:
    """adapter_names: each row gives what a batch of that adapter alone gives; '__base__' rows the base model."""
    model = adapted(2, dict(padding=1, groups=groups), use_dora=True)
    torch.manual_seed(3)
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False))
    x = inputs(2, n=4)
    names = ["other", "default", "__base__", "other"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    expected = model(x[i : i + 1])
            else:
                model.set_adapter(name)
                expected = model(x[i : i + 1])
            assert torch.allclose(mixed[i : i + 1], expected, atol=ATOL), name


def test_add_weighted_adapter_cat_is_the_sum_of_the_updates() -> None:
    model = adapted(1, dict(padding=1))
    torch.manual_seed(3)
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False))
    layer = layer_of(model)
    model.add_weighted_adapter(["default", "other"], [0.7, 0.3], "both", combination_type="cat")
    expected = 0.7 * layer.get_delta_weight("default") + 0.3 * layer.get_delta_weight("other")
    assert layer.lora_A["both"].weight.shape == (6, 6, 3)
    assert torch.allclose(layer.get_delta_weight("both"), expected, atol=ATOL)


# -- grouped convs ---------------------------------------------------------------------------------------------------
def test_grouped_conv_refuses_merge_and_a_rank_not_divisible_by_groups() -> None:
    model = adapted(2, dict(padding=1, groups=2))
    layer, x = layer_of(model), inputs(2)
    with torch.no_grad():
        before = model(x)
    W0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="groups=2"):
        model.merge_adapter()
    with pytest.raises(NotImplementedError, match="groups=2"):
        model.merge_and_unload()
    assert torch.equal(layer.base_layer.weight, W0) and not layer.merged
    with torch.no_grad():
        assert torch.allclose(model(x), before)
    with pytest.raises(ValueError, match="Targeting a Conv2d with groups=2 and rank 3"):
        adapted(2, dict(padding=1, groups=2), r=3)


def test_initializers_conv_cannot_take_are_refused() -> None:
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not available for a Conv2d"):
        adapted(2, dict(padding=1), init_lora_weights="pissa")


def test_all_linear_leaves_convs_out() -> None:
    """As in PEFT: target_modules='all-linear' adapts Linear layers, not convs."""

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.lin, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lin(self.conv(x).mean((2, 3))))

    model = lorakit.get_peft_model(Both(), lorakit.LoraConfig(target_modules="all-linear"))
    assert not isinstance(model.base_model.model.conv, LoraConv)
    assert set(model.peft_config["default"].target_modules) == {"lin", "head"}


# -- interop with PEFT -----------------------------------------------------------------------------------------------
INTEROP = [(*c, False) for c in CASES] + [(f"{c[0]}_dora", c[1], c[2], True) for c in CASES]


@pytest.mark.parametrize("case", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_interop_both_ways(case: tuple, tmp_path: Path) -> None:
    """lorakit's folder loaded by PEFT and PEFT's by lorakit give the same outputs within 1e-5; both write the same
    tensor names and shapes and the same adapter_config.json."""
    _, dims, conv, use_dora = case
    kwargs = dict(target_modules=["conv"], r=4, lora_alpha=8, init_lora_weights=False, use_dora=use_dora)
    x = inputs(dims)
    ours = adapted(dims, conv, use_dora=use_dora)
    with torch.no_grad():
        ours_out = ours(x)
    ours.save_pretrained(tmp_path / "ours")
    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base(dims, conv), peft.LoraConfig(**kwargs)).eval()
        theirs.save_pretrained(tmp_path / "theirs")
        peft_loaded = peft.PeftModel.from_pretrained(base(dims, conv), tmp_path / "ours").eval()
        ours_loaded = lorakit.PeftModel.from_pretrained(base(dims, conv), tmp_path / "theirs").eval()
    with torch.no_grad():
        assert torch.allclose(peft_loaded(x), ours_out, atol=ATOL)
        assert torch.allclose(ours_loaded(x), theirs(x), atol=ATOL)
    ours_t = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_t = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_t.items()} == {k: v.shape for k, v in theirs_t.items()}
    assert_same_adapter_config(tmp_path / "ours", tmp_path / "theirs")


# -- the adapter file and the exports ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[IDS[1], IDS[3]])
def test_file_pairs_are_the_update_matrices(case: tuple, tmp_path: Path) -> None:
    """lorakit.io.files.lora_pairs reads a conv's tensors as the matrices of its update (B block-diagonal for
    groups): B @ A * s is the layer's delta weight, flattened."""
    from lorakit.io import files

    _, dims, conv = case
    model = adapted(dims, conv)
    model.save_pretrained(tmp_path)
    tensors, _ = files.read_weights(tmp_path)
    assert files.conv_modules(tensors) == ["conv"]
    A, B = files.lora_pairs(tensors)["conv"]
    layer = layer_of(model)
    expected = conv_math.delta_weight(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 1.0, layer.groups)
    assert A.shape == (4, 6 * 3**dims) and B.shape == (8, 4)
    assert torch.allclose(B @ A, expected.flatten(1), atol=ATOL)


def test_exports_refuse_conv_adapters_clearly(tmp_path: Path) -> None:
    """vLLM and llama.cpp LoRA files adapt matrices only: the problem lists say so and name the conv modules."""
    from lorakit.export.gguf_adapter import gguf_adapter_problems
    from lorakit.export.vllm import vllm_problems
    from lorakit.io import files

    model = adapted(2, dict(padding=1))
    model.save_pretrained(tmp_path)
    tensors, _ = files.read_weights(tmp_path)
    config = model.peft_config["default"]
    vllm = [str(p) for p in vllm_problems(config, tensors)]
    assert any("conv layers" in p and "conv" in p and "--to merged" in p for p in vllm), vllm
    gguf = [str(p) for p in gguf_adapter_problems(config, tensors, "no architecture")]
    assert any("not conv layers" in p and "merged-gguf" in p for p in gguf), gguf


def test_dilation_and_padding_mode_reach_lora_A_so_merging_keeps_the_output() -> None:
    """lora_A takes the base's dilation and padding mode (PEFT's takes neither): the merged conv computes what the
    unmerged layer did."""
    model = adapted(2, dict(padding=2, dilation=2, padding_mode="reflect"))
    layer, x = layer_of(model), inputs(2)
    A = layer.lora_A["default"]
    assert A.dilation == (2, 2) and A.padding_mode == "reflect"
    with torch.no_grad():
        unmerged = model(x)
        assert torch.allclose(model.merge_and_unload()(x), unmerged, atol=ATOL)


def test_add_weighted_adapter_refuses_grouped_convs_and_changes_nothing() -> None:
    model = adapted(2, dict(padding=1, groups=2))
    torch.manual_seed(3)
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["conv"], r=4, init_lora_weights=False))
    for combination_type in ("svd", "cat", "linear"):
        with pytest.raises(NotImplementedError, match="groups=2"):
            model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "both", combination_type=combination_type)
    assert "both" not in model.peft_config and "both" not in layer_of(model).lora_A


@pytest.mark.parametrize("combination_type", ["svd", "cat"])
def test_add_weighted_adapter_svd_and_cat_give_the_weighted_sum(combination_type: str) -> None:
    model = adapted(3, dict(padding=1))
    torch.manual_seed(3)
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False))
    layer = layer_of(model)
    model.add_weighted_adapter(["default", "other"], [0.6, 0.4], "both", combination_type=combination_type, svd_rank=6)
    expected = 0.6 * layer.get_delta_weight("default") + 0.4 * layer.get_delta_weight("other")
    assert torch.allclose(layer.get_delta_weight("both"), expected, atol=ATOL)


def test_lora_bias_on_a_conv_trains_and_merges() -> None:
    """lora_bias=True (LoraLayer's generic part): B's bias trains, the update is s * (B(A(x)) + b), merging adds it."""
    model = adapted(2, dict(padding=1), lora_bias=True)
    model.train()
    layer, x = layer_of(model), inputs(2)
    b = layer.lora_B["default"].bias
    assert b is not None and b.requires_grad and any(p is b for p in layer.adapter_parameters("default"))
    with torch.no_grad():
        b.copy_(torch.linspace(-1, 1, 8))
        model.eval()
        unmerged = model(x)
        assert torch.allclose(model.merge_and_unload()(x), unmerged, atol=ATOL)
