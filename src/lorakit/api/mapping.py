"""get_peft_model: a model and a LoraConfig in, the PeftModel of its task out (PEFT's ``peft.mapping_func``)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from lorakit.adapters.layer import LoraLayer
from lorakit.api.peft_model import MODEL_TYPE_TO_PEFT_MODEL, PeftModel
from lorakit.config import LoraConfig


def _record_base_name(model: nn.Module, config: LoraConfig) -> None:
    """A new adapter records its base model's name (the model's ``name_or_path``, else its config's) as
    base_model_name_or_path: the file must name the model it was made on, so a different name the config held is
    replaced, with PEFT's warning. A model without a name (a custom nn.Module) keeps the config's (PEFT sets None)."""
    own = model.__dict__.get("name_or_path") or getattr(getattr(model, "config", None), "_name_or_path", None)
    old = config.base_model_name_or_path
    if own and old is not None and old != own:
        warnings.warn(  # PEFT's words
            f"The PEFT config's `base_model_name_or_path` was renamed from '{old}' to '{own}'. Please ensure that the "
            "correct base model is loaded when loading this checkpoint.",
            UserWarning,
            stacklevel=3,
        )
    if own:
        config.base_model_name_or_path = own


def get_peft_model(
    model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """Wrap ``model`` with a new LoRA adapter ``adapter_name`` described by ``peft_config`` (the model is changed in
    place: its target modules become LoRA wrappers)."""
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a lorakit.LoraConfig, not {type(peft_config).__name__}")
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; use model.add_adapter(name, config) to add another adapter")
    if any(isinstance(module, LoraLayer) for module in model.modules()):
        warnings.warn(
            "You are trying to modify a model with PEFT for a second time: it already holds LoRA layers (an earlier "
            "get_peft_model changed it in place), which the new adapter joins. To start again from the base model, "
            "call .unload() on the earlier PeftModel first; to add an adapter, use its add_adapter(name, config)",
            UserWarning,
            stacklevel=2,
        )
    unknown = set(kwargs) - {"mixed", "autocast_adapter_dtype", "revision", "low_cpu_mem_usage"}
    if unknown:
        warnings.warn(f"get_peft_model ignored arguments: {sorted(unknown)}", stacklevel=2)
    _record_base_name(model, peft_config)
    model_cls = MODEL_TYPE_TO_PEFT_MODEL.get(peft_config.task_type, PeftModel)  # type: ignore[arg-type]
    autocast = kwargs.get("autocast_adapter_dtype", True)
    return model_cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast)
