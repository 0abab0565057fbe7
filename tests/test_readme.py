"""The README's PEFT-workflow example runs as printed: on a tiny llama standing in for the cached default model, and
(integration) on the real bundled SmolLM2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import save_tiny_folder

from lorakit.io import models

README = Path(__file__).resolve().parents[1] / "README.md"


def peft_workflow_block() -> str:
    section = README.read_text().split("## The PEFT workflow, unchanged", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def run_block(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(peft_workflow_block(), "README.md (The PEFT workflow)", "exec"), namespace)
    return namespace


def test_the_block_is_the_one_that_loads_the_default_model() -> None:
    block = peft_workflow_block()
    assert "base_model, tokenizer = lorakit.load_default_model()" in block
    assert "from lorakit import AutoPeftModelForCausalLM" in block


def test_peft_workflow_runs_as_printed_on_a_stand_in_default_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    save_tiny_folder(tmp_path / "cache" / models.CACHE_SUBDIR)  # what the first use would have converted
    monkeypatch.setattr(models, "_write_default_model", lambda folder: pytest.fail("converted"))
    (tmp_path / "work").mkdir()
    namespace = run_block(tmp_path / "work", monkeypatch)
    assert "trainable params:" in capsys.readouterr().out
    config = json.loads((tmp_path / "work" / "my-adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == models.DEFAULT_MODEL  # the public name, not the cache path
    assert type(namespace["plain"]).__name__ == "LlamaForCausalLM"


@pytest.mark.integration
def test_peft_workflow_runs_as_printed_on_the_bundled_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace = run_block(tmp_path, monkeypatch)
    assert "trainable params:" in capsys.readouterr().out
    config = json.loads((tmp_path / "my-adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert namespace["base_logits"].shape[-1] == namespace["tokenizer"].vocab_size
