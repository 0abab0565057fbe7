"""Task-tensor merging: pure functions that merge n same-shaped tensors ("task tensors", one per adapter) into one.

Used by lorakit.adapters.combine on LoRA factors and on dense deltas. Each method is: optional sparsification of every
task tensor, then either a weighted sum (task arithmetic) or a sign election and a disjoint mean (TIES).

* TIES: Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", sec. 3 (trim, elect sign,
  disjoint merge).
* DARE: Yu et al. 2023, "Language Models are Super Mario", sec. 3 (drop each value with probability 1 - density,
  rescale the survivors by 1 / density). DARE is random: pass a seeded ``torch.Generator`` for reproducible results;
  without one the global torch RNG is used (as in HF PEFT, so ``torch.manual_seed`` also makes it reproducible).

Numerically these follow HF PEFT's ``utils/merge_utils.py``: the sign is elected on the unweighted (sparsified) task
tensors, and the weights are applied before the disjoint mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MAJORITY_SIGN_METHODS = ("total", "frequency")

Weights = Sequence[float] | Tensor


def check_density(density: float | None, needed_by: str = "pruning") -> float:
    """Return ``density`` if it is a fraction in (0, 1]; else raise ValueError (naming ``needed_by`` if None)."""
    if density is None:
        raise ValueError(f"{needed_by} needs density= (the fraction of values to keep, in (0, 1])")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1] (the fraction of values to keep); 1 keeps all")
    return density


def check_majority_sign_method(method: str) -> str:
    if method not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"majority_sign_method={method!r} is unknown; use one of: {', '.join(MAJORITY_SIGN_METHODS)}")
    return method


# -- sparsification (one task tensor) --------------------------------------------------------------------------------
def magnitude_prune_mask(tensor: Tensor, density: float) -> Tensor:
    """Boolean mask (shape of ``tensor``) of its k = int(density * numel) largest |values| (ties broken by topk)."""
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), k=k).indices] = True
    return mask.reshape(tensor.shape)


def prune(tensor: Tensor, density: float) -> Tensor:
    """``tensor`` with all but its top-k |values| set to 0 (k = int(density * numel)); density 1 returns it as is."""
    if check_density(density) == 1.0:
        return tensor
    return tensor * magnitude_prune_mask(tensor, density)


def random_prune(tensor: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each value independently with probability ``density`` and rescale the kept ones by 1 / density,
    so the expected value is ``tensor``. Density 1 returns it as is (no random numbers drawn)."""
    if check_density(density) == 1.0:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


# -- combining n task tensors ----------------------------------------------------------------------------------------
def _stack_weights(stacked: Tensor, weights: Weights) -> Tensor:
    """Weights as a (n, 1, ..., 1) tensor that broadcasts against ``stacked`` (n, ...); at least float32, as PEFT."""
    dtype = torch.promote_types(stacked.dtype, torch.float32)
    w = torch.as_tensor(weights, dtype=dtype, device=stacked.device)
    if w.shape != stacked.shape[:1]:
        raise ValueError(f"got {stacked.shape[0]} task tensors but weights of shape {tuple(w.shape)}; give one each")
    return w.reshape(w.shape + (1,) * (stacked.dim() - 1))


def elect_sign(tensors: Tensor, method: str = "total") -> Tensor:
    """The majority sign (+1 or -1, shape ``tensors.shape[1:]``) of stacked task tensors (n, ...).

    ``total``: the sign of the sum of the values; ``frequency``: the sign with more non-zero values. A tie gives +1.
    """
    check_majority_sign_method(method)
    score = tensors.sum(dim=0) if method == "total" else tensors.sign().sum(dim=0)
    return torch.where(score >= 0, 1.0, -1.0).to(tensors.dtype)


def disjoint_merge(tensors: Tensor, keep: Tensor) -> Tensor:
    """Mean over dim 0 of the values of ``tensors`` (n, ...) where ``keep`` (n, ..., bool) is set; 0 where none is."""
    kept = (tensors * keep).sum(dim=0)
    return kept / keep.sum(dim=0).clamp(min=1)


def task_arithmetic(tensors: list[Tensor], weights: Weights) -> Tensor:
    """sum_i w_i t_i."""
    stacked = torch.stack(tensors)  # (n, ...)
    return (stacked * _stack_weights(stacked, weights)).sum(dim=0)


def _ties_merge(pruned: list[Tensor], weights: Weights, majority_sign_method: str) -> Tensor:
    """Elect the sign on the unweighted sparse tensors, then average the weighted values that agree with it (zeros
    never agree, so each position is the mean over the tensors that kept a value of the elected sign there)."""
    stacked = torch.stack(pruned)  # (n, ...)
    agree = stacked.sign() == elect_sign(stacked, majority_sign_method)  # (n, ...)
    return disjoint_merge(stacked * _stack_weights(stacked, weights), agree)


def magnitude_prune(tensors: list[Tensor], weights: Weights, density: float) -> Tensor:
    """Task arithmetic of the magnitude-pruned task tensors: sum_i w_i prune(t_i)."""
    return task_arithmetic([prune(t, density) for t in tensors], weights)


def ties(tensors: list[Tensor], weights: Weights, density: float, majority_sign_method: str = "total") -> Tensor:
    """TIES: magnitude-prune each task tensor, elect the sign, disjoint mean of the weighted agreeing values."""
    return _ties_merge([prune(t, density) for t in tensors], weights, majority_sign_method)


def dare_linear(
    tensors: list[Tensor], weights: Weights, density: float, generator: torch.Generator | None = None
) -> Tensor:
    """DARE + task arithmetic: sum_i w_i random_prune(t_i). Random; E[result] = sum_i w_i t_i."""
    return task_arithmetic([random_prune(t, density, generator) for t in tensors], weights)


def dare_ties(
    tensors: list[Tensor],
    weights: Weights,
    density: float,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE + TIES: random_prune each task tensor, elect the sign, disjoint mean of the weighted agreeing values."""
    return _ties_merge([random_prune(t, density, generator) for t in tensors], weights, majority_sign_method)
