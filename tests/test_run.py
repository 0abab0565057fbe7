"""The ``run`` script: ``./run lorakit ...`` takes paths from where the user stands, and the demo's closing lines
are commands that work as printed (run here in bash, from the folder the demo ran in)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import save_tiny_adapter, save_tiny_folder

import lorakit.commands.demo as demo
from lorakit.cli import main

RUN = Path(__file__).resolve().parents[1] / "run"


def bash(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_RUN"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def stand(tmp_path: Path) -> Path:
    """A user's folder outside the repository, holding seed/adapter (a tiny adapter on seed/base)."""
    save_tiny_adapter(save_tiny_folder(tmp_path / "seed" / "base"), tmp_path / "seed" / "adapter")
    return tmp_path


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_run_lorakit_resolves_paths_from_where_the_user_stands(stand: Path) -> None:
    before = tree(stand)
    done = bash(f"{RUN} lorakit info seed/adapter", stand)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("adapter         seed/adapter\n")
    assert tree(stand) == before


def test_the_demo_closing_lines_work_as_printed(
    stand: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake_run(output: str, *args: Any) -> dict[str, Any]:  # the trained adapter: seed/adapter, as runs/demo/...
        (stand / output).mkdir(parents=True)
        os.replace(stand / "seed" / "adapter", stand / output / "adapter")
        (stand / output / "test.jsonl").write_text('{"prompt": "what is two plus four", "completion": "six"}\n')
        return {"accuracy_before": 0.0, "accuracy_after": 1.0, "total_wall_time_s": 1.0,
                "adapter": f"{output}/adapter", "plot": f"{output}/adapter/loss.png"}  # fmt: skip

    monkeypatch.chdir(stand)
    monkeypatch.setattr(demo, "run", fake_run)
    monkeypatch.setenv("LORAKIT_RUN", str(RUN))  # what `run demo` exports
    capsys.readouterr()
    assert main(["demo", "--output", "runs/demo"]) == 0
    out = capsys.readouterr().out
    commands = [line.strip() for line in out.split("try it:", 1)[1].splitlines()]  # the last three lines
    assert [c.split()[:3] for c in commands] == [[str(RUN), "lorakit", verb] for verb in ("generate", "eval", "info")]
    assert commands[0].endswith(f"--adapter runs/demo/adapter $'{demo.INSTRUCTION}\\nDate: July 4, 1976'")
    for command in commands:
        done = bash(command, stand)
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.strip(), command


def test_demo_suggests_the_script_that_ran_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_RUN", "../my clone/run")
    assert demo.cli_command() == "'../my clone/run' lorakit"
    monkeypatch.delenv("LORAKIT_RUN")
    monkeypatch.setattr("sys.argv", [".venv/bin/lorakit", "demo"])
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert demo.cli_command() == ".venv/bin/lorakit"
    monkeypatch.setattr("shutil.which", lambda name: os.path.abspath(".venv/bin/lorakit"))
    assert demo.cli_command() == "lorakit"
