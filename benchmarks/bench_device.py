"""The device of a benchmark (``--device`` / ``run(device=...)``): timers that wait for the device, peak memory.

CUDA (and MPS) run kernels asynchronously: a timer read right after a call measures the launch, not the work, so
``synchronize`` waits for the device before each reading. Peak memory: on CUDA torch's allocator peak
(``torch.cuda.max_memory_allocated``) above what was allocated when the measurement started; on the CPU the process's
resident set (VmHWM after a reset, minus VmRSS at the start: Linux's /proc); MPS has no peak counter (None).

Training memory is ``model_mb(model)`` (the bytes of its parameters and buffers, each storage once) plus that peak.
On the CPU the peak is read above the process *after* ``model_mb`` has paged the weights in: transformers maps a
checkpoint's tensors from the file, and they become resident only when first read. Read above a process whose
weights were not resident yet, the peak counted the weights a second time as the first step paged them in (the
fp32 model: about 500 of its 532 MB).
"""

from __future__ import annotations

import time

import torch

DEVICES = ("cpu", "cuda", "mps")


def check(device: str) -> torch.device:
    """``device`` as a torch.device, refused with the fix when torch cannot use it here."""
    kind = torch.device(device).type
    if kind not in DEVICES:
        raise SystemExit(f"--device {device}: the benchmarks run on {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}); use cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {device}: torch has no MPS device here; use cpu")
    return torch.device(device)


def synchronize(device: torch.device | str) -> None:
    """Wait until every kernel queued on ``device`` has finished (nothing to wait for on the CPU)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def timed(device: torch.device | str, fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of ``fn(*args, **kwargs)``, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    synchronize(device)
    return time.perf_counter() - start, result


def model_mb(model: torch.nn.Module) -> float:
    """MB of ``model``'s parameters and buffers (``lorakit.quant.formats.resident_bytes``: each storage once), every
    page of them read first, so that tensors mapped from a checkpoint file are resident before a peak is measured
    above the process."""
    from lorakit.quant.formats import resident_bytes

    read: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        if storage.device.type == "cpu" and storage.nbytes() and storage.data_ptr() not in read:
            read.add(storage.data_ptr())
            torch.empty(0, dtype=torch.uint8).set_(storage).sum()  # reads every byte: maps every page in
    return resident_bytes(model) / 2**20


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory above the start, in MB, on one device: ``start()`` then, after the work, ``peak_mb()``."""

    def __init__(self, device: torch.device | str) -> None:
        self.kind = torch.device(device).type
        self.device = device
        self.before = 0

    def start(self) -> None:
        synchronize(self.device)
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        elif self.kind == "cpu":
            self.before = _rss_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
                f.write("5")

    def peak_mb(self) -> float | None:
        synchronize(self.device)
        if self.kind == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.before) / 2**20
        if self.kind == "cpu":
            return (_rss_kb("VmHWM") * 1024 - self.before) / 2**20
        return None
