"""The checks of a LoraConfig's values, run by ``LoraConfig.validate`` (when a config is made): each field's type and
range, and the combinations of fields that neither PEFT nor lorakit supports. A failure is a ConfigError naming the
field, its value and what it accepts."""

from __future__ import annotations

import math
import types
from typing import Any

from lorakit.config_base import ConfigError, ConfigTypeError

# lorakit.ops.init imports torch; a LoraConfig is made and checked without it (``lorakit train`` checks its options
# before torch loads), so ``_init()`` imports it where an initializer name is looked up.

BIAS_MODES = ("none", "all", "lora_only")


def check_config(config: Any) -> None:
    """Raise ConfigError naming the first invalid field of ``config`` (a LoraConfig) and what it accepts."""
    _check_rank("r", config.r)
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(getattr(config, name), dict):
            raise ConfigError(f"{name}={getattr(config, name)!r} must be a dict {{module name regex: value}}")
    for key, r in config.rank_pattern.items():
        _check_rank(f"rank_pattern[{key!r}]", r)
    _check_alpha("lora_alpha", config.lora_alpha)
    for key, a in config.alpha_pattern.items():
        _check_alpha(f"alpha_pattern[{key!r}]", a)
    if not isinstance(config.lora_dropout, (int, float)) or not 0.0 <= config.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout={config.lora_dropout!r} must be a number in [0, 1), e.g. 0.05")
    if config.bias not in BIAS_MODES:
        raise ConfigError(f"bias={config.bias!r} is unknown; use one of: {', '.join(BIAS_MODES)}")
    init = None if isinstance(config.init_lora_weights, bool) else _init()  # True / False need no table
    if init is not None and not init.is_known(config.init_lora_weights):
        allowed = ", ".join(["True", "False", *map(repr, init.INITIALIZERS), init.PISSA_NITER_HELP])
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} is unknown; use one of: {allowed}")
    if isinstance(config.target_modules, str) and (config.layers_to_transform is not None or config.layers_pattern):
        # PEFT refuses this combination, so an adapter saved with it could not be loaded there
        which = "layers_to_transform" if config.layers_to_transform is not None else "layers_pattern"
        raise ConfigError(
            f"`{which}` cannot be used when `target_modules` is a str ({config.target_modules!r}); list "
            "the module names, or put the layer index into the regex"
        )
    if config.layers_pattern and config.layers_to_transform is None:
        raise ConfigError(
            "When `layers_pattern` is specified, `layers_to_transform` must also be specified. Set both, or neither"
        )
    if config.target_parameters is not None and (
        not isinstance(config.target_parameters, list) or not all(isinstance(t, str) for t in config.target_parameters)
    ):
        raise ConfigTypeError(  # PEFT's words first (its tests match them)
            f"`target_parameters` must be a list of strings or None. target_parameters={config.target_parameters!r} "
            "must be a list of parameter names (a regex is not "
            "supported, as in PEFT), e.g. ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']"
        )
    if config.lora_bias and (config.init_lora_weights not in (True, False) or config.use_dora):
        # PEFT refuses both (its wording, which its tests match): an initializer that moves part of W into A and B
        # has no bias to move, and DoRA's row norm has no place for one
        raise ConfigError(
            "The argument lora_bias=True is only supported with init_lora_weights=True or False and without "
            f"DoRA, got init_lora_weights={config.init_lora_weights!r}, use_dora={config.use_dora}; pass "
            "lora_bias=False, or init_lora_weights=True and use_dora=False"
        )
    _check_token_indices(config.trainable_token_indices)
    _check_invocation(config.alora_invocation_tokens)
    _check_replication(config.layer_replication)
    rewrites_base = str(config.init_lora_weights).lower() == "loftq" or (
        init is not None and init.mutates_base(config.init_lora_weights)
    )
    if config.layer_replication and (config.kasa_config is not None or rewrites_base):
        what = "kasa_config" if config.kasa_config is not None else f"init_lora_weights={config.init_lora_weights!r}"
        raise ConfigError(  # PEFT takes it, and each copy then rewrites the base weight all copies share
            f"layer_replication with {what} is not supported: that option rewrites the base weight of each "
            "adapted layer, and the replicated layers share one base weight, so each copy would undo the others'; "
            "use init_lora_weights=True, 'gaussian' or False, or drop layer_replication"
        )
    config.variant_names()  # at most one
    if config.use_bdlora and init is not None and (init.mutates_base(config.init_lora_weights) or
                                                   str(config.init_lora_weights).lower() == "loftq"):
        raise ConfigError(  # PEFT takes it, and its block-diagonal factor then replaces half of the fitted pair
            f"use_bdlora with init_lora_weights={config.init_lora_weights!r} is not supported: that initializer "
            "moves part of the base weight into A and B, and BD-LoRA replaces one of them by a block-diagonal "
            "factor, so the model would not start as the base model; use init_lora_weights=True or 'gaussian'"
        )


def _check_rank(name: str, r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{name}={r!r} must be a positive integer rank, e.g. 8")


def _check_token_indices(indices: Any) -> None:
    """trainable_token_indices: None, a list of token ids (int >= 0), or {module name: such a list}."""
    if indices is None:
        return
    lists = indices.items() if isinstance(indices, dict) else [("", indices)]
    for name, ids in lists:
        where = f"trainable_token_indices[{name!r}]" if name else "trainable_token_indices"
        if not isinstance(ids, (list, tuple)) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise ConfigError(
                f"{where}={ids!r} must be a non-empty list of token ids (integers >= 0), e.g. [0, 5]; or give "
                "{embedding module name: [ids]}"
            )


def _check_invocation(tokens: Any) -> None:
    """alora_invocation_tokens: None, or a non-empty list of token ids (int >= 0)."""
    if tokens is not None and (not isinstance(tokens, list) or not tokens or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens
    )):
        raise ConfigError(
            f"alora_invocation_tokens={tokens!r} must be a non-empty list of token ids (integers >= 0), e.g. "
            "tokenizer.encode('<|assistant|>', add_special_tokens=False); or None for plain LoRA"
        )


def _check_replication(ranges: Any) -> None:
    """layer_replication: None, or a list of [start, end) pairs of layer indices with 0 <= start < end (the end is
    checked against the model's layer count when the adapter is added: lorakit.adapters.replicate)."""
    if ranges is None:
        return
    example = "e.g. [[0, 4], [2, 5]] (a 5-layer model's layers as 0 1 2 3 2 3 4), or None to keep the model's layers"
    if not isinstance(ranges, list):
        raise ConfigError(f"layer_replication={ranges!r} must be a list of [start, end) pairs, {example}")
    for pair in ranges:
        if not (isinstance(pair, list) and len(pair) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in pair
        )):
            raise ConfigError(
                f"layer_replication entry {pair!r} must be a pair of integers [start, end) (layers start to end - 1), "
                f"{example}"
            )
        start, end = pair
        if not 0 <= start < end:
            raise ConfigError(
                f"layer_replication entry {pair!r} must have 0 <= start < end (it takes layers start to end - 1), "
                f"{example}"
            )


def _check_alpha(name: str, alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or math.isinf(alpha):
        raise ConfigError(f"{name}={alpha!r} must be a positive number, e.g. 16")


def _init() -> types.ModuleType:
    from lorakit.ops import init  # imports torch: see the note at the imports

    return init
