"""MiCA as a variant (minor component adaptation, arXiv 2604.01694): plain LoRA whose B is frozen at its initial
value, the left singular vectors of the base weight's r smallest singular values (the "mica" initializer,
lorakit.ops.init.mica, which also sets A = 0); only A trains. Forward, merge and file are plain LoRA's.
"""

from __future__ import annotations

from torch import nn

from lorakit.adapters.variant_lora import Lora, LoraLayer


class Mica(Lora):
    """MiCA: B stays frozen (``frozen``: LoraModel leaves it out whenever it makes an adapter trainable)."""

    name = "mica"
    title = "MiCA"
    runs_on = "nn.Linear, GPT-2 Conv1D and nn.Embedding layers"
    plain = True  # the forward is plain LoRA's: the fast path applies

    def create(self, layer: LoraLayer, adapter: str) -> None:
        """Freeze B, as PEFT does when the adapter is made."""
        for p in self.frozen(layer, adapter):
            p.requires_grad_(False)

    def frozen(self, layer: LoraLayer, adapter: str) -> list[nn.Parameter]:
        """B: ``lora_B[adapter].weight`` (``lora_embedding_B[adapter]`` for an embedding)."""
        if hasattr(layer, "lora_embedding_B"):
            return [layer.lora_embedding_B[adapter]]
        return [layer.lora_B[adapter].weight]
