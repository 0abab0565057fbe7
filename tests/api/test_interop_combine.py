"""add_weighted_adapter's TIES / DARE / magnitude-prune types against HF PEFT on a tiny llama.

The source adapters are made by PEFT (init_lora_weights=False, so A and B are random), saved, and loaded into lorakit;
both libraries then combine them and must agree per layer (delta = s * B @ A) and on the logits within 1e-5.

DARE is random. It is compared three ways: at density 1 (no pruning, deterministic); on the same random stream (PEFT
draws from the global torch RNG, lorakit from a ``generator`` seeded alike, and both draw per layer in module order, A
factors then B factors, adapters in order); and statistically (the fraction of values kept). The pure functions are
also compared one to one with ``peft.utils.merge_utils``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from peft.utils import merge_utils
from test_interop import ATOL, _logits, _lora_module_names, _max_diff, assert_same_mix, peft_pair
from torch import nn

from lorakit.ops import merge_math

WEIGHTS = [0.7, -0.4]
DENSITY = 0.5


def _sources(embedding: bool) -> dict[str, dict]:
    """Two rank-4 adapters with different targets and alphas; 'one' also on embed_tokens when ``embedding``."""
    return {
        "one": dict(target_modules=["q_proj", "v_proj", *(["embed_tokens"] if embedding else [])], r=4, lora_alpha=8),
        "two": dict(target_modules=["q_proj", "o_proj"], r=4, lora_alpha=3),
    }


def _pair(tmp_path: Path, embedding: bool = True) -> tuple[nn.Module, nn.Module]:
    """(PEFT model, lorakit model) holding the same adapters 'one' and 'two'."""
    return peft_pair(tiny_llama, _sources(embedding), tmp_path)


def _combine(model: nn.Module, combination_type: str, **options: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "The density 1.0 is greater than or equal to 1, no pruning ..."
        model.add_weighted_adapter(["one", "two"], WEIGHTS, "mix", combination_type=combination_type, **options)
    model.set_adapter("mix")


DETERMINISTIC = [
    pytest.param(combination_type, method, options, id=f"{combination_type}-{method}{'-rank3-clamp' * bool(options)}")
    for combination_type in ("ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd")
    for method in (("total", "frequency") if combination_type.startswith("ties") else ("total",))
    for options in ([{}, dict(svd_rank=3, svd_clamp=0.9)] if combination_type == "ties_svd" else [{}])
]


@pytest.mark.parametrize("combination_type, method, options", DETERMINISTIC)
def test_deterministic_types_match_peft(combination_type, method, options, tmp_path):
    theirs, ours = _pair(tmp_path)
    for model in (theirs, ours):
        _combine(model, combination_type, density=DENSITY, majority_sign_method=method, **options)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    assert_same_mix(theirs, ours, n_layers=7)  # 2 x (q, v, o) + embed


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_at_density_1_matches_peft(combination_type, tmp_path):
    theirs, ours = _pair(tmp_path)
    for model in (theirs, ours):
        _combine(model, combination_type, density=1.0, majority_sign_method="frequency")
    assert_same_mix(theirs, ours, n_layers=7)  # 2 x (q, v, o) + embed


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_on_the_same_random_stream_matches_peft(combination_type, tmp_path, monkeypatch):
    """PEFT seeded right after it created the new adapter (which also draws random numbers), lorakit given a
    generator with that seed: the same Bernoulli draws in the same order give the same adapter. Without embed_tokens,
    whose dense delta PEFT lays out transposed (so its *_svd masks would be drawn in another order)."""
    theirs, ours = _pair(tmp_path, embedding=False)
    inject = theirs.base_model.inject_adapter

    def inject_then_seed(*args: object, **kwargs: object) -> None:
        inject(*args, **kwargs)
        torch.manual_seed(1234)

    monkeypatch.setattr(theirs.base_model, "inject_adapter", inject_then_seed)
    _combine(theirs, combination_type, density=DENSITY)
    _combine(ours, combination_type, density=DENSITY, generator=torch.Generator().manual_seed(1234))
    names = _lora_module_names(theirs.get_base_model(), "mix")
    assert names == _lora_module_names(ours.get_base_model(), "mix") and len(names) == 6
    our_layers = dict(ours.get_base_model().named_modules())
    for name, module in theirs.get_base_model().named_modules():
        if name in names:
            assert _max_diff(our_layers[name].delta_weight("mix"), module.get_delta_weight("mix")) < ATOL, name
    assert _max_diff(_logits(ours), _logits(theirs)) < ATOL

    # statistics: v_proj holds only adapter 'one', so its merged A keeps ~DENSITY of A's values (4 x 32 of them)
    if not combination_type.endswith("svd"):
        A, _ = our_layers["model.layers.0.self_attn.v_proj"].lora_weights("mix")
        assert abs((A != 0).float().mean().item() - DENSITY) < 0.2  # 4.5 sigma


def test_dare_differs_between_seeds_and_repeats_with_one(tmp_path):
    _, ours = _pair(tmp_path, embedding=False)
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        ours.add_weighted_adapter(
            ["one", "two"], WEIGHTS, name, "dare_ties", density=DENSITY, generator=torch.Generator().manual_seed(seed)
        )
    q = ours.get_base_model().model.layers[1].self_attn.q_proj
    assert torch.equal(q.delta_weight("a"), q.delta_weight("b"))
    assert _max_diff(q.delta_weight("a"), q.delta_weight("c")) > 1e-3


# -- the pure functions one to one against peft.utils.merge_utils --------------------------------------------------
def _tasks(seed: int, shape: tuple[int, ...] = (6, 10), n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_merge_functions_equal_peft(density, method):
    tasks, weights = _tasks(0), [0.8, -0.5, 1.3]
    w = torch.tensor(weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns at density 1
        pairs = [
            (merge_math.task_arithmetic(tasks, weights), merge_utils.task_arithmetic(tasks, w)),
            (merge_math.magnitude_prune(tasks, weights, density), merge_utils.magnitude_prune(tasks, w, density)),
            (merge_math.ties(tasks, weights, density, method), merge_utils.ties(tasks, w, density, method)),
        ]
        torch.manual_seed(9)  # PEFT draws from the global RNG, lorakit from the generator given
        dare_linear = merge_utils.dare_linear(tasks, w, density)
        torch.manual_seed(9)
        dare_ties = merge_utils.dare_ties(tasks, w, density, method)
    pairs += [
        (merge_math.dare_linear(tasks, weights, density, torch.Generator().manual_seed(9)), dare_linear),
        (merge_math.dare_ties(tasks, weights, density, method, torch.Generator().manual_seed(9)), dare_ties),
    ]
    for got, expected in pairs:
        assert got.abs().max() > 0.1
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
