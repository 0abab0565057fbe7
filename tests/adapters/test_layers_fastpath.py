"""LoraLinear's fast path (its one plain adapter looked up once per state, ``fast.branch.linear_with_lora``) against
the textbook forward, which reads every piece of state on each call: outputs equal after each state change, made
after a forward has built the plan (a stale plan would show as a difference); on every device torch reports available
(the ``device`` fixture)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from helpers import input_ids, perturb_, tiny_gpt2, tiny_llama
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.adapters.linear import LoraLinear
from lorakit.fast import branch

TOL = dict(atol=1e-6, rtol=1e-6)


def _textbook_forward(self: LoraLinear, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """base + sum over the active adapters of B(A(dropout(x))) * s, every piece of state read now."""
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    for name in self.active_adapters:
        if name in self.lora_A:
            A, B = self.lora_weights(name)
            result = branch.reference(result, x, A, B, self.scaling[name], self.lora_dropout[name])
    return result


@contextlib.contextmanager
def _textbook() -> Iterator[None]:
    planned = LoraLinear.forward
    LoraLinear.forward = _textbook_forward
    try:
        yield
    finally:
        LoraLinear.forward = planned


def _layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D: weights stored (in, out)
}


def _config(family: str = "llama", **overrides: object) -> LoraConfig:
    options: dict = dict(r=4, lora_alpha=8, target_modules=TARGETS[family], lora_dropout=0.1, init_lora_weights=False)
    return LoraConfig(**{**options, **overrides})


def _model(family: str = "llama", device: object = "cpu"):
    base = tiny_llama(0) if family == "llama" else tiny_gpt2(0)
    torch.manual_seed(1)
    model = get_peft_model(base, _config(family), adapter_name="a")
    torch.manual_seed(2)
    model.add_adapter("b", _config(family, r=2, lora_alpha=3))
    perturb_([p for n, p in model.named_parameters() if "lora_B" in n], seed=3)
    return model.to(device).eval()


def _check(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Planned logits (no grad and inference mode) equal the textbook ones; returns them."""
    ids = (input_ids() if ids is None else ids).to(next(model.parameters()).device)
    with torch.no_grad():
        planned = model(input_ids=ids).logits
        with _textbook():
            want = model(input_ids=ids).logits
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, planned, atol=0, rtol=0)
    torch.testing.assert_close(planned, want, **TOL)
    return planned


def _base_logits(family: str = "llama", device: object = "cpu") -> torch.Tensor:
    with torch.no_grad():
        return (tiny_llama(0) if family == "llama" else tiny_gpt2(0)).to(device)(input_ids().to(device)).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_planned_forward_equals_textbook_and_takes_the_lean_path(family, monkeypatch, device):
    model = _model(family, device)
    calls = []
    lean = branch.lora_add_no_grad
    monkeypatch.setattr(branch, "lora_add_no_grad", lambda *a: calls.append(1) or lean(*a))
    logits = _check(model)
    assert len(calls) == 2 * len(_layers(model))  # every layer, in both the no_grad and the inference_mode pass
    assert not torch.allclose(logits, _base_logits(family, device), atol=1e-3)  # the adapter changes the output
    assert all(layer._fast is not None and layer._fast[0] == "a" for layer in _layers(model))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_state_change_is_picked_up(family, device):
    model = _model(family, device)
    layers = _layers(model)
    a = _check(model)
    model.set_adapter("b")
    b = _check(model)
    assert not torch.allclose(a, b, atol=1e-3)
    model.set_adapter(["a", "b"])  # several adapters: the general loop
    assert _check(model) is not None and all(layer._fast is None for layer in layers)
    model.set_adapter("a")
    torch.testing.assert_close(_check(model), a, atol=0, rtol=0)

    for layer in layers:  # scaling, by the method and written into the dict directly
        layer.set_scale("a", 0.5)
    half = _check(model)
    assert not torch.allclose(half, a, atol=1e-3)
    for layer in layers:
        layer.scaling["a"] = 2.0
    torch.testing.assert_close(_check(model), a, **TOL)

    with model.disable_adapter():
        torch.testing.assert_close(_check(model), _base_logits(family, device), **TOL)
    torch.testing.assert_close(_check(model), a, atol=0, rtol=0)

    model.merge_adapter()
    torch.testing.assert_close(_check(model), a, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():  # merged: unmerged inside, merged back after
        torch.testing.assert_close(_check(model), _base_logits(family, device), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_check(model), a, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(_check(model), a, atol=1e-5, rtol=1e-5)

    model.set_adapter("b")
    _check(model)
    model.delete_adapter("b")  # the active one: "a" becomes active
    torch.testing.assert_close(_check(model), a, atol=1e-5, rtol=1e-5)
    assert all(layer._fast[0] == "a" for layer in layers)

    torch.manual_seed(4)
    model.add_adapter("c", _config(family, r=3, target_modules=TARGETS[family][:1]))  # made on the layers' device
    perturb_([p for n, p in model.named_parameters() if "lora_B.c" in n], seed=5)
    model.set_adapter("c")  # only some layers hold "c": the others give their base output
    c = _check(model)
    assert not torch.allclose(c, a, atol=1e-3)
    assert any(layer._fast is None and "c" not in layer.r for layer in layers)


def test_weights_changed_in_place_replaced_or_loaded_are_picked_up():
    model = _model()
    layers = _layers(model)
    a = _check(model)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["a"].weight.mul_(2)  # in place
    doubled = _check(model)
    assert not torch.allclose(doubled, a, atol=1e-3)
    for layer in layers:
        B = layer.lora_B["a"].weight
        B.data = B.data / 2  # a new tensor behind the same Parameter
    torch.testing.assert_close(_check(model), a, **TOL)

    state = {k: v * 3 if "lora_A" in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # copied in place
    tripled = _check(model)
    assert not torch.allclose(tripled, a, atol=1e-3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = {k: v / 3 if "lora_A" in k else v for k, v in fresh.items()}
    old = layers[0].lora_A["a"].weight
    model.load_state_dict(fresh, assign=True)  # new Parameter objects
    assert layers[0].lora_A["a"].weight is not old
    torch.testing.assert_close(_check(model), a, **TOL)

    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # .to() puts new Parameter objects in place
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    assert layers[0].lora_A["a"].weight.dtype == torch.float64
    with torch.no_grad():
        planned = model(input_ids=input_ids()).logits
        with _textbook():
            want = model(input_ids=input_ids()).logits
    assert planned.dtype == torch.float64
    torch.testing.assert_close(planned, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(planned.float(), a, atol=1e-5, rtol=1e-5)


def test_a_replaced_base_layer_is_picked_up():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 5))
    layer.update_layer("a", 2, 4, 0.0, init_lora_weights=False)
    layer.active_adapters = ["a"]
    x = torch.randn(3, 6)
    with torch.no_grad():
        layer(x)
        layer.base_layer = nn.Linear(6, 5)
        A, B = layer.lora_weights("a")
        want = layer.base_layer(x) + 2 * x @ A.T @ B.T
        torch.testing.assert_close(layer(x), want, **TOL)


def test_mixed_adapter_batch_after_the_plan_and_back(device):
    model = _model(device=device)
    a = _check(model)
    ids = input_ids().to(device)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["b", "a"]).logits
    model.set_adapter("b")
    b = _check(model)
    torch.testing.assert_close(mixed[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], a[1], atol=1e-5, rtol=1e-5)
    model.set_adapter("a")
    torch.testing.assert_close(_check(model), a, atol=0, rtol=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_training_through_the_plan_equals_the_general_loop(bf16, device):
    """With gradients (and dropout in train mode) the plan saves lookups and, in fp32, runs each frozen Linear and its
    branch as one node (branch.LinearBranch): same dropout draws and loss as the general loop, gradients up to the
    order of a sum. Under bf16 autocast it also shares one cast of each input (lorakit.fast.shared_cast): the loss to
    the bit, gradients within bf16 rounding (each input's gradient has the same terms, summed in another order, and a
    last-bit difference in fp32 can flip a later cast to bf16, 2**-8 relative, which later layers carry on): over
    seeds 0-11 the largest relative difference (norm) of a parameter's gradient was 0.9% to 3.7%."""
    runs = []
    for general in (False, True):
        model = _model(device=device).train()
        if general:
            for layer in _layers(model):
                layer._fast = None  # the general loop (the next state change would plan again)
        torch.manual_seed(7)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids().to(device)).logits.float().square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((loss.detach(), grads))
    (loss, grads), (loss_ref, grads_ref) = runs
    torch.testing.assert_close(loss, loss_ref, atol=0, rtol=0)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:
        if bf16:
            assert (grads[name] - grads_ref[name]).norm() <= 6e-2 * grads_ref[name].norm(), name
        else:
            atol = 1e-6 * grads_ref[name].abs().max().item()  # the fused node (branch.LinearBranch) sums x's
            torch.testing.assert_close(grads[name], grads_ref[name], atol=atol, rtol=1e-5)  # gradient in another order


def test_eval_under_autocast_equals_the_general_loop(device):
    model = _model(device=device)
    outs = []
    for general in (False, True):
        for layer in _layers(model):
            layer._refresh()
            if general:
                layer._fast = None
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            outs.append(model(input_ids=input_ids().to(device)).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


@pytest.mark.parametrize("rows", [1, 3, 4096])
def test_lora_add_no_grad_equals_reference(rows, device):
    """Both of its forms (a few rows: three ops; many rows: one addmm), on 2-d, 3-d and non-contiguous inputs."""
    torch.manual_seed(0)
    A, B = torch.randn(4, 24, device=device), torch.randn(16, 4, device=device)
    xs = (torch.randn(rows, 24), torch.randn(1, rows, 24), torch.randn(24, rows).T)
    for x in (x.to(device) for x in xs):  # .to keeps the transposed one non-contiguous
        base = torch.randn(*x.shape[:-1], 16, device=device)
        want = branch.reference(base, x, A, B, 0.75, nn.Identity())
        got = branch.lora_add_no_grad(base, x, A, B, 0.75)
        assert got.shape == base.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


def test_a_parameter_assigned_to_an_adapter_layer_is_picked_up():
    model = _model()
    a = _check(model)
    for layer in _layers(model):
        layer.lora_A["a"].weight = nn.Parameter(layer.lora_A["a"].weight.detach() * 3)  # a new Parameter object
    tripled = _check(model)
    assert not torch.allclose(tripled, a, atol=1e-3)
