"""Which modules an adapter wraps, and the wrapping / unwrapping itself. The model class is never subclassed."""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from lorakit.adapters import moe, variants, weight_tying
from lorakit.adapters.kinds import CustomKinds, is_linear, is_wrappable, kind_names, kind_of, wrap
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.linear import LoraLinear
from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.adapters.parameter import LoraParameter
from lorakit.adapters.targets import (
    CONDENSE_FROM,
    DEFAULT_TARGETS,
    Excluded,
    TargetError,
    condensed,
    excluded_by,
    in_saved,
    module_match,
    name_matches,
    no_match_error,
    saved_by,
    unmatched_entry,
    warn_unmatched_patterns,
)
from lorakit.adapters.trainable_tokens import TrainableTokensWrapper, add_token_adapters
from lorakit.config import ALL_LINEAR, ConfigError, LoraConfig, TaskType
from lorakit.ops.corda import CordaEigens
from lorakit.quant.half import REDUCED_PRECISION
from lorakit.quant.linear import is_conv1d

SEQ_CLS_HEADS = ("classifier", "score")
QA_HEADS = ("qa_outputs",)  # the span head of *ForQuestionAnswering models
# The heads the task classes train in full (modules_to_save), which all-linear leaves out. PEFT leaves out only the
# SEQ_CLS head; its TOKEN_CLS and QUESTION_ANS classes then fail on the head that all-linear adapted ("modules_to_save
# cannot be applied to lora.Linear"), when making the model and when loading a file that lists the head.
TASK_HEADS = {TaskType.SEQ_CLS: SEQ_CLS_HEADS, TaskType.TOKEN_CLS: SEQ_CLS_HEADS, TaskType.QUESTION_ANS: QA_HEADS}
# Mamba mixers whose fused training kernel (mamba_ssm's mamba_split_conv1d_scan_combined, used whenever it is
# installed) reads ``out_proj.weight`` itself instead of calling the layer: a LoRA wrapper there would be bypassed
# without a word. PEFT refuses these targets for these model types (tuners_utils._check_lora_target_modules_mamba);
# lorakit refuses them when named and leaves them out of all-linear.
MAMBA_MODEL_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
MAMBA_BYPASSED = frozenset({"out_proj", "conv1d"})
# Layers whose weight the model reads itself on every path, never calling the layer: Jamba's Mamba mixer computes
# ``dt_proj.weight @ time_step``. A LoRA adapter there gets no gradient and changes the outputs only once merged.
# PEFT 0.21.2 adapts them anyway (all-linear included); lorakit leaves them out of all-linear and warns when they are
# named (so that a PEFT file naming them still loads).
READ_AS_WEIGHT: dict[str, frozenset[str]] = {"jamba": frozenset({"dt_proj"})}
# where lorakit.preprocess_loraga leaves a target's mean gradient (PEFT's attribute name, so either library's
# preprocessing serves the other's get_peft_model), until the adapter takes it (_layer_data)
LORA_GA_GRAD = "_peft_loraga_grad"


def plain_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the model, not descending into LoRA wrappers, modules_to_save copies or trainable-token
    wrappers."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop(0)
        if name:
            yield name, module
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)):
            continue
        stack[:0] = [(f"{name}.{c}" if name else c, child) for c, child in module.named_children()]


def all_linear_targets(model: nn.Module, task_type: TaskType | str | None) -> list[str]:
    """Every Linear / Conv1D except the output layer (lm_head) or, for classification, the head."""
    excluded: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    heads = [out] if out is not None else []
    if out is None and task_type in TASK_HEADS:
        heads = [getattr(model, h) for h in TASK_HEADS[task_type] if isinstance(getattr(model, h, None), nn.Module)][:1]
    for name, module in plain_modules(model):
        if any(module is h for h in heads) or _bypassed_by_mamba_kernel(model, name) or _read_as_weight(model, name):
            excluded.add(name)
    return [n for n, m in plain_modules(model) if is_linear(m) and n not in excluded]


def _read_as_weight(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` is one whose weight the model reads without calling it (READ_AS_WEIGHT)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return name.rsplit(".", 1)[-1] in READ_AS_WEIGHT.get(model_type, ())


def _bypassed_by_mamba_kernel(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` is one that a Mamba mixer's fused kernel reads the weight of (MAMBA_BYPASSED)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type in MAMBA_MODEL_TYPES and name.rsplit(".", 1)[-1] in MAMBA_BYPASSED


def resolve_target_spec(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """The config's target_modules made concrete: None -> the architecture default, 'all-linear' -> names."""
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS and config.target_parameters:
            return []  # parameters only, as PEFT does for a model without a default
        if model_type not in DEFAULT_TARGETS:
            raise TargetError(
                f"Please specify `target_modules` in `peft_config`: there is no default for model_type "
                f"{model_type!r} (e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear')"
            )
        default = DEFAULT_TARGETS[model_type]
        return default if isinstance(default, str) else list(default)
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        # recorded as PEFT records it, but for a module a modules_to_save entry names only by PEFT's string-suffix rule
        # (DistilBERT's pre_classifier for 'classifier'): PEFT would adapt it and then fail to save it in full
        saved = config.modules_to_save or []
        return [n for n in all_linear_targets(model, config.task_type) if in_saved(n, saved) or not saved_by(n, saved)]
    return spec


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules ``config`` wraps, in model order, by the rules of ``adapters.targets`` (module_match).
    Raises NoMatchingPeftModuleError (a TargetError) when it wraps nothing and names no parameter either, TargetError
    if any target entry matches nothing (with the closest module names; PEFT only warns) or a match is a module type
    that cannot be wrapped. Warns, as PEFT, when exclude_modules excludes nothing."""
    if config.target_modules in ("", []) and config.target_parameters:
        return []  # parameters only
    spec = resolve_target_spec(model, config)
    modules = dict(plain_modules(model))
    found: list[str] = []
    excluded: list[str] = []
    unmatched: list[str] = []
    for name, module in modules.items():
        result = module_match(config, name, spec)
        if isinstance(result, Excluded):
            excluded.append(name)  # exclude_modules, or trained in full (modules_to_save), or inside such a module
            continue
        if not result:
            unmatched.append(name)
            continue
        if _bypassed_by_mamba_kernel(model, name):
            raise TargetError(
                f"target module {name!r} of this {model.config.model_type} model is read by the Mamba kernel as a "
                "plain weight, so a LoRA adapter there would be ignored (PEFT refuses it too); leave it out of "
                f"target_modules, e.g. exclude_modules=[{name.rsplit('.', 1)[-1]!r}]"
            )
        if _read_as_weight(model, name):
            warnings.warn(
                f"target module {name!r} of this {model.config.model_type} model is never called: the model reads its "
                "weight itself, so its LoRA adapter gets no gradient and changes the outputs only once merged; leave "
                f"it out of target_modules, e.g. exclude_modules=[{name.rsplit('.', 1)[-1]!r}]",
                stacklevel=4,
            )
        if isinstance(module, LoraParameter):
            raise TargetError(
                f"target module {name!r} has LoRA on its parameter {module.parameter_name!r} "
                "(target_parameters); a module target cannot wrap it. Leave it out of target_modules"
            )
        if not is_wrappable(module, config._custom_modules) and not isinstance(module, LoraLayer):
            raise TargetError(
                f"target module {name!r} is a {type(module).__name__}; lorakit wraps {kind_names()}. Name its "
                "linear sub-layers instead, or register a LoRA layer for its class: "
                "config._register_custom_module({its class: a LoraLayer subclass}) (lorakit.adapters.kinds)"
            )
        found.append(name)
    if not found and not config.target_parameters:
        raise no_match_error(config, spec, list(modules), excluded, unmatched)
    if not _is_default(model, config.target_modules):
        _check_every_entry_matched(spec, list(modules))
    if config.exclude_modules and not any(excluded_by(config, n) for n in excluded):
        warnings.warn(  # PEFT's words (a UserWarning)
            f"You have passed exclude_modules={config.exclude_modules} but no modules were excluded. Please check "
            "that exclude_modules was set correctly.",
            stacklevel=4,
        )
    return found


def _is_default(model: nn.Module, target_modules: list[str] | str | None) -> bool:
    """Whether target_modules is the model type's default, given as None or recorded in a saved config. A default
    serves every variant of its architecture, so not each entry must match: BLIP-2's (q, v, q_proj, v_proj) names
    the q / v of its language model if that is a Flan-T5, q_proj / v_proj if an OPT (PEFT accepts it on both)."""
    if target_modules is None:
        return True
    default = DEFAULT_TARGETS.get(getattr(getattr(model, "config", None), "model_type", None))
    if isinstance(default, str) or isinstance(target_modules, str):
        return default == target_modules
    return default is not None and sorted(default) == sorted(target_modules)


def _check_every_entry_matched(spec: list[str] | str, names: list[str]) -> None:
    """Every entry of a target list (or the regex) must match some module: unlike PEFT (its issue #1959, where it
    only warns when no module matched at all), a typo in one entry is an error even when other entries match."""
    message = unmatched_entry(spec, names)
    if message:
        raise TargetError(message)


def find_parameters(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """(module name, parameter name) of every parameter ``config.target_parameters`` names (an entry matches the
    parameter's full name exactly or as a dotted suffix), in model order and, within a module, in the order it
    registers them. Raises TargetError if an entry matches nothing (but for the names moe.convert_config writes,
    which a model of the family may lack), if a parameter belongs to a module target_modules wraps, or to the
    model itself, or if other adapters of the model target other parameters."""
    entries = list(config.target_parameters or [])
    if not entries:
        return []
    for pname, _ in model.named_parameters(recurse=False):
        if any(name_matches(pname, e) for e in entries):
            raise TargetError(
                f"Targeting an nn.Parameter on the top-level module is not supported (parameter {pname!r}): LoRA on a "
                "parameter wraps the module that owns it, and the model itself has no parent. Target a parameter of "
                "a submodule"
            )
    found: list[tuple[str, str]] = []
    hit: set[str] = set()
    saved = config.modules_to_save or []
    for name, module in plain_modules(model):
        owner = module.get_base_layer() if isinstance(module, LoraParameter) else module
        if isinstance(module, LoraLayer) and not isinstance(module, LoraParameter):
            owner = module.base_layer
        for pname in _own_parameter_names(owner):
            key = f"{name}.{pname}"
            matched = [e for e in entries if name_matches(key, e)]
            if not matched or in_saved(name, saved):
                continue
            if isinstance(module, LoraLayer) and not isinstance(module, LoraParameter):
                raise TargetError(  # PEFT's words first (its tests match them)
                    f"Trying to wrap an `nn.Parameter` of layer {name!r} of type {type(module.base_layer).__name__}, "
                    f"which is not a valid target. Target parameter {key!r} belongs to {name!r}, which "
                    "target_modules wraps already; leave it out of one of target_modules and target_parameters"
                )
            hit.update(matched)
            found.append((name, pname))
    for entry in entries:
        if entry not in hit and not moe.generated(model, entry):
            close = difflib.get_close_matches(entry, sorted({n for n, _ in model.named_parameters()}), n=3, cutoff=0.3)
            nothing = (  # PEFT's words when no module is targeted either
                "No `target_modules` passed but also no `target_parameters` found. Please check the values for "
                "these arguments. " if not config.target_modules else ""
            )
            raise TargetError(
                f"{nothing}target parameter {entry!r} matched nothing; did you mean "
                f"{' or '.join(map(repr, close)) or '?'}? Give a parameter's name or its dotted suffix (e.g. "
                "'experts.gate_up_proj')"
            )
    existing = {(n, w.parameter_name) for n, w in _parameter_wrappers(model) if w.r}
    if existing and found and set(found) != existing:
        raise TargetError(
            f"the adapters of this model adapt the parameters {sorted(existing)}, the new one {sorted(found)}: all "
            "adapters must target the same set of parameters (as in PEFT: one set of wrappers serves them all)"
        )
    return found


def _own_parameter_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s own parameters, a parametrized one (torch.nn.utils.parametrize) by its name."""
    names = [n for n, _ in module.named_parameters(recurse=False)]
    return names + list(getattr(module, "parametrizations", {}))


def _parameter_wrappers(model: nn.Module) -> Iterator[tuple[str, LoraParameter]]:
    """(owner module name, wrapper) of every LoraParameter, nested ones named by their owner too."""
    for name, module in plain_modules(model):
        while isinstance(module, LoraParameter):
            yield name, module
            module = module.base_layer


def targeted_parameters(model: nn.Module) -> list[str]:
    """'<module>.<parameter>' of every parameter a LoraParameter adapts, in model order and, within a module, in the
    order it registers them (the innermost wrapper first), as PEFT lists its targeted_parameter_names."""
    names: list[str] = []
    for name, module in plain_modules(model):
        chain = []
        while isinstance(module, LoraParameter):
            chain.append(f"{name}.{module.parameter_name}")
            module = module.base_layer
        names += reversed(chain)
    return names


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
