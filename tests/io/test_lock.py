"""One writer per folder (``io.lock.folder_lock``): a second process stops at once with an error naming the holder;
a lock left by a process that died is taken over; nothing of the first writer's is touched; training holds the lock
of its --output for the whole run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_folder
from safetensors.torch import load_file

from lorakit.io import files as lio
from lorakit.io import lock

HOLD = """
import sys, time
from pathlib import Path
from lorakit.io import lock
with lock.folder_lock(sys.argv[1], "holder test"):
    Path(sys.argv[2]).touch()
    time.sleep(float(sys.argv[3]))
"""
DIE_HOLDING = """
import os, sys
from lorakit.io import lock
held = lock.folder_lock(sys.argv[1], "dies holding it")
held.__enter__()
os._exit(9)  # as kill -9: no cleanup, the lock file stays
"""
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LORAKIT_DEBUG": ""}


def _holder(folder: Path, tmp_path: Path, seconds: float = 60) -> subprocess.Popen:
    ready = tmp_path / "holding"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(ready), str(seconds)], env=ENV)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), "the holder did not start"
    return proc


def _adapter(seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    return {"r": 2, "peft_type": "LORA"}, {"m.lora_A.weight": torch.randn(2, 4), "m.lora_B.weight": torch.randn(4, 2)}


def test_a_second_writer_stops_at_once_naming_the_holder(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    lio.write_adapter(folder, *_adapter(0))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    holder = _holder(folder, tmp_path)
    try:
        tic = time.perf_counter()
        with pytest.raises(
            lock.FolderLockedError, match=rf"{folder} is in use by process {holder.pid} on .*holder test"
        ):
            lio.write_adapter(folder, *_adapter(1))
        assert time.perf_counter() - tic < 2  # at once, not after a wait
        with pytest.raises(lock.FolderLockedError, match=str(holder.pid)):
            lio.write_config_json(folder, {"r": 8})
        now = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != lock.LOCK_NAME}
        assert now == before
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "adapter"
    dead = subprocess.run([sys.executable, "-c", DIE_HOLDING, str(folder)], env=ENV, timeout=60)
    assert dead.returncode == 9
    left = json.loads((folder / lock.LOCK_NAME).read_text())
    assert left["command"] == "dies holding it"
    lio.write_adapter(folder, *_adapter(0))  # no error: the dead process's flock went with it
    assert f"process {left['pid']}" in caplog.text and "no longer running" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == [lio.CONFIG_NAME, lio.WEIGHTS_NAME]  # the lock file removed


def test_the_lock_is_reentrant_and_leaves_no_folder_it_made(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    with lock.folder_lock(folder):
        with lock.folder_lock(folder):  # the same process: e.g. train holding --output, then save_pretrained into it
            assert (folder / lock.LOCK_NAME).is_file()
        assert (folder / lock.LOCK_NAME).is_file()
    assert not (tmp_path / "a").exists()


def _train(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lorakit.cli", "train", "--model", str(model), "--data", str(data), "--output",
            str(output), "--r", "4", "--max-steps", "5000", "--batch-size", "2", "--save-steps", "5",
            "--no-progress", *extra]  # fmt: skip


def test_two_trainings_on_one_output(tmp_path: Path) -> None:
    """The second `lorakit train` (even with --overwrite) stops at once naming the first, whose checkpoints and
    metrics it leaves alone; after the first is killed (-9), a new run takes the lock over."""
    model = save_tiny_folder(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"a b {i}", "completion": "hello world"}) + "\n" for i in range(8)))
    output = tmp_path / "run"
    first = subprocess.Popen(_train(model, data, output), env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (output / "checkpoints").is_dir() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        tic = time.perf_counter()
        second = subprocess.run(_train(model, data, output, "--overwrite"), env=ENV, capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        took = time.perf_counter() - tic
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"lorakit: error: {output} is in use by process {first.pid} "), line
        assert "lorakit train" in line and took < 60  # before any model load (the import of torch: a few s)
        assert first.poll() is None and (output / "checkpoints").is_dir() and (output / "metrics.jsonl").is_file()
    finally:
        first.kill()
        first.wait()
    assert (output / lock.LOCK_NAME).is_file()  # left by the killed run
    third = subprocess.run(_train(model, data, output, "--overwrite", "--max-steps", "3"), env=ENV, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert third.returncode == 0, third.stderr
    assert "no longer running" in third.stderr
    assert not (output / lock.LOCK_NAME).exists() and load_file(output / lio.WEIGHTS_NAME)
