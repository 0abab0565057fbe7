"""The rules that decide whether a module name is an adapter's target: pure functions of names and a config, no model
(adapters/find.py applies them to a model). Also here: the default targets by model type, the condensed form of a
long target list, and the words of the errors and warnings when targets match too little.

One rule serves lorakit's injection (``adapters.find.find_targets``) and PEFT's helper of the same contract
(``check_target_module_exists``), in this order, as PEFT 0.21.2 applies it:

1. excluded: ``exclude_modules`` names the module (a str: full regex match; a list: the name or a dotted suffix), or
   it is, or sits inside, a module ``modules_to_save`` names (those are trained in full, never wrapped): by whole
   name parts, PEFT's rule, or, lorakit's addition, as a string suffix (``saved_by``: the copies PEFT trains);
2. ``target_modules`` as a str: a full regex match (``re.Match`` or None);
3. a list entry equal to the whole name: a match, whatever ``layers_to_transform`` says (the name is explicit);
4. a list entry as a dotted suffix ('q_proj' matches 'model.layers.0.self_attn.q_proj'), then, if
   ``layers_to_transform`` is given (an int or a non-empty list), only in those layers: the index after the first
   ``layers_pattern`` entry that occurs in the name ('model.layers.3.mlp.up_proj' with 'layers' -> 3), or, without a
   pattern, the first number that follows a name part.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Collection, Iterable
from typing import Any

from lorakit.config import PeftError, pattern_key

# target_modules=None picks these, by transformers' model_type: the attention's query and value projections (or the
# fused qkv layer), for the same model types and with the same targets as PEFT 0.21.2, and two PEFT lacks (phi3,
# distilbert: PEFT asks for target_modules there). A string is a regex over the full module name, as in a config.
_QV = ["q_proj", "v_proj"]
_FUSED = ["query_key_value"]
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    # decoders with q_proj / v_proj
    **dict.fromkeys(["llama", "llama4", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "opt", "gptj", "gpt_neo", "stablelm", "bart"], _QV),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",  # multimodal: the language model's layers only
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "codegen": ["qkv_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # fused query / key / value
    **dict.fromkeys(["bloom", "gpt_neox", "chatglm", "falcon", "RefinedWeb", "RefinedWebModel"], _FUSED),
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "btlm": ["c_proj", "c_attn"],
    "mpt": ["Wqkv"],
    # encoders
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm"], ["query", "value"]),
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    # encoder-decoders and vision-language
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    # recurrent
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


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


def warn_unmatched_patterns(config: Any, targeted: list[str]) -> None:
    """RuntimeWarning, in PEFT's words, for each of rank_pattern / alpha_pattern with keys that pick no target's
    rank or alpha (a typo there would leave every layer at r / lora_alpha without a word)."""
    for field in ("rank_pattern", "alpha_pattern"):
        unmatched = unmatched_pattern_keys(getattr(config, field), targeted)
        if unmatched:
            warnings.warn(
                f"The following {field} keys did not match any targeted module and were ignored: {unmatched}.",
                RuntimeWarning,
                stacklevel=4,
            )


CONDENSE_FROM = 20  # target lists this long are recorded condensed, as PEFT records them (its
# MIN_TARGET_MODULES_FOR_OPTIMIZATION)


def condensed(targets: Collection[str], names: Iterable[str]) -> list[str]:
    """A long target list as short dotted suffixes that select the same modules among ``names`` (all the model's
    module names), sorted: ``minimal_suffixes`` against every name no target selects. PEFT writes its target
    lists of 20 entries or more in this form, so lorakit does too: the saved files match. E.g. every q and v of a T5
    -> ['q', 'v'] when no other module's name ends with 'q' or 'v'."""
    wanted = set(targets)
    others = [n for n in names if n not in wanted and not any(n.endswith(f".{t}") for t in wanted)]
    return sorted(minimal_suffixes(wanted, others))


def unmatched_entry(spec: Collection[str] | str, names: list[str]) -> str | None:
    """The error for the first entry of ``spec`` that matches none of ``names`` (with the closest names), or None."""
    entries = [spec] if isinstance(spec, str) else spec
    for entry in entries:
        one = entry if isinstance(spec, str) else [entry]  # the entry as ``matches`` reads a spec of its kind
        if not any(matches(n, one) for n in names):
            short = sorted({n.rsplit(".", 1)[-1] for n in names})
            close = difflib.get_close_matches(entry, short, n=3, cutoff=0.5) or short[:12]
            return (  # PEFT's words first
                f"Target modules {{{entry!r}}} not found in the base model: {entry!r} matched nothing; did you mean "
                f"{' or '.join(map(repr, close))}?"
            )
    return None


def no_match_error(config: Any, spec: Collection[str] | str, names: list[str], excluded: list[str],
                   unmatched: list[str]) -> NoMatchingPeftModuleError:
    """The NoMatchingPeftModuleError for an adapter that wraps nothing, in PEFT's words for the case (every match
    excluded; no target_modules at all; nothing matched; matches excluded and the rest unmatched), then lorakit's
    hint: the entry that matched nothing and the closest module names, or the layer options."""
    layers = "".join(
        f" You specified {k!r}: {getattr(config, k)!r}." for k in ("layers_to_transform", "layers_pattern")
        if getattr(config, k) not in (None, "", [])
    )
    hint = unmatched_entry(spec, names) or ""
    if excluded and not unmatched:
        message = ("All modules were excluded. This is likely unintended. Check your `target_modules`, "
                   "`exclude_modules` and `modules_to_save` configuration.")
    elif not excluded and not spec:
        message = ("No `target_modules` passed but also no `target_parameters` found. Please check the values for "
                   "these arguments: name modules in target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear') or "
                   "parameters in target_parameters.")
    elif not excluded:
        shown = spec if isinstance(spec, str) else "{" + ", ".join(map(repr, sorted(spec))) + "}"
        message = (f"Target modules {shown} not found in the base model. Please check the target modules and try "
                   "again.")
    else:
        message = ("No modules were targeted for adaptation. This might be caused by a combination of mismatched "
                   "target modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
                   "configuration. You may also have only targeted modules that are marked to be saved "
                   "(`modules_to_save`).")
    return NoMatchingPeftModuleError(" ".join(x for x in (message + layers, hint) if x))
