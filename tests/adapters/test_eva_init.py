"""EVA's data pass (lorakit.adapters.eva) on a tiny Llama: A is the PCA of each layer's (masked) inputs, the ranks
follow the budget, the model is unchanged at start, hooks are removed, and PEFT loads the saved adapter."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from helpers import input_ids, logits, tiny_llama
from torch import nn

import lorakit

TARGETS = ["q_proj", "v_proj"]


def _batch() -> dict[str, torch.Tensor]:
    ids = input_ids(batch=2, seq=12, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not trained on
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _config(rho: float = 1.0) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="eva",
                              eva_config=lorakit.EvaConfig(rho=rho, tau=0.99))


def _reference(name: str, k: int) -> torch.Tensor:
    """fp64 PCA components (k, in) of module ``name``'s inputs at the unmasked positions of _batch()."""
    model, batch, seen = tiny_llama(0), _batch(), []
    model.get_submodule(name).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(**batch)
    keep = (batch["attention_mask"].bool() & (batch["labels"] != -100))
    x = seen[0][keep].double()
    _, _, Vh = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False)
    return Vh[:k]


def test_state_dict_is_the_pca_of_the_masked_inputs():
    model = tiny_llama(0)
    found = lorakit.get_eva_state_dict(model, [_batch()], peft_config=_config())  # one batch, cycled
    assert sorted(found) == sorted(f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS)
    assert not any(m._forward_hooks for m in model.modules())
    for name, A in found.items():
        ref = _reference(name, 2)
        assert A.shape == (2, ref.shape[1])
        assert torch.allclose((A.double() * ref).sum(dim=1).abs(), torch.ones(2, dtype=torch.float64), atol=1e-4)


def test_initialize_sets_A_keeps_the_model_and_spends_the_budget(tmp_path):
    base = tiny_llama(0)
    model = lorakit.get_peft_model(tiny_llama(0), _config(rho=2.0))
    lorakit.initialize_lora_eva_weights(model, [_batch()])
    assert torch.allclose(logits(model), logits(base), atol=1e-5)  # B = 0
    ranks = {n: m.r["default"] for n, m in model.named_modules() if isinstance(m, lorakit.LoraLinear)}
    assert sum(ranks.values()) == 2 * 4 and max(ranks.values()) <= 4  # budget: 4 layers x r=2, each <= r * rho
    config = model.peft_config["default"]
    for name, r in ranks.items():
        short = name.removeprefix("base_model.model.")
        assert config.rank_for(short) == r
        assert config.alpha_for(short) == pytest.approx(4 * r / 2)  # adjust_scaling_factors: scaling stays 2
    for module in model.modules():
        if isinstance(module, lorakit.LoraLinear):
            module.lora_B["default"].weight.data.normal_(0, 0.1)  # as if trained
    expected = logits(model)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert torch.allclose(logits(loaded), expected, atol=1e-4)


def test_refusals():
    plain = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        lorakit.initialize_lora_eva_weights(plain, [_batch()])
    with pytest.raises(ValueError, match="must be a PeftModel"):
        lorakit.initialize_lora_eva_weights(tiny_llama(0), [_batch()])
    with pytest.raises(ValueError, match="peft_config is required"):
        lorakit.get_eva_state_dict(tiny_llama(0), [_batch()])
    with pytest.raises(ValueError, match="`rho` must be >= 1.0"):
        lorakit.EvaConfig(rho=0.5)
    with pytest.warns(UserWarning, match="Using default EVA config"):
        assert lorakit.LoraConfig(init_lora_weights="eva").eva_config == lorakit.EvaConfig()


class Two(nn.Module):
    """lin0 sees isotropic inputs, lin1 the same inputs projected on one direction (one component explains all)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1 = nn.Linear(8, 8), nn.Linear(8, 8)
        u = torch.randn(8, 1)
        self.register_buffer("P", u @ u.T / (u.T @ u))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(x) + self.lin1(x @ self.P)


def test_rank_moves_to_the_layer_whose_inputs_need_it():
    model = lorakit.get_peft_model(Two(), lorakit.LoraConfig(
        r=2, target_modules=["lin0", "lin1"], init_lora_weights="eva", eva_config=lorakit.EvaConfig(rho=2.0)))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    lorakit.initialize_lora_eva_weights(model, [x], forward_fn=lambda m, b: m(b), prepare_model_inputs_fn=None,
                                        prepare_layer_inputs_fn=None)
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert (lin0.r["default"], lin1.r["default"]) == (3, 1)  # budget 4: lin1 needs one component only
    assert model.peft_config["default"].rank_pattern == {"lin0": 3, "lin1": 1}
    u = model.base_model.model.P[:, 0] / model.base_model.model.P[:, 0].norm()
    assert torch.allclose((lin1.lora_A["default"].weight[0] @ u).abs(), torch.tensor(1.0), atol=1e-4)
