"""What the user sees during a long wait: one display for every phase that counts batches or steps (base scoring,
evaluation, generation) and one line pair for a phase that cannot count (a model loading, converting, merging).

On a terminal a phase is a tqdm bar with its rate and ETA; when stderr is not a terminal (a log file, CI, a pipe)
the same phase is plain lines: one when it starts, one every ``every_s`` seconds with the count, rate and ETA, and
one when it ends with its time. Everything goes to stderr, so stdout stays the command's result (``--json``).
``LORAKIT_PROGRESS=0`` turns the display off.

Example::

    with progress("eval loss", total=len(batches), unit="batch") as bar:
        for batch in batches:
            ...
            bar.update()
    # not a terminal:
    # lorakit: eval loss: 38 batches ...
    # lorakit: eval loss: 12/38 batches (32%), 1.2 batches/s, ETA 22 s
    # lorakit: eval loss: 38 batches in 31 s (1.2 batches/s)

    with phase("merging the adapter into the base model"):
        ...
    # lorakit: merging the adapter into the base model ...
    # lorakit: merging the adapter into the base model: done in 2.1 s
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from tqdm.auto import tqdm


def enabled() -> bool:
    """False when ``LORAKIT_PROGRESS`` is 0 / false / off / no."""
    return os.environ.get("LORAKIT_PROGRESS", "").strip().lower() not in ("0", "false", "off", "no")


def _duration(seconds: float) -> str:
    """E.g. 4.2 -> '4.2 s', 135 -> '2m15s', 4000 -> '1h06m'."""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}es" if unit.endswith(("s", "sh", "ch", "x")) else f"{n} {unit}s"


class Progress:
    """A counted phase: ``update(n)`` after each unit of work, ``close()`` at the end (or use ``progress(...)``)."""

    def __init__(self, desc: str, total: int | None, unit: str = "step", file: IO[str] | None = None,
                 every_s: float = 10.0, show: bool = True, initial: int = 0) -> None:  # fmt: skip
        """``initial``: units already done (a resumed run); rates and ETAs count from it."""
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.file = file if file is not None else sys.stderr
        self.show = show and enabled()
        self.initial = self.done = initial
        self.started = time.perf_counter()
        self._last_line = self.started
        self._postfix = ""
        is_tty = getattr(self.file, "isatty", lambda: False)()
        self._bar = None
        if self.show and is_tty:
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file, dynamic_ncols=True)
        elif self.show:
            count = f"{_plural(total, unit)} " if total is not None else ""
            self._line(f"{count}{f'from {initial} ' if initial else ''}...")

    def _line(self, text: str) -> None:
        print(f"lorakit: {self.desc}: {text}", file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.show and now - self._last_line >= self.every_s and (self.total is None or self.done < self.total):
            self._last_line = now
            rate = (self.done - self.initial) / (now - self.started)
            if self.total:
                eta = (self.total - self.done) / rate if rate > 0 else float("inf")
                self._line(
                    f"{self.done}/{_plural(self.total, self.unit)} ({self.done / self.total:.0%}), "
                    f"{rate:.2f} {self.unit}/s, ETA {_duration(eta)}{self._postfix}"
                )
            else:
                self._line(f"{_plural(self.done, self.unit)}, {rate:.2f} {self.unit}/s{self._postfix}")

    def set_postfix(self, **values: object) -> None:
        """Figures shown after the count (e.g. ``loss="0.412"``): in the bar, or at the end of each plain line."""
        if self._bar is not None:
            self._bar.set_postfix(**values)
        else:
            self._postfix = "".join(f", {key} {value}" for key, value in values.items())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.show:
            elapsed, new = time.perf_counter() - self.started, self.done - self.initial
            rate = f" ({new / elapsed:.2f} {self.unit}/s)" if elapsed > 0 and new else ""
            self._line(f"{_plural(new, self.unit)} in {_duration(elapsed)}{rate}{self._postfix}")
            self.show = False


@contextmanager
def progress(desc: str, total: int | None, unit: str = "step", file: IO[str] | None = None,
             every_s: float = 10.0, show: bool = True, initial: int = 0) -> Iterator[Progress]:  # fmt: skip
    """A ``Progress`` closed at the end of the block (also when it raises)."""
    bar = Progress(desc, total, unit, file, every_s, show, initial)
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def phase(desc: str, file: IO[str] | None = None, show: bool = True) -> Iterator[None]:
    """A phase that cannot count its work: a line when it starts and one with its time when it ends (on a terminal
    and off), nothing if it raises (the error says what happened)."""
    out = file if file is not None else sys.stderr
    show = show and enabled()
    if show:
        print(f"lorakit: {desc} ...", file=out, flush=True)
    started = time.perf_counter()
    yield
    if show:
        print(f"lorakit: {desc}: done in {_duration(time.perf_counter() - started)}", file=out, flush=True)
