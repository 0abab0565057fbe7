"""lorakit.fast's device rule, checked without a GPU: autocast is read for a tensor's own device type (a tensor that
reports "cuda", with torch's CUDA autocast flag set, which torch allows on a CPU-only build), and every fast path
steps aside for its reference on a device it does not run on ("meta") or where its op has no kernel (float64 on
MPS, simulated by marking the CPU so)."""

from __future__ import annotations

import pytest
import torch
from helpers import input_ids, tiny_llama
from torch import nn

import lorakit
from lorakit.fast import branch, devices, fused_ce, swiglu
from lorakit.fast.shared_cast import shared_cast


class _ReportsCuda(torch.Tensor):
    """A CPU tensor whose ``.device`` says cuda: what the autocast checks read, without a GPU."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda")


class _ReportsMps(torch.Tensor):
    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("mps")


@pytest.fixture
def cuda_autocast():
    """CUDA autocast switched on (torch's thread-local flag; no CUDA needed), CPU autocast left off."""
    before = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", True)
    try:
        yield torch.get_autocast_dtype("cuda")
    finally:
        torch.set_autocast_enabled("cuda", before)


def test_the_rule_names_cpu_cuda_and_mps_only():
    assert devices.runs_fast(torch.empty(1)) and not devices.runs_fast(torch.empty(1, device="meta"))
    assert devices.FAST_DEVICES == {"cpu", "cuda", "mps"}
    assert devices.has_float64(torch.empty(1)) and not devices.has_float64(torch.empty(1).as_subclass(_ReportsMps))


def test_autocast_is_read_for_the_tensors_device_type(cuda_autocast):
    on_cuda, on_cpu = torch.randn(3).as_subclass(_ReportsCuda), torch.randn(3)
    assert not torch.is_autocast_enabled("cpu")
    assert devices.autocast_dtype(on_cuda) == cuda_autocast  # CUDA autocast casts a CUDA tensor ...
    assert devices.autocast_dtype(on_cpu) is None  # ... and leaves a CPU one alone
    torch.set_autocast_enabled("cuda", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert devices.autocast_dtype(on_cpu) == torch.bfloat16
        assert devices.autocast_dtype(on_cuda) is None
        assert devices.autocast_dtype(on_cpu.to(torch.bfloat16)) is None  # not fp32: autocast leaves it alone


def test_shared_cast_follows_the_tensors_device_autocast(cuda_autocast):
    x = torch.randn(4, 6, requires_grad=True)
    assert shared_cast(x) is x  # CUDA autocast on, CPU's off: a CPU tensor is not cast ...
    on_cuda = torch.randn(4, 6).as_subclass(_ReportsCuda)
    assert shared_cast(on_cuda).dtype == cuda_autocast  # ... and a CUDA one is
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert shared_cast(x).dtype == torch.bfloat16


def test_autocast_state_is_the_tensors_device_and_replays_there():
    with torch.autocast("mps", dtype=torch.bfloat16):  # torch allows MPS autocast contexts on any build
        on_mps = devices.AutocastState.of(torch.randn(2).as_subclass(_ReportsMps))
        on_cpu = devices.AutocastState.of(torch.randn(2))
    assert on_mps == devices.AutocastState("mps", True, torch.bfloat16) and not on_cpu.enabled
    with on_mps.replay():
        assert torch.is_autocast_enabled("mps") and torch.get_autocast_dtype("mps") == torch.bfloat16
    assert not torch.is_autocast_enabled("mps")
    meta = devices.AutocastState.of(torch.empty(1, device="meta"))  # no autocast for meta: nothing to replay
    assert meta.dtype is None and not meta.enabled
    with meta.replay():
        pass


def test_lora_branch_backward_runs_under_the_forwards_autocast(monkeypatch):
    """The autograd engine runs backward outside the forward's autocast context; LoraBranch replays it (as
    torch.amp.custom_bwd would, for x's device)."""
    seen = []
    inner = branch._low_rank_backward

    def recording(*args):
        seen.append(torch.is_autocast_enabled("cpu"))
        return inner(*args)

    monkeypatch.setattr(branch, "_low_rank_backward", recording)
    x, A, B = (torch.randn(*s, requires_grad=True) for s in [(3, 6), (2, 6), (5, 2)])
    for autocast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = branch.LoraBranch.apply(torch.zeros(3, 5), x, A, B, 0.5, None, 1.0)
        out.float().sum().backward()
    assert seen == [True, False]


def _branch_inputs(device: str):
    g = torch.Generator().manual_seed(0)
    x, A, B = (torch.randn(*s, generator=g).to(device).requires_grad_() for s in [(3, 6), (2, 6), (5, 2)])
    linear = nn.Linear(6, 5).requires_grad_(False).to(device)
    return linear, x, A, B


def test_branch_steps_aside_on_a_device_it_does_not_run_on():
    nodes = {}
    for device in ("cpu", "meta"):
        linear, x, A, B = _branch_inputs(device)
        fused = branch.linear_with_lora(linear, x, A, B, 0.5, nn.Identity())
        two_node = branch.lora_add(linear(x), x, A, B, 0.5, nn.Identity())
        assert fused.device.type == two_node.device.type == device
        nodes[device] = (type(fused.grad_fn).__name__, type(two_node.grad_fn).__name__)
    assert nodes["cpu"] == ("LinearBranchBackward", "LoraBranchBackward")
    assert nodes["meta"] == ("AddBackward0", "AddBackward0")  # branch.reference: base + lora


def test_dropout_steps_aside_on_a_device_without_float64(monkeypatch):
    """MPS, simulated: the CPU marked as having no float64. The fast branch would draw float64 uniforms; the reference
    (nn.Dropout) runs instead, with its values."""
    linear, x, A, B = _branch_inputs("cpu")
    dropout = nn.Dropout(0.3).train()
    torch.manual_seed(4)
    fast = branch.lora_add(linear(x), x, A, B, 0.5, dropout)
    assert type(fast.grad_fn).__name__ == "LoraBranchBackward"
    monkeypatch.setattr(devices, "NO_FLOAT64", frozenset({"cpu"}))
    for out in (branch.lora_add(linear(x), x, A, B, 0.5, dropout),
                branch.linear_with_lora(linear, x, A, B, 0.5, dropout)):
        assert type(out.grad_fn).__name__ == "AddBackward0"
    torch.manual_seed(4)
    stepped_aside = branch.linear_with_lora(linear, x, A, B, 0.5, dropout)
    torch.manual_seed(4)
    torch.testing.assert_close(stepped_aside, branch.reference(linear(x), x, A, B, 0.5, dropout), rtol=0, atol=0)


def test_gated_mlp_steps_aside_on_a_device_it_does_not_run_on():
    model = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(r=4, target_modules="all-linear")).train()
    mlp = model.base_model.model.model.layers[0].mlp
    assert "forward" in vars(mlp)  # patched by lorakit.fast.swiglu
    nodes, seen = {}, {}
    handle = mlp.down_proj.register_forward_hook(lambda m, args, out: seen.update(h=args[0]))
    for device in ("cpu", "meta"):
        mlp.to(device)
        mlp(torch.randn(2, 3, 32, device=device, requires_grad=True))
        nodes[device] = type(seen["h"].grad_fn).__name__
    handle.remove()
    assert nodes == {"cpu": "SwiGLUBackward", "meta": "MulBackward0"}  # meta: the class's silu(g) * u


def test_fused_loss_steps_aside_on_a_device_it_does_not_run_on():
    model = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(r=4, target_modules=["q_proj"])).train()
    ids = input_ids(batch=2, seq=6)
    assert model.fused_loss_refusal(input_ids=ids, labels=ids) is None
    model.to("meta")
    ids = ids.to("meta")
    assert "fast paths do not run" in model.fused_loss_refusal(input_ids=ids, labels=ids)


def test_linear_cross_entropy_steps_aside_on_a_device_it_does_not_run_on():
    hidden, weight = torch.randn(5, 4, device="meta", requires_grad=True), torch.randn(7, 4, device="meta")
    loss = fused_ce.linear_cross_entropy(hidden, weight, torch.zeros(5, dtype=torch.long, device="meta"))
    assert loss.device.type == "meta" and loss.shape == () and type(loss.grad_fn).__name__ == "NllLossBackward0"


def test_patched_mlp_on_cpu_still_uses_the_fast_activation():
    """The step-aside check leaves the CPU path as it was (guard against a rule that always steps aside)."""
    g, u = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    assert type(swiglu.swiglu(g, u).grad_fn).__name__ == "SwiGLUBackward"
