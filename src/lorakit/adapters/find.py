"""Finding an adapter's targets in a model: the modules and parameters a config wraps, by the name rules of
``adapters.targets`` applied to the model's modules (what 'all-linear' and target_modules=None stand for, the heads
and the layers a Mamba kernel or a model reads as plain weights left out), and the parameters LoraParameter wrappers
adapt. Nothing is wrapped here (adapters/inject.py does that)."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterator

from torch import nn

from lorakit.adapters import moe
from lorakit.adapters.kinds import is_linear, is_wrappable, kind_names
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.adapters.parameter import LoraParameter
from lorakit.adapters.targets import (
    DEFAULT_TARGETS,
    Excluded,
    TargetError,
    excluded_by,
    in_saved,
    module_match,
    name_matches,
    no_match_error,
    saved_by,
    unmatched_entry,
)
from lorakit.adapters.trainable_tokens import TrainableTokensWrapper
from lorakit.config import ALL_LINEAR, LoraConfig, TaskType

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
