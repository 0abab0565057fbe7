"""LoraLayer: what every LoRA wrapper around one base module shares, whatever the module kind.

A wrapper holds the untouched ``base_layer`` and, per named adapter, a low-rank update ``delta W = s * B @ A`` with
A (r, in), B (out, r) and scaling s = alpha / r (alpha / sqrt(r) with rsLoRA). The module kinds own the parameter
layout and the forward (lorakit.adapters.linear, .embedding; the table is lorakit.adapters.kinds); each adapter's
variant (lorakit.adapters.variants: plain LoRA, DoRA) decides how its update enters the output and the merged weight.

State changes are method calls: ``update_layer`` / ``delete_adapter`` (which also tell each adapter's variant: an
Arrow router routes over the others), ``set_adapter`` (also behind the ``active_adapters`` setter),
``enable_adapters`` (behind ``disable_adapters``), ``merge`` / ``unmerge``. Each of them ends with ``_refresh()``,
which recomputes what the forward looks up; nothing else changes it. Merging happens only when ``merge()`` is called,
never as a side effect of ``train()`` / ``eval()``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters import mixed_batch, variants
from lorakit.adapters.variants import VARIANTS, Lora
from lorakit.config import ConfigError, PeftWarning, scaling_for
from lorakit.ops.init import get_initializer
from lorakit.quant.half import REDUCED_PRECISION
from lorakit.quant.linear import QuantizedBaseError, QuantLinear


class LoraLayer(nn.Module):
    """Base of the wrappers: adapter bookkeeping, merge / unmerge. Subclasses own the parameter layout."""

    fan_in_fan_out: bool = False  # True if base weight is stored (in, out) instead of (out, in)
    embedding = False  # True for kinds whose input is token ids (their own default initializer, no dropout)
    manages_inner = False  # True for kinds holding LoRA layers of their own that they pass every state change to
    module_type = "lora.Linear"  # PEFT's name of the wrapper class: the repr's and get_layer_status's
    weight_tied_to: str | None = None  # ensure_weight_tying: the embedding whose weight (and LoRA) this layer shares
    supports_lora_bias = True  # whether B can have a bias (lora_bias=True): see _create_lora_bias
    variants_supported: tuple[str, ...] = ("lora", "dora")  # the VARIANTS names this kind can run

    def __init__(self, base_layer: nn.Module, in_features: int | None = None, out_features: int | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        # a kind passes its sizes; a user's subclass may leave them to the base's own in_features / out_features
        self.in_features = getattr(base_layer, "in_features", None) if in_features is None else in_features
        self.out_features = getattr(base_layer, "out_features", None) if out_features is None else out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only: m (out,) as .weight per adapter (PEFT's)
        self.variants: dict[str, Lora] = {}  # one variant object per adapter (lorakit.adapters.variants)
        self.lora_bias: dict[str, bool] = {}  # lora_bias=True: B has a bias b (out,), the update is s * (B A x + b)
        self.merged_adapters: list[str] = []
        self.routing: mixed_batch.Routing | None = None  # set while a batch runs one adapter per row (adapter_names)
        self._active: list[str] = []
        self._disabled = False

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        """The active adapters (a copy: change them with set_adapter, or by assigning this attribute)."""
        return list(self._active)

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self.set_adapter(names)

    @property
    def _active_adapter(self) -> str | list[str]:
        """PEFT's private attribute of the name, which code written for PEFT reads or sets: the active adapter as a
        str when there is one, else the list. Setting it changes the active adapters only (no requires_grad), as it
        does in PEFT."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @_active_adapter.setter
    def _active_adapter(self, names: str | list[str]) -> None:
        self._active = [names] if isinstance(names, str) else list(names)
        self._refresh()

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make ``adapter_names`` the active adapters (their updates add up); names this layer lacks are kept, and
        ignored by the forward."""
        self._active = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._refresh()

    @property
    def disable_adapters(self) -> bool:
        """True while the adapters are off (the layer computes as its base layer)."""
        return self._disabled

    @disable_adapters.setter
    def disable_adapters(self, disabled: bool) -> None:
        self.enable_adapters(not disabled)

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the adapters on or off (PEFT's method of the name)."""
        self._disabled = not enabled
        self._refresh()

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _refresh(self) -> None:
        """Recompute what the forward looks up in the current state. Every method that changes the state calls it."""

    # -- parameter layout (module kinds) -------------------------------------------------------------------------
    def _create(self, name: str, r: int) -> None:
        raise NotImplementedError

    def lora_weights(self, name: str) -> tuple[Tensor, Tensor]:
        """The (A (r, in), B (out, r)) parameters of adapter ``name``."""
        raise NotImplementedError

    def load_factors(self, name: str, A: Tensor, B: Tensor) -> None:
        """Set adapter ``name``'s weights to A (r, in) and B (out, r) (a kind whose ``lora_weights`` are no views of
        its parameters, as a grouped conv's B, writes them its own way)."""
        A_param, B_param = self.lora_weights(name)
        with torch.no_grad():
            A_param.copy_(A)
            B_param.copy_(B)

    def _drop(self, name: str) -> None:
        raise NotImplementedError

    def factor_parameters(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """The Parameters that hold A and B (what ``lora_weights`` computes from, where a kind stores them in
        another shape: a conv's kernels, BD-LoRA's packed blocks)."""
        return self.lora_weights(name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Every trainable parameter of adapter ``name``: A, B, B's bias (lora_bias), its variant's (DoRA's m)."""
        b = self.lora_bias_of(name)
        return [*self.factor_parameters(name), *([] if b is None else [b]), *self.variants[name].parameters(self, name)]

    @property
    def adapter_layer_names(self) -> tuple[str, ...]:
        """PEFT's attribute of the name: this layer's containers of adapter weights, each a dict adapter name ->
        module or parameter (``lora_A``, ``lora_B``, or an embedding's ``lora_embedding_A`` / ``_B``,
        ``lora_magnitude_vector``, a variant's own such as KaSA's ``lora_diag``); ``lora_dropout`` holds none."""
        return tuple(
            name
            for name, child in self.named_children()
            if isinstance(child, (nn.ModuleDict, nn.ParameterDict)) and name != "lora_dropout"
        )

    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")  # PEFT's: per-adapter settings, by name

    @property
    def frozen_peft_weight_names(self) -> Mapping[str, tuple[str, ...]]:
        """PEFT's attribute of the name, a live read-only view of the variants: per adapter that has any, the names
        of the adapter weights its variant keeps frozen (MiCA: ``{"default": ("lora_B",)}``)."""
        return variants.FrozenWeightNames(self)

    @property
    def lora_variant(self) -> Mapping[str, Lora]:
        """PEFT's attribute of the name: the variant object of each adapter that has one other than plain LoRA
        (DoRA, aLoRA, ...); a live read-only view of ``variants`` without the plain ones, so a view taken before
        ``delete_adapter`` no longer holds the deleted adapter."""
        return variants.SpecialVariants(self)

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        """The adapter parameters that train while adapter ``name`` does: all but its variant's frozen ones (MiCA's
        B)."""
        frozen = {id(p) for p in self.variants[name].frozen(self, name)}
        return [p for p in self.adapter_parameters(name) if id(p) not in frozen]

    # -- lora_bias: a bias on B (PEFT's LoraConfig.lora_bias) ----------------------------------------------------
    # The generic part lives here; a kind takes part by having ``lora_B[name]`` a module with a ``bias`` slot whose
    # output is the layer's (nn.Linear, nn.ConvNd created with bias=False) and by calling lora_B as a module in its
    # forward (or adding ``s * lora_bias_of(name)`` itself). Merge / unmerge then add / subtract s * b to / from the
    # base layer's bias for every kind. A kind that cannot hold one overrides ``_create_lora_bias`` to refuse.
    def _create_lora_bias(self, name: str) -> None:
        """Give adapter ``name``'s B a zero bias b (out,): the adapter still starts as the identity."""
        if isinstance(self.base_layer, REDUCED_PRECISION):
            raise ConfigError(
                f"lora_bias=True on a reduced-precision base ({type(self.base_layer).__name__}, lorakit.quantize) is "
                "not supported: its merge makes a new full-precision layer that would lose the bias. Pass "
                "lora_bias=False, or quantize after merging"
            )
        if getattr(self.base_layer, "bias", None) is None:
            warnings.warn(  # PEFT's wording (its tests match it)
                f"`lora_bias=True` was passed but the targeted layer of type {type(self.base_layer).__name__} has no "
                "bias. This means that merging LoRA weights won't be possible (the bias has nowhere to go); "
                "keep the adapter unmerged, or train it with lora_bias=False",
                PeftWarning,
                stacklevel=4,
            )
        B = self.lora_B[name]
        B.bias = nn.Parameter(B.weight.new_zeros(self.out_features))

    def lora_bias_of(self, name: str) -> nn.Parameter | None:
        """B's bias b (out,) of adapter ``name`` (lora_bias=True), else None."""
        if not self.lora_bias.get(name):
            return None
        return self.lora_B[name].bias

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def _all_available_adapter_names(self) -> list[str]:
        """The adapters this layer holds, sorted (PEFT's BaseTunerLayer method of the name, which its tests call)."""
        return sorted(self.r)

    # -- adapters ------------------------------------------------------------------------------------------------
    # -- variants ------------------------------------------------------------------------------------------------
    @property
    def lora_variants(self) -> dict[tuple[str, ...], Any]:
        """PEFT's table of the variants this kind runs: {sorted tuple of the names a config asks for them by
        (lorakit.config.requested_variants): variant class}, () for plain LoRA; made from ``variants_supported``."""
        return variants.variant_table(self.variants_supported)

    def resolve_lora_variant(self, *, config: Any, target_name: str = "", **kwargs: Any) -> Any:
        """The variant object ``config`` (a LoraConfig, or any dataclass tagged as it) asks for on this layer, from
        ``lora_variants`` (PEFT's method of the name; lorakit's own injection picks the same object by
        lorakit.adapters.variants.for_config). None where the table maps the request to None. ValueError, in PEFT's
        words, for a table whose keys are not sorted tuples or name a variant the config has no tag for, and for a
        request the table lacks."""
        return variants.resolve_lora_variant(self, config, target_name)

    def _add_from_config(self, name: str, config: Any, r: int | None, lora_alpha: float | None) -> None:
        """PEFT's constructor form, ``Linear(base_layer, adapter_name, config, r=..., lora_alpha=...)``: add adapter
        ``name`` with the config's settings (r and alpha as given, else the config's) and make it active."""
        r = config.r if r is None else r
        alpha = config.lora_alpha if lora_alpha is None else lora_alpha
        variant = self.resolve_lora_variant(config=config)
        self.update_layer(name, r, alpha, config.lora_dropout, config.init_lora_weights, config.use_rslora,
                          init_options=config.loftq_config, variant=variant,
                          **({"lora_bias": True} if config.lora_bias else {}))
        self.set_adapter(name)

    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool = False,
        init_options: dict[str, Any] | None = None,
        use_dora: bool = False,
        lora_bias: bool = False,
        variant: Lora | None = None,
    ) -> None:
        """Add adapter ``name`` with rank ``r``, initialized by ``init_lora_weights`` (see lorakit.ops.init).
        ``init_options`` (a config's loftq_config) go to initializers that name them as keyword parameters.
        ``variant`` (lorakit.adapters.variants.for_config) is the adapter's variant, made after the initializer ran
        (DoRA's magnitude is taken from the initialized factors); without it, ``use_dora`` chooses DoRA or plain
        LoRA. ``lora_bias`` gives its B a zero bias (see _create_lora_bias)."""
        variant = variant if variant is not None else VARIANTS["dora" if use_dora else "lora"]()
        if variant.name not in self.variants_supported:
            raise ConfigError(
                f"{variant.title} does not support adapting {type(self.base_layer).__name__} layers (it runs on "
                f"{variant.runs_on}, as in PEFT); leave this layer out of target_modules, or use plain LoRA for it"
            )
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = scaling_for(lora_alpha, r, use_rslora)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._create(name, r)
        self.lora_bias[name] = lora_bias
        if lora_bias:
            self._create_lora_bias(name)
        self.train(self.base_layer.training)  # new modules start in train mode; follow the model's mode instead
        init = get_initializer(init_lora_weights, embedding=self.embedding)
        weight = self.weight_out_in()  # (out, in)
        A0, B0, residual = init(weight, r, self.scaling[name], **_accepted(init, init_options or {}))
        self.load_factors(name, A0, B0)
        A, _ = self.lora_weights(name)
        with torch.no_grad():
            if residual is not None:
                self._set_base_weight(residual)
        self.variants[name] = variant
        variant.create(self, name)
        if A.device != weight.device:
            self.to(weight.device)
        self._refresh()
        self._adapters_changed(name)

    def set_scale(self, name: str, scaling: float) -> None:
        self.scaling[name] = scaling

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge it first")
        self._drop(name)
        self.variants.pop(name).delete(self, name)
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_bias):
            d.pop(name, None)
        del self.lora_dropout[name]
        self._active = [a for a in self._active if a != name]
        self._refresh()
        self._adapters_changed(name)

    def _adapters_changed(self, name: str) -> None:
        """Tell every adapter's variant that adapter ``name`` was added or deleted (an Arrow router rebuilds)."""
        for adapter, variant in self.variants.items():
            variant.adapters_changed(self, adapter, name)

    # -- the wrapped layer's attributes, read as modeling code reads them -----------------------------------------
    # Modeling code reads a layer's weight and bias (T5's feed-forward: ``self.wo.weight.dtype``). The wrapper answers
    # with the base layer's, without registering them a second time: the state dict keeps PEFT's keys
    # (``<name>.base_layer.weight``). A base without one raises AttributeError as the base layer itself would; a
    # QuantLinear's is its dequantized weight, a new tensor (lorakit.quant.linear).
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def __repr__(self) -> str:
        text = super().__repr__()  # 'LoraLinear(...)' -> PEFT's 'lora.Linear(...)'
        return self.module_type + text[text.index("(") :]

    def get_base_layer(self) -> nn.Module:
        """The wrapped module itself, under any nesting of LoRA wrappers (PEFT's method of the name)."""
        base = self.base_layer
        while isinstance(base, LoraLayer):
            base = base.base_layer
        return base

    # -- weights -------------------------------------------------------------------------------------------------
    def base_weight(self) -> nn.Parameter:
        return self.base_layer.weight

    def transpose(self, weight: Tensor) -> Tensor:
        """A weight in the base's storage layout as (out, in), or back (a transpose for (in, out) storage)."""
        return weight.T if self.fan_in_fan_out else weight

    def weight_out_in(self) -> Tensor:
        """The base weight as (out, in), whatever its storage layout (fp32 dequantized for a quantized base)."""
        if self.quantized:
            return self.base_layer.dequantize()
        return self.transpose(self.base_weight().detach())

    def delta_out_in(self, name: str) -> Tensor:
        """s * B @ A as (out, in), in the adapter's dtype (A and B as its variant reads them: ``Lora.factors``)."""
        A, B = self.variants[name].factors(self, name)
        return (B @ A) * self.scaling[name]  # (out, r) @ (r, in) -> (out, in)

    def delta_weight(self, name: str) -> Tensor:
        """s * B @ A, in the base weight's storage layout and dtype."""
        dtype = torch.float32 if self.quantized else self.base_weight().dtype
        return self.transpose(self.delta_out_in(name)).to(dtype)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """PEFT's name for ``delta_weight``."""
        return self.delta_weight(adapter)

    # -- a quantized base (QLoRA, lorakit.quant): read-only codes, adapters in full precision ---------------------
    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, QuantLinear)

    def _set_base_weight(self, weight: Tensor) -> None:
        """Make ``weight`` (out, in) the base weight. A quantized base stores it quantized: lossless for LoftQ's
        residual (already a dequantized weight), lossy for other residuals (PiSSA, OLoRA)."""
        if self.quantized:
            self.base_layer.requantize_(weight)
        else:
            self.base_weight().copy_(self.transpose(weight))

    # -- merging -------------------------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the updates of ``adapter_names`` (default: the active ones) into the base weight. Adapters merged
        already are skipped, with PEFT's warning."""
        asked = [n for n in (adapter_names or self._active) if n in self.r]
        names = [n for n in asked if n not in self.merged_adapters]
        if self.merged_adapters and asked:
            warnings.warn(
                f"Already following adapters were merged {','.join(self.merged_adapters)}. You are now additionally "
                f"merging {','.join(names)}."
                if names
                else "All adapters are already merged, nothing to do.",
                stacklevel=2,
            )
        if not names:
            return
        if self.quantized:
            raise QuantizedBaseError(
                f"cannot merge adapter(s) {names} in place into a quantized base ({self.base_layer.extra_repr()}): "
                "adding s * B @ A would mean quantizing the sum again, which rounds the update away. Use "
                "merge_and_unload(), which returns full-precision nn.Linear layers (dequantized W + s * B @ A), or "
                "keep the adapter unmerged"
            )
        weight = self.base_weight()
        for name in names:
            if self.weight_tied_to is not None:  # the shared weight gets the update from the embedding's merge
                self.merged_adapters.append(name)
                self._refresh()
                continue
            with torch.no_grad():
                new = self.variants[name].merged(self, name, weight.data)
                new_bias = self._merged_bias(name, +1)
                if safe_merge and not all(torch.isfinite(t).all() for t in (new, new_bias) if t is not None):
                    raise ValueError(
                        f"NaNs detected in the merged weights: merging adapter {name!r} gives NaN/inf weights; the "
                        "adapter is broken"
                    )
                weight.data = new
                if new_bias is not None:
                    self.base_layer.bias.data = new_bias
            self.merged_adapters.append(name)
            self._refresh()

    def _merged_bias(self, name: str, sign: int) -> Tensor | None:
        """The base bias +/- s * b of a lora_bias adapter (None for others). RuntimeError if the base has no bias."""
        b = self.lora_bias_of(name)
        if b is None:
            return None
        base_bias = getattr(self.base_layer, "bias", None)
        if base_bias is None:
            raise RuntimeError(
                f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias: adapter {name!r} "
                f"on this {type(self.base_layer).__name__} has a bias on B that has nowhere to go. Keep it unmerged"
            )
        return (base_bias.data + sign * self.scaling[name] * b.detach().to(base_bias.dtype)).to(base_bias.dtype)

    def unmerge(self) -> None:
        """Subtract every merged update from the base weight, newest first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._refresh()
            if self.weight_tied_to is not None:  # the embedding's unmerge restores the shared weight
                continue
            with torch.no_grad():
                weight = self.base_weight()
                weight.data = self.variants[name].unmerged(self, name, weight.data)
                new_bias = self._merged_bias(name, -1)
                if new_bias is not None:
                    self.base_layer.bias.data = new_bias

    def merged_weight_out_in(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> Tensor:
        """dequantize(W) + the updates of ``adapter_names`` (default: the active ones), fp32 (out, in): the weight of
        the full-precision module a reduced-precision base is merged into (lorakit.adapters.inject.merged_linear)."""
        names = [n for n in (adapter_names or self._active) if n in self.r]
        with torch.no_grad():
            base = weight = self.weight_out_in().float()  # (out, in)
            for name in names:
                A, B = self.variants[name].factors(self, name)
                delta = (B.float() @ A.float()) * self.scaling[name]  # (out, r) @ (r, in) -> (out, in)
                weight = self.variants[name].merged_out_in(self, name, weight, base, delta)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"merging adapters {names} gives NaN/inf weights; the adapter is broken")
        return weight


def _accepted(init: Callable[..., object], options: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that ``init`` names as optional parameters: an initializer declares the options it
    reads (LoftQ: loftq_bits, loftq_iter), the others are called with (weight, r, scaling) only."""
    if not options:
        return {}
    params = inspect.signature(init).parameters
    return {k: v for k, v in options.items() if k in params and params[k].default is not inspect.Parameter.empty}
