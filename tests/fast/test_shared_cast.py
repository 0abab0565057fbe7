"""fast.shared_cast: one autocast copy of an input for every reader, never stale, never keeping anything alive; with
the autocast of the input's own device (the ``device`` fixture: every device torch reports available)."""

from __future__ import annotations

import gc
import weakref

import torch

from lorakit.fast.shared_cast import _state, shared_cast

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def test_one_cast_for_an_unchanged_input_with_autocast_values(device):
    x = torch.randn(4, 6, device=device, requires_grad=True) * 1.0
    with torch.autocast(device.type, dtype=torch.bfloat16):
        a, b = shared_cast(x), shared_cast(x)
        with torch.no_grad():
            c = shared_cast(x)
    assert a.dtype == torch.bfloat16 and a.data_ptr() == b.data_ptr() == c.data_ptr()  # one cast, three readers
    assert a.grad_fn is not b.grad_fn and c.grad_fn is None  # a graph node per reader (none without grad)
    assert torch.equal(a, x.to(torch.bfloat16))


def test_identity_without_autocast_or_for_non_fp32(device):
    x = torch.randn(3, device=device)
    assert shared_cast(x) is x
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = x.to(torch.bfloat16)
        assert shared_cast(y) is y
        with torch.inference_mode():
            z = torch.randn(3, device=device)
            assert shared_cast(z) is z


def test_new_cast_after_the_input_changes_in_place():
    x = torch.randn(5)
    with torch.autocast(**AUTOCAST):
        first = shared_cast(x)
        x.add_(1.0)
        second = shared_cast(x)
    assert second.data_ptr() != first.data_ptr() and torch.equal(second, x.to(torch.bfloat16))


def test_another_tensor_gets_its_own_cast():
    x, y = torch.randn(5), torch.randn(5)
    with torch.autocast(**AUTOCAST):
        cx = shared_cast(x)
        cy = shared_cast(y)
    assert cy is not cx and torch.equal(cy, y.to(torch.bfloat16))


def test_holds_no_graph_and_only_the_last_cast():
    x = torch.randn(4, 6, requires_grad=True)
    with torch.autocast(**AUTOCAST):
        h = x * 2.0
        node = shared_cast(h)
        assert node.grad_fn is not None  # the reader's own node ...
        cached = _state.last[3]
        assert cached.grad_fn is None and not cached.requires_grad  # ... over a cast made outside the graph
        h_ref, cast_ref = weakref.ref(h), weakref.ref(cached)
        del h, node, cached
        gc.collect()
        assert h_ref() is None  # the cache does not keep the input alive
        shared_cast(torch.randn(3))  # the next input replaces the entry: the old cast is freed
        gc.collect()
        assert cast_ref() is None


def test_readers_gradients_are_summed_in_fp32_exactly_as_with_autocasts_own_casts(device):
    """Three readers (as q, k, v): x's gradient equals the one autocast gives with a cast per reader, to the bit
    (a cast shared in the graph would sum the three bf16 gradients in bf16)."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(5, 6, generator=gen).to(device) for _ in range(3)]
    upstream = [torch.randn(4, 5, generator=gen).to(device) for _ in range(3)]
    grads = []
    for share in (True, False):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            h = x * 1.5
            outs = [torch.nn.functional.linear(shared_cast(h) if share else h, w) for w in weights]
        torch.autograd.backward(outs, [u.to(torch.bfloat16) for u in upstream])
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_a_cast_changed_in_place_is_not_reused():
    x = torch.randn(5)
    with torch.autocast(**AUTOCAST):
        first = shared_cast(x)
        first.zero_()
        assert torch.equal(shared_cast(x), x.to(torch.bfloat16))
