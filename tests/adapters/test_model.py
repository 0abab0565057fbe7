"""PeftModel / LoraModel on tiny models: targets, trainable sets, adapter verbs, merging, combining."""

import pytest
import torch
from helpers import input_ids, perturb_, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_llama_cls
from torch import nn

from lorakit import (
    AdapterError,
    LoraConfig,
    LoraLinear,
    PeftModelForCausalLM,
    PeftModelForSequenceClassification,
    TargetError,
    get_peft_model,
)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def _adapted_llama(**kw) -> PeftModelForCausalLM:
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    cfg.update(kw)
    return get_peft_model(tiny_llama(), LoraConfig(**cfg))


def _wrapped(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]


# -- targets -------------------------------------------------------------------------------------------------------
def test_list_targets_match_dotted_suffix():
    model = _adapted_llama()
    assert _wrapped(model) == [
        f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]


def test_regex_targets_full_match_and_default_targets():
    model = _adapted_llama(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj")
    assert [n.removeprefix("base_model.model.model.") for n in _wrapped(model)] == ["layers.1.self_attn.q_proj",
                                                                     "layers.1.self_attn.k_proj"]
    default = _adapted_llama(target_modules=None)
    assert len(_wrapped(default)) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in _wrapped(default))


def test_all_linear_excludes_lm_head_and_classifier():
    names = _wrapped(_adapted_llama(target_modules="all-linear"))
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    cls = get_peft_model(tiny_bert_cls(), LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    assert not any("classifier" in n for n in _wrapped(cls)) and any("pooler" in n for n in _wrapped(cls))


def test_layers_to_transform_and_exclude_modules():
    model = _adapted_llama(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")
    assert all(".layers.1." in n for n in _wrapped(model)) and len(_wrapped(model)) == 2
    model = _adapted_llama(target_modules="all-linear", exclude_modules=["down_proj", "up_proj"])
    assert not any(n.endswith(("down_proj", "up_proj")) for n in _wrapped(model))


def test_target_typo_is_an_error_with_suggestion_even_when_others_match():
    with pytest.raises(TargetError, match=r"'q_prj' matched nothing; did you mean 'q_proj'"):
        _adapted_llama(target_modules=["q_prj", "v_proj"])


def test_target_on_unwrappable_module_names_it():
    with pytest.raises(TargetError, match="LlamaRMSNorm"):
        _adapted_llama(target_modules=["input_layernorm"])


def test_unknown_architecture_needs_explicit_targets():
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

    with pytest.raises(TargetError, match="Please specify `target_modules`.*there is no default"):
        get_peft_model(Toy(), LoraConfig())


def test_rank_and_alpha_pattern_per_module():
    model = _adapted_llama(rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 32})
    base = model.base_model.model.model
    assert base.layers[0].self_attn.v_proj.r["default"] == 2 and base.layers[0].self_attn.q_proj.r["default"] == 4
    assert base.layers[0].self_attn.q_proj.scaling["default"] == 8 and base.layers[1].self_attn.q_proj.scaling[
        "default"] == 2


# -- trainable parameters ------------------------------------------------------------------------------------------
def test_print_trainable_parameters_matches_peft_numbers(capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = get_peft_model(GPT2LMHeadModel(GPT2Config()), LoraConfig(r=8, target_modules=["c_attn"]))
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
    )


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_sets_per_bias_mode(bias):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    trainable = _trainable(model)
    lora = {n for n in trainable if ".lora_" in n}
    assert len(lora) == 4 and all("c_attn" in n for n in lora)
    biases = trainable - lora
    if bias == "none":
        assert biases == set()
    elif bias == "lora_only":
        assert biases == {f"base_model.model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)}
    else:
        all_biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
        assert biases == all_biases and len(all_biases) > 10


def test_modules_to_save_copy_trains_and_original_stays():
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert isinstance(model, PeftModelForSequenceClassification)
    trainable = _trainable(model)
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    assert "base_model.model.classifier.original_module.weight" not in trainable


def test_gradients_reach_only_adapter():
    model = _adapted_llama()
    model.train()
    out = model(input_ids=input_ids(), labels=input_ids())
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == _trainable(model) and all(".lora_" in n for n in with_grad)


# -- adapter verbs -------------------------------------------------------------------------------------------------
def test_disable_adapter_equals_base_model():
    ref = _logits(tiny_llama())
    model = _adapted_llama()
    assert not torch.allclose(_logits(model), ref)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), ref)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(model), ref)


def test_disable_and_enable_adapter_layers_as_peft():
    """disable_adapter_layers: base outputs, a merged adapter unmerged, adapter parameters frozen; enable: the active
    adapter computes and trains again (merged adapters stay unmerged). The trainable sets equal PEFT's."""
    import peft

    ref = _logits(tiny_llama())
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    model = _adapted_llama(modules_to_save=["lm_head"])
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg, modules_to_save=["lm_head"]))
    adapted, trained = _logits(model), _trainable(model)
    model.merge_adapter()
    model.disable_adapter_layers()
    theirs.base_model.disable_adapter_layers()
    torch.testing.assert_close(_logits(model), ref)
    assert not model.base_model.model.model.layers[0].self_attn.q_proj.merged
    assert _trainable(model) == _trainable(theirs) == set()
    model.enable_adapter_layers()
    theirs.base_model.enable_adapter_layers()
    torch.testing.assert_close(_logits(model), adapted)
    assert _trainable(model) == _trainable(theirs) == trained


def test_set_requires_grad_on_an_inactive_adapter_until_set_adapter():
    model = _adapted_llama()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    active = _trainable(model)
    model.set_requires_grad("other")
    assert _trainable(model) == active | {n for n in _all(model) if ".other." in n}
    model.set_requires_grad(["default", "other"], requires_grad=False)
    assert _trainable(model) == set()
    model.set_adapter("default")
    assert _trainable(model) == active
    with pytest.raises(AdapterError, match="Adapter missing does not exist"):
        model.set_requires_grad("missing")
    assert model.peft_type == "LORA"


def _all(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def test_merge_unmerge_and_merge_and_unload_equal_outputs():
    model = _adapted_llama(target_modules="all-linear")
    unmerged = _logits(model)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=1e-5)
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), unmerged, atol=1e-5, rtol=1e-5)


def test_unload_restores_exact_original_modules():
    base = tiny_llama()
    q0 = base.model.layers[0].self_attn.q_proj
    ref = _logits(tiny_llama())
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.merge_adapter()
    plain = model.unload()
    assert plain.model.layers[0].self_attn.q_proj is q0
    torch.testing.assert_close(_logits(plain), ref, atol=1e-6, rtol=0)


def test_several_adapters_set_delete_and_both_active_add_up():
    model = _adapted_llama()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    assert model.active_adapters == ["default"]
    assert not any(".other." in n for n in _trainable(model))
    a = _logits(model)
    model.set_adapter("other")
    b = _logits(model)
    assert {n.split(".lora_")[1].split(".")[1] for n in _trainable(model)} == {"other"}
    assert not torch.allclose(a, b)
    model.set_adapter(["default", "other"])
    both = _logits(model)
    model.merge_adapter()  # W + s1 B1 A1 + s2 B2 A2: the dense reference of two active adapters
    torch.testing.assert_close(_logits(model), both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and "other" not in model.peft_config
    torch.testing.assert_close(_logits(model), a)
    with pytest.raises(AdapterError, match="does not exist"):
        model.set_adapter("other")


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "x.y", "/abs"])
def test_adapter_names_that_could_escape_a_folder_are_refused(name):
    model = _adapted_llama()
    with pytest.raises(AdapterError, match="invalid"):
        model.add_adapter(name, LoraConfig(target_modules=["q_proj"]))


def test_add_weighted_adapter_cat_equals_weighted_sum_of_deltas():
    model = _adapted_llama()
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type="cat")
    for layer in (m for m in model.modules() if isinstance(m, LoraLinear)):
        expect = 0.7 * layer.delta_weight("default") - 0.4 * layer.delta_weight("b")
        torch.testing.assert_close(layer.delta_weight("mix"), expect, atol=1e-6, rtol=1e-5)
        assert layer.r["mix"] == 6 and layer.scaling["mix"] == 1
    assert model.active_adapters == ["default"]


def test_gradient_checkpointing_keeps_adapter_gradients():
    model = _adapted_llama()
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model.train()
    model.config.use_cache = False
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_perturbed_bias_trains_with_bias_all():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    perturb_([p for n, p in model.named_parameters() if n.endswith("bias")], seed=1)
    model.train()
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    assert model.base_model.model.transformer.h[0].ln_1.bias.grad is not None


def test_wrappers_follow_the_model_mode_so_eval_has_no_dropout():
    model = _adapted_llama(lora_dropout=0.5)  # tiny_llama() is in eval mode
    torch.testing.assert_close(_logits(model), _logits(model))
    model.add_adapter("late", LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False))
    model.set_adapter("late")
    torch.testing.assert_close(_logits(model), _logits(model))
    model.train()
    assert not torch.allclose(_logits(model), _logits(model))


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_as_peft(autocast: bool) -> None:
    """PEFT's keyword: float32 adapters on a bf16 base by default, the base's dtype with False; the same in
    get_peft_model, add_adapter and load_adapter, and equal to PEFT's choice."""
    import tempfile

    import peft

    from lorakit import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama(0).to(torch.bfloat16)
    config = dict(target_modules=["q_proj", "v_proj"], r=4)
    ours = get_peft_model(base, LoraConfig(**config), autocast_adapter_dtype=autocast)
    ours.add_adapter("second", LoraConfig(**config), autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(tiny_llama(0).to(torch.bfloat16), peft.LoraConfig(**config),
                                 autocast_adapter_dtype=autocast)  # fmt: skip
    want = {p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    assert want == ({torch.float32} if autocast else {torch.bfloat16})
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == want
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(tiny_llama(0).to(torch.bfloat16), folder, autocast_adapter_dtype=autocast)
        loaded.load_adapter(folder, "again", autocast_adapter_dtype=autocast)
        assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == want
        with torch.no_grad():
            loaded(input_ids())  # the forward runs in either dtype


def test_peft_names_prefix_and_get_delta_weight() -> None:
    from lorakit import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(0), LoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    assert model.base_model.prefix == "lora_"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if model.base_model.prefix in n
    }
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = (B @ A * layer.scaling["default"]).T  # Conv1D stores (in, out)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)


def test_targeted_module_names_lists_the_wrapped_modules_in_model_order() -> None:
    config = LoraConfig(target_modules=["v_proj", "q_proj"], exclude_modules=r".*layers\.1\..*")
    model = get_peft_model(tiny_llama(), config)
    assert model.targeted_module_names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_get_base_layer_is_the_wrapped_module() -> None:
    base = tiny_llama()
    q_proj = base.model.layers[0].self_attn.q_proj
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer() is q_proj


def test_wrappers_print_as_peft_names_them() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    inner = model.base_model.model.model
    assert repr(inner.layers[0].self_attn.q_proj).startswith("lora.Linear(\n  (base_layer): Linear(")
    assert repr(inner.embed_tokens).startswith("lora.Embedding(")


def test_modules_to_save_refuses_a_container() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleDict({"a": nn.Linear(4, 4)})
            self.lin = nn.Linear(4, 4)

    with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type .*ModuleDict"):
        get_peft_model(Holder(), LoraConfig(target_modules=["lin"], modules_to_save=["heads"]))


def test_two_active_adapters_with_a_copy_of_one_module_are_refused_before_anything_changes() -> None:
    model = get_peft_model(tiny_llama_cls(), LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]
    assert model.base_model.model.score.active_adapters == ["default"]


def test_parent_and_module() -> None:
    from lorakit.adapters.inject import parent_and_module

    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    assert parent_and_module(model, "model.layers.0.self_attn.q_proj") == (attn, attn.q_proj, "q_proj")
    assert parent_and_module(model, "lm_head") == (model, model.lm_head, "lm_head")
    assert parent_and_module(model, "") == (model, model, "")


def test_the_lora_model_calls_the_wrapped_model() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.base_model(input_ids=input_ids()).logits, model(input_ids=input_ids()).logits)


def test_a_modules_to_save_wrapper_answers_with_the_module_that_runs() -> None:
    model = get_peft_model(tiny_llama_cls(), LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    score = model.base_model.model.score
    assert score.weight is score.modules_to_save["default"].weight
    assert score.in_features == score.original_module.in_features
    model.set_adapter("other")
    assert score.weight is score.modules_to_save["other"].weight
    with model.disable_adapter():
        assert score.weight is score.original_module.weight


def test_get_model_config_is_a_dict_whatever_the_model_holds() -> None:
    import dataclasses

    from lorakit import LoraModel

    @dataclasses.dataclass
    class Settings:
        hidden: int = 4

    class Holder(nn.Module):
        def __init__(self, config: object) -> None:
            super().__init__()
            self.config = config

    assert LoraModel.get_model_config(nn.Linear(2, 2)) == {"model_type": "custom"}
    assert LoraModel.get_model_config(Holder(Settings())) == {"hidden": 4}
    assert LoraModel.get_model_config(Holder({"a": 1})) == {"a": 1}
    llama = tiny_llama()
    assert LoraModel.get_model_config(llama) == llama.config.to_dict()
    assert LoraModel.get_model_config(nn.Linear(2, 2)) is not LoraModel.get_model_config(nn.Linear(2, 2))  # a copy
