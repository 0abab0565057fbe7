"""Adapter initializers: pure functions from a base weight to the starting (A, B).

Every initializer takes the base weight ``W`` (out, in), the rank ``r`` and the adapter's scaling ``s`` (alpha / r,
or alpha / sqrt(r) with rsLoRA) and returns ``LoraInit(A (r, in), B (out, r), residual)``, where ``residual`` is the
new base weight for initializers that move part of W into the adapter (None: keep W); then ``residual + s * B @ A``
equals W, so the model's output is unchanged at step 0. They are chosen by name from ``INITIALIZERS`` (plus the
pattern ``"pissa_niter_<K>"``, see ``get_initializer``); ``True`` in a config means ``"kaiming"``. Maths in fp32,
residual cast back to the weight's dtype.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lorakit.ops.corda import CordaEigens, factors
from lorakit.ops.lora_ga import NITER, lora_ga_init
from lorakit.quant.formats import BITS, dequantize, quantize_weight


class LoraInit(NamedTuple):
    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    residual: Tensor | None  # new base weight (out, in), or None to keep the base weight


def kaiming(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """A ~ Kaiming-uniform (as nn.Linear's default, a=sqrt(5)), B = 0: the adapter starts as the identity
    (Hu et al. 2021, sec. 4.1)."""
    out_f, in_f = weight.shape
    A = torch.empty(r, in_f, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return LoraInit(A, torch.zeros(out_f, r), None)


def gaussian(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """A ~ N(0, 1/r^2), B = 0 (PEFT's 'gaussian')."""
    out_f, in_f = weight.shape
    return LoraInit(torch.randn(r, in_f) / r, torch.zeros(out_f, r), None)


def random_nonzero(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """Both A and B random (nn.Linear's default init): NOT an identity at start; PEFT's ``init_lora_weights=False``,
    useful for tests of merge and save/load."""
    out_f, in_f = weight.shape
    A, B = torch.empty(r, in_f), torch.empty(out_f, r)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    return LoraInit(A, B, None)


def embedding_default(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """For Embedding targets (weight (num_embeddings, dim) seen as (out=dim, in=num_embeddings)): A = 0, B ~ N(0, 1),
    as PEFT does for every truthy init_lora_weights."""
    out_f, in_f = weight.shape
    return LoraInit(torch.zeros(r, in_f), torch.randn(out_f, r), None)


def embedding_random(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """For Embedding targets with init_lora_weights=False: A, B ~ N(0, 1), both random (PEFT's: it keeps the normal
    draws it created them with): NOT an identity at start."""
    out_f, in_f = weight.shape
    return LoraInit(torch.randn(r, in_f), torch.randn(out_f, r), None)


def pissa(weight: Tensor, r: int, scaling: float, niter: int | None = None) -> LoraInit:
    """PiSSA (Meng et al. 2024, arXiv:2404.02948): the adapter takes W's principal part. With W ~ U_r diag(S_r)
    V_r^T (top-r singular triplets), A = diag(sqrt(S_r / s)) V_r^T and B = U_r diag(sqrt(S_r / s)), so that s * B @ A
    is the best rank-r approximation of W, and the residual is W - s * B @ A. ``niter``: use the randomized
    ``torch.svd_lowrank(niter=niter)`` (faster, approximate, draws from the global RNG) instead of the exact SVD."""
    W = _fp32(weight, r, "pissa")  # (out, in)
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)  # U (out, r), S (r,), V (in, r)
        Vh = V.T
    root = torch.sqrt(S / scaling)  # (r,)
    A = root[:, None] * Vh  # (r, in)
    B = U * root[None, :]  # (out, r)
    return LoraInit(A, B, (W - scaling * (B @ A)).to(weight.dtype))


def olora(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """OLoRA (Büyükakyüz 2024, "Orthonormal Low-Rank Adaptation of Large Language Models"): from the thin QR
    decomposition W = Q R, B = Q[:, :r] (orthonormal columns) and A = R[:r]; the residual is W - s * B @ A."""
    W = _fp32(weight, r, "olora")  # (out, in)
    Q, R = torch.linalg.qr(W)  # Q (out, k), R (k, in)
    B, A = Q[:, :r].contiguous(), R[:r].contiguous()  # (out, r), (r, in)
    return LoraInit(A, B, (W - scaling * (B @ A)).to(weight.dtype))


def orthogonal(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """PEFT's 'orthogonal' (after Datta 2024, "Rethinking LoRA initialisation"): both A and B are random and non-zero,
    yet B @ A = 0. Q is a random (r, r) orthogonal matrix; the columns of A (r, in) lie in the span of Q's even rows
    and the rows of B (out, r) in the span of its odd rows, which are orthogonal to them. Needs an even r. Draws from
    the global RNG in PEFT's order ((r, r), (in, r/2), (r/2, out)), so the same seed gives PEFT's values."""
    if r % 2:
        raise ValueError(  # PEFT's words first
            f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead; use an even r, e.g. {r + 1}"
        )
    out_f, in_f = weight.shape
    Q, _ = torch.linalg.qr(torch.randn(r, r))  # (r, r), orthonormal rows
    A = (torch.randn(in_f, r // 2) @ Q[0::2]).T / 10.0  # (in, r/2) @ (r/2, r) -> (r, in)
    B = torch.randn(r // 2, out_f).T @ Q[1::2] / 10.0  # (out, r/2) @ (r/2, r) -> (out, r)
    return LoraInit(A.contiguous(), B.contiguous(), None)


def mica(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """MiCA, minor component adaptation (arXiv 2604.01694): with the thin SVD W = U diag(S) V^T (S descending),
    B = U[:, -r:] (the left singular vectors of the r smallest singular values, orthonormal columns) and A = 0, so the
    adapter starts as the identity and the base is unchanged. Only A trains: the "mica" variant freezes B
    (lorakit.adapters.variant_mica). For an embedding, W is its (dim, vocab) matrix, as PEFT takes it."""
    if r > min(weight.shape):  # PEFT's words first (its tests match them)
        raise ValueError(
            f"MiCA requires `r` <= min(in_features, out_features) but got r={r} for a layer with weight shape "
            f"{tuple(weight.shape)} (max usable r is {min(weight.shape)}); lower r (or set rank_pattern for it)"
        )
    U, _, _ = torch.linalg.svd(_fp32(weight, r, "mica"), full_matrices=False)  # U (out, k)
    return LoraInit(weight.new_zeros(r, weight.shape[1], dtype=torch.float32), U[:, -r:].contiguous(), None)


def corda(weight: Tensor, r: int, scaling: float, eigens: CordaEigens | None = None) -> LoraInit:
    """The ``init_lora_weights="corda"`` initializer: (A, B, residual) from the layer's cropped ``eigens`` (set
    on its base module by lorakit.preprocess_corda, taken off it when the adapter is made)."""
    if eigens is None:
        raise ValueError(
            "init_lora_weights='corda' needs the layer's decomposition: run lorakit.preprocess_corda(model, config, "
            "run_model=...) on the base model with this config before get_peft_model (and before loading a CorDA "
            "adapter saved without path_initial_model_for_weight_conversion)"
        )
    if not weight.is_floating_point():
        raise TypeError(
            f"init_lora_weights='corda' needs a floating-point base weight, not {weight.dtype}; initialize on the "
            "fp32/fp16/bf16 model, then quantize the residual base"
        )
    out_f, in_f = weight.shape
    expected = ((r,), (out_f, r), (in_f, r))
    if tuple(tuple(t.shape) for t in eigens) != expected:
        raise ValueError(
            f"CorDA decomposition of shapes S {tuple(eigens.S_WC.shape)}, U {tuple(eigens.U_WC.shape)}, V "
            f"{tuple(eigens.V_WC.shape)} does not fit a ({out_f}, {in_f}) layer of rank {r} (needs {expected}); run "
            "preprocess_corda with the same model and config (r, rank_pattern) as get_peft_model, and rebuild a "
            "cache_file made for another rank"
        )
    if not all(torch.isfinite(t).all() for t in eigens):
        raise ValueError("CorDA decomposition holds inf / NaN; rebuild it (delete cache_file) from finite inputs")
    A, B = factors(eigens, scaling)
    A, B = A.to(weight.device), B.to(weight.device)
    residual = weight.detach().float() - scaling * (B @ A)  # (out, in)
    return LoraInit(A, B, residual.to(weight.dtype))


def lora_ga(
    weight: Tensor,
    r: int,
    scaling: float,
    grad: Tensor | None = None,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    niter: int | None = NITER,
) -> LoraInit:
    """The ``init_lora_weights="lora_ga"`` initializer (lorakit.ops.lora_ga): (A, B, residual) from the layer's mean
    gradient ``grad`` (out, in), which lorakit.preprocess_loraga leaves on its base module and the adapter takes off
    it, and LoraGAConfig's direction, scale and stable_gamma. Without a gradient (a saved adapter being loaded, a
    layer preprocess_loraga does not cover) it is 'kaiming' and the base stays, as in PEFT."""
    if grad is None:
        return kaiming(weight, r, scaling)
    return LoraInit(*lora_ga_init(grad, weight, r, scaling, direction, scale, stable_gamma, niter))


def eva(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """EVA's starting point (init_lora_weights='eva', Paischer et al. 2024, arXiv 2410.07170): as 'kaiming' (B = 0,
    an identity at start) until lorakit.initialize_lora_eva_weights replaces A with the top right-singular vectors
    of the layer's inputs (lorakit.ops.eva), as PEFT does."""
    return kaiming(weight, r, scaling)


def _fp32(weight: Tensor, r: int, name: str) -> Tensor:
    """``weight`` in fp32 for the decompositions; ValueError if r exceeds its rank bound or its dtype is not a float."""
    if not weight.is_floating_point():
        raise TypeError(
            f"init_lora_weights={name!r} needs a floating-point base weight, not {weight.dtype}; initialize on the "
            "fp32/fp16/bf16 model, then quantize the residual base"
        )
    if r > min(weight.shape):
        raise ValueError(
            f"init_lora_weights={name!r} needs r <= min(out, in) = {min(weight.shape)} for a weight of shape "
            f"{tuple(weight.shape)}, got r={r}; lower r (or set rank_pattern for this module)"
        )
    return weight.detach().to(torch.float32)


# -- LoftQ -------------------------------------------------------------------------------------------------------------
# LoftQ initialization (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization", sec. 3, Algorithm 1).
#
# Quantizing a base weight W loses W - dequant(Q). LoftQ starts the adapter so that dequant(Q) + s * B @ A is close to
# W, alternating for t = 1..T (B_0 A_0 = 0):
#
#     Q_t         = quantize(W - s * B_{t-1} @ A_{t-1})                 # what the adapter does not explain
#     s * B_t A_t = rank-r truncated SVD of W - dequant(Q_t)            # what the quantization lost
#
# and makes dequant(Q_T) the new base weight (``LoraInit.residual``). It is registered as ``init_lora_weights="loftq"``;
# ``loftq_config={"loftq_bits": 4 | 8, "loftq_iter": T}`` chooses the quantizer (lorakit.quant.formats: NF4 with
# double-quantized scales, or per-row int8) and T.
#
# LoftQ needs the full-precision W, so it runs before the base is quantized. The base then holds dequant(Q_T) in full
# precision, and quantizing it gives back Q_T exactly (the quantizers are idempotent), so the usual flow is:
#
#     peft = get_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights="loftq",
#                                             loftq_config={"loftq_bits": 4, "loftq_iter": 1}))
#     lorakit.quantize(peft.get_base_model(), bits=4)    # the NF4 base LoftQ fitted the adapter to; no further loss
#
# With loftq_iter=1, Q_1 = quantize(W): a saved LoftQ adapter loads onto ``lorakit.quantize(fresh base)`` and finds the
# base it was trained with. With loftq_iter > 1 the base differs from quantize(W): save the base model too.


def low_rank_fit(residual: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor]:
    """A (r, in) and B (out, r) such that ``scaling * B @ A`` is the best rank-r approximation of ``residual``
    (out, in) in Frobenius norm (Eckart-Young): U_r diag(S_r) V_r^T, with sqrt(S_r / scaling) on each side. If r
    exceeds min(out, in), the extra rows of A and columns of B are zero."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
    k = min(r, S.numel())
    root = torch.sqrt(S[:k] / scaling)  # (k,)
    A = torch.zeros(r, residual.shape[1])
    B = torch.zeros(residual.shape[0], r)
    A[:k] = root[:, None] * Vh[:k]
    B[:, :k] = U[:, :k] * root[None, :]
    return A, B


def loftq(weight: Tensor, r: int, scaling: float, loftq_bits: int = 4, loftq_iter: int = 1) -> LoraInit:
    """LoftQ's (A, B) for base weight ``weight`` (out, in) and adapter scaling ``scaling``; the residual (new base
    weight) is dequant(Q_T) in the weight's dtype. If the weight is already on the quantization grid (a quantized
    base), there is nothing to fit: the adapter starts as init_lora_weights=True would, with a warning."""
    if loftq_bits not in BITS:
        raise ValueError(f"loftq_config loftq_bits={loftq_bits!r} is not supported; use 4 (NF4) or 8 (int8)")
    if isinstance(loftq_iter, bool) or not isinstance(loftq_iter, int) or loftq_iter < 1:
        raise ValueError(f"loftq_config loftq_iter={loftq_iter!r} must be a positive integer, e.g. 1")
    W = weight.detach().float()  # (out, in)
    A = torch.zeros(r, W.shape[1])
    B = torch.zeros(W.shape[0], r)
    for step in range(loftq_iter):
        Q = dequantize(quantize_weight(W - scaling * (B @ A), loftq_bits))  # (out, in)
        if step == 0 and torch.linalg.matrix_norm(W - Q) <= 1e-6 * torch.linalg.matrix_norm(W):
            warnings.warn(
                "init_lora_weights='loftq': a base weight is already quantized (W = dequant(quantize(W))), so LoftQ "
                "has no quantization error to fit; that adapter starts as with init_lora_weights=True. Apply LoftQ "
                "to the full-precision model, then lorakit.quantize(peft_model.get_base_model())",
                stacklevel=2,
            )
            return kaiming(weight, r, scaling)
        A, B = low_rank_fit(W - Q, r, scaling)
    return LoraInit(A, B, Q.to(weight.dtype))


def loftq_error(weight: Tensor, init: LoraInit, scaling: float) -> float:
    """||W - (residual + s * B @ A)||_F: how far the quantized base plus the adapter is from the original weight."""
    assert init.residual is not None
    approx = init.residual.float() + scaling * (init.B @ init.A)
    return math.sqrt(float(((weight.float() - approx) ** 2).sum()))


Initializer = Callable[[Tensor, int, float], LoraInit]

INITIALIZERS: dict[str, Initializer] = {
    "kaiming": kaiming,
    "gaussian": gaussian,
    "pissa": pissa,
    "olora": olora,
    "orthogonal": orthogonal,
    "loftq": loftq,
    "mica": mica,
    "corda": corda,
    "eva": eva,
    "lora_ga": lora_ga,
}


def get_initializer(init_lora_weights: bool | str, embedding: bool = False) -> Initializer:
    """The initializer named by a config's ``init_lora_weights`` (True -> kaiming, False -> random_nonzero; for an
    embedding: embedding_default, False -> embedding_random)."""
    if init_lora_weights is False:
        return embedding_random if embedding else random_nonzero
    if embedding and _lookup(init_lora_weights) is not mica:  # MiCA is the one an embedding takes by name, as PEFT
        return embedding_default
    if init_lora_weights is True:
        return kaiming
    init = _lookup(init_lora_weights)
    if init is None:
        raise ValueError(
            f"init_lora_weights={init_lora_weights!r} is unknown; use True, False, {PISSA_NITER_HELP} "
            f"or one of {sorted(INITIALIZERS)}"
        )
    return init


PISSA_NITER_HELP = "'pissa_niter_<K>' (PiSSA by randomized SVD with K subspace iterations, e.g. 'pissa_niter_4')"
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def is_known(init_lora_weights: object) -> bool:
    """True if ``init_lora_weights`` names an initializer (a bool, a registry name, or ``pissa_niter_<K>``)."""
    return isinstance(init_lora_weights, bool) or _lookup(init_lora_weights) is not None


def mutates_base(init_lora_weights: object) -> bool:
    """True for initializers that move part of the base weight into the adapter (PiSSA, OLoRA, CorDA, LoRA-GA): their
    adapters only fit the residual base, unless saved with ``path_initial_model_for_weight_conversion``."""
    init = _lookup(init_lora_weights)
    return getattr(init, "func", init) in (pissa, olora, corda, lora_ga)


def _lookup(name: object) -> Initializer | None:
    """The initializer called ``name``: a registry key, ``pissa_niter_<K>``, or a registry key in other case (PEFT
    accepts e.g. 'OLoRA' and 'Gaussian'); None if there is none."""
    if not isinstance(name, str):
        return None
    if name in INITIALIZERS:
        return INITIALIZERS[name]
    match = _PISSA_NITER.fullmatch(name)
    if match:
        return functools.partial(pissa, niter=int(match[1]))
    return INITIALIZERS.get(name.lower())
