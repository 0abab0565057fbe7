"""LoRA around ``nn.Embedding`` (weight (num_embeddings, dim)): A (r, num_embeddings) is looked up by token id, then
projected by B (dim, r); no dropout on token ids, as in PEFT.

    y = E[x] + sum over the active adapters of s * A.T[x] @ B.T                      # (B, T) -> (B, T, dim)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.adapters import mixed_batch
from lorakit.adapters.layer import LoraLayer
from lorakit.config import ConfigError


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``; ``lora_embedding_A`` / ``lora_embedding_B`` are PEFT's names."""

    fan_in_fan_out = True  # weight is (in=num_embeddings, out=dim)
    module_type = "lora.Embedding"
    embedding = True
    supports_lora_bias = False  # B is a bare Parameter, as in PEFT, which refuses lora_bias here too
    variants_supported = ("lora", "dora", "mica")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer, base_layer.num_embeddings, base_layer.embedding_dim)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    # what code reads from an nn.Embedding besides weight (lorakit.adapters.layer): e.g. transformers' resizing,
    # lorakit.data.pack (the vocabulary size)
    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def _create(self, name: str, r: int) -> None:
        """A (r, vocab) and B (dim, r) drawn from N(0, 1) before the initializer sets them, as PEFT creates them: the
        global RNG then moves as in PEFT, so a seed gives PEFT's factors (B of the default init is the next draw)."""
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r))

    def lora_weights(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _create_lora_bias(self, name: str) -> None:
        raise ConfigError(  # PEFT refuses it too (its wording, which its tests match)
            "lora_bias=True is not supported for Embedding layers: leave the embedding out of target_modules, or "
            "pass lora_bias=False"
        )

    def _drop(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name]

    def lookup(self, ids: Tensor, A: Tensor) -> Tensor:
        """A.T[ids] with the base embedding's options (padding_idx, max_norm, ...): (...,) -> (..., r)."""
        base = self.base_layer
        return nn.functional.embedding(
            ids, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        if self.routing is not None:  # a mixed-adapter batch: one adapter per row
            return mixed_batch.embedding_forward(self, x, *args, **kwargs)
        result = embedded = self.base_layer(x, *args, **kwargs)  # (B, T, dim)
        if self._disabled or self.merged_adapters:
            return result
        for name in self._active:
            if name not in self.r:
                continue
            A, B = self.lora_weights(name)
            lora = (self.lookup(x, A) @ B.T) * self.scaling[name]  # (B, T, r) -> (B, T, dim)
            result = result + self.variants[name].embedding_output(self, name, embedded, lora).to(result.dtype)
        return result
