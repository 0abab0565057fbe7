"""Initializers against dense references, the model output at step 0, and the conversion maths (adapters.convert).

The references are independent of the code under test: float64 SVD for PiSSA (Eckart-Young), a least-squares projector
for OLoRA, plain matrix products for the rank-2r conversion.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import input_ids, tiny_gpt2, tiny_llama
from torch import Tensor

import lorakit
from lorakit.adapters import convert, state
from lorakit.adapters.kinds import wrap
from lorakit.config import ConfigError
from lorakit.io.files import AdapterFileError
from lorakit.ops import init

OUT, IN, R = 24, 16, 4


def _weight(seed: int = 0, out_f: int = OUT, in_f: int = IN) -> Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def _spectrum_weight(seed: int = 0) -> Tensor:
    """(OUT, IN) with singular values 10, 8, 6, 4 then 0.05 ...: a clear gap after rank R, so a randomized SVD finds
    the same top-R subspace."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(OUT, IN, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(IN, IN, generator=gen, dtype=torch.float64))
    S = torch.tensor([10.0, 8.0, 6.0, 4.0] + [0.05 / (i + 1) for i in range(IN - R)], dtype=torch.float64)
    return (U * S) @ V.T


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# -- PiSSA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", [2.0, 0.5, 8 / math.sqrt(R)])  # alpha/r > 1, < 1, and an rsLoRA value
def test_pissa_is_the_best_rank_r_approximation(scaling):
    W = _weight()
    A, B, residual = init.pissa(W, R, scaling)
    assert A.shape == (R, IN) and B.shape == (OUT, R) and residual.shape == W.shape
    assert _max_diff(residual + scaling * B @ A, W) < 1e-5

    # Eckart-Young: s * B @ A is U_r diag(S_r) V_r^T, and the residual's norm is the norm of the tail singular values
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    best = (U[:, :R] * S[:R]) @ Vh[:R]
    assert _max_diff(scaling * B @ A, best) < 1e-5
    assert abs(torch.linalg.matrix_norm(residual.double()).item() - S[R:].norm().item()) < 1e-5
    # sqrt(S_r / s) is split evenly between A and B, as PEFT does: A A^T = B^T B = diag(S_r / s)
    torch.testing.assert_close(A @ A.T, torch.diag(S[:R].float() / scaling), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(B.T @ B, torch.diag(S[:R].float() / scaling), atol=1e-4, rtol=1e-5)


def test_pissa_niter_is_close_to_exact_pissa():
    W = _spectrum_weight().float()
    exact = init.pissa(W, R, 2.0)
    torch.manual_seed(0)
    fast = init.get_initializer("pissa_niter_4")(W, R, 2.0)
    assert _max_diff(fast.residual + 2.0 * fast.B @ fast.A, W) < 1e-5  # exact split whatever the SVD
    assert _max_diff(fast.B @ fast.A, exact.B @ exact.A) < 1e-4
    assert _max_diff(fast.residual, exact.residual) < 1e-4
    # niter=0 is a cruder approximation: the comparison above can tell them apart
    torch.manual_seed(0)
    crude = init.get_initializer("pissa_niter_0")(_weight(), R, 2.0)
    assert _max_diff(crude.B @ crude.A, init.pissa(_weight(), R, 2.0).B @ init.pissa(_weight(), R, 2.0).A) > 1e-3


# -- OLoRA ---------------------------------------------------------------------------------------------------------
def test_olora_is_the_qr_projection_onto_the_first_r_columns():
    W = _weight(1)
    A, B, residual = init.olora(W, R, 2.0)
    assert _max_diff(residual + 2.0 * B @ A, W) < 1e-5
    torch.testing.assert_close(B.T @ B, torch.eye(R), atol=1e-5, rtol=0)  # orthonormal columns
    assert A.tril(-1).abs().max().item() == 0  # R[:r] is upper trapezoidal
    # B @ A = Q_r Q_r^T W: W projected onto the span of its first r columns (float64 least squares reference)
    Wd = W.double()
    first = Wd[:, :R]
    projector = first @ torch.linalg.pinv(first)
    assert _max_diff(B @ A, projector @ Wd) < 1e-5


# -- orthogonal ----------------------------------------------------------------------------------------------------
def test_orthogonal_starts_at_zero_with_nonzero_factors():
    torch.manual_seed(0)
    A, B, residual = init.orthogonal(_weight(), 6, 2.0)
    assert residual is None
    assert A.shape == (6, IN) and B.shape == (OUT, 6)
    assert A.abs().max() > 1e-2 and B.abs().max() > 1e-2
    assert (B @ A).abs().max().item() < 1e-6  # B's rows are orthogonal to A's columns
    # each factor has rank r/2: A's columns and B's rows live in two orthogonal r/2-dim subspaces of R^r
    assert torch.linalg.matrix_rank(A).item() == 3 and torch.linalg.matrix_rank(B).item() == 3
    torch.manual_seed(0)
    again = init.orthogonal(_weight(), 6, 2.0)
    assert torch.equal(again.A, A) and torch.equal(again.B, B)  # drawn from the global RNG


def test_orthogonal_refuses_an_odd_rank():
    with pytest.raises(ValueError, match=r"rank to be even, got 3 instead"):
        init.orthogonal(_weight(), 3, 1.0)


# -- common rules --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_decompositions_keep_the_dtype_and_compute_in_fp32(name):
    W = _weight().to(torch.bfloat16)
    A, B, residual = init.get_initializer(name)(W, R, 2.0)
    assert residual.dtype == torch.bfloat16 and A.dtype == B.dtype == torch.float32
    reference = init.get_initializer(name)(W.float(), R, 2.0)  # the same maths on the fp32 copy
    assert torch.equal(residual, reference.residual.to(torch.bfloat16))
    assert _max_diff(residual.float() + 2.0 * B @ A, W.float()) < 0.05  # bf16 rounding of the residual only


@pytest.mark.parametrize("name", ["pissa", "pissa_niter_2", "olora"])
def test_decompositions_reject_a_rank_above_the_weight_rank(name):
    with pytest.raises(ValueError, match=r"r <= min\(out, in\) = 16 .* got r=17; lower r"):
        init.get_initializer(name)(_weight(), 17, 1.0)


def test_decompositions_reject_integer_weights():
    with pytest.raises(TypeError, match="floating-point base weight"):
        init.pissa(torch.ones(OUT, IN, dtype=torch.int8), R, 1.0)


def test_names_pattern_and_case():
    assert init.is_known("pissa_niter_16") and init.is_known(True) and init.is_known("OLoRA")  # PEFT's spelling
    assert init.get_initializer("OLoRA") is init.olora
    for bad in ("pissa_niter_", "pissa_niter_x", "pissa_niter_-1", "svd", 3, None):
        assert not init.is_known(bad)
    with pytest.raises(ValueError, match="pissa_niter_<K>"):
        init.get_initializer("pissa_niter_x")
    assert init.mutates_base("pissa") and init.mutates_base("pissa_niter_4") and init.mutates_base("olora")
    assert not (init.mutates_base("orthogonal") or init.mutates_base(True) or init.mutates_base("gaussian"))


def test_config_accepts_the_new_names():
    for name in ("pissa", "pissa_niter_4", "olora", "orthogonal", "Gaussian"):
        assert lorakit.LoraConfig(init_lora_weights=name).init_lora_weights == name
    with pytest.raises(ConfigError, match=r"init_lora_weights='pissa_niter_four' is unknown.*pissa_niter_<K>"):
        lorakit.LoraConfig(init_lora_weights="pissa_niter_four")


def test_layer_applies_the_residual_and_keeps_its_output():
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT)
    original = base.weight.detach().clone()
    x = torch.randn(3, IN)
    expected = base(x)
    layer = wrap(base)
    layer.update_layer("default", R, 8, 0.0, init_lora_weights="pissa")
    layer.active_adapters = ["default"]
    A, B = layer.lora_weights("default")
    reference = init.pissa(original, R, 2.0)
    assert torch.equal(A, reference.A) and torch.equal(B, reference.B)
    assert torch.equal(layer.base_layer.weight, reference.residual)
    assert _max_diff(layer(x), expected) < 1e-5


# -- the whole model at step 0 -------------------------------------------------------------------------------------
STEP0 = ["kaiming", "gaussian", "pissa", "pissa_niter_2", "olora", "orthogonal", True]
# the llama's embed_tokens takes the default embedding init (A = 0, base kept) whatever the name, as in PEFT
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"]


@pytest.mark.parametrize("name", STEP0, ids=str)
@pytest.mark.parametrize("factory, targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_every_initializer_keeps_the_model_output_at_step_0(name, factory, targets):
    base = factory(0)
    with torch.no_grad():
        expected = base(input_ids()).logits
    model = lorakit.get_peft_model(
        factory(0), lorakit.LoraConfig(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=name)
    )
    with torch.no_grad():
        assert _max_diff(model(input_ids()).logits, expected) < 1e-5
        changed = max(
            _max_diff(p, base.state_dict()[k.replace(".base_layer", "")])
            for k, p in model.get_base_model().state_dict().items()
            if k.endswith("base_layer.weight") and "embed" not in k
        )
    assert (changed > 1e-3) == init.mutates_base(name)  # the residual base is really different for PiSSA / OLoRA


# -- conversion maths ----------------------------------------------------------------------------------------------
def test_difference_factors_equal_the_difference_of_updates():
    gen = torch.Generator().manual_seed(3)
    A, A0 = torch.randn(R, IN, generator=gen), torch.randn(R, IN, generator=gen)
    B, B0 = torch.randn(OUT, R, generator=gen), torch.randn(OUT, R, generator=gen)
    A2, B2 = convert.difference_factors(A, B, A0, B0)
    assert A2.shape == (2 * R, IN) and B2.shape == (OUT, 2 * R)
    assert _max_diff(B2 @ A2, B @ A - B0 @ A0) < 1e-5


def test_converted_config_keeps_every_scaling():
    config = lorakit.LoraConfig(
        target_modules=["q_proj", "v_proj"],
        r=4,
        lora_alpha=8,
        init_lora_weights="pissa",
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 3.0},
    )
    new = convert.converted_config(config)
    assert (new.r, new.lora_alpha, new.init_lora_weights) == (8, 16, True)
    assert new.rank_pattern == {"v_proj": 4} and new.alpha_pattern == {"q_proj": 6.0}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.x"):
        before = config.alpha_for(module) / config.rank_for(module)
        assert new.alpha_for(module) / new.rank_for(module) == before
    rs = lorakit.LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights="olora")
    rs_new = convert.converted_config(rs)
    assert rs_new.lora_alpha / math.sqrt(rs_new.r) == pytest.approx(8 / math.sqrt(4), rel=1e-12)
    assert config.init_lora_weights == "pissa" and config.r == 4  # the input is not changed


@pytest.mark.parametrize("pattern", [{"rank_pattern": {"q_proj": 2}}, {"alpha_pattern": {"q_proj": 2.0}}])
def test_converted_config_refuses_rslora_with_patterns(pattern):
    with pytest.warns(UserWarning, match="you won't be able to pass `path_initial_model_for_weight_conversion`"):
        config = lorakit.LoraConfig(r=4, use_rslora=True, init_lora_weights="pissa", **pattern)
    with pytest.raises(ValueError, match="together with `use_rslora=True`"):
        convert.converted_config(config)


# -- save_pretrained(path_initial_model_for_weight_conversion=...) within lorakit ---------------------------------
def _pissa_model(**options) -> lorakit.PeftModel:
    config = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights="pissa")
    return lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(**{**config, **options}))


def _train_(model: torch.nn.Module, seed: int = 1) -> None:
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(n for n, p in params.items() if p.requires_grad):
            params[name].add_(torch.randn(params[name].shape, generator=gen) * 0.1)


def test_converted_adapter_reproduces_the_trained_model_on_the_original_base(tmp_path):
    model = _pissa_model()
    model.save_pretrained(tmp_path / "init")
    _train_(model)
    with torch.no_grad():
        expected = model(input_ids()).logits
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert model.peft_config["default"].init_lora_weights == "pissa" and model.peft_config["default"].r == 4

    converted = lorakit.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "converted")
    assert converted.peft_config["default"].r == 8 and converted.peft_config["default"].init_lora_weights is True
    with torch.no_grad():
        assert _max_diff(converted(input_ids()).logits, expected) < 1e-5
        # the unconverted adapter on the original base is a different model: the conversion is what makes it fit
        plain = lorakit.get_peft_model(
            tiny_llama(0), lorakit.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
        )
        state.load_adapter_state_dict(plain, lorakit.io.files.read_weights(tmp_path / "plain")[0], "default", "plain")
        assert _max_diff(plain(input_ids()).logits, expected) > 1e-3


def test_non_default_adapter_finds_its_initial_sub_folder(tmp_path):
    model = _pissa_model()
    other = lorakit.LoraConfig(target_modules=["o_proj"], r=2, lora_alpha=2, init_lora_weights="olora")
    model.add_adapter("other", other)
    model.save_pretrained(tmp_path / "init")  # default in init/, other in init/other/
    _train_(model)
    model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")

    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out" / "other")
    assert loaded.peft_config["default"].r == 4
    trained = model.get_base_model().model.layers[0].self_attn.o_proj  # residual base + other's update
    got = loaded.get_base_model().model.layers[0].self_attn.o_proj  # original base + converted update
    with torch.no_grad():
        assert torch.equal(got.base_layer.weight, tiny_llama(0).model.layers[0].self_attn.o_proj.weight)
        assert _max_diff(trained.base_layer.weight, got.base_layer.weight) > 1e-3
        expected = trained.base_layer.weight + trained.delta_weight("other")
        assert _max_diff(got.base_layer.weight + got.delta_weight("default"), expected) < 1e-5

    # PEFT's layout: the folder passed holds the adapter's files itself (no sub-folder named after it)
    init_dir = tmp_path / "init" / "other"
    model.save_pretrained(
        tmp_path / "direct", selected_adapters=["other"], path_initial_model_for_weight_conversion=init_dir
    )
    direct, via_sub_folder = (lorakit.io.files.read_weights(tmp_path / d / "other")[0] for d in ("direct", "out"))
    assert direct.keys() == via_sub_folder.keys()
    assert all(torch.equal(direct[k], via_sub_folder[k]) for k in direct)


def test_missing_initial_adapter_says_what_to_do(tmp_path):
    model = _pissa_model()
    with pytest.raises(
        AdapterFileError, match="save the adapter there with save_pretrained right after get_peft_model"
    ):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "nothing")


def test_initial_adapter_of_another_rank_is_refused(tmp_path):
    _pissa_model(r=2).save_pretrained(tmp_path / "init")
    with pytest.raises(AdapterFileError, match=r"has shape \(2, 32\), not \(4, 32\).*same config"):
        _pissa_model().save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")


def test_conversion_of_a_random_start_warns(tmp_path):
    config = lorakit.LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights=False)
    model = lorakit.get_peft_model(tiny_llama(0), config)
    model.save_pretrained(tmp_path / "init")
    with pytest.warns(UserWarning, match="does not reproduce this model"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
