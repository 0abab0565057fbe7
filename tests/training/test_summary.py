"""summary.json of a resumed run tells the whole run's story: the eval loss before the first step (measured by the
first segment) and the wall time of all segments, not of the resumed part only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_folder

import lorakit.training.trainer as trainer
from lorakit.training.args import TrainArgs

RECORDS = [{"prompt": f"the cat sat {i}", "completion": " hello world"} for i in range(16)]
SLOW = 0.1  # s added to each training forward of the first segment


@pytest.fixture
def args(tmp_path: Path) -> TrainArgs:
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:4]))
    return TrainArgs(data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "eval.jsonl"),
                     model=str(save_tiny_folder(tmp_path / "model")), output=str(tmp_path / "run"), r=2,
                     batch_size=4, max_steps=6, save_steps=2, progress=False)  # fmt: skip


def test_a_resumed_run_keeps_its_start_eval_loss_and_total_wall_time(
    args: TrainArgs, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = trainer.lm_loss_sum, {"n": 0}

    def slow_then_crash_in_step_5(model, batch):  # noqa: ANN001, ANN202
        if model.training:
            calls["n"] += 1
            if calls["n"] > 4:
                raise RuntimeError("simulated crash")
            time.sleep(SLOW)
        return real(model, batch)

    monkeypatch.setattr(trainer, "lm_loss_sum", slow_then_crash_in_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(args)
    monkeypatch.setattr(trainer, "lm_loss_sum", real)
    output = Path(args.output)
    first = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert first[0]["step"] == 0 and "eval_loss" in first[0]

    args.resume = True
    summary = trainer.train(args)
    written = json.loads((output / "summary.json").read_text())
    assert summary["resumed_from"] == 4
    assert written["eval_loss_start"] == first[0]["eval_loss"]  # the first segment's, not null
    assert written["wall_time_s"] >= 4 * SLOW  # the first segment's 4 slow steps are in it
    state = torch.load(output / "checkpoints" / "step-00000004" / "trainer_state.pt", weights_only=True)
    assert 4 * SLOW <= state["wall_time_s"] <= written["wall_time_s"]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # the whole history, for the plot too
    walls = [r["wall_time_s"] for r in rows[1:]]
    assert walls == sorted(walls) and walls[-1] <= written["wall_time_s"]  # the summary's adds the last eval


def test_an_uninterrupted_run_measures_its_own_start(args: TrainArgs) -> None:
    summary = trainer.train(args)
    rows = [json.loads(line) for line in (Path(args.output) / "metrics.jsonl").read_text().splitlines()]
    assert summary["eval_loss_start"] == rows[0]["eval_loss"] and summary["resumed_from"] is None
    assert 0 < rows[1]["wall_time_s"] <= rows[-1]["wall_time_s"] <= summary["wall_time_s"]
