"""LoftQ initialization (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization", sec. 3, Algorithm 1).

Quantizing a base weight W loses W - dequant(Q). LoftQ starts the adapter so that dequant(Q) + s * B @ A is close to W,
alternating for t = 1..T (B_0 A_0 = 0):

    Q_t         = quantize(W - s * B_{t-1} @ A_{t-1})                 # what the adapter does not explain
    s * B_t A_t = rank-r truncated SVD of W - dequant(Q_t)            # what the quantization lost

and makes dequant(Q_T) the new base weight (``LoraInit.residual``). It is registered as ``init_lora_weights="loftq"``;
``loftq_config={"loftq_bits": 4 | 8, "loftq_iter": T}`` chooses the quantizer (lorakit.quant: NF4 with double-quantized
scales, or per-row int8) and T.

LoftQ needs the full-precision W, so it runs before the base is quantized. The base then holds dequant(Q_T) in full
precision, and quantizing it gives back Q_T exactly (the quantizers are idempotent), so the usual flow is:

    peft = get_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights="loftq",
                                            loftq_config={"loftq_bits": 4, "loftq_iter": 1}))
    lorakit.quantize(peft.get_base_model(), bits=4)    # the NF4 base LoftQ fitted the adapter to; no further loss

With loftq_iter=1, Q_1 = quantize(W): a saved LoftQ adapter loads onto ``lorakit.quantize(fresh base)`` and finds the
base it was trained with. With loftq_iter > 1 the base differs from quantize(W): save the base model too.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lorakit.quant import BITS, dequantize, quantize_weight

if TYPE_CHECKING:
    from lorakit.init import LoraInit


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
    from lorakit.init import LoraInit, kaiming  # late: init imports this module to register "loftq"

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
