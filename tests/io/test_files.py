"""Adapter files: PEFT layout, save -> load equality, atomic writes, and clear errors for bad files."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers import input_ids, tiny_llama
from safetensors.torch import load_file

from lorakit import AdapterFileError, LoraConfig, PeftModel, get_peft_model
from lorakit.io import files as lio
from lorakit.io import writes


def _adapted(target_modules=("q_proj", "v_proj"), **kw):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), init_lora_weights=False, **kw)
    return get_peft_model(tiny_llama(), config)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def test_save_writes_peft_layout_and_reload_is_equal(tmp_path):
    model = _adapted(target_modules=["q_proj", "v_proj", "embed_tokens"])
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    assert not any(".default" in k or "base_layer" in k for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["inference_mode"] is True
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_named_adapters_go_to_subfolders_and_load_adapter(tmp_path):
    model = _adapted()
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    model.set_adapter("second")
    expect = _logits(model)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    loaded.set_adapter("second")
    torch.testing.assert_close(_logits(loaded), expect, atol=1e-6, rtol=0)
    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["second"])
    assert not (only / "adapter_config.json").exists() and (only / "second" / "adapter_config.json").exists()


def test_bias_lora_only_saves_wrapped_biases(tmp_path):
    from helpers import tiny_gpt2

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only"))
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {k for k in keys if k.endswith("bias")} == {
        f"base_model.model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)
    }


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    writes.atomic_write_bytes(target, b"old")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        writes.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nope")
    with pytest.raises(AdapterFileError, match="adapter_config.json does not exist"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"r": -1}', '{"peft_type": "PREFIX_TUNING"}'])
def test_invalid_config_names_the_file(tmp_path, text):
    _adapted().save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_truncated_weights_name_the_file(tmp_path):
    _adapted().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is corrupt or truncated"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_adapter_for_other_shapes_names_module_and_both_shapes(tmp_path):
    from helpers import _build, _llama_config
    from transformers import LlamaForCausalLM

    _adapted().save_pretrained(tmp_path)
    wider = _build(LlamaForCausalLM, _llama_config(hidden_size=48, num_attention_heads=4), 0)
    with pytest.raises(AdapterFileError, match=r"module 'model.layers.0.self_attn.q_proj' expects 'lora_A.weight' "
                                               r"of shape \(4, 48\).*holds \(4, 32\)"):
        PeftModel.from_pretrained(wider, tmp_path)


def test_adapter_for_other_targets_is_reported(tmp_path):
    _adapted(target_modules=["q_proj"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "k_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="lacks .* adapter tensors"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_legacy_bin_is_loaded_without_running_code(tmp_path):
    model = _adapted()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=0)

    marker = tmp_path / "pwned"
    with open(tmp_path / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Payload(str(marker))}, f)
    with pytest.raises(AdapterFileError, match="never code"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(str(marker))))  # the payload is live: plain pickle would run it
    assert marker.exists()


def test_unknown_config_keys_load_with_a_warning(tmp_path):
    _adapted().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["brand_new_option"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="brand_new_option"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_file_key_strips_adapter_name_only_at_its_place():
    assert lio.file_key("a.default.q.lora_A.default.weight", "default") == "a.default.q.lora_A.weight"
    assert lio.file_key("m.embed.lora_embedding_A.default", "default") == "m.embed.lora_embedding_A"
    assert lio.file_key("m.score.modules_to_save.default.weight", "default") == "m.score.weight"


def test_file_key_of_dora_magnitude_drops_name_and_weight():
    """PEFT's file keeps the magnitude's old key: 'lora_magnitude_vector.<name>.weight' -> 'lora_magnitude_vector'."""
    assert lio.file_key("m.q.lora_magnitude_vector.default.weight", "default") == "m.q.lora_magnitude_vector"
    assert lio.file_key("m.q.lora_magnitude_vector.weight.weight", "weight") == "m.q.lora_magnitude_vector"
    assert lio.file_key("m.q.lora_A.weight.weight", "weight") == "m.q.lora_A.weight"
