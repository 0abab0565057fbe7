"""Property tests (hypothesis): config parsing never fails with anything but its documented errors, the merge maths
holds for random shapes and weights, and random or mutated adapter files only ever raise AdapterFileError.

Documented errors: ``LoraConfig.from_dict`` raises ConfigError (a ValueError) for a bad value, TypeError for a value
of a type it cannot take; everything read from a file (``io.read_config``, ``io.read_weights``,
``PeftModel.from_pretrained``) raises AdapterFileError naming the file. Runs are derandomized (same examples every
run) and keep no example database, so they are repeatable and write nothing into the repository.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lorakit import AdapterFileError, ConfigError, LoraConfig, PeftModel, get_peft_model
from lorakit.adapters import combine
from lorakit.adapters.targets import TargetError
from lorakit.config import read_config
from lorakit.config_json import NEUTRAL_PEFT_KEYS
from lorakit.io import files as lio

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip

# -- LoraConfig.from_dict on random dicts -------------------------------------------------------------------------
SCALAR = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FIELDS = [f.name for f in dataclasses.fields(LoraConfig)]
# a plausible value per field, so that validation gets past the first field and reaches the others
PLAUSIBLE = {
    "r": st.integers(-2, 64), "lora_alpha": st.floats(-1, 64) | st.integers(-1, 64),
    "lora_dropout": st.floats(-0.5, 1.5), "bias": st.sampled_from(["none", "all", "lora_only", "some"]),
    "target_modules": st.none() | st.lists(st.sampled_from(["q_proj", "v_proj", "x"]), max_size=3)
    | st.sampled_from(["all-linear", ".*q_proj", "(", "q_proj"]),
    "init_lora_weights": st.booleans() | st.sampled_from(["gaussian", "pissa", "xavier", "loftq"]),
    "task_type": st.none() | st.sampled_from(["CAUSAL_LM", "causal_lm", "SEQ_CLS", "TRANSLATE"]),
    "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "v_proj", "("]), st.integers(-1, 8), max_size=2),
    "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", "v_proj"]), st.floats(-1, 8), max_size=2),
    "layers_to_transform": st.none() | st.integers(-1, 3) | st.lists(st.integers(-1, 3), max_size=3),
    "layers_pattern": st.none() | st.sampled_from(["layers", "h"]),
    "peft_type": st.sampled_from(["LORA", "IA3"]),
}  # fmt: skip
KEYS = [*FIELDS, *NEUTRAL_PEFT_KEYS, "peft_type", "peft_version"]


@st.composite
def config_dicts(draw: st.DrawFn, patterns_as_dicts: bool = False) -> dict:
    """Dicts of LoraConfig / PEFT keys (and maybe one unknown key), each holding a plausible value or a value of any
    JSON type. ``patterns_as_dicts``: rank_pattern / alpha_pattern only hold dicts (see the xfail test below)."""
    out = {}
    for key in draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=8, unique=True)):
        plausible = PLAUSIBLE.get(key, st.nothing())
        if patterns_as_dicts and key in ("rank_pattern", "alpha_pattern"):
            out[key] = draw(plausible)
        else:
            out[key] = draw(st.one_of(plausible, SCALAR, JSON))
    if draw(st.booleans()):
        out[draw(st.text(max_size=8))] = draw(JSON)
    return out


def _json(config: LoraConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)  # NaN-safe comparison


@FUZZ
@given(config_dicts(patterns_as_dicts=True))
def test_from_dict_raises_only_its_documented_errors(data: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys warn
        try:
            config = LoraConfig.from_dict(data)
        except (ConfigError, TypeError):
            return
        assert _json(LoraConfig.from_dict(config.to_dict())) == _json(config)  # what it accepts survives a round trip


@pytest.mark.parametrize("data", [{"rank_pattern": "q_proj"}, {"alpha_pattern": [1]}])
def test_from_dict_pattern_that_is_not_a_dict_is_a_config_error(data: dict) -> None:
    """Known gap (the fix belongs in LoraConfig.validate): a non-dict pattern raises AttributeError. Files are safe:
    io.read_config checks every field's JSON type first. Remove patterns_as_dicts above once this passes."""
    with pytest.raises((ConfigError, TypeError)):
        LoraConfig.from_dict(data)


@FUZZ
@given(config_dicts())
def test_config_file_gives_a_config_or_adapter_file_error(tmp_path_factory: pytest.TempPathFactory, data: dict) -> None:
    folder = tmp_path_factory.mktemp("cfg")
    (folder / lio.CONFIG_NAME).write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read_config(folder)
        except AdapterFileError as e:
            assert str(folder / lio.CONFIG_NAME) in str(e)


# -- merge maths --------------------------------------------------------------------------------------------------
class _Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


SHAPE = st.integers(1, 12)


@FUZZ
@given(SHAPE, SHAPE, st.integers(1, 6), st.floats(0.1, 32), st.booleans(), st.integers(0, 2**16))
def test_merge_then_unmerge_restores_the_base_weight(
    n_in: int, n_out: int, r: int, alpha: float, rslora: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    base = _Linear(n_in, n_out)
    weight = base.lin.weight.detach().clone()
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["lin"], init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    x = torch.randn(3, n_in)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        merged_weight = model.get_base_model().lin.base_layer.weight.detach().clone()
        merged = model(x)
        model.unmerge_adapter()
        after = model(x)
    params = dict(model.named_parameters())
    A, B = (next(v for k, v in params.items() if f"lora_{m}" in k).detach() for m in "AB")  # (r, in), (out, r)
    s = alpha / r**0.5 if rslora else alpha / r
    torch.testing.assert_close(merged_weight, weight + s * B @ A, atol=1e-5, rtol=1e-5)  # the dense reference
    scale = max(1.0, unmerged.abs().max().item())
    torch.testing.assert_close(merged, unmerged, atol=1e-5 * scale, rtol=1e-5)  # x @ (W + s B A).T == unmerged
    torch.testing.assert_close(after, unmerged, atol=1e-5 * scale, rtol=1e-5)
    restored = model.get_base_model().lin.base_layer.weight
    delta = (merged_weight - weight).abs().max().item()
    torch.testing.assert_close(restored, weight, atol=1e-6 * max(1.0, delta), rtol=1e-6)


@st.composite
def adapters(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """1-4 adapters of one (out, in) layer with their own ranks: A_i (r_i, in), B_i (out, r_i), weights."""
    n_in, n_out, n = draw(SHAPE), draw(SHAPE), draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ranks = [draw(st.integers(1, 5)) for _ in range(n)]
    As = [torch.randn(r, n_in, generator=gen) for r in ranks]
    Bs = [torch.randn(n_out, r, generator=gen) for r in ranks]
    weights = [draw(st.floats(-2, 2)) for _ in range(n)]
    return As, Bs, weights


def _weighted_sum(As: list[torch.Tensor], Bs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * (b @ a) for w, a, b in zip(weights, As, Bs))  # (out, in)


@FUZZ
@given(adapters())
def test_cat_delta_is_the_weighted_sum_of_deltas(case: tuple) -> None:
    As, Bs, weights = case
    A, B = combine.cat(As, Bs, weights)
    assert A.shape == (sum(a.shape[0] for a in As), As[0].shape[1]) and B.shape == (Bs[0].shape[0], A.shape[0])
    torch.testing.assert_close(B @ A, _weighted_sum(As, Bs, weights), atol=1e-5, rtol=1e-5)


@FUZZ
@given(adapters())
def test_svd_at_full_rank_reproduces_the_weighted_sum(case: tuple) -> None:
    As, Bs, weights = case
    deltas = [b @ a for a, b in zip(As, Bs)]
    full = min(deltas[0].shape)
    A, B = combine.svd(deltas, weights, rank=full)
    assert A.shape == (full, As[0].shape[1]) and B.shape == (Bs[0].shape[0], full)
    expected = _weighted_sum(As, Bs, weights)
    torch.testing.assert_close(B @ A, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), rtol=1e-4)


# -- random and mutated adapter files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved adapter (r=4 on q_proj, v_proj of the tiny llama)."""
    folder = tmp_path_factory.mktemp("valid")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(folder)
    return folder


def _flip(data: bytes, positions: list[int], bits: list[int]) -> bytes:
    out = bytearray(data)
    for pos, bit in zip(positions, bits):
        out[pos % len(out)] ^= 1 << bit
    return bytes(out)


@st.composite
def mutated(draw: st.DrawFn, data: bytes, safetensors: bool) -> bytes:
    """``data`` (a valid file) replaced by random bytes, truncated, bit-flipped (in the header, for safetensors),
    edited (a valid JSON config / safetensors header with changed values), or for safetensors given another header
    length, small or huge."""
    kinds = ["random", "truncated", "flipped", "edited"] + (["header length"] if safetensors else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "edited":
        return draw(edited_header(data) if safetensors else edited_config(data))
    span = 8 + struct.unpack("<Q", data[:8])[0] if safetensors else len(data)  # safetensors: u64 length + JSON
    if kind == "flipped":  # 1-4 bits anywhere (hypothesis' own integers favour small ones: the file's start)
        rnd = draw(st.randoms(use_true_random=False))
        n = rnd.randint(1, 4)
        return _flip(data, [rnd.randrange(span) for _ in range(n)], [rnd.randrange(8) for _ in range(n)])
    length = draw(st.sampled_from([0, 1, span - 9, span - 7, len(data), 2**32, 2**63, 2**64 - 1]))
    return struct.pack("<Q", length) + data[8:]


# Values an edit may put into a config. Ranks stay below 2**12: from_pretrained allocates (r, in) before it reads
# the file, so a huge r is an allocator error (see test_config_with_a_huge_rank_is_an_adapter_file_error).
SMALL = st.none() | st.booleans() | st.integers(-(2**12), 2**12) | st.floats() | st.text(max_size=8)
SMALL_JSON = st.recursive(SMALL, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                          inner, max_size=3), max_leaves=6)  # fmt: skip


@st.composite
def edited_config(draw: st.DrawFn, data: bytes) -> bytes:
    """The config with 1-2 values replaced (a plausible value, or any JSON value)."""
    config = json.loads(data)
    for key in draw(st.lists(st.sampled_from(sorted(config)), min_size=1, max_size=2, unique=True)):
        config[key] = draw(st.one_of(PLAUSIBLE.get(key, st.nothing()), SMALL, SMALL_JSON))
    return json.dumps(config).encode()


@st.composite
def edited_header(draw: st.DrawFn, data: bytes) -> bytes:
    """The safetensors file with one header entry changed: dtype, shape (transposed, or any), offsets, name, dropped,
    or the metadata; the header length is rewritten to match, so the file gets past the length check."""
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    edit = draw(st.sampled_from(["dtype", "transpose", "shape", "offsets", "rename", "drop", "metadata"]))
    if edit == "dtype":
        entry["dtype"] = draw(st.sampled_from(["I32", "U32", "F16", "BF16", "F64", "BOOL", "U8", "F8_E4M3", "X", 1]))
    elif edit == "transpose":
        entry["shape"] = entry["shape"][::-1]
    elif edit == "shape":
        entry["shape"] = draw(st.lists(st.integers(-1, 2**40) | st.sampled_from([0, 1, 2, 4, 8, 16, 32, 128]),
                                       max_size=3) | SMALL)  # fmt: skip
    elif edit == "offsets":
        entry["data_offsets"] = draw(st.lists(st.integers(-1, 2**64), min_size=0, max_size=3) | SMALL)
    elif edit == "rename":
        header[draw(st.sampled_from([name[:-1], name.replace("lora_A", "lora_B"), name + ".x", "", "x"]))] = entry
        del header[name]
    elif edit == "drop":
        del header[name]
    else:
        header["__metadata__"] = draw(SMALL_JSON)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _load_only_adapter_file_errors(folder: Path, name: str) -> None:
    """read_config / read_weights / PeftModel.from_pretrained on ``folder`` raise nothing but AdapterFileError naming
    the file ``name`` (from_pretrained also TargetError for a config whose targets are not in the model: see
    test_config_whose_targets_are_not_in_the_model_is_an_adapter_file_error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for load in (read_config, lio.read_weights, lambda f: PeftModel.from_pretrained(tiny_llama(), f)):
            try:
                load(folder)
            except AdapterFileError as e:
                assert name in str(e), str(e)
            except TargetError:
                assert load not in (read_config, lio.read_weights)


@FUZZ
@given(st.data())
def test_random_or_mutated_weights_raise_only_adapter_file_error(
    valid: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    folder = tmp_path_factory.mktemp("weights")
    (folder / lio.CONFIG_NAME).write_bytes((valid / lio.CONFIG_NAME).read_bytes())
    weights = data.draw(mutated((valid / lio.WEIGHTS_NAME).read_bytes(), safetensors=True))
    (folder / lio.WEIGHTS_NAME).write_bytes(weights)
    _load_only_adapter_file_errors(folder, lio.WEIGHTS_NAME)


@FUZZ
@given(st.data())
def test_random_or_mutated_config_raise_only_adapter_file_error(
    valid: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    folder = tmp_path_factory.mktemp("config")
    (folder / lio.WEIGHTS_NAME).write_bytes((valid / lio.WEIGHTS_NAME).read_bytes())
    config = data.draw(mutated((valid / lio.CONFIG_NAME).read_bytes(), safetensors=False))
    (folder / lio.CONFIG_NAME).write_bytes(config)
    _load_only_adapter_file_errors(folder, lio.CONFIG_NAME)


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, '{"r": ' + "9" * 5000 + "}", '{"r": 1e999}', '{"r": NaN}', '{"target_modules": "("}', "\ud800"],
)
def test_pathological_json_is_an_adapter_file_error(valid: Path, tmp_path: Path, text: str) -> None:
    """Deep nesting (RecursionError), too many digits (ValueError), inf, NaN, a bad regex, a lone surrogate."""
    (tmp_path / lio.WEIGHTS_NAME).write_bytes((valid / lio.WEIGHTS_NAME).read_bytes())
    (tmp_path / lio.CONFIG_NAME).write_bytes(text.encode("utf-8", "surrogatepass"))
    with pytest.raises(AdapterFileError, match=lio.CONFIG_NAME):
        read_config(tmp_path)


def _with_config(valid: Path, folder: Path, **changes: object) -> Path:
    config = json.loads((valid / lio.CONFIG_NAME).read_text())
    (folder / lio.CONFIG_NAME).write_text(json.dumps({**config, **changes}))
    (folder / lio.WEIGHTS_NAME).write_bytes((valid / lio.WEIGHTS_NAME).read_bytes())
    return folder


# Known gaps of PeftModel.from_pretrained (peft_model.py): it builds the adapter from the config before it reads the
# file. Strict: when fixed, these pass, and the restrictions above (SMALL, TargetError) can go.
def test_config_whose_targets_are_not_in_the_model_is_an_adapter_file_error(valid: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterFileError, match=lio.CONFIG_NAME):
        PeftModel.from_pretrained(tiny_llama(), _with_config(valid, tmp_path, target_modules=["q_prj"]))


def test_config_with_a_huge_rank_is_an_adapter_file_error(valid: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterFileError, match=lio.WEIGHTS_NAME):
        PeftModel.from_pretrained(tiny_llama(), _with_config(valid, tmp_path, r=2**40))
