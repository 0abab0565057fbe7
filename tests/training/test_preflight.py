"""lorakit.training.preflight: a run's data and option combinations are checked before anything loads, and a run
that fails its checks (or its model load) leaves nothing on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import save_tiny_folder

import lorakit.training.trainer as trainer
from lorakit.data.records import DataError
from lorakit.io.models import ModelNotFoundError
from lorakit.training.args import TrainArgs
from lorakit.training.preflight import check_inputs

RECORDS = [{"prompt": f"what is {i} plus one", "completion": f" {i + 1}"} for i in range(10)]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "text.txt").write_text("one line\nanother line\n")
    (tmp_path / "unknown.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (tmp_path / "broken.jsonl").write_text(json.dumps(RECORDS[0]) + "\n" + '{"prompt": \n')
    return tmp_path


def test_good_inputs_come_back_read_and_split(here: Path) -> None:
    inputs = check_inputs(TrainArgs(data="data.jsonl"))
    assert (inputs.fmt, inputs.records, inputs.eval_records) == ("prompt_completion", RECORDS, [])
    inputs = check_inputs(TrainArgs(data="data.jsonl", eval_fraction=0.2, seed=1))
    assert len(inputs.records) == 8 and len(inputs.eval_records) == 2
    assert sorted(inputs.records + inputs.eval_records, key=RECORDS.index) == RECORDS
    inputs = check_inputs(TrainArgs(data="data.jsonl", eval_data="text.txt"))
    assert inputs.eval_records == [{"text": "one line"}, {"text": "another line"}]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({}, ValueError, r"no training data: pass --data FILE"),
        ({"data": "missing.jsonl"}, DataError, r"data file 'missing.jsonl' does not exist"),
        ({"data": "unknown.jsonl"}, DataError, r"row 1 is in no known format"),
        ({"data": "broken.jsonl"}, DataError, r"line 2"),
        ({"data": "data.jsonl", "eval_data": "missing.jsonl"}, DataError, r"'missing.jsonl' does not exist"),
        ({"data": "data.jsonl", "eval_data": "text.txt", "eval_fraction": 0.1}, ValueError, r"pass one of them"),
        ({"data": "data.jsonl", "resume": True, "overwrite": True}, ValueError, r"--resume .* --overwrite"),
        ({"data": "data.jsonl", "output": "data.jsonl"}, ValueError, r"--output data.jsonl is a file"),
        ({"data": "text.txt", "eval_fraction": 0.9}, DataError, r"leaves no training example"),
    ],
)
def test_bad_inputs_say_what_to_do(here: Path, options: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_inputs(TrainArgs(**options))


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every model / tokenizer load the trainer asks for (there should be none on bad inputs)."""
    loads: list[str] = []
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: loads.append("model"))
    monkeypatch.setattr(trainer, "load_tokenizer", lambda *a, **k: loads.append("tokenizer"))
    return loads


@pytest.mark.parametrize("data", ["missing.jsonl", "unknown.jsonl", "broken.jsonl"])
def test_train_with_bad_data_loads_nothing_and_creates_no_output(here: Path, no_model_load: list[str], data: str):
    with pytest.raises(DataError):
        trainer.train(TrainArgs(data=data, output="runs/x", progress=False))
    assert no_model_load == []
    assert not (here / "runs").exists()


def test_train_with_a_missing_model_creates_no_output(here: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="model folder './nowhere/model' does not exist"):
        trainer.train(TrainArgs(data="data.jsonl", model="./nowhere/model", output="runs/x", progress=False))
    assert not (here / "runs").exists()


def test_train_with_good_inputs_makes_the_output_folder(here: Path) -> None:
    model = save_tiny_folder(here / "model")
    trainer.train(TrainArgs(data="data.jsonl", model=str(model), output="runs/x", r=2, max_steps=1, progress=False))
    assert (here / "runs" / "x" / "adapter_model.safetensors").is_file()
