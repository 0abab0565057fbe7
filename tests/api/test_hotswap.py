"""Hot-swapping (lorakit.api.hotswap): a swapped-in adapter computes what a fresh load of it computes, padding keeps
the outputs, errors leave the model as it was, PEFT's files swap in, and a compiled model does not recompile.

Tiny random models, fp32, fixed seeds; "a fresh load" is PeftModel.from_pretrained of the same folder onto a fresh
copy of the base.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import input_ids, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.api.hotswap import (
    check_hotswap_configs_compatible,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)

ATOL = 1e-6
TARGETS = ["q_proj", "v_proj", "o_proj"]


class Kinds(nn.Module):
    """An embedding, a grouped conv and a linear layer: each kind hot-swapping pads."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=2)
        self.lin = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (N, T, 8)
        h = self.conv(h.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)  # (N, T, 8)
        return self.lin(torch.relu(h))


def kinds_base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Kinds().eval()


def kinds_ids() -> torch.Tensor:
    return torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


def kinds_out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(kinds_ids())


def save(folder: Path, base: nn.Module, seed: int, **kwargs: object) -> Path:
    """An adapter with random (non-zero) A and B on ``base``, saved in ``folder``."""
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs))
    model.save_pretrained(folder)
    return folder


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int], list[float]]:
    """Every tensor's value and identity and every scaling, to check that a failed swap changed nothing."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = {k: id(p) for k, p in model.named_parameters()}
    scalings = [float(s) for m in model.modules() if isinstance(m, lorakit.LoraLayer) for s in m.scaling.values()]
    return tensors, ids, scalings


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    tensors, ids, scalings = snapshot(model)
    assert ids == before[1] and scalings == before[2]
    assert tensors.keys() == before[0].keys()
    for key, value in tensors.items():
        assert torch.equal(value, before[0][key]), key


# -- a swap equals a fresh load --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "first, second",
    [
        (dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=16)),
        (dict(r=3, lora_alpha=5), dict(r=6, lora_alpha=2, rank_pattern={"o_proj": 2})),  # larger: new tensors
        (dict(r=6, lora_alpha=5, use_rslora=True), dict(r=2, lora_alpha=7, use_rslora=True)),  # smaller: zero-padded
        (dict(r=3, use_dora=True), dict(r=5, lora_alpha=3, use_dora=True)),  # DoRA's magnitude swapped too
    ],
    ids=["same_rank", "larger_rank", "smaller_rank_rslora", "dora"],
)
def test_swap_equals_fresh_load(tmp_path: Path, first: dict, second: dict) -> None:
    a0 = save(tmp_path / "a0", tiny_llama(0), 0, target_modules=TARGETS, **first)
    a1 = save(tmp_path / "a1", tiny_llama(0), 1, target_modules=TARGETS, **second)
    expected0, expected1 = logits(PeftModel.from_pretrained(tiny_llama(0), a0)), logits(
        PeftModel.from_pretrained(tiny_llama(0), a1)
    )
    assert not torch.allclose(expected0, expected1, atol=1e-3)  # the test can fail

    model = PeftModel.from_pretrained(tiny_llama(0), a0)
    hotswap_adapter(model, a1, adapter_name="default")
    torch.testing.assert_close(logits(model), expected1, atol=ATOL, rtol=0)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.rank_pattern) == (second["r"], second["lora_alpha"],
                                                                  second.get("rank_pattern", {}))
    hotswap_adapter(model, a0, adapter_name="default")
    torch.testing.assert_close(logits(model), expected0, atol=ATOL, rtol=0)


def test_the_adapter_config_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.io import files

    a0 = save(tmp_path / "a0", tiny_llama(0), 0, target_modules=TARGETS)
    a1 = save(tmp_path / "a1", tiny_llama(0), 1, target_modules=TARGETS)
    model = PeftModel.from_pretrained(tiny_llama(0), a0)
    reads = []
    read = files.read_config_json
    monkeypatch.setattr(files, "read_config_json", lambda folder: reads.append(folder) or read(folder))
    hotswap_adapter(model, a1, adapter_name="default")
    assert reads == [Path(a1)]  # the file a swap is checked against is the one it swaps in: one read


def test_swap_into_a_named_adapter_leaves_the_others(tmp_path: Path) -> None:
    a0 = save(tmp_path / "a0", tiny_llama(0), 0, target_modules=TARGETS)
    a1 = save(tmp_path / "a1", tiny_llama(0), 1, target_modules=TARGETS)
    model = PeftModel.from_pretrained(tiny_llama(0), a0)
    model.load_adapter(a0, adapter_name="other")
    other = {k: v.clone() for k, v in model.state_dict().items() if ".other." in k}
    hotswap_adapter(model, a1, adapter_name="default")
    torch.testing.assert_close(logits(model), logits(PeftModel.from_pretrained(tiny_llama(0), a1)), atol=ATOL, rtol=0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in other.items())


def test_missing_tensors_are_zeroed(tmp_path: Path) -> None:
    """An adapter of fewer targets swaps in: the layers it lacks compute as the base (PEFT's rule)."""
    a0 = save(tmp_path / "a0", tiny_llama(0), 0, target_modules=TARGETS)
    a1 = save(tmp_path / "a1", tiny_llama(0), 1, target_modules=["q_proj"])
    model = PeftModel.from_pretrained(tiny_llama(0), a0)
    hotswap_adapter(model, a1, adapter_name="default")
    torch.testing.assert_close(logits(model), logits(PeftModel.from_pretrained(tiny_llama(0), a1)), atol=ATOL, rtol=0)
    v_proj = model.base_model.model.model.layers[0].self_attn.v_proj
    assert not v_proj.lora_A["default"].weight.any() and not v_proj.lora_B["default"].weight.any()


def test_saving_from_a_state_dict_without_a_tensor_is_refused(tmp_path: Path) -> None:
    """PEFT writes what an overridden state_dict() holds (its hot-swap test saves an adapter without one A this
    way); lorakit refuses to write a file it would refuse to load."""
    model = get_peft_model(tiny_llama(0), LoraConfig(target_modules=["q_proj"]))
    full = model.state_dict()
    key = next(k for k in full if "lora_A" in k)
    model.state_dict = lambda: {k: v for k, v in full.items() if k != key}
    with pytest.raises(lorakit.AdapterError, match=f"lacks its tensor '{key}'"):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a").exists()


# -- padding ---------------------------------------------------------------------------------------------------------
def test_padding_keeps_outputs_and_swaps_every_kind(tmp_path: Path) -> None:
    targets = ["emb", "conv", "lin"]
    a0 = save(tmp_path / "a0", kinds_base(), 0, target_modules=targets, r=2, lora_alpha=3, use_rslora=True)
    a1 = save(tmp_path / "a1", kinds_base(), 1, target_modules=targets, r=6, lora_alpha=4, use_rslora=True,
              rank_pattern={"conv": 4})
    model = PeftModel.from_pretrained(kinds_base(), a0)
    before = kinds_out(model)
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    torch.testing.assert_close(kinds_out(model), before, atol=ATOL, rtol=0)
    inner = model.base_model.model
    assert inner.emb.lora_embedding_A["default"].shape == (8, 20) and inner.emb.lora_embedding_B["default"].shape == (
        8, 8)
    assert inner.conv.lora_A["default"].weight.shape[0] == 8 and inner.conv.lora_B["default"].weight.shape[1] == 4
    assert inner.lin.lora_A["default"].out_features == 8 and inner.lin.lora_B["default"].in_features == 8
    assert model.peft_config["default"].r == 8
    scaling = inner.lin.scaling["default"]
    assert isinstance(scaling, torch.Tensor)

    params = {k: id(p) for k, p in model.named_parameters()}
    hotswap_adapter(model, a1, adapter_name="default")
    torch.testing.assert_close(kinds_out(model), kinds_out(PeftModel.from_pretrained(kinds_base(), a1)),
                               atol=ATOL, rtol=0)
    assert {k: id(p) for k, p in model.named_parameters()} == params  # in place: the same tensors
    assert inner.lin.scaling["default"] is scaling and float(scaling) == pytest.approx(4 / 6**0.5)
    hotswap_adapter(model, a0, adapter_name="default")
    torch.testing.assert_close(kinds_out(model), before, atol=ATOL, rtol=0)


def test_saving_a_padded_model_is_refused_before_writing(tmp_path: Path) -> None:
    """Padding A and B to target_rank leaves the adapter's config at its own r: a file of padded tensors would not
    load (rank differs from the config's), so save_pretrained refuses it and writes no adapter, the others included."""
    model = get_peft_model(tiny_llama(0), LoraConfig(target_modules=TARGETS, r=2), adapter_name="other")
    model.add_adapter("default", LoraConfig(target_modules=TARGETS, r=2))
    model.save_pretrained(tmp_path / "before")  # unpadded: saves
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    with pytest.raises(lorakit.AdapterError, match=r"nothing was written: .*holds rank 4 .* gives r=2.*before padding"):
        model.save_pretrained(tmp_path / "after")
    assert not (tmp_path / "after").exists()


@pytest.mark.parametrize("settings", [
    {"r": 2, "lora_alpha": 8},
    {"r": 2, "lora_alpha": 8, "use_rslora": True},
    {"r": 2, "lora_alpha": 8, "rank_pattern": {"v_proj": 3}, "alpha_pattern": {"o_proj": 5}},
], ids=["plain", "rslora", "patterns"])
@pytest.mark.parametrize("as_mapping", [True, False], ids=["peft_config", "one_config"])
def test_a_model_padded_with_its_config_saves_what_it_computes(tmp_path: Path, settings: dict,
                                                                as_mapping: bool) -> None:
    """prepare_model_for_compiled_hotswap(config=...) sets r to the target rank (as PEFT) and the alphas so that each
    layer keeps its scaling: the padded adapter, saved, loads (in lorakit and in PEFT) with the outputs it had."""
    peft = pytest.importorskip("peft")
    model = PeftModel.from_pretrained(tiny_llama(0), save(tmp_path / "a0", tiny_llama(0), 0, target_modules=TARGETS,
                                                          **settings))
    before = logits(model)
    config = model.peft_config if as_mapping else model.peft_config["default"]
    prepare_model_for_compiled_hotswap(model, target_rank=6, config=config)
    held = model.peft_config["default"]
    assert held.r == 6 and set(held.rank_pattern.values()) <= {6}
    torch.testing.assert_close(logits(model), before, atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "padded")
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "padded")), before,
                               atol=ATOL, rtol=0)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "padded")(input_ids()).logits
    torch.testing.assert_close(theirs, before, atol=1e-5, rtol=0)


def test_unpadded_kinds_grow_and_shrink(tmp_path: Path) -> None:
    """Without prepare_model_for_compiled_hotswap, a larger rank gets new tensors (grouped conv and embedding too)."""
    a0 = save(tmp_path / "a0", kinds_base(), 0, target_modules=["emb", "conv", "lin"], r=2)
    a1 = save(tmp_path / "a1", kinds_base(), 1, target_modules=["emb", "conv", "lin"], r=6)
    model = PeftModel.from_pretrained(kinds_base(), a0)
    hotswap_adapter(model, a1, adapter_name="default")
    torch.testing.assert_close(kinds_out(model), kinds_out(PeftModel.from_pretrained(kinds_base(), a1)),
                               atol=ATOL, rtol=0)
    assert model.base_model.model.conv.lora_B["default"].in_channels == 6
    hotswap_adapter(model, a0, adapter_name="default")  # rank 2 into rank-6 tensors: zero-padded
    torch.testing.assert_close(kinds_out(model), kinds_out(PeftModel.from_pretrained(kinds_base(), a0)),
                               atol=ATOL, rtol=0)


def test_padding_refusals_change_nothing() -> None:
    model = get_peft_model(kinds_base(), LoraConfig(target_modules=["conv", "lin"], r=4, rank_pattern={"lin": 6}))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"original rank is larger \(6\)"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    with pytest.raises(ValueError, match="not divisible by 2"):
        prepare_model_for_compiled_hotswap(model, target_rank=7)
    assert_unchanged(model, before)
    assert all(isinstance(s, float) for m in model.modules() if isinstance(m, lorakit.LoraLayer)
               for s in m.scaling.values())
    with pytest.raises(ValueError, match="No adapter layers found"):
        prepare_model_for_compiled_hotswap(kinds_base())
    with pytest.raises(ValueError, match="check_compiles should be one of"):
        prepare_model_for_compiled_hotswap(model, check_compiled="sometimes")


# -- errors leave the model unchanged ---------------------------------------------------------------------------------
def test_refused_swaps_leave_the_model_unchanged(tmp_path: Path) -> None:
    a0 = save(tmp_path / "a0", tiny_llama(0), 0, target_modules=TARGETS)
    model = PeftModel.from_pretrained(tiny_llama(0), a0)
    before = snapshot(model)
    cases = [
        (save(tmp_path / "more", tiny_llama(0), 1, target_modules=[*TARGETS, "k_proj"]), RuntimeError,
         r"unexpected keys found: .*layers\.0\.self_attn\.k_proj\.lora_A\.default\.weight"),
        (save(tmp_path / "rslora", tiny_llama(0), 1, target_modules=TARGETS, use_rslora=True), ValueError,
         "Configs are incompatible: for use_rslora"),
        (save(tmp_path / "dora", tiny_llama(0), 1, target_modules=TARGETS, use_dora=True), ValueError,
         "Configs are incompatible: for use_dora"),
        (other_base(tmp_path, a0), RuntimeError, "made for bases of other shapes"),
    ]
    for folder, error, message in cases:
        with pytest.raises(error, match=message):
            hotswap_adapter(model, folder, adapter_name="default")
        assert_unchanged(model, before)
    model.merge_adapter()
    merged = snapshot(model)
    with pytest.raises(ValueError, match="merged"):
        hotswap_adapter(model, a0, adapter_name="default")
    assert_unchanged(model, merged)


def other_base(tmp_path: Path, folder: Path) -> Path:
    """``folder``'s adapter with its last B one row taller, as if made for a wider base."""
    out = tmp_path / "other_base"
    shutil.copytree(folder, out)
    tensors = load_file(out / "adapter_model.safetensors")
    last = [k for k in tensors if "lora_B" in k][-1]
    tensors[last] = torch.randn(tensors[last].shape[0] + 1, tensors[last].shape[1])
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def test_a_bad_last_layer_leaves_the_first_ones_unwritten(tmp_path: Path) -> None:
    """Validation runs over every layer before the first copy: a misfit in the last layer leaves the first as they
    were (no half-swapped model)."""
    model = get_peft_model(tiny_llama(0), LoraConfig(target_modules=TARGETS, init_lora_weights=False))
    before = snapshot(model)
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items() if ".lora_" in k}
    last = [k for k in new if "lora_B" in k][-1]
    new[last] = torch.randn(new[last].shape[0] + 1, new[last].shape[1])
    with pytest.raises(RuntimeError, match="other shapes"):
        hotswap_adapter_from_state_dict(model, new, "default", model.peft_config["default"])
    assert_unchanged(model, before)
    a_key = last.replace("lora_B", "lora_A")
    new[a_key], new[last] = torch.randn(4, new[a_key].shape[1]), torch.randn(new[a_key].shape[1], 4)  # rank 4
    with pytest.raises(RuntimeError, match="config gives r=8"):
        hotswap_adapter_from_state_dict(model, new, "default", model.peft_config["default"])
    assert_unchanged(model, before)


def test_config_checks() -> None:
    check_hotswap_configs_compatible(LoraConfig(r=4, lora_alpha=2), LoraConfig(r=16, lora_alpha=64))
    with pytest.raises(ValueError, match="for lora_dropout, 0.0 != 0.1"):
        check_hotswap_configs_compatible(LoraConfig(), LoraConfig(lora_dropout=0.1))
    with pytest.raises(ValueError, match="for alpha_pattern"):
        check_hotswap_configs_compatible(LoraConfig(), LoraConfig(alpha_pattern={"q_proj": 4}))


# -- PEFT's files ----------------------------------------------------------------------------------------------------
def test_peft_saved_adapter_swaps_in(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    a0 = save(tmp_path / "a0", tiny_llama(0), 0, target_modules=TARGETS, r=4)
    torch.manual_seed(1)
    config = peft.LoraConfig(target_modules=TARGETS, r=6, lora_alpha=3, init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_llama(0), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    model = PeftModel.from_pretrained(tiny_llama(0), a0)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    hotswap_adapter(model, tmp_path / "peft", adapter_name="default")
    torch.testing.assert_close(logits(model), logits(theirs), atol=ATOL, rtol=0)


# -- compiled --------------------------------------------------------------------------------------------------------
def test_compiled_model_swaps_without_recompiling(tmp_path: Path) -> None:
    """Counted with dynamo's CompileCounter backend (the graphs run eagerly: no C++ compiler needed, quick)."""
    testing = pytest.importorskip("torch._dynamo.testing")
    a0 = save(tmp_path / "a0", kinds_base(), 0, target_modules=["lin"], r=2, lora_alpha=3)
    a1 = save(tmp_path / "a1", kinds_base(), 1, target_modules=["lin"], r=5, lora_alpha=7)
    torch._dynamo.reset()
    model = PeftModel.from_pretrained(kinds_base(), a0)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    counter = testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = kinds_out(compiled)
        frames = counter.frame_count
        hotswap_adapter(compiled, a1, adapter_name="default")
        swapped = kinds_out(compiled)
        hotswap_adapter(compiled, a0, adapter_name="default")
        back = kinds_out(compiled)
    assert counter.frame_count == frames  # nothing recompiled
    torch.testing.assert_close(swapped, kinds_out(PeftModel.from_pretrained(kinds_base(), a1)), atol=ATOL, rtol=0)
    torch.testing.assert_close(back, first, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"\*before\* compiling"):
        prepare_model_for_compiled_hotswap(compiled)
    torch._dynamo.reset()
