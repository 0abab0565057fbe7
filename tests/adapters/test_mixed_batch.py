"""Mixed-adapter batches (``adapter_names``): routing plan, forward and generate against per-row runs, HF PEFT, errors.

The reference for row i is the same input run alone with adapter ``names[i]`` active (``"__base__"``: adapters
disabled); forwards must agree within 1e-5 in fp32, greedy decoding token for token. PEFT, loading the adapters that
lorakit saved, must give the same mixed-batch logits and tokens.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch
from helpers import input_ids, perturb_, silence_eos_, tiny_gpt2, tiny_llama, tiny_llama_cls
from torch import nn

import lorakit
from lorakit.adapters import mixed_batch
from lorakit.adapters.mixed_batch import BASE, plan

ATOL = 1e-5
NAMES = ["one", BASE, "two", "one", "three", "two"]  # unsorted, repeated, a base row in the middle
UNEQUAL = ["one", "one", "two", "one", BASE, "one", "three", "one"]  # 'one' cut into two segments, padding


# -- the routing plan (pure) ---------------------------------------------------------------------------------------
def test_plan_sorts_rows_by_adapter_in_order_of_appearance_with_base_last():
    r = plan(NAMES)
    assert r.rows.tolist() == [0, 3, 2, 5, 4, 1]
    assert r.segments == (("one", 0, 2), ("two", 2, 4), ("three", 4, 5), (BASE, 5, 6))
    assert r.rows[r.inverse].tolist() == list(range(6))
    for name, start, stop in r.segments:  # every sorted segment holds exactly that adapter's rows
        assert {NAMES[i] for i in r.rows[start:stop].tolist()} == {name}


def test_plan_cuts_adapter_rows_into_equal_padded_segments():
    r = plan(NAMES)  # 5 adapted rows, 3 adapters: L = 2
    assert (r.batch_size, r.slots, r.in_order) == (6, 2, False)
    assert r.segment_adapters == ("one", "two", "three")
    assert r.padded.tolist() == [0, 3, 2, 5, 4, 4]  # 'three' has one row: repeated once as padding
    assert r.keep.flatten().tolist() == [1, 1, 1, 1, 1, 0]


@pytest.mark.parametrize("seed", range(20))
def test_plan_segments_cover_each_adapted_row_once_with_less_than_2x_padding(seed):
    rng = torch.Generator().manual_seed(seed)
    pool = ["a", "b", "c", "d", BASE]
    weights = torch.rand(len(pool), generator=rng) ** 3  # often very unequal counts
    names = [pool[i] for i in torch.multinomial(weights, 1 + seed, replacement=True, generator=rng).tolist()]
    r = plan(names)
    keep = torch.ones(r.padded.numel()) if r.keep is None else r.keep.flatten()
    real = r.padded[keep.bool()].tolist()
    assert sorted(real) == [i for i, n in enumerate(names) if n != BASE]
    for k, name in enumerate(r.segment_adapters):  # each segment: rows of its adapter only, padding included
        assert {names[i] for i in r.padded.view(-1, r.slots)[k].tolist()} == {name}
    assert r.padded.numel() < 2 * len(real) or r.padded.numel() == len(real) == 0


def test_plan_repeat_expands_each_name_to_consecutive_rows():
    r = plan(["a", "b", "a"], repeat=2)  # generate's rows: prompt 0 twice, prompt 1 twice, ...
    assert r.rows.tolist() == [0, 1, 4, 5, 2, 3]
    assert r.segments == (("a", 0, 4), ("b", 4, 6))
    assert r.segment_adapters == ("a", "a", "b") and r.padded.tolist() == [0, 1, 4, 5, 5, 5, 2, 3, 2]  # L = 3


def test_plan_in_order_when_the_segments_are_already_sorted_equal_and_first():
    assert plan(["a", "a", "b", "b", BASE]).in_order
    assert plan([BASE, BASE]).padded.numel() == 0 and plan([BASE, BASE]).in_order
    assert not plan(["a", "a", "b"]).in_order  # L = 2: b's segment needs padding
    assert not plan(["a", "b", "a", "b"]).in_order
    assert not plan([BASE, "a"]).in_order


def test_rows_per_prompt_from_call_then_generation_config():
    config = type("C", (), {"num_beams": 3, "num_return_sequences": 1})()
    assert mixed_batch.rows_per_prompt({}, None) == 1
    assert mixed_batch.rows_per_prompt({}, config) == 3
    assert mixed_batch.rows_per_prompt({"num_beams": 2, "num_return_sequences": 4}, config) == 4
    assert mixed_batch.rows_per_prompt({"generation_config": config}, None) == 3


# -- models ----------------------------------------------------------------------------------------------------------
def _adapters(arch: str) -> dict[str, dict]:
    """Three adapters with different ranks, alphas and targets (one also on the embedding)."""
    if arch == "gpt2":  # Conv1D layers, weights (in, out), with biases
        return {
            "one": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
            "two": dict(r=2, lora_alpha=3, target_modules=["c_attn", "c_fc", "wte"]),
            "three": dict(r=8, lora_alpha=8, target_modules=["c_fc"], use_rslora=True),
        }
    return {
        "one": dict(r=4, lora_alpha=8, target_modules="all-linear"),
        "two": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        "three": dict(r=8, lora_alpha=8, target_modules=["o_proj", "down_proj"], use_rslora=True),
    }


def _model(arch: str = "llama", dora: bool = False, seed: int = 0) -> lorakit.PeftModel:
    """A tiny model with the three adapters of ``_adapters``, random A and B (so that every adapter changes the
    output), in eval mode with adapter 'one' active."""
    factory = tiny_gpt2 if arch == "gpt2" else tiny_llama
    torch.manual_seed(seed)
    model = None
    for name, options in _adapters(arch).items():
        config = lorakit.LoraConfig(**options, init_lora_weights=False, use_dora=dora)
        if model is None:
            model = lorakit.get_peft_model(factory(0), config, name)
        else:
            model.add_adapter(name, config)
    if dora:  # m starts at ||W + s B A||: perturb it so that DoRA's rescaling is not the identity
        perturb_([p for n, p in model.named_parameters() if "lora_magnitude_vector" in n], seed=1)
    return model.eval()


def _alone(model: lorakit.PeftModel, name: str, **inputs: torch.Tensor) -> torch.Tensor:
    """Logits of ``inputs`` with only adapter ``name`` active (or the base model for "__base__")."""
    with torch.no_grad():
        if name == BASE:
            with model.disable_adapter():
                return model(**inputs).logits
        model.set_adapter(name)
        return model(**inputs).logits


def _assert_rows_match_alone(model: lorakit.PeftModel, names: list[str], ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    base = _alone(model, BASE, input_ids=ids)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i : i + 1], _alone(model, name, input_ids=ids[i : i + 1]), atol=ATOL, rtol=0)
        if name != BASE:  # the adapters really change the output, so the test can fail
            assert (mixed[i] - base[i]).abs().max() > 1e-3
    return mixed


# -- forward ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_rows_equal_each_row_alone_with_its_adapter(arch):
    model = _model(arch)
    _assert_rows_match_alone(model, NAMES, input_ids(len(NAMES), 7))
    assert all(m.routing is None for m in model.modules() if hasattr(m, "routing"))  # cleared after the forward


@pytest.mark.parametrize(
    "names",
    [["two", "two", "two"], ["one", "one", BASE], [BASE, BASE, BASE], [BASE, "three", "one"], UNEQUAL],
    ids=["one-adapter", "sorted-with-base", "all-base", "base-first", "unequal"],
)
def test_forward_special_layouts(names):
    _assert_rows_match_alone(_model(), names, input_ids(len(names), 5, seed=3))


@pytest.mark.parametrize("names", [NAMES, UNEQUAL], ids=["names", "unequal"])
def test_forward_dora_adapters(names):
    _assert_rows_match_alone(_model("llama", dora=True), names, input_ids(len(names), 6, seed=1))


def test_forward_with_padding_mask_and_inputs_embeds():
    model = _model()
    ids = input_ids(len(NAMES), 6, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[4, :3] = 0  # left padding
    embeds = model.get_base_model().get_input_embeddings()(ids)  # no embedding LoRA on this path
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, adapter_names=["one"] * len(NAMES)).logits
    for i, name in enumerate(NAMES):
        alone = _alone(model, name, input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL, rtol=0)
    model.set_adapter("one")
    with torch.no_grad():
        torch.testing.assert_close(from_embeds, model(inputs_embeds=embeds, attention_mask=mask).logits, atol=ATOL,
                                   rtol=0)


def test_linear_layer_matches_dense_reference_per_row():
    """One LoraLinear with routing set by hand, against x @ (W + s * B @ A).T + b row by row."""
    torch.manual_seed(0)
    layer = lorakit.LoraLinear(nn.Linear(6, 5))
    for name, r in (("a", 2), ("b", 3)):
        layer.update_layer(name, r=r, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False)
    layer.eval()
    names = ["b", "a", BASE, "b"]
    x = torch.randn(4, 3, 6)  # (B, T, in)
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    with mixed_batch.routed([layer], names, ["a", "b"], training=False), torch.no_grad():
        y = layer(x)
        with pytest.raises(ValueError, match="got 4 names and 3 rows in the input of Linear"):
            layer(x[:3])
    for i, name in enumerate(names):
        dense = W if name == BASE else W + layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight
        torch.testing.assert_close(y[i], x[i] @ dense.T + bias, atol=ATOL, rtol=0)
    assert layer.routing is None


def test_routed_linear_calls_a_hooked_base_layer_and_computes_the_same():
    """The routed forward computes a plain nn.Linear base as F.linear itself; a hooked base layer is called instead,
    with the same output."""
    torch.manual_seed(0)
    layer = lorakit.LoraLinear(nn.Linear(6, 5))
    for name, r in (("a", 2), ("b", 3)):
        layer.update_layer(name, r=r, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False)
    layer.eval()
    names, x, calls = ["b", "a", BASE, "b"], torch.randn(4, 3, 6), []
    with mixed_batch.routed([layer], names, ["a", "b"], training=False), torch.no_grad():
        plain = layer(x)
        handle = layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
        hooked = layer(x)
        handle.remove()
    assert calls == [1]
    torch.testing.assert_close(hooked, plain, atol=ATOL, rtol=0)


def test_modules_to_save_heads_are_routed_per_row():
    model = None
    for name, seed in (("one", 1), ("two", 2)):
        config = lorakit.LoraConfig(
            r=4, target_modules=["q_proj"], modules_to_save=["score"], init_lora_weights=False, task_type="SEQ_CLS"
        )
        if model is None:
            model = lorakit.get_peft_model(tiny_llama_cls(0), config, name)
        else:
            model.add_adapter(name, config)
        perturb_(list(model.get_base_model().score.modules_to_save[name].parameters()), seed=seed)
    model.eval()
    names = ["two", BASE, "one", "two"]
    ids = input_ids(len(names), 5)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits  # (B, num_labels)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i : i + 1], _alone(model, name, input_ids=ids[i : i + 1]), atol=ATOL, rtol=0)


def test_disabled_adapters_give_the_base_model_for_every_row():
    model = _model()
    ids = input_ids(len(NAMES), 5)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids, adapter_names=NAMES).logits, model(input_ids=ids).logits)


# -- generate --------------------------------------------------------------------------------------------------------
def _generate(
    model: lorakit.PeftModel, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int = 8, **options: object
) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
            **options,
        )


def _left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = input_ids(len(lengths), max(lengths), seed=seed)
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : max(lengths) - n], mask[i, : max(lengths) - n] = 0, 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generate_equals_each_row_alone(arch):
    model = _model(arch)
    silence_eos_(model.get_base_model())
    lengths = [5, 3, 6, 6, 2, 4]
    ids, mask = _left_padded(lengths)
    out = _generate(model, ids, mask, adapter_names=NAMES)
    assert out.shape == (len(NAMES), ids.shape[1] + 8)
    base_out = _generate(model, ids, mask, adapter_names=[BASE] * len(NAMES))
    for i, (name, n) in enumerate(zip(NAMES, lengths)):
        row, row_mask = ids[i : i + 1, -n:], mask[i : i + 1, -n:]  # unpadded
        if name == BASE:
            with model.disable_adapter():
                alone = _generate(model, row, row_mask)
        else:
            model.set_adapter(name)
            alone = _generate(model, row, row_mask)
        assert out[i, -8:].tolist() == alone[0, -8:].tolist(), (i, name)
        # the same padded batch with that adapter on every row agrees too
        same_batch = _generate(model, ids, mask, adapter_names=[name] * len(NAMES))
        assert out[i].tolist() == same_batch[i].tolist()
    assert any(out[i].tolist() != base_out[i].tolist() for i, n in enumerate(NAMES) if n != BASE)


def test_beam_search_routes_every_beam_of_a_prompt():
    model = _model()
    silence_eos_(model.get_base_model())
    names = ["two", "one", BASE]
    ids, mask = _left_padded([4, 6, 5], seed=4)
    beams = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2)
    out = _generate(model, ids, mask, adapter_names=names, **beams)  # (3 prompts * 2 sequences, T + 4)
    for i, name in enumerate(names):
        alone = _generate(model, ids, mask, adapter_names=[name] * 3, **beams)
        assert out[2 * i : 2 * i + 2].tolist() == alone[2 * i : 2 * i + 2].tolist()


# -- against HF PEFT -------------------------------------------------------------------------------------------------
def _peft_copy(model: lorakit.PeftModel, tmp_path: Path, factory: object) -> peft.PeftModel:
    """The same adapters, saved by lorakit and loaded by PEFT onto a fresh copy of the base."""
    model.save_pretrained(tmp_path)
    first, *others = model.peft_config
    folder = tmp_path  # lorakit writes the adapter named 'default' in the folder itself, others in sub-folders
    theirs = peft.PeftModel.from_pretrained(factory(0), folder / first, adapter_name=first)
    for name in others:
        theirs.load_adapter(folder / name, adapter_name=name)
    return theirs.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_and_tokens_equal_peft_adapter_names(arch, tmp_path):
    ours = _model(arch)
    theirs = _peft_copy(ours, tmp_path, tiny_gpt2 if arch == "gpt2" else tiny_llama)
    for model in (ours, theirs):
        silence_eos_(model.get_base_model())
    ids, mask = _left_padded([5, 3, 6, 6, 2, 4], seed=5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        got = ours(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        assert _generate(ours, ids, mask, adapter_names=NAMES).tolist() == _generate(
            theirs, ids, mask, adapter_names=NAMES
        ).tolist()


# -- errors ----------------------------------------------------------------------------------------------------------
def _routings(model: nn.Module) -> list[object]:
    return [m.routing for m in model.modules() if hasattr(m, "routing")]


def test_length_mismatch_is_an_error_in_forward_and_generate():
    model = _model()
    ids = input_ids(3, 4)
    with pytest.raises(ValueError, match=r"got 2 names and 3 rows; give exactly one adapter name"):
        model(input_ids=ids, adapter_names=["one", "two"])
    with pytest.raises(ValueError, match="got 4 names and 3 rows"):
        model.generate(input_ids=ids, max_new_tokens=2, adapter_names=["one"] * 4)
    assert not any(_routings(model))


def test_unknown_adapter_lists_the_loaded_ones():
    model = _model()
    loaded = r"non-existing adapter\(s\): onne; loaded adapters: \['one', 'two', 'three'\]"
    with pytest.raises(ValueError, match=loaded):
        model(input_ids=input_ids(2, 4), adapter_names=["onne", BASE])


def test_a_string_is_not_a_list_of_names():
    with pytest.raises(TypeError, match="one adapter name per batch row"):
        _model()(input_ids=input_ids(3, 4), adapter_names="one")


def test_merged_adapters_are_refused():
    model = _model()
    model.merge_adapter(["two"])
    with pytest.raises(ValueError, match=r"merged adapters, please call `unmerge_adapter` first. \(merged: \['two'\]"):
        model(input_ids=input_ids(2, 4), adapter_names=["one", "two"])
    model.unmerge_adapter()
    model(input_ids=input_ids(2, 4), adapter_names=["one", "two"])


def test_training_mode_is_refused_like_peft():
    model = _model().train()
    with pytest.raises(ValueError, match=r"training mode. Call model.eval\(\) first"):
        model(input_ids=input_ids(2, 4), adapter_names=["one", "two"])


def test_routing_is_cleared_when_the_forward_raises():
    model = _model()
    with pytest.raises(IndexError):
        model(input_ids=torch.full((2, 4), 10_000), adapter_names=["one", "two"])  # token id out of range
    assert not any(_routings(model))
    _assert_rows_match_alone(model, ["two", "one"], input_ids(2, 4))
