"""Trainable token rows (PEFT's ``trainable_token_indices``): only the listed rows of an embedding train, the rest of
it stays frozen and is not saved. For an adapter with token ids ``idx`` (k ids) on an embedding E (V, d)::

    E' = E with E'[idx[j]] = rows[j]            # rows (k, d), initialized as E[idx]
    y  = E'[x]                                  # (B, T) -> (B, T, d)

The rows are the new values themselves, not differences (PEFT's ``trainable_tokens_delta``, despite the name), so that
merging is a row copy and unmerging copies back ``trainable_tokens_original``, the rows as they were.

Layout (PEFT's, so that state-dict and file keys match): the embedding's place holds a ``TrainableTokensWrapper``
whose ``token_adapter`` (a ``TrainableTokensLayer``) holds the embedding as ``base_layer``, the rows per adapter in
``trainable_tokens_delta`` and the originals in non-persistent buffers::

    model.embed_tokens.token_adapter.trainable_tokens_delta.default     # in the model
    model.embed_tokens.token_adapter.trainable_tokens_delta             # in adapter_model.safetensors

Tied weights: when the model ties its output layer to the input embedding (``tie_word_embeddings``, one shared
Parameter), the output layer is wrapped too, with a layer that shares the embedding's rows (the same Parameters):
``lm_head(h) = h @ E'.T`` trains and saves the same k rows, and merging writes them once into the shared weight, so
the two stay tied. Only the embedding's wrapper is saved. One adapter per wrapper is active at a time (as in PEFT).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lorakit.adapters.weight_tying import input_embedding_name, tied_with_embedding
from lorakit.config import LoraConfig


class TokenError(ValueError):
    """trainable_token_indices names a module or a token id that does not fit the model."""


def with_rows(weight: Tensor, indices: Tensor, rows: Tensor) -> Tensor:
    """``weight`` (V, d) with rows ``indices`` (k,) replaced by ``rows`` (k, d): a new tensor, differentiable in
    ``rows`` (the frozen ``weight`` gets no gradient)."""
    return weight.index_copy(0, indices, rows.to(weight.dtype))


class _Originals(nn.Module):
    """The original rows per adapter, as non-persistent buffers (not in the state dict, as in PEFT); a mapping."""

    def __setitem__(self, name: str, rows: Tensor) -> None:
        self.register_buffer(name, rows, persistent=False)

    def __getitem__(self, name: str) -> Tensor:
        return self._buffers[name]

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._buffers))

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self) -> list[str]:
        return list(self._buffers)


class TrainableTokensLayer(nn.Module):
    """The trainable rows of one embedding (or of an output layer tied to it: ``tied_to``, whose rows it shares)."""

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tied_to = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()  # (k, d) per adapter: the rows' trained values
            self.trainable_tokens_original = _Originals()  # (k, d) per adapter: the rows before training
            self.token_indices: dict[str, list[int]] = {}
        else:  # the same objects: a change to one layer's rows is a change to the other's
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.trainable_tokens_original = tied_to.trainable_tokens_original
            self.token_indices = tied_to.token_indices
        self.merged_adapters: list[str] = []
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def tied_to(self) -> TrainableTokensLayer | None:
        return self._tied_to[0] if self._tied_to else None

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def update_layer(self, name: str, indices: list[int], init_weights: bool = True) -> None:
        """Add adapter ``name`` training rows ``indices``: initialized as the current rows (``init_weights``), or
        random (for tests, as PEFT's ``init_weights=False``). A tied layer has nothing of its own to add."""
        if self.tied_to is not None:
            return
        weight = self.base_layer.weight  # (V, d)
        vocab = weight.shape[0]
        outside = sorted({i for i in indices if not 0 <= i < vocab})
        if outside:
            raise TokenError(
                f"trainable_token_indices of adapter {name!r}: token id(s) {outside} are outside the vocabulary of "
                f"this {type(self.base_layer).__name__} ({vocab} rows, ids 0..{vocab - 1}); resize the embedding "
                "first (model.resize_token_embeddings) or fix the ids"
            )
        if len(set(indices)) != len(indices):
            raise TokenError(f"trainable_token_indices of adapter {name!r} lists a token id twice: {indices}")
        with torch.no_grad():
            original = weight[torch.tensor(indices, device=weight.device)].detach().clone()  # (k, d)
            # trained in the dtype the layer computes in (fp32 for a 16-bit embedding of lorakit.quantize)
            rows = original.to(self._compute_dtype()).clone()
            rows = rows if init_weights else torch.randn_like(rows)
        self.token_indices[name] = list(indices)
        self.trainable_tokens_delta[name] = nn.Parameter(rows)
        self.trainable_tokens_original[name] = original

    def delete_adapter(self, name: str) -> None:
        if self.tied_to is None and name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[name], self.trainable_tokens_original[name]
            del self.token_indices[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _index(self, name: str, device: torch.device) -> Tensor:
        return torch.tensor(self.token_indices[name], dtype=torch.long, device=device)

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the base layer computes in: its weight's, or a reduced-precision layer's ``compute_dtype``."""
        return getattr(self.base_layer, "compute_dtype", None) or self.base_layer.weight.dtype

    def merged_weight(self, names: list[str], dtype: torch.dtype | None = None) -> Tensor:
        """The base weight (V, d), in ``dtype`` if given, with the rows of adapters ``names`` in place (a new tensor
        unless ``names`` is empty and no cast is asked for)."""
        weight = self.base_layer.weight if dtype is None else self.base_layer.weight.to(dtype)
        for name in names:
            weight = with_rows(weight, self._index(name, weight.device), self.trainable_tokens_delta[name])
        return weight

    def active_here(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.trainable_tokens_delta]

    def forward_with(self, x: Tensor, names: list[str], *args: object, **kwargs: object) -> Tensor:
        """The base layer's output with the rows of adapters ``names`` in its weight: an embedding lookup of token
        ids (B, T) -> (B, T, d), or, for a tied output layer, h (..., d) -> (..., V)."""
        base = self.base_layer
        if not names or self.disable_adapters or self.merged_adapters:
            return base(x, *args, **kwargs)
        weight = self.merged_weight(names, self._compute_dtype())
        if isinstance(base, nn.Embedding):
            out = nn.functional.embedding(
                x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )
            scale = getattr(base, "embed_scale", None)  # Gemma-style scaled embeddings scale in their forward
            return out if scale is None else out * scale.to(out.dtype)
        if isinstance(base, nn.Linear):  # an output layer tied to the embedding
            bias = None if base.bias is None else base.bias.to(weight.dtype)
            return nn.functional.linear(x.to(weight.dtype), weight, bias)
        raise TypeError(f"trainable tokens wrap nn.Embedding (or an nn.Linear tied to one), not {type(base).__name__}")

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        return self.forward_with(x, self.active_here(), *args, **kwargs)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Write the rows of ``adapter_names`` (default: the active one) into the base weight. A tied layer only
        records it: its weight is the embedding's, which the embedding's layer writes."""
        names = [n for n in (adapter_names or self.active_here()) if n in self.trainable_tokens_delta]
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        _check_disjoint(self.token_indices, [*self.merged_adapters, *names])
        if self.tied_to is None:
            with torch.no_grad():
                new = self.merged_weight(names).detach()
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights: the rows of adapter(s) {names} hold NaN/inf"
                    )
                self.base_layer.weight.data = new
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Put the original rows back, newest merge first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self.tied_to is None:
                weight = self.base_layer.weight
                with torch.no_grad():
                    original = self.trainable_tokens_original[name]
                    weight.data = with_rows(weight.data, self._index(name, weight.device), original)


def _check_disjoint(token_indices: dict[str, list[int]], names: list[str]) -> None:
    seen: set[int] = set()
    for name in dict.fromkeys(names):
        overlap = seen & set(token_indices[name])
        if overlap:
            raise ValueError(
                f"the token ids of adapter {name!r} overlap those of another merged or active adapter "
                f"({sorted(overlap)}): only adapters with disjoint token ids can be merged together"
            )
        seen |= set(token_indices[name])


class TrainableTokensWrapper(nn.Module):
    """In the place of an embedding (or a tied output layer): routes the forward through ``token_adapter``. Other
    attributes (``num_embeddings``, ``embedding_dim``, ...) are the wrapped layer's; ``weight`` is the weight with
    the active adapter's rows in place, as modeling code and tied layers read it."""

    # PEFT's attributes: where the per-adapter rows and settings are, as dotted paths from the wrapper
    adapter_layer_names: tuple[str, ...] = ("token_adapter.trainable_tokens_delta",)
    other_param_names: tuple[str, ...] = ("token_adapter.token_indices", "token_adapter.trainable_tokens_original")

    def __init__(self, module: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        self.token_adapter = TrainableTokensLayer(module, tied_to)
        self.routing = None  # a mixed_batch.Routing while a batch runs one adapter per row (adapter_names)

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("token_adapter", "routing"):
                raise
            return getattr(self.token_adapter.base_layer, name)

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> Tensor:
        return self.token_adapter.merged_weight(self.token_adapter.active_here())

    @property
    def active_adapters(self) -> list[str]:
        return self.token_adapter.active_here()

    @property
    def active_adapter(self) -> str | None:
        active = self.active_adapters
        return active[0] if active else None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.token_adapter.trainable_tokens_delta)

    @property
    def disable_adapters(self) -> bool:
        return self.token_adapter.disable_adapters

    @disable_adapters.setter
    def disable_adapters(self, disabled: bool) -> None:
        self.token_adapter.disable_adapters = disabled

    @property
    def merged_adapters(self) -> list[str]:
        return list(self.token_adapter.merged_adapters)

    def update(self, name: str, indices: list[int], init_weights: bool = True) -> None:
        self.token_adapter.update_layer(name, indices, init_weights)

    def set_adapter(self, names: str | list[str]) -> None:
        """Make the one of ``names`` that has rows here the active adapter (none of them: the plain layer)."""
        names = [names] if isinstance(names, str) else list(names)
        here = [n for n in names if n in self.token_adapter.trainable_tokens_delta]
        if len(here) > 1:
            raise ValueError(
                f"Only one adapter can be set at a time for TrainableTokensWrapper: adapters {here} all train rows "
                f"of this {type(self.original_module).__name__}; activate one of them"
            )
        self.token_adapter.active_adapters = here

    def delete_adapter(self, name: str) -> None:
        self.token_adapter.delete_adapter(name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        rows = self.token_adapter.trainable_tokens_delta
        return [rows[name]] if name in rows else []

    def state_keys(self, name: str) -> list[str]:
        """The state-dict keys (relative to this wrapper) that adapter ``name`` saves: none for a tied layer."""
        if self.token_adapter.tied_to is not None or name not in self.token_adapter.trainable_tokens_delta:
            return []
        return [f"token_adapter.trainable_tokens_delta.{name}"]

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.token_adapter.merge(adapter_names, safe_merge)

    def unmerge(self) -> None:
        self.token_adapter.unmerge()

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        if self.routing is not None:  # a mixed-adapter batch: each row with its adapter's rows
            return self._routed_forward(x, *args, **kwargs)
        return self.token_adapter(x, *args, **kwargs)

    def _routed_forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        routing = self.routing
        xs = x.index_select(0, routing.on("rows", x.device))  # (B, ...) sorted by adapter
        layer = self.token_adapter
        outputs = [
            layer.forward_with(xs[start:stop], [name] if name in layer.trainable_tokens_delta else [], *args, **kwargs)
            for name, start, stop in routing.segments
        ]
        return torch.cat(outputs).index_select(0, routing.on("inverse", x.device))  # back in batch order


# -- injection -----------------------------------------------------------------------------------------------------
def token_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[int]]:
    """{module name: token ids} of ``config.trainable_token_indices``: a list names the input embedding (PEFT: the
    model's get_input_embeddings(), else a module called ``embed_tokens``); a dict names modules by name or dotted
    suffix. TokenError if a name matches no module."""
    spec = config.trainable_token_indices
    if spec is None:
        return {}
    names = [n for n, _ in model.named_modules() if n]
    if not isinstance(spec, dict):
        embedding = input_embedding_name(model)
        if embedding is None:
            raise TokenError(
                "trainable_token_indices is a list, but the model has no input embedding (get_input_embeddings) nor "
                "a module called 'embed_tokens'; give {embedding module name: [ids]} instead"
            )
        return {embedding: list(spec)}
    found: dict[str, list[int]] = {}
    for entry, ids in spec.items():
        matched = [n for n in names if n == entry or n.endswith(f".{entry}")]
        matched = [n for n in matched if not any(m != n and n.startswith(f"{m}.") for m in matched)]
        if not matched:
            raise TokenError(
                f"trainable_token_indices names {entry!r}, which matches no module of the model; name an embedding "
                "(e.g. 'embed_tokens')"
            )
        found.update(dict.fromkeys(matched, list(ids)))
    return found


def _lora_ancestor(model: nn.Module, name: str, is_lora: type) -> nn.Module | None:
    """The LoRA layer that module ``name`` is part of (its lora_A.<adapter>, lora_dropout.<adapter>, ...), if any."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:end]))
        if isinstance(parent, is_lora):
            return parent
    return None


def add_token_adapters(model: nn.Module, config: LoraConfig, adapter_name: str, is_lora: type) -> list[str]:
    """Wrap the modules ``config.trainable_token_indices`` names (or add ``adapter_name`` to their wrappers), and the
    output layers tied to the input embedding with wrappers that share its rows. ``is_lora``: the LoRA wrapper
    class, which these modules must not be. Returns the names of the wrappers that hold rows of their own."""
    targets = token_targets(model, config)
    if not targets:
        return []
    saved = config.modules_to_save or []
    for name in targets:
        if any(re.fullmatch(rf"(.*\.)?{re.escape(m)}", name) for m in saved):
            raise TokenError(
                f"module {name!r} is both in modules_to_save (trained in full) and in trainable_token_indices (some "
                "rows trained); keep it in one of them"
            )
    embedding_name = input_embedding_name(model)
    tied = tied_with_embedding(model)
    for name, ids in targets.items():
        if name in tied and embedding_name in targets:
            if targets[embedding_name] != ids and config.ensure_weight_tying:
                raise TokenError(
                    f"Cannot ensure weight tying when different token indices are specified for tied layers: "
                    f"{embedding_name}: {targets[embedding_name]}, {name}: {ids}. Give both the same ids, or set "
                    "ensure_weight_tying=False"
                )
    wrapped: list[str] = []
    for name, ids in targets.items():
        if name in tied and embedding_name in targets and targets[embedding_name] == ids:
            continue  # tied to the embedding: wrapped below with the embedding's rows
        module = model.get_submodule(name)
        owner = _lora_ancestor(model, name, is_lora)
        if owner is not None:
            raise TokenError(  # PEFT's words, lorakit's class names
                f"You are trying to target a module with {TrainableTokensWrapper} that is a child of "
                f"{type(owner)}. This is almost certainly not the intended behavior. Please ensure that the adapter "
                f"name, {adapter_name!r}, does not conflict with any of the targeted modules: "
                f"trainable_token_indices names {name!r}, a module of the LoRA layer itself; name the embedding, or "
                "give the adapter another name"
            )
        if isinstance(module, is_lora):
            raise TokenError(
                f"trainable_token_indices cannot be applied to {name!r}: it is a LoRA layer "
                f"({type(module).__name__}) of target_modules; leave it out of one of the two"
            )
        if not isinstance(module, TrainableTokensWrapper):
            if not isinstance(module, (nn.Embedding, nn.Linear)):
                raise TokenError(
                    f"trainable_token_indices names {name!r}, a {type(module).__name__}; it trains rows of an "
                    "nn.Embedding (or of an nn.Linear output layer)"
                )
            module = TrainableTokensWrapper(module)
            _replace(model, name, module)
        module.update(adapter_name, ids)  # the current rows, whatever init_lora_weights says (as PEFT)
        wrapped.append(name)
    if config.ensure_weight_tying and not tied:
        warnings.warn(  # PEFT's wording
            "ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
            "Weight tying will not be applied for trainable_token_indices.",
            stacklevel=4,
        )
    embedding = model.get_submodule(embedding_name) if embedding_name is not None else None
    if isinstance(embedding, TrainableTokensWrapper):
        for name in tied:
            module = model.get_submodule(name)
            if not isinstance(module, TrainableTokensWrapper):
                _replace(model, name, TrainableTokensWrapper(module, tied_to=embedding.token_adapter))
    return wrapped


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
