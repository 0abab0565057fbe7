"""``model(..., labels=...)`` of a lorakit causal LM in training mode (the fused loss, lorakit.fast.causal_lm_loss)
against the same model's reference path (``model.fused_loss = False``: transformers' own forward with full logits),
on every causal-LM architecture of the matrix (tests/api/matrix_models.py): loss and every trainable gradient, fp32
and bf16 autocast, LoRA dropout on, padded rows (-100 labels) and ``num_items_in_batch`` as transformers.Trainer
passes it; the architectures it must refuse run the reference. And a transformers.Trainer run: the same training on
both paths, the fused one taken, evaluate() and compute_metrics still given the logits."""

from __future__ import annotations

import re
import warnings

import matrix_models as mm
import numpy as np
import pytest
import torch
import transformers
from helpers import input_ids, tiny_llama
from torch import nn

import lorakit
from lorakit.fast import causal_lm_loss as cl
from lorakit.quant.half import HalfLinear

CAUSAL = [case for case in mm.CASES if case.task == "causal_lm"]
# case -> what the refusal says: their forwards post-process the logits (soft-capping, logits_scaling)
REFUSED = {
    "gemma2-causal_lm": "assigns 'logits' 4 times",
    "gemma3_text-causal_lm": "assigns 'logits' 4 times",
    "gemma4-causal_lm": "assigns 'logits' 4 times",
    "granitemoe-causal_lm": "assigns 'logits' 2 times",
    "granitemoeshared-causal_lm": "assigns 'logits' 2 times",
}
# all-linear takes the MoE router of these (a Linear subclass returning a tuple): adapt the attention only
ATTENTION_ONLY = {"phimoe-causal_lm", "llama4_text-causal_lm"}


def _model(case: mm.Case, quantized: bool = False) -> lorakit.PeftModel:
    """LoRA r=4 on all linear layers, dropout 0.1, B random. Mixtures of experts: all-linear adapts their fused
    expert / router parameters, where LoRA has no input to drop (lorakit refuses dropout there, as PEFT): dropout 0.
    ``quantized``: the base through ``lorakit.quantize(bits=4)`` first (QLoRA: NF4 linear layers, the embedding and
    output layer stored in bf16, the head a HalfLinear)."""
    targets = ["q_proj", "v_proj"] if case.name in ATTENTION_ONLY else "all-linear"
    moe = any(key in case.config for key in ("num_experts_per_tok", "ffn_config"))
    config = lorakit.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0 if moe else 0.1, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = mm.build(case)
        if quantized:
            base = lorakit.quantize(base, bits=4)
        return lorakit.get_peft_model(base, config).train()


def _inputs(case: mm.Case) -> dict[str, torch.Tensor]:
    """The case's batch with row 1 padded from position 5 (mask 0, labels -100), and num_items_in_batch counted as
    Trainer counts it (labels other than -100 after the shift, over the accumulated batches: here 3 more)."""
    batch = mm.batch(case)
    labels = batch["labels"].clone()
    labels[1, 5:] = -100
    mask = torch.ones_like(labels)
    mask[1, 5:] = 0
    items = (labels[:, 1:] != -100).sum() + 3
    return dict(input_ids=batch["input_ids"], attention_mask=mask, labels=labels, num_items_in_batch=items)


def _step(model: lorakit.PeftModel, inputs: dict[str, torch.Tensor], fused: bool, bf16: bool):
    """(loss, {trainable name: gradient}, whether the fused path ran) of one forward + backward."""
    model.fused_loss = fused
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks on both paths
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        warnings.simplefilter("ignore")
        out = model(**inputs)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), grads, cl.is_fused(out)


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", CAUSAL, ids=lambda c: c.name)
def test_fused_loss_equals_the_reference_on_every_causal_lm(case):
    _assert_fused_equals_reference(case, _model(case), _inputs(case))


@pytest.mark.parametrize("case", CAUSAL, ids=lambda c: c.name)
def test_fused_loss_equals_the_reference_on_every_quantized_causal_lm(case):
    """QLoRA's default path: the output layer a HalfLinear (bf16 weight cast to the input's dtype, or autocast's);
    Gemma's tied embedding is a ScaledWordEmbedding, which quantize keeps, and with it the plain Linear head.
    num_items_in_batch a power of two: the fused loss scales its bf16-rounded gradients by 1 / num_items after their
    matmuls, the reference before; with an exact scale, the bf16 gradients agree to the matmuls' own rounding (on
    Llama, Phi with its head's bias, Bloom: bit for bit)."""
    model, inputs = _model(case, quantized=True), _inputs(case)
    inputs["num_items_in_batch"] = torch.tensor(32)
    head = model.get_base_model().get_output_embeddings()
    assert type(head) is (nn.Linear if case.name.startswith("gemma") else HalfLinear), type(head)
    _assert_fused_equals_reference(case, model, inputs)


def _assert_fused_equals_reference(case: mm.Case, model: lorakit.PeftModel, inputs: dict[str, torch.Tensor]) -> None:
    refusal = model.fused_loss_refusal(**inputs)
    if case.name in REFUSED:
        assert refusal is not None and REFUSED[case.name] in refusal, refusal
        assert not _step(model, inputs, fused=True, bf16=False)[2]  # the reference ran
        return
    assert refusal is None
    ref, ref_grads, ref_fused = _step(model, inputs, fused=False, bf16=False)
    loss, grads, fused = _step(model, inputs, fused=True, bf16=False)
    assert fused and not ref_fused
    assert ref_grads and grads.keys() == ref_grads.keys()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # bf16 autocast: both paths round; the fused one must be nearer the reference than the reference is to fp32
    try:
        ref16, ref16_grads, _ = _step(model, inputs, fused=False, bf16=True)
    except RuntimeError as e:  # DBRX's experts fail under autocast in transformers itself: so must the fused path
        with pytest.raises(RuntimeError, match=re.escape(str(e))):
            _step(model, inputs, fused=True, bf16=True)
        return
    loss16, grads16, fused16 = _step(model, inputs, fused=True, bf16=True)
    assert fused16
    torch.testing.assert_close(loss16, ref16, atol=0, rtol=2e-3)
    rounding = max(_relative(ref16_grads[k], ref_grads[k]) for k in ref_grads)
    differ = max(_relative(grads16[k], ref16_grads[k]) for k in ref_grads)
    assert differ <= max(rounding, 1e-3), (differ, rounding)


# -- transformers.Trainer -----------------------------------------------------------------------------------------
def _rows() -> list[dict[str, torch.Tensor]]:
    ids = input_ids(batch=8, seq=10, seed=3)
    rows = []
    for i, row in enumerate(ids):
        labels, mask = row.clone(), torch.ones_like(row)
        labels[: i % 4] = -100  # a prompt of 0..3 tokens
        if i % 3 == 0:
            labels[7:], mask[7:] = -100, 0  # padding
        rows.append(dict(input_ids=row, attention_mask=mask, labels=labels))
    return rows


def _train(tmp_path, fused: bool, monkeypatch) -> tuple[dict[str, torch.Tensor], dict[str, float], list]:
    model = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    model.fused_loss = fused
    calls, seen = [], []
    loss = cl.causal_lm_loss
    monkeypatch.setattr(cl, "causal_lm_loss", lambda *a, **k: calls.append(1) or loss(*a, **k))

    def metrics(pred: transformers.EvalPrediction) -> dict[str, float]:
        seen.append(pred.predictions.shape)
        hits = (pred.predictions[:, :-1].argmax(-1) == pred.label_ids[:, 1:]) & (pred.label_ids[:, 1:] != -100)
        return {"accuracy": float(hits.sum() / (pred.label_ids[:, 1:] != -100).sum())}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / str(fused)), use_cpu=True, report_to=[], save_strategy="no", max_steps=2,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.5, optim="sgd",
        eval_strategy="no", per_device_eval_batch_size=4, seed=0, data_seed=0, dataloader_num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_rows(), eval_dataset=_rows(),
                                       compute_metrics=metrics)
        trainer.train()
        result = trainer.evaluate()
    assert bool(calls) == fused  # training took the fused path (4 micro-batches), evaluation did not
    assert len(calls) == (4 if fused else 0)
    assert seen == [(8, 10, mm.VOCAB)]
    weights = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return weights, result, seen


def test_trainer_trains_alike_on_both_paths_and_evaluate_gets_logits(tmp_path, monkeypatch):
    """SGD, so that the weights differ as the gradients do (Adam's first steps divide by their size)."""
    ref_weights, ref_metrics, _ = _train(tmp_path, False, monkeypatch)
    weights, metrics, _ = _train(tmp_path, True, monkeypatch)
    assert any(w.abs().max() > 0 for k, w in ref_weights.items() if "lora_B" in k), "training must move B"
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], atol=1e-6, rtol=1e-5, msg=name)
    assert metrics["eval_loss"] == pytest.approx(ref_metrics["eval_loss"], rel=1e-6)
    assert metrics["eval_accuracy"] == ref_metrics["eval_accuracy"]
    assert np.isfinite(metrics["eval_loss"])
