"""VeLoRA as a variant (Miles et al. 2024; the maths: lorakit.ops.velora): plain LoRA's forward, merge and file, with
A's backward pass computed from inputs compressed to G coefficients per token (less activation memory).

Per adapter the layer holds the projection vector v (D,) as a persistent buffer, PEFT's
``<layer>.lora_velora_embed.<adapter>`` (file key ``<layer>.lora_velora_embed``). In training mode, with gradients
enabled, each forward first updates v as ``init_type`` says (a state change of the forward, as in PEFT):
"batch_average" to the normalized mean sub-token of this batch's dropped-out input, "batch_average_once" the same on
the first such forward only (also the first after loading), "random" never (drawn once at creation). Outside
training the forward is plain LoRA's and v is unused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.adapters.variant_lora import Lora, LoraLayer
from lorakit.config import VeloraConfig
from lorakit.ops import velora


class Buffers(nn.Module):
    """Tensors by adapter name, registered as persistent buffers (state-dict keys ``<name>.<adapter>``)."""

    def __getitem__(self, key: str) -> Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: Tensor) -> None:
        self.register_buffer(key, value, persistent=True)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def keys(self) -> list[str]:
        return list(self._buffers)


class Velora(Lora):
    """VeLoRA: v (D,) per adapter in ``layer.lora_velora_embed``; nothing trainable beyond A and B."""

    name = "velora"
    title = "VeLoRA"
    runs_on = "nn.Linear and GPT-2 Conv1D layers"
    plain = False  # its training forward is not the fused plain one (the layers' fast path stays off)

    def __init__(self, options: VeloraConfig) -> None:
        self.num_groups, self.scale, self.init_type = options.num_groups, options.scale, options.init_type
        self.initialized = False  # whether v holds a batch's average yet ("random": from the start)

    def create(self, layer: LoraLayer, adapter: str) -> None:
        """v: a random unit vector ("random"), else zeros until the first training batch."""
        A = layer.lora_A[adapter].weight
        base = layer.base_layer
        dtype = A.dtype if layer.quantized else base.weight.dtype  # PEFT keeps v in the base weight's dtype
        d = velora.group_dim(layer.in_features, self.num_groups)
        if self.init_type == "random":
            v = velora.normalized(torch.randn(d, device=A.device, dtype=dtype))
            self.initialized = True
        else:
            v = torch.zeros(d, device=A.device)
        if not hasattr(layer, "lora_velora_embed"):
            layer.lora_velora_embed = Buffers()
        layer.lora_velora_embed[adapter] = v.to(dtype)

    def delete(self, layer: LoraLayer, adapter: str) -> None:
        del layer.lora_velora_embed[adapter]

    def update_projection(self, layer: LoraLayer, adapter: str, h: Tensor) -> None:
        """v from the batch's input ``h`` (..., in) as ``init_type`` says (see the module docstring)."""
        if self.init_type == "random" or (self.init_type == "batch_average_once" and self.initialized):
            return
        v = layer.lora_velora_embed[adapter]
        with torch.no_grad():
            layer.lora_velora_embed[adapter] = velora.batch_projection(h.detach(), self.num_groups).to(v)
        self.initialized = True

    def linear_forward(self, layer: LoraLayer, adapter: str, x: Tensor, base: Tensor, result: Tensor) -> Tensor:
        """``result + B(A(dropout(x))) * s``; in training, A's product by ops.velora.linear (VeLoRA's backward)."""
        A, B = layer.lora_A[adapter], layer.lora_B[adapter]
        h = layer.lora_dropout[adapter](x.to(A.weight.dtype))  # (..., in)
        if layer.training and torch.is_grad_enabled():
            self.update_projection(layer, adapter, h)
            v = layer.lora_velora_embed[adapter]
            after_A = velora.linear(h, A.weight, v, self.num_groups, self.scale)  # (..., r)
        else:
            after_A = A(h)  # (..., r)
        return result + (B(after_A) * layer.scaling[adapter]).to(result.dtype)  # B's bias too, with lora_bias
