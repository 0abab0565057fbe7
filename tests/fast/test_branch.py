"""fast.branch: the lean LoRA branch equals the textbook composition (outputs and gradients), dropout included, on
every device torch reports available (the ``device`` fixture); on others it steps aside (test_fast_devices.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.fast import branch


def _inputs(dtype=torch.float32, shape=(3, 5), n_in=6, n_out=7, r=4, seed=0, device="cpu"):
    """x, W (stands for the base layer), A, B: leaves requiring grad, drawn on the CPU (same values everywhere)."""
    g = torch.Generator().manual_seed(seed)
    draws = [(*shape, n_in), (n_out, n_in), (r, n_in), (n_out, r)]
    return tuple(torch.randn(d, generator=g, dtype=dtype).to(device).requires_grad_() for d in draws)


def _grads(out, tensors, seed=1):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, upstream.to(out.device))


def _no_float64(device):
    if device.type == "mps":
        pytest.skip("MPS has no float64 (the fast branch's dropout steps aside there)")


def _keep_mask(shape, dropped):
    """The 0 / 1 float mask with 0 at the flat positions ``dropped``: what reference_with_mask takes."""
    mask = torch.ones(shape, device=dropped.device)
    mask.view(-1)[dropped.long()] = 0.0
    return mask


@pytest.mark.parametrize("with_dropout", [False, True])
def test_branch_equals_autograd_composition_values_and_gradients(with_dropout, device):
    if with_dropout:
        _no_float64(device)
    x, W, A, B = _inputs(device=device)
    torch.manual_seed(2)
    dropped = branch.dropped_positions(x.numel(), 0.3, x.device) if with_dropout else None
    mask, keep = (_keep_mask(x.shape, dropped), 1 / 0.7) if with_dropout else (None, 1.0)
    fast = branch.LoraBranch.apply(x @ W.T, x, A, B, 0.5, dropped, keep)
    ref = branch.reference_with_mask(x @ W.T, x, A, B, 0.5, mask, keep)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(fast, (x, W, A, B)), _grads(ref, (x, W, A, B)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 3), (15,)])
def test_branch_drops_by_position_on_a_non_contiguous_input(shape, device):
    """Positions index x's row-major order when x is a transposed view: a 3-d one (reshaped to rows by a copy) and
    a 2-d one (its rows are x itself)."""
    x, W, A, B = _inputs(shape=shape, device=device)
    xt = x.transpose(0, 1) if len(shape) == 2 else x.detach().T.contiguous().T.requires_grad_()
    assert not xt.is_contiguous()
    dropped = torch.tensor([0, 7, 8, 40, 89], dtype=torch.int32, device=device)
    fast = branch.LoraBranch.apply(xt @ W.T, xt, A, B, 0.5, dropped, 2.0)
    ref = branch.reference_with_mask(xt @ W.T, xt, A, B, 0.5, _keep_mask(xt.shape, dropped), 2.0)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(fast, (xt, A, B)), _grads(ref, (xt, A, B)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backward_leaves_saved_tensors_untouched(device):
    """A second backward through the same graph gives the same gradients, and x and the positions are unchanged."""
    _no_float64(device)
    x, W, A, B = _inputs(device=device)
    torch.manual_seed(2)
    dropped = branch.dropped_positions(x.numel(), 0.3, x.device)
    x_before, dropped_before = x.detach().clone(), dropped.clone()
    out = branch.LoraBranch.apply(x @ W.T, x, A, B, 0.5, dropped, 1 / 0.7)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    first = torch.autograd.grad(out, (x, A, B), upstream, retain_graph=True)
    second = torch.autograd.grad(out, (x, A, B), upstream)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(x.detach(), x_before) and torch.equal(dropped, dropped_before)


@pytest.mark.parametrize("with_dropout", [False, True])
def test_branch_gradcheck_float64(with_dropout, device):
    _no_float64(device)
    x, W, A, B = _inputs(torch.float64, shape=(2, 3), n_in=4, n_out=3, r=2, device=device)
    base = (x @ W.T).detach().requires_grad_()
    column_1 = torch.tensor([1, 5, 9, 13, 17, 21], dtype=torch.int32, device=device)  # column 1 of each row
    dropped = column_1 if with_dropout else None
    assert torch.autograd.gradcheck(
        lambda b, x_, a, b_: branch.LoraBranch.apply(b, x_, a, b_, 0.75, dropped, 2.0), (base, x, A, B)
    )


def test_lora_add_without_dropout_equals_reference_in_every_mode(device):
    x, W, A, B = _inputs(device=device)
    ident = nn.Identity()
    want = branch.reference(x @ W.T, x, A, B, 2.0, ident)
    torch.testing.assert_close(branch.lora_add(x @ W.T, x, A, B, 2.0, ident), want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(branch.lora_add(x @ W.T, x, A, B, 2.0, ident), want, rtol=1e-6, atol=1e-6)
    dropout_eval = nn.Dropout(0.3).eval()  # dropout in eval mode is the identity
    torch.testing.assert_close(branch.lora_add(x @ W.T, x, A, B, 2.0, dropout_eval), want, rtol=1e-6, atol=1e-6)


def test_lora_add_with_dropout_uses_the_drawn_positions(device):
    """Same RNG state: lora_add equals the masked reference with the positions dropped_positions draws."""
    _no_float64(device)
    x, W, A, B = _inputs(shape=(4, 9), device=device)
    torch.manual_seed(5)
    fast = branch.lora_add(x @ W.T, x, A, B, 0.5, nn.Dropout(0.25).train())
    torch.manual_seed(5)
    dropped = branch.dropped_positions(x.numel(), 0.25, x.device)
    ref = branch.reference_with_mask(x @ W.T, x, A, B, 0.5, _keep_mask(x.shape, dropped), 1 / 0.75)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(fast, (x, W, A, B)), _grads(ref, (x, W, A, B)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert 0 < len(dropped) < x.numel()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_dropped_positions_drop_each_element_with_probability_p_independently(p, device):
    _no_float64(device)
    torch.manual_seed(0)
    n = 10**6
    dropped = branch.dropped_positions(n, p, device)
    assert dropped.device.type == device.type
    assert dropped.dtype == torch.int32 and dropped.dim() == 1
    assert bool((dropped[1:] > dropped[:-1]).all()) and 0 <= int(dropped[0]) and int(dropped[-1]) < n
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(len(dropped) - n * p) < 5 * sd  # the drop count: Binomial(n, p), 5 sigma
    mask = _keep_mask((1000, 1000), dropped)
    m = mask - mask.mean()  # no visible correlation between neighbours in a row or a column
    assert abs((m[:, 1:] * m[:, :-1]).mean().item()) < 5 * p * (1 - p) / 1e3
    assert abs((m[1:] * m[:-1]).mean().item()) < 5 * p * (1 - p) / 1e3
    gaps = torch.diff(dropped.long()).double()  # Geometric(p): mean 1 / p, variance (1 - p) / p**2
    assert abs(gaps.mean().item() - 1 / p) < 5 * ((1 - p) / p**2 / len(gaps)) ** 0.5
    assert abs(gaps.var().item() / ((1 - p) / p**2) - 1) < 0.05


def test_dropped_positions_every_position_equally_likely_including_the_ends():
    """Many draws over 12 elements: each position is dropped with frequency p (first and last included) and the
    count's variance is the binomial n p (1 - p)."""
    torch.manual_seed(1)
    n, p, trials = 12, 0.3, 20000
    hits, counts = torch.zeros(n), []
    for _ in range(trials):
        dropped = branch.dropped_positions(n, p, torch.device("cpu")).long()
        hits[dropped] += 1
        counts.append(len(dropped))
    sd = (p * (1 - p) / trials) ** 0.5
    assert ((hits / trials - p).abs() < 5 * sd).all(), hits / trials
    counts = torch.tensor(counts, dtype=torch.float64)
    assert abs(counts.var().item() / (n * p * (1 - p)) - 1) < 0.05


def test_dropped_positions_with_several_rounds_of_draws(monkeypatch):
    """Rounds that fall short of n (forced here; ~1e-9 of real calls) continue where the last drop left off."""
    monkeypatch.setattr(branch, "_MARGIN_SD", -50.0)  # each round draws far fewer gaps than needed
    torch.manual_seed(0)
    n, p = 10**5, 0.2
    dropped = branch.dropped_positions(n, p, torch.device("cpu"))
    assert bool((dropped[1:] > dropped[:-1]).all()) and int(dropped[-1]) < n
    assert abs(len(dropped) - n * p) < 5 * (n * p * (1 - p)) ** 0.5
    assert int(dropped[-1]) > n - 100  # the draws reached the end


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_dropped_positions_rejects_p_outside_0_1(p):
    with pytest.raises(ValueError, match="not in \\(0, 1\\)"):
        branch.dropped_positions(3, p, torch.device("cpu"))


def test_branch_under_bf16_autocast_is_close_to_fp32_and_grads_are_fp32(device):
    """Autocast of x's device (not only the CPU's): the branch computes in bf16 there."""
    x, W, A, B = _inputs(shape=(8, 16), n_in=32, n_out=24, r=8, device=device)
    dropout = nn.Identity()
    ref = branch.reference(x @ W.T, x, A, B, 0.5, dropout)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        base = x @ W.T
        fast = branch.lora_add(base, x, A, B, 0.5, dropout)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref, rtol=3e-2, atol=3e-1)
    grads = _grads(fast.float(), (x, A, B))
    want = _grads(ref, (x, A, B))
    for got, exp in zip(grads, want, strict=True):
        assert got.dtype == torch.float32
        assert (got - exp).norm() / exp.norm() < 2e-2


def test_lora_layer_training_step_matches_reference_layer(device):
    """A LoraLinear in train mode with dropout 0 gives the same output and gradients as the composition."""
    from lorakit.adapters.linear import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 5))
    layer.update_layer("a", 3, 6.0, 0.0, "gaussian")
    layer.active_adapters = ["a"]
    nn.init.normal_(layer.lora_B["a"].weight)
    layer.to(device).train()
    x = torch.randn(2, 4, 6).to(device).requires_grad_()
    out = layer(x)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    ref = branch.reference(layer.base_layer(x), x, A, B, layer.scaling["a"], nn.Identity())
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(out, (x, A, B)), _grads(ref, (x, A, B)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_dropout", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_linear_branch_equals_linear_plus_composition(bias, with_dropout, layout, device):
    """The frozen Linear and its branch as one node: values and gradients of x, A, B equal F.linear + the masked
    composition."""
    if with_dropout:
        _no_float64(device)
    x, W, A, B = _inputs(device=device)
    W = W.detach()
    b = torch.randn(W.shape[0], generator=torch.Generator().manual_seed(3)).to(device) if bias else None
    if layout == "transposed":  # (5, 3, in) view of x: not contiguous
        x = x.detach().transpose(0, 1).requires_grad_()
        assert not x.is_contiguous()
    torch.manual_seed(2)
    dropped = branch.dropped_positions(x.numel(), 0.3, x.device) if with_dropout else None
    mask, keep = (_keep_mask(x.shape, dropped), 1 / 0.7) if with_dropout else (None, 1.0)
    fast = branch.LinearBranch.apply(x, W, b, A, B, 0.5, dropped, keep)
    ref = branch.reference_with_mask(nn.functional.linear(x, W, b), x, A, B, 0.5, mask, keep)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(fast, (x, A, B)), _grads(ref, (x, A, B)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_branch_gradcheck_float64(device):
    _no_float64(device)
    x, W, A, B = _inputs(torch.float64, shape=(2, 3), n_in=4, n_out=3, r=2, device=device)
    W, bias = W.detach(), torch.randn(3, dtype=torch.float64, device=device)
    dropped = torch.tensor([1, 5, 9, 13, 17, 21], dtype=torch.int32, device=device)
    assert torch.autograd.gradcheck(
        lambda x_, a, b_: branch.LinearBranch.apply(x_, W, bias, a, b_, 0.75, dropped, 2.0), (x, A, B)
    )


def test_linear_lora_add_draws_as_lora_add_does(device):
    """Same RNG state: the fused node equals the layer's output + lora_add, dropout included."""
    _no_float64(device)
    x, _, A, B = _inputs(shape=(4, 9), device=device)
    linear = nn.Linear(6, 7).requires_grad_(False).to(device)
    dropout = nn.Dropout(0.25).train()
    torch.manual_seed(5)
    fast = branch.linear_lora_add(linear, x, A, B, 0.5, dropout)
    torch.manual_seed(5)
    ref = branch.lora_add(linear(x), x, A, B, 0.5, dropout)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(fast, (x, A, B)), _grads(ref, (x, A, B)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_lora_add_refuses_a_trainable_base():
    x, _, A, B = _inputs()
    with pytest.raises(ValueError, match="frozen base layer"):
        branch.linear_lora_add(nn.Linear(6, 7), x, A, B, 0.5, nn.Identity())


def _wrapped_linear(bias=True, device="cpu"):
    from lorakit.adapters.linear import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 5, bias=bias).requires_grad_(False))
    layer.update_layer("a", 3, 6.0, 0.1, "gaussian")
    layer.active_adapters = ["a"]
    nn.init.normal_(layer.lora_B["a"].weight)
    return layer.to(device).train()


def test_lora_linear_fuses_a_frozen_linear_and_falls_back_when_it_must(device):
    """Training a LoraLinear on a frozen nn.Linear runs one LinearBranch node; a hook on the base layer or a trainable
    bias take the two-node path (the hook is called) with the same output."""
    _no_float64(device)  # its adapter has dropout
    layer, x = _wrapped_linear(device=device), torch.randn(2, 4, 6).to(device).requires_grad_()
    torch.manual_seed(1)
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "LinearBranchBackward"
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(1)
    hooked = layer(x)
    handle.remove()
    assert calls == [1] and type(hooked.grad_fn).__name__ != "LinearBranchBackward"
    torch.testing.assert_close(hooked, fused, rtol=1e-6, atol=1e-6)
    layer.base_layer.bias.requires_grad_(True)
    assert type(layer(x).grad_fn).__name__ != "LinearBranchBackward"
    layer.base_layer.bias.requires_grad_(False)
    with torch.no_grad():
        assert layer(x).grad_fn is None


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
def test_a_base_linear_with_a_forward_of_its_own_is_called(device, grad):
    """A forward set on the base nn.Linear instance (accelerate's offloading hooks set one there) is no plain
    F.linear: the layer is called, with gradients and without (where the fast paths otherwise compute F.linear
    themselves); an untouched layer gives F.linear's output bit for bit."""
    _no_float64(device)
    layer = _wrapped_linear(device=device).eval()
    x = torch.randn(2, 4, 6).to(device).requires_grad_(grad)
    base = layer.base_layer
    with torch.set_grad_enabled(grad):
        plain = layer(x)
        calls = []

        def own_forward(inputs):
            calls.append(1)
            return nn.functional.linear(inputs, base.weight, base.bias) + 1.0

        base.forward = own_forward
        try:
            shifted = layer(x)
        finally:
            del base.forward
    assert calls == [1]
    torch.testing.assert_close(shifted, plain + 1.0, rtol=1e-6, atol=1e-6)
    if not grad:
        with torch.no_grad():
            expected = branch.lora_add_no_grad(nn.functional.linear(x, base.weight, base.bias), x,
                                               layer.lora_A["a"].weight, layer.lora_B["a"].weight, layer.scaling["a"])
        assert torch.equal(plain, expected)


def test_the_no_grad_path_steps_aside_for_hooks_plain_tensor_weights_and_active_dropout(device):
    """Without autograd, a LoraLinear computes F.linear + lora_add_no_grad itself only for a plain nn.Linear: a hook
    on the base layer is called, a weight that is no longer a Parameter (deleted, set again as a tensor) is read by
    the layer's own forward, and dropout in training mode is applied; each gives the reference's output."""
    _no_float64(device)
    layer = _wrapped_linear(device=device).eval()
    base, x = layer.base_layer, torch.randn(2, 4, 6).to(device)
    A, B, s = layer.lora_A["a"].weight, layer.lora_B["a"].weight, layer.scaling["a"]
    with torch.no_grad():
        reference = branch.reference(base(x), x, A, B, s, nn.Identity())
        assert torch.equal(layer(x), branch.lora_add_no_grad(nn.functional.linear(x, base.weight, base.bias), x, A,
                                                             B, s))
        calls = []
        handle = base.register_forward_hook(lambda *a: calls.append(1))
        torch.testing.assert_close(layer(x), reference, rtol=1e-6, atol=1e-6)
        handle.remove()
        assert calls == [1]
        weight = base.weight.detach().clone()
        del base.weight
        base.weight = weight * 2.0  # a plain tensor attribute now: F.linear on the Parameter table would miss it
        assert not branch.runs_as_linear(base)
        doubled = branch.reference(nn.functional.linear(x, weight * 2.0, base.bias), x, A, B, s, nn.Identity())
        torch.testing.assert_close(layer(x), doubled, rtol=1e-6, atol=1e-6)
        base.weight = nn.Parameter(weight, requires_grad=False)
        layer.train()  # dropout 0.1: two calls differ, and neither is the no-dropout output
        first, second = layer(x), layer(x)
        assert not torch.equal(first, second) and not torch.allclose(first, reference)


@pytest.mark.parametrize("state", ["disabled", "merged"])
def test_a_disabled_or_merged_lora_linear_is_its_base_layer_bit_for_bit_and_calls_its_hooks(device, state):
    """With its adapters off or merged a LoraLinear computes its plain nn.Linear base as F.linear itself: the base
    layer's own output bit for bit, with and without autograd; a hooked base layer is called instead."""
    _no_float64(device)
    layer = _wrapped_linear(device=device).eval()
    if state == "disabled":
        layer.enable_adapters(False)
    else:
        layer.merge()
    base, x = layer.base_layer, torch.randn(2, 4, 6).to(device)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert torch.equal(layer(x), base(x))
    calls = []
    handle = base.register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(layer(x), base(x)) and calls == [1, 1]
    handle.remove()


def test_a_qlora_layer_under_autocast_shares_the_input_cast_with_the_same_values(monkeypatch, device):
    """Under bf16 autocast a LoraLinear on a QuantLinear hands the base layer and its branch the shared cast of x
    (lorakit.fast.shared_cast) instead of x: output and gradients (x, A, B) equal, bit for bit, to the path where the
    quantized layer and the branch each cast x themselves."""
    _no_float64(device)
    from lorakit.adapters.linear import LoraLinear
    from lorakit.quant.linear import QuantLinear

    torch.manual_seed(0)
    layer = LoraLinear(QuantLinear.from_linear(nn.Linear(64, 48), bits=4))
    layer.update_layer("a", 4, 8.0, 0.1, "gaussian")
    layer.active_adapters = ["a"]
    nn.init.normal_(layer.lora_B["a"].weight)
    layer = layer.to(device).train()
    x0 = torch.randn(3, 5, 64, device=device)
    casts = []
    real_cast = branch.shared_cast
    monkeypatch.setattr(branch, "shared_cast", lambda t: casts.append(1) or real_cast(t))

    def run() -> tuple[torch.Tensor, ...]:
        x = x0.clone().requires_grad_()
        torch.manual_seed(1)  # the same dropout draw
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        grads = (x.grad, layer.lora_A["a"].weight.grad.clone(), layer.lora_B["a"].weight.grad.clone())
        layer.zero_grad()
        return (y.detach(), *grads)

    shared = run()
    assert casts == [1, 1]  # the layer's and the branch's nodes over one cast
    monkeypatch.setattr(branch, "shared_cast", lambda t: t)  # each reader casts x itself
    own = run()
    for a, b in zip(shared, own):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.05, 0.6], ids=["put_", "index_fill_"])  # 0.6 of 64k: more than 2**15 positions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_zeroes_exactly_the_drawn_positions_in_a_copy_or_in_place(device, dtype, p):
    """_drop sets the drawn flat positions to 0 and keeps every other value, by put_ for a few positions and by
    index_fill_ for many: equal to multiplying by the 0/1 mask, in a copy (t unchanged) or in place."""
    _no_float64(device)
    torch.manual_seed(0)
    t = torch.randn(256, 256, device=device).to(dtype)
    dropped = branch.dropped_positions(t.numel(), p, t.device)
    assert (dropped.numel() > branch._FEW_POSITIONS) == (p > 0.5)
    mask = torch.ones(t.numel(), device=device, dtype=dtype)
    mask[dropped.long()] = 0
    expected = t * mask.view(t.shape)
    before = t.clone()
    assert torch.equal(branch._drop(t, dropped), expected) and torch.equal(t, before)
    assert torch.equal(branch._drop(t, dropped, in_place=True), expected) and torch.equal(t, expected)


def _qlora_layer(device, bias=True, bits=4):
    from lorakit.adapters.linear import LoraLinear
    from lorakit.quant.linear import QuantLinear

    torch.manual_seed(0)
    layer = LoraLinear(QuantLinear.from_linear(nn.Linear(64, 48, bias=bias), bits=bits))
    layer.update_layer("a", 4, 8.0, 0.1, "gaussian")
    layer.active_adapters = ["a"]
    nn.init.normal_(layer.lora_B["a"].weight)
    if bias:
        layer.base_layer.bias.requires_grad_(False)  # frozen, as get_peft_model leaves it (bias='none')
    return layer.to(device).train()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_qlora_layer_trains_as_one_node_equal_to_the_two_node_path(monkeypatch, device, autocast, bits):
    """A LoraLinear on a QuantLinear runs the base and its branch (dropout included) as one QuantBranch node: the
    output equal bit for bit to the quantized layer then the branch, the gradients of x, A and B equal within the
    rounding of where x's two gradient terms are summed (inside one matmul instead of after it)."""
    _no_float64(device)
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(branch, "quant_fusable", lambda *a: False)
        layer = _qlora_layer(device, bits=bits)
        x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
        torch.manual_seed(1)  # the same dropout draw
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        assert (type(out.grad_fn).__name__ == "QuantBranchBackward") == fused
        A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
        runs.append((out, *_grads(out.float(), (x, A, B))))
    (out, *grads), (out_ref, *grads_ref) = runs
    assert torch.equal(out, out_ref)
    tolerance = 1e-2 if autocast else 1e-5
    for got, want in zip(grads, grads_ref, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=tolerance * want.abs().max().item(), rtol=tolerance)


def test_a_qlora_layer_steps_out_of_the_node_for_hooks_a_trainable_bias_and_chunked_weights(device):
    """The node never calls the quantized layer: a hook on it, a bias that trains (bias='all') or a weight decoded in
    several chunks take the two-node path, whose output is the same: bit for bit with one matmul; with the weight in
    chunks, one matmul per chunk, equal within fp32 rounding (the BLAS kernel picked for each width may sum in its
    own order: bit-equal on the machine these tests were written on, not on an AMD EPYC one)."""
    _no_float64(device)
    layer = _qlora_layer(device)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
    torch.manual_seed(1)
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "QuantBranchBackward"
    base, calls = layer.base_layer, []
    handle = base.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(1)
    hooked = layer(x)
    handle.remove()
    assert calls == [1] and torch.equal(hooked, fused)
    base.bias.requires_grad_(True)
    torch.manual_seed(1)
    assert not branch.quant_fusable(base, x, layer.lora_A["a"].weight, layer.lora_B["a"].weight)
    assert torch.equal(layer(x), fused)
    base.bias.requires_grad_(False)
    base.chunk_elements = 64 * 10  # 10 rows at a time
    torch.manual_seed(1)
    chunked = layer(x)
    assert type(chunked.grad_fn).__name__ != "QuantBranchBackward"
    torch.testing.assert_close(chunked, fused, atol=1e-5, rtol=1e-6)


def test_lora_linear_fused_under_bf16_autocast_equals_the_two_node_path(monkeypatch, device):
    """Under autocast of x's device the fused node computes in bf16 as F.linear + lora_add do: same output to the bit
    (same casts, same products), gradients of A and B in fp32 and equal within bf16 rounding of the summation
    order."""
    _no_float64(device)  # its adapter has dropout
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(branch, "_fusable", lambda *a: False)
        layer = _wrapped_linear(device=device)
        x = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
        torch.manual_seed(1)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = layer(x)
        assert (type(out.grad_fn).__name__ == "LinearBranchBackward") == fused and out.dtype == torch.bfloat16
        A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
        runs.append((out, *_grads(out.float(), (x, A, B))))
    (out, *grads), (out_ref, *grads_ref) = runs
    torch.testing.assert_close(out, out_ref, atol=0, rtol=0)
    for got, want in zip(grads, grads_ref, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-2 * want.abs().max().item(), rtol=1e-2)


@pytest.mark.parametrize("node", ["LoraBranch", "LinearBranch"])
@pytest.mark.parametrize("shape", [(3, 5), (15,), (2, 3, 5)])
def test_output_may_be_modified_in_place(node, shape, device):
    """Models modify a layer's output in place (Falcon: ``mlp_output += attention_output``): the node's output is no
    view made inside it (autograd refuses in-place changes of those), and the gradients are those of the
    composition with the same in-place add."""
    x, W, A, B = _inputs(shape=shape, device=device)
    W = W.detach()
    other = torch.randn(*shape, W.shape[0], generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
    dropped = torch.tensor([0, 7, 8, 40], dtype=torch.int32, device=device)
    fast = (branch.LoraBranch.apply(x @ W.T, x, A, B, 0.5, dropped, 2.0) if node == "LoraBranch"
            else branch.LinearBranch.apply(x, W, None, A, B, 0.5, dropped, 2.0))
    assert fast.is_contiguous() and fast.shape == (*shape, W.shape[0])
    fast += other
    ref = branch.reference_with_mask(x @ W.T, x, A, B, 0.5, _keep_mask(x.shape, dropped), 2.0)
    ref += other
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(fast, (x, A, B, other)), _grads(ref, (x, A, B, other)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
