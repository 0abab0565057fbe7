"""training.metrics.MetricsLog: rows appended line by line (the file is written whole once, by the first append), a
line cut short by a kill dropped, a resumed run keeping the rows up to its checkpoint's step."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from lorakit.io.writes import OutputWriteError
from lorakit.training import metrics
from lorakit.training.metrics import METRICS_NAME, MetricsLog


def test_rows_are_appended_without_rewriting_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / METRICS_NAME).write_text('{"step": 9, "loss": 1.0}\n')  # an old run's (--overwrite)
    writes: list[Path] = []
    real = metrics.atomic_write_bytes
    monkeypatch.setattr(metrics, "atomic_write_bytes", lambda path, data: (writes.append(path), real(path, data)))
    log = MetricsLog(tmp_path)
    for step in range(1, 101):
        log.append({"step": step, "loss": 1 / step})
    log.sync()
    assert writes == [tmp_path / METRICS_NAME]  # once: the first append; each later one costs one line
    lines = (tmp_path / METRICS_NAME).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 101))
    assert log.rows() == [{"step": s, "loss": 1 / s} for s in range(1, 101)]


def test_a_resumed_log_keeps_the_rows_up_to_its_step_and_drops_a_cut_line(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    for step in range(6):
        log.append({"step": step, "loss": float(step)})
    with open(tmp_path / METRICS_NAME, "a") as f:
        f.write('{"step": 6, "lo')  # killed in the middle of a line
    assert [r["step"] for r in MetricsLog(tmp_path).rows()] == [0, 1, 2, 3, 4, 5]
    resumed = MetricsLog(tmp_path, resume_step=3)  # the checkpoint of step 3
    resumed.append({"step": 4, "loss": 40.0})
    resumed.append({"step": 5, "loss": 50.0})
    text = (tmp_path / METRICS_NAME).read_text()
    assert [json.loads(line) for line in text.splitlines()] == [
        {"step": 0, "loss": 0.0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
        {"step": 4, "loss": 40.0}, {"step": 5, "loss": 50.0},
    ]  # fmt: skip


def test_a_full_disk_while_appending_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = MetricsLog(tmp_path)
    log.append({"step": 1, "loss": 1.0})

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics, "open", full, raising=False)
    with pytest.raises(OutputWriteError, match=rf"cannot write {tmp_path / METRICS_NAME}: no space left on device"):
        log.append({"step": 2, "loss": 0.5})
