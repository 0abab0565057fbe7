"""Training precision: fp32, or bfloat16 autocast where the CPU computes bf16 natively.

With native bf16 (x86 AVX512-BF16 or AMX, ARMv8.6 BF16) a bf16 matrix product runs 2-4x faster than fp32 (measured
3.2x for a (1024, 576) @ (576, 1536) product on one core of an AVX512-BF16 EPYC); without it bf16 is emulated and
slower than fp32. Autocast computes the matrix products in bf16 while the adapter weights, their gradients and the
optimizer state stay fp32, and the loss is taken in fp32 (``lorakit.training.loss``).

fp32 stays the default because bf16 changes what is learned: in ``benchmarks/end_to_end.py`` (10 steps, default
model, on a shared 2-core AVX512-BF16 EPYC) a whole run was 1.1-1.6x faster in bf16 but ended with a 0.009-0.019
higher fp32 eval loss (4 pairs, 3 seeds; the HF Trainer with ``bf16=True``: +0.014). ``bf16=None`` chooses by CPU.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

logger = logging.getLogger(__name__)

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
    """``--bf16`` / ``--no-bf16`` as given (with a warning for bf16 on a CPU that emulates it), or (None) on exactly
    when the CPU has native bf16."""
    if requested is None:
        return has_native_bf16()
    if requested and not has_native_bf16():
        logger.warning(
            "--bf16: this CPU has no native bf16 (no avx512_bf16 / amx_bf16 / bf16 in /proc/cpuinfo), so bf16 is "
            "emulated and usually slower than fp32; run with --no-bf16"
        )
    return requested
