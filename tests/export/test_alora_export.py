"""An aLoRA adapter (alora_invocation_tokens) is refused by every exporter, before anything is written: no llama.cpp
file, no vLLM folder and no merged model keeps "the update from the invocation tokens on" (it would apply to every
token, or, merged, cannot be computed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import save_tiny_adapter, save_tiny_folder

from lorakit.export.gguf_adapter import export_gguf_adapter
from lorakit.export.gguf_merged import export_merged_gguf
from lorakit.export.merged import merge_adapter_to_folder
from lorakit.export.problems import ExportError
from lorakit.export.vllm import export_vllm

FIX = "serve it unmerged with lorakit or PEFT"


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    base = save_tiny_folder(tmp_path / "base")
    return save_tiny_adapter(base, tmp_path / "adapter", task_type="CAUSAL_LM", alora_invocation_tokens=[7, 8])


@pytest.mark.parametrize(
    "export, rule",
    [
        (lambda a, out: export_gguf_adapter(a, out / "a.gguf"), "into no llama.cpp file"),
        (lambda a, out: export_merged_gguf(a, out / "m.gguf"), "no merged weight computes it"),
        (lambda a, out: merge_adapter_to_folder(a, out / "merged"), "no merged weight computes it"),
        (lambda a, out: export_vllm(a, out / "vllm"), "lorakit exports no Activated LoRA"),
    ],
    ids=["gguf-adapter", "merged-gguf", "merged", "vllm"],
)
def test_every_exporter_refuses_an_alora_adapter_and_writes_nothing(adapter: Path, tmp_path: Path, export, rule):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match=rf"alora_invocation_tokens.*{rule}.*; fix: {FIX}|{rule}.*; fix: {FIX}"):
        export(adapter, out)
    assert not list(out.iterdir())
