"""PEFT's tests, downloaded once: the sdist by pip into the cache, its tests/ and pytest config extracted beside it.

The cache is ``$LORAKIT_CACHE/peft-suite/<version>`` (``~/.cache/lorakit`` without it). PEFT's tests also import a
few packages lorakit does not need (diffusers, parameterized, scipy; attrs for PEFT itself); they are installed there
too, without their dependencies (which the project's environment has), and put on PYTHONPATH for the suite's runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

TEST_ONLY_PACKAGES = ["attrs", "diffusers", "parameterized", "scipy", "importlib_metadata", "zipp"]


def cache_dir(version: str) -> Path:
    root = Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit").expanduser()
    return root / "peft-suite" / version


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def fetch(version: str) -> tuple[Path, Path]:
    """(the extracted source folder holding tests/ and pyproject.toml, the folder of test-only packages)."""
    cache = cache_dir(version)
    source = cache / f"peft-{version}"
    if not (source / "tests").is_dir():
        sdist = cache / f"peft-{version}.tar.gz"
        if not sdist.exists():
            print(f"peft-suite: downloading the sdist of peft=={version} ...", file=sys.stderr)
            _pip("download", "--no-deps", "--no-binary", ":all:", f"peft=={version}", "-d", str(cache))
        wanted = (f"peft-{version}/tests/", f"peft-{version}/pyproject.toml")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(wanted) and (m.isfile() or m.isdir())]
            tar.extractall(cache, members=members, filter="data")
        (source / "tests" / "__init__.py").touch()  # the tests import each other relatively, as a package
    deps = cache / "test-deps"
    if not (deps / ".complete").exists():
        print(f"peft-suite: installing PEFT's test-only packages into {deps} ...", file=sys.stderr)
        _pip("install", "--no-deps", "--target", str(deps), *TEST_ONLY_PACKAGES)
        (deps / ".complete").touch()
    return source, deps
