"""Training precision: bfloat16 autocast by default where the CPU computes bf16 natively, fp32 elsewhere.

With native bf16 (x86 AVX512-BF16 or AMX, ARMv8.6 BF16) a bf16 matrix product runs 2-4x faster than fp32 (measured
3.3x for a (2048, 576) @ (576, 1536) product on an AVX512-BF16 EPYC); without it bf16 is emulated and slower than
fp32. Autocast computes the matrix products in bf16 while the adapter weights, their gradients and the optimizer
state stay fp32, and the loss is taken in fp32 (``lorakit.loss``).
"""

from __future__ import annotations

import platform
from pathlib import Path

# /proc/cpuinfo names: x86 "flags" (AVX512-BF16, AMX-BF16); aarch64 "Features" ("bf16", ARMv8.6 BFloat16).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str) -> set[str]:
    """The CPU feature names listed in ``/proc/cpuinfo`` text (x86 ``flags`` lines, aarch64 ``Features`` lines)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively; reads ``/proc/cpuinfo`` unless given its text (False without it)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if platform.system() != "Linux" or not path.is_file():
            return False  # no portable way to ask elsewhere; fp32 is the safe default
        cpuinfo = path.read_text(errors="replace")
    return bool(cpu_flags(cpuinfo) & NATIVE_BF16_FLAGS)


def resolve_bf16(requested: bool | None) -> bool:
    """``--bf16`` / ``--no-bf16`` as given, or (None) on exactly when the CPU has native bf16."""
    return has_native_bf16() if requested is None else requested
