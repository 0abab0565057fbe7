"""An Arrow router adapter (arrow_config) is refused by every exporter, before anything is written: its own A and B
are unused (it mixes the model's task adapters per token), so no engine file and no merged model computes it."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import save_tiny_adapter, save_tiny_folder

from lorakit import ArrowConfig
from lorakit.export.gguf_adapter import export_gguf_adapter
from lorakit.export.gguf_merged import export_merged_gguf
from lorakit.export.merged import merge_adapter_to_folder
from lorakit.export.problems import ExportError
from lorakit.export.vllm import export_vllm

RULE = "an Arrow router adapter \\(arrow_config\\) mixes its model's task adapters per token"
FIX = "serve it with lorakit or PEFT \\(create_arrow_model\\), or export each task adapter by itself"


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    base = save_tiny_folder(tmp_path / "base")
    return save_tiny_adapter(base, tmp_path / "adapter", task_type="CAUSAL_LM", arrow_config=ArrowConfig(top_k=1))


@pytest.mark.parametrize(
    "export",
    [
        lambda a, out: export_gguf_adapter(a, out / "a.gguf"),
        lambda a, out: export_merged_gguf(a, out / "m.gguf"),
        lambda a, out: merge_adapter_to_folder(a, out / "merged"),
        lambda a, out: export_vllm(a, out / "vllm"),
    ],
    ids=["gguf-adapter", "merged-gguf", "merged", "vllm"],
)
def test_every_exporter_refuses_an_arrow_router_and_writes_nothing(adapter: Path, tmp_path: Path, export):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match=rf"{RULE}.*; fix: {FIX}"):
        export(adapter, out)
    assert not list(out.iterdir())
