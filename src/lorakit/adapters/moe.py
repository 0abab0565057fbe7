"""The mixtures of experts that transformers 5 rebuilt: their experts are no longer one ``nn.Linear`` per expert
(transformers 4's ``experts.0.w1`` / ``experts.0.gate_proj``) but fused 3-D parameters of one module
(``mlp.experts.gate_up_proj`` (E, 2 * I, H), ``mlp.experts.down_proj`` (E, H, I)), and the router (``mlp.gate``)
is a module with a ``weight`` parameter instead of an ``nn.Linear``.

PEFT 0.21.2 rewrites a config for these model types before it injects anything
(peft.utils.transformers_weight_conversion, "_convert_peft_config_moe"), and records the rewritten config in
adapter_config.json. lorakit applies the same rule, so that one config adapts the same weights in both libraries and
both write the same file:

- the target names of transformers 4 (``RENAMES``: ``w1`` / ``w3`` / ``w2`` or ``gate_proj`` / ``up_proj`` /
  ``down_proj``, and ``gate``) leave target_modules and become target_parameters (``gate_up_proj``, ``down_proj``,
  ``gate.weight``); every other Linear of those names is then no target either (e.g. DeepSeek's dense MLPs and
  shared experts: PEFT leaves them unadapted, and so does lorakit);
- ``"all-linear"`` stands for the names of the Linear layers plus all of RENAMES' names (the experts and the router
  were Linear layers in transformers 4), and a regex for the last names of what it matches;
- two names fused into one parameter (w1 and w3 into gate_up_proj) must come together, and the fused parameter gets
  rank 2 * r and alpha 2 * alpha (rank_pattern / alpha_pattern), so that alpha / r is kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from lorakit.config import ALL_LINEAR, LoraConfig

_MIXTRAL = {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}
_QWEN2_MOE = {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
# the model types PEFT 0.21.2 converts under transformers 5 (transformers' conversion table, the entries whose
# pattern is 'mixtral' or 'qwen2_moe'; tests/adapters/test_parameter.py checks the table against transformers')
FAMILIES: dict[str, str] = {
    **dict.fromkeys(["mixtral", "minimax", "minimax_m2"], "mixtral"),
    **dict.fromkeys(
        ["Dots3NoteTextModel", "UnlimitedOcrTextModel", "afmoe", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3",
         "deepseek_v32", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm4v_moe",
         "glm_moe_dsa", "hunyuan_v1_moe", "longcat_flash", "mellum", "olmoe", "qwen3_moe", "qwen3_next",
         "qwen3_omni_moe", "qwen3_omni_moe_text", "qwen3_omni_moe_thinker", "sarvam_mla", "solar_open"],
        "qwen2_moe",
    ),
}
# family -> {transformers 4 target name: transformers 5 parameter name}
RENAMES: dict[str, dict[str, str]] = {"mixtral": _MIXTRAL, "qwen2_moe": _QWEN2_MOE}
# family -> {fused parameter: the transformers 4 names it holds, in order}
FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"gate_up_proj": ("w1", "w3")},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")},
}


def family_of(model: nn.Module) -> str | None:
    """'mixtral' or 'qwen2_moe' for a model whose config the rule rewrites, else None."""
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))


def generated(model: nn.Module, entry: str) -> bool:
    """Whether target_parameters entry ``entry`` is one the rule writes for this model's type: such an entry may match
    nothing in a model of the family (HunYuan's router has no ``gate.weight``), as in PEFT."""
    family = family_of(model)
    return family is not None and entry in RENAMES[family].values()


def convert_config(model: nn.Module, config: LoraConfig, linear_names: Callable[[], list[str]]) -> None:
    """Rewrite ``config`` in place for a transformers-5 MoE model (see the module docstring); nothing for other
    models, or when target_modules is None (the caller resolves the default first). ``linear_names`` gives the full
    names of the modules all-linear wraps. ValueError if only one of two fused names is targeted."""
    family = family_of(model)
    spec = config.target_modules
    if family is None or spec is None:
        return
    renames, fused = RENAMES[family], FUSED[family]
    if isinstance(spec, str):
        names = _string_targets(model, spec, renames, linear_names)
        if not names:
            return  # the regex matches nothing: the caller's error names it
    else:
        names = set(spec)
    parameters = set(config.target_parameters or [])
    modules: set[str] = set()
    fused_hits: dict[str, set[str]] = {new: set() for new in fused}
    for target in names:
        old = next((o for o in renames if target == o or target.endswith(f".{o}")), None)
        if old is None:
            modules.add(target)
            continue
        parameters.add(renames[old])
        fused_hits.get(renames[old], set()).add(old)
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for new, olds in fused.items():
        hits = fused_hits[new]
        if 0 < len(hits) < len(olds):
            missing = ", ".join(sorted(set(olds) - hits))
            raise ValueError(
                f"target_modules names {', '.join(sorted(hits))} but not {missing}: in this "
                f"{model.config.model_type} model (transformers 5) they are one fused parameter, {new}; target "
                "all of them, or none"
            )
        if len(hits) == len(olds) > 1:  # one rank-r update per old name: rank and alpha add up, alpha / r is kept
            rank_pattern[rf".*\.{re.escape(new)}"] = config.r * len(olds)
            alpha_pattern[rf".*\.{re.escape(new)}"] = config.lora_alpha * len(olds)
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    config.target_parameters = sorted(parameters)
    config.target_modules = sorted(modules)


def _string_targets(
    model: nn.Module, spec: str, renames: dict[str, str], linear_names: Callable[[], list[str]]
) -> set[str]:
    """The last names that a string target_modules stands for: 'all-linear' -> the Linear layers' and every RENAMES
    name; a regex -> the last names of the modules and parameters it matches in full, and the transformers 4 names
    whose old key (``<experts>.gate_proj`` beside the parameter ``<experts>.gate_up_proj``) it would have matched."""
    if spec.lower() == ALL_LINEAR:
        return {name.rsplit(".", 1)[-1] for name in linear_names()} | renames.keys()
    keys = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    names = {key.rsplit(".", 1)[-1] for key in keys if re.fullmatch(spec, key)}
    containers: dict[str, set[str]] = {}
    for key, _ in model.named_parameters():
        container, _, leaf = key.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old, new in renames.items():
        if old not in names and any(re.fullmatch(spec, f"{c}.{old}") for c in containers.get(new, ())):
            names.add(old)
    return names
