"""The labelled-positions-only loss, fused or not, equals the full-logits reference, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F
from helpers import HIDDEN, VOCAB, input_ids, tiny_gpt2, tiny_llama
from torch import nn

import lorakit.training.loss
from lorakit import LoraConfig, get_peft_model
from lorakit.fast.fused_ce import linear_cross_entropy
from lorakit.quant.half import HalfLinear
from lorakit.training.loss import lm_loss_sum, lm_loss_sum_reference, lm_loss_sum_unfused


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = input_ids(batch=3, seq=10, seed=seed)
    labels = ids.clone()
    labels[:, :6] = -100  # prompt
    labels[2, 8:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("factory, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj"])])
def test_fast_loss_equals_reference_value_and_gradients(factory, targets):
    grads = []
    for fn in (lm_loss_sum_reference, lm_loss_sum):
        torch.manual_seed(0)
        model = get_peft_model(factory(), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
        model.train()
        loss, n = fn(model, _batch())
        loss.backward()
        grads.append((loss.detach(), n, {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (ref, n_ref, g_ref), (fast, n_fast, g_fast) = grads
    assert n_ref == n_fast == 4 + 4 + 2  # labels at positions 6..9; row 2 padded from 8
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for k in g_ref:
        torch.testing.assert_close(g_fast[k], g_ref[k], atol=1e-6, rtol=1e-4)


def test_loss_sum_matches_transformers_mean_loss():
    model = tiny_llama()
    batch = _batch()
    loss, n = lm_loss_sum(model, batch)
    with torch.no_grad():
        hf = model(**batch).loss
    torch.testing.assert_close(loss / n, hf, atol=1e-5, rtol=1e-5)


# --- fused output layer + cross-entropy (fast.fused_ce) ------------------------------------------------------------


def _dense_ce(hidden, weight, target, bias=None):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), target, reduction="sum")


def _value_and_grads(fn, *tensors):
    """fn(*tensors) and d fn / d t for each tensor that requires grad, on fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in tensors]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [t.grad for t in leaves if t.is_floating_point() and t.requires_grad]


@pytest.mark.parametrize("n, chunk", [(7, 1), (7, 3), (7, 7), (7, 64), (1, 4), (8, 4)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_equals_dense(n, chunk, with_bias):
    gen = torch.Generator().manual_seed(n * 10 + chunk)
    hidden = torch.randn(n, 6, generator=gen, requires_grad=True)
    weight = torch.randn(11, 6, generator=gen, requires_grad=True)
    bias = torch.randn(11, generator=gen, requires_grad=True) if with_bias else None
    target = torch.randint(0, 11, (n,), generator=gen)
    args = (hidden, weight, target) if bias is None else (hidden, weight, target, bias)
    ref, g_ref = _value_and_grads(_dense_ce, *args)
    fused, g_fused = _value_and_grads(lambda *a: linear_cross_entropy(*a, chunk=chunk), *args)
    assert len(g_fused) == len(g_ref) == (3 if with_bias else 2)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 1, 1, 2])
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy(h, w, target, b, chunk=2), (hidden, weight, bias)
    )
    value = linear_cross_entropy(hidden, weight, target, bias, chunk=2)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, F.cross_entropy(F.linear(hidden, weight, bias), target, reduction="sum"))


def test_linear_cross_entropy_frozen_weight_gets_no_grad_and_no_labels_is_zero():
    hidden = torch.randn(4, 6, requires_grad=True)
    weight = torch.randn(9, 6)  # frozen (the usual LoRA case)
    loss = linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 8]), chunk=3)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    empty = torch.zeros(0, 6, requires_grad=True)
    zero = linear_cross_entropy(empty, weight, torch.zeros(0, dtype=torch.long))
    zero.backward()
    assert zero.item() == 0.0 and empty.grad.shape == (0, 6)


def test_linear_cross_entropy_without_grad_mode():
    hidden, weight, target = torch.randn(5, 6, requires_grad=True), torch.randn(9, 6), torch.tensor([0, 1, 2, 3, 4])
    with torch.inference_mode():
        value = linear_cross_entropy(hidden, weight, target, chunk=2)
    assert not value.requires_grad
    torch.testing.assert_close(value, _dense_ce(hidden, weight, target).detach(), rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="chunk=0"):
        linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), chunk=0)
    with pytest.raises(ValueError, match="target shape"):
        linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1, 2]))


def test_linear_cross_entropy_on_llama_hidden_states():
    """The head of a tiny llama on its own body's hidden states: gradient to the hidden input and to the head."""
    model = tiny_llama()
    with torch.no_grad():
        hidden = model.model(input_ids(batch=2, seq=9)).last_hidden_state.flatten(0, 1)  # (18, H)
    target = input_ids(batch=2, seq=9, seed=1).flatten()
    weight = model.lm_head.weight.detach().requires_grad_()
    hidden.requires_grad_()
    ref, g_ref = _value_and_grads(_dense_ce, hidden, weight, target)
    for chunk in (4, 5, 18, 512):
        fused, g_fused = _value_and_grads(lambda *a, c=chunk: linear_cross_entropy(*a, chunk=c), hidden, weight, target)
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)
        for a, b in zip(g_fused, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _assert_grad_close(actual, expected, name, rtol=1e-5):
    """Elementwise within rtol of the tensor's scale: entries near zero come from cancellations, where plain rtol
    would compare roundoff with roundoff."""
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _fused_calls(monkeypatch) -> list[int]:
    """Count the calls of the fused function from lm_loss_sum (proves the fast path ran)."""
    calls, real = [], lorakit.training.loss.head_cross_entropy

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lorakit.training.loss, "head_cross_entropy", counting)
    return calls


def _loss_and_grads(fn, model, batch, **kwargs):
    """Loss, count and the gradients of every trainable parameter and of the input embeddings."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    inputs = {k: v for k, v in batch.items() if k != "input_ids"} | {"inputs_embeds": embeds}
    loss, n = fn(model, inputs, **kwargs)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), n, grads | {"inputs_embeds": embeds.grad}


def _lora_llama(**config):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, **config)
    )
    model.train()
    return model


@pytest.mark.parametrize("chunk", [1, 3, 5, 10, 512])
def test_fused_lm_loss_equals_reference_for_chunk_sizes(chunk, monkeypatch):
    model, batch = _lora_llama(), _batch()
    ref, n_ref, g_ref = _loss_and_grads(lm_loss_sum_reference, model, batch)
    calls = _fused_calls(monkeypatch)
    fused, n, g = _loss_and_grads(lm_loss_sum, model, batch, chunk=chunk)
    assert calls == [1] and n == n_ref == 10
    assert any("lora_A" in k for k in g) and g.keys() == g_ref.keys()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)
    for k in g_ref:
        _assert_grad_close(g[k], g_ref[k], k)


def test_fused_lm_loss_with_one_label():
    model, batch = _lora_llama(), _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    batch["labels"][1, 7] = 5
    ref, _, g_ref = _loss_and_grads(lm_loss_sum_reference, model, batch)
    fused, n, g = _loss_and_grads(lm_loss_sum, model, batch, chunk=4)
    assert n == 1
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)
    for k in g_ref:
        _assert_grad_close(g[k], g_ref[k], k)


def test_fused_lm_loss_with_trained_head_with_bias(monkeypatch):
    """lm_head in modules_to_save (trained in full), here an nn.Linear with a bias: its weight and bias gradients."""
    base = tiny_llama()
    torch.manual_seed(1)
    base.lm_head = nn.Linear(HIDDEN, VOCAB, bias=True)
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, modules_to_save=["lm_head"])
    model = get_peft_model(base, config)
    model.train()
    batch = _batch()
    ref, _, g_ref = _loss_and_grads(lm_loss_sum_reference, model, batch)
    calls = _fused_calls(monkeypatch)
    fused, _, g = _loss_and_grads(lm_loss_sum, model, batch, chunk=3)
    head = [k for k in g if "modules_to_save" in k]
    assert calls == [1] and sorted(k.rsplit(".", 1)[1] for k in head) == ["bias", "weight"]
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)
    for k in g_ref:
        _assert_grad_close(g[k], g_ref[k], k)


def test_lora_wrapped_head_falls_back_to_the_unfused_path(monkeypatch):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    batch = _batch()
    ref, _, g_ref = _loss_and_grads(lm_loss_sum_reference, model, batch)
    calls = _fused_calls(monkeypatch)
    loss, _, g = _loss_and_grads(lm_loss_sum, model, batch)
    assert calls == [] and any("lm_head.lora_A" in k for k in g)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    for k in g_ref:
        _assert_grad_close(g[k], g_ref[k], k)


@pytest.mark.parametrize("trained_head", [False, True])
def test_fused_lm_loss_under_bf16_autocast(trained_head):
    """Under autocast the head matmul runs in bf16 (as nn.Linear would) and the softmax in fp32: the fused loss and
    gradients match the unfused labelled-positions path to bf16 precision."""
    model = _lora_llama(modules_to_save=["lm_head"] if trained_head else None)
    batch = _batch()
    results = []
    for fn in (lm_loss_sum_unfused, lm_loss_sum):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(fn, model, batch, **({"chunk": 3} if fn is lm_loss_sum else {})))
    (ref, _, g_ref), (fused, _, g) = results
    assert fused.dtype == torch.float32
    assert all(g[k].dtype == g_ref[k].dtype == torch.float32 for k in g_ref)
    torch.testing.assert_close(fused, ref, rtol=1e-3, atol=0)
    for k in g_ref:
        _assert_grad_close(g[k], g_ref[k], k, rtol=2e-2)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_fused_lm_loss_takes_a_quantized_models_half_linear_head(bf16, monkeypatch):
    """``lorakit train --quantize``'s model: NF4 linear layers, the output layer a HalfLinear (bf16 weight). The fused
    loss runs and equals the unfused labelled-positions path (the head's own forward): fp32 to roundoff, under bf16
    autocast to bf16 rounding (its matmuls in bf16 as the head's: equal bit for bit when this test was written)."""
    torch.manual_seed(0)
    base = lorakit.quantize(tiny_llama(), bits=4)
    assert type(base.lm_head) is HalfLinear and base.lm_head.weight.dtype == torch.bfloat16
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    batch = _batch()
    results = []
    for fn in (lm_loss_sum_unfused, lm_loss_sum):
        calls = _fused_calls(monkeypatch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            results.append(_loss_and_grads(fn, model, batch, **({"chunk": 3} if fn is lm_loss_sum else {})))
        assert calls == ([1] if fn is lm_loss_sum else [])
    (ref, _, g_ref), (fused, _, g) = results
    assert any("lora_B" in k for k in g_ref) and g.keys() == g_ref.keys()
    torch.testing.assert_close(fused, ref, rtol=1e-5 if not bf16 else 2e-3, atol=0)
    for k in g_ref:
        _assert_grad_close(g[k], g_ref[k], k, rtol=1e-5 if not bf16 else 2e-2)


def test_a_half_linear_head_that_is_not_provably_its_forward_runs_unfused(monkeypatch):
    """A trained bf16 weight, a subclass, a hook, another storage dtype: the head's own forward runs."""
    class Sub(HalfLinear):
        pass

    changes = {
        "trained": lambda head: head.weight.requires_grad_(True),
        "subclass": lambda head: setattr(head, "__class__", Sub),
        "hooked": lambda head: head.register_forward_hook(lambda *a: None),
        "fp32 storage": lambda head: setattr(head, "weight", nn.Parameter(head.weight.float(), requires_grad=False)),
    }
    for name, change in changes.items():
        model = get_peft_model(lorakit.quantize(tiny_llama(), bits=4), LoraConfig(r=4, target_modules="all-linear"))
        change(model.get_base_model().lm_head)
        calls = _fused_calls(monkeypatch)
        lm_loss_sum(model, _batch())
        assert calls == [], name
