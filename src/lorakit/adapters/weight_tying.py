"""Tied embeddings and ``ensure_weight_tying`` (PEFT's LoraConfig field).

A model with ``tie_word_embeddings`` uses one Parameter E (V, d) as its input embedding and its output layer
(``lm_head.weight is embed_tokens.weight``). An adapter that trains either of them separately unties them. With
``ensure_weight_tying=True`` the adapter is added to the input embedding only, and each module tied to it gets a
wrapper that shares it, as PEFT 0.21.2 does (same config rewrite, same files):

- ``modules_to_save`` naming the embedding or a tied layer: the embedding's trainable copy is made, and each tied
  module's copy holds that copy's weight Parameter itself (``lm_head(h) = h @ E_copy.T``);
- ``target_modules`` naming them: the embedding gets LoRA (A (r, V), B (d, r); ``E' = E + s * A.T @ B.T``) and a tied
  output layer gets LoRA factors on the same storage, transposed (``A_head = B.T``, ``B_head = A.T``: its update
  ``s * B_head @ A_head = s * A.T @ B.T`` is the embedding's), a tied embedding the same Parameters. A tied layer's
  merge changes no weight: the one weight they share gets the update once, from the embedding.

The config is rewritten as PEFT rewrites it (the embedding's full name added to the list, the tied names removed), so
that the saved adapter_config.json is PEFT's and loads the same way in either library. Without the flag, an adapter
on a tied layer gets PEFT's warning; with it on a model without tied weights, too.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # the names PEFT looks for in modules_to_save / target_modules
UNTIED_WARNING = (
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but `ensure_weight_tying` is not "
    "set to True. This can lead to complications, for example when merging the adapter or converting your model to "
    "formats other than safetensors; pass ensure_weight_tying=True to keep the tied layers tied"
)


def input_embedding_name(model: nn.Module) -> str | None:
    """The name of the model's input embedding (``get_input_embeddings()``), else of a module named ``embed_tokens``."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = None
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        pass
    for name, module in model.named_modules():
        if embedding is not None and module is embedding:
            return name
    return next((n for n, _ in model.named_modules() if n.split(".")[-1] == "embed_tokens"), None)


def _weight_of(module: nn.Module) -> object:
    """The weight Parameter of a module, through lorakit's wrappers (their base layer or original module)."""
    while True:
        inner = module._modules.get("base_layer") or getattr(module, "original_module", None)
        if not isinstance(inner, nn.Module) or inner is module:
            break
        module = inner
    return module._parameters.get("weight")


def tied_with_embedding(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is the input embedding's own Parameter (an output layer under
    ``tie_word_embeddings``; T5's encoder / decoder embeddings), or [] when the model's config does not say its
    embeddings are tied. PEFT's rule, read from the parameters themselves rather than from ``_tied_weights_keys``."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "tie_word_embeddings", False) is not True:
        return []
    embedding_name = input_embedding_name(model)
    if embedding_name is None:
        return []
    weight = _weight_of(model.get_submodule(embedding_name))
    if weight is None:
        return []
    tied: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{t}.") for t in [embedding_name, *tied])
        if name and name != embedding_name and not inside and _weight_of(module) is weight:
            tied.append(name)
    return sorted(tied)


@dataclass
class Ties:
    """What ``plan`` found: the embedding the adapter goes on and the modules that share it."""

    embedding: str | None = None
    modules: list[str] = field(default_factory=list)  # modules_to_save copies sharing the embedding copy's weight
    targets: list[str] = field(default_factory=list)  # LoRA layers sharing the embedding LoRA's factors


def plan(model: nn.Module, config: LoraConfig) -> Ties:
    """Which tied modules share the embedding's adapter; rewrites ``config.modules_to_save`` / ``target_modules`` as
    PEFT does, and warns where PEFT warns."""
    saved = list(config.modules_to_save or [])
    embedding_saved = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in saved)
    spec = config.target_modules
    if isinstance(spec, str):
        embedding_targeted = any(re.fullmatch(spec, m) for m in EMBEDDING_LAYER_NAMES)
    else:
        embedding_targeted = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in spec or [])
    tied = tied_with_embedding(model)
    if not config.ensure_weight_tying:
        if (embedding_saved or embedding_targeted) and tied:
            warnings.warn(UNTIED_WARNING, stacklevel=4)
        return Ties()
    if not tied:
        warnings.warn(  # PEFT's wording
            "You have requested `ensure_weight_tying`, but no tied modules were found in the model (its config has "
            "no tie_word_embeddings=True, or no layer shares the input embedding's weight)",
            stacklevel=4,
        )
        return Ties()
    embedding = input_embedding_name(model)
    if embedding_saved:
        config.modules_to_save = _moved_to_embedding(saved, embedding, tied)
        return Ties(embedding, modules=tied)
    if embedding_targeted:
        if isinstance(spec, str):
            config.target_modules = rf"(?:{spec}|^{re.escape(embedding)}$)"
        else:
            config.target_modules = sorted(_moved_to_embedding(list(spec or []), embedding, tied))
        return Ties(embedding, targets=tied)
    warnings.warn(  # PEFT's wording
        "You have requested `ensure_weight_tying`, but no tied modules are added in either `modules_to_save` or "
        "`target_modules`: there is nothing to tie",
        stacklevel=4,
    )
    return Ties()


def _moved_to_embedding(entries: list[str], embedding: str, tied: list[str]) -> list[str]:
    """``entries`` with the embedding's full name added and, for each tied module, the first entry naming it
    removed (PEFT's rewrite)."""
    out = entries if embedding in entries else [*entries, embedding]
    for key in tied:
        hit = next((m for m in out if re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key)), None)
        if hit is not None:
            out = [m for m in out if m != hit]
    return out


def tie_modules_to_save(model: nn.Module, ties: Ties, adapter_name: str, wrapper_cls: type) -> None:
    """Wrap each tied module with a modules_to_save wrapper whose copy for ``adapter_name`` holds the embedding
    copy's weight Parameter (the module's own other parameters, e.g. a bias, copied as usual)."""
    if not ties.modules:
        return
    source = model.get_submodule(ties.embedding).modules_to_save[adapter_name]
    for name in ties.modules:
        module = model.get_submodule(name)
        if not isinstance(module, wrapper_cls):
            module = wrapper_cls(module)
            _replace(model, name, module)
        module.update(adapter_name)
        module.modules_to_save[adapter_name].weight = source.weight  # one Parameter: tied


def tie_lora(model: nn.Module, ties: Ties, adapter_name: str, wrap: object, config: LoraConfig) -> None:
    """Give each tied module a LoRA layer whose factors for ``adapter_name`` are the embedding's: the same
    Parameters for an embedding, the transposed storage for an output layer (as PEFT: two Parameters on one
    storage). The tied layers are marked ``weight_tied_to`` the embedding: their merge changes no weight."""
    if not ties.targets:
        return
    source = model.get_submodule(ties.embedding)
    A_e, B_e = source.lora_weights(adapter_name)  # (r, V), (d, r)
    r, alpha = source.r[adapter_name], source.lora_alpha[adapter_name]
    for name in ties.targets:
        module = model.get_submodule(name)
        if not hasattr(module, "update_layer"):
            module = wrap(module)
            _replace(model, name, module)
        module.update_layer(adapter_name, r, alpha, config.lora_dropout, False, config.use_rslora)
        module.weight_tied_to = ties.embedding
        if hasattr(module, "lora_embedding_A"):  # an embedding tied to the embedding: the same Parameters
            module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name] = A_e, B_e
        else:  # an output layer (V, d): A_head (r, d) = B_e.T, B_head (V, r) = A_e.T
            module.lora_A[adapter_name].weight = nn.Parameter(B_e.t())
            module.lora_B[adapter_name].weight = nn.Parameter(A_e.t())
        module._refresh()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
