"""LoRA around ``nn.MultiheadAttention`` (query, key and value of one embedding size, packed in ``in_proj_weight``
(3 * E, E); the output projection ``out_proj`` (E, E)).

    in_proj_weight' = in_proj_weight + s * B @ A           A (r, E), B (3E, r): this wrapper's lora_A / lora_B
    out_proj.weight' = out_proj.weight + s * B_o @ A_o     A_o (r, E), B_o (E, r): ``out_proj`` wrapped in a LoraLinear

torch's attention reads both weights as tensors (``F.multi_head_attention_forward``); it never calls ``out_proj`` as
a module. So the forward runs the unchanged ``nn.MultiheadAttention.forward`` with the two updated weights swapped
in for that call only (``torch.func.functional_call``): the base parameters are never replaced, and gradients reach
A, B, A_o and B_o through the sums. As in PEFT, ``lora_dropout`` has no effect here (a dropout on x cannot be
expressed as a change of weight); state-dict keys are PEFT's (``mha.lora_A.<name>.weight``,
``mha.base_layer.out_proj.lora_A.<name>.weight``).

The out_proj wrapper is a LoraLayer of its own, so model-wide state changes reach it as any layer; this wrapper also
passes every change made on it directly (``layer.merge()``, ``set_adapter``, ...) to out_proj, so that the two never
disagree. Mixed-adapter batches (``adapter_names=``) and DoRA are refused, as in PEFT.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.linear import LoraLinear
from lorakit.adapters.variant_lora import Lora


class LoraMultiheadAttention(LoraLayer):
    """LoRA on the packed q/k/v projection of ``nn.MultiheadAttention``, and on its ``out_proj``."""

    module_type = "lora.MultiheadAttention"
    manages_inner = True  # out_proj's LoraLinear: model-wide merge / unmerge / unwrap leave it to this layer

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer._qkv_same_embed_dim:  # PEFT's words, so that code matching its error still does
            raise ValueError(
                "Only same embed for query/key/value is supported as of now for MultiheadAttention (this one has "
                f"embed_dim={base_layer.embed_dim}, kdim={base_layer.kdim}, vdim={base_layer.vdim}); target its "
                "out_proj alone or leave it out of target_modules"
            )
        super().__init__(base_layer, base_layer.embed_dim, 3 * base_layer.embed_dim)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        if not isinstance(base_layer.out_proj, LoraLinear):
            base_layer.out_proj = LoraLinear(base_layer.out_proj)

    # -- what code reads from an nn.MultiheadAttention: answered by the base module (``out_proj``: the plain base
    # Linear, as in PEFT; its LoRA wrapper is ``lora_out_proj``). It has no ``weight`` / ``bias``: reading them raises.
    @property
    def lora_out_proj(self) -> LoraLinear:
        return self.base_layer.out_proj

    @property
    def out_proj(self) -> nn.Module:
        return self.base_layer.out_proj.base_layer

    def _restore_weights(self) -> None:
        """PEFT's method of the name, which re-registers the base weights its merge-unmerge forward removes. Nothing
        to do here: this forward swaps the updated weights in for one call (functional_call) and never touches the
        base parameters, whose requires_grad is the user's."""

    def merge_masks(self, *args: Any, **kwargs: Any) -> tuple[Tensor | None, int | None]:
        return self.base_layer.merge_masks(*args, **kwargs)

    # -- parameter layout -------------------------------------------------------------------------------------
    def _create(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def lora_weights(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _drop(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def base_weight(self) -> nn.Parameter:
        return self.base_layer.in_proj_weight

    # -- state changes reach out_proj too ---------------------------------------------------------------------
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
        if use_dora or (variant is not None and variant.name == "dora"):
            raise ValueError(
                "MultiheadAttention does not support DoRA (yet), please set use_dora to False, or leave this layer out "
                "of target_modules"
            )
        if variant is not None and variant.name != "lora":  # PEFT's wording for VeLoRA, then the fix
            raise ValueError(
                f"MultiheadAttention does not support {variant.title}: leave this layer out of target_modules, or "
                "adapt it with plain LoRA"
            )
        for layer in (super(), self.lora_out_proj):
            layer.update_layer(name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, init_options)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.lora_out_proj.r:
            self.lora_out_proj.delete_adapter(name)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        super().set_adapter(adapter_names)
        self.lora_out_proj.set_adapter(adapter_names)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.lora_out_proj.enable_adapters(enabled)

    def set_scale(self, name: str, scaling: float) -> None:
        super().set_scale(name, scaling)
        self.lora_out_proj.set_scale(name, scaling)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        super().merge(adapter_names, safe_merge)
        self.lora_out_proj.merge(adapter_names, safe_merge)

    def unmerge(self) -> None:
        super().unmerge()
        self.lora_out_proj.unmerge()

    # -- forward ----------------------------------------------------------------------------------------------
    def updated_weights(self) -> dict[str, Tensor]:
        """The two weights with the active adapters' updates added, keyed as the base module's parameters, in the
        base weights' dtypes."""
        in_w = self.base_layer.in_proj_weight
        out_w = self.lora_out_proj.base_layer.weight
        for name in self._active:
            if name in self.r:
                in_w = in_w + self.delta_out_in(name).to(in_w.dtype)  # (3E, E)
            if name in self.lora_out_proj.r:
                out_w = out_w + self.lora_out_proj.delta_out_in(name).to(out_w.dtype)  # (E, E)
        return {"in_proj_weight": in_w, "out_proj.base_layer.weight": out_w}

    def forward(self, query: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        if self.routing is not None or self.lora_out_proj.routing is not None:
            raise TypeError(
                "lora.MultiheadAttention does not support mixed adapter batches (adapter_names=...); run the "
                "batch once per adapter with set_adapter"
            )
        if self._disabled or self.merged_adapters or not any(n in self.r for n in self._active):
            return self.base_layer(query, *args, **kwargs)
        return torch.func.functional_call(self.base_layer, self.updated_weights(), (query, *args), kwargs)


def _answered_by_base(name: str) -> property:
    return property(lambda self: getattr(self.base_layer, name), doc=f"The base module's ``{name}``.")


# what transformers / torch code reads from an nn.MultiheadAttention besides its submodules
BASE_ATTRIBUTES = (
    "embed_dim kdim vdim num_heads head_dim dropout batch_first _qkv_same_embed_dim in_proj_weight in_proj_bias "
    "bias_k bias_v add_zero_attn"
).split()
for _name in BASE_ATTRIBUTES:
    setattr(LoraMultiheadAttention, _name, _answered_by_base(_name))
