"""LoRA on a bare parameter: the update ``delta W`` of a 2-D weight or of a stack of expert weights, from PEFT's
factor layout (``target_parameters``, PEFT's ParamWrapper; lorakit.adapters.parameter holds the parameters).

One adapter of a parameter with E experts (E = 1 for a 2-D weight) has, as in PEFT's file format,

    A (r * E, in)      rows e * r + j     are expert e's rank-j row:        A_e = A.reshape(E, r, in)[e]
    B (out, r * E)     columns j * E + e  are expert e's rank-j column:     B_e = B.reshape(out, r, E)[:, :, e]

and expert e's update is ``s * B_e @ A_e`` (out, in) (Hu et al. 2021, eq. 3, once per expert). The parameter stores
it in one of three layouts (``Layout``): a 2-D weight (out, in); an expert stack (E, out, in), the transformers 5
default (``F.linear(x, W[e])``); or (E, in, out) for experts that say ``is_transposed`` (GPT-OSS: ``x @ W[e]``).
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor


class Layout(str, enum.Enum):
    OUT_IN = "out_in"  # a 2-D weight (out, in), as nn.Linear's
    EXPERTS_OUT_IN = "experts_out_in"  # (E, out, in)
    EXPERTS_IN_OUT = "experts_in_out"  # (E, in, out)


def layout_of(shape: torch.Size | tuple[int, ...], is_transposed: bool) -> Layout:
    """The layout of a parameter of ``shape``; ValueError for anything but 2-D and 3-D."""
    if len(shape) == 2:
        return Layout.OUT_IN
    if len(shape) == 3:
        return Layout.EXPERTS_IN_OUT if is_transposed else Layout.EXPERTS_OUT_IN
    raise ValueError(
        f"LoRA on a parameter needs a 2-D weight (out, in) or a 3-D expert stack, not shape {tuple(shape)}; target "
        "the module that owns it with target_modules instead, or leave it out of target_parameters"
    )


def dims(shape: torch.Size | tuple[int, ...], layout: Layout) -> tuple[int, int, int]:
    """(experts, in, out) of a parameter of ``shape`` stored in ``layout``."""
    if layout is Layout.OUT_IN:
        return 1, shape[1], shape[0]
    if layout is Layout.EXPERTS_OUT_IN:
        return shape[0], shape[2], shape[1]
    return shape[0], shape[1], shape[2]


def expert_factors(A: Tensor, B: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """(A_e (E, r, in), B_e (E, out, r)): each expert's factors, from A (r * E, in) and B (out, r * E)."""
    A_e = A.reshape(experts, -1, A.shape[-1])  # (E, r, in)
    B_e = B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)  # (out, r, E) -> (E, out, r)
    return A_e, B_e


def delta_weight(A: Tensor, B: Tensor, scaling: float, experts: int, layout: Layout) -> Tensor:
    """``s * B_e @ A_e`` for each of the ``experts`` experts, in the parameter's layout: (out, in) for a 2-D weight
    (E = 1), (E, out, in) or (E, in, out) for an expert stack."""
    if layout is Layout.OUT_IN:
        return (B @ A) * scaling  # (out, r) @ (r, in) -> (out, in)
    A_e, B_e = expert_factors(A, B, experts)
    delta = torch.bmm(B_e, A_e) * scaling  # (E, out, r) @ (E, r, in) -> (E, out, in)
    return delta if layout is Layout.EXPERTS_OUT_IN else delta.transpose(1, 2)  # (E, in, out)
