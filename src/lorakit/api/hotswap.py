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
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters import state
from lorakit.adapters.layer import LoraLayer
from lorakit.api.adapter_files import read_weights
from lorakit.api.hotswap_prepare import prepare_model_for_compiled_hotswap  # noqa: F401 - PEFT's module has all four
from lorakit.api.hotswap_slots import (
    Slot,
    adapter_slots,
    groups_of,
    lora_layers,
    pattern_name,
    rank_of,
    resizable,
    resize,
    set_scaling,
    shape_for,
    stored_rank,
    uncompiled,
    write_factor,
)
from lorakit.config import LoraConfig, PeftType, config_from_json, requested_variants, scaling_for
from lorakit.io import files

# The settings that change a layer's output besides its tensors and scaling; two adapters must agree on them (PEFT's
# list; lorakit adds every field that chooses a variant: check_hotswap_configs_compatible).
CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}


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
    root = uncompiled(model)
    layers = lora_layers(root, adapter_name)
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
    slots = adapter_slots(root, adapter_name, parameter_prefix)
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
            f"{stored_rank(grown[0].layer, adapter_name)} only: its A and B get new, larger tensors, which a compiled "
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
    writes: list[tuple[Slot, Tensor | None]]  # None: zeros
    scaling: float
    alpha: float

    def apply(self, adapter_name: str) -> None:
        groups = groups_of(self.layer)
        for slot, value in self.writes:
            if slot.role in ("A", "B"):
                dest = slot.tensor
                if self.grows:
                    dest = resize(slot, shape_for(slot.role, dest, self.rank, groups))
                write_factor(dest, value, slot.role, groups)
            elif value is None:
                slot.tensor.zero_()
            else:
                slot.tensor.copy_(value.to(device=slot.tensor.device, dtype=slot.tensor.dtype))
        set_scaling(self.layer, adapter_name, self.scaling)
        self.layer.r[adapter_name] = self.rank
        self.layer.lora_alpha[adapter_name] = self.alpha
        self.layer._refresh()


def _plan(root: nn.Module, name: str, layer: LoraLayer, adapter_name: str, slots: dict[str, Slot],
          incoming: dict[str, Tensor], config: LoraConfig) -> _Plan:
    """Check the new tensors of ``layer`` against it and say what to write (RuntimeError naming the key and the fix)."""
    mine = {key: slot for key, slot in slots.items() if slot.layer is layer}
    groups, stored = groups_of(layer), stored_rank(layer, adapter_name)
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
            ranks[slot.role] = rank_of(slot.role, new, groups)
    if len(set(ranks.values())) > 1:
        raise RuntimeError(
            f"Hot swapping the adapter did not succeed: the new adapter's A and B of {name!r} have ranks "
            f"{ranks['A']} and {ranks['B']}; the file is damaged"
        )
    module = pattern_name(root, name)
    expected = config.rank_for(module)
    rank = next(iter(ranks.values()), None)
    if rank is not None and rank != stored:
        if not resizable(layer, adapter_name):
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
    root = uncompiled(model)
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
    config = config_from_json(path, data)  # the object read above: the file is read once
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
    to_model = {files.file_key(key, adapter_name): key for key in adapter_slots(root, adapter_name, "lora_")}
    out = {}
    for key, value in tensors.items():
        if key not in to_model:
            parts = key.split(".")
            at = max((i for i, p in enumerate(parts) if p.startswith("lora_")), default=len(parts) - 1)
            key = ".".join([*parts[: at + 1], adapter_name, *parts[at + 1 :]])
        out[to_model.get(key, key)] = value
    return out
