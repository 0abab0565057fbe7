"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024): pure tensor functions.

DoRA splits the adapted weight into a direction and a learned magnitude m (out,), one entry per output row::

    W' = m * (W + s * B @ A) / ||W + s * B @ A||_row          # (out, in); norm over `in`, one per output row

At the start m = ||W + s * B @ A||_row, so W' = W + s * B @ A (an identity with the default zero B). The norm is
treated as a constant in the backward pass (paper sec. 4.3), so the forward detaches it. Everything here works in
(out, in) orientation; for an embedding, "out" is the embedding dimension and "in" the vocabulary, as in
lorakit.adapters.embedding.LoraEmbedding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def weight_norm(weight: Tensor, delta: Tensor) -> Tensor:
    """||W + delta||_row: the L2 norm of each output row of W + delta (both (out, in)) -> (out,)."""
    return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype)


def linear_output(base: Tensor, lora: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """What DoRA adds to a linear layer's output: ``(m / n - 1) * x @ W.T + (m / n) * s * B(A(x))``.

    ``base`` is x @ W.T without bias (..., out), ``lora`` is s * B(A(x)) (..., out), ``magnitude`` and ``norm``
    (out,). With the base output (bias included) the total is ``b + (m / n) * (x @ W.T + s * B(A(x)))``, i.e.
    x @ W'.T + b."""
    scale = magnitude / norm  # (out,)
    return (scale - 1) * base + scale * lora


def embedding_output(base: Tensor, lora: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """A DoRA embedding's output: ``(m / n) * (E[x] + s * A.T[x] @ B.T)``; ``base`` is E[x] (..., dim), ``lora`` the
    LoRA term (..., dim), ``magnitude`` and ``norm`` (dim,). This replaces the base output (an embedding has no
    bias), unlike ``linear_output`` which is added to it."""
    return (magnitude / norm) * (base + lora)


def merge_weight(weight: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """W' = (m / n) * (W + delta), all in (out, in); ``norm`` = weight_norm of the *unmerged* W and delta."""
    return (magnitude / norm).unsqueeze(1) * (weight + delta)


def unmerge_weight(merged: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """The inverse of ``merge_weight`` with the same ``norm``: W = W' / (m / n) - delta."""
    return merged / (magnitude / norm).unsqueeze(1) - delta
