"""SIGTERM / SIGINT during training: the step in progress finishes, a checkpoint is written, the exit code is
128 + the signal, one line names the checkpoint and the exact --resume command, and that command ends with the
adapter of an uninterrupted run; a second signal stops at once, the older checkpoints whole."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import WORDS, save_tiny_folder
from safetensors.torch import load_file

import lorakit.training.trainer as trainer
from lorakit.training import checkpoint
from lorakit.training.args import TrainArgs
from lorakit.training.interrupt import RunInterrupted, command

STEPS = 120


def _data(path: Path, n: int = 48) -> Path:
    rows = [{"prompt": " ".join(WORDS[(i + j) % 8] for j in range(2 + i % 5)), "completion": f"{WORDS[i % 8]} hello"}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("interrupt")
    return save_tiny_folder(root / "model"), _data(root / "train.jsonl")


def _argv(inputs: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    model, data = inputs
    return ["train", "--model", str(model), "--data", str(data), "--output", str(output), "--r", "4", "--alpha", "8",
            "--dropout", "0.1", "--batch-size", "4", "--max-steps", str(STEPS), "--lr", "5e-3", "--seed", "3",
            "--no-progress", *extra]  # fmt: skip


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LORAKIT_DEBUG": ""}


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorakit.cli", *argv], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _steps_logged(output: Path) -> int:
    try:
        return sum('"loss"' in line for line in (output / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _signal_mid_run(proc: subprocess.Popen, output: Path, sig: int, after_steps: int = 5) -> tuple[int, str]:
    deadline = time.monotonic() + 240
    while _steps_logged(output) < after_steps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_the_printed_resume_command_ends_as_an_uninterrupted_run(
    inputs: tuple[Path, Path], tmp_path: Path, sig: int
) -> None:
    reference = _start(_argv(inputs, tmp_path / "reference"), tmp_path)  # alongside: 2 cores
    run = tmp_path / "run"
    code, err = _signal_mid_run(_start(_argv(inputs, run, "--save-steps", "1000"), tmp_path), run, sig)
    assert code == 128 + sig, err
    lines = [line for line in err.splitlines() if line.startswith("lorakit")]  # not transformers' loading bars
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert lines[0].startswith(f"lorakit: interrupted by {signal.Signals(sig).name} after step "), err
    kept = checkpoint.latest_checkpoint(run)
    assert kept is not None and f"checkpoint kept: {kept};" in lines[0], err
    step = int(kept.name.removeprefix("step-"))
    assert 5 <= step < STEPS and f"after step {step} of {STEPS};" in lines[0]
    resume = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert resume[:2] == ["lorakit", "train"] and resume[-1] == "--resume", resume

    resumed = subprocess.run([sys.executable, "-m", "lorakit.cli", *resume[1:]], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=300) == 0, reference.communicate()
    want, got = (
        load_file(tmp_path / "reference" / "adapter_model.safetensors"),
        load_file(run / "adapter_model.safetensors"),
    )
    assert want.keys() == got.keys() and any(v.abs().sum() > 0 for k, v in want.items() if "lora_B" in k)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)


def _args(inputs: tuple[Path, Path], output: Path, **kw: Any) -> TrainArgs:
    model, data = inputs
    options = dict(model=str(model), data=str(data), output=str(output), r=4, alpha=8, batch_size=4, max_steps=8,
                   lr=5e-3, seed=3, progress=False)  # fmt: skip
    return TrainArgs(**{**options, **kw})


def test_first_signal_finishes_the_step_second_stops_at_once(
    inputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (lorakit.train): signals sent from inside a step's forward. One signal in step 3: step 3 ends, a
    checkpoint of it is written, RunInterrupted(143). Two signals in step 6: it stops inside step 6, no checkpoint
    of it; the one of step 4 (--save-steps 2) is whole and is the one named."""
    real = trainer.lm_loss_sum
    plan: dict[int, list[int]] = {}
    seen = {"step": 0}

    def loss(model: Any, batch: Any) -> Any:
        out = real(model, batch)
        for sig in plan.pop(seen["step"], []):
            os.kill(os.getpid(), sig)
        return out

    real_step = trainer.train_step

    def step(run: Any, k: int) -> Any:
        seen["step"] = k + 1
        result = real_step(run, k)
        seen["done"] = k + 1
        return result

    monkeypatch.setattr(trainer, "lm_loss_sum", loss)
    monkeypatch.setattr(trainer, "train_step", step)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    plan[3] = [signal.SIGTERM]
    with pytest.raises(RunInterrupted, match=r"interrupted by SIGTERM after step 3 of 8; checkpoint kept: ") as info:
        trainer.train(_args(inputs, tmp_path / "one"))
    assert info.value.exit_code == 143 and seen["done"] == 3
    assert info.value.checkpoint == checkpoint.checkpoint_path(tmp_path / "one", 3)
    assert torch.load(info.value.checkpoint / checkpoint.STATE_NAME, weights_only=True)["step"] == 3
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers given back

    plan.clear()
    plan[6] = [signal.SIGINT, signal.SIGINT]
    with pytest.raises(RunInterrupted, match=r"interrupted by SIGINT twice: stopped at once, in step 6 of 8") as info:
        trainer.train(_args(inputs, tmp_path / "two", save_steps=2))
    assert info.value.exit_code == 130 and seen["done"] == 5  # step 6 never finished
    assert info.value.checkpoint == checkpoint.checkpoint_path(tmp_path / "two", 4)
    assert checkpoint.latest_checkpoint(tmp_path / "two") == info.value.checkpoint
    assert f"resume with: {command(_args(inputs, tmp_path / 'two', save_steps=2), '--resume')}" in str(info.value)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    # and the resume from that checkpoint runs to the end
    plan.clear()
    assert trainer.train(_args(inputs, tmp_path / "two", save_steps=2, resume=True))["resumed_from"] == 4


def test_the_command_holds_every_option_that_differs_from_its_default() -> None:
    args = TrainArgs(data="d a.jsonl", output="runs/x", r=4, packing=True, padding_free=False, overwrite=True)
    assert command(args, "--resume") == (
        "lorakit train --data 'd a.jsonl' --output runs/x --r 4 --packing --no-padding-free --resume"
    )
