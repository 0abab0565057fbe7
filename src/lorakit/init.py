"""Adapter initializers: pure functions from a base weight to the starting (A, B).

Every initializer takes the base weight ``W`` (out, in) and the rank ``r`` and returns ``LoraInit(A (r, in),
B (out, r), residual)``, where ``residual`` is the new base weight for initializers that move part of W into the
adapter (None: keep W). They are chosen by name from ``INITIALIZERS``; ``True`` in a config means ``"kaiming"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class LoraInit(NamedTuple):
    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    residual: Tensor | None  # new base weight (out, in), or None to keep the base weight


def kaiming(weight: Tensor, r: int) -> LoraInit:
    """A ~ Kaiming-uniform (as nn.Linear's default, a=sqrt(5)), B = 0: the adapter starts as the identity
    (Hu et al. 2021, sec. 4.1)."""
    out_f, in_f = weight.shape
    A = torch.empty(r, in_f, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return LoraInit(A, torch.zeros(out_f, r), None)


def gaussian(weight: Tensor, r: int) -> LoraInit:
    """A ~ N(0, 1/r^2), B = 0 (PEFT's 'gaussian')."""
    out_f, in_f = weight.shape
    return LoraInit(torch.randn(r, in_f) / r, torch.zeros(out_f, r), None)


def random_nonzero(weight: Tensor, r: int) -> LoraInit:
    """Both A and B random (nn.Linear's default init): NOT an identity at start; PEFT's ``init_lora_weights=False``,
    useful for tests of merge and save/load."""
    out_f, in_f = weight.shape
    A, B = torch.empty(r, in_f), torch.empty(out_f, r)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    return LoraInit(A, B, None)


def embedding_default(weight: Tensor, r: int) -> LoraInit:
    """For Embedding targets (weight (num_embeddings, dim) seen as (out=dim, in=num_embeddings)): A = 0, B ~ N(0, 1),
    as PEFT does for every truthy init_lora_weights."""
    out_f, in_f = weight.shape
    return LoraInit(torch.zeros(r, in_f), torch.randn(out_f, r), None)


Initializer = Callable[[Tensor, int], LoraInit]

INITIALIZERS: dict[str, Initializer] = {
    "kaiming": kaiming,
    "gaussian": gaussian,
}


def get_initializer(init_lora_weights: bool | str, embedding: bool = False) -> Initializer:
    """The initializer named by a config's ``init_lora_weights`` (True -> kaiming, False -> random_nonzero)."""
    if init_lora_weights is False:
        return random_nonzero
    if embedding:
        return embedding_default
    if init_lora_weights is True:
        return kaiming
    return INITIALIZERS[init_lora_weights]
