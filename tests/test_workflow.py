"""The seed workflow of the README (examples/seed_workflow.py) runs end to end and its numbers hold."""

import importlib.util
import math
from pathlib import Path

import pytest


@pytest.mark.slow
def test_seed_workflow_example(tmp_path, capsys):
    path = Path(__file__).parents[1] / "examples" / "seed_workflow.py"
    spec = importlib.util.spec_from_file_location("seed_workflow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(tmp_path)
    out = capsys.readouterr().out
    assert "trainable params: 4,096 || all params: 112,384 || trainable%: 3.6446" in out
    assert math.isfinite(result["train_loss"]) and len(result["generated"]) == 10
    assert result["merged_diff"] < 1e-5 and result["avg_diff"] < 1e-5 and result["unload_diff"] < 1e-5
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 50_000
