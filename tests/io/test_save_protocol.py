"""The save protocol of ``io.files.write_adapter`` under every interruption, enumerated (no timing, no processes).

A kill is simulated by fault injection: the k-th file-system step of a save (each ``os.replace``, ``os.unlink`` and
``os.fsync``: the points between which what is on disk changes) raises ``Killed``. Every k is tried, and every pair
(a save killed at k1, then another save killed at k2), over versions that differ in rank, alpha and targets; after
each, the folder must read as exactly one whole version (config and weights of the same save), the old one or the
one being written, and load with ``PeftModel.from_pretrained``. The bug of issue 17 (a journal overwritten while it
was the only record of the weights on disk) fails ``test_two_saves_killed_in_a_row_...`` at (after the weights, after
the journal).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_llama

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.adapters import state
from lorakit.config import read_config
from lorakit.io import files as lio

STEPS = ("replace", "unlink", "fsync")  # the os functions whose calls are a save's steps


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler meant for errors catches it."""


@contextlib.contextmanager
def kill_at(k: int | None) -> Iterator[list[int]]:
    """Raise Killed at the ``k``-th (0-based) step of what runs inside (never if None); yields the step count. Steps
    after the kill run normally (cleanup in ``finally`` blocks: it only removes temp files, as a reboot might not)."""
    count = [0]

    def wrap(fn: Any) -> Any:
        def step(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            if count[0] - 1 == k:
                raise Killed(f"killed before {fn.__name__}{args}")
            return fn(*args, **kwargs)

        return step

    with pytest.MonkeyPatch.context() as mp:
        for name in STEPS:
            mp.setattr(os, name, wrap(getattr(os, name)))
        yield count


Version = tuple[dict[str, Any], dict[str, torch.Tensor]]


def _version(seed: int, **config: Any) -> Version:
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **config))
    saved = LoraConfig.from_dict({**model.peft_config["default"].to_dict(), "inference_mode": True})
    return saved.to_dict(), state.adapter_state_dict(model, "default")


@pytest.fixture(scope="module")
def versions() -> dict[str, Version]:
    return {
        "0": _version(0, r=4, target_modules=["q_proj", "v_proj"]),
        "A": _version(1, r=8, lora_alpha=64, target_modules="all-linear"),
        "B": _version(2, r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"]),
    }


def _reads_as(folder: Path, versions: dict[str, Version]) -> str:
    """The name of the one version the folder holds whole (config and weights), or an AssertionError."""
    config, _ = lio.read_config_json(folder)
    tensors, _ = lio.read_weights(folder)
    for name, (v_config, v_tensors) in versions.items():
        same = tensors.keys() == v_tensors.keys() and all(torch.equal(tensors[k], v_tensors[k]) for k in v_tensors)
        if same and config == v_config:
            return name
    found = {n for n, (_, t) in versions.items() if t.keys() == tensors.keys()}
    raise AssertionError(f"{folder} is no whole version: config r={config.get('r')}, weights of {found or 'none'}")


def _save(folder: Path, version: Version, k: int | None) -> int:
    """write_adapter killed at step k (None: not killed); the number of steps it took until it ended."""
    with kill_at(k) as count:
        try:
            lio.write_adapter(folder, *version)
        except Killed:
            assert k is not None
    return count[0]


def _steps(folder: Path, version: Version, tmp: Path) -> int:
    """How many steps an uninterrupted save of ``version`` over ``folder`` takes (on a copy)."""
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    n = _save(tmp, version, None)
    shutil.rmtree(tmp)
    return n


def test_a_save_killed_at_any_step_loads_as_one_whole_version(versions: dict[str, Version], tmp_path: Path) -> None:
    start = tmp_path / "start"
    lio.write_adapter(start, *versions["0"])
    n = _steps(start, versions["B"], tmp_path / "count")
    assert n >= 7, n  # 3 temp files + 3 renames + the journal's removal, at least: the injection reaches the protocol
    seen = []
    for k in range(n + 1):
        folder = tmp_path / f"k{k}"
        shutil.copytree(start, folder)
        _save(folder, versions["B"], k)
        seen.append(_reads_as(folder, versions))
        PeftModel.from_pretrained(tiny_llama(), folder)
        lio.write_adapter(folder, *versions["A"])  # the next save completes, and leaves the two files only
        assert _reads_as(folder, versions) == "A"
        assert sorted(p.name for p in folder.iterdir()) == [lio.CONFIG_NAME, lio.WEIGHTS_NAME], k
    # old until the weights are in place, new after: never back
    assert seen[0] == "0" and seen[-1] == "B" and seen == sorted(seen, key="0B".index), seen


def test_two_saves_killed_in_a_row_load_as_one_whole_version(versions: dict[str, Version], tmp_path: Path) -> None:
    start = tmp_path / "start"
    lio.write_adapter(start, *versions["0"])
    n1 = _steps(start, versions["B"], tmp_path / "count")
    pairs, outcomes = 0, set()
    for k1 in range(n1):
        first = tmp_path / "first"
        shutil.rmtree(first, ignore_errors=True)
        shutil.copytree(start, first)
        _save(first, versions["B"], k1)
        after_first = _reads_as(first, versions)
        n2 = _steps(first, versions["A"], tmp_path / "count")
        for k2 in range(n2):
            folder = tmp_path / "second"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(first, folder)
            _save(folder, versions["A"], k2)
            found = _reads_as(folder, versions)
            assert found in (after_first, "A"), (k1, k2, after_first, found)
            outcomes.add((after_first, found))
            pairs += 1
        if k1 % 3 == 0:  # loading with the model is slower: a sample of the first saves' states
            PeftModel.from_pretrained(tiny_llama(), first)
    assert pairs >= n1 * n1 // 2 and {("0", "0"), ("0", "A"), ("B", "B"), ("B", "A")} <= outcomes, outcomes


def test_the_issue_17_sequence(versions: dict[str, Version], tmp_path: Path) -> None:
    """The reported case, by name: B killed between its weights and its config, then A killed right after its
    journal. write_adapter settles B first (writes the journal's config), so the folder reads as B."""
    folder = tmp_path / "adapter"
    lio.write_adapter(folder, *versions["0"])
    # B: after its weights are in place, before its config is (the rename of the config's temp file)
    real_replace = os.replace
    with pytest.MonkeyPatch.context() as mp:

        def replace(src: Any, dst: Any) -> None:
            if Path(dst).name == lio.CONFIG_NAME:
                raise Killed("before the config")
            real_replace(src, dst)

        mp.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            lio.write_adapter(folder, *versions["B"])
    assert _reads_as(folder, versions) == "B"
    with pytest.MonkeyPatch.context() as mp:  # A: right after its journal is in place

        def replace_then_kill(src: Any, dst: Any) -> None:
            real_replace(src, dst)
            if Path(dst).name == lio.JOURNAL_NAME:
                raise Killed("after the journal")

        mp.setattr(os, "replace", replace_then_kill)
        with pytest.raises(Killed):
            lio.write_adapter(folder, *versions["A"])
    assert _reads_as(folder, versions) == "B"
    assert read_config(folder).r == 2
    PeftModel.from_pretrained(tiny_llama(), folder)


def test_a_folder_left_by_the_old_protocol_reads_the_same(versions: dict[str, Version], tmp_path: Path) -> None:
    """Written by hand as lorakit <= round 2 left it after a kill between the weights and the config: the old
    config, the new weights, the journal naming them. It reads as the new version, and a new save keeps it so."""
    folder = tmp_path / "old"
    lio.write_adapter(folder, *versions["0"])
    data = lio._safetensors_bytes(versions["B"][1])
    journal = {"config": versions["B"][0], "weights_sha256": hashlib.sha256(data).hexdigest()}
    (folder / lio.JOURNAL_NAME).write_text(json.dumps(journal))
    (folder / lio.WEIGHTS_NAME).write_bytes(data)
    assert _reads_as(folder, versions) == "B"
    for k in range(_steps(folder, versions["A"], tmp_path / "count")):
        copy = tmp_path / f"k{k}"
        shutil.copytree(folder, copy)
        _save(copy, versions["A"], k)
        assert _reads_as(copy, versions) in ("B", "A"), k


@pytest.mark.parametrize("start_safe, new_safe", [(True, False), (False, True)], ids=["to_bin", "to_safetensors"])
def test_a_format_switch_killed_at_any_step_loads_as_one_whole_version(
    versions: dict[str, Version], tmp_path: Path, start_safe: bool, new_safe: bool
) -> None:
    """safe_serialization=False writes adapter_model.bin; a save in the other format removes the old file (step 4b),
    so that the folder never reads as the new config with the old format's weights."""
    start = tmp_path / "start"
    lio.write_adapter(start, *versions["0"], safe_serialization=start_safe)

    def save(folder: Path, k: int | None) -> int:
        with kill_at(k) as count:
            try:
                lio.write_adapter(folder, *versions["B"], safe_serialization=new_safe)
            except Killed:
                assert k is not None
        return count[0]

    shutil.copytree(start, tmp_path / "count")
    n = save(tmp_path / "count", None)
    new_file = lio.WEIGHTS_NAME if new_safe else lio.LEGACY_WEIGHTS_NAME
    assert sorted(p.name for p in (tmp_path / "count").iterdir()) == sorted([lio.CONFIG_NAME, new_file])
    seen = []
    for k in range(n + 1):
        folder = tmp_path / f"k{k}"
        shutil.copytree(start, folder)
        save(folder, k)
        seen.append(_reads_as(folder, versions))
        lio.write_adapter(folder, *versions["A"])  # the next save settles and completes: two files
        assert _reads_as(folder, versions) == "A"
        assert sorted(p.name for p in folder.iterdir()) == [lio.CONFIG_NAME, lio.WEIGHTS_NAME], k
    assert seen[0] == "0" and seen[-1] == "B" and seen == sorted(seen, key="0B".index), seen
