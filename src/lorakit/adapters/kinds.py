"""Module kinds: which base modules lorakit can wrap, and the wrapper class of each. The first kind that accepts a
module wraps it; ``linear`` says whether ``target_modules="all-linear"`` includes the kind.

To add a kind: write its wrapper (a LoraLayer subclass with ``_create``, ``lora_weights``, ``_drop`` and ``forward``,
as lorakit.adapters.linear) and add a row here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from lorakit.adapters.attention import LoraMultiheadAttention
from lorakit.adapters.conv import LoraConv, is_conv
from lorakit.adapters.embedding import LoraEmbedding
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.linear import LoraLinear
from lorakit.quant.linear import QuantLinear, is_conv1d


class ModuleKind(NamedTuple):
    name: str  # as error messages name it
    accepts: Callable[[nn.Module], bool]
    wrapper: type[LoraLayer]
    linear: bool  # part of target_modules="all-linear"


MODULE_KINDS: tuple[ModuleKind, ...] = (
    ModuleKind("nn.Embedding", lambda m: isinstance(m, nn.Embedding), LoraEmbedding, linear=False),
    ModuleKind("nn.Linear", lambda m: isinstance(m, nn.Linear), LoraLinear, linear=True),
    ModuleKind("GPT-2 Conv1D", is_conv1d, LoraLinear, linear=True),
    ModuleKind("lorakit QuantLinear", lambda m: isinstance(m, QuantLinear), LoraLinear, linear=True),
    ModuleKind("nn.Conv1d / Conv2d / Conv3d", is_conv, LoraConv, linear=False),  # not in all-linear, as in PEFT
    ModuleKind(
        "nn.MultiheadAttention", lambda m: isinstance(m, nn.MultiheadAttention), LoraMultiheadAttention, linear=False
    ),
)


def kind_of(module: nn.Module) -> ModuleKind | None:
    """The kind that wraps ``module``, or None if lorakit cannot wrap it."""
    return next((kind for kind in MODULE_KINDS if kind.accepts(module)), None)


def is_wrappable(module: nn.Module) -> bool:
    return kind_of(module) is not None


def is_linear(module: nn.Module) -> bool:
    """A module that ``target_modules="all-linear"`` wraps."""
    kind = kind_of(module)
    return kind is not None and kind.linear


def kind_names() -> str:
    """'nn.Embedding, nn.Linear, GPT-2 Conv1D and lorakit QuantLinear', for messages."""
    names = [kind.name for kind in MODULE_KINDS]
    return f"{', '.join(names[:-1])} and {names[-1]}"


def wrap(module: nn.Module) -> LoraLayer:
    """The LoRA wrapper for ``module``; TypeError if lorakit cannot wrap its type."""
    kind = kind_of(module)
    if kind is None:
        raise TypeError(
            f"lorakit can wrap {kind_names()}, not {type(module).__name__}; choose target_modules that name such layers"
        )
    return kind.wrapper(module)
