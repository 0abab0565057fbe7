"""lorakit.cli run as a user runs it, in a subprocess from a fresh folder: what it prints, its exit code, which
heavy modules it imported (``python -X importtime``) and that a failed run leaves nothing on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers")


@dataclass
class Result:
    code: int
    out: str
    err: str  # stderr without the importtime lines
    modules: set[str]  # every module the process imported

    def heavy(self) -> set[str]:
        return {m for m in self.modules if m.split(".")[0] in HEAVY}


def lorakit(cwd: Path, *argv: str) -> Result:
    """``python -X importtime -m lorakit.cli ARGV`` in ``cwd``, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAKIT_DEBUG": ""}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lorakit.cli", *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    times = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    err = "".join(line + "\n" for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    modules = {line.rsplit("|", 1)[-1].strip() for line in times}
    return Result(proc.returncode, proc.stdout, err, modules)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def here(tmp_path: Path) -> Path:
    """A user's folder holding one good data file."""
    record = {"prompt": "2 + 4 =", "completion": " 6"}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (tmp_path / "adapter").mkdir()  # an adapter folder as far as the torch-free checks look (it is a folder)
    return tmp_path


def test_the_importtime_reader_sees_torch_when_it_is_imported(here: Path) -> None:
    """The check below can fail: a command that does load the model stack shows torch in the import list."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], cwd=here, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0
    assert any(line.rsplit("|", 1)[-1].strip() == "torch" for line in proc.stderr.splitlines())


HELP = [["--help"], ["train", "--help"], ["generate", "--help"], ["eval", "--help"], ["merge", "--help"],
        ["export", "--help"], ["info", "--help"], ["demo", "--help"], ["--version"]]  # fmt: skip


@pytest.mark.parametrize("argv", HELP)
def test_help_answers_without_torch_or_transformers(here: Path, argv: list[str]) -> None:
    before = tree(here)
    r = lorakit(here, *argv)
    assert r.code == 0, r.err
    assert r.out.startswith("usage: lorakit") or r.out.startswith("lorakit ")
    assert r.heavy() == set(), sorted(r.heavy())[:5]
    assert tree(here) == before


def test_train_help_lists_every_train_option(here: Path) -> None:
    r = lorakit(here, "train", "--help")
    for flag in ("--data", "--output", "--r", "--alpha", "--targets", "--lr", "--resume", "--quantize"):
        assert flag in r.out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
        (["train", "--data", "data.jsonl", "--r", "0"], "--r: r=0 must be a positive integer rank"),
        (["train", "--data", "data.jsonl", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["train", "--data", "data.jsonl", "--config", "run.yaml"], "config file 'run.yaml' does not exist"),
        (["eval", "--data", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
        (["generate"], "no prompt given"),
        (["generate", "--adapter", "runs/none", "hi"], "adapter folder 'runs/none' does not exist"),
        (["eval", "--data", "data.jsonl", "--adapter", "runs/none"], "adapter folder 'runs/none' does not exist"),
        (["merge", "--adapter", "runs/none", "--output", "merged"], "adapter folder 'runs/none' does not exist"),
        (["info", "runs/none"], "adapter folder 'runs/none' does not exist"),
        (["export", "runs/none", "--to", "gguf"], "adapter folder 'runs/none' does not exist"),
        (["generate", "--prompts-file", "missing.txt"], "prompts file 'missing.txt' does not exist"),
        (["generate", "--prompts-file", "bad.jsonl"], "prompts file 'bad.jsonl' line 1: expected an object with"),
        (["merge", "--adapter", "adapter", "--output", "data.jsonl"], "output 'data.jsonl' is a file"),
        (["export", "adapter", "--to", "gguf", "--output", "data.jsonl"], "already exists; pass another path"),
        (["export", "adapter", "--to", "vllm", "--output", "data.jsonl"], "output 'data.jsonl' is a file"),
        (["train", "--data", "bad.jsonl", "--output", "out"], "row 1 is in no known format"),
        (["train", "--data", "data.jsonl", "--eval-data", "missing.jsonl", "--output", "out"], "does not exist"),
        (["train", "--data", "data.jsonl", "--eval-data", "data.jsonl", "--eval-fraction", "0.1"], "pass one of them"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["train", "--data", "data.jsonl", "--outptu", "runs/x"], "unrecognized arguments: --outptu runs/x; "
         "did you mean --output? (see `lorakit train --help`)"),
        (["train", "--data", "data.jsonl", "--learning-rate", "1e-3"], "--learning-rate 1e-3; did you mean --lr?"),
        (["train", "--data", "data.jsonl", "--lora-r", "8"], "did you mean --r?"),
        (["train", "--data", "data.jsonl", "--fsdp"], "--fsdp shards the base model across torchrun processes"),
        (["eval", "--data", "data.jsonl", "--max-new-tokns", "8"], "did you mean --max-new-tokens?"),
    ],
)
def test_argument_errors_and_input_checks_answer_without_torch(here: Path, argv: list[str], message: str) -> None:
    before = tree(here)
    r = lorakit(here, *argv)
    assert r.code == 2, r.err
    assert r.err.startswith("lorakit: error: ") and r.err.count("\n") == 1, r.err
    assert message in r.err
    assert r.out == ""
    assert r.heavy() == set(), sorted(r.heavy())[:5]
    assert tree(here) == before


def test_a_train_whose_model_is_missing_leaves_no_output_folder(here: Path) -> None:
    """Past the torch-free checks: the model is looked for before --output is made."""
    before = tree(here)
    r = lorakit(here, "train", "--data", "data.jsonl", "--model", "./no/model", "--output", "out")
    assert r.code == 2
    assert r.err.splitlines()[-1] == (
        "lorakit: error: model folder './no/model' does not exist; pass an existing folder or a hub id"
    )
    assert tree(here) == before
