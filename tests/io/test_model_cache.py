"""The converted default-model cache is checked on each use against its manifest (sizes; SHA-256 of files written
since): a half-written or corrupted cache is said, rebuilt; two builders at once leave one whole cache. The
conversion itself is replaced by copying a tiny model folder (the real one: test_models.py, integration)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from helpers import save_tiny_folder

import lorakit.io.models as models


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """LORAKIT_CACHE in tmp_path; the 'conversion' copies a tiny model (slowly: 0.3 s) and is counted."""
    source = save_tiny_folder(tmp_path / "tiny")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    built = {"n": 0}

    def write(folder: Path) -> None:
        built["n"] += 1
        time.sleep(0.3)
        shutil.copytree(source, folder, dirs_exist_ok=True)

    monkeypatch.setattr(models, "_write_default_model", write)
    return built


def _final() -> Path:
    return models.cache_dir() / models.CACHE_SUBDIR


def _weights() -> Path:
    return next(p for p in _final().iterdir() if p.suffix == ".safetensors")


def test_a_damaged_cache_is_detected_said_and_rebuilt(cache: dict[str, int], capsys: pytest.CaptureFixture) -> None:
    assert models.default_model_path() == str(_final()) and cache["n"] == 1
    manifest = json.loads((_final() / models.MANIFEST_NAME).read_text())["files"]
    assert "config.json" in manifest and _weights().name in manifest
    good = _weights().read_bytes()
    models.default_model_path()
    assert cache["n"] == 1  # whole: used as it is

    damages = {
        "half-written": lambda: _weights().write_bytes(good[: len(good) // 2]),
        "corrupted": lambda: _weights().write_bytes(good[:-4] + bytes(4 * [good[-1] ^ 0xFF])),  # same size
        "missing": lambda: (_final() / "config.json").unlink(missing_ok=False) or (_final() / "config.json").touch(),
    }
    expected = {"half-written": "bytes, .* expected", "corrupted": "does not have its recorded SHA-256",
                "missing": "config.json is .* bytes"}  # fmt: skip
    for n, (kind, damage) in enumerate(damages.items(), start=2):
        damage()
        capsys.readouterr()
        assert models.default_model_path() == str(_final())
        err = capsys.readouterr().err
        assert cache["n"] == n, kind
        assert f"lorakit: the cached default model in {_final()} is damaged (" in err, err
        assert re.search(expected[kind], err), (kind, err)
        assert _weights().read_bytes() == good
        assert sorted(p.name for p in _final().parent.iterdir()) == [models.CACHE_SUBDIR]  # nothing set aside left


def test_a_cache_of_an_older_lorakit_is_adopted(cache: dict[str, int]) -> None:
    models.default_model_path()
    (_final() / models.MANIFEST_NAME).unlink()
    models.default_model_path()
    assert cache["n"] == 1 and (_final() / models.MANIFEST_NAME).is_file()


def test_two_builders_at_once_leave_one_whole_cache(cache: dict[str, int]) -> None:
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(models.default_model_path())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [str(_final())] * 2 and cache["n"] == 2  # both built; one published, the other discarded
    assert models._check_cache(_final()) is None
    assert sorted(p.name for p in _final().parent.iterdir()) == [models.CACHE_SUBDIR]
    # both finding the same damage at once: one rebuild wins, the cache is whole after
    _weights().write_bytes(b"x")
    threads = [threading.Thread(target=models.default_model_path) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert models._check_cache(_final()) is None and os.path.getsize(_weights()) > 1
    assert sorted(p.name for p in _final().parent.iterdir()) == [models.CACHE_SUBDIR]
