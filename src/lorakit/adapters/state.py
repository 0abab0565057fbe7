"""An adapter's tensors in a model, keyed as in its file: which parameters belong to an adapter, and copying a file's
tensors into them.

File keys are the model's state-dict keys with the adapter name removed (``lorakit.io.files.file_key``)::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight    # in the model (a PeftModel)
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight            # in adapter_model.safetensors

A model with adapters injected in place (``inject_adapter_in_model``) has the same keys without ``base_model.model.``.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import Tensor, nn

from lorakit.adapters.inject import wrappers
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.model import LoraModel
from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.adapters.trainable_tokens import TrainableTokensWrapper
from lorakit.config import LoraConfig
from lorakit.io.files import AdapterFileError, file_key, lora_pairs


def _owned_keys(model: nn.Module, adapter_name: str, bias: str) -> list[str]:
    """The model state-dict keys that belong to adapter ``adapter_name`` (plus the biases its ``bias`` mode trains)."""
    prefix = _prefix_of(model)
    keys: list[str] = []
    for name, module in wrappers(_inner(model)):
        if isinstance(module, LoraLayer):
            if adapter_name not in module.r:
                continue
            for pname in _tensor_names(module):
                if not pname.startswith("base_layer.") and _belongs(pname, adapter_name):
                    keys.append(f"{prefix}{name}.{pname}")
            if bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                keys.append(f"{prefix}{name}.base_layer.bias")
        elif isinstance(module, TrainableTokensWrapper):  # its rows (none for a layer tied to the embedding)
            keys += [f"{prefix}{name}.{k}" for k in module.state_keys(adapter_name)]
        elif adapter_name in module.modules_to_save:
            keys += [
                f"{prefix}{name}.modules_to_save.{adapter_name}.{k}"
                for k in module.modules_to_save[adapter_name].state_dict()
            ]
    if bias == "all":
        others = [a for a in getattr(model, "peft_config", {}) if a != adapter_name]
        keys += [
            k
            for k in model.state_dict()
            if k.endswith(".bias") and k not in keys and not any(_belongs(k, o) for o in others)
        ]
    return keys


def _tensor_names(module: nn.Module) -> list[str]:
    """``module``'s parameter names, then its persistent buffers' (VeLoRA's projection vectors), as the state dict
    names them."""
    names = [pname for pname, _ in module.named_parameters()]
    for mname, sub in module.named_modules():
        names += [
            f"{mname}.{b}" if mname else b
            for b, t in sub._buffers.items()
            if t is not None and b not in sub._non_persistent_buffers_set
        ]
    return names


def _required(model: nn.Module, to_model: dict[str, str]) -> set[str]:
    """The file keys a file must hold: a LoRA wrapper's own tensors (``lora_A``, ``lora_embedding_B``, DoRA's
    ``lora_magnitude_vector``, ...) and trainable-token rows. Told by the wrapper they belong to, not by a '.lora_' in
    the key: a base module named like one (``lora_head``, trained as a modules_to_save copy) stays optional."""
    prefix = _prefix_of(model)
    layers = {f"{prefix}{name}." for name, module in wrappers(_inner(model)) if isinstance(module, LoraLayer)}
    required = set()
    for fkey, mkey in to_model.items():
        head = mkey
        while "." in head and f"{head}." not in layers:
            head = head.rpartition(".")[0]
        tail = mkey[len(head) + 1 :] if f"{head}." in layers else ""
        if tail.startswith("lora_") or fkey.endswith(".trainable_tokens_delta"):
            required.add(fkey)
    return required


def _belongs(key: str, adapter_name: str) -> bool:
    return f".{adapter_name}." in f".{key}" or key.endswith(f".{adapter_name}")


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (base_model.model), or the model itself (a model with adapters
    injected in place: transformers' own ``base_model`` is then no LoraModel)."""

    base = getattr(model, "base_model", None)
    return base.model if isinstance(base, LoraModel) else model


def _prefix_of(model: nn.Module) -> str:
    return "base_model.model." if _inner(model) is not model else ""


def adapter_state_dict(
    model: nn.Module, adapter_name: str, save_embedding_layers: bool = False, state: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The tensors of one adapter, keyed as in the file; their values from ``state`` (keyed as the model's state dict)
    if given, else from the model."""
    config: LoraConfig = model.peft_config[adapter_name]
    state = model.state_dict() if state is None else state
    out = {file_key(k, adapter_name): state[k] for k in _owned_keys(model, adapter_name, config.bias)}
    if save_embedding_layers:
        prefixes = tuple(f"{name}." for name in _embedding_prefixes(model))
        out.update({k: v for k, v in state.items() if k.startswith(prefixes)})
    return out


EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # the layers taken as embeddings in a model that does not say (PEFT's)


def _embedding_prefixes(model: nn.Module) -> list[str]:
    """Where the base embeddings are that ``save_embedding_layers=True`` writes, as PEFT picks them: the model's input
    and output embeddings (get_input_embeddings / get_output_embeddings; else modules named EMBEDDING_NAMES); if LoRA
    wraps any of them, the base_layer of each wrapped one, else each whole module (a tied output layer not again).
    A name ends at a dot: a sibling called embed_tokens_extra is not the embedding."""
    layers: list[nn.Module] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        layer = get() if callable(get) else None
        weight = getattr(layer, "weight", None)
        if layer is not None and not any(layer is x or weight is not None and weight is getattr(x, "weight", None)
                                         for x in layers):  # a tied output layer: its weight is saved once
            layers.append(layer)
    named = list(model.named_modules())
    if not layers:
        layers = [m for n, m in named if n.rpartition(".")[2] in EMBEDDING_NAMES]
        warnings.warn(  # PEFT's words first
            "Could not identify embedding layer(s) because the model is not a 🤗 transformers model. "
            + (f"Saving the modules named {' / '.join(EMBEDDING_NAMES)} instead." if layers else
               "No base embedding is saved; give the model get_input_embeddings() to name it."),
            stacklevel=4,
        )
    wrapped = [layer for layer in layers if isinstance(layer, LoraLayer)]
    if wrapped:
        return [f"{n}.base_layer" for n, m in named if any(m is layer for layer in wrapped)]
    return [n for n, m in named if any(m is layer for layer in layers)]


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, Tensor], adapter_name: str, source: str) -> None:
    """Copy file ``tensors`` into adapter ``adapter_name`` of ``model``. Raises AdapterFileError naming the module and
    both shapes when the adapter was made for a base of other shapes, or listing the tensors the file lacks."""
    config: LoraConfig = model.peft_config[adapter_name]
    state = model.state_dict()
    owned = _owned_keys(model, adapter_name, config.bias)
    to_model = {file_key(k, adapter_name): k for k in owned}
    # PEFT with bias="all" also writes each modules_to_save copy's bias as '<module>.modules_to_save.bias' (a
    # duplicate of '<module>.bias'); accept it as an alias of the copy.
    mts = f".modules_to_save.{adapter_name}."
    to_model.update({k.replace(mts, ".modules_to_save."): k for k in owned if mts in k and k.endswith(".bias")})
    required = _required(model, to_model)
    missing = [k for k in to_model if k not in tensors and k in required]
    if missing:
        raise AdapterFileError(
            f"{source} lacks {len(missing)} adapter tensors, e.g. {missing[0]!r}: the file is "
            "incomplete or was saved for other target modules"
        )
    unexpected = [k for k in tensors if k not in to_model and k not in state]
    if unexpected:
        raise AdapterFileError(
            f"{source} holds {len(unexpected)} tensors that fit no module of this model, e.g. "
            f"{unexpected[0]!r}: the adapter was saved for another model or other targets"
        )
    position = {k: i for i, k in enumerate(state)}
    order = sorted(tensors, key=lambda k: position[to_model.get(k, k)])  # model order: first layer first
    for fkey in order:  # every shape checked before anything is copied: a misfit leaves the model as it was
        tensor, mkey = tensors[fkey], to_model.get(fkey, fkey)
        target = state[mkey]
        if target.shape != tensor.shape:
            local = mkey.removeprefix(_prefix_of(model))
            module = re.sub(r"\.(lora_\w+|base_layer|modules_to_save|original_module)(\..*)?$", "", local)
            raise AdapterFileError(
                f"{source}: module {module!r} expects {fkey.removeprefix(_prefix_of(model) + module + '.')!r} "
                f"of shape {tuple(target.shape)} in this model, but the adapter holds {tuple(tensor.shape)}: "
                "it was made for a base model with other shapes; load it onto the base named in its "
                "adapter_config.json"
            )
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    with torch.no_grad():
        for fkey in order:
            mkey = to_model.get(fkey, fkey)
            target = state[mkey]
            if target.is_meta:  # made empty by low_cpu_mem_usage (to_meta): the file's tensor takes its place
                _set_parameter(model, mkey, tensors[fkey].to(device=device, dtype=target.dtype))
            else:
                target.copy_(tensors[fkey].to(target.dtype))


def to_meta(model: nn.Module, adapter_name: str) -> None:
    """Replace adapter ``adapter_name``'s parameters by empty ones on the meta device (``low_cpu_mem_usage``: no
    memory until load_adapter_state_dict puts the loaded tensors in their place)."""
    for key in _owned_keys(model, adapter_name, "none"):
        parent_name, _, leaf = key.rpartition(".")
        if _belongs(key, adapter_name) and leaf in model.get_submodule(parent_name)._parameters:  # buffers stay
            old = model.get_parameter(key)
            _set_parameter(model, key, torch.empty_like(old, device="meta"))


def _set_parameter(model: nn.Module, key: str, value: Tensor) -> None:
    """Make ``value`` the parameter ``key`` of ``model`` (a new Parameter, trainable as the old one was)."""
    parent_name, _, leaf = key.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, leaf, nn.Parameter(value, requires_grad=getattr(parent, leaf).requires_grad))


# -- folders -----------------------------------------------------------------------------------------------------

def remap_keys(tensors: dict[str, Tensor], key_mapping: dict[str, str] | None) -> dict[str, Tensor]:
    """A file's tensors with their keys renamed by ``key_mapping`` ({regex: replacement}, the first pattern that
    matches wins), applied to the key past its ``base_model.model.`` / ``base_model.`` prefix: how an adapter saved on
    a model's old module layout loads into its new one (transformers models list the renames in
    ``_checkpoint_conversion_mapping``, e.g. ``{"^visual": "model.visual"}``). Keys without either prefix are kept."""
    if not key_mapping:
        return tensors
    renamed = {}
    for key, value in tensors.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), "")
        rest = key[len(prefix):]
        if prefix:
            for pattern, replacement in key_mapping.items():
                rest, count = re.subn(pattern, replacement, rest)
                if count:
                    break
        if prefix + rest in renamed:
            raise AdapterFileError(
                f"key_mapping {key_mapping!r} renames two tensors of the file to {prefix + rest!r}: "
                "fix the mapping (or pass key_mapping={} to load the file's keys as they are)"
            )
        renamed[prefix + rest] = value
    return renamed


def check_ranks(config: LoraConfig, tensors: dict[str, Tensor], source: str) -> None:
    """Every ``lora_A`` in the file must have the rank the config gives its module (checked before any adapter is
    built, so that a config with a wrong or absurd ``r`` fails here, naming the file, not in an allocation)."""
    ranks = {config.r, *config.rank_pattern.values()}
    for module, (A, _) in lora_pairs(tensors).items():
        expected = config.rank_for(module)
        rank = A.shape[0]
        if config.target_parameters and any(rank % r == 0 for r in ranks):
            continue  # LoRA on a parameter: r * E rows for E experts (E is known once the model is built, where
            # load_adapter_state_dict checks every shape)
        if rank != expected:
            raise AdapterFileError(
                f"{source} holds rank {rank} for module {module!r}, but its adapter_config.json gives r={expected}: "
                "the two files do not belong together; re-save the adapter"
            )


# -- which state-dict keys belong to the adapters, read from the model's structure (PEFT's helpers) ------------------

def tuner_key_prefixes(model: nn.Module, adapter_name: str | None = None) -> set[str]:
    """The state-dict key prefixes of everything the LoRA layers hold beside their ``base_layer`` (and the LoraModel
    beside its ``model``), found by the model's structure, not by key names: a base module called ``lora_foobar`` is
    not an adapter's. Each of a layer's children, parameters and buffers is one prefix ('lin0.lora_A'); with
    ``adapter_name``, a container keyed by adapter (ModuleDict / ParameterDict) gives that adapter's entry
    ('lin0.lora_A.other') or nothing. modules_to_save and trainable-token wrappers, and LoRA layers inside them, are
    left out (their copies are saved by their own rule, in ``_owned_keys``). PEFT's
    ``_get_tuner_state_dict_key_prefixes``."""
    prefixes: set[str] = set()
    auxiliary: set[str] = set()
    for name, module in model.named_modules():  # parents first: a wrapper before the layers inside it
        name = name.removeprefix("_fsdp_wrapped_module.")
        if isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)):
            auxiliary.add(name)
        elif isinstance(module, LoraModel) or (isinstance(module, LoraLayer) and not _under(name, auxiliary)):
            prefixes |= _layer_prefixes(module, name, adapter_name)
    return prefixes


def _layer_prefixes(module: nn.Module, name: str, adapter_name: str | None) -> set[str]:
    attributes = [*module._modules, *module._parameters, *module._buffers]
    out: set[str] = set()
    for attribute in dict.fromkeys(attributes):
        if attribute in ("base_layer", "model"):  # the wrapped module
            continue
        prefix = f"{name}.{attribute}" if name else attribute
        child = getattr(module, attribute)
        if adapter_name is not None and isinstance(child, (nn.ModuleDict, nn.ParameterDict)):
            if adapter_name in child:
                out.add(f"{prefix}.{adapter_name}")
        else:
            out.add(prefix)
    return out


def _under(key: str, prefixes: set[str]) -> bool:
    """Whether ``key`` is one of ``prefixes`` or lies below one at a dot ('a.b' covers 'a.b.c', not 'a.bc')."""
    while key:
        if key in prefixes:
            return True
        key = key.rpartition(".")[0]
    return False


def keys_under(state: dict[str, Tensor], prefixes: set[str]) -> dict[str, Tensor]:
    """The entries of ``state`` whose key is one of ``prefixes`` or lies below one at a dot (PEFT's
    ``_filter_state_dict_by_key_prefixes``)."""
    return {key: value for key, value in state.items() if _under(key, prefixes)}
