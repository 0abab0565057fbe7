"""lorakit.io.progress: a tqdm bar on a terminal, plain lines elsewhere, nothing with LORAKIT_PROGRESS=0; and the
long phases of the commands show it (on stderr, stdout untouched)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_folder

from lorakit.io.progress import phase, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    with progress("eval loss", total=4, unit="batch", file=out, every_s=0.0) as bar:
        for _ in range(4):
            bar.update()
    lines = out.getvalue().splitlines()
    assert lines[0] == "lorakit: eval loss: 4 batches ..."
    assert re.fullmatch(r"lorakit: eval loss: 1/4 batches \(25%\), [\d.]+ batch/s, ETA [\d.]+ s", lines[1])
    assert len(lines) == 5  # start, after 1, 2, 3 (not after the last), end
    assert re.fullmatch(r"lorakit: eval loss: 4 batches in [\d.]+ s \([\d.]+ batch/s\)", lines[-1])
    assert "\r" not in out.getvalue()


def test_a_bar_with_rate_and_eta_on_a_terminal() -> None:
    out = Terminal()
    with progress("generating", total=3, unit="prompt", file=out) as bar:
        bar.update(3)
    text = out.getvalue()
    assert "\r" in text and "generating: 100%" in text and "3/3" in text and "prompt/s" in text
    assert "lorakit:" not in text


def test_off_with_lorakit_progress_0_or_show_false(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    with progress("x", total=2, file=out, show=False) as bar, phase("y", file=out, show=False):
        bar.update(2)
    monkeypatch.setenv("LORAKIT_PROGRESS", "0")
    with progress("x", total=2, file=out) as bar, phase("y", file=out):
        bar.update(2)
    assert out.getvalue() == ""


def test_phase_lines() -> None:
    out = io.StringIO()
    with phase("merging a into b", file=out):
        pass
    start, end = out.getvalue().splitlines()
    assert start == "lorakit: merging a into b ..."
    assert re.fullmatch(r"lorakit: merging a into b: done in [\d.]+ s", end)


def test_lorakit_eval_shows_its_phases_on_stderr_only(tmp_path: Path) -> None:
    model = save_tiny_folder(tmp_path / "model")
    rows = [{"prompt": "what is two plus four", "completion": " six"}] * 3
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAKIT_PROGRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit.cli", "eval", "--data", "data.jsonl", "--model", str(model), "--json",
         "--batch-size", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_examples"] == 3 and proc.stdout.count("\n") == 1
    assert "lorakit: eval loss: 2 batches ...\n" in proc.stderr
    assert re.search(r"lorakit: eval loss: 2 batches in [\d.]+ s", proc.stderr)
    assert "lorakit: exact-match answers: 3 prompts ...\n" in proc.stderr
    assert re.search(r"lorakit: exact-match answers: 3 prompts in [\d.]+ s", proc.stderr)


def test_a_resumed_phase_counts_from_its_start_and_shows_its_figures() -> None:
    """The training display: ``initial`` steps already done (a --resume), figures after the count (loss)."""
    out = io.StringIO()
    with progress("train", total=10, file=out, every_s=0.0, initial=6) as bar:
        for loss in (0.5, 0.4):
            bar.update()
            bar.set_postfix(loss=f"{loss:.2f}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "lorakit: train: 10 steps from 6 ..."
    assert re.fullmatch(r"lorakit: train: 8/10 steps \(80%\), [\d.]+ step/s, ETA .*, loss 0.50", lines[2])
    assert re.fullmatch(r"lorakit: train: 2 steps in .* \([\d.]+ step/s\), loss 0.40", lines[-1])
    term = Terminal()
    with progress("train", total=10, file=term, initial=6) as bar:
        bar.update()
        bar.set_postfix(loss="0.50")
    assert "7/10" in term.getvalue() and "loss=0.50" in term.getvalue()
