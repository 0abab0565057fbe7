"""KaSA as a variant (Wang et al. 2024, arXiv 2412.06071; the maths: lorakit.ops.kasa): the update is
``s * B @ diag(d) @ A`` with learned singular values d (r,), and adding the adapter truncates the base weight to its
k - r largest singular components (k = min(out, in)), once, as PEFT does.

Per adapter the layer holds d as ``layer.lora_diag[adapter]`` (PEFT's ParameterDict; file key ``<layer>.lora_diag``),
drawn from N(0, 1): B starts at 0, so the adapter still starts as the identity of the truncated layer. The truncation
is a state change of ``create``, said here: disabling, unmerging or unloading the adapter leaves the base truncated, so
KaSA adapters are not combined with adapters without KaSA (LoraModel.add_adapter refuses). Loading a KaSA adapter onto
the original base truncates it the same way (the SVD is deterministic). The auxiliary losses are
``LoraModel._get_kasa_loss`` (PEFT's name), for the caller to add to the task loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.adapters.variant_lora import Lora, LoraLayer
from lorakit.config import ConfigError
from lorakit.ops import kasa


class Kasa(Lora):
    """KaSA: d (r,) in ``layer.lora_diag[adapter]``, trainable beside A and B."""

    name = "kasa"
    title = "KaSA"
    runs_on = "nn.Linear layers"
    plain = False  # its update has d between B and A: the layers' fused plain path stays off

    def check(self, module: nn.Module, r: int) -> None:
        """r < min(out, in) for an nn.Linear target (ops.kasa.check_rank), before any base weight is truncated."""
        base = getattr(module, "base_layer", module)
        if isinstance(base, nn.Linear):
            kasa.check_rank(r, base.in_features, base.out_features)

    def create(self, layer: LoraLayer, adapter: str) -> None:
        """Make d ~ N(0, 1) (r,) and replace the base weight by its truncation (ops.kasa.truncate). Errors come before
        the base weight changes."""
        if layer.fan_in_fan_out:
            raise ConfigError(  # PEFT's wording (its tests match it)
                "KaSA does not support `fan_in_fan_out=True` layers (e.g. Conv1D). Please target nn.Linear layers: "
                f"leave this {type(layer.base_layer).__name__} out of target_modules"
            )
        if layer.quantized:
            raise ConfigError(
                "KaSA truncates the base weight, which a quantized base (QuantLinear) cannot hold exactly: adapt a "
                "full-precision model, or use plain LoRA on a quantized one"
            )
        r = layer.r[adapter]
        kept, _ = kasa.truncate(layer.weight_out_in(), r)  # (out, in); ValueError for r >= min(out, in)
        A = layer.lora_A[adapter].weight
        if not hasattr(layer, "lora_diag"):
            layer.lora_diag = nn.ParameterDict()
        layer.lora_diag[adapter] = nn.Parameter(torch.randn(r, device=A.device, dtype=A.dtype))
        with torch.no_grad():
            layer._set_base_weight(kept)

    def parameters(self, layer: LoraLayer, adapter: str) -> list[nn.Parameter]:
        return [layer.lora_diag[adapter]]

    def delete(self, layer: LoraLayer, adapter: str) -> None:
        del layer.lora_diag[adapter]

    def factors(self, layer: LoraLayer, adapter: str) -> tuple[Tensor, Tensor]:
        """A (r, in) and B @ diag(d) (out, r): their s * product is KaSA's update (merge, mixed batches)."""
        A, B = layer.lora_weights(adapter)
        return A, B * layer.lora_diag[adapter].to(B.dtype)

    def linear_forward(self, layer: LoraLayer, adapter: str, x: Tensor, base: Tensor, result: Tensor) -> Tensor:
        """``result + B(A(dropout(x)) * d) * s`` (B's bias too, with lora_bias)."""
        A, B = layer.lora_A[adapter], layer.lora_B[adapter]
        h = layer.lora_dropout[adapter](x.to(A.weight.dtype))  # (..., in)
        after_A = A(h) * layer.lora_diag[adapter]  # (..., r)
        return result + (B(after_A) * layer.scaling[adapter]).to(result.dtype)

    def regularization(self, layer: LoraLayer, adapter: str, beta: float, gamma: float) -> Tensor:
        """beta * sum(d ** 2) + gamma * (||B.T B - I||_F + ||A A.T - I||_F) of this layer (ops.kasa.regularization)."""
        A, B = layer.lora_weights(adapter)
        return kasa.regularization(A, B, layer.lora_diag[adapter], beta, gamma)
