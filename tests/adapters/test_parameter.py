"""LoRA on an nn.Parameter (target_parameters; lorakit.adapters.parameter, lorakit.ops.param_delta, the MoE rewrite of
lorakit.adapters.moe): the per-expert update against a dense reference written with explicit indices, forward and
gradients against the dense weight swapped in, merge round trip, several adapters / disable / delete, the refusals,
and PEFT interop both ways (files, outputs within 1e-5, adapter_config.json key by key) on a tiny custom module with a
2-D parameter and on tiny transformers 5 mixtures of experts (Mixtral: (E, out, in); GPT-OSS: (E, in, out))."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import assert_same_adapter_config
from torch import nn
from torch.func import functional_call

import lorakit
from lorakit.adapters import moe
from lorakit.adapters.parameter import LoraParameter, ParameterError
from lorakit.ops import param_delta
from lorakit.ops.param_delta import Layout

ATOL = 1e-5


# -- the maths -------------------------------------------------------------------------------------------------------
def _dense_delta(A: torch.Tensor, B: torch.Tensor, s: float, experts: int, layout: Layout) -> torch.Tensor:
    """The reference: expert e owns rows e*r .. e*r+r-1 of A and columns e, e+E, e+2E, ... of B (PEFT's layout)."""
    r = A.shape[0] // experts
    deltas = [s * B[:, e::experts] @ A[e * r:(e + 1) * r] for e in range(experts)]  # each (out, in)
    if layout is Layout.OUT_IN:
        return deltas[0]
    stack = torch.stack(deltas)  # (E, out, in)
    return stack if layout is Layout.EXPERTS_OUT_IN else stack.transpose(1, 2)


@pytest.mark.parametrize("experts, layout", [(1, Layout.OUT_IN), (3, Layout.EXPERTS_OUT_IN), (3, Layout.EXPERTS_IN_OUT),
                                             (1, Layout.EXPERTS_OUT_IN)])
def test_delta_weight_equals_the_dense_reference(experts, layout):
    gen = torch.Generator().manual_seed(0)
    r, d_in, d_out = 2, 5, 7
    A, B = torch.randn(r * experts, d_in, generator=gen), torch.randn(d_out, r * experts, generator=gen)
    got = param_delta.delta_weight(A, B, 0.5, experts, layout)
    torch.testing.assert_close(got, _dense_delta(A, B, 0.5, experts, layout))
    shape = {Layout.OUT_IN: (d_out, d_in), Layout.EXPERTS_OUT_IN: (experts, d_out, d_in),
             Layout.EXPERTS_IN_OUT: (experts, d_in, d_out)}[layout]
    assert got.shape == shape
    assert param_delta.dims(shape, layout) == (experts, d_in, d_out)


def test_layout_of_a_parameter():
    assert param_delta.layout_of((4, 3), is_transposed=False) is Layout.OUT_IN
    assert param_delta.layout_of((2, 4, 3), is_transposed=False) is Layout.EXPERTS_OUT_IN
    assert param_delta.layout_of((2, 4, 3), is_transposed=True) is Layout.EXPERTS_IN_OUT
    with pytest.raises(ValueError, match="2-D weight .* or a 3-D expert stack"):
        param_delta.layout_of((4,), is_transposed=False)


# -- tiny custom modules that compute with a bare parameter ------------------------------------------------------------
class Gate(nn.Module):
    """A 2-D weight (out, in) used directly, not through an nn.Linear."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight.T) * self.scale  # (N, d)


class Experts(nn.Module):
    """E expert weights in one parameter, row n of the input goes to expert idx[n]; (E, out, in), or (E, in, out)
    with ``is_transposed`` (as transformers 5's experts say)."""

    def __init__(self, experts: int = 3, d_in: int = 6, d_out: int = 4, is_transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = is_transposed
        shape = (experts, d_in, d_out) if is_transposed else (experts, d_out, d_in)
        self.up = nn.Parameter(torch.randn(*shape) / d_in**0.5)
        self.down = nn.Parameter(torch.randn(experts, d_in, d_out) / d_out**0.5)  # (E, out=d_in, in=d_out)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        up = self.up[idx]  # (N, out, in) or (N, in, out)
        h = torch.einsum("nio,ni->no", up, x) if self.is_transposed else torch.einsum("noi,ni->no", up, x)
        return torch.einsum("noi,ni->no", self.down[idx], torch.relu(h))  # (N, d_in)


class Net(nn.Module):
    def __init__(self, is_transposed: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.gate = Gate()
        self.experts = Experts(is_transposed=is_transposed)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(self.gate(x), idx))


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(5, 6, generator=gen), torch.tensor([0, 2, 1, 2, 0])


TARGETS = ["gate.weight", "experts.up", "experts.down"]


def _adapted(is_transposed: bool = False, **config: object) -> lorakit.PeftModel:
    torch.manual_seed(3)
    kwargs = dict(r=2, lora_alpha=4, target_parameters=TARGETS, init_lora_weights=False)
    return lorakit.get_peft_model(Net(is_transposed), lorakit.LoraConfig(**{**kwargs, **config}))


def _layers(model: nn.Module) -> dict[str, LoraParameter]:
    return {f"{n}:{m.parameter_name}": m for n, m in model.named_modules() if isinstance(m, LoraParameter)}


def _reference(model: nn.Module, names: list[str], is_transposed: bool = False) -> Net:
    """The base Net with every adapted parameter replaced by W + the dense reference updates of ``names``."""
    ref = Net(is_transposed)
    for layer in _layers(model).values():
        owner = {"weight": ref.gate, "up": ref.experts, "down": ref.experts}[layer.parameter_name]
        delta = sum(_dense_delta(*layer.lora_weights(n), layer.scaling[n], layer.num_experts, layer.layout)
                    for n in names)
        with torch.no_grad():
            getattr(owner, layer.parameter_name).add_(delta)
    return ref


@pytest.mark.parametrize("is_transposed", [False, True], ids=["out_in", "in_out"])
def test_forward_equals_the_dense_reference(is_transposed):
    model = _adapted(is_transposed)
    layers = _layers(model)
    experts_layout = Layout.EXPERTS_IN_OUT if is_transposed else Layout.EXPERTS_OUT_IN
    assert {k: (m.num_experts, m.layout) for k, m in layers.items()} == {
        "base_model.model.gate:weight": (1, Layout.OUT_IN),
        "base_model.model.experts.base_layer:up": (3, experts_layout),
        "base_model.model.experts:down": (3, experts_layout),
    }
    x, idx = _inputs()
    with torch.no_grad():
        got = model(x, idx)
        base = Net(is_transposed)(x, idx)
        expected = _reference(model, ["default"], is_transposed)(x, idx)
    assert (got - base).abs().max() > 1e-3, "the adapter must change the output, or the test is void"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


def test_gradients_equal_autograd_through_the_dense_weight():
    model = _adapted()
    x, idx = _inputs()
    model(x, idx).square().sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{p}.lora_{ab}.default.weight" for ab in "AB"
                         for p in ("gate", "experts.base_layer", "experts")}
    # reference: A and B as leaves, W + dense delta swapped into a plain Net
    ref = Net()
    leaves, swapped = {}, {}
    for key, layer in _layers(model).items():
        A, B = (w.detach().clone().requires_grad_() for w in layer.lora_weights("default"))
        leaves[key] = (A, B, layer)
        path = {"weight": "gate.weight", "up": "experts.up", "down": "experts.down"}[layer.parameter_name]
        swapped[path] = getattr(ref.get_submodule(path.rpartition(".")[0]), layer.parameter_name) + _dense_delta(
            A, B, layer.scaling["default"], layer.num_experts, layer.layout)
    functional_call(ref, swapped, (x, idx)).square().sum().backward()
    for A, B, layer in leaves.values():
        got_A, got_B = layer.lora_weights("default")
        torch.testing.assert_close(got_A.grad, A.grad, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(got_B.grad, B.grad, atol=ATOL, rtol=1e-4)


def test_merge_round_trip_and_merge_and_unload():
    model = _adapted()
    x, idx = _inputs()
    before = {n: p.detach().clone() for n, p in Net().named_parameters()}
    with torch.no_grad():
        expected = model(x, idx)
        model.merge_adapter()
        assert all(m.merged for m in _layers(model).values())
        torch.testing.assert_close(model(x, idx), expected, atol=ATOL, rtol=1e-5)
        model.unmerge_adapter()
        inner = model.base_model.model
        torch.testing.assert_close(inner.experts.base_layer.base_layer.up, before["experts.up"], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x, idx), expected, atol=ATOL, rtol=1e-5)
        merged = model.merge_and_unload()
    assert type(merged.experts) is Experts and type(merged.gate) is Gate, "unloading restores the modules"
    assert sorted(merged.state_dict()) == sorted(Net().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x, idx), expected, atol=ATOL, rtol=1e-5)


def test_several_adapters_disable_and_delete():
    model = _adapted()
    model.add_adapter("other", lorakit.LoraConfig(r=3, lora_alpha=3, target_parameters=TARGETS,
                                                  init_lora_weights=False))
    assert all(m._all_available_adapter_names() == ["default", "other"] for m in _layers(model).values())
    x, idx = _inputs()
    with torch.no_grad():
        base = Net()(x, idx)
        one = model(x, idx)
        torch.testing.assert_close(one, _reference(model, ["default"])(x, idx), atol=ATOL, rtol=1e-5)
        model.base_model.set_adapter(["default", "other"])
        both = model(x, idx)
        torch.testing.assert_close(both, _reference(model, ["default", "other"])(x, idx), atol=ATOL, rtol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(x, idx), base, atol=ATOL, rtol=1e-5)
        model.delete_adapter("default")
        torch.testing.assert_close(model(x, idx), _reference(model, ["other"])(x, idx), atol=ATOL, rtol=1e-5)
        assert all(list(m.r) == ["other"] for m in _layers(model).values())


def test_gaussian_init_draws_each_expert_as_peft_does():
    """'gaussian': A ~ N(0, 1/r^2) per expert (PEFT's std is 1 / r whatever E), B = 0 (the model starts unchanged)."""
    torch.manual_seed(0)
    net = nn.Module()
    net.experts = Experts(experts=64, d_in=32)
    config = lorakit.LoraConfig(r=4, target_parameters=["experts.up"], init_lora_weights="gaussian")
    layer = _layers(lorakit.get_peft_model(net, config))["base_model.model.experts:up"]
    A, B = layer.lora_weights("default")
    assert A.shape == (4 * 64, 32) and not B.any()
    assert abs(A.std().item() - 1 / 4) < 0.01


def test_refusals_name_the_fix():
    with pytest.raises(lorakit.TargetError, match="'experts.upp' matched nothing; did you mean 'experts.up'"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_parameters=["experts.upp"]))
    with pytest.raises(ParameterError, match="lora_dropout=0.1: .* set lora_dropout=0"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_parameters=TARGETS, lora_dropout=0.1))
    with pytest.raises(ParameterError, match="DoRA"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_parameters=TARGETS, use_dora=True))
    with pytest.raises(ParameterError, match="init_lora_weights='pissa'.* use True"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_parameters=TARGETS, init_lora_weights="pissa"))
    with pytest.raises(lorakit.TargetError, match="of layer 'head' of type Linear, which is not a valid target. "
                       "Module 'head' is named by target_modules and owns a parameter"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_modules=["head"], target_parameters=["head.weight"]))
    wrapped = lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_modules=["head"]))
    with pytest.raises(lorakit.TargetError, match="of layer 'head' of type Linear, .* 'head.weight' belongs to 'head', "
                       "which target_modules wraps already"):
        wrapped.add_adapter("other", lorakit.LoraConfig(target_parameters=["head.weight"]))
    with pytest.raises(lorakit.ConfigError, match="must be a list of parameter names"):
        lorakit.LoraConfig(target_parameters="experts.up")
    model = _adapted()
    with pytest.raises(lorakit.TargetError, match="all adapters must target the same set of parameters"):
        model.add_adapter("other", lorakit.LoraConfig(target_parameters=["experts.up"]))
    with pytest.raises(ParameterError, match="mixed-adapter batch"):
        model.eval()(*_inputs(), adapter_names=["default"] * 5)


def test_a_parameter_of_the_model_itself_is_refused():
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    with pytest.raises(lorakit.TargetError, match="on the top-level module is not supported .parameter .weight.."):
        lorakit.get_peft_model(Bare(), lorakit.LoraConfig(target_parameters=["weight"]))


# -- PEFT interop ------------------------------------------------------------------------------------------------------
def _mixtral(seed: int = 0) -> nn.Module:
    config = transformers.MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config).eval()


def _gpt_oss(seed: int = 0) -> nn.Module:
    config = transformers.GptOssConfig(vocab_size=100, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                       num_experts_per_tok=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.GptOssForCausalLM(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 99, (2, 8), generator=torch.Generator().manual_seed(0))


CASES = {
    "custom_2d_and_experts": (Net, dict(target_parameters=TARGETS), lambda: _inputs()),
    "mixtral_experts": (_mixtral, dict(target_modules=["q_proj"],
                                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
                        lambda: (_ids(),)),
    "mixtral_all_linear": (_mixtral, dict(target_modules="all-linear"), lambda: (_ids(),)),
    "gpt_oss_transposed_experts": (_gpt_oss, dict(target_modules=[], target_parameters=["experts.gate_up_proj",
                                                                                         "experts.down_proj"]),
                                   lambda: (_ids(),)),
}


def _out(model: nn.Module, inputs: tuple) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", CASES)
def test_files_move_both_ways_with_peft(case, tmp_path: Path):
    build, targets, inputs = CASES[case]
    kwargs = dict(r=2, lora_alpha=4, init_lora_weights=False, **targets)
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(build(), lorakit.LoraConfig(**copy.deepcopy(kwargs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(), peft.LoraConfig(**copy.deepcopy(kwargs)))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict()), "PEFT's nesting and keys"
    with torch.no_grad():  # the same adapter in both, then each library's forward
        mine = ours.state_dict()
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(mine[name])
    x = inputs()
    expected = _out(ours, x)
    with ours.disable_adapter():
        assert (_out(ours, x) - expected).abs().max() > 1e-4, "the adapter must matter, or the test is void"
    torch.testing.assert_close(_out(theirs, x), expected, atol=ATOL, rtol=1e-5)
    ours.save_pretrained(tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(build(), tmp_path / "lorakit")
    in_lorakit = lorakit.PeftModel.from_pretrained(build(), tmp_path / "peft")
    torch.testing.assert_close(_out(in_peft, x), expected, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(_out(in_lorakit, x), expected, atol=ATOL, rtol=1e-5)


def test_merged_weights_equal_peft_s():
    kwargs = dict(r=2, lora_alpha=4, init_lora_weights=False, target_modules=[],
                  target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(_gpt_oss(), lorakit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(_gpt_oss(), peft.LoraConfig(**kwargs))
    mine = ours.state_dict()
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(mine[name])
    got, ref = ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    assert sorted(got) == sorted(ref) == sorted(_gpt_oss().state_dict())
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=1e-5, msg=key)


# -- the MoE rewrite (lorakit.adapters.moe) ----------------------------------------------------------------------------
def test_the_moe_table_is_transformers_and_peft_s():
    """The model types PEFT 0.21.2 rewrites: transformers' conversion patterns 'mixtral' / 'qwen2_moe' (and mixtral
    itself, which PEFT adds), for which transformers has a checkpoint conversion."""
    from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN as patterns
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    expected = {t: p for t, p in patterns.items()
                if p in ("mixtral", "qwen2_moe") and get_checkpoint_conversion_mapping(t) is not None}
    assert moe.FAMILIES == expected


@pytest.mark.parametrize("target_modules", [["w1", "w2", "w3", "q_proj"], ".*\\.(q_proj|w1|w3)", "all-linear"],
                         ids=["list", "regex", "all_linear"])
def test_a_mixtral_config_is_rewritten_as_peft_rewrites_it(target_modules, tmp_path: Path):
    kwargs = dict(r=2, lora_alpha=4, target_modules=target_modules)
    ours = lorakit.get_peft_model(_mixtral(), lorakit.LoraConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_mixtral(), peft.LoraConfig(**kwargs))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.save_pretrained(tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")


def test_half_of_a_fused_pair_is_refused():
    with pytest.raises(ValueError, match="names w1 but not w3: .* one fused parameter, gate_up_proj"):
        lorakit.get_peft_model(_mixtral(), lorakit.LoraConfig(target_modules=["w1", "q_proj"]))


def test_layer_status_as_peft_s():
    kwargs = dict(r=2, lora_alpha=4, target_parameters=TARGETS)
    ours = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**kwargs)).get_layer_status()
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(**kwargs)).get_layer_status()
    assert sorted((s.name, s.module_type) for s in ours) == sorted((s.name, s.module_type) for s in theirs)
    assert {s.module_type for s in ours} == {"lora.ParamWrapper"}


def test_a_parametrized_parameter_gets_the_update_after_its_parametrization():
    """W' = P(W) + delta, as PEFT stacks its update on an existing parametrization; unloading leaves P(W); merging is
    refused (the weight is computed, there is nothing stored to merge into)."""

    class PlusOne(nn.Module):
        def forward(self, X: torch.Tensor) -> torch.Tensor:
            return X + 1

    net = nn.Module()
    net.gate = Gate()
    nn.utils.parametrize.register_parametrization(net.gate, "weight", PlusOne())
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parametrized = net.gate(x)
    expected_weight = net.gate.weight.detach().clone()
    model = lorakit.get_peft_model(net, lorakit.LoraConfig(r=2, lora_alpha=4, target_parameters=["gate.weight"],
                                                           init_lora_weights=False))
    layer = _layers(model)["base_model.model.gate:weight"]
    A, B = layer.lora_weights("default")
    expected_weight += layer.scaling["default"] * B.detach() @ A.detach()
    with torch.no_grad():
        got = model.base_model.model.gate(x)
        torch.testing.assert_close(got, torch.tanh(x @ expected_weight.T) * net.gate.scale, atol=ATOL, rtol=1e-5)
        with pytest.raises(ParameterError, match="parametrized .* keep the adapter unmerged"):
            model.merge_adapter()
        assert len(model.base_model.model.gate.base_layer.parametrizations["weight"]) == 1, "the update's is gone"
        torch.testing.assert_close(model.unload().gate(x), parametrized)


def test_add_weighted_adapter_is_refused_as_in_peft():
    model = _adapted()
    with pytest.raises(ValueError, match="add_weighted_adapter does not support targeting nn.Parameter"):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")
    assert "combined" not in model.peft_config


def test_targeted_parameter_names_as_peft_s():
    kwargs = dict(r=2, target_parameters=TARGETS)
    ours = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(**kwargs))
    assert ours.targeted_parameter_names == theirs.targeted_parameter_names == [
        "gate.weight", "experts.up", "experts.down"]


def test_exports_to_engines_refuse_lora_on_parameters_and_name_the_merged_export():
    from lorakit.export.gguf_adapter import gguf_adapter_problems
    from lorakit.export.vllm import vllm_problems

    config = lorakit.LoraConfig(target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])
    (problem,) = vllm_problems(config)
    assert "target_parameters" in problem.rule and "--to merged" in problem.fix
    problems = [p for p in gguf_adapter_problems(config, {}, "no base named") if "target_parameters" in p.rule]
    assert len(problems) == 1 and "merged-gguf" in problems[0].fix


def test_info_names_the_parameters(tmp_path: Path):
    from lorakit.commands import info

    model = lorakit.get_peft_model(_mixtral(), lorakit.LoraConfig(r=2, target_modules="all-linear"))
    model.save_pretrained(tmp_path)
    report = info.adapter_info(tmp_path)
    assert report["targets"]["experts"] == 4 and "base_layer" not in report["targets"]  # 2 layers x 2 parameters
    assert "parameters      down_proj, gate.weight, gate_up_proj (target_parameters" in info.format_info(report)
