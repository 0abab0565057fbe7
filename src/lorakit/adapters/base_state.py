"""The base model's own tensors inside a model with adapters, keyed as the model had them before any wrapping.

A wrapper puts the module it wraps one level down, under a name of its own, beside the adapter's tensors::

    model.layers.0.q_proj.base_layer.weight                   <- model.layers.0.q_proj.weight     (LoraLayer)
    model.layers.0.q_proj.lora_A.default.weight                  the adapter's: not the base's
    score.original_module.weight                              <- score.weight                     (modules_to_save)
    embed_tokens.token_adapter.base_layer.weight              <- embed_tokens.weight              (trainable tokens)

``base_key`` walks a key down the live modules and drops the step into each wrapper's wrapped module (wrappers nest:
MultiheadAttention's out_proj, a parameter's wrapper around another); a key that leaves a wrapper by any other name
belongs to an adapter. PEFT's ``get_base_model_state_dict`` / ``set_base_model_state_dict`` are built on it.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.adapters.trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper


def wrapped_name(module: nn.Module) -> str | None:
    """The attribute under which wrapper ``module`` holds the module it wraps; None if it is no wrapper."""
    if isinstance(module, (LoraLayer, TrainableTokensLayer)):
        return "base_layer"
    if isinstance(module, ModulesToSaveWrapper):
        return "original_module"
    if isinstance(module, TrainableTokensWrapper):
        return "token_adapter"
    return None


def base_key(root: nn.Module, key: str) -> str | None:
    """``key`` of ``root``'s state dict as the unwrapped model names it; None for an adapter's tensor."""
    kept: list[str] = []
    current: nn.Module | None = root
    for part in key.split("."):
        if current is None:  # past the modules: the tensor's own name
            kept.append(part)
            continue
        through = wrapped_name(current)
        if through is not None:
            if part != through:
                return None  # lora_A, modules_to_save, trainable_tokens_delta, ...: the adapter's
            current = current._modules[part]
            continue
        kept.append(part)
        current = current._modules.get(part)
    return ".".join(kept)


def base_keys(root: nn.Module) -> dict[str, str]:
    """{base model key: key in ``root``'s state dict} for every tensor of the base model."""
    found = {}
    for key in root.state_dict():
        plain = base_key(root, key)
        if plain is not None:
            found[plain] = key
    return found


def base_state_dict(root: nn.Module) -> dict[str, Tensor]:
    """The base model's tensors, keyed as the unwrapped model's state dict."""
    state = root.state_dict()
    return {plain: state[key] for plain, key in base_keys(root).items()}


def load_base_state_dict(root: nn.Module, state_dict: dict[str, Tensor], strict: bool = True) -> _IncompatibleKeys:
    """Copy ``state_dict`` (keyed as the unwrapped model) into the base model's tensors of ``root``. With ``strict``,
    a missing or surplus key raises RuntimeError before anything is copied; otherwise they are returned."""
    keys = base_keys(root)
    missing = [k for k in keys if k not in state_dict]
    unexpected = [k for k in state_dict if k not in keys]
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"base model state dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} "
            f"({len(missing)} and {len(unexpected)} in all); pass the state dict of the model before get_peft_model, "
            "or strict=False"
        )
    root.load_state_dict({keys[k]: v for k, v in state_dict.items() if k in keys}, strict=False)
    return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
