"""Hot-swapping: replace a loaded adapter's weights by another adapter's, in place, keeping its name (PEFT's
``peft.utils.hotswap``: the same four functions, arguments and errors).

Why in place: a compiled model (``torch.compile``) keeps running on the same parameter tensors and guards on their
shapes and on the Python floats its forward reads. A swap therefore copies the new A and B into the existing
parameters and, once ``prepare_model_for_compiled_hotswap`` has made them 0-d tensors, fills the scalings in place:
the compiled graph runs the new adapter without recompiling. Adapters of other ranks fit the same shapes once every
adapter is padded to one rank R with zeros, which leaves the update as it was:

    A' = [A; 0] (R, in),   B' = [B, 0] (out, R)   =>   s * B' @ A' = s * B @ A         (s: the adapter's own scaling)

A grouped conv's B (groups g) reads A's rows in g blocks, so A is padded block by block: group j's r / g rows stay
first in its block of R / g rows. A swapped-in adapter of a smaller rank is written the same way (zeros after its
rows and columns); one of a larger rank than the model holds gets new, larger parameters (a compiled model then
recompiles; pad to the largest rank first to avoid it).

Everything is checked before the first tensor is written (configs, keys, shapes, ranks, merged state): an error
leaves the model as it was. Tensors the new adapter lacks are zeroed (a missing A or B switches that layer's update
off), as in PEFT; tensors it has and the model lacks (other target modules) are refused.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lorakit.adapters import state
from lorakit.adapters.conv import LoraConv
from lorakit.adapters.embedding import LoraEmbedding
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.linear import LoraLinear
from lorakit.adapters.variant_bdlora import BlockDiagonalLinear
from lorakit.api.adapter_files import read_weights
from lorakit.config import LoraConfig, PeftType, read_config, requested_variants, scaling_for
from lorakit.io import files

# The settings that change a layer's output besides its tensors and scaling; two adapters must agree on them (PEFT's
# list; lorakit adds every field that chooses a variant: check_hotswap_configs_compatible).
CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}
RESIZABLE = (LoraLinear, LoraConv, LoraEmbedding)  # kinds whose A / B are the whole adapter and can change rank
COMPILED_CHECKS = ("error", "warn", "ignore")


@dataclasses.dataclass
class _Slot:
    """One tensor of the adapter in the model: where it lives and what it is (A, B, B's bias or another)."""

    layer: LoraLayer
    owner: nn.Module  # the module (or ParameterDict) holding it as ``attr``
    attr: str
    role: str  # "A", "B", "bias" or "other" (DoRA's magnitude, a variant's vectors)

    @property
    def tensor(self) -> Tensor:
        return self.owner._parameters.get(self.attr, self.owner._buffers.get(self.attr))


# -- what the adapter holds -----------------------------------------------------------------------------------------
def _uncompiled(model: nn.Module) -> nn.Module:
    """The module itself under ``torch.compile``'s wrapper (its parameters are the compiled graph's)."""
    return getattr(model, "_orig_mod", model)


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


def _layers(root: nn.Module, adapter_name: str | None = None) -> list[tuple[str, LoraLayer]]:
    """(name, layer) of every LoRA layer of ``root`` (holding ``adapter_name``, if given)."""
    return [
        (name, module)
        for name, module in root.named_modules()
        if isinstance(module, LoraLayer) and (adapter_name is None or adapter_name in module.r)
    ]


def _slots(root: nn.Module, adapter_name: str, prefix: str) -> dict[str, _Slot]:
    """The adapter's tensors, keyed as ``root``'s state dict keys them ('base_model.model.lin0.lora_A.default.weight'):
    those of its LoRA layers whose first name starts with ``prefix`` ('lora_') and whose second is the adapter's."""
    slots: dict[str, _Slot] = {}
    for name, layer in _layers(root, adapter_name):
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
                slots[f"{name}.{'.'.join(path)}" if name else ".".join(path)] = _Slot(
                    layer, owner, attr, roles.get(id(tensor), "other")
                )
    return slots


def _module_name(root: nn.Module, layer_name: str) -> str:
    """A layer's name as the config's rank_pattern / alpha_pattern see it (inside the transformers model)."""
    return layer_name.removeprefix(state._prefix_of(root))


def _groups(layer: LoraLayer) -> int:
    return layer.groups if isinstance(layer, LoraConv) else 1


def _resizable(layer: LoraLayer, adapter_name: str) -> bool:
    """Whether the adapter's A and B on ``layer`` can change rank: a Linear / conv / embedding layer, plain LoRA or
    DoRA (whose magnitude does not depend on r), A and B dense."""
    if not isinstance(layer, RESIZABLE) or layer.variants[adapter_name].name not in ("lora", "dora"):
        return False
    if isinstance(layer, LoraLinear):  # BD-LoRA's block-diagonal factors are packed, not (r, in) / (out, r)
        return not any(isinstance(f[adapter_name], BlockDiagonalLinear) for f in (layer.lora_A, layer.lora_B))
    return True


def _stored_rank(layer: LoraLayer, adapter_name: str) -> int:
    """The rank A and B are stored with (A's rows; larger than the adapter's own once padded)."""
    return layer.factor_parameters(adapter_name)[0].shape[0]


# -- writing factors ------------------------------------------------------------------------------------------------
def _rank_of(role: str, tensor: Tensor, groups: int) -> int:
    """The rank a factor holds: A's rows, B's columns (per group for a grouped conv's B: times g)."""
    return tensor.shape[0] if role == "A" else tensor.shape[1] * groups


def _shape_for(role: str, tensor: Tensor, rank: int, groups: int) -> tuple[int, ...]:
    """``tensor``'s shape with its rank dimension set to ``rank``."""
    shape = list(tensor.shape)
    if role == "A":
        shape[0] = rank
    else:
        shape[1] = rank // groups
    return tuple(shape)


def _write_factor(dest: Tensor, src: Tensor | None, role: str, groups: int) -> None:
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


def _resize(slot: _Slot, shape: tuple[int, ...]) -> Tensor:
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


def _set_scaling(layer: LoraLayer, adapter_name: str, scaling: float) -> None:
    """The adapter's scaling on ``layer``: filled in place when it is a tensor (prepare_model_for_compiled_hotswap),
    so a compiled graph reading it sees the new value."""
    old = layer.scaling[adapter_name]
    if isinstance(old, Tensor):
        old.fill_(scaling)
    else:
        layer.scaling[adapter_name] = scaling


# -- preparing for compiled swaps -----------------------------------------------------------------------------------
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
    if _is_compiled(model):
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
    root = _uncompiled(model)
    layers = _layers(root)
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
        for lora_config in (config.values() if isinstance(config, Mapping) else [config]):
            lora_config.r = target_rank
            lora_config.rank_pattern = dict.fromkeys(lora_config.rank_pattern, target_rank)


def _check_padding(layers: list[tuple[str, LoraLayer]], target_rank: int) -> None:
    """ValueError, before anything is padded, for a layer that cannot be padded to ``target_rank``."""
    for name, layer in layers:
        groups = _groups(layer)
        if target_rank % groups:
            raise ValueError(
                f"Trying to pad a Conv2d LoRA adapter with groups={groups} to target rank {target_rank}, but the "
                f"target rank is not divisible by {groups}. Please choose a target rank that is divisible by {groups}."
            )
        for adapter_name in layer.r:
            rank = _stored_rank(layer, adapter_name)
            if rank > target_rank:
                raise ValueError(
                    f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
                    f"({rank}). This is not possible: pass a target_rank of at least the largest rank ({name!r}, "
                    f"adapter {adapter_name!r})."
                )
            if rank != target_rank and not _resizable(layer, adapter_name):
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
    if _stored_rank(layer, adapter_name) == rank:
        return
    groups = _groups(layer)
    A, B = layer.factor_parameters(adapter_name)
    with torch.no_grad():
        for role, old in (("A", A), ("B", B)):
            slot = _slot_of(layer, old, role)
            _write_factor(_resize(slot, _shape_for(role, old, rank, groups)), old, role, groups)
    layer.r[adapter_name] = rank
    layer._refresh()


def _slot_of(layer: LoraLayer, tensor: Tensor, role: str) -> _Slot:
    for owner in layer.modules():
        for attr, value in owner._parameters.items():
            if value is tensor:
                return _Slot(layer, owner, attr, role)
    raise RuntimeError(f"the {role} parameter of {layer.module_type} is not one of its modules' parameters")


# -- swapping -------------------------------------------------------------------------------------------------------
def check_hotswap_configs_compatible(config0: LoraConfig, config1: LoraConfig) -> None:
    """ValueError unless ``config1``'s adapter can replace ``config0``'s by a swap of tensors and scalings: the same
    method (LoRA), and the same settings that change the output besides those (PEFT's: use_rslora, lora_dropout,
    alpha_pattern, use_dora; lorakit's: every option that chooses a variant, as alora_invocation_tokens, and
    layer_replication, which says which layer each of the adapter's tensors belongs to)."""
    type0, type1 = _peft_type(config0), _peft_type(config1)
    if type0 != type1:
        raise ValueError(f"Incompatible PEFT types found: {type0} and {type1}; hot-swapping replaces LoRA by LoRA only")
    if type0 not in {t.value for t in CONFIG_KEYS_TO_CHECK}:
        raise ValueError(f"Hotswapping only supports {', '.join(t.value for t in CONFIG_KEYS_TO_CHECK)} but {type0} "
                         "was passed.")
    keys = [*CONFIG_KEYS_TO_CHECK[PeftType.LORA], *_variant_fields(config0, config1), "layer_replication"]
    dict0, dict1 = config0.to_dict(), config1.to_dict()
    missing = object()
    for key in keys:
        value0, value1 = dict0.get(key, missing), dict1.get(key, missing)
        if value0 != value1:
            raise ValueError(
                f"Configs are incompatible: for {key}, {value0} != {value1}; a swap replaces tensors and scalings "
                "only, so load this adapter under another name instead (model.load_adapter(path, adapter_name=...))"
            )


def _peft_type(config: Any) -> str:
    value = getattr(config, "peft_type", PeftType.LORA)
    return str(getattr(value, "value", value))


def _variant_fields(*configs: Any) -> list[str]:
    """The fields that choose a variant (lorakit.config.requested_variants: those tagged is_lora_variant; use_dora is
    PEFT's already), and init_lora_weights last when it chooses one (mica)."""
    requested = [requested_variants(c) for c in configs if dataclasses.is_dataclass(c)]
    names = [name for name in dict.fromkeys(k for r in requested for k in r) if name not in ("use_dora", "mica")]
    return names + (["init_lora_weights"] if any(r.get("mica") for r in requested) else [])


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Replace adapter ``adapter_name``'s tensors by those of ``state_dict`` (keyed as the model's state dict, the
    adapter name in them: 'base_model.model.lin0.lora_A.default.weight'), and its scalings by ``config``'s (the new
    adapter's config: alpha / r per module, rsLoRA). The name and the tensors' identity stay: see the module's
    docstring. Tensors the adapter holds and ``state_dict`` lacks are zeroed (a missing A or B turns that layer's
    update off; DoRA's magnitude and other variant tensors cannot be missing).

    Everything is checked before anything is written. ValueError if the adapter is merged; RuntimeError for keys the
    adapter lacks (PEFT's message), for tensors of other shapes than the layer's (the rank aside), for a rank that
    is not ``config``'s, and for a rank change a layer cannot make (see prepare_model_for_compiled_hotswap)."""
    root = _uncompiled(model)
    layers = _layers(root, adapter_name)
    if not layers:
        raise ValueError(f"the model holds no adapter {adapter_name!r} to hot-swap; load one first (PeftModel."
                         "from_pretrained / load_adapter), then swap others into it")
    merged = [name for name, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights (e.g. "
            f"{merged[0]!r}): unmerging after the swap would subtract the new update from a base holding the old one. "
            "Unmerge it first with model.unmerge_adapter(), then swap"
        )
    slots = _slots(root, adapter_name, parameter_prefix)
    incoming = {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}
    unexpected = [key for key in incoming if key not in slots]
    if unexpected:
        raise RuntimeError(
            f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}. The new "
            f"adapter holds tensors adapter {adapter_name!r} has no place for (other target modules, or another "
            "variant): a swap cannot add layers; load it under another name instead (model.load_adapter(path, "
            "adapter_name=...))"
        )
    plans = [_plan(root, name, layer, adapter_name, slots, incoming, config) for name, layer in layers]
    grown = [plan for plan in plans if plan.grows]
    if grown and any(isinstance(plan.layer.scaling[adapter_name], Tensor) for plan in plans):
        warnings.warn(
            f"hot-swapping a rank-{grown[0].rank} adapter into {grown[0].name!r}, padded to rank "
            f"{_stored_rank(grown[0].layer, adapter_name)} only: its A and B get new, larger tensors, which a compiled "
            "model recompiles for; pass a larger target_rank to prepare_model_for_compiled_hotswap",
            stacklevel=2,
        )
    with torch.no_grad():
        for plan in plans:
            plan.apply(adapter_name)


@dataclasses.dataclass
class _Plan:
    """What a swap writes into one layer, decided (and checked) before anything is written."""

    name: str
    layer: LoraLayer
    rank: int  # the stored rank after the swap
    grows: bool  # whether A and B need larger tensors
    writes: list[tuple[_Slot, Tensor | None]]  # None: zeros
    scaling: float
    alpha: float

    def apply(self, adapter_name: str) -> None:
        groups = _groups(self.layer)
        for slot, value in self.writes:
            if slot.role in ("A", "B"):
                dest = slot.tensor
                if self.grows:
                    dest = _resize(slot, _shape_for(slot.role, dest, self.rank, groups))
                _write_factor(dest, value, slot.role, groups)
            elif value is None:
                slot.tensor.zero_()
            else:
                slot.tensor.copy_(value.to(device=slot.tensor.device, dtype=slot.tensor.dtype))
        _set_scaling(self.layer, adapter_name, self.scaling)
        self.layer.r[adapter_name] = self.rank
        self.layer.lora_alpha[adapter_name] = self.alpha
        self.layer._refresh()


def _plan(root: nn.Module, name: str, layer: LoraLayer, adapter_name: str, slots: dict[str, _Slot],
          incoming: dict[str, Tensor], config: LoraConfig) -> _Plan:
    """Check the new tensors of ``layer`` against it and say what to write (RuntimeError naming the key and the fix)."""
    mine = {key: slot for key, slot in slots.items() if slot.layer is layer}
    groups, stored = _groups(layer), _stored_rank(layer, adapter_name)
    ranks: dict[str, int] = {}
    for key, slot in mine.items():
        new, old = incoming.get(key), slot.tensor
        if new is None:
            if slot.role == "other":
                raise RuntimeError(
                    f"Hot swapping the adapter did not succeed, the new adapter lacks {key}: a "
                    f"{layer.variants[adapter_name].title} tensor that zeros cannot stand in for; swap in a complete "
                    "adapter"
                )
            continue
        rank_dim = {"A": 0, "B": 1}.get(slot.role)
        same = new.dim() == old.dim() and all(
            n == o for d, (n, o) in enumerate(zip(new.shape, old.shape)) if d != rank_dim
        )
        if not same:
            raise RuntimeError(
                f"Hot swapping the adapter did not succeed: {key} has shape {tuple(new.shape)} in the new adapter and "
                f"{tuple(old.shape)} in the model; the adapters were made for bases of other shapes, so this one "
                "cannot be swapped in"
            )
        if rank_dim is not None:
            ranks[slot.role] = _rank_of(slot.role, new, groups)
    if len(set(ranks.values())) > 1:
        raise RuntimeError(
            f"Hot swapping the adapter did not succeed: the new adapter's A and B of {name!r} have ranks "
            f"{ranks['A']} and {ranks['B']}; the file is damaged"
        )
    module = _module_name(root, name)
    expected = config.rank_for(module)
    rank = next(iter(ranks.values()), None)
    if rank is not None and rank != stored:
        if not _resizable(layer, adapter_name):
            raise RuntimeError(
                f"Hot swapping the adapter did not succeed: {name!r} ({layer.module_type}, "
                f"{layer.variants[adapter_name].title}) holds rank {stored} and the new adapter rank {rank}; only "
                "plain LoRA and DoRA adapters of Linear, Conv and Embedding layers change rank"
            )
        if rank % groups:
            raise RuntimeError(f"Hot swapping the adapter did not succeed: rank {rank} of {name!r} is not divisible "
                               f"by its conv's groups ({groups}); the file is damaged")
    if rank is not None and rank != expected and not config.target_parameters:
        raise RuntimeError(
            f"Hot swapping the adapter did not succeed: the new adapter has rank {rank} for {module!r} but its config "
            f"gives r={expected}, so its scaling would be wrong; pass the config it was saved with"
        )
    alpha = config.alpha_for(module)
    writes = [(slot, incoming.get(key)) for key, slot in mine.items()]
    new_stored = max(stored, rank or 0)
    return _Plan(name, layer, new_stored, new_stored > stored, writes,
                 scaling_for(alpha, expected, config.use_rslora), alpha)


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | Path,
    adapter_name: str,
    torch_device: str | None = None,
    **kwargs: Any,
) -> None:
    """Swap the adapter saved in folder ``model_name_or_path`` into ``model``'s adapter ``adapter_name`` (a PeftModel,
    compiled or not), in place: the name stays, the outputs become the saved adapter's. The folder is read as
    PeftModel.from_pretrained reads it (``subfolder``, ``key_mapping`` as there); ``torch_device`` is accepted for
    PEFT's signature (the tensors go where the model's are). The model's config of the adapter then holds the new
    adapter's r, lora_alpha and patterns.

    ValueError for an adapter of another method or with incompatible settings (check_hotswap_configs_compatible);
    lorakit's AdapterFileError for a file that does not match its config; then hotswap_adapter_from_state_dict's
    errors. Any of them leaves the model as it was."""
    root = _uncompiled(model)
    peft_config = getattr(root, "peft_config", None)
    if not isinstance(peft_config, Mapping) or adapter_name not in peft_config:
        held = list(peft_config) if isinstance(peft_config, Mapping) else []
        raise ValueError(f"the model holds no adapter {adapter_name!r} to hot-swap (it holds {held}); load one first")
    folder = Path(model_name_or_path)
    if kwargs.get("subfolder"):
        folder = folder / kwargs["subfolder"]
    data, path = files.read_config_json(folder)
    saved_type = str(data.get("peft_type") or PeftType.LORA.value)
    if saved_type != PeftType.LORA.value:
        raise ValueError(f"Incompatible PEFT types found: {_peft_type(peft_config[adapter_name])} and {saved_type} "
                         f"({path}); hot-swapping replaces LoRA by LoRA only")
    config = read_config(folder)
    check_hotswap_configs_compatible(peft_config[adapter_name], config)
    base = root.get_base_model() if hasattr(root, "get_base_model") else root
    tensors, source = read_weights(base, folder, kwargs.get("key_mapping"))
    state.check_ranks(config, tensors, source)
    hotswap_adapter_from_state_dict(root, _model_keys(root, tensors, adapter_name), adapter_name, config)
    held = peft_config[adapter_name]
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        setattr(held, field, getattr(config, field))


def _model_keys(root: nn.Module, tensors: dict[str, Tensor], adapter_name: str) -> dict[str, Tensor]:
    """A file's tensors keyed as the model's state dict keys adapter ``adapter_name``'s (the inverse of
    lorakit.io.files.file_key over the adapter's tensors); a key of no tensor of the adapter gets the adapter name
    after its 'lora_*' part, as PEFT names it in its error."""
    to_model = {files.file_key(key, adapter_name): key for key in _slots(root, adapter_name, "lora_")}
    out = {}
    for key, value in tensors.items():
        if key not in to_model:
            parts = key.split(".")
            at = max((i for i, p in enumerate(parts) if p.startswith("lora_")), default=len(parts) - 1)
            key = ".".join([*parts[: at + 1], adapter_name, *parts[at + 1 :]])
        out[to_model.get(key, key)] = value
    return out
