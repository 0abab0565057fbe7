"""16-bit storage of the input embedding and the output layer of a quantized base (``quantize(..., embeddings=)``).

QLoRA quantizes the linear layers of the transformer blocks; the token embedding and the output layer stay in 16 bits
(bitsandbytes and Unsloth load them in bf16 / fp16). On a small model they dominate what is left: SmolLM2-135M's tied
embedding (49152 x 576) is 108 MiB in fp32, against 52 MiB for everything else once the linear layers are NF4.

Here the weight is stored in bf16 (or fp16) and the model keeps computing in its own dtype (fp32):

    HalfEmbedding  E16 (vocab, dim):  forward(ids) = E16[ids].to(fp32)                       # (B, T) -> (B, T, dim)
    HalfLinear     W16 (out, in):     forward(x)   = x @ W16.to(x.dtype).T (+ bias)          # (..., in) -> (..., out)

The output layer casts its weight a few rows at a time (``lorakit.quant.linear.chunked_linear``), in the forward and
again in the backward, so no fp32 copy of a 49152-row weight stays alive between them. A tied output layer holds the
very same bf16 Parameter as the embedding: one storage, one tie, as in transformers. lorakit's fused causal-LM loss
(``lorakit.fast.causal_lm_loss``, the trainer's ``lm_loss_sum``) takes a frozen HalfLinear head as it takes an
``nn.Linear``: it computes this forward's matmuls (in the input's dtype, or autocast's; the bias added after) chunk
by chunk with the cross-entropy, never holding the (B, T, vocab) logits nor an fp32 copy of the weight.

Rounding to bf16 changes each value by at most 2^-8 of itself (8 significant bits), fp16 by 2^-11 (11 bits, for
magnitudes from 6e-5 to 65504 only). transformers' ``model.dtype`` (the dtype of the first floating parameter, the
embedding) then reads bf16 although the model computes in fp32.

    lorakit.quantize(model, embeddings="bf16")                 # puts them in (lorakit.adapters.quantize)
    model.lm_head.weight is model.model.embed_tokens.weight   # True for a tied model: one bf16 Parameter
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lorakit.quant.linear import QuantLinear, chunked_linear, frozen_linear, row_chunks

EMBEDDING_STORAGE: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "keep": None}


def check_embeddings(embeddings: str) -> torch.dtype | None:
    """The dtype that ``embeddings`` names (None for "keep"); ValueError naming the choices otherwise."""
    if embeddings not in EMBEDDING_STORAGE:
        raise ValueError(
            f"embeddings={embeddings!r} is not a storage for the embeddings; use one of {sorted(EMBEDDING_STORAGE)}"
        )
    return EMBEDDING_STORAGE[embeddings]


class HalfEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose weight (num_embeddings, dim) is stored in 16 bits; its output is cast to
    ``compute_dtype`` (the dtype the embedding had, usually fp32), so the model downstream computes as before."""

    def __init__(self, embedding: nn.Embedding, weight: nn.Parameter, compute_dtype: torch.dtype) -> None:
        e = embedding
        super().__init__(
            e.num_embeddings, e.embedding_dim, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse,
            _weight=weight,
        )  # fmt: skip
        self.weight = weight  # the Parameter itself (nn.Embedding wraps _weight in a new one): a tie stays a tie
        self.compute_dtype = compute_dtype
        self.train(embedding.training)

    def forward(self, input: Tensor) -> Tensor:  # (B, T) token ids -> (B, T, dim) in compute_dtype
        return super().forward(input).to(self.compute_dtype)

    def full_precision(self, weight: Tensor | None = None) -> nn.Embedding:
        """A plain ``nn.Embedding`` in ``compute_dtype`` holding ``weight`` (num_embeddings, dim; default: this
        weight), frozen."""
        weight = self.weight if weight is None else weight
        module = nn.Embedding(
            self.num_embeddings, self.embedding_dim, self.padding_idx, self.max_norm, self.norm_type,
            self.scale_grad_by_freq, self.sparse, _weight=weight.detach().to(self.compute_dtype), _freeze=True,
        )  # fmt: skip
        return module.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stored {self.weight.dtype}, computes {self.compute_dtype}"


class HalfLinear(nn.Linear):
    """An ``nn.Linear`` (an output layer) whose weight (out, in) is stored in 16 bits and computes in the input's
    dtype: ``forward(x) = x @ W.to(x.dtype).T + bias``. A frozen weight is cast in row chunks (``chunked_linear``); a
    weight that requires grad is cast whole, so that it gets its gradient."""

    chunk_elements: int = QuantLinear.chunk_elements  # weights cast at once

    def __init__(self, linear: nn.Linear, weight: nn.Parameter, compute_dtype: torch.dtype) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = weight  # shared with a tied embedding
        if linear.bias is not None:
            self.bias = linear.bias
        self.compute_dtype = compute_dtype
        self.train(linear.training)

    def weight_chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
        """(start, stop, rows start:stop of the weight in compute_dtype, then in ``dtype``, the matmul's)."""
        for start, stop in row_chunks(self.out_features, self.in_features, self.chunk_elements):
            yield start, stop, self.weight[start:stop].to(self.compute_dtype).to(dtype)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if self.weight.requires_grad:
            y = nn.functional.linear(x, self.weight.to(x.dtype))
        else:
            y = chunked_linear(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def full_precision(self, weight: Tensor | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` in ``compute_dtype`` holding ``weight`` (out, in; default: this weight) and this
        bias, the weight frozen."""
        weight = self.weight if weight is None else weight
        return frozen_linear(weight.detach().to(self.compute_dtype), self.bias, self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stored {self.weight.dtype}, computes {self.compute_dtype}"


# Layers stored below full precision (NF4 / int8 codes, 16-bit embeddings): a LoRA layer around one is merged into a
# full-precision copy (lorakit.adapters.inject.merged_linear), never in place.
REDUCED_PRECISION = (QuantLinear, HalfEmbedding, HalfLinear)
