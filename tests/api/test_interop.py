"""Interop with HF PEFT through the adapter files, both directions, on tiny random models in fp32.

For each config of the matrix:

* lorakit saves -> ``peft.PeftModel.from_pretrained(fresh base, folder)`` gives lorakit's logits, with no PEFT warning
  about lorakit's config keys;
* PEFT saves -> ``lorakit.PeftModel.from_pretrained(fresh base, folder)`` gives PEFT's logits;
* both libraries write the same tensor names and shapes, and the same adapter_config.json key by key (the keys that
  may differ, and why: helpers.CONFIG_KEYS_THAT_DIFFER).

Then: non-default adapter names and several adapters per folder (file layout and logits), ``add_weighted_adapter``
(linear / cat / svd against PEFT's), and unknown config keys. PEFT is only the reference here, imported in tests.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import (
    assert_same_adapter_config,
    input_ids,
    perturb_,
    tiny_bert_cls,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_cls,
)
from safetensors.torch import load_file
from torch import nn

import lorakit

ATOL = 1e-5
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# (id, base model factory, LoraConfig kwargs shared by both libraries)
MATRIX: list[tuple[str, Callable[..., nn.Module], dict]] = [
    ("target_list", tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    ("target_regex", tiny_llama, dict(target_modules=r".*\.(q|v)_proj")),
    ("all_linear_llama", tiny_llama, dict(target_modules="all-linear")),
    ("all_linear_gpt2", tiny_gpt2, dict(target_modules="all-linear")),
    (
        "rank_alpha_pattern",
        tiny_llama,
        dict(
            target_modules=["q_proj", "v_proj", "o_proj"],
            r=4,
            lora_alpha=8,
            # keys are regexes matched against the end of the name at a dot boundary: "_proj" is no match for
            # "q_proj" (only "o_proj" takes this key)
            rank_pattern={
                "v_proj": 2,
                r"layers\.1\.self_attn\.q_proj": 6,
                "model.layers.0.self_attn.o_proj": 3,
                "o_proj|_proj": 7,
            },
            alpha_pattern={"o_proj": 3.0, r"layers\.0\.self_attn\.v_proj": 5.0},
        ),
    ),
    ("rslora", tiny_llama, dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, use_rslora=True)),
    ("bias_all_gpt2", tiny_gpt2, dict(target_modules=["c_attn"], bias="all")),
    ("bias_lora_only_gpt2", tiny_gpt2, dict(target_modules=["attn.c_attn", "attn.c_proj"], bias="lora_only")),
    (
        "bias_lora_only_bert",
        tiny_bert_cls,
        dict(target_modules=["query", "value"], bias="lora_only", task_type="SEQ_CLS"),
    ),
    ("bias_all_bert", tiny_bert_cls, dict(target_modules=["query", "value"], bias="all", task_type="SEQ_CLS")),
    ("modules_to_save_lm_head", tiny_llama, dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    (
        "modules_to_save_nested_bias_all",  # a whole sub-tree saved, and a target inside it that must be skipped
        tiny_bert_cls,
        dict(target_modules=["query", "dense"], modules_to_save=["pooler"], bias="all", task_type="SEQ_CLS"),
    ),
    (
        "layers_to_transform",
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    ),
    (
        "layers_to_transform_int_exclude",
        tiny_llama,
        dict(
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
            exclude_modules=["down_proj"],
            layers_to_transform=0,
            layers_pattern=["layers"],
        ),
    ),
    ("embedding", tiny_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    (
        "embedding_and_lm_head_rslora",
        tiny_llama,
        dict(
            target_modules=["embed_tokens", "lm_head"],
            use_rslora=True,
            rank_pattern={"lm_head": 3},
            alpha_pattern={"embed_tokens": 5.0},
        ),
    ),
    ("gpt2_conv1d", tiny_gpt2, dict(target_modules=["c_attn", "c_proj"])),
    ("gpt2_conv1d_fan_in_fan_out", tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ("seq_cls_bert", tiny_bert_cls, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    ("seq_cls_bert_all_linear", tiny_bert_cls, dict(target_modules="all-linear", task_type="SEQ_CLS")),
    ("seq_cls_llama", tiny_llama_cls, dict(target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")),
    ("seq_cls_llama_all_linear", tiny_llama_cls, dict(target_modules="all-linear", task_type="SEQ_CLS")),
]
CASES = [pytest.param(factory, kwargs, id=name) for name, factory, kwargs in MATRIX]


# -- helpers ---------------------------------------------------------------------------------------------------------
def _trained(model: nn.Module, seed: int = 1) -> nn.Module:
    """Stand-in for training: perturb every trainable tensor (LoRA A/B, biases per ``bias``, modules_to_save copies),
    so that each saved tensor matters for the logits."""
    perturb_([p for p in model.parameters() if p.requires_grad], seed=seed)
    return model


def _lorakit_model(factory: Callable[..., nn.Module], kwargs: dict, adapter_name: str = "default") -> nn.Module:
    config = lorakit.LoraConfig(**kwargs, init_lora_weights=False)
    return _trained(lorakit.get_peft_model(factory(0), config, adapter_name=adapter_name))


def _peft_model(factory: Callable[..., nn.Module], kwargs: dict, adapter_name: str = "default") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. PEFT's note that it switched fan_in_fan_out on for Conv1D
        model = peft.get_peft_model(factory(0), peft.LoraConfig(**kwargs, init_lora_weights=False), adapter_name)
    return _trained(model)


def _logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids(seed=seed)).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _warnings_about_config(caught: list[warnings.WarningMessage], config_keys: list[str]) -> list[str]:
    """Messages of warnings raised inside PEFT, or naming one of ``config_keys`` (e.g. an unexpected key)."""
    out = []
    for w in caught:
        msg = str(w.message)
        in_peft = "/peft/" in w.filename.replace("\\", "/")
        names_key = any(len(k) > 1 and re.search(rf"\b{re.escape(k)}\b", msg) for k in config_keys)
        if in_peft or names_key or "Unexpected keyword" in msg:
            out.append(msg)
    return out


def _file_tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}


def _adapter_files(root: Path) -> set[str]:
    """Adapter files under ``root`` (relative paths); PEFT's README.md model card is not part of the format."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.name in ADAPTER_FILES}


def _lora_module_names(model: nn.Module, adapter_name: str) -> set[str]:
    """Names of modules holding LoRA weights of ``adapter_name`` (works for both libraries)."""
    names = set()
    for name, module in model.named_modules():
        for attr in ("lora_A", "lora_embedding_A"):
            if adapter_name in (getattr(module, attr, None) or {}):
                names.add(name)
    return names


# -- the matrix ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory, kwargs", CASES)
def test_lorakit_file_loads_in_peft(factory, kwargs, tmp_path):
    model = _lorakit_model(factory, kwargs)
    expected = _logits(model)
    with model.disable_adapter():
        assert _max_diff(_logits(model), expected) > 1e-3, "the adapter must change the logits, or the test is void"
    model.save_pretrained(tmp_path)

    keys = list(json.loads((tmp_path / "adapter_config.json").read_text()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(factory(0), tmp_path)
    assert _warnings_about_config(caught, keys) == []
    assert _lora_module_names(loaded, "default") == _lora_module_names(model, "default")
    assert _max_diff(_logits(loaded), expected) < ATOL


@pytest.mark.parametrize("factory, kwargs", CASES)
def test_peft_file_loads_in_lorakit(factory, kwargs, tmp_path):
    model = _peft_model(factory, kwargs)
    expected = _logits(model)
    with model.disable_adapter():
        assert _max_diff(_logits(model), expected) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True" when an embedding is targeted
        model.save_pretrained(tmp_path)  # PEFT's defaults: what users have on disk

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = lorakit.PeftModel.from_pretrained(factory(0), tmp_path)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert _lora_module_names(loaded, "default") == _lora_module_names(model, "default")
    assert _max_diff(_logits(loaded), expected) < ATOL


@pytest.mark.parametrize("factory, kwargs", CASES)
def test_same_file_keys_and_config(factory, kwargs, tmp_path):
    ours, theirs = tmp_path / "lorakit", tmp_path / "peft"
    lk_model = _lorakit_model(factory, kwargs)
    lk_model.save_pretrained(ours)
    # save_embedding_layers=False: PEFT's "auto" also writes the whole base embedding when one is targeted; lorakit
    # writes it only on request (save_embedding_layers=True), deliberately, so adapters stay small.
    _peft_model(factory, kwargs).save_pretrained(theirs, save_embedding_layers=False)

    ours_t, theirs_t = _file_tensors(ours), _file_tensors(theirs)
    # PEFT with bias="all" writes each modules_to_save copy's bias twice: as '<m>.bias' and as the stray
    # '<m>.modules_to_save.bias' (its adapter-name stripping applied to the copy's state-dict key). lorakit writes
    # the first only and accepts both when loading (see test_peft_file_loads_in_lorakit).
    stray = {k for k in theirs_t if kwargs.get("bias") == "all" and re.search(r"\.modules_to_save\.(\w+\.)*bias$", k)}
    assert ours_t == {k: v for k, v in theirs_t.items() if k not in stray}
    if kwargs.get("bias") == "all" and ("modules_to_save" in kwargs or kwargs.get("task_type") == "SEQ_CLS"):
        assert stray, "the documented PEFT duplicate vanished: drop this exception"

    assert_same_adapter_config(ours, theirs)


def test_peft_auto_class_loads_a_lorakit_adapter_without_task_type(tmp_path):
    """PEFT's AutoPeftModelForCausalLM finds the base model's class in auto_mapping when task_type is None (the
    seed's own config): lorakit writes it as PEFT does."""
    base_dir = tmp_path / "base"
    tiny_llama(0).save_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    config = lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=32, init_lora_weights=False)
    model = lorakit.get_peft_model(base, config)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["auto_mapping"] == {
        "base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama.modeling_llama"
    }
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert _max_diff(_logits(loaded), _logits(model)) < ATOL


# -- adapter names and folders ---------------------------------------------------------------------------------------
SEQ_CLS = dict(target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")


def test_non_default_adapter_name_lorakit_to_peft(tmp_path):
    model = _lorakit_model(tiny_llama_cls, SEQ_CLS, adapter_name="task_a")
    model.save_pretrained(tmp_path / "lorakit")
    _peft_model(tiny_llama_cls, SEQ_CLS, adapter_name="task_a").save_pretrained(tmp_path / "peft")
    assert (
        _adapter_files(tmp_path / "lorakit")
        == _adapter_files(tmp_path / "peft")
        == {
            "task_a/adapter_config.json",
            "task_a/adapter_model.safetensors",
        }
    )
    assert _file_tensors(tmp_path / "lorakit/task_a") == _file_tensors(tmp_path / "peft/task_a")

    loaded = peft.PeftModel.from_pretrained(tiny_llama_cls(0), tmp_path / "lorakit/task_a", adapter_name="task_a")
    assert loaded.active_adapter == "task_a"
    assert _max_diff(_logits(loaded), _logits(model)) < ATOL


def test_non_default_adapter_name_peft_to_lorakit(tmp_path):
    model = _peft_model(tiny_llama_cls, SEQ_CLS, adapter_name="task_a")
    model.save_pretrained(tmp_path)
    # loaded under another name: the file keys carry no adapter name
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama_cls(0), tmp_path / "task_a", adapter_name="other_name")
    assert loaded.active_adapter == "other_name"
    assert _max_diff(_logits(loaded), _logits(model)) < ATOL


TWO_ADAPTERS = {
    "default": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, modules_to_save=["lm_head"]),
    "other": dict(target_modules=["v_proj", "down_proj"], r=2, lora_alpha=5, use_rslora=True),
}


def _two_adapters(lib) -> nn.Module:
    """A tiny llama with both TWO_ADAPTERS (random, non-zero weights), built with ``lib`` (lorakit or peft)."""
    model = lib.get_peft_model(tiny_llama(0), lib.LoraConfig(**TWO_ADAPTERS["default"], init_lora_weights=False))
    model.add_adapter("other", lib.LoraConfig(**TWO_ADAPTERS["other"], init_lora_weights=False))
    for name in TWO_ADAPTERS:
        model.set_adapter(name)
        _trained(model, seed=len(name))
    model.set_adapter("default")
    return model


def _logits_per_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name in TWO_ADAPTERS:
        model.set_adapter(name)
        out[name] = _logits(model)
    return out


@pytest.mark.parametrize("direction", ["lorakit_to_peft", "peft_to_lorakit"])
def test_several_adapters_saved_at_once(direction, tmp_path):
    src_lib, dst_lib = (lorakit, peft) if direction == "lorakit_to_peft" else (peft, lorakit)
    source = _two_adapters(src_lib)
    source.save_pretrained(tmp_path)
    assert _adapter_files(tmp_path) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "other/adapter_config.json",
        "other/adapter_model.safetensors",
    }
    expected = _logits_per_adapter(source)
    assert _max_diff(expected["default"], expected["other"]) > 1e-3

    loaded = dst_lib.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    got = _logits_per_adapter(loaded)
    for name in TWO_ADAPTERS:
        assert _max_diff(got[name], expected[name]) < ATOL, name


def test_selected_adapters_layout_matches_peft(tmp_path):
    for lib in (lorakit, peft):
        _two_adapters(lib).save_pretrained(tmp_path / lib.__name__, selected_adapters=["other"])
    assert (
        _adapter_files(tmp_path / "lorakit")
        == _adapter_files(tmp_path / "peft")
        == {
            "other/adapter_config.json",
            "other/adapter_model.safetensors",
        }
    )
    assert _file_tensors(tmp_path / "lorakit/other") == _file_tensors(tmp_path / "peft/other")


# -- add_weighted_adapter --------------------------------------------------------------------------------------------
def _combine_sources(factory: Callable[..., nn.Module], same_rank: bool) -> dict[str, dict]:
    """Two adapters with different targets, alphas (and ranks unless ``same_rank``); non-rsLoRA, since lorakit gives
    a combined rsLoRA adapter scaling 1 where PEFT does not."""
    if factory is tiny_gpt2:
        return {
            "one": dict(target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True),
            "two": dict(
                target_modules=["c_attn", "c_proj"], r=4 if same_rank else 2, lora_alpha=3, fan_in_fan_out=True
            ),
        }
    return {
        "one": dict(
            target_modules=["q_proj", "v_proj", "embed_tokens"],
            r=4,
            lora_alpha=8,
            **({} if same_rank else {"rank_pattern": {"v_proj": 2}}),
        ),
        "two": dict(target_modules=["q_proj", "o_proj"], r=4 if same_rank else 3, lora_alpha=3),
    }


COMBINE_CASES = [
    pytest.param(tiny_llama, "linear", {}, id="linear"),
    pytest.param(tiny_llama, "cat", {}, id="cat"),
    pytest.param(tiny_llama, "svd", {}, id="svd"),
    pytest.param(tiny_llama, "svd", dict(svd_rank=3, svd_clamp=0.9), id="svd_rank_clamp"),
    pytest.param(tiny_gpt2, "svd", dict(svd_rank=2), id="svd_gpt2_conv1d"),
    pytest.param(tiny_gpt2, "cat", {}, id="cat_gpt2_conv1d"),
]


def peft_pair(
    factory: Callable[..., nn.Module], sources: dict[str, dict], tmp_path: Path
) -> tuple[nn.Module, nn.Module]:
    """(PEFT model, lorakit model) holding the same adapters 'one' and 'two': made by PEFT (random init) and copied
    to lorakit through the files."""
    theirs = peft.get_peft_model(factory(0), peft.LoraConfig(**sources["one"], init_lora_weights=False), "one")
    theirs.add_adapter("two", peft.LoraConfig(**sources["two"], init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True"
        theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(factory(0), tmp_path / "one", adapter_name="one")
    ours.load_adapter(tmp_path / "two", adapter_name="two")
    return theirs, ours


@pytest.mark.parametrize("factory, combination_type, options", COMBINE_CASES)
def test_add_weighted_adapter_matches_peft(factory, combination_type, options, tmp_path):
    sources = _combine_sources(factory, same_rank=combination_type == "linear")
    theirs, ours = peft_pair(factory, sources, tmp_path)

    weights = [0.7, -0.4]
    for model in (theirs, ours):
        model.add_weighted_adapter(["one", "two"], weights, "mix", combination_type=combination_type, **options)
        model.set_adapter("mix")
    assert (ours.peft_config["mix"].r, ours.peft_config["mix"].lora_alpha) == (
        theirs.peft_config["mix"].r,
        theirs.peft_config["mix"].lora_alpha,
    )

    assert_same_mix(theirs, ours)


def assert_same_mix(theirs: nn.Module, ours: nn.Module, n_layers: int | None = None) -> None:
    """Per layer, s * B @ A of adapter 'mix' in the base weight's layout (SVD factors may differ in sign, the delta
    not), and the logits, agree within ATOL; the mix really changes the model."""
    our_layers = dict(ours.get_base_model().named_modules())
    names = _lora_module_names(theirs.get_base_model(), "mix")
    assert names == _lora_module_names(ours.get_base_model(), "mix") and names
    assert n_layers is None or len(names) == n_layers
    for name, module in theirs.get_base_model().named_modules():
        if name in names:
            expected = module.get_delta_weight("mix")
            got = our_layers[name].delta_weight("mix")
            assert got.shape == expected.shape, name
            assert _max_diff(got, expected) < ATOL, name
            assert expected.abs().max() > 1e-3, name
    expected_logits = _logits(theirs)
    assert _max_diff(_logits(ours), expected_logits) < ATOL
    with theirs.disable_adapter():
        assert _max_diff(_logits(theirs), expected_logits) > 1e-3


def test_weighted_adapter_is_not_the_sum_of_deltas_for_linear(tmp_path):
    """Guards the comparison above: PEFT's (and lorakit's) 'linear' combines A and B separately, so the result is not
    sum_i w_i delta_i; a lorakit 'linear' that summed deltas would fail test_add_weighted_adapter_matches_peft."""
    sources = _combine_sources(tiny_llama, same_rank=True)
    model = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(**sources["one"], init_lora_weights=False), "one")
    model.add_adapter("two", lorakit.LoraConfig(**sources["two"], init_lora_weights=False))
    model.add_weighted_adapter(["one", "two"], [0.7, -0.4], "mix", combination_type="linear")
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    summed = 0.7 * layer.delta_weight("one") - 0.4 * layer.delta_weight("two")
    assert _max_diff(layer.delta_weight("mix"), summed) > 1e-3


# -- config keys -----------------------------------------------------------------------------------------------------
def test_unknown_config_key_warns_by_name_and_is_ignored(tmp_path):
    kwargs = dict(target_modules=["q_proj", "v_proj"])
    model = _lorakit_model(tiny_llama, kwargs)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "some_future_option": 1}))

    with pytest.warns(UserWarning, match="some_future_option"):
        loaded = lorakit.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert not hasattr(loaded.peft_config["default"], "some_future_option")
    assert _max_diff(_logits(loaded), _logits(model)) < ATOL


def test_peft_config_keys_load_without_warning_in_lorakit(tmp_path):
    """Every key PEFT 0.21 writes for a plain LoRA adapter is known to lorakit (no 'unknown keys' warning)."""
    _peft_model(tiny_llama, dict(target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert [str(w.message) for w in caught if "unknown" in str(w.message)] == []
