"""The fused causal-LM loss of ``model(..., labels=...)``: the source check that decides where it applies, its loss
against transformers' ForCausalLMLoss (a quantized model's HalfLinear head included), and the deferred logits of its
outputs (tests/api/test_fused_loss.py runs it on every causal-LM architecture of the matrix)."""

from __future__ import annotations

import textwrap

import pytest
import torch
import transformers
from helpers import VOCAB, input_ids, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

import lorakit
from lorakit.fast import causal_lm_loss as cl
from lorakit.fast import fused_ce
from lorakit.quant.half import HalfLinear

STANDARD = """
@can_return_tuple
@auto_docstring
def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
    outputs = self.model(input_ids=input_ids, **kwargs)
    hidden_states = outputs.last_hidden_state
    logits = self.lm_head(hidden_states[:, slice_indices, :])
    loss = None
    if labels is not None:
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
"""


def _edit(old: str, new: str) -> str:
    assert old in STANDARD
    return STANDARD.replace(old, new)


LOSS = "        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)\n"
ACCEPTED = {
    "standard": STANDARD,
    "positional logits": _edit("logits=logits, labels=labels", "logits, labels"),
    "other name (Falcon)": STANDARD.replace("logits = self", "lm_logits = self").replace("=logits", "=lm_logits"),
    "contiguous (OPT)": _edit("self.lm_head(hidden_states[:, slice_indices, :])", "self.lm_head(h).contiguous()"),
    "float (Nemotron-H)": _edit("self.lm_head(hidden_states[:, slice_indices, :])", "self.lm_head(h).float()"),
    "tuple branch (RWKV)": _edit("    return Causal", "    if not return_dict:\n        return (loss, logits)\n"
                                 "    return Causal"),
}
REFUSED = {
    "soft-capping (Gemma 2)": (_edit(LOSS, "        logits = torch.tanh(logits / 30.0) * 30.0\n" + LOSS),
                               "assigns 'logits' 2 times"),
    "scale (Cohere)": (_edit("    loss = None", "    logits = logits * self.logit_scale\n    loss = None"),
                       "assigns 'logits' 2 times"),
    "in-place scale": (_edit("    loss = None", "    logits.mul_(2.0)\n    loss = None"), "reads 'logits' at line"),
    "augmented": (_edit("    loss = None", "    logits += self.bias\n    loss = None"), "assigns 'logits' 2 times"),
    "other loss": (_edit("self.loss_function(logits=logits", "my_loss(logits=logits"), "loss_function 0 times"),
    "logits to another function": (_edit("    loss = None", "    z_loss = logsumexp(logits)\n    loss = None"),
                                   "reads 'logits' at line"),
    "two loss calls": (_edit(LOSS, LOSS + LOSS), "calls self.loss_function 2 times"),
    "no head call": (_edit("self.lm_head(", "self.head("), "calls self.lm_head 0 times"),
    "head twice": (_edit("    loss = None", "    more = self.lm_head(hidden_states)\n    loss = None"),
                   "calls self.lm_head 2 times"),
    "head result used": (_edit("logits = self.lm_head(hidden_states[:, slice_indices, :])",
                               "logits = self.lm_head(hidden_states) / 2"), "does more with self.lm_head"),
    "unknown decorator": (_edit("@auto_docstring", "@softcap_outputs"), "decorator 'softcap_outputs'"),
    "float with a dtype": (_edit("self.lm_head(hidden_states[:, slice_indices, :])",
                                 "self.lm_head(h).to(torch.float16)"), "does more with self.lm_head"),
    "logits in the output twice": (_edit("cache=outputs.cache)", "cache=outputs.cache, extra=logits)"),
                                   "reads 'logits' at line"),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_source_check_accepts_forwards_that_pass_the_head_output_untouched(name):
    assert cl.source_refusal(textwrap.dedent(ACCEPTED[name]), "lm_head") is None


@pytest.mark.parametrize("name", REFUSED)
def test_source_check_refuses_forwards_that_change_or_reuse_the_logits(name):
    source, reason = REFUSED[name]
    refusal = cl.source_refusal(textwrap.dedent(source), "lm_head")
    assert refusal is not None and reason in refusal, refusal


# -- the loss against ForCausalLMLoss ----------------------------------------------------------------------------
def _head_and_hidden(bias: bool, seed: int = 0, device: str = "cpu") -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    head = torch.nn.Linear(16, VOCAB, bias=bias).to(device)
    hidden = torch.randn(3, 7, 16).to(device).requires_grad_()  # (B, T, H)
    return head, hidden


def _labels(seed: int = 1) -> torch.Tensor:
    labels = input_ids(batch=3, seq=7, seed=seed)
    labels[0, :3] = -100  # prompt
    labels[2, 5:] = -100  # padding
    return labels


LOSS_KWARGS = {
    "mean": {},
    "num_items_in_batch tensor": {"num_items_in_batch": torch.tensor(23)},
    "num_items_in_batch int": {"num_items_in_batch": 5},
    "ignore_index": {"ignore_index": 7},
    "shift_labels": {"shift_labels": _labels(seed=3)},
    "ignored kwargs": {"output_attentions": False, "num_items_in_batch": torch.tensor(4)},
}


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("name", LOSS_KWARGS)
def test_loss_equals_for_causal_lm_loss_in_value_and_gradients(name, bias, device):
    """On every device torch reports (the ``device`` fixture): the fused loss runs its matmuls on the head's."""
    kwargs = LOSS_KWARGS[name]
    labels = _labels().masked_fill(_labels() == -100, kwargs.get("ignore_index", -100)).to(device)
    results = []
    for fused in (False, True):
        head, hidden = _head_and_hidden(bias, device=device)
        if fused:
            loss = cl.causal_lm_loss(cl.DeferredLogits(head, hidden), labels, VOCAB, linear=head, chunk=4, **kwargs)
        else:
            loss = ForCausalLMLoss(head(hidden), labels, VOCAB, **kwargs)
        loss.backward()
        grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
        results.append((loss.detach(), grads))
    (ref, ref_grads), (fast, fast_grads) = results
    assert fast.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
    for g, want in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, want, atol=1e-7, rtol=1e-5)


def test_loss_with_every_label_ignored_is_nan_as_the_reference():
    head, hidden = _head_and_hidden(False)
    labels = torch.full((3, 7), -100)
    fast = cl.causal_lm_loss(cl.DeferredLogits(head, hidden), labels, VOCAB, linear=head)
    assert torch.isnan(fast) and torch.isnan(ForCausalLMLoss(head(hidden), labels, VOCAB))


def test_loss_refuses_labels_that_do_not_match_the_head_input():
    head, hidden = _head_and_hidden(False)
    with pytest.raises(ValueError, match="fused_loss = False"):
        cl.causal_lm_loss(cl.DeferredLogits(head, hidden), torch.zeros(3, 5, dtype=torch.long), VOCAB, linear=head)
    with pytest.raises(TypeError, match="inside the fused forward"):
        cl.causal_lm_loss(head(hidden), _labels(), VOCAB, linear=head)


# -- the wrapped model: decision and deferred logits -------------------------------------------------------------
def _model(seed: int = 0, device: torch.device | str = "cpu", **config: object) -> lorakit.PeftModel:
    base = tiny_llama(seed) if not config else LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, **config))
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model.to(device).train()


def _batch(device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    ids = input_ids(batch=3, seq=8)
    return {"input_ids": ids.to(device), "labels": _labels_for(ids).to(device)}


def _labels_for(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[1, 6:] = -100
    return labels


def test_outputs_hold_deferred_logits_equal_to_the_reference_ones(device):
    model = _model(device=device)
    batch = _batch(device)
    with torch.no_grad():
        model.fused_loss = False
        ref = model(**batch)
        model.fused_loss = True
        out = model(**batch)
    assert cl.is_fused(out) and not cl.is_fused(ref)
    assert isinstance(dict.get(out, "logits"), cl.DeferredLogits)  # not computed yet
    assert list(out.keys()) == list(ref.keys())
    assert isinstance(dict(out.items())["logits"], cl.DeferredLogits)  # items() leaves them deferred
    torch.testing.assert_close(out[1], ref.logits)  # integer indexing computes them, in the key's place
    assert not isinstance(dict.get(out, "logits"), cl.DeferredLogits)
    assert out.logits is out["logits"] is out.get("logits") is out.to_tuple()[1]
    torch.testing.assert_close(out.loss, ref.loss)


def test_deferred_logits_carry_gradients_and_the_forwards_autocast(device):
    model = _model(device=device)
    batch = _batch(device)
    losses = []
    for fused in (False, True):
        model.fused_loss = fused
        model.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**batch)
        logits = out.logits  # read outside autocast: computed as under the forward's autocast
        assert logits.dtype == torch.bfloat16 and logits.requires_grad
        (out.loss + logits.float().square().mean()).backward()
        losses.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for fast, ref in zip(*losses, strict=True):
        assert relative_error(fast, ref) < 3e-2  # bf16 rounding (this reference is 5% from its fp32 gradients)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||: bf16 gradients differ elementwise by rounding, their norm by much less."""
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def test_accelerates_fp32_conversion_keeps_the_logits_deferred():
    from accelerate.utils import convert_to_fp32

    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**_batch())
    converted = convert_to_fp32(out)  # what accelerate (transformers.Trainer, bf16) does to every output
    assert cl.is_fused(converted) and isinstance(dict.get(converted, "logits"), cl.DeferredLogits)
    assert converted.loss.dtype == torch.float32
    torch.testing.assert_close(converted.logits, out.logits)


REFERENCE_CALLS = {
    "eval mode": (lambda m: m.eval(), {}, "eval mode"),
    "no labels": (lambda m: None, {"labels": None}, "no labels"),
    "return_dict=False": (lambda m: None, {"return_dict": False}, "return_dict=False"),
    "logits_to_keep": (lambda m: None, {"logits_to_keep": 1}, "logits_to_keep"),
    "switched off": (lambda m: setattr(m, "fused_loss", False), {}, "fused_loss is False"),
    "torchscript": (lambda m: setattr(m.get_base_model().config, "torchscript", True), {}, "torchscript"),
    "custom loss": (lambda m: setattr(m.get_base_model(), "loss_function", ForCausalLMLoss), {}, "loss function"),
    "hooked head": (lambda m: m.get_base_model().lm_head.register_forward_hook(lambda *a: None), {}, "hooks"),
    "replaced forward": (lambda m: setattr(m.get_base_model(), "forward", m.get_base_model().forward), {},
                         "replaced on the instance"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_calls_the_fused_path_cannot_prove_run_the_reference(name):
    change, kwargs, reason = REFERENCE_CALLS[name]
    model = _model()
    change(model)
    batch = {**_batch(), **kwargs}
    assert reason in model.fused_loss_refusal(**batch)
    if name == "logits_to_keep":
        return  # the reference itself fails: labels for 8 positions, logits for 1
    out = model(**batch)
    assert not cl.is_fused(out)
    if name == "return_dict=False":
        assert isinstance(out, tuple) and out[1].shape == (3, 8, VOCAB)


def test_lora_on_the_head_runs_the_reference():
    model = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    model.train()
    assert "not a plain nn.Linear" in model.fused_loss_refusal(**_batch())
    assert not cl.is_fused(model(**_batch()))


@pytest.mark.parametrize("setup", ["tied", "modules_to_save_head", "checkpointing", "bf16_weights"])
def test_fused_loss_and_gradients_equal_the_reference(setup, device):
    """Tied embeddings, a head trained in full (modules_to_save: its copy's weight gets a gradient), gradient
    checkpointing, a model in bf16 without autocast (the head's matmul in bf16, its softmax in fp32, as the
    reference's ``logits.float()``)."""
    grads = []
    for fused in (False, True):
        torch.manual_seed(0)
        if setup == "tied":
            model = _model(tie_word_embeddings=True)
            assert model.get_base_model().lm_head.weight is model.get_base_model().model.embed_tokens.weight
        elif setup == "modules_to_save_head":
            config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
            model = lorakit.get_peft_model(tiny_llama(0), config).train()
        elif setup == "checkpointing":
            model = _model()
            model.gradient_checkpointing_enable()
        else:
            config = lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.1)
            base = tiny_llama(0).to(torch.bfloat16)
            model = lorakit.get_peft_model(base, config, autocast_adapter_dtype=False).train()
        model.to(device).fused_loss = fused
        out = model(**_batch(device))
        assert cl.is_fused(out) == fused
        out.loss.backward()
        grads.append((out.loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_grads), (fast, fast_grads) = grads
    if setup == "bf16_weights":
        assert fast.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(fast, ref, atol=0, rtol=2e-3)
        assert max(relative_error(fast_grads[k], ref_grads[k]) for k in ref_grads) < 3e-2
        return
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
    if setup == "modules_to_save_head":
        assert any("lm_head" in k for k in ref_grads)
    for k in ref_grads:
        torch.testing.assert_close(fast_grads[k], ref_grads[k], atol=1e-6, rtol=1e-4, msg=k)


def test_a_class_forward_replaced_later_is_read_again():
    """Liger-style patches replace a class's forward after models exist: the check follows the function."""

    class Patched(LlamaForCausalLM):
        pass

    base = tiny_llama(0)
    base.__class__ = Patched
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules=["q_proj"])).train()
    assert model.fused_loss_refusal(**_batch()) is None

    def forward(self, input_ids=None, labels=None, **kwargs):  # computes its own loss from the head's weight
        hidden = self.model(input_ids=input_ids).last_hidden_state
        return {"loss": (hidden @ self.lm_head.weight.T).logsumexp(-1).mean()}

    Patched.forward = forward
    assert "calls self.lm_head 0 times" in model.fused_loss_refusal(**_batch())
    assert "loss" in model(**_batch())


@pytest.mark.parametrize("cls, refused", [
    ("LlamaForCausalLM", False), ("Qwen2VLForConditionalGeneration", False), ("FalconForCausalLM", False),
    ("CohereForCausalLM", True), ("Gemma2ForCausalLM", True), ("GraniteForCausalLM", True), ("Gemma3ForCausalLM", True),
])
def test_transformers_forwards_are_read_as_they_are(cls, refused):
    """transformers 5's own forwards: Cohere's logit_scale, Gemma's soft-capping, Granite's logits_scaling refused."""
    refusal = cl.forward_refusal(getattr(transformers, cls), "lm_head")
    assert (refusal is not None) == refused, refusal


# -- a quantized model's 16-bit output layer (HalfLinear) ----------------------------------------------------------
def _half_head(bias: bool) -> HalfLinear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, VOCAB, bias=bias)
    return HalfLinear(linear, torch.nn.Parameter(linear.weight.detach().bfloat16(), requires_grad=False), torch.float32)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("mode", ["fp32", "fp16_input", "bf16_autocast"])
def test_half_linear_head_loss_equals_its_forward_and_for_causal_lm_loss(mode, bias, monkeypatch):
    """HalfLinear's forward (x @ W16.to(x.dtype).T + bias; under autocast a bf16 matmul, the bias added to its bf16
    result) + ForCausalLMLoss against the fused loss, its weight cast 7 rows at a time (fused_ce.CAST_ELEMENTS): fp32
    and fp16 to roundoff; bf16 gradients bit for bit (num_items_in_batch a power of two: 1 / 16 scales exactly)."""
    monkeypatch.setattr(fused_ce, "CAST_ELEMENTS", 7 * 16)
    head, labels, kwargs = _half_head(bias), _labels(), {"num_items_in_batch": 16}
    dtype = torch.float16 if mode == "fp16_input" else torch.float32
    results = []
    for fused in (False, True):
        hidden = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
            if fused:
                loss = cl.causal_lm_loss(cl.DeferredLogits(head, hidden), labels, VOCAB, linear=head, chunk=4, **kwargs)
            else:
                loss = ForCausalLMLoss(head(hidden), labels, VOCAB, **kwargs)
        loss.backward()
        results.append((loss.detach(), hidden.grad))
    (ref, ref_grad), (fast, fast_grad) = results
    assert fast.dtype == ref.dtype == torch.float32 and fast_grad.dtype == ref_grad.dtype == dtype
    torch.testing.assert_close(fast, ref, atol=0, rtol=1e-6)  # the order of fp32 sums
    tolerance = {"fp32": 1e-5, "fp16_input": 1e-3, "bf16_autocast": 0.0}[mode]
    torch.testing.assert_close(fast_grad, ref_grad, atol=tolerance * ref_grad.abs().max().item(), rtol=tolerance)


def test_an_upcast_weight_is_cast_a_few_rows_at_a_time(monkeypatch):
    """No full-size fp32 copy of a bf16 weight: blocks of at most CAST_ELEMENTS; a weight already in the matmul's
    dtype is used as it is (no copy)."""
    monkeypatch.setattr(fused_ce, "CAST_ELEMENTS", 7 * 16)
    weight = torch.randn(VOCAB, 16).bfloat16()
    blocks = list(fused_ce._weight_blocks(weight, torch.float32)())
    assert len(blocks) == -(-VOCAB // 7) and all(w.dtype == torch.float32 and w.numel() <= 7 * 16 for _, w in blocks)
    torch.testing.assert_close(torch.cat([w for _, w in blocks]), weight.float(), atol=0, rtol=0)
    (span, whole), = fused_ce._weight_blocks(weight, torch.bfloat16)()
    assert span == slice(None) and whole.data_ptr() == weight.data_ptr()


def _quantized_model(tie: bool = False) -> lorakit.PeftModel:
    base = tiny_llama(0)
    if tie:
        base.lm_head.weight = base.model.embed_tokens.weight
    base = lorakit.quantize(base, bits=4)  # the default: NF4 blocks, embedding and output layer in bf16
    assert type(base.lm_head) is HalfLinear and base.lm_head.weight.dtype == torch.bfloat16
    config = lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.1)
    return lorakit.get_peft_model(base, config).train()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_quantized_models_half_linear_head_takes_the_fused_loss(tie):
    """The refusal 'the output layer HalfLinear is not a plain nn.Linear' is gone: loss and LoRA gradients equal the
    reference's (dropout on), fp32 and bf16 autocast (tests/api/test_fused_loss.py: every architecture)."""
    model = _quantized_model(tie)
    assert (model.get_base_model().lm_head.weight is model.get_input_embeddings().weight) == tie
    assert model.fused_loss_refusal(**_batch()) is None
    for bf16 in (False, True):
        results = []
        for fused in (False, True):
            model.fused_loss = fused
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(**_batch(), num_items_in_batch=16)
            assert cl.is_fused(out) == fused
            out.loss.backward()
            results.append((out.loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
        (ref, ref_grads), (fast, fast_grads) = results
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
        for k in ref_grads:
            torch.testing.assert_close(fast_grads[k], ref_grads[k], atol=1e-6, rtol=1e-4, msg=k)


class _HalfLinearSubclass(HalfLinear):
    pass


UNSAFE_HALF_HEADS = {
    "weight requires grad": (lambda head: head.weight.requires_grad_(True), "requires grad"),
    "subclass": (lambda head: setattr(head, "__class__", _HalfLinearSubclass), "not a plain nn.Linear or HalfLinear"),
    "forward hook": (lambda head: head.register_forward_hook(lambda *a: None), "hooks"),
    "pre-hook": (lambda head: head.register_forward_pre_hook(lambda *a: None), "hooks"),
    "fp32 storage": (lambda head: setattr(head, "weight", torch.nn.Parameter(head.weight.float(), requires_grad=False)),
                     "stores its weight in torch.float32"),
}


@pytest.mark.parametrize("name", UNSAFE_HALF_HEADS)
def test_a_half_linear_head_the_fused_loss_cannot_prove_runs_the_reference(name):
    change, reason = UNSAFE_HALF_HEADS[name]
    model = _quantized_model()
    change(model.get_base_model().lm_head)
    refusal = model.fused_loss_refusal(**_batch())
    assert refusal is not None and reason in refusal, refusal
    assert not cl.is_fused(model(**_batch()))
