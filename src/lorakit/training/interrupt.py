"""SIGTERM / SIGINT during training: stop at a step boundary with a checkpoint, and say how to go on.

The first signal (a scheduler's SIGTERM, a spot instance going away, Ctrl-C) only sets a flag: the loop finishes the
optimizer step it is in, writes a checkpoint, and raises ``RunInterrupted`` (exit code 128 + the signal: 143 for
SIGTERM, 130 for SIGINT) whose message names the checkpoint and the exact ``lorakit train ... --resume`` command. A
second signal raises ``RunInterrupted`` at once, wherever the loop is: the checkpoints already written are whole
(they are written in a temp folder and renamed), so nothing older than the last one is lost.

With several processes (torchrun forwards the signal to each), the stop is agreed after each step (a sum over the
processes), so all of them stop after the same step.
"""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from lorakit.training import distributed
from lorakit.training.args import TrainArgs, train_fields

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_code`` is 128 + the signal, ``checkpoint`` the one to resume from (None if
    there is none). A KeyboardInterrupt, so that ``except Exception`` in between does not swallow it."""

    def __init__(self, message: str, exit_code: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.exit_code, self.checkpoint = exit_code, checkpoint


class StopOnSignal:
    """``with StopOnSignal() as stop:`` SIGTERM and SIGINT handlers for the block (the main thread only; elsewhere
    signals keep their handlers): ``stop.signum`` is set by the first signal, a second calls ``on_second`` (which
    raises), set by the loop to say where it is."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.on_second: Any = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and self.on_second is not None:
            self.on_second(signum)
        self.signum = self.signum or signum

    def requested(self, world: int) -> bool:
        """Whether any process got a signal (all processes call it after the same step)."""
        if world == 1:
            return self.signum is not None
        (n,) = distributed.sum_over_processes([1.0 if self.signum is not None else 0.0])
        return n > 0


def exit_code(signum: int) -> int:
    return 128 + signum


def command(args: TrainArgs, *extra: str) -> str:
    """The ``lorakit train`` command line of ``args`` (each option that differs from its default), then ``extra``:
    it runs the same training from the same folder (``--resume`` / ``--overwrite`` are left to ``extra``)."""
    parts = ["lorakit", "train"]
    for name, (field, typ) in train_fields().items():
        value = getattr(args, name)
        if name in ("resume", "overwrite") or value == field.default:
            continue
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            parts.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join([*parts, *extra])


def interrupted(args: TrainArgs, signum: int, when: str, checkpoint: Path | None) -> RunInterrupted:
    """The RunInterrupted of a run stopped by ``signum`` (``when``: e.g. 'after step 5 of 16'), naming the checkpoint
    kept and the command that continues the run (or, with no checkpoint, the one that starts it again)."""
    if checkpoint is not None:
        then = f"checkpoint kept: {checkpoint}; resume with: {command(args, '--resume')}"
    else:
        then = f"no checkpoint was written yet; start again with: {command(args, '--overwrite')}"
    name = signal.Signals(signum).name
    return RunInterrupted(f"interrupted by {name} {when}; {then}", exit_code(signum), checkpoint)
