"""Where a loaded adapter's tensors live in a model, and how a LoRA factor is rewritten at another rank: what
hot-swapping (lorakit.api.hotswap) and its preparation for compiled models (lorakit.api.hotswap_prepare) share.

A factor of rank r written at rank R >= r is padded with zeros: A' = [A; 0] (R, in), B' = [B, 0] (out, R), so that
B' @ A' = B @ A. A grouped conv's B (groups g) reads A's rows in g blocks, so A is padded block by block: group j's
r / g rows stay first in its block of R / g rows.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from lorakit.adapters import state
from lorakit.adapters.conv import LoraConv
from lorakit.adapters.embedding import LoraEmbedding
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.linear import LoraLinear
from lorakit.adapters.variant_bdlora import BlockDiagonalLinear

RESIZABLE = (LoraLinear, LoraConv, LoraEmbedding)  # kinds whose A / B are the whole adapter and can change rank


@dataclasses.dataclass
class Slot:
    """One tensor of the adapter in the model: where it lives and what it is (A, B, B's bias or another)."""

    layer: LoraLayer
    owner: nn.Module  # the module (or ParameterDict) holding it as ``attr``
    attr: str
    role: str  # "A", "B", "bias" or "other" (DoRA's magnitude, a variant's vectors)

    @property
    def tensor(self) -> Tensor:
        return self.owner._parameters.get(self.attr, self.owner._buffers.get(self.attr))


# -- what the adapter holds -----------------------------------------------------------------------------------------
def uncompiled(model: nn.Module) -> nn.Module:
    """The module itself under ``torch.compile``'s wrapper (its parameters are the compiled graph's)."""
    return getattr(model, "_orig_mod", model)


def is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


def lora_layers(root: nn.Module, adapter_name: str | None = None) -> list[tuple[str, LoraLayer]]:
    """(name, layer) of every LoRA layer of ``root`` (holding ``adapter_name``, if given)."""
    return [
        (name, module)
        for name, module in root.named_modules()
        if isinstance(module, LoraLayer) and (adapter_name is None or adapter_name in module.r)
    ]


def adapter_slots(root: nn.Module, adapter_name: str, prefix: str) -> dict[str, Slot]:
    """The adapter's tensors, keyed as ``root``'s state dict keys them ('base_model.model.lin0.lora_A.default.weight'):
    those of its LoRA layers whose first name starts with ``prefix`` ('lora_') and whose second is the adapter's."""
    slots: dict[str, Slot] = {}
    for name, layer in lora_layers(root, adapter_name):
        A, B = layer.factor_parameters(adapter_name)
        roles = {id(A): "A", id(B): "B"}
        bias = layer.lora_bias_of(adapter_name)
        if bias is not None:
            roles[id(bias)] = "bias"
        for owner_name, owner in layer.named_modules():
            parts = owner_name.split(".") if owner_name else []
            if parts[:1] == ["base_layer"]:  # the wrapped module, and any LoRA layer inside it (found on its own)
                continue
            tensors = {**owner._parameters, **{k: v for k, v in owner._buffers.items()
                                               if k not in owner._non_persistent_buffers_set}}
            for attr, tensor in tensors.items():
                path = [*parts, attr]
                if tensor is None or len(path) < 2 or not path[0].startswith(prefix) or path[1] != adapter_name:
                    continue
                slots[f"{name}.{'.'.join(path)}" if name else ".".join(path)] = Slot(
                    layer, owner, attr, roles.get(id(tensor), "other")
                )
    return slots


def pattern_name(root: nn.Module, layer_name: str) -> str:
    """A layer's name as the config's rank_pattern / alpha_pattern see it (inside the transformers model)."""
    return layer_name.removeprefix(state._prefix_of(root))


def groups_of(layer: LoraLayer) -> int:
    return layer.groups if isinstance(layer, LoraConv) else 1


def resizable(layer: LoraLayer, adapter_name: str) -> bool:
    """Whether the adapter's A and B on ``layer`` can change rank: a Linear / conv / embedding layer, plain LoRA or
    DoRA (whose magnitude does not depend on r), A and B dense."""
    if not isinstance(layer, RESIZABLE) or layer.variants[adapter_name].name not in ("lora", "dora"):
        return False
    if isinstance(layer, LoraLinear):  # BD-LoRA's block-diagonal factors are packed, not (r, in) / (out, r)
        return not any(isinstance(f[adapter_name], BlockDiagonalLinear) for f in (layer.lora_A, layer.lora_B))
    return True


def stored_rank(layer: LoraLayer, adapter_name: str) -> int:
    """The rank A and B are stored with (A's rows; larger than the adapter's own once padded)."""
    return layer.factor_parameters(adapter_name)[0].shape[0]


# -- writing factors ------------------------------------------------------------------------------------------------
def rank_of(role: str, tensor: Tensor, groups: int) -> int:
    """The rank a factor holds: A's rows, B's columns (per group for a grouped conv's B: times g)."""
    return tensor.shape[0] if role == "A" else tensor.shape[1] * groups


def shape_for(role: str, tensor: Tensor, rank: int, groups: int) -> tuple[int, ...]:
    """``tensor``'s shape with its rank dimension set to ``rank``."""
    shape = list(tensor.shape)
    if role == "A":
        shape[0] = rank
    else:
        shape[1] = rank // groups
    return tuple(shape)


def write_factor(dest: Tensor, src: Tensor | None, role: str, groups: int) -> None:
    """``dest`` = ``src`` padded with zeros to ``dest``'s rank (zeros only for no ``src``); a grouped conv's A block by
    block (group j's rows first in its block), the rest in the leading rows (A) / columns (B)."""
    dest.zero_()
    if src is None:
        return
    src = src.to(device=dest.device, dtype=dest.dtype)
    if role == "B":
        dest[:, : src.shape[1]].copy_(src)
    elif groups == 1:
        dest[: src.shape[0]].copy_(src)
    else:
        new, old = dest.shape[0] // groups, src.shape[0] // groups  # rows per group
        for j in range(groups):
            dest[j * new : j * new + old].copy_(src[j * old : (j + 1) * old])


def resize(slot: Slot, shape: tuple[int, ...]) -> Tensor:
    """Give ``slot`` a new zero parameter of ``shape`` (trainable as the old one), with its module's sizes updated
    (an nn.Linear's in / out_features, a conv's in / out_channels)."""
    old = slot.tensor
    new = nn.Parameter(old.new_zeros(shape), requires_grad=old.requires_grad)
    if isinstance(slot.owner, nn.ParameterDict):
        slot.owner[slot.attr] = new
    else:
        setattr(slot.owner, slot.attr, new)
    if isinstance(slot.owner, nn.Linear):
        slot.owner.out_features, slot.owner.in_features = shape[0], shape[1]
    elif isinstance(slot.owner, nn.modules.conv._ConvNd):
        slot.owner.out_channels, slot.owner.in_channels = shape[0], shape[1] * slot.owner.groups
    return new


def set_scaling(layer: LoraLayer, adapter_name: str, scaling: float) -> None:
    """The adapter's scaling on ``layer``: filled in place when it is a tensor (prepare_model_for_compiled_hotswap),
    so a compiled graph reading it sees the new value."""
    old = layer.scaling[adapter_name]
    if isinstance(old, Tensor):
        old.fill_(scaling)
    else:
        layer.scaling[adapter_name] = scaling


def slot_of(layer: LoraLayer, tensor: Tensor, role: str) -> Slot:
    """The Slot of parameter ``tensor`` (A or B, ``role``) among ``layer``'s modules."""
    for owner in layer.modules():
        for attr, value in owner._parameters.items():
            if value is tensor:
                return Slot(layer, owner, attr, role)
    raise RuntimeError(f"the {role} parameter of {layer.module_type} is not one of its modules' parameters")
