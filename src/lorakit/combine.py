"""add_weighted_adapter maths: combine several LoRA adapters of one layer into one (A, B).

Pure tensor functions; A is (r, in), B is (out, r), delta = B @ A in (out, in) orientation, as in lorakit.layers.
The new adapter's scaling is 1: the source scalings are folded into its weights.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from lorakit.config import LoraConfig

SAME_RANK = ("linear",)
COMBINATIONS = ("linear", "cat", "svd")


def plan(combination_type: str, configs: list[LoraConfig], svd_rank: int | None) -> tuple[str, int]:
    """Check the request and return (combination_type, rank of the new adapter), following PEFT's rules."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type={combination_type!r} is unknown; use one of: {', '.join(COMBINATIONS)}")
    if len(configs) == 1:
        combination_type = "linear"
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type in SAME_RANK:
        if len(set(ranks)) != 1:
            raise ValueError(
                f"combination_type={combination_type!r} needs adapters of equal rank, got ranks {ranks}; "
                "use 'cat' or 'svd' for different ranks"
            )
        return combination_type, ranks[0]
    if combination_type == "cat":
        return combination_type, sum(ranks)
    if svd_rank is not None and svd_rank <= 0:
        raise ValueError(f"svd_rank={svd_rank} must be a positive integer")
    return combination_type, svd_rank or max(ranks)


def combined_config(configs: list[LoraConfig], new_rank: int, layer_names: list[str]) -> LoraConfig:
    """The new adapter's config: the first source's settings with rank ``new_rank``, scaling 1, and the union of
    the sources' targets (a list of module names when the sources were not all lists or all regexes)."""
    specs = [c.target_modules for c in configs]
    if all(isinstance(s, list) for s in specs):
        targets: list[str] | str = sorted({t for s in specs for t in s})  # type: ignore[union-attr]
    elif all(isinstance(s, str) and s != "all-linear" for s in specs):
        targets = "|".join(f"({s})" for s in specs)
    else:
        targets = list(layer_names)
    alpha = math.sqrt(new_rank) if configs[0].use_rslora else new_rank  # scaling alpha/sqrt(r) or alpha/r == 1
    return dataclasses.replace(
        configs[0],
        r=new_rank,
        lora_alpha=alpha,
        target_modules=targets,
        rank_pattern={},
        alpha_pattern={},
        layers_to_transform=None,
        layers_pattern=None,
    )


def linear(As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> tuple[Tensor, Tensor]:
    """sum_i sign_i*sqrt|w_i| A_i and sum_i sqrt|w_i| B_i (weights already times each adapter's scaling).
    Not the weighted sum of deltas (cross terms B_i A_j appear), exactly as PEFT's 'linear'."""
    wa = [math.copysign(math.sqrt(abs(w)), w) for w in weights]
    wb = [math.sqrt(abs(w)) for w in weights]
    A = sum(w * a for w, a in zip(wa, As))
    B = sum(w * b for w, b in zip(wb, Bs))
    return A, B  # type: ignore[return-value]


def cat(As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> tuple[Tensor, Tensor]:
    """Stack the adapters: A = [w_1 A_1; w_2 A_2; ...] (sum r, in), B = [B_1 B_2 ...] (out, sum r), so
    B @ A = sum_i w_i B_i @ A_i exactly."""
    return torch.cat([w * a for w, a in zip(weights, As)], dim=0), torch.cat(Bs, dim=1)


def svd(
    deltas: list[Tensor],
    weights: list[float],
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factorization of sum_i w_i delta_i (out, in): B = U S (out, rank), A = Vh (rank, in).
    ``clamp`` (a quantile in [0, 1]) clips both factors to the quantile of their absolute values, as PEFT does."""
    delta = sum(w * d for w, d in zip(weights, deltas))
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)  # type: ignore[arg-type]
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B


def combine_layer(
    module: object,
    present: list[tuple[str, float]],
    combination_type: str,
    rank: int,
    svd_clamp: float | None,
    full_matrices: bool = True,
    driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> tuple[Tensor, Tensor]:
    """Combine the adapters ``present`` ((name, weight) pairs) of one LoRA layer into (A, B) for a scaling of 1."""
    names = [n for n, _ in present]
    with torch.no_grad():
        if combination_type == "svd":
            # deltas in (out, in) orientation; s * B @ A of each adapter
            deltas = [(module.lora_weights(n)[1] @ module.lora_weights(n)[0]) * module.scaling[n] for n in names]
            return svd([d.float() for d in deltas], [w for _, w in present], rank, svd_clamp, full_matrices, driver)
        As = [module.lora_weights(n)[0].detach() for n in names]
        Bs = [module.lora_weights(n)[1].detach() for n in names]
        scaled = [w * module.scaling[n] for n, w in present]
        return (cat if combination_type == "cat" else linear)(As, Bs, scaled)
