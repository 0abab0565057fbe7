"""The labelled-positions-only loss equals the full-logits reference, in value and gradients."""

import pytest
import torch
from helpers import input_ids, tiny_gpt2, tiny_llama

from lorakit import LoraConfig, get_peft_model
from lorakit.loss import lm_loss_sum, lm_loss_sum_reference


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
