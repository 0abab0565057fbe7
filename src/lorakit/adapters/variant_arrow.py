"""Arrow routing as a variant (Ostapenko et al. 2024, arXiv 2405.11157; GenKnowSub: Belofsky et al., ACL 2025; the
maths: lorakit.ops.arrow): ``LoraConfig(arrow_config=ArrowConfig(...))``, added by lorakit.create_arrow_model as the
adapter ``"arrow_router"``. Its own A and B are never used: while it is active, each token of a layer gets the
softmax-weighted mix of that layer's task adapters (the experts: every other adapter of the layer except the general
ones, ``gks_<i>``) whose prototypes it is most aligned with.

The state of one router in one layer is an ``ArrowRouter`` module in ``layer.lora_arrow[adapter]`` (PEFT's place):
the experts its prototypes were built for (``task_adapter_names``), the prototypes (a buffer, not saved), the experts
GenKnowSub was applied to (``subtracted``) and ``stale``. Its state changes, each said here:

- Adding or deleting an adapter of the layer (LoraLayer.update_layer / delete_adapter) tells the router
  (``Lora.adapters_changed``), which only marks itself stale: a loaded adapter's weights arrive after it is added.
- The first forward of a stale router calls ``ArrowRouter.refresh``: GenKnowSub (``use_gks``) subtracts the mean of
  the general adapters from each expert not subtracted yet, in place (the expert's own A and B change, once per
  expert: activating a task adapter alone afterwards runs the subtracted one, as in PEFT), then the prototypes of all
  experts are built again (power iteration from ArrowConfig.rng_seed's start vector). A forward of a fresh router
  changes nothing. Call ``refresh`` yourself to do it before a forward.

An Arrow adapter has no single update s * B @ A: merging it (or naming it in a mixed batch) raises RuntimeError.
Dropout, as PEFT's: the router's lora_dropout applies to the mixed update.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from lorakit.adapters.variant_lora import Lora, LoraLayer
from lorakit.config import ArrowConfig, ConfigError
from lorakit.ops import arrow
from lorakit.quant.linear import QuantLinear, is_conv1d

ROUTER = "arrow_router"  # the adapter create_arrow_model adds (PEFT's name)
TASK_PREFIX = "task_"  # the experts create_arrow_model loads: task_0, task_1, ...
GKS_PREFIX = "gks_"  # the general adapters it loads for GenKnowSub: gks_0, ...
GENERAL_NAME = re.compile(rf"{GKS_PREFIX}\d+")  # never an expert, whatever the config lists (PEFT's rule)


def routable(module: nn.Module) -> bool:
    """Whether Arrow routes over adapters of ``module`` (a LoRA layer, or the module it wraps): an nn.Linear, a GPT-2
    Conv1D or a quantized linear layer (QuantLinear), as PEFT's Linear-like layers."""
    base = getattr(module, "base_layer", module)
    return isinstance(base, (nn.Linear, QuantLinear)) or is_conv1d(base)


class ArrowRouter(nn.Module):
    """One Arrow router's state in one layer (see the module docstring); PEFT's attribute names."""

    def __init__(self, config: ArrowConfig) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.temperature = config.router_temperature
        self.rng_seed = config.rng_seed
        self.use_gks = config.use_gks
        self.gks_adapter_names = list(config.gks_adapter_names or [])
        self.task_adapter_names: list[str] = []  # the experts of ``prototypes``, in the layer's adapter order
        self.subtracted: list[str] = []  # the experts GenKnowSub changed (each once)
        self.stale = True  # the layer's adapters changed since the prototypes were built (or none were built)
        self.register_buffer("prototypes", None, persistent=False)  # (E, in), the experts' dtype

    def experts(self, layer: LoraLayer) -> list[str]:
        """The layer's task adapters: all but Arrow routers and the general adapters."""
        return [
            name for name in layer.r
            if not isinstance(layer.variants[name], Arrow)
            and name not in self.gks_adapter_names and not GENERAL_NAME.fullmatch(name)
        ]

    def top_right_singular_vec_from_BA(self, A: Tensor, B: Tensor) -> Tensor:
        """An expert's prototype (in,), float32 (ops.arrow.top_right_singular_vector; PEFT's method name)."""
        return arrow.top_right_singular_vector(A, B, self.rng_seed)

    def mark_changed(self, changed: str) -> None:
        """Adapter ``changed`` was added to or deleted from the layer: rebuild at the next forward. An adapter made
        under a name GenKnowSub had changed before is a new expert: it gets subtracted again."""
        self.stale = True
        if changed in self.subtracted:
            self.subtracted.remove(changed)

    @torch.no_grad()
    def refresh(self, layer: LoraLayer) -> None:
        """GenKnowSub on the experts not subtracted yet (with ``use_gks``), then every expert's prototype. ValueError
        for a layer without experts, experts of different ranks, or general adapters the layer lacks."""
        experts = self.experts(layer)
        if not experts:
            raise ValueError(
                f"the Arrow router has no task adapters to route over in this {type(layer.base_layer).__name__}: "
                "load them first (lorakit.create_arrow_model(base_model, task_specific_adapter_paths, arrow_config))"
            )
        ranks = {name: layer.r[name] for name in experts + (self.gks_adapter_names if self.use_gks else [])}
        if len(set(ranks.values())) > 1:
            raise ValueError(
                f"Arrow mixes adapters of one rank, and this layer's have ranks {ranks}: load task (and general) "
                "adapters trained with the same r"
            )
        pending = [name for name in experts if name not in self.subtracted] if self.use_gks else []
        if pending:
            missing = [name for name in self.gks_adapter_names if name not in layer.r]
            if missing or not self.gks_adapter_names:
                raise ValueError(
                    f"GenKnowSub (use_gks=True) needs the general adapters {self.gks_adapter_names}, and this layer "
                    f"lacks {missing or 'them'}: pass general_adapter_paths to create_arrow_model, and keep them loaded"
                )
            mean = arrow.general_mean([layer.lora_weights(name) for name in self.gks_adapter_names])
            for name in pending:
                layer.load_factors(name, *arrow.subtract_general(*layer.lora_weights(name), mean))
            self.subtracted += pending
        A0, _ = layer.lora_weights(experts[0])
        prototypes = [self.top_right_singular_vec_from_BA(*layer.lora_weights(name)) for name in experts]
        self.prototypes = torch.stack(prototypes).to(device=A0.device, dtype=A0.dtype)  # (E, in)
        self.task_adapter_names = experts
        self.stale = False


class Arrow(Lora):
    """Arrow routing: the router's settings (an ArrowConfig); its state lives in ``layer.lora_arrow[adapter]``."""

    name = "arrow"
    title = "Arrow"
    runs_on = "nn.Linear and GPT-2 Conv1D layers"
    plain = False  # its forward is the experts' mix, not its own B(A(x))

    def __init__(self, config: ArrowConfig | None) -> None:
        if config is None:
            raise ConfigError("an Arrow adapter needs its settings: LoraConfig(arrow_config=ArrowConfig(...))")
        self.config = config

    def check(self, module: nn.Module, r: int) -> None:
        """TypeError for a target Arrow cannot route over (``routable``), as PEFT refuses it."""
        base = getattr(module, "base_layer", module)
        if not routable(module):
            raise TypeError(
                f"Arrow routes over LoRA adapters of Linear-like layers only (nn.Linear, GPT-2 Conv1D, a quantized "
                f"linear layer), and this target is a {type(base).__name__}: leave it out of target_modules (and use "
                "task adapters that adapt linear layers only)"
            )

    def create(self, layer: LoraLayer, adapter: str) -> None:
        """The router's state module, stale: its first forward builds the prototypes."""
        if not hasattr(layer, "lora_arrow"):
            layer.lora_arrow = nn.ModuleDict()
        layer.lora_arrow[adapter] = ArrowRouter(self.config)

    def delete(self, layer: LoraLayer, adapter: str) -> None:
        del layer.lora_arrow[adapter]

    def adapters_changed(self, layer: LoraLayer, adapter: str, changed: str) -> None:
        layer.lora_arrow[adapter].mark_changed(changed)

    def linear_forward(self, layer: LoraLayer, adapter: str, x: Tensor, base: Tensor, result: Tensor) -> Tensor:
        """``result + dropout(sum_e c_e(x) * s_e * B_e A_e x)`` over the layer's experts (ops.arrow), after the
        router's refresh if it is stale (see the module docstring)."""
        router = layer.lora_arrow[adapter]
        if router.stale:
            router.refresh(layer)
        experts = router.task_adapter_names
        factors = [layer.lora_weights(name) for name in experts]
        A = torch.stack([a for a, _ in factors])  # (E, r, in)
        B = torch.stack([b for _, b in factors])  # (E, out, r)
        tokens = x.to(A.dtype).reshape(-1, x.shape[-1])  # (t, in)
        scales = torch.tensor([layer.scaling[name] for name in experts], dtype=A.dtype, device=A.device)  # (E,)
        weights = arrow.routing_weights(tokens, router.prototypes.to(A.dtype), router.top_k, router.temperature)
        update = layer.lora_dropout[adapter](arrow.mixed_update(tokens, A, B, scales, weights))  # (t, out)
        return result + update.reshape(*x.shape[:-1], update.shape[-1]).to(result.dtype)

    def factors(self, layer: LoraLayer, adapter: str) -> tuple[Tensor, Tensor]:
        raise _no_single_update(adapter)

    def merged(self, layer: LoraLayer, adapter: str, weight: Tensor) -> Tensor:
        raise _no_single_update(adapter)

    def unmerged(self, layer: LoraLayer, adapter: str, weight: Tensor) -> Tensor:
        raise _no_single_update(adapter)

    def merged_out_in(self, layer: LoraLayer, adapter: str, weight: Tensor, base: Tensor, delta: Tensor) -> Tensor:
        raise _no_single_update(adapter)


def _no_single_update(adapter: str) -> RuntimeError:
    return RuntimeError(  # PEFT's wording first (its tests match it), then why and the fix
        f"Cannot merge an active Arrow router adapter. Remove it first. ({adapter!r} mixes the task adapters per "
        "token, so no single s * B @ A computes it: it can neither be merged nor run as one adapter of a mixed batch "
        f"(adapter_names=). delete_adapter({adapter!r}) first, or merge a task adapter by name: "
        "merge_and_unload(adapter_names=['task_0']))"
    )
