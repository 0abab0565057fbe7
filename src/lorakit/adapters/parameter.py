"""LoRA on one ``nn.Parameter`` of a module (``LoraConfig.target_parameters``; PEFT's ``ParamWrapper``): e.g. the
fused 3-D expert weights of transformers 5's mixtures of experts (``mlp.experts.gate_up_proj``), or a router's
2-D ``weight``, which no ``nn.Linear`` computes with.

The wrapper holds the module that owns the parameter as ``base_layer`` and calls it with the parameter replaced by
``W + sum over the active adapters of delta W`` (lorakit.ops.param_delta: one low-rank update per expert), so that
whatever the module does with its weight sees the adapted one, and the gradient reaches A and B through it::

    y = base_layer(x) computed with  W' = W + s * B_e @ A_e  (per expert e)

The factors keep PEFT's layout and names (``lora_A[name]`` an ``nn.Linear(in, r * E)``, ``lora_B[name]`` an
``nn.Linear(r * E, out)``), so state-dict keys match PEFT's. Each wrapper adapts one parameter: two parameters of one
module are two wrappers, the second around the first (``<module>.base_layer.lora_A...`` is the inner one's), in the
order the module registers them, as PEFT nests them.

What PEFT's ParamWrapper refuses, lorakit refuses too, with the fix: LoRA dropout (the update is added to the weight,
so there is no input x to drop in B(A(dropout(x)))), DoRA, fan_in_fan_out, weight-based initializers (PiSSA, OLoRA,
LoftQ, ...) and mixed-adapter batches (``adapter_names``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.variants import VARIANTS, Lora
from lorakit.config import scaling_for
from lorakit.ops import param_delta
from lorakit.ops.init import get_initializer

# the initializers that need only the parameter's shape (True is "kaiming"; False both factors random)
SHAPE_ONLY_INITS = (True, False, "gaussian")


class ParameterError(ValueError):
    """A configuration that LoRA on a parameter cannot run (PEFT's ParamWrapper refuses the same)."""


class LoraParameter(LoraLayer):
    """LoRA on parameter ``parameter_name`` of ``base_layer`` (a module, or another LoraParameter of the same
    module). ``num_experts`` is E for a 3-D expert stack, 1 for a 2-D weight."""

    module_type = "lora.ParamWrapper"  # PEFT's name of the layer type, in get_layer_status

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        owner = base_layer
        while isinstance(owner, LoraParameter):
            owner = owner.base_layer
        param = getattr(owner, parameter_name)
        layout = param_delta.layout_of(param.shape, bool(getattr(owner, "is_transposed", False)))
        experts, in_f, out_f = param_delta.dims(param.shape, layout)
        super().__init__(base_layer, in_f, out_f)
        self.parameter_name = parameter_name  # PEFT's attribute
        self.layout = layout
        self.num_experts = experts  # PEFT's attribute
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    # -- the owning module's attributes, read as modeling code reads them (``self.experts.num_experts``, ...) ------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.base_layer, name)

    def get_param(self) -> nn.Parameter:
        """The adapted parameter itself (PEFT's name), held by the innermost module."""
        return getattr(self.get_base_layer(), self.parameter_name)

    def get_base_layer(self) -> nn.Module:
        """The module that owns the parameter, under any nesting of LoraParameter wrappers."""
        owner = self.base_layer
        while isinstance(owner, LoraParameter):
            owner = owner.base_layer
        return owner

    def _path(self) -> str:
        """The parameter's name as seen from ``base_layer`` ('base_layer.gate_up_proj' when nested once)."""
        depth, owner = 0, self.base_layer
        while isinstance(owner, LoraParameter):
            depth, owner = depth + 1, owner.base_layer
        return "base_layer." * depth + self.parameter_name

    # -- parameter layout ----------------------------------------------------------------------------------------
    def _create(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def lora_weights(self, name: str) -> tuple[Tensor, Tensor]:
        """(A (r * E, in), B (out, r * E)) of adapter ``name``."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _drop(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

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
        variant: Lora | None = None,
    ) -> None:
        """Add adapter ``name``: rank r per expert, initialized from the parameter's shape only. Plain LoRA only
        (``variant`` from lorakit.adapters.variants.for_config: another one is refused)."""
        where = f"LoRA on parameter {self.parameter_name!r} of {type(self.get_base_layer()).__name__}"
        if lora_dropout:
            raise ParameterError(
                f"{where} cannot use lora_dropout={lora_dropout}: the update is added to the weight, not computed "
                "from an input, so there is no input to drop (PEFT refuses it too); set lora_dropout=0"
            )
        if use_dora or (variant is not None and variant.name == "dora"):
            raise ParameterError(f"{where} cannot use DoRA (PEFT has none there either); set use_dora=False")
        if variant is not None and variant.name != "lora":
            raise ParameterError(
                f"{where} cannot use {variant.title} (PEFT has none there either): adapt the parameter with plain "
                "LoRA, or leave it out of target_parameters"
            )
        init_name = init_lora_weights.lower() if isinstance(init_lora_weights, str) else init_lora_weights
        if init_name not in SHAPE_ONLY_INITS:
            raise ParameterError(
                f"{where} cannot use init_lora_weights={init_lora_weights!r}, which reads a 2-D base weight; use "
                "True (kaiming), 'gaussian' or False"
            )
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = scaling_for(lora_alpha, r, use_rslora)
        self.lora_dropout[name] = nn.Identity()
        self._create(name, r)
        self.train(self.get_base_layer().training)
        rows = r * self.num_experts  # A (r * E, in), B (out, r * E): initialized as one rank-(r * E) pair
        shape = torch.empty(self.out_features, self.in_features, device="meta")
        A0, B0, _ = get_initializer(init_lora_weights)(shape, rows, self.scaling[name])
        if isinstance(init_lora_weights, str):  # 'gaussian'
            A0 = A0 * self.num_experts  # std 1 / r per expert, as PEFT draws it (gaussian gives 1 / rows)
        A, B = self.lora_weights(name)
        with torch.no_grad():
            A.copy_(A0)
            B.copy_(B0)
        self.variants[name] = VARIANTS["lora"]()
        param = self.get_param()
        if A.device != param.device:
            self.lora_A[name].to(param.device)
            self.lora_B[name].to(param.device)
        self._refresh()

    # -- weights -------------------------------------------------------------------------------------------------
    def base_weight(self) -> nn.Parameter:
        return self.get_param()

    def weight_out_in(self) -> Tensor:
        if self.layout is not param_delta.Layout.OUT_IN:
            raise TypeError(f"parameter {self.parameter_name!r} is a stack of {self.num_experts} expert weights, "
                            "not one (out, in) weight")
        return self.get_param().detach()

    def delta_out_in(self, name: str) -> Tensor:
        if self.layout is not param_delta.Layout.OUT_IN:
            raise TypeError(f"parameter {self.parameter_name!r} has one update per expert; use delta_weight({name!r})")
        return super().delta_out_in(name)

    def delta_weight(self, name: str) -> Tensor:
        """s * B_e @ A_e per expert, in the parameter's layout and dtype (PEFT's get_delta_weight)."""
        A, B = self.lora_weights(name)
        delta = param_delta.delta_weight(A, B, self.scaling[name], self.num_experts, self.layout)
        param = self.get_param()
        return delta.to(param.device, param.dtype)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if parametrize.is_parametrized(self.get_base_layer(), self.parameter_name):
            raise ParameterError(
                f"parameter {self.parameter_name!r} is parametrized (torch.nn.utils.parametrize): its value is "
                "computed, so there is no stored weight to merge the update into; keep the adapter unmerged, or "
                "remove the parametrization first (parametrize.remove_parametrizations(..., leave_parametrized=True))"
            )
        super().merge(adapter_names, safe_merge)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.routing is not None:
            raise ParameterError(
                f"LoRA on parameter {self.parameter_name!r} cannot serve a mixed-adapter batch (adapter_names), as "
                "in PEFT: run one adapter per batch, or leave this parameter out of target_parameters"
            )
        active = [n for n in self._active if n in self.r]
        if self._disabled or self.merged_adapters or not active:
            return self.base_layer(*args, **kwargs)
        owner = self.get_base_layer()
        if parametrize.is_parametrized(owner, self.parameter_name):  # W = P(original): W' = P(original) + delta
            return self._forward_parametrized(owner, sum(self.delta_weight(n) for n in active), args, kwargs)
        weight = self.get_param()
        for name in active:  # W' = W + sum of the active updates, in W's dtype
            weight = weight + self.delta_weight(name)
        return functional_call(self.base_layer, {self._path(): weight}, args, kwargs)

    def _forward_parametrized(self, owner: nn.Module, delta: Tensor, args: tuple, kwargs: dict) -> Any:
        """The forward for a parameter that is parametrized already (torch.nn.utils.parametrize), whose value cannot
        be swapped: the update is one more parametrization (X -> X + delta) for the call, removed after it."""
        parametrize.register_parametrization(owner, self.parameter_name, _AddDelta(delta), unsafe=True)
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            del owner.parametrizations[self.parameter_name][-1]

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}"


class _AddDelta(nn.Module):
    """A parametrization X -> X + delta (LoraParameter._forward_parametrized)."""

    def __init__(self, delta: Tensor) -> None:
        super().__init__()
        self.delta = delta  # a plain attribute: part of the graph, not of the state dict

    def forward(self, X: Tensor) -> Tensor:
        return X + self.delta
