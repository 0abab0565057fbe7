"""Activated LoRA (alora_invocation_tokens; lorakit.adapters.variant_alora, lorakit.ops.alora): the base model before
each row's last invocation and base + LoRA from it on, against a dense reference; the base model's KV cache reused;
offsets held for one call only; generate; mixed batches; the errors; PEFT interop (files both ways, same logits,
same generate, same adapter_config.json)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from helpers import assert_same_adapter_config, both_ways, tiny_llama
from torch import nn

import lorakit
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.variant_alora import ALora, NotMergeableError, calculate_alora_offsets
from lorakit.config import ConfigError

ATOL = 1e-5
INVOCATION = [7, 8]
TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([
    [3, 4, 5, 7, 8, 9, 10, 11],  # invocation at 3: offset 5
    [7, 8, 3, 4, 7, 8, 5, 6],  # the last one, at 4: offset 4
    [3, 4, 5, 6, 9, 10, 11, 12],  # none: the base model everywhere
])
STARTS = [3, 4, 8]  # first activated position per row


def _config(module: object, **kw: object) -> object:
    options = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                   alora_invocation_tokens=INVOCATION)
    return module.LoraConfig(**{**options, **kw})  # type: ignore[attr-defined]


def _model(module: object = lorakit, seed: int = 1, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.get_peft_model(tiny_llama(0), _config(module, **kw)).eval()  # type: ignore[attr-defined]


def _logits(model: nn.Module, ids: torch.Tensor = IDS, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _dense_reference(model: nn.Module, ids: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """The base model with a forward hook on each adapted Linear adding ``active * x @ (s * B @ A).T``, the dense
    update, active = 1 from position ``starts[b]`` of row b on."""
    base = tiny_llama(0)
    active = torch.tensor([[float(t >= s) for t in range(ids.shape[1])] for s in starts]).unsqueeze(-1)  # (B, T, 1)
    handles = []
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            delta = layer.scaling["default"] * B @ A  # (out, in)
            target = base.get_submodule(name.removeprefix("base_model.model."))
            handles.append(target.register_forward_hook(
                lambda m, args, out, d=delta: out + active * (args[0] @ d.T)
            ))
    try:
        with torch.no_grad():
            return base(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


# -- the maths in a model -------------------------------------------------------------------------------------------
def test_offsets_of_the_rows():
    configs = {"default": _config(lorakit)}
    assert calculate_alora_offsets(configs, "default", IDS) == [5, 4, None]
    assert calculate_alora_offsets(configs, "default", IDS, ["default", "__base__", "default"]) == [5, None, None]


def test_outputs_are_the_base_before_the_invocation_and_equal_the_dense_reference():
    model = _model()
    ours = _logits(model)
    with model.disable_adapter():
        base = _logits(model)
    for row, start in enumerate(STARTS):
        assert torch.allclose(ours[row, :start], base[row, :start], atol=1e-6)
        assert (ours[row, start:] - base[row, start:]).abs().amax(-1).min() > 1e-3 if start < 8 else True
    assert (ours - _dense_reference(model, IDS, STARTS)).abs().max() < ATOL


def test_the_base_models_kv_cache_of_the_prefix_is_reused():
    model, start = _model(), STARTS[0]
    row = IDS[:1]
    with torch.no_grad(), model.disable_adapter():
        prefix = model(input_ids=row[:, :start], use_cache=True)
    rest = _logits(model, row[:, start:], past_key_values=prefix.past_key_values)  # starts with the invocation
    assert (rest - _logits(model, row)[:, start:]).abs().max() < ATOL


def test_gradients_come_from_the_activated_positions_only():
    model = _model()
    model.train()
    model(input_ids=IDS).logits[:, :3].sum().backward()  # no row is activated before position 3
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is None or not g.any() for g in grads)
    model(input_ids=IDS).logits[:, 5:].sum().backward()
    assert all(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if "lora_" in n)


def test_offsets_are_held_for_one_call_only_errors_included():
    model = _model()
    variants = [v for m in model.modules() if isinstance(m, LoraLayer) for v in m.variants.values()]
    assert variants and all(isinstance(v, ALora) and v.offsets is None for v in variants)
    _logits(model)
    assert all(v.offsets is None for v in variants)
    def fail(module: nn.Module, args: tuple) -> None:
        assert all(v.offsets == [5, 4, None] for v in variants)  # held during the call
        raise RuntimeError("boom")

    handle = model.base_model.model.model.layers[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=IDS)  # fails inside the base model's forward
    handle.remove()
    assert all(v.offsets is None for v in variants)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 4, 32)
    with torch.no_grad():  # called outside a PeftModel call: no offsets, the base layer
        assert torch.equal(layer(x), layer.base_layer(x))


def test_each_targeted_layer_holds_an_alora_variant_as_peft_names_it():
    model = _model()
    torch.manual_seed(2)
    model.add_adapter("plain", lorakit.LoraConfig(r=4, target_modules=TARGETS))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 6  # 3 targets x 2 decoder layers
    for layer in layers:
        assert list(layer.lora_variant) == ["default"] and isinstance(layer.lora_variant["default"], ALora)
        assert layer.lora_variant["default"].invocation_tokens == INVOCATION  # plain LoRA has no entry, as in PEFT


def test_explicit_offsets_override_the_input_ids():
    model = _model()
    ours = _logits(model, alora_offsets=[2, 8, 1])
    assert (ours - _dense_reference(model, IDS, [6, 0, 7])).abs().max() < ATOL


# -- generate -------------------------------------------------------------------------------------------------------
def _generate(model: nn.Module, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False,
                              pad_token_id=0, **kw)


def test_generate_with_and_without_the_cache_and_against_a_greedy_loop():
    model = _model()
    out = _generate(model)
    assert torch.equal(out, _generate(model, use_cache=False))
    ids = IDS
    for _ in range(6):  # greedy decoding by full forwards: the offsets found again in each longer row
        ids = torch.cat([ids, _logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    with model.disable_adapter():
        assert not torch.equal(out, _generate(model))


def test_generate_repeats_the_offsets_for_several_sequences_per_prompt():
    model = _model()
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=IDS, max_new_tokens=3, do_sample=True, num_return_sequences=2, pad_token_id=0)
    assert out.shape == (6, 11)


# -- mixed batches ----------------------------------------------------------------------------------------------------
def test_mixed_batch_rows_equal_their_adapter_alone():
    model = _model()
    torch.manual_seed(2)
    model.add_adapter("plain", lorakit.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    names = ["default", "plain", "__base__"]
    mixed = _logits(model, adapter_names=names)
    alone = {}
    for name in ("default", "plain"):
        model.set_adapter(name)
        alone[name] = _logits(model)
    with model.disable_adapter():
        alone["__base__"] = _logits(model)
    for row, name in enumerate(names):
        assert (mixed[row] - alone[name][row]).abs().max() < ATOL, name


def test_mixed_batch_equals_peft(tmp_path):
    model = _model()
    torch.manual_seed(2)
    model.add_adapter("plain", lorakit.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    theirs.load_adapter(tmp_path / "plain", adapter_name="plain")
    names = ["plain", "default", "default"]
    assert (_logits(model, adapter_names=names) - _logits(theirs.eval(), adapter_names=names)).abs().max() < ATOL


# -- PEFT interop ---------------------------------------------------------------------------------------------------
@both_ways
def test_files_load_both_ways_with_equal_logits_and_generations(writer, reader, tmp_path):
    model = _model(writer)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = reader.PeftModel.from_pretrained(tiny_llama(0), tmp_path).eval()
    assert loaded.peft_config["default"].alora_invocation_tokens == INVOCATION
    assert (_logits(loaded) - _logits(model)).abs().max() < ATOL
    assert torch.equal(_generate(loaded), _generate(model))


def test_same_adapter_config_as_peft(tmp_path):
    _model(lorakit).save_pretrained(tmp_path / "lorakit")
    _model(peft).save_pretrained(tmp_path / "peft")
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")


# -- errors ---------------------------------------------------------------------------------------------------------
def test_beam_search_is_refused():
    with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA.*num_beams=1"):
        _generate(_model(), num_beams=2)


def test_inputs_embeds_only_warns_and_runs_the_base_model():
    model = _model()
    embeds = model.get_input_embeddings()(IDS)
    with pytest.warns(UserWarning, match="only inputs_embeds are provided. Disabling aLoRA"):
        ours = _logits(model, None, inputs_embeds=embeds)
    with model.disable_adapter():
        assert torch.allclose(ours, _logits(model), atol=1e-6)


def test_merging_is_refused_and_leaves_the_weights():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(NotMergeableError, match="aLoRA adapter.*Keep it unmerged"):
            merge()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _lora_grads(model: nn.Module, checkpointing_kwargs: dict | None) -> dict[str, torch.Tensor]:
    if checkpointing_kwargs is not None:
        model.gradient_checkpointing_enable(checkpointing_kwargs)
    model.train()
    loss = model(input_ids=IDS).logits[:, 2:].square().mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_gradient_checkpointing_recomputes_with_the_calls_offsets():
    reference = _lora_grads(_model(), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation of the older name
        ours = _lora_grads(_model(), {"use_reentrant": False})
    assert reference.keys() == ours.keys() and len(ours) == 12
    assert all(torch.allclose(ours[k], reference[k], atol=1e-6) and ours[k].any() for k in ours)


def test_two_checkpointed_forwards_before_one_backward_keep_their_own_offsets():
    model = _model()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    first = model(input_ids=IDS).logits.sum()
    second = model(input_ids=IDS, alora_offsets=[8, 8, 8]).logits.sum()  # every position activated
    (first + second).backward()
    reference = _model()
    reference.train()
    (reference(input_ids=IDS).logits.sum() + reference(input_ids=IDS, alora_offsets=[8, 8, 8]).logits.sum()).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if "lora_" in name:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_reentrant_gradient_checkpointing_is_refused():
    model = _model()
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model.train()
    with pytest.raises(ValueError, match="needs non-reentrant checkpointing.*'use_reentrant': False"):
        model(input_ids=IDS)


@pytest.mark.parametrize("tokens", [[], [1.5], [-1], [True], "abc", (7, 8)])
def test_bad_invocation_tokens_are_refused(tokens):
    with pytest.raises(ConfigError, match="alora_invocation_tokens=.*non-empty list of token ids"):
        lorakit.LoraConfig(alora_invocation_tokens=tokens)


def test_alora_with_another_variant_or_on_an_embedding_is_refused():
    with pytest.raises(ConfigError, match="Invalid or unsupported variant combination"):
        lorakit.LoraConfig(alora_invocation_tokens=[1], use_dora=True)
    with pytest.raises(ConfigError, match="aLoRA does not support adapting Embedding"):
        _model(target_modules=["embed_tokens"])
