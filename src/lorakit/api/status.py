"""PEFT's ``get_layer_status`` / ``get_model_status``: the state of every adapter layer of a model, and of the model as
a whole, as the same dataclasses PEFT returns (fields, names and "irregular" where layers disagree).

    model.get_model_status()   # TunerModelStatus(base_model_type='LlamaForCausalLM', ..., active_adapters=['default'])

A layer is a LoRA wrapper (``module_type`` "lora.Linear" / "lora.Embedding", PEFT's names) or a trained full copy
(``modules_to_save``: "ModulesToSaveWrapper"); names are relative to the LoraModel (``model.layers.0...``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.adapters.trainable_tokens import TrainableTokensLayer

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _agree(values: list[Any]) -> Any:
    """The one value all layers give, else "irregular" (booleans: True, False or "irregular")."""
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _layer_status(name: str, module: nn.Module) -> TunerLayerStatus:
    if isinstance(module, LoraLayer):
        adapters = {a: module.adapter_parameters(a) for a in module.adapter_names}
        kind = module.module_type
        enabled, active = not module.disable_adapters, list(module.active_adapters)
        merged = list(module.merged_adapters)
        backend = "lorakit" if module.quantized else None
    elif isinstance(module, TrainableTokensLayer):  # trainable_token_indices: PEFT reports the inner layer
        adapters = {a: [p] for a, p in module.trainable_tokens_delta.items()}
        kind, enabled, backend = "TrainableTokensLayer", not module.disable_adapters, None
        active, merged = module.active_here(), list(module.merged_adapters)
    else:  # ModulesToSaveWrapper
        adapters = {a: list(m.parameters()) for a, m in module.modules_to_save.items()}
        kind, enabled, backend = "ModulesToSaveWrapper", not module.disable_adapters, None
        active, merged = [module.active_adapter] if module.active_adapter is not None else [], []
    return TunerLayerStatus(
        name=name,
        module_type=kind,
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={a: _agree([p.requires_grad for p in ps]) for a, ps in adapters.items()},
        available_adapters=sorted(adapters),
        devices={a: sorted({p.device.type for p in ps}) for a, ps in adapters.items()},
        quantization_backend=backend,
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of each adapter layer of ``model`` (a PeftModel, or a model with lorakit wrappers injected);
    ValueError if it has none."""
    root = getattr(model, "base_model", model) if hasattr(model, "peft_config") else model
    layers = [
        _layer_status(name, module)
        for name, module in root.named_modules()
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensLayer))
    ]
    if not layers:
        raise ValueError("No adapter layers found in the model: is it a lorakit model, or were adapters injected?")
    return layers


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The status of ``model`` as a whole: its layers' statuses where they agree, "irregular" where they do not."""
    layers = get_layer_status(model)
    peft_config = getattr(model, "peft_config", {})
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    merged_somewhere = set().union(*(s.merged_adapters for s in layers))
    unmerged_somewhere = set().union(*(set(s.available_adapters) - set(s.merged_adapters) for s in layers))
    requires_grad: dict[str, list[Any]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for adapter, value in s.requires_grad.items():
            requires_grad[adapter].append(value)
        for adapter, kinds in s.devices.items():
            devices[adapter].update(kinds)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        # PEFT's rule: the base's class name for a PeftModel or a transformers model, else "other"
        base_model_type=type(base).__name__ if peft_config or hasattr(base, "config") else "other",
        adapter_model_type=type(getattr(model, "base_model", model)).__name__ if peft_config else "None",
        peft_types={name: "LORA" for name in peft_config},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters="irregular" if merged_somewhere & unmerged_somewhere else sorted(merged_somewhere),
        requires_grad={adapter: _agree(values) for adapter, values in requires_grad.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={adapter: sorted(kinds) for adapter, kinds in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
