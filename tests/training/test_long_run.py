"""A long run of lorakit's own trainer on a tiny model, with evaluations and checkpoints: resident memory flat after
warm-up (less than 5% growth from the end of warm-up to the last step), step time flat, and metrics.jsonl complete
(a row for every step, in order, the evaluations in theirs).

Two sizes: "ci", a few seconds, in every ``./run test``; "full", 3,000 steps (about a minute), marked slow and run
only when asked, with ``LORAKIT_SOAK=full ./run test tests/training/test_long_run.py -s`` (``-s`` prints the figures).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_folder, save_word_data

import lorakit.training.trainer as trainer
from lorakit.training import checkpoint
from lorakit.training.args import TrainArgs

MAX_MEMORY_GROWTH = 0.05  # of the resident memory at the end of warm-up
MAX_TIME_GROWTH = 1.5  # fastest step of the last window / of the first window after warm-up
# Step time is the process's CPU time (all its threads): other processes on the machine do not change it, and a cost
# that grows with the run (e.g. rewriting metrics.jsonl whole per row, as lorakit did) does.


@dataclass
class Size:
    steps: int
    warmup: int  # steps before the reference measurement
    window: int  # steps whose fastest step time is compared
    eval_steps: int
    save_steps: int


SIZES = {
    "ci": Size(steps=300, warmup=100, window=50, eval_steps=100, save_steps=100),
    "full": Size(steps=3000, warmup=500, window=200, eval_steps=250, save_steps=500),
}


def _rss() -> int:
    """This process's resident memory, bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")




@pytest.mark.parametrize(
    "size",
    [
        "ci",
        pytest.param("full", marks=[pytest.mark.slow, pytest.mark.skipif(
            os.environ.get("LORAKIT_SOAK") != "full", reason="3,000 steps: run with LORAKIT_SOAK=full")]),
    ],
)  # fmt: skip
def test_a_long_run_stays_flat(size: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = SIZES[size]
    data, eval_data = save_word_data(tmp_path / "train.jsonl", 64, 0), save_word_data(tmp_path / "eval.jsonl", 8, 1)
    args = TrainArgs(data=str(data), eval_data=str(eval_data), model=str(save_tiny_folder(tmp_path / "model")),
                     output=str(tmp_path / "run"), r=4, batch_size=4, max_steps=s.steps, eval_steps=s.eval_steps,
                     save_steps=s.save_steps, lr=1e-3, seed=0, progress=False)  # fmt: skip
    starts: list[float] = []  # the process's CPU time when step i began
    memory: list[int] = []  # resident bytes when step i began
    real = trainer.train_step

    def measured_step(run: trainer.Run, step: int) -> dict[str, float]:
        starts.append(time.process_time())
        memory.append(_rss())
        return real(run, step)

    monkeypatch.setattr(trainer, "train_step", measured_step)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no second thread spinning on CPU time while the machine is busy
    try:
        summary = trainer.train(args)
    finally:
        torch.set_num_threads(threads)

    # metrics.jsonl: a row per step, in order, eval rows at the eval steps
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(s.steps + 1))
    assert all(math.isfinite(r["loss"]) for r in rows[1:])
    evaluated = [r["step"] for r in rows if "eval_loss" in r]
    assert evaluated == list(range(0, s.steps + 1, s.eval_steps))
    assert summary["steps"] == s.steps and summary["eval_loss"] < summary["eval_loss_start"]
    kept = [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")]
    assert kept == [f"step-{k:08d}" for k in range(s.steps - s.save_steps, 0, -s.save_steps)[:2][::-1]]

    # resident memory: flat after warm-up
    growth = (memory[-1] - memory[s.warmup]) / memory[s.warmup]
    # step time: the fastest step of a window, after warm-up and at the end. Work that grows with the step count (a
    # file rewritten whole, a list scanned) slows every step, the fastest too; another process sharing the CPU (the
    # other pytest worker) slows some steps, and with medians it failed this check at random (11.4 vs 6.3 ms once).
    times = [b - a for a, b in zip(starts, starts[1:])]  # of steps 0 .. N-2
    first = min(times[s.warmup : s.warmup + s.window])
    last = min(times[-s.window :])
    print(f"\n{size}: {s.steps} steps in {summary['wall_time_s']:.1f} s; resident {memory[s.warmup] / 2**20:.1f} MB "
          f"at step {s.warmup}, {memory[-1] / 2**20:.1f} MB at step {s.steps} ({growth:+.2%}; "
          f"{(memory[-1] - memory[s.warmup]) / (s.steps - s.warmup):+.0f} bytes / step); fastest step "
          f"{first * 1e3:.2f} ms CPU after warm-up, {last * 1e3:.2f} ms in the last {s.window} steps")  # fmt: skip
    assert growth < MAX_MEMORY_GROWTH
    assert last < MAX_TIME_GROWTH * first
