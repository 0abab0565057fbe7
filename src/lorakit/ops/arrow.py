"""Arrow routing (Ostapenko et al. 2024, arXiv 2405.11157, sec. 4) and GenKnowSub (Belofsky et al., ACL 2025 short
54): pure tensor functions.

E trained LoRA experts (A_e (r, in), B_e (out, r), scaling s_e) are mixed per token, without training a router:

    v_e     = top right-singular vector of B_e @ A_e                     # (in,): the expert's prototype (sign-free)
    score_e = |x . v_e|                                                  # per token x (in,)
    c       = softmax over the top_k scores / temperature (0 elsewhere)  # (E,)
    update  = sum_e c_e * s_e * B_e @ A_e @ x                           # (out,)

GenKnowSub ("forgetting via negation", Ilharco et al. 2023) first subtracts the mean of G general adapters from each
expert's factors, A_e - mean_g A_g and B_e - mean_g B_g (the factors, not their product, as PEFT does).

The prototype comes from a fixed number of power iterations on A.T @ (B.T @ B) @ A, started from a random vector: the
same start vector (``seed``, drawn as PEFT draws it) gives PEFT's prototypes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

POWER_ITERATIONS = 15  # PEFT's count; the prototype is v after these, converged or not
EPS = 1e-8  # added to the norms the iteration divides by


def top_right_singular_vector(A: Tensor, B: Tensor, seed: int | None = None, iters: int = POWER_ITERATIONS) -> Tensor:
    """The top right-singular vector (in,) of B @ A, float32, by power iteration on v -> A.T (B.T B) (A v), so that
    neither B @ A (out, in) nor its Gram matrix (in, in) is formed. The start vector is N(0, 1) (in,) drawn on A's
    device from a generator seeded with ``seed`` (torch's global generator if None), as PEFT draws it. Unique up to
    sign; ``iters`` fixed, no convergence test (a close top-two singular value pair converges slowly)."""
    A32, B32 = A.float(), B.float()  # (r, in), (out, r)
    gram = B32.T @ B32  # (r, r)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=A32.device)
        generator.manual_seed(int(seed))
    v = torch.randn(A32.shape[1], dtype=torch.float32, device=A32.device, generator=generator)  # (in,)
    v = v / (v.norm() + EPS)
    for _ in range(iters):
        w = A32.T @ (gram @ (A32 @ v))  # (in,): (B @ A).T @ (B @ A) @ v
        v = w / (w.norm() + EPS)
    return v


def routing_weights(tokens: Tensor, prototypes: Tensor, top_k: int, temperature: float) -> Tensor:
    """(t, E) mixing coefficients of ``tokens`` (t, in) over E experts with ``prototypes`` (E, in): per token the
    scores |x . v_e|, the ``top_k`` largest kept, softmax(score / temperature) over those, 0 for the others.
    ValueError if top_k > E."""
    experts = prototypes.shape[0]
    if top_k > experts:
        raise ValueError(
            f"Arrow's top_k={top_k} is more than the {experts} task adapters it routes over: set "
            f"ArrowConfig(top_k=...) to at most {experts}, or load more task adapters"
        )
    scores = (tokens @ prototypes.T).abs()  # (t, E): sign-free, as a singular vector has no sign
    top, chosen = scores.topk(top_k, dim=1)  # (t, k)
    kept = torch.full_like(scores, float("-inf")).scatter(1, chosen, top)  # (t, E): -inf outside the top k
    return torch.softmax(kept / temperature, dim=1)


def mixed_update(tokens: Tensor, A: Tensor, B: Tensor, scales: Tensor, weights: Tensor) -> Tensor:
    """sum_e weights[:, e] * scales[e] * tokens @ (B_e @ A_e).T: (t, out), from ``tokens`` (t, in), ``A`` (E, r, in),
    ``B`` (E, out, r), ``scales`` (E,) and ``weights`` (t, E). The rank-r projections are weighted before B, so no
    (t, E, out) tensor is made."""
    low = torch.einsum("ti,eri->ter", tokens, A)  # (t, E, r): A_e x
    low = low * (weights * scales).unsqueeze(-1)  # (t, E, r): c_e * s_e * A_e x
    return torch.einsum("ter,eor->to", low, B)  # (t, out)


def general_mean(general: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(mean A (r, in), mean B (out, r)) of the general adapters' factors ``general`` [(A_g, B_g), ...]: what
    GenKnowSub subtracts from each expert. ValueError for an empty list."""
    if not general:
        raise ValueError("GenKnowSub needs at least one general adapter: pass general_adapter_paths")
    mean_A = torch.stack([A for A, _ in general]).mean(0)
    mean_B = torch.stack([B for _, B in general]).mean(0)
    return mean_A, mean_B


def subtract_general(A: Tensor, B: Tensor, mean: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """GenKnowSub of one expert: (A - mean A_g, B - mean B_g), ``mean`` being ``general_mean`` of the general
    adapters (made once for all experts), in A's and B's dtypes."""
    mean_A, mean_B = mean
    return A - mean_A.to(A.dtype), B - mean_B.to(B.dtype)
