"""Module kinds: which base modules lorakit can wrap, and the wrapper class of each. The first kind that accepts a
module wraps it; ``linear`` says whether ``target_modules="all-linear"`` includes the kind.

To add a kind: write its wrapper (a LoraLayer subclass with ``_create``, ``lora_weights``, ``_drop`` and ``forward``,
as lorakit.adapters.linear) and add a row here.

A user's own module class, without changing lorakit (PEFT's experimental "dynamic dispatch"): register it on the
config, ``config._register_custom_module({MyModule: MyLora})``, with ``MyLora`` a LoraLayer subclass built as
``MyLora(base_layer)`` like the kinds above (subclassing LoraLinear is enough for a module that computes
``x @ weight.T`` with ``weight`` (out, in)). Registered classes are matched first (a registered ``nn.Linear`` takes
the place of LoraLinear), each as a kind named "custom <class>"; wrapping a class none of the kinds above takes
warns, in PEFT's words (its tests compare them whole). The mapping is
the config object's, not saved with the adapter: register it again on the config given to ``from_pretrained``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
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


# a config's registered classes (LoraConfig._register_custom_module): {module class: its LoraLayer subclass}
CustomKinds = Mapping[type, type[LoraLayer]]


def kind_of(module: nn.Module, custom: CustomKinds | None = None) -> ModuleKind | None:
    """The kind that wraps ``module``: a registered custom class first, then the table; None if lorakit cannot wrap
    it. A custom kind is part of all-linear where the module is a built-in linear kind (a registered nn.Linear)."""
    builtin = next((kind for kind in MODULE_KINDS if kind.accepts(module)), None)
    for cls, wrapper in (custom or {}).items():
        if isinstance(module, cls):
            accepts = lambda m, cls=cls: isinstance(m, cls)  # noqa: E731
            linear = builtin is not None and builtin.linear
            return ModuleKind(f"custom {cls.__qualname__}", accepts, wrapper, linear=linear)
    return builtin


def is_wrappable(module: nn.Module, custom: CustomKinds | None = None) -> bool:
    return kind_of(module, custom) is not None


def is_linear(module: nn.Module) -> bool:
    """A module that ``target_modules="all-linear"`` wraps."""
    kind = kind_of(module)
    return kind is not None and kind.linear


def kind_names() -> str:
    """'nn.Embedding, nn.Linear, GPT-2 Conv1D and lorakit QuantLinear', for messages."""
    names = [kind.name for kind in MODULE_KINDS]
    return f"{', '.join(names[:-1])} and {names[-1]}"


def wrap(module: nn.Module, custom: CustomKinds | None = None) -> LoraLayer:
    """The LoRA wrapper for ``module`` (``custom``: a config's registered classes, see above); TypeError if lorakit
    cannot wrap its type."""
    kind = kind_of(module, custom)
    if kind is None:
        raise TypeError(
            f"lorakit can wrap {kind_names()}, not {type(module).__name__}; choose target_modules that name such "
            "layers, or register a wrapper for it: config._register_custom_module({its class: a LoraLayer subclass})"
        )
    if kind.name.startswith("custom ") and kind_of(module) is None:  # a class lorakit has no kind of: PEFT's words
        warnings.warn(f"Unsupported layer type '{type(module)}' encountered, proceed at your own risk.", UserWarning,
                      stacklevel=3)
    return kind.wrapper(module)
