"""A tiny transformers llama written as a GGUF base file, the way llama.cpp's converter lays one out: the test-side
stand-in for the bundled SmolLM2 GGUF. transformers reads it back (``from_pretrained(folder, gguf_file=...)``) with
its own name map and its own q / k reordering, so a test that loads it checks lorakit's GGUF layout independently."""

from __future__ import annotations

from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lorakit.export.gguf_files import GgufTensor, encode, write_gguf
from lorakit.export.gguf_names import gguf_arch

STR, U32, F32, I32 = (
    gguf.GGUFValueType.STRING,
    gguf.GGUFValueType.UINT32,
    gguf.GGUFValueType.FLOAT32,
    gguf.GGUFValueType.INT32,
)


def write_tiny_gguf(model: PreTrainedModel, path: Path, outtype: str = "f32") -> Path:
    """``model`` (a tiny LlamaForCausalLM) as a GGUF model file at ``path``, with a placeholder vocabulary."""
    config = model.config
    arch = gguf_arch(config)
    head_dim = config.hidden_size // config.num_attention_heads
    p = arch.name
    fields = [
        ("general.type", "model", STR),
        ("general.name", "tiny llama", STR),
        (f"{p}.block_count", config.num_hidden_layers, U32),
        (f"{p}.context_length", config.max_position_embeddings, U32),
        (f"{p}.embedding_length", config.hidden_size, U32),
        (f"{p}.feed_forward_length", config.intermediate_size, U32),
        (f"{p}.attention.head_count", config.num_attention_heads, U32),
        (f"{p}.attention.head_count_kv", config.num_key_value_heads, U32),
        (f"{p}.attention.layer_norm_rms_epsilon", config.rms_norm_eps, F32),
        (f"{p}.rope.freq_base", float(config.rope_parameters["rope_theta"]), F32),
        (f"{p}.rope.dimension_count", head_dim, U32),
        (f"{p}.vocab_size", config.vocab_size, U32),
        ("tokenizer.ggml.model", "gpt2", STR),
        ("tokenizer.ggml.tokens", [f"t{i}" for i in range(config.vocab_size)], gguf.GGUFValueType.ARRAY, STR),
        ("tokenizer.ggml.token_type", [1] * config.vocab_size, gguf.GGUFValueType.ARRAY, I32),
        ("tokenizer.ggml.merges", ["t 1"], gguf.GGUFValueType.ARRAY, STR),
        ("tokenizer.ggml.bos_token_id", 1, U32),
        ("tokenizer.ggml.eos_token_id", 2, U32),
    ]
    tensors = []
    for key, value in model.state_dict().items():
        module, suffix = key.rsplit(".", 1)
        name = arch.tensor_name(module)
        assert name is not None, key
        rows = arch.to_gguf_rows(module, value.detach().float())
        tensors.append(GgufTensor(name.removesuffix(".weight") + "." + suffix, *encode(rows.numpy(), outtype)))
    return write_gguf(path, arch.name, fields, tensors)


def load_gguf_model(path: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()
