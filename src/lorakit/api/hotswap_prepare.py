"""``prepare_model_for_compiled_hotswap`` (PEFT's function of the name): make a model's adapters swappable without
recompiling a ``torch.compile``d model: scalings as 0-d tensors filled in place by later swaps, and A and B padded
with zeros to one target rank (lorakit.api.hotswap_slots), which leaves every update as it was."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from lorakit.adapters.layer import LoraLayer
from lorakit.api.hotswap_slots import (
    groups_of,
    is_compiled,
    lora_layers,
    pattern_name,
    resizable,
    resize,
    shape_for,
    slot_of,
    stored_rank,
    uncompiled,
    write_factor,
)
from lorakit.config import LoraConfig

COMPILED_CHECKS = ("error", "warn", "ignore")


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | Mapping[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Make ``model``'s adapters swappable without recompiling: every scaling becomes a 0-d tensor (filled in place by
    later swaps) and, with ``target_rank``, every adapter's A and B are padded with zeros to that rank (the outputs do
    not change), so that adapters up to that rank swap into the same shapes. ``config`` (a LoraConfig, or a dict of
    them as ``model.peft_config``) gets r and its rank_pattern set to ``target_rank``. Call it after loading the first
    adapter and before ``torch.compile``; ``check_compiled`` says what to do with a model compiled already: "error",
    "warn" or "ignore".

    ValueError (nothing changed) for a compiled model under "error", no LoRA layer, a target rank below an adapter's
    rank, one a grouped conv's groups do not divide, or an adapter whose rank cannot change (a variant with rank-sized
    tensors of its own: KaSA, BD-LoRA, ...)."""
    if check_compiled not in COMPILED_CHECKS:
        raise ValueError(
            f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead."
        )
    if is_compiled(model):
        if check_compiled == "error":
            raise ValueError(
                "Call prepare_model_for_compiled_hotswap *before* compiling the model: a compiled graph would be "
                "recompiled for the changed tensors (or pass check_compiled='warn' / 'ignore')"
            )
        if check_compiled == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap was called with a model that is already compiled. This will "
                "likely result in re-compilation, hurting performance. Call the function before compiling the model.",
                stacklevel=2,
            )
    root = uncompiled(model)
    layers = lora_layers(root)
    if not layers:
        raise ValueError(
            "No adapter layers found on the model, make sure to call `prepare_model_for_compiled_hotswap` after "
            "loading the first adapter and before loading the second adapter."
        )
    if target_rank is not None:
        _check_padding(layers, target_rank)
    for _, layer in layers:
        _scalings_to_tensors(layer)
        if target_rank is not None:
            for adapter_name in list(layer.r):
                _pad(layer, adapter_name, target_rank)
    if config and target_rank is not None:
        configs = dict(config) if isinstance(config, Mapping) else {_only_adapter(layers): config}
        for adapter_name, lora_config in configs.items():
            lora_config.r = target_rank
            lora_config.rank_pattern = dict.fromkeys(lora_config.rank_pattern, target_rank)
            if adapter_name is not None:
                _keep_scalings(root, layers, adapter_name, lora_config, target_rank)


def _only_adapter(layers: list[tuple[str, LoraLayer]]) -> str | None:
    """The adapter a lone config passed to prepare_model_for_compiled_hotswap describes: the model's only one, else
    None (its r is updated as PEFT does, its alphas cannot be)."""
    names = {name for _, layer in layers for name in layer.r}
    return names.pop() if len(names) == 1 else None


def _keep_scalings(root: nn.Module, layers: list[tuple[str, LoraLayer]], adapter_name: str, config: LoraConfig,
                   rank: int) -> None:
    """Give ``config`` (now r = ``rank`` everywhere) the lora_alpha, and alpha_pattern entries by exact module name,
    with which every layer of adapter ``adapter_name`` keeps its scaling (lorakit.config.scaling_for): so that the
    padded adapter, saved, loads with the outputs it has. PEFT updates r only, and its saved file then scales each
    update by lora_alpha / target_rank instead of lora_alpha / r. Each layer's lora_alpha is set alike."""
    alphas: dict[str, float] = {}
    for name, layer in layers:
        if adapter_name in layer.r:
            scaling = float(layer.scaling[adapter_name])
            alphas[pattern_name(root, name)] = scaling * (math.sqrt(rank) if config.use_rslora else rank)
    if not alphas:
        return
    common = max(set(alphas.values()), key=list(alphas.values()).count)
    config.lora_alpha = common
    config.alpha_pattern = {re.escape(m): a for m, a in alphas.items() if not math.isclose(a, common, rel_tol=1e-12)}
    for name, layer in layers:
        if adapter_name in layer.r:
            layer.lora_alpha[adapter_name] = alphas[pattern_name(root, name)]


def _check_padding(layers: list[tuple[str, LoraLayer]], target_rank: int) -> None:
    """ValueError, before anything is padded, for a layer that cannot be padded to ``target_rank``."""
    for name, layer in layers:
        groups = groups_of(layer)
        if target_rank % groups:
            raise ValueError(
                f"Trying to pad a Conv2d LoRA adapter with groups={groups} to target rank {target_rank}, but the "
                f"target rank is not divisible by {groups}. Please choose a target rank that is divisible by {groups}."
            )
        for adapter_name in layer.r:
            rank = stored_rank(layer, adapter_name)
            if rank > target_rank:
                raise ValueError(
                    f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
                    f"({rank}). This is not possible: pass a target_rank of at least the largest rank ({name!r}, "
                    f"adapter {adapter_name!r})."
                )
            if rank != target_rank and not resizable(layer, adapter_name):
                raise ValueError(
                    f"cannot pad adapter {adapter_name!r} of {name!r} ({layer.module_type}, "
                    f"{layer.variants[adapter_name].title}) from rank {rank} to {target_rank}: only plain LoRA and "
                    "DoRA adapters of Linear, Conv and Embedding layers change rank; give the adapters one rank, or "
                    f"pass target_rank={rank}"
                )


def _scalings_to_tensors(layer: LoraLayer) -> None:
    """Each scaling of ``layer`` as a 0-d fp32 tensor on the adapter's device (a float would be a constant of the
    compiled graph; a tensor is read at every call)."""
    for adapter_name, value in layer.scaling.items():
        if isinstance(value, Tensor):
            continue
        if not isinstance(value, (float, int)):
            raise TypeError(
                f"the scaling of adapter {adapter_name!r} is a {type(value).__name__}, expected a float or a tensor"
            )
        device = layer.factor_parameters(adapter_name)[0].device
        layer.scaling[adapter_name] = torch.tensor(float(value), device=device)


def _pad(layer: LoraLayer, adapter_name: str, rank: int) -> None:
    """Pad adapter ``adapter_name``'s A and B on ``layer`` with zeros to ``rank`` (checked by _check_padding)."""
    if stored_rank(layer, adapter_name) == rank:
        return
    groups = groups_of(layer)
    A, B = layer.factor_parameters(adapter_name)
    with torch.no_grad():
        for role, old in (("A", A), ("B", B)):
            slot = slot_of(layer, old, role)
            write_factor(resize(slot, shape_for(role, old, rank, groups)), old, role, groups)
    layer.r[adapter_name] = rank
    layer._refresh()
