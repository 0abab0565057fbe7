"""The rules that decide whether a module name is an adapter's target: pure functions of names and a config, no model.

One rule serves lorakit's injection (``adapters.inject.find_targets``) and PEFT's helper of the same contract
(``check_target_module_exists``), in this order, as PEFT 0.21.2 applies it:

1. excluded: ``exclude_modules`` names the module (a str: full regex match; a list: the name or a dotted suffix), or
   it is, or sits inside, a module ``modules_to_save`` names (those are trained in full, never wrapped);
2. ``target_modules`` as a str: a full regex match (``re.Match`` or None);
3. a list entry equal to the whole name: a match, whatever ``layers_to_transform`` says (the name is explicit);
4. a list entry as a dotted suffix ('q_proj' matches 'model.layers.0.self_attn.q_proj'), then, if
   ``layers_to_transform`` is given (an int or a non-empty list), only in those layers: the index after the first
   ``layers_pattern`` entry that occurs in the name ('model.layers.3.mlp.up_proj' with 'layers' -> 3), or, without a
   pattern, the first number that follows a name part.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

from lorakit.config import PeftError, pattern_key


class TargetError(ValueError):
    """target_modules / modules_to_save name modules that do not exist or cannot be wrapped."""


class NoMatchingPeftModuleError(TargetError, PeftError):
    """The adapter being injected matched no module and no parameter of the model (PEFT's error of this name)."""


class Excluded:
    """What the match of an excluded module returns (PEFT's ``_ExcludedModule``): false, like no match, but told apart
    from it by type, so that an adapter whose every target is excluded gets its own error."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "Excluded()"


def name_matches(name: str, entry: str) -> bool:
    """A list entry matches a module name exactly or as a dotted suffix ('q_proj' matches 'layers.0.q_proj')."""
    return name == entry or name.endswith(f".{entry}")


def matches(name: str, spec: Collection[str] | str | None) -> bool:
    """str: full regex match; list: exact or dotted-suffix match of any entry."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name_matches(name, e) for e in spec)


def saved_by(name: str, modules_to_save: Iterable[str]) -> bool:
    """Whether a modules_to_save entry names the module: its name ends with the entry as a string, PEFT's rule, so
    that both libraries train and save the same copies ('classifier' also names DistilBERT's 'pre_classifier')."""
    return any(name.endswith(entry) for entry in modules_to_save)


def in_saved(name: str, modules_to_save: Iterable[str]) -> bool:
    """Whether the module is, or is inside, one that a modules_to_save entry names by whole name parts (PEFT's rule
    for keeping LoRA targets out of modules to save)."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index of the layer list a module sits in ('model.layers.3.mlp' -> 3): the number after the first
    ``layers_pattern`` entry (a regex) found in the name, or, without a pattern (None, '' or []), the first number
    after a name part. The first one, so that an expert index ('layers.1.experts.0.w1') is not taken for the layer.
    None if the name has none."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) and layers_pattern else (layers_pattern or [])
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for rx in regexes:
        m = re.match(rx, name)
        if m:
            return int(m.group("idx"))
    return None


def in_layers(name: str, layers_to_transform: list[int] | int | None, layers_pattern: list[str] | str | None) -> bool:
    """Whether the module sits in one of ``layers_to_transform`` (always true when that is None or [])."""
    if layers_to_transform is None or layers_to_transform == []:
        return True
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    return layer_index(name, layers_pattern) in wanted


def excluded_by(config: Any, name: str) -> bool:
    """Whether the config's exclude_modules names the module (as target_modules would)."""
    exclude = getattr(config, "exclude_modules", None)
    return bool(exclude) and matches(name, exclude)


def is_excluded(config: Any, name: str) -> bool:
    """Rule 1: exclude_modules names the module, or modules_to_save names it or a module it is in."""
    saved = getattr(config, "modules_to_save", None) or []
    return excluded_by(config, name) or in_saved(name, saved) or saved_by(name, saved)


Match = bool | re.Match[str] | Excluded | None  # true: a target; false: not one (Excluded: kept out by rule 1)


def module_match(config: Any, name: str, spec: Collection[str] | str | None = None) -> Match:
    """Whether module ``name`` is a target of ``config`` (the rules of this module's docstring): a true value (True
    or the regex match) if it is, False / None if not, ``Excluded()`` (false too) if rule 1 keeps it out. ``spec`` is
    the config's target_modules made concrete for a model (a default or 'all-linear' resolved); it defaults to
    ``config.target_modules`` itself."""
    if is_excluded(config, name):
        return Excluded()
    spec = config.target_modules if spec is None else spec
    if spec is None:
        return False  # parameters only (target_parameters), or a default not resolved for a model
    if isinstance(spec, str):
        return re.fullmatch(spec, name)
    if name in spec:
        return True
    if not any(name.endswith(f".{entry}") for entry in spec):
        return False
    return in_layers(name, getattr(config, "layers_to_transform", None), getattr(config, "layers_pattern", None))


def check_target_module_exists(config: Any, key: str) -> Match:
    """PEFT's ``check_target_module_exists(config, key)``: ``module_match`` on the config's own target_modules."""
    return module_match(config, key)


def minimal_suffixes(targets: Collection[str], others: Collection[str]) -> set[str]:
    """Short dotted suffixes that select exactly ``targets`` among ``targets`` + ``others`` (two disjoint sets of
    module names): for each target, its shortest suffix in whole name parts that no name of ``others`` ends with (the
    target itself if every shorter one is taken). E.g. every q_proj and v_proj of a model -> {'q_proj', 'v_proj'} when
    no other module's name ends with either. PEFT condenses long target lists this way
    (``_find_minimal_target_modules``), which lorakit follows so that the saved configs agree.
    ValueError for a str or an empty collection, an empty name, or a name in both."""
    if isinstance(targets, str) or not targets:
        raise ValueError("target_modules should be a list or set of strings.")
    wanted = set(targets)
    if "" in wanted:
        raise ValueError("target_modules should not contain an empty string.")
    if not wanted.isdisjoint(others):
        raise ValueError(
            "target_modules and other_module_names contain common elements, this should not happen, please "
            "open a GitHub issue at https://github.com/huggingface/peft/issues with the code to reproduce this issue"
        )
    taken = {".".join(parts[i:]) for parts in (n.split(".") for n in others) for i in range(len(parts))}
    short = set()
    for target in wanted:
        parts = target.split(".")
        suffixes = (".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1))  # shortest first
        short.add(next((s for s in suffixes if s not in taken), target))
    return short


def unmatched_pattern_keys(patterns: dict[str, Any] | None, names: Iterable[str]) -> list[str]:
    """The keys of a rank_pattern / alpha_pattern that match none of ``names`` by the rule that picks a module's
    rank (``lorakit.config.pattern_key``: the key as a regex on the end of the name, at a dot boundary); sorted."""
    names = list(names)
    return sorted(k for k in patterns or {} if not any(pattern_key({k: None}, n) is not None for n in names))
