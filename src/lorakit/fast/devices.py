"""Which devices the fast paths run on, and autocast read from a tensor's own device.

The rule (see lorakit.fast's docstring): a fast path takes the device from its tensors, never assumes the CPU, and
runs only on a device type in ``FAST_DEVICES``; on any other (``meta``, ``xpu``, ``hpu``, a backend registered as
``privateuseone``) it steps aside and the reference path runs. Autocast is read for the tensor's device type
(``torch.is_autocast_enabled(x.device.type)``), not for ``"cpu"``: CPU autocast does not touch CUDA tensors, and
CUDA autocast does not touch CPU ones.

MPS has no float64; the one fast-path op that needs it, the dropout draw of lorakit.fast.branch
(``dropped_positions``: float64 uniforms), steps aside there (``has_float64``) and the reference's nn.Dropout runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

# device types whose kernels the fast paths use (addmm with out=, index_fill_, searchsorted, silu_backward,
# logsumexp); tests/conftest.py's ``device`` fixture runs their equality tests on each that torch reports available
FAST_DEVICES = frozenset({"cpu", "cuda", "mps"})
NO_FLOAT64 = frozenset({"mps"})  # device types without float64 tensors


def runs_fast(t: Tensor) -> bool:
    """Whether the fast paths run on the device of ``t`` (one set lookup: it is on the decoding path)."""
    return t.device.type in FAST_DEVICES


def has_float64(t: Tensor) -> bool:
    """Whether the device of ``t`` holds float64 tensors (MPS does not)."""
    return t.device.type not in NO_FLOAT64


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast on ``x``'s device would cast the fp32 tensor ``x`` to for a matmul, or None (autocast off
    for that device, ``x`` not fp32, or ``x`` on a device the fast paths do not run on)."""
    if x.dtype != torch.float32 or not runs_fast(x):
        return None
    return cast_dtype(x.device.type)


def cast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``device_type`` (``"cpu"``, ``"cuda"``, ...) when autocast is on for it, else None."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


@dataclass(frozen=True)
class AutocastState:
    """The autocast state of one device type in a forward, replayed around its backward: what
    ``torch.amp.custom_fwd`` / ``custom_bwd`` do, for the device of the forward's tensors instead of one fixed in
    the decorator (the autograd engine runs backward without the forward's autocast context)."""

    device_type: str
    enabled: bool
    dtype: torch.dtype | None  # None: torch has no autocast for the device type (meta)

    @classmethod
    def of(cls, t: Tensor) -> AutocastState:
        """The autocast state for ``t``'s device type, now."""
        kind = t.device.type
        if not torch.amp.is_autocast_available(kind):
            return cls(kind, False, None)
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def replay(self) -> contextlib.AbstractContextManager:
        """A context with this autocast state (enabled or not) for its device type; none for a device type without
        autocast."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)
