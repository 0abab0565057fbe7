"""How fast the ``lorakit`` command answers when it needs no model: ``lorakit --help`` and a train run whose data
file is missing (an input check). Each is run a few times in a fresh process from an empty temp folder; prints the
median and the range of the wall times, and whether torch was imported (it should not be).

    .venv/bin/python benchmarks/startup.py [--runs 7]

The goal (issue 18): under 1 s each on this project's 2-core machine when it is quiet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "lorakit --help": ["--help"],
    "lorakit train --data missing.jsonl": ["train", "--data", "missing.jsonl"],
}


def lorakit_exe() -> list[str]:
    """The installed ``lorakit`` script next to this Python (what a user runs), else ``python -m lorakit.cli``."""
    script = Path(sys.executable).with_name("lorakit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lorakit.cli"]


def time_once(argv: list[str], cwd: str) -> tuple[float, int, bool]:
    """(wall seconds, exit code, torch imported?) of one run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPROFILEIMPORTTIME": ""}
    start = time.perf_counter()
    proc = subprocess.run([*lorakit_exe(), *argv], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    probe = subprocess.run([sys.executable, "-X", "importtime", "-m", "lorakit.cli", *argv], cwd=cwd, env=env,
                           capture_output=True, text=True)  # fmt: skip
    torch = any(line.rsplit("|", 1)[-1].strip() == "torch" for line in probe.stderr.splitlines())
    return wall, proc.returncode, torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="Runs per command (default: 7).")
    runs = parser.parse_args().runs
    print(f"{'command':<40} {'median s':>9} {'min s':>7} {'max s':>7}  exit  torch imported")
    with tempfile.TemporaryDirectory() as cwd:
        for name, argv in COMMANDS.items():
            results = [time_once(argv, cwd) for _ in range(runs)]
            walls = [w for w, _, _ in results]
            codes = sorted({c for _, c, _ in results})
            torch = any(t for _, _, t in results)
            print(f"{name:<40} {statistics.median(walls):>9.3f} {min(walls):>7.3f} {max(walls):>7.3f}  "
                  f"{','.join(map(str, codes)):<4}  {'yes' if torch else 'no'}")  # fmt: skip
    print(f"({runs} runs each, {os.cpu_count()} CPUs; 1-min load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
