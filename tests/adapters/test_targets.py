"""adapters/targets.py: the target-matching rules, the same for injection and for PEFT's check_target_module_exists;
the condensed target lists; the errors and warnings of an injection that matches too little; the structural key
prefixes of adapter state."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, get_peft_model
from lorakit.adapters import state
from lorakit.adapters.targets import (
    Excluded,
    NoMatchingPeftModuleError,
    TargetError,
    check_target_module_exists,
    layer_index,
    minimal_suffixes,
    unmatched_pattern_keys,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.v_proj = nn.Linear(4, 4)


class Stack(nn.Module):
    """model.layers.{0,1,2}.{q_proj,v_proj} and a head."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Block() for _ in range(n)])
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.model.layers:
            x = block.v_proj(block.q_proj(x))
        return self.head(x)


def wrapped(model: nn.Module) -> list[str]:
    return [n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)]


@pytest.mark.parametrize(
    ("key", "config", "expected"),
    [
        ("foo", dict(target_modules=[]), False),
        ("a.foo", dict(target_modules=["foo"]), True),
        ("a.xfoo", dict(target_modules=["foo"]), False),  # a suffix ends at a dot
        ("foo.bar", dict(target_modules="fo.*"), True),  # a regex matches the whole name
        ("xfoo", dict(target_modules="foo"), False),
        ("m.layers.1.q", dict(target_modules=["q"], layers_to_transform=[1], layers_pattern="layers"), True),
        ("m.layers.1.q", dict(target_modules=["q"], layers_to_transform=1, layers_pattern="layers"), True),
        ("m.layers.1.q", dict(target_modules=["q"], layers_to_transform=[0], layers_pattern="layers"), False),
        ("m.layers.1.q", dict(target_modules=["q"], layers_to_transform=[0], layers_pattern=""), False),
        ("m.layers.1.q", dict(target_modules=["q"], layers_to_transform=[]), True),  # [] selects every layer
        ("x.q", dict(target_modules=["q"], layers_to_transform=[0]), False),  # no layer index at all
        # a whole name is explicit: layers_to_transform does not apply to it (PEFT's rule)
        ("m.layers.1.q", dict(target_modules=["m.layers.1.q"], layers_to_transform=[0]), True),
        # the first index counts (a layer, not an expert), unless the pattern says otherwise
        ("layers.1.layers.0.up", dict(target_modules=["up"], layers_to_transform=[1], layers_pattern="layers"), True),
        ("layers.1.layers.0.up", dict(target_modules=["up"], layers_to_transform=[0], layers_pattern=r"\d+\.layers"),
         True),
        ("w", dict(target_modules=None, target_parameters=["w.weight"]), False),
    ],
)
def test_check_target_module_exists_follows_the_rules(key, config, expected):
    assert bool(check_target_module_exists(LoraConfig(**config), key)) is expected


def test_exclusions_are_false_and_told_apart():
    config = LoraConfig(target_modules=["q_proj", "head"], exclude_modules=["layers.0.q_proj"],
                        modules_to_save=["head"])
    assert check_target_module_exists(config, "model.layers.1.q_proj") is True
    for key in ("model.layers.0.q_proj", "head", "head.inner"):  # excluded, saved in full, inside a saved module
        result = check_target_module_exists(config, key)
        assert isinstance(result, Excluded) and not result
    assert check_target_module_exists(config, "model.layers.1.v_proj") is False
    assert isinstance(check_target_module_exists(LoraConfig(target_modules="q.*", exclude_modules="q1"), "q1"),
                      Excluded)


def test_injection_wraps_what_the_rule_matches():
    """One rule: the modules get_peft_model wraps are the names check_target_module_exists accepts."""
    configs = [
        dict(target_modules=["q_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
        dict(target_modules=["q_proj", "model.layers.1.v_proj"], layers_to_transform=[0]),
        dict(target_modules=r".*\.[02]\.v_proj"),
        dict(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.1.q_proj"]),
    ]
    for kwargs in configs:
        names = [n for n, _ in Stack().named_modules() if n]
        expected = [n for n in names if check_target_module_exists(LoraConfig(**kwargs), n)]
        assert wrapped(get_peft_model(Stack(), LoraConfig(**kwargs))) == expected, kwargs


def test_layer_index():
    assert layer_index("model.layers.3.mlp.up", None) == 3
    assert layer_index("model.layers.3.mlp.up", "") == 3
    assert layer_index("model.layers.3.experts.7.w", ["layers"]) == 3
    assert layer_index("h.2.attn", ["layers", "h"]) == 2
    assert layer_index("head", None) is None


@pytest.mark.parametrize(
    ("targets", "others", "expected"),
    [
        (["bar.baz"], ["foo.bar"], {"baz"}),
        (["a.b.c", "d.e.f", "g.h.i"], ["a.b.x", "d.x.f", "x.h.i"], {"c", "e.f", "g.h.i"}),
        (["1.foo", "2.foo"], ["3.foo"], {"1.foo", "2.foo"}),
        (["x.proj", "y.time_emb_proj"], ["time_proj"], {"proj", "time_emb_proj"}),  # 'proj' does not cover it
    ],
)
def test_minimal_suffixes(targets, others, expected):
    short = minimal_suffixes(targets, others)
    assert short == expected
    every = set(targets) | set(others)  # they select exactly the targets
    assert {n for n in every if any(n == s or n.endswith(f".{s}") for s in short)} == set(targets)


@pytest.mark.parametrize(("targets", "others", "words"), [
    ([], ["a"], "list or set of strings"),
    ("a", ["b"], "list or set of strings"),
    (["", "a"], ["b"], "empty string"),
    (["a", "b"], ["b"], "common elements"),
])
def test_minimal_suffixes_refuses(targets, others, words):
    with pytest.raises(ValueError, match=words):
        minimal_suffixes(targets, others)


def test_long_list_is_condensed_but_not_to_a_suffix_another_module_has():
    """21 transformer_blocks.{i}.query beside single_transformer_blocks.{i}.query: 'query' would take both."""

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(2, 2)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer_blocks = nn.ModuleList([Inner() for _ in range(21)])
            self.single_transformer_blocks = nn.ModuleList([Inner() for _ in range(21)])

    targets = [f"transformer_blocks.{i}.query" for i in range(21)]
    model = get_peft_model(Outer(), LoraConfig(target_modules=targets))
    assert wrapped(model) == targets
    recorded = model.peft_config["default"].target_modules
    assert "query" not in recorded and len(recorded) <= len(targets)


def test_empty_target_modules_is_a_config_but_injecting_it_is_an_error():
    config = LoraConfig(target_modules=[])  # PEFT's config takes it; nothing to wrap is refused when wrapping
    with pytest.raises(NoMatchingPeftModuleError, match="No `target_modules` passed"):
        get_peft_model(Stack(), config)


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)


@pytest.mark.parametrize(("model", "kwargs", "words"), [
    # PEFT's cases are over the model's modules: every module excluded / some excluded and the rest unmatched / ...
    (One, dict(target_modules=["lin"], exclude_modules=["lin"]), "All modules were excluded"),
    (One, dict(target_modules=["lin"], modules_to_save=["lin"]), "All modules were excluded"),
    (Stack, dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "No modules were targeted"),
    (Stack, dict(target_modules=["q_proj", "nothing"], exclude_modules=["q_proj"]), "No modules were targeted"),
    (Stack, dict(target_modules=["head"], modules_to_save=["head"]), "No modules were targeted"),
    (Stack, dict(target_modules=["q_prj"]), r"Target modules \{'q_prj'\} not found .* did you mean 'q_proj'"),
    (Stack, dict(target_modules=["q_proj"], layers_to_transform=[7]), r"Target modules .* You specified 'layers_to"),
])
def test_nothing_wrapped_raises_peft_s_error_for_the_case(model, kwargs, words):
    with pytest.raises(NoMatchingPeftModuleError, match=words) as err:
        get_peft_model(model(), LoraConfig(**kwargs))
    assert isinstance(err.value, TargetError) and isinstance(err.value, lorakit.PeftError)


def test_an_entry_that_matches_nothing_beside_others_is_still_an_error():
    """lorakit's stricter check (PEFT only warns when a whole list matched nothing): not a NoMatchingPeftModuleError,
    since other entries matched."""
    with pytest.raises(TargetError, match="'q_prj' matched nothing") as err:
        get_peft_model(Stack(), LoraConfig(target_modules=["v_proj", "q_prj"]))
    assert not isinstance(err.value, NoMatchingPeftModuleError)


def test_unused_exclude_modules_warns():
    with pytest.warns(UserWarning, match=r"exclude_modules=\['nothing'\] but no modules were excluded"):
        get_peft_model(Stack(), LoraConfig(target_modules=["q_proj"], exclude_modules=["nothing"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(Stack(), LoraConfig(target_modules=["q_proj"], exclude_modules=["layers.0.q_proj"]))


def test_pattern_keys_that_pick_no_target_warn():
    config = LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 2, "typo": 3}, alpha_pattern={"v_proj": 4})
    with pytest.warns(RuntimeWarning) as record:
        model = get_peft_model(Stack(), config)
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert any("rank_pattern" in m and "['typo']" in m for m in messages)
    assert any("alpha_pattern" in m and "['v_proj']" in m for m in messages)  # v_proj is no target here
    assert model.base_model.model.model.layers[0].q_proj.r["default"] == 2  # the key that matched still applies
    assert unmatched_pattern_keys({"q_proj": 1, r"layers\.0\.q_proj": 1, "0.q": 1}, ["model.layers.0.q_proj"]) == [
        "0.q"
    ]


def test_targeted_module_names_in_order_of_the_adapters():
    model = get_peft_model(Stack(), LoraConfig(target_modules=["model.layers.1.q_proj"]))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"]))
    assert model.targeted_module_names == [
        "model.layers.1.q_proj", "model.layers.0.q_proj", "model.layers.2.q_proj"
    ]  # fmt: skip


def test_target_parameters_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=re.escape("`target_parameters` must be a list of strings or None.")) as err:
        LoraConfig(target_parameters="linear.weight")
    assert isinstance(err.value, lorakit.ConfigError)


def test_train_refuses_an_empty_target_list_before_loading():
    from lorakit.training.args import TrainArgs

    with pytest.raises(lorakit.ConfigError, match=r"^--targets: target_modules=\[\] wraps nothing"):
        TrainArgs(targets=",")


# -- state-dict key prefixes ------------------------------------------------------------------------------------------

class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.embed_tokens_extra = nn.Embedding(10, 4)
        self.lin0 = nn.Linear(4, 4)
        self.lora_foobar = nn.Linear(4, 4)  # a base module named like an adapter's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_foobar(self.lin0(self.embed_tokens(x) + self.embed_tokens_extra(x)))

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens


def test_tuner_key_prefixes_are_the_adapter_tensors_and_nothing_else():
    model = get_peft_model(WithEmbedding(), LoraConfig(target_modules=["lin0"]))
    model.add_adapter("other", LoraConfig(target_modules=["lin0", "embed_tokens"]))
    prefixes = state.tuner_key_prefixes(model)
    assert {"base_model.model.lin0.lora_A", "base_model.model.lin0.lora_B"} <= prefixes
    assert not any("base_layer" in p or "lora_foobar" in p for p in prefixes)
    ours = state.keys_under(model.state_dict(), state.tuner_key_prefixes(model, "default"))
    assert sorted(ours) == [f"base_model.model.lin0.lora_{x}.default.weight" for x in "AB"]
    other = state.tuner_key_prefixes(model, "other")
    assert "base_model.model.embed_tokens.lora_embedding_A.other" in other and not any(
        p.endswith(".default") for p in other
    )
    inner = state.tuner_key_prefixes(model.base_model.model)  # adapters injected in place: no base_model. prefix
    assert "lin0.lora_A" in inner and not any(p.startswith("base_model") for p in inner)


def test_keys_under_respects_dots():
    sd = {"a": 0, "a.b": 1, "a.b.c": 2, "a.bc": 3, "ab": 4, "x.a.b": 5}
    assert state.keys_under(sd, {"a.b"}) == {"a.b": 1, "a.b.c": 2}
    assert state.keys_under(sd, set()) == {}


def test_modules_to_save_copies_are_not_tuner_prefixes():
    model = get_peft_model(WithEmbedding(), LoraConfig(target_modules=["lin0"], modules_to_save=["lora_foobar"]))
    assert not any(p.startswith("base_model.model.lora_foobar") for p in state.tuner_key_prefixes(model))


def test_save_embedding_layers_saves_the_embedding_not_its_sibling(tmp_path):
    from safetensors.torch import load_file

    model = get_peft_model(WithEmbedding(), LoraConfig(target_modules=["lin0"]))
    model.save_pretrained(tmp_path / "plain", save_embedding_layers=True)
    keys = set(load_file(tmp_path / "plain" / "adapter_model.safetensors"))
    assert "base_model.model.embed_tokens.weight" in keys and not any("embed_tokens_extra" in k for k in keys)

    model = get_peft_model(WithEmbedding(), LoraConfig(target_modules=["lin0", "embed_tokens"]))
    model.save_pretrained(tmp_path / "wrapped", save_embedding_layers=True)
    keys = set(load_file(tmp_path / "wrapped" / "adapter_model.safetensors"))
    assert "base_model.model.embed_tokens.base_layer.weight" in keys
    assert not any("embed_tokens_extra" in k for k in keys)


def test_save_embedding_layers_on_a_model_that_names_no_embedding_warns(tmp_path):
    from safetensors.torch import load_file

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lin0 = nn.Linear(4, 4)

    model = get_peft_model(Plain(), LoraConfig(target_modules=["lin0", "emb"]))
    with pytest.warns(UserWarning, match=r"Could not identify embedding layer\(s\) .* No base embedding is saved"):
        model.save_pretrained(tmp_path, save_embedding_layers=True)
    assert not any("base_layer" in k for k in load_file(tmp_path / "adapter_model.safetensors"))


def test_a_long_list_is_recorded_condensed_only_if_that_selects_the_same_modules(tmp_path):
    names = [f"model.layers.{i}.{p}" for i in range(10) for p in ("q_proj", "v_proj")]  # 20: condensed
    model = get_peft_model(Stack(10), LoraConfig(target_modules=names))
    assert model.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    # with layers_to_transform, 'q_proj' would select layer 0 only, while the whole names select every layer
    model = get_peft_model(Stack(10), LoraConfig(target_modules=names, layers_to_transform=[0]))
    assert sorted(wrapped(model)) == sorted(names)
    assert sorted(model.peft_config["default"].target_modules) == sorted(names)
    model.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(Stack(10), tmp_path)
    assert sorted(wrapped(loaded)) == sorted(names)
