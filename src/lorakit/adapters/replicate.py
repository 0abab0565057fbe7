"""Layer replication (PEFT's ``layer_replication``): a model's layer list rebuilt from ranges of its own layers.

The ranges are [start, end) pairs: ``[[0, 4], [2, 5]]`` on a model of 5 layers gives the 7 layers 0 1 2 3 2 3 4.
Every entry of the new list is a copy of an original layer that shares all of its parameters and buffers (the
tensors themselves, not copies: the model grows in depth at no memory cost for its frozen base); each copy then gets
LoRA adapters of its own, so the copies can be tuned apart. What transformers models need when their layer list
changes is fixed here too: each copy's ``layer_idx`` attributes (the KV cache's index of the layer), and
``config.num_hidden_layers`` / ``config.layer_types`` (the cache's per-layer kinds, e.g. sliding windows).

LoraModel.add_adapter replicates once, when the model's first adapter is added (and so does PeftModel.from_pretrained,
before it loads the file's weights). The change stays: ``unload()`` gives the model back with its replicated layers
sharing their weights, as PEFT does. ``merge_and_unload()`` first gives each copy tensors of its own (``unshare``), so
that each copy's update goes into its own weight: a model of the new depth, in the memory that depth takes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lorakit.config import ConfigError

LAYER_LISTS = (("layers",), ("encoder", "layer"), ("h",))  # Llama-style, BERT-style, GPT-2 / Falcon-style


def layer_order(ranges: list[list[int]]) -> list[int]:
    """The original layer each new position holds: ``[[0, 4], [2, 5]]`` -> ``[0, 1, 2, 3, 2, 3, 4]``."""
    return [i for start, end in ranges for i in range(start, end)]


def find_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding the layer list, the list's attribute name), found as PEFT's ``replicate_layers`` finds it:
    down ``.model`` as far as it goes (then BERT's ``.bert``) to ``.layers``, ``.encoder.layer`` or ``.h``. lorakit
    also steps into ``.transformer`` (GPT-2's and Falcon's causal LMs: PEFT finds ``h`` only on the bare GPT2Model /
    FalconModel). ConfigError naming what was searched if there is no such nn.ModuleList."""
    root = model
    while isinstance(getattr(root, "model", None), nn.Module):
        root = root.model
    for nested in ("bert", "transformer"):
        if isinstance(getattr(root, nested, None), nn.Module):
            root = getattr(root, nested)
    for path in LAYER_LISTS:
        holder = root
        for name in path[:-1]:
            holder = getattr(holder, name, None)
        if isinstance(getattr(holder, path[-1], None), nn.ModuleList):
            return holder, path[-1]
    raise ConfigError(
        f"layer_replication: found no layer list in {type(model).__name__} (looked for an nn.ModuleList at "
        "model[.model]*.layers, .encoder.layer or .h, under .bert or .transformer too, as for Llama, BERT, GPT-2 and "
        "Falcon); use a model of such an architecture, or drop layer_replication"
    )


def check_ranges(ranges: list[list[int]], n_layers: int) -> None:
    """ConfigError naming the first range that reaches past the model's ``n_layers`` layers (LoraConfig checked the
    rest: integer pairs with 0 <= start < end)."""
    for start, end in ranges:
        if end > n_layers:
            raise ConfigError(
                f"layer_replication range [{start}, {end}] reaches past the model's {n_layers} layers (a range "
                f"[start, end) takes layers start to end - 1, so end is at most {n_layers}); fix the range, e.g. "
                f"[{min(start, n_layers - 1)}, {n_layers}]"
            )


def shared_copy(module: nn.Module, keep: Iterable[object] = ()) -> nn.Module:
    """A deep copy of ``module`` that holds the very parameters and buffers of the original (the same tensor
    objects: nothing of their storage is copied, not even for a moment), and the objects ``keep`` as they are (the
    model's config, which attention modules hold: a copy then follows later changes to it, such as the attention
    implementation); its other state (attributes, hooks) is its own."""
    shared = [*module.parameters(), *module.buffers(), *keep]
    return copy.deepcopy(module, memo={id(t): t for t in shared})


def replicate_layers(model: nn.Module, ranges: list[list[int]]) -> Callable[[], None]:
    """Rebuild ``model``'s layer list (``find_layers``) as ``ranges`` says, in place: position j holds a
    ``shared_copy`` of original layer ``layer_order(ranges)[j]``, its ``layer_idx`` attributes set to j; the layer
    list's config gets ``num_hidden_layers`` and, if it has them, ``layer_types`` of the new list. Returns the undo:
    a function that puts the original layers and config values back (for an adapter that fails to inject)."""
    holder, name = find_layers(model)
    layers: nn.ModuleList = getattr(holder, name)
    check_ranges(ranges, len(layers))
    config = getattr(holder, "config", None)
    _check_config(config)
    order = layer_order(ranges)
    configs = list({id(c): c for c in (config, getattr(model, "config", None)) if c is not None}.values())  # kept
    new = nn.ModuleList()
    for position, source in enumerate(order):
        layer = shared_copy(layers[source], keep=configs)
        for module in layer.modules():  # the index modeling code gives the KV cache (transformers' layer_idx)
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
        new.append(layer)
    saved = {key: getattr(config, key) for key in ("num_hidden_layers", "layer_types") if hasattr(config, key)}
    setattr(holder, name, new)
    if "num_hidden_layers" in saved:  # Llama's forward runs layers[: num_hidden_layers]; the KV cache reads it too
        config.num_hidden_layers = len(new)
    layer_types = saved.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == len(layers):  # Qwen2 / Gemma: attention kind per layer
        config.layer_types = [layer_types[i] for i in order]

    def undo() -> None:
        setattr(holder, name, layers)
        for key, value in saved.items():
            setattr(config, key, value)

    return undo


def _check_config(config: object) -> None:
    """ConfigError for the model configs whose per-layer settings a replicated list would break: heterogeneous
    configs (transformers' per_layer_config) and KV caches shared between layers (Gemma 3n / 4)."""
    if getattr(config, "is_heterogeneous", False) is True:
        raise ConfigError(
            "layer_replication is not supported for a model whose config sets layers apart (per_layer_config): the "
            "copies would need their own entries; drop layer_replication"
        )
    if getattr(config, "num_kv_shared_layers", 0):
        raise ConfigError(
            f"layer_replication is not supported for a model whose layers share KV caches (num_kv_shared_layers="
            f"{config.num_kv_shared_layers}): a copy would read the cache of another layer; drop layer_replication"
        )


def unshare(model: nn.Module) -> int:
    """Give each layer of ``model``'s layer list its own tensors: a parameter or buffer that an earlier layer holds is
    replaced by a copy (requires_grad kept; tensors shared inside one layer stay shared). Returns how many were
    copied. Before a merge of a replicated model, so that each copy's update goes into its own weight only."""
    holder, name = find_layers(model)
    earlier: set[int] = set()
    copied = 0
    for layer in getattr(holder, name):
        own: dict[int, torch.Tensor] = {}  # id of a shared tensor -> this layer's copy of it
        originals: set[int] = set()
        for module in layer.modules():
            for slots in (module._parameters, module._buffers):
                for key, tensor in list(slots.items()):
                    if tensor is None:
                        continue
                    originals.add(id(tensor))
                    if id(tensor) not in earlier:
                        continue
                    if id(tensor) not in own:
                        clone = tensor.detach().clone()
                        own[id(tensor)] = nn.Parameter(clone, tensor.requires_grad) if isinstance(
                            tensor, nn.Parameter) else clone
                        copied += 1
                    slots[key] = own[id(tensor)]
        earlier |= originals
    return copied
