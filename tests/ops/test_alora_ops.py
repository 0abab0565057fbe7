"""lorakit.ops.alora (Activated LoRA's offsets, activation mask and masked update) against loop references."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops import alora


def _last_offset_reference(row: list[int], invocation: list[int]) -> int | None:
    """Every start position, compared element by element; the last match counted from the end."""
    k, starts = len(invocation), []
    for i in range(len(row) - k + 1):
        if row[i : i + k] == invocation:
            starts.append(i)
    return len(row) - starts[-1] if starts else None


@pytest.mark.parametrize("seed", range(20))
def test_last_offset_equals_the_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    row = torch.randint(0, 3, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)  # small vocab: hits
    invocation = torch.randint(0, 3, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
    assert alora.last_offset(row, invocation) == _last_offset_reference(row.tolist(), invocation)


@pytest.mark.parametrize(
    "ids, invocation, expected",
    [  # PEFT's cases (tests/test_lora_variants.py::TestActivatedLora), and edges
        ([[0, 1, 2, 3], [0, 4, 5, 6]], [1, 2], [3, None]),
        ([[1, 2, 1, 2], [0, 4, 1, 2]], [1, 2], [2, 2]),
        ([[1, 2, 3, 4], [0, 4, 1, 4]], [1, 2], [4, None]),
        ([[1, 2, 3]], [1, 2, 3, 4], [None]),  # longer than the row
        ([[5, 5, 5]], [5], [1]),  # the last occurrence
    ],
)
def test_offsets_per_row(ids, invocation, expected):
    assert alora.offsets(torch.tensor(ids), [invocation] * len(ids)) == expected


def test_offsets_take_each_rows_own_invocation_and_none():
    ids = torch.tensor([[0, 1, 1], [0, 2, 2], [0, 2, 2]])
    assert alora.offsets(ids, [[1], [2], None]) == [1, 1, None]
    with pytest.raises(ValueError, match="2 invocation sequences for 3 rows"):
        alora.offsets(ids, [[1], [2]])


def test_activation_mask_equals_the_loop_reference():
    offsets, length = [3, None, 1, 9, 5], 5
    expected = torch.zeros(len(offsets), length, dtype=torch.bool)
    for b, o in enumerate(offsets):
        for t in range(length):
            expected[b, t] = o is not None and t >= length - min(o, length)
    assert torch.equal(alora.activation_mask(offsets, length), expected)
    assert alora.activation_mask([4], 1).tolist() == [[True]]  # one decoding step: past the invocation


@pytest.mark.parametrize("shape", [(3, 5, 6), (3, 6)])
def test_masked_add_equals_the_dense_reference_values_and_gradients(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    A, B = torch.randn(2, 6, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    result = torch.randn(*shape[:-1], 4, requires_grad=True)
    length = shape[1] if len(shape) == 3 else 1
    mask = alora.activation_mask([2, None, 7], length)
    out = alora.masked_add(result, x, mask, lambda h: h @ A.T @ B.T * 0.5)
    keep = mask.reshape(*shape[:-1], 1).float()
    expected = result + keep * (x @ A.T @ B.T * 0.5)
    assert torch.allclose(out, expected, atol=1e-6)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, A, B, result), grad)
    theirs = torch.autograd.grad(expected, (x, A, B, result), grad)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))
    assert (ours[1].abs().sum() > 0) and not torch.equal(out, result)


def test_masked_add_without_active_positions_returns_the_result_and_checks_the_mask():
    result, x = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    calls = []
    out = alora.masked_add(result, x, torch.zeros(2, 3, dtype=torch.bool), lambda h: calls.append(h) or h)
    assert out is result and not calls  # the update is not even computed
    with pytest.raises(ValueError, match="does not fit output"):
        alora.masked_add(result, x, torch.ones(3, 3, dtype=torch.bool), lambda h: h)
