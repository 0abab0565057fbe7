"""lorakit.fast.swiglu: the lean gated-MLP activation equals autograd's composition (values and gradients), keeps one
tensor less for backward, and is patched into Llama-family MLPs while a model is wrapped, and only there; on every
device torch reports available (the ``device`` fixture)."""

from __future__ import annotations

import pytest
import torch
from helpers import _build, _llama_config, input_ids, perturb_, tiny_llama
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.fast import swiglu


def _pair(
    dtype: torch.dtype = torch.float32, seed: int = 0, device: object = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(3, 5, 24, generator=gen) * 3).to(device, dtype).requires_grad_()
    u = torch.randn(3, 5, 24, generator=gen).to(device, dtype).requires_grad_()
    return g, u


def _grads(fn, g: torch.Tensor, u: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    g, u = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    out = fn(g, u)
    out.backward(upstream)
    return out.detach(), g.grad, u.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_autograd(dtype: torch.dtype, device: torch.device) -> None:
    g, u = _pair(dtype, device=device)
    upstream = torch.randn(g.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ours = _grads(swiglu.SwiGLU.apply, g, u, upstream)
    ref = _grads(swiglu.reference, g, u, upstream)
    for a, b in zip(ours, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # same kernels: equal in bf16 too


def test_gradcheck_float64(device: torch.device) -> None:
    if device.type == "mps":
        pytest.skip("MPS has no float64")
    g, u = _pair(torch.float64, device=device)
    assert torch.autograd.gradcheck(swiglu.SwiGLU.apply, (g, u))


def test_gradient_for_one_input_only() -> None:
    g, u = _pair()
    u = u.detach()
    swiglu.SwiGLU.apply(g, u).sum().backward()
    g2 = g.detach().requires_grad_()
    swiglu.reference(g2, u).sum().backward()
    torch.testing.assert_close(g.grad, g2.grad)


def _saved_bytes(fn, g: torch.Tensor, u: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(g * 1.0, u * 1.0)  # inputs that are graph intermediates, as the projections' outputs are
    return sum(storages.values())


def test_keeps_one_tensor_less_than_autograd() -> None:
    g, u = _pair()
    one = g.numel() * g.element_size()
    assert _saved_bytes(swiglu.reference, g, u) == 3 * one  # g, silu(g), u
    assert _saved_bytes(swiglu.SwiGLU.apply, g, u) == 2 * one  # g, u


def test_without_grad_no_graph_and_same_values() -> None:
    g, u = _pair()
    with torch.no_grad():
        out = swiglu.swiglu(g, u)
    assert out.grad_fn is None
    torch.testing.assert_close(out, swiglu.reference(g, u).detach())


def _lora(model: nn.Module, dropout: float = 0.1):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))


def _patched(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "forward" in m.__dict__ and swiglu.is_gated_mlp(m)]


def test_wrapped_llama_training_step_equals_unpatched(device: torch.device) -> None:
    """Same seed, dropout 0.1, B made non-zero (so every A has a gradient): loss and every LoRA gradient of the
    patched model (lean activation, recomputed down input) equal the class's own forward."""
    results = []
    for patch in (True, False):
        model = _lora(tiny_llama(seed=0))
        perturb_([p for n, p in model.named_parameters() if "lora_B" in n], seed=5)
        assert len(_patched(model)) == 2
        if not patch:
            swiglu.unpatch_mlps(model)
            assert not _patched(model)
        model.to(device).train()
        torch.manual_seed(3)
        ids = input_ids().to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_unload_and_merge_and_unload_restore_the_class_forward() -> None:
    for verb in ("unload", "merge_and_unload"):
        model = _lora(tiny_llama(seed=0))
        base = getattr(model, verb)()
        assert not [m for m in base.modules() if "forward" in m.__dict__]


def test_qwen2_is_patched_and_gemma_with_gelu_is_not() -> None:
    qwen = _build(Qwen2ForCausalLM, Qwen2Config(**_small()), seed=0)
    assert len(_patched(_lora(qwen))) == 2
    gemma = _build(GemmaForCausalLM, GemmaConfig(**_small(), head_dim=8, hidden_activation="gelu_pytorch_tanh"), 0)
    model = _lora(gemma)
    assert not [m for m in model.modules() if "forward" in m.__dict__ and type(m).__name__ == "GemmaMLP"]


def _small() -> dict:
    config = _llama_config()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")
    return {k: getattr(config, k) for k in keys}


def _mlp_with_lora(dropout: float = 0.1, device: object = "cpu") -> tuple[nn.Module, torch.Tensor]:
    model = _lora(tiny_llama(seed=0), dropout).to(device).train()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
    return model.base_model.model.model.layers[0].mlp, x


def _down_input_and_output(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    handle = mlp.down_proj.register_forward_hook(lambda m, args, out: seen.update(h=args[0]))
    try:
        out = mlp(x)
    finally:
        handle.remove()
    return seen["h"], out


def test_down_projection_input_is_recomputed_not_kept():
    mlp, x = _mlp_with_lora()
    h, out = _down_input_and_output(mlp, x)
    kept = out.grad_fn.saved_tensors[0]  # down's LoRA branch: its saved input, as backward gets it
    assert kept.data_ptr() != h.data_ptr()  # recomputed from g and u ...
    assert torch.equal(kept, h)  # ... bit for bit


def test_recompute_hands_its_silu_to_the_activation_backward_once(device):
    """Unpacking down's saved input recomputes h and leaves silu(g) on SwiGLU's node; that node's backward takes it
    (the attribute is gone afterwards) and the MLP's gradients equal those of the unpatched forward."""
    grads = []
    for patch in (True, False):
        mlp, x = _mlp_with_lora(device=device)
        if not patch:
            del mlp.forward  # the class's own forward: silu(g) * u by autograd, no recompute
        h, out = _down_input_and_output(mlp, x)
        if patch:
            node = h.grad_fn
            kept = out.grad_fn.saved_tensors[0]  # down's backward unpacks this way: the recompute runs
            g, u = node.saved_tensors
            assert torch.equal(node.silu_g, nn.functional.silu(g)) and torch.equal(kept, h)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(device))
        if patch:
            assert "silu_g" not in node.__dict__
        grads.append([x.grad] + [p.grad for p in mlp.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_other_saved_tensor_hooks_take_precedence():
    """Under checkpointing / offloading hooks the recompute stands aside: the outer hooks see h itself."""
    mlp, x = _mlp_with_lora()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.data_ptr()) or t, lambda t: t):
        h, out = _down_input_and_output(mlp, x)
    assert h.data_ptr() in packed
    assert out.grad_fn.saved_tensors[0].data_ptr() == h.data_ptr()


def test_gradient_checkpointing_gives_the_same_gradients(device):
    grads = []
    for checkpointing in (False, True):
        model = _lora(tiny_llama(seed=0)).to(device)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(3)
        ids = input_ids().to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-7, msg=name)
