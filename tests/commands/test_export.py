"""commands.export and ``lorakit export`` / ``lorakit info``'s engines: each target written where it should be, the
serve lines, and a rejected adapter as one error line naming the fix."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from helpers import save_tiny_adapter, save_tiny_folder

from lorakit.cli import main
from lorakit.commands.export import default_output, engine_lines, export_adapter


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return save_tiny_adapter(save_tiny_folder(tmp_path / "base"), tmp_path / "run" / "adapter")


def test_default_outputs_sit_beside_the_adapter(adapter: Path) -> None:
    run = adapter.parent.resolve()
    assert default_output(adapter, "gguf") == run / "adapter.gguf"
    assert default_output(adapter, "vllm") == run / "adapter-vllm"
    assert default_output(adapter, "merged-gguf") == run / "adapter-merged.gguf"


def test_cli_export_gguf_writes_the_file_and_prints_how_to_serve(
    adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(adapter), "--to", "gguf", "--outtype", "f16"]) == 0
    out = capsys.readouterr().out
    written = adapter.parent / "adapter.gguf"
    assert f"exported for gguf: {written.resolve()}" in out
    assert "llama-cli -m BASE.gguf --lora" in out and "ADAPTER" in out and "convert_hf_to_gguf" in out
    tensors = gguf.GGUFReader(written).tensors
    assert tensors and all(t.tensor_type == gguf.GGMLQuantizationType.F16 for t in tensors)
    assert main(["export", str(adapter), "--to", "gguf"]) == 2  # exists: --overwrite needed
    assert "--overwrite" in capsys.readouterr().err


def test_cli_export_rejected_adapter_is_one_error_line_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = save_tiny_adapter(save_tiny_folder(tmp_path / "base"), tmp_path / "dora", use_dora=True)
    assert main(["export", str(adapter), "--to", "gguf"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # the lines before: transformers saving the tiny base
    assert err.startswith("lorakit: error: cannot export") and "DoRA" in err and "--to merged-gguf" in err
    assert not (tmp_path / "dora.gguf").exists()


def test_outtype_is_refused_where_it_does_not_apply(adapter: Path) -> None:
    with pytest.raises(ValueError, match="--outtype applies to"):
        export_adapter(adapter, "vllm", outtype="f16")


def test_export_merged_is_the_merge_command(adapter: Path) -> None:
    done = export_adapter(adapter, "merged")
    assert (done.output / "config.json").is_file() and done.output == adapter.parent.resolve() / "adapter-merged"
    assert any("from_pretrained" in line for line in done.serve)


def test_info_says_which_engines_take_the_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = save_tiny_folder(tmp_path / "base")
    plain = save_tiny_adapter(base, tmp_path / "plain")
    dora = save_tiny_adapter(base, tmp_path / "dora", use_dora=True)
    assert engine_lines(plain)[:2] == ["vLLM (--to vllm): yes", "llama.cpp / Ollama LoRA (--to gguf): yes"]
    lines = engine_lines(dora)
    assert lines[0] == "vLLM (--to vllm): no" and "DoRA" in lines[1] and "--to merged" in lines[1]
    assert "llama.cpp / Ollama LoRA (--to gguf): no" in lines and "--base-gguf" in lines[-2]
    assert main(["info", str(dora)]) == 0
    out = capsys.readouterr().out
    assert "engines         vLLM (--to vllm): no" in out and out.index("engines") < out.index("(per-module")
