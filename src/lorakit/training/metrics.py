"""Run records in the output folder: metrics.jsonl (one line per logging step), summary.json, loss.png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorakit.io.writes import atomic_write_bytes, atomic_write_json

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
PLOT_NAME = "loss.png"


class MetricsLog:
    """metrics.jsonl, rewritten atomically on every append (a kill leaves the old or the new file, whole)."""

    def __init__(self, output: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(output) / METRICS_NAME
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r.get("step", 0) <= resume_step]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())


def write_summary(output: str | os.PathLike, summary: dict[str, Any]) -> None:
    atomic_write_json(Path(output) / SUMMARY_NAME, summary)


def plot_loss(output: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """loss.png: training loss per step, eval loss where evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(output) / PLOT_NAME
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
