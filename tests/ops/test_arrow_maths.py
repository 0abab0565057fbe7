"""lorakit.ops.arrow against dense references: the prototype against torch.linalg.svd of B @ A (up to sign) and against
PEFT's power iteration (the same start vector from the same seed), the routing and the mixed update against a
per-token loop, GenKnowSub against the plain subtraction of the mean."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import ArrowConfig as PeftArrowConfig
from peft.tuners.lora.arrow import ArrowLoraLinearLayer

from lorakit.ops import arrow

R, IN, OUT, E, T = 4, 16, 12, 3, 10


def _factors(singular: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r), v1 (in,)): B @ A = U diag(singular) V.T with random orthonormal U, V; v1 = V[:, 0]."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(OUT, R, generator=g))  # (out, r)
    V, _ = torch.linalg.qr(torch.randn(IN, R, generator=g))  # (in, r)
    A = torch.tensor(singular).unsqueeze(1) * V.T  # (r, in)
    mix = torch.linalg.qr(torch.randn(R, R, generator=g))[0]  # B @ A unchanged by an orthogonal mix of the rank space
    return mix @ A, U @ mix.T, V[:, 0]


def _same_up_to_sign(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    sign = torch.sign(a @ b)
    torch.testing.assert_close(a * sign, b, atol=atol, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prototype_is_the_top_right_singular_vector_of_BA(seed):
    A, B, v1 = _factors([5.0, 2.0, 1.0, 0.5], seed)  # a clear gap: (2/5)^30 after 15 iterations
    ours = arrow.top_right_singular_vector(A, B, seed=seed)
    _, _, Vh = torch.linalg.svd(B @ A)  # the dense reference
    assert ours.dtype == torch.float32 and ours.shape == (IN,)
    _same_up_to_sign(ours, Vh[0], atol=1e-5)
    _same_up_to_sign(ours, v1, atol=1e-5)


def test_prototype_of_random_factors_matches_svd():
    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)
    _, S, Vh = torch.linalg.svd(B @ A)
    assert S[1] / S[0] < 0.7  # a gap the 15 iterations close to about (0.7 ** 2) ** 15 = 2e-5
    _same_up_to_sign(arrow.top_right_singular_vector(A, B, seed=0), Vh[0], atol=1e-4)


@pytest.mark.parametrize("seed", [None, 0, 42])
def test_prototype_equals_peft_for_the_same_seed(seed):
    A, B, _ = _factors([3.0, 2.9, 1.0, 0.5], 0)  # a close pair: 15 iterations do not converge, so the start counts
    config = PeftArrowConfig(rng_seed=seed)
    config.task_adapter_names = []
    peft_layer = ArrowLoraLinearLayer(IN, config)
    torch.manual_seed(5)  # seed None: both draw from torch's global generator
    theirs = peft_layer.top_right_singular_vec_from_BA(A, B)
    torch.manual_seed(5)
    ours = arrow.top_right_singular_vector(A, B, seed=seed)
    assert torch.equal(ours, theirs)
    if seed is not None:  # the start vector matters: another seed gives another (unconverged) vector
        assert not torch.allclose(arrow.top_right_singular_vector(A, B, seed=seed + 1), ours, atol=1e-4)


def _loop_weights(tokens: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    weights = torch.zeros(tokens.shape[0], prototypes.shape[0])
    for t, x in enumerate(tokens):
        scores = [abs(float(x @ p)) for p in prototypes]
        chosen = sorted(range(len(scores)), key=lambda e: -scores[e])[:top_k]
        exps = [torch.exp(torch.tensor(scores[e] / temperature)) for e in chosen]
        for e, value in zip(chosen, exps):
            weights[t, e] = value / sum(exps)
    return weights


@pytest.mark.parametrize("top_k, temperature", [(1, 1.0), (2, 1.0), (2, 0.3), (3, 2.0)])
def test_routing_weights_equal_a_per_token_loop(top_k, temperature):
    g = torch.Generator().manual_seed(top_k)
    tokens, prototypes = torch.randn(T, IN, generator=g), torch.randn(E, IN, generator=g)
    weights = arrow.routing_weights(tokens, prototypes, top_k, temperature)
    torch.testing.assert_close(weights, _loop_weights(tokens, prototypes, top_k, temperature), atol=1e-6, rtol=1e-5)
    assert ((weights > 0).sum(1) == top_k).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(T))
    # sign-free: a prototype and its negative route alike
    torch.testing.assert_close(arrow.routing_weights(tokens, -prototypes, top_k, temperature), weights)


def test_top_k_above_the_experts_names_the_fix():
    with pytest.raises(ValueError, match=r"top_k=4 is more than the 3 task adapters.*at most 3"):
        arrow.routing_weights(torch.randn(T, IN), torch.randn(E, IN), 4, 1.0)


def test_mixed_update_equals_a_per_token_loop():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(T, IN, generator=g)
    A, B = torch.randn(E, R, IN, generator=g), torch.randn(E, OUT, R, generator=g)
    scales = torch.tensor([0.5, 2.0, 1.0])
    weights = arrow.routing_weights(tokens, torch.randn(E, IN, generator=g), 2, 1.0)
    reference = torch.stack([
        sum(weights[t, e] * scales[e] * (B[e] @ A[e] @ tokens[t]) for e in range(E)) for t in range(T)
    ])
    torch.testing.assert_close(arrow.mixed_update(tokens, A, B, scales, weights), reference, atol=1e-5, rtol=1e-5)


def test_subtract_general_is_the_factors_minus_the_mean():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)
    general = [(torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)) for _ in range(3)]
    new_A, new_B = arrow.subtract_general(A, B, arrow.general_mean(general))
    torch.testing.assert_close(new_A, A - (general[0][0] + general[1][0] + general[2][0]) / 3)
    torch.testing.assert_close(new_B, B - (general[0][1] + general[1][1] + general[2][1]) / 3)
    with pytest.raises(ValueError, match=r"at least one general adapter: pass general_adapter_paths"):
        arrow.general_mean([])
