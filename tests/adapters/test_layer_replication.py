"""layer_replication (lorakit.adapters.replicate): the layer list rebuilt from weight-sharing copies, each with its own
adapter. Checked on tiny Llama, Qwen2 (sliding-window layer kinds), GPT-2, Falcon and BERT models built from configs:
the structure (sharing, layer_idx, config), outputs against a dense reference (the layers deep-copied by hand, the
same LoRA weights), generation with a KV cache, files both ways with PEFT 0.21.2, and what unload / merge give."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from helpers import assert_same_adapter_config, both_ways, input_ids
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import lorakit
from lorakit import ConfigError, LoraConfig, PeftModel, get_peft_model
from lorakit.adapters import model as lora_model
from lorakit.adapters import replicate
from lorakit.api.functions import get_peft_model_state_dict, set_peft_model_state_dict
from lorakit.api.hotswap import check_hotswap_configs_compatible
from lorakit.export.gguf_adapter import REPLICATED, gguf_adapter_problems
from lorakit.export.merged import merge_adapter_to_folder

ATOL = 1e-5
RANGES = [[0, 3], [1, 3]]  # 3 layers -> 0 1 2 1 2
ORDER = [0, 1, 2, 1, 2]
COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)


def _built(cls: type[nn.Module], config: object, seed: int) -> nn.Module:
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(config).eval()


def llama(seed: int = 0) -> nn.Module:
    return _built(LlamaForCausalLM, LlamaConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                                max_position_embeddings=64, tie_word_embeddings=False), seed)


def qwen2(seed: int = 0) -> nn.Module:  # layer_types: full, sliding, sliding (a window of 3 tokens)
    return _built(Qwen2ForCausalLM, Qwen2Config(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                                max_position_embeddings=64, use_sliding_window=True, sliding_window=3,
                                                max_window_layers=1, tie_word_embeddings=False), seed)


def gpt2(seed: int = 0) -> nn.Module:
    return _built(GPT2LMHeadModel, GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                                bos_token_id=1, eos_token_id=2), seed)


def falcon(seed: int = 0) -> nn.Module:
    return _built(FalconForCausalLM, FalconConfig(**COMMON, new_decoder_architecture=False, multi_query=True,
                                                  parallel_attn=True, alibi=False, bias=False), seed)


def bert(seed: int = 0) -> nn.Module:
    return _built(BertForSequenceClassification, BertConfig(**COMMON, intermediate_size=64,
                                                            max_position_embeddings=64, num_labels=3), seed)


# kind: (factory, path of the layer list, LoRA targets)
KINDS: dict[str, tuple[Callable[..., nn.Module], str, list[str]]] = {
    "llama": (llama, "model.layers", ["q_proj", "v_proj", "down_proj"]),
    "qwen2": (qwen2, "model.layers", ["q_proj", "v_proj"]),
    "gpt2": (gpt2, "transformer.h", ["c_attn", "c_fc"]),
    "falcon": (falcon, "transformer.h", ["query_key_value", "dense_h_to_4h"]),
    "bert": (bert, "bert.encoder.layer", ["query", "value"]),
}
CAUSAL = ["llama", "qwen2", "gpt2", "falcon"]


def config(kind: str, **options: object) -> LoraConfig:
    return LoraConfig(**{"target_modules": KINDS[kind][2], "init_lora_weights": False, "layer_replication": RANGES,
                         **options})


def layers_of(model: nn.Module, kind: str) -> nn.ModuleList:
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model.get_submodule(KINDS[kind][1])


def dense_reference(base: nn.Module, kind: str, order: list[int]) -> nn.Module:
    """``base`` with its layer list rebuilt by hand from deep copies (weights of their own), the config to match."""
    ref = copy.deepcopy(base)
    parent, name = KINDS[kind][1].rsplit(".", 1)
    holder = ref.get_submodule(parent)
    old = getattr(holder, name)
    new = nn.ModuleList([copy.deepcopy(old[i]) for i in order])
    for position, layer in enumerate(new):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    setattr(holder, name, new)
    if getattr(ref.config, "layer_types", None):
        ref.config.layer_types = [ref.config.layer_types[i] for i in order]
    ref.config.num_hidden_layers = len(order)
    return ref


def out(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids(seed=1) if ids is None else ids).logits


def ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# -- the maths of the ranges and the config's checks --------------------------------------------------------------
def test_layer_order_is_the_ranges_one_after_the_other():
    assert replicate.layer_order([[0, 4], [2, 5]]) == [0, 1, 2, 3, 2, 3, 4]
    assert replicate.layer_order([[0, 1], [0, 2], [1, 2]]) == [0, 0, 1, 1]  # PEFT's test_lora_layer_replication
    assert replicate.layer_order([[1, 2]]) == [1]  # shrinking


@pytest.mark.parametrize("value, message", [
    ([[0, 2], [1]], "pair of integers"),
    ([[0, 2.0]], "pair of integers"),
    ([[True, 2]], "pair of integers"),
    ([[2, 2]], "0 <= start < end"),
    ([[-1, 2]], "0 <= start < end"),
    ("0-2", "list of \\[start, end\\) pairs"),
])  # fmt: skip
def test_config_refuses_bad_ranges_naming_the_fix(value, message):
    with pytest.raises(ConfigError, match=rf"{message}.*e\.g\. \[\[0, 4\], \[2, 5\]\]"):
        LoraConfig(layer_replication=value)


def test_config_takes_tuples_and_writes_lists_as_peft():
    c = LoraConfig(layer_replication=((0, 4), (2, 5)))
    assert c.layer_replication == [[0, 4], [2, 5]]
    assert c.to_dict()["layer_replication"] == [[0, 4], [2, 5]]
    assert LoraConfig.from_dict(c.to_dict()).layer_replication == [[0, 4], [2, 5]]
    assert LoraConfig().to_dict()["layer_replication"] is None  # the key PEFT writes, off


@pytest.mark.parametrize("options", [{"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"},
                                     {"init_lora_weights": "loftq"}, {"kasa_config": {}}])
def test_initializers_rewriting_the_shared_base_are_refused(options):
    with pytest.raises(ConfigError, match="replicated layers share one base weight"):
        LoraConfig(layer_replication=[[0, 2]], **options)


def test_range_past_the_model_is_refused_when_added_and_the_model_is_unchanged():
    base = llama()
    with pytest.raises(ConfigError, match=r"\[2, 4\] reaches past the model's 3 layers.*e\.g\. \[2, 3\]"):
        get_peft_model(base, config("llama", layer_replication=[[0, 3], [2, 4]]))
    assert len(base.model.layers) == 3 and base.config.num_hidden_layers == 3


def test_failed_injection_gives_the_model_its_layers_back(monkeypatch):
    base = qwen2()
    layers, layer_types = base.model.layers, list(base.config.layer_types)

    def failing_inject(model: nn.Module, *args: object) -> None:
        assert len(model.model.layers) == 5  # replicated first
        raise RuntimeError("injection failed")

    monkeypatch.setattr(lora_model, "inject", failing_inject)
    with pytest.raises(RuntimeError, match="injection failed"):
        get_peft_model(base, config("qwen2"))
    assert base.model.layers is layers and base.config.num_hidden_layers == 3
    assert base.config.layer_types == layer_types


def test_a_model_without_a_known_layer_list_is_refused():
    with pytest.raises(ConfigError, match=r"found no layer list in Sequential.*\.encoder\.layer or \.h"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"], layer_replication=[[0, 1]]))


# -- the structure ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_copies_share_base_tensors_and_have_their_own_adapters(kind):
    factory, _, targets = KINDS[kind]
    base = factory()
    originals = list(layers_of(base, kind))
    model = get_peft_model(base, config(kind))
    layers = layers_of(model, kind)
    assert len(layers) == 5 and model.get_base_model().config.num_hidden_layers == 5
    indexed = 0
    for position, source in enumerate(ORDER):
        original = dict(originals[source].named_parameters()) | dict(originals[source].named_buffers())
        copied = {n.replace(".base_layer", ""): t for n, t in
                  [*layers[position].named_parameters(), *layers[position].named_buffers()] if "lora_" not in n}
        assert copied.keys() == original.keys()
        assert all(copied[n] is original[n] for n in original)  # the very tensors: nothing copied
        for module in layers[position].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                assert module.layer_idx == position
                indexed += 1
            if isinstance(getattr(module, "config", None), PretrainedConfig):  # attention modules read it
                assert module.config is model.get_base_model().config
    assert indexed >= 5  # every kind here gives its attention modules a layer_idx
    lora_a = [p for n, p in model.named_parameters() if ".lora_A." in n]
    assert len(lora_a) == 5 * len(targets)
    assert len({ptr(p) for p in lora_a}) == len(lora_a)  # each copy's adapter is its own
    assert all(p.requires_grad for p in lora_a)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_peft_test_layer_replication_counts():
    """PEFT's test_lora_layer_replication, on a tiny Llama of 2 layers: [[0, 1], [0, 2], [1, 2]] gives 4 layers,
    0-1 and 2-3 sharing storage, every adapter distinct, 8 lora_A."""
    base = _built(LlamaForCausalLM, LlamaConfig(**{**COMMON, "num_hidden_layers": 2}, intermediate_size=64,
                                                num_key_value_heads=2), 0)
    model = get_peft_model(base, LoraConfig(target_modules=["down_proj", "up_proj"], task_type="CAUSAL_LM",
                                            layer_replication=[[0, 1], [0, 2], [1, 2]]))
    layers = model.base_model.model.model.layers
    up = [layer.mlp.up_proj for layer in layers]
    assert len(layers) == 4
    assert ptr(up[0].base_layer.weight) == ptr(up[1].base_layer.weight) != ptr(up[2].base_layer.weight)
    assert ptr(up[2].base_layer.weight) == ptr(up[3].base_layer.weight)
    assert len({ptr(u.lora_A["default"].weight) for u in up}) == 4
    assert len([n for n, _ in model.named_parameters() if ".lora_A." in n]) == 8


def test_layer_types_follow_the_new_list():
    base = qwen2()
    assert base.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    get_peft_model(base, config("qwen2"))
    assert base.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention",
                                       "sliding_attention", "sliding_attention"]
    base = qwen2()
    get_peft_model(base, config("qwen2", layer_replication=[[0, 2], [0, 3]]))  # 0 1 0 1 2
    assert base.config.layer_types == ["full_attention", "sliding_attention", "full_attention",
                                       "sliding_attention", "sliding_attention"]


# -- numbers ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_the_dense_reference(kind):
    factory = KINDS[kind][0]
    base = factory()
    reference = get_peft_model(dense_reference(base, kind, ORDER), config(kind, layer_replication=None))
    model = get_peft_model(base, config(kind))
    set_peft_model_state_dict(reference, get_peft_model_state_dict(model))
    assert (out(model) - out(reference)).abs().max() < ATOL
    assert (out(model) - out(factory())).abs().max() > 1e-3  # the layers and adapters count


@pytest.mark.parametrize("kind", CAUSAL)
def test_generate_with_a_kv_cache_equals_a_run_without(kind):
    model = get_peft_model(KINDS[kind][0](), config(kind, task_type="CAUSAL_LM"))
    prompt = input_ids(batch=1, seq=5, seed=2)
    runs = [
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                       do_sample=False, use_cache=use_cache, pad_token_id=0)
        for use_cache in (True, False)
    ]
    assert runs[0].shape == (1, 11)
    assert torch.equal(runs[0], runs[1])


def test_merge_adapter_is_refused_and_merge_and_unload_gives_each_copy_its_weights(tmp_path):
    model = get_peft_model(llama(), config("llama"))
    expected = out(model)
    with pytest.raises(ConfigError, match="Cannot merge LORA layers when base model layers are replicated"):
        model.merge_adapter()
    merged = model.merge_and_unload()
    layers = merged.model.layers
    assert len(layers) == 5 and merged.config.num_hidden_layers == 5
    pointers = [ptr(p) for layer in layers for p in layer.parameters()]
    assert len(set(pointers)) == len(pointers)  # no tensor shared any more
    assert (out(merged) - expected).abs().max() < ATOL
    merged.save_pretrained(tmp_path)  # an ordinary model of 5 layers
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(reloaded.model.layers) == 5
    assert (out(reloaded) - expected).abs().max() < ATOL


def test_export_to_merged_writes_the_deeper_model(tmp_path):
    """The fix the vLLM and GGUF exporters name for such an adapter: --to merged."""
    llama().save_pretrained(tmp_path / "base")
    model = get_peft_model(llama(), config("llama", task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer in these folders
        merge_adapter_to_folder(tmp_path / "adapter", tmp_path / "merged", model=str(tmp_path / "base"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.num_hidden_layers == 5
    assert (out(merged) - out(model)).abs().max() < ATOL


def test_unload_leaves_the_replicated_layers_sharing_weights():
    base = llama()
    reference = dense_reference(base, "llama", ORDER)
    model = get_peft_model(base, config("llama"))
    plain = model.unload()
    layers = plain.model.layers
    assert len(layers) == 5 and not any(isinstance(m, lorakit.LoraLinear) for m in plain.modules())
    assert layers[1].self_attn.q_proj.weight is layers[3].self_attn.q_proj.weight
    assert (out(plain) - out(reference)).abs().max() < ATOL


# -- adapters after the first -------------------------------------------------------------------------------------
def test_a_second_adapter_needs_the_same_replication():
    model = get_peft_model(llama(), config("llama"))
    model.add_adapter("same", config("llama"))  # nothing replicated again
    assert len(model.base_model.model.model.layers) == 5
    with pytest.raises(ConfigError, match=r"replicated by adapter 'default' with layer_replication=\[\[0, 3\], "
                                          r"\[1, 3\]\].*give 'other' layer_replication=\[\[0, 3\], \[1, 3\]\]"):
        model.add_adapter("other", config("llama", layer_replication=[[0, 3]]))
    with pytest.raises(ConfigError, match="give 'none' layer_replication="):
        model.add_adapter("none", config("llama", layer_replication=None))
    assert list(model.peft_config) == ["default", "same"] and len(model.base_model.model.model.layers) == 5


def test_replication_comes_with_the_first_adapter_only():
    model = get_peft_model(llama(), config("llama", layer_replication=None))
    with pytest.raises(ConfigError, match="already holds adapters \\('default'\\) on its original layers"):
        model.add_adapter("grown", config("llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "modify a model with PEFT for a second time"
        with pytest.raises(ConfigError, match="on its original layers"):
            get_peft_model(model.get_base_model(), config("llama"), adapter_name="again")
    assert len(model.base_model.model.model.layers) == 3


def test_hotswap_and_gguf_refuse_another_replication():
    with pytest.raises(ValueError, match="for layer_replication"):
        check_hotswap_configs_compatible(LoraConfig(layer_replication=[[0, 2]]),
                                         LoraConfig(layer_replication=[[0, 1], [0, 1]]))
    assert REPLICATED in gguf_adapter_problems(LoraConfig(layer_replication=[[0, 2]]), {}, "unknown architecture")


# -- files ----------------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    model = get_peft_model(llama(), config("llama"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layer_replication"] == RANGES
    loaded = PeftModel.from_pretrained(llama(), tmp_path)  # replicates before the weights load
    assert len(loaded.base_model.model.model.layers) == 5
    assert (out(loaded) - out(model)).abs().max() < ATOL
    loaded.load_adapter(tmp_path, "second")  # the same replication: loads beside it
    other = tmp_path / "other"
    get_peft_model(llama(), config("llama", layer_replication=[[0, 2]])).save_pretrained(other)
    with pytest.raises(ConfigError, match="replicated by adapter 'default'"):
        loaded.load_adapter(other, "third")
    assert list(loaded.peft_config) == ["default", "second"]


def _writer_model(writer: object, kind: str) -> nn.Module:
    lib_config = writer.LoraConfig(target_modules=KINDS[kind][2], init_lora_weights=False, layer_replication=RANGES)
    return writer.get_peft_model(KINDS[kind][0](), lib_config)


@both_ways
@pytest.mark.parametrize("kind", ["llama", "bert"])  # the layer lists PEFT finds (GPT-2's and Falcon's LMs: not)
def test_files_load_both_ways_with_equal_outputs(writer, reader, kind, tmp_path):
    model = _writer_model(writer, kind)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = reader.PeftModel.from_pretrained(KINDS[kind][0](), tmp_path)
    assert len(layers_of(loaded.get_base_model(), kind)) == 5
    assert (out(loaded) - out(model)).abs().max() < ATOL


def test_same_adapter_config_as_peft(tmp_path: Path):
    _writer_model(lorakit, "llama").save_pretrained(tmp_path / "lorakit")
    _writer_model(peft, "llama").save_pretrained(tmp_path / "peft")
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")


def gpt2_bare(seed: int = 0) -> nn.Module:  # GPT2Model: the list at .h, where PEFT finds it (Falcon-style)
    return _built(GPT2Model, GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=3, n_head=4), seed)


@both_ways
def test_files_of_a_model_with_h_load_both_ways(writer, reader, tmp_path):
    lib_config = writer.LoraConfig(target_modules=["c_attn"], init_lora_weights=False, layer_replication=RANGES)
    model = writer.get_peft_model(gpt2_bare(), lib_config)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = reader.PeftModel.from_pretrained(gpt2_bare(), tmp_path)
    assert len(loaded.get_base_model().h) == 5
    with torch.no_grad():
        expected, got = (m(input_ids=input_ids(seed=1)).last_hidden_state for m in (model, loaded))
    assert (got - expected).abs().max() < ATOL


# -- training and the other entry point -----------------------------------------------------------------------------
def test_copies_train_apart():
    model = get_peft_model(llama(), config("llama", init_lora_weights=True))  # B = 0: the copies start equal
    model.train()
    model(input_ids=input_ids(seed=1), labels=input_ids(seed=1)).loss.backward()
    layers = model.base_model.model.model.layers
    grads = [layers[i].self_attn.q_proj.lora_B["default"].weight.grad for i in (1, 3)]  # both copies of layer 1
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert (grads[0] - grads[1]).abs().max() > 1e-6  # each copy's adapter gets its own gradient
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_inject_adapter_in_model_replicates_too():
    base = llama()
    lorakit.inject_adapter_in_model(config("llama"), base)
    assert len(base.model.layers) == 5 and base.config.num_hidden_layers == 5
    q = [layer.self_attn.q_proj for layer in base.model.layers]
    assert q[1].base_layer.weight is q[3].base_layer.weight and q[1].lora_A["default"] is not q[3].lora_A["default"]
