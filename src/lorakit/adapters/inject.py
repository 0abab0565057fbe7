"""Wrapping and unwrapping: each target ``adapters.find`` names gets its LoRA layer (or the new adapter, if it has one
already), modules_to_save copies and trainable-token wrappers are set up, and ``unwrap`` puts the base modules back
(merged or not). The model class is never subclassed."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from lorakit.adapters import moe, variants, weight_tying
from lorakit.adapters.find import (
    SEQ_CLS_HEADS,
    all_linear_targets,
    find_parameters,
    find_targets,
    plain_modules,
    resolve_target_spec,
)
from lorakit.adapters.kinds import CustomKinds, kind_of, wrap
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.linear import LoraLinear
from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.adapters.parameter import LoraParameter
from lorakit.adapters.targets import (
    CONDENSE_FROM,
    TargetError,
    condensed,
    module_match,
    saved_by,
    warn_unmatched_patterns,
)
from lorakit.adapters.trainable_tokens import TrainableTokensWrapper, add_token_adapters
from lorakit.config import ALL_LINEAR, ConfigError, LoraConfig
from lorakit.ops.corda import CordaEigens
from lorakit.quant.half import REDUCED_PRECISION
from lorakit.quant.linear import is_conv1d

# where lorakit.preprocess_loraga leaves a target's mean gradient (PEFT's attribute name, so either library's
# preprocessing serves the other's get_peft_model), until the adapter takes it (_layer_data)
LORA_GA_GRAD = "_peft_loraga_grad"


def _parameter_wrapper(model: nn.Module, owner: str, parameter: str) -> LoraParameter:
    """The LoraParameter of ``parameter`` of module ``owner``: the existing one (another adapter made it), or a new
    one around the module (and around its other parameters' wrappers) put in its place."""
    module = model.get_submodule(owner)
    inner = module
    while isinstance(inner, LoraParameter):
        if inner.parameter_name == parameter:
            return inner
        inner = inner.base_layer
    parent, child = _parent(model, owner)
    wrapper = LoraParameter(module, parameter)
    setattr(parent, child, wrapper)
    return wrapper


def inject(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap every target of ``config`` (or add the adapter to existing wrappers) and set up modules_to_save copies.
    Returns the names of the wrapped modules."""
    if config.target_modules is None and moe.family_of(model) is not None:
        config.target_modules = resolve_target_spec(model, config)
    moe.convert_config(model, config, lambda: all_linear_targets(model, config.task_type))
    ties = weight_tying.plan(model, config)  # ensure_weight_tying: may rewrite modules_to_save / target_modules
    found = find_targets(model, config)
    targets = [t for t in found if t not in ties.targets]  # the tied ones: below
    parameters = find_parameters(model, config)
    warn_unmatched_patterns(config, found + [f"{owner}.{p}" for owner, p in parameters])
    clash = sorted({owner for owner, _ in parameters} & set(targets))
    if clash:
        kind = type(model.get_submodule(clash[0])).__name__
        raise TargetError(  # PEFT's words first (its tests match them)
            f"Trying to wrap an `nn.Parameter` of layer {clash[0]!r} of type {kind}, which is not a valid target. "
            f"Module {clash[0]!r} is named by target_modules and owns a parameter target_parameters names; adapt "
            "either the module or its parameter: leave it out of one of the two"
        )
    spec = config.target_modules
    if (spec is None and targets) or (isinstance(spec, str) and spec.lower() == ALL_LINEAR):
        # PEFT records what None / 'all-linear' stood for (the default names, the module names), so the saved file
        # names the same modules wherever it is loaded (None that stood for no module, parameters only, stays None)
        config.target_modules = resolve_target_spec(model, config)
    if isinstance(config.target_modules, list) and len(config.target_modules) >= CONDENSE_FROM:
        short = condensed(config.target_modules, [n for n, _ in model.named_modules()])
        # only if the short list selects the same modules by the whole rule: a whole name is a target in any layer,
        # a suffix only in layers_to_transform, so a file recording it would wrap fewer modules (PEFT's would)
        same = {n for n, _ in plain_modules(model) if module_match(config, n, short)} == set(found)
        if len(short) < len(config.target_modules) and same:
            config.target_modules = short
    if config.lora_bias:  # checked before anything is wrapped
        _check_lora_bias(model, targets, parameters, config._custom_modules)
    chosen = {name: variants.for_config(config, name) for name in targets}  # its errors come before any change
    for name in targets:  # so do a variant's checks of its targets (KaSA's rank)
        chosen[name].check(model.get_submodule(name), config.rank_for(name))
    _check_lora_ga(model, targets, config)
    layouts: list[bool] = []  # fan_in_fan_out of each wrapped Linear / Conv1D
    for name in targets:
        parent, child = _parent(model, name)
        module = getattr(parent, child)
        if not isinstance(module, LoraLayer):
            module = wrap(module, config._custom_modules)
            setattr(parent, child, module)
        if isinstance(module, LoraLinear):  # a quantized Conv1D is (out, in) now; the model file keeps (in, out)
            layouts.append(module.fan_in_fan_out or getattr(module.base_layer, "from_conv1d", False))
        module.update_layer(
            adapter_name,
            config.rank_for(name),
            config.alpha_for(name),
            config.lora_dropout,
            config.init_lora_weights,
            config.use_rslora,
            init_options={**(config.loftq_config or {}), **_layer_data(module, config)},
            variant=chosen[name],  # plain LoRA, DoRA, VeLoRA, BD-LoRA (adapters.variants)
            **({"lora_bias": True} if config.lora_bias else {}),  # only then: a kind's update_layer may lack it
        )
    if layouts:  # record the detected layout (True for Conv1D), as PEFT does, so the saved config matches the model
        config.fan_in_fan_out = any(layouts)
    weight_tying.tie_lora(model, ties, adapter_name, wrap, config)  # layers tied to the embedding share its LoRA
    for owner, parameter in parameters:  # after the modules: a parameter's wrapper goes around them, as in PEFT
        wrapper = _parameter_wrapper(model, owner, parameter)
        key = f"{owner}.{parameter}"
        wrapper.update_layer(adapter_name, config.rank_for(key), config.alpha_for(key), config.lora_dropout,
                             config.init_lora_weights, config.use_rslora, variant=variants.for_config(config, key))
    for entry in dict.fromkeys(config.modules_to_save or []):  # PEFT may list a SEQ_CLS head twice
        wrapped: list[str] = []
        for n, _ in plain_modules(model):  # parents before their children: a match inside a match is left to it
            if saved_by(n, [entry]) and not any(n.startswith(f"{w}.") for w in wrapped):
                wrapped.append(n)
        if not wrapped and entry in SEQ_CLS_HEADS:
            continue  # PEFT lists both head names for SEQ_CLS; a model has one of them
        if not wrapped:
            raise TargetError(f"modules_to_save entry {entry!r} matched no module; check the name")
        for name in wrapped:
            parent, child = _parent(model, name)
            module = getattr(parent, child)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                setattr(parent, child, module)
            module.update(adapter_name)
    weight_tying.tie_modules_to_save(model, ties, adapter_name, ModulesToSaveWrapper)
    add_token_adapters(model, config, adapter_name, LoraLayer)  # trainable_token_indices (adapters.trainable_tokens)
    return targets


def _layer_data(module: LoraLayer, config: LoraConfig) -> dict[str, Any]:
    """What a data-driven initializer reads from the layer, taken off its base module (it is used once, as in PEFT):
    for init_lora_weights='corda', the decomposition lorakit.preprocess_corda left there as ``eigens``; for
    'lora_ga', the mean gradient lorakit.preprocess_loraga left there (LORA_GA_GRAD, in the weight's layout; given
    as (out, in)) with the LoraGAConfig settings (_check_lora_ga made sure there is one)."""
    init = str(config.init_lora_weights).lower()
    base = module.get_base_layer()
    if init == "lora_ga":
        grad = getattr(base, LORA_GA_GRAD, None)
        if grad is None or not isinstance(module, LoraLinear) or module.quantized:
            return {}  # the initializer starts as 'kaiming', as PEFT's does (_check_lora_ga warned)
        delattr(base, LORA_GA_GRAD)
        settings = config.lora_ga_config
        return {"grad": module.transpose(grad), "direction": settings.direction, "scale": settings.scale,
                "stable_gamma": settings.stable_gamma}
    if init != "corda":
        return {}
    eigens = getattr(base, "eigens", None)
    if not isinstance(eigens, CordaEigens):
        return {}  # the initializer says to run preprocess_corda
    del base.eigens
    return {"eigens": eigens}


def _check_lora_ga(model: nn.Module, targets: list[str], config: LoraConfig) -> None:
    """Before anything is wrapped, for init_lora_weights='lora_ga': ValueError if a target holds a gradient from
    preprocess_loraga but the config has no lora_ga_config (PEFT's words); a warning naming the Linear / Conv1D
    targets without one, which start as init_lora_weights=True (PEFT does so without a word)."""
    if str(config.init_lora_weights).lower() != "lora_ga":
        return
    bases = {name: _base_of(model.get_submodule(name)) for name in targets}
    with_grad = [name for name, base in bases.items() if hasattr(base, LORA_GA_GRAD)]
    if with_grad and config.lora_ga_config is None:
        raise ConfigError(
            "lora_ga_config must be provided when init_lora_weights='lora_ga'. Please pass "
            "lora_ga_config=LoraGAConfig(...) to LoraConfig (the config given to preprocess_loraga)."
        )
    without = [name for name, base in bases.items() if takes_lora_ga(base) and name not in with_grad]
    if without:
        warnings.warn(
            f"init_lora_weights='lora_ga': {len(without)} target(s) ({without[0]!r}, ...) hold no gradient from "
            "lorakit.preprocess_loraga and start as init_lora_weights=True, on an unchanged base (as in PEFT). That "
            "is right when loading a saved LoRA-GA adapter onto the residual base it was trained on; otherwise run "
            "preprocess_loraga(model, config, train_step) before get_peft_model, or load an adapter saved with "
            "path_initial_model_for_weight_conversion (which applies to the original base)",
            stacklevel=5,
        )


def _base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def takes_lora_ga(module: nn.Module) -> bool:
    """The modules LoRA-GA initializes from a gradient, as PEFT: an nn.Linear or a GPT-2 Conv1D (not quantized);
    other targets of init_lora_weights='lora_ga' start as their kind's init_lora_weights=True."""
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and not hasattr(module, "quant_state")


def _check_lora_bias(model: nn.Module, targets: list[str], parameters: list[tuple[str, str]],
                     custom: CustomKinds | None = None) -> None:
    """ConfigError naming the targets whose kind cannot hold a bias on B (lora_bias=True): embeddings (as PEFT),
    reduced-precision bases, kinds whose update_layer takes no lora_bias, and target_parameters (as PEFT)."""
    refused: dict[str, list[str]] = {}
    for name in targets:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        cls = type(module) if isinstance(module, LoraLayer) else kind_of(module, custom).wrapper
        params = inspect.signature(cls.update_layer).parameters
        keywords = "lora_bias" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        takes = cls.supports_lora_bias and keywords
        if not takes or isinstance(base, REDUCED_PRECISION):
            refused.setdefault(type(base).__name__, []).append(name)
    if parameters:
        refused["nn.Parameter (target_parameters)"] = [f"{owner}.{p}" for owner, p in parameters]
    if refused:
        kind, names = next(iter(refused.items()))
        raise ConfigError(
            f"lora_bias=True is not supported for {kind} layers ({', '.join(names[:3])}"
            f"{' ...' if len(names) > 3 else ''}): leave them out of the targets, or pass lora_bias=False"
        )


def unwrap(
    model: nn.Module, merge: bool, adapter_names: list[str] | None = None, safe_merge: bool = False
) -> nn.Module:
    """Replace every wrapper by its base module (after merging ``adapter_names`` or the active adapters if
    ``merge``); modules_to_save wrappers give back their active trained copy if ``merge``, else the original.

    A LoRA layer on a quantized base (QuantLinear, or a 16-bit embedding / output layer of ``lorakit.quantize``) is not
    merged in place; with ``merge`` it is replaced by a full-precision module (nn.Linear, Conv1D or nn.Embedding)
    holding dequantize(W) + s * B @ A (``merged_linear``), with a warning: the result is not quantized again, because
    quantizing the merged weight adds a rounding error as large as the one the adapter was trained to compensate,
    which undoes much of the fine-tuning."""
    modules = list(wrappers(model))
    merged: dict[str, nn.Module] = {}
    if merge:  # merge everything first, so that a failing safe_merge leaves the wrappers in place
        merged = {n: merged_linear(m, adapter_names, safe_merge) for n, m in modules if _quantized_lora(m)}
        for _, module in unmanaged(modules):
            if isinstance(module, (LoraLayer, TrainableTokensWrapper)) and not _quantized_lora(module):
                module.merge(adapter_names, safe_merge=safe_merge)
    for name, module in reversed(modules):  # children first: a wrapper inside a wrapper (MultiheadAttention's out_proj)
        parent, child = _parent(model, name)
        if isinstance(module, LoraLayer):
            setattr(parent, child, merged.get(name, module.base_layer))
        elif isinstance(module, TrainableTokensWrapper):  # its rows are in the weight now if merged
            setattr(parent, child, module.original_module)
        else:
            setattr(parent, child, module.current if merge else module.original_module)
    if merged:
        warnings.warn(
            f"merge_and_unload: {len(merged)} LoRA layers had a quantized base; they are now full-precision layers "
            "(dequantized W + s * B @ A, fp32) and were not quantized again: quantizing the merged weight would add "
            "a rounding error as large as the one the adapter learned to compensate. Call lorakit.quantize(model) "
            "on the result only if memory matters more than quality",
            stacklevel=3,
        )
    return model


def merged_linear(layer: LoraLayer, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
    """The merge of a LoRA layer whose base has reduced precision (``REDUCED_PRECISION``): a full-precision module of
    the kind the base stands for (``base_layer.full_precision``: nn.Linear, GPT-2 Conv1D or nn.Embedding) with weight
    dequantize(W) + the updates of ``adapter_names`` (default: the active adapters; ``LoraLayer.merged_weight_out_in``,
    in fp32), and the base layer's bias."""
    weight = layer.merged_weight_out_in(adapter_names, safe_merge)  # (out, in)
    return layer.base_layer.full_precision(layer.transpose(weight).contiguous())  # base layout


def _quantized_lora(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) and isinstance(module.base_layer, REDUCED_PRECISION)


def wrappers(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ModulesToSaveWrapper | TrainableTokensWrapper]]:
    """(name, wrapper) of every LoRA layer, modules_to_save wrapper and trainable-token wrapper, parents first."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)):
            yield name, module


def unmanaged(found: Iterable[tuple[str, nn.Module]]) -> Iterator[tuple[str, nn.Module]]:
    """The (name, wrapper) pairs of ``found`` (parents first) but for those inside a LoRA layer that manages the
    layers it holds (``manages_inner``: MultiheadAttention's out_proj), whose merges and state changes it makes."""
    managers: list[str] = []
    for name, module in found:
        if not any(name.startswith(f"{m}.") for m in managers):
            if getattr(module, "manages_inner", False):
                managers.append(name)
            yield name, module


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def parent_and_module(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module, str]:
    """(the parent of module ``name``, the module, its attribute name in the parent): what code that replaces a module
    needs (PEFT's ``_get_submodules``)."""
    parent, child = _parent(model, name)
    return parent, model.get_submodule(name), child  # name '': (model, model, '')
