"""MonteCLoRA (monteclora_config: lorakit.ops.monteclora, lorakit.adapters.variant_monteclora): the sampling maths
against dense / torch.distributions references, the training forward against A_eff computed by hand, eval and merge as
plain LoRA, the variational loss, and PEFT interop (same seed: same draws, outputs, losses and gradients; files both
ways, keys, adapter_config.json)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from helpers import assert_same_adapter_config, both_ways, input_ids, logits, perturb_, tiny_llama
from safetensors.torch import load_file
from torch import nn
from torch.distributions import Dirichlet, Wishart, kl_divergence

import lorakit
from lorakit.config import ConfigError
from lorakit.ops import monteclora

ATOL = 1e-5


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _model(module: type = lorakit, **options: object) -> nn.Module:
    """The MLP with MonteCLoRA on both layers, made after the same seeds for either library; B perturbed (0 at init)."""
    defaults = {"num_samples": 3, "buffer_size": 2, "sample_scaler": 0.1, "use_entropy": True}
    config = module.LoraConfig(
        target_modules=["lin0", "lin1"], r=4, monteclora_config=module.MontecloraConfig(**{**defaults, **options})
    )
    torch.manual_seed(0)
    base = MLP()
    torch.manual_seed(1)
    model = module.get_peft_model(base, config)
    perturb_([p for n, p in model.named_parameters() if "lora_B" in n], seed=2, scale=0.5)
    return model


# -- the maths -----------------------------------------------------------------------------------------------------
def test_wishart_diagonal_is_torchs_bartlett_draw():
    for r in (1, 4, 7):
        torch.manual_seed(r)
        ours = monteclora.wishart_diagonal(r)
        torch.manual_seed(r)
        reference = Wishart(df=r, scale_tril=torch.eye(r))._bartlett_sampling(torch.Size()).diagonal()
        assert torch.allclose(ours, reference, atol=1e-6)
    torch.manual_seed(0)
    mean = torch.stack([monteclora.wishart_diagonal(5) for _ in range(2000)]).mean(0)
    assert torch.allclose(mean, torch.full((5,), 5.0), rtol=0.1)  # E[W_ii] = df


def test_noise_and_mixture_equal_their_dense_cholesky_forms():
    torch.manual_seed(0)
    sigma, z_w, z, pi, z_d = torch.randn(4), torch.rand(4) * 3, torch.randn(3, 6, 4), torch.randn(3), torch.randn(3)
    S = torch.diag(torch.exp(sigma))
    v = monteclora.variances(sigma, z_w)
    assert torch.allclose(torch.diag(v), torch.diag(torch.clip((S @ torch.diag(z_w) @ S.T).diag(), min=1e-3)))
    L = torch.linalg.cholesky(torch.diag(v))
    assert torch.allclose(monteclora.noise(z, v, 0.5), 0.5 * torch.einsum("kio,op->kip", z, L), atol=1e-6)
    a, k = torch.exp(pi), 3
    t = 1 / a * (1 - 2 / k) + (1 / a).sum() / k**2
    mu = torch.log(a) - torch.log(a).mean()
    dense = torch.linalg.cholesky(torch.diag(t) + 1e-6 * torch.eye(k)) @ z_d + mu
    assert torch.allclose(monteclora.mixture_logits(pi, z_d), dense, atol=1e-6)
    A, N, w = torch.randn(4, 6), torch.randn(3, 6, 4), torch.softmax(torch.randn(3), 0)
    loop = sum(w[i] * (A.T + N[i]) for i in range(3)).T
    assert torch.allclose(monteclora.mixed_A(A, N, w), loop, atol=1e-6)


def test_kl_terms_equal_their_closed_forms():
    torch.manual_seed(0)
    a = torch.rand(4) + 1.0
    textbook = kl_divergence(Dirichlet(a), Dirichlet(torch.full((4,), 0.1)))
    sign_flip = 2 * (torch.lgamma(a) - torch.lgamma(torch.tensor(0.1))).sum()  # PEFT's middle sum (module doc)
    assert torch.allclose(monteclora.dirichlet_kl(a, 0.1) - sign_flip, textbook, atol=1e-4)
    gamma = lambda x: torch.lgamma(x).exp()  # noqa: E731  PEFT's own expression, where it does not overflow
    b = torch.full((4,), 0.1)
    peft_form = (
        torch.log(gamma(a.sum()) / gamma(b.sum()))
        + torch.log(gamma(a) / gamma(b)).sum()
        + ((a - b) * (torch.digamma(a) - torch.digamma(a.sum()))).sum()
    )
    assert torch.allclose(monteclora.dirichlet_kl(a, 0.1), peft_form, atol=1e-4)
    sigma = torch.randn(3)
    var = torch.diag(torch.exp(sigma) ** 2)
    expected = 0.5 * (-torch.log(var.diag()).sum() * 3 + var.trace() * 3 - 9)
    assert torch.allclose(monteclora.wishart_kl(sigma), expected, atol=1e-5)
    v = torch.rand(3) + 0.5
    assert torch.allclose(monteclora.gaussian_kl(v, 5), 5 * 0.5 * (v.sum() - torch.log(v).sum() - 3), atol=1e-6)


# -- the variant in a model ------------------------------------------------------------------------------------
def test_eval_forward_and_merge_are_plain_lora():
    model = _model().eval()
    layer = model.base_model.model.lin0
    x = torch.randn(5, 10)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dense = layer.base_layer.weight + layer.scaling["default"] * B @ A  # (20, 10)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ dense.T + layer.base_layer.bias, atol=ATOL)
        out = model(x)
        model.merge_adapter()
        assert torch.allclose(model(x), out, atol=ATOL)
        model.unmerge_adapter()
        assert torch.allclose(model(x), out, atol=ATOL)
    assert model._get_monteclora_loss() == 0.0


def test_training_forward_mixes_noisy_copies_of_A_and_writes_the_buffers():
    model = _model().train()
    layer = model.base_model.model.lin0
    sampler = layer.lora_monteclora_sampler["default"]
    x = torch.randn(5, 10)
    for step in range(2):
        z, z_w, z_d = sampler._draws[-1]
        v = monteclora.variances(sampler.std_prior, z_w)
        w = torch.softmax(monteclora.mixture_logits(sampler.expert_weights_prior, z_d), 0)
        N = 0.1 * z * v.sqrt()  # (K, in, r)
        A_eff = sum(w[k] * (layer.lora_A["default"].weight.T + N[k]) for k in range(3)).T  # (r, in)
        expected = layer.base_layer(x) + x @ A_eff.T @ layer.lora_B["default"].weight.T * layer.scaling["default"]
        assert torch.allclose(layer(x), expected, atol=ATOL), step
        assert torch.allclose(sampler.gaussian_var_prior, torch.diag(v)) and torch.allclose(sampler.expert_weights, w)
    assert sampler._draws == []  # buffer_size 2: the third forward draws a new store first
    layer(x)
    assert len(sampler._draws) == 1
    model.eval()
    with torch.no_grad():  # no draws outside training
        layer(x)
    assert len(sampler._draws) == 1


def test_variational_loss_and_gradients_reach_the_variational_parameters():
    model = _model().train()
    x = torch.randn(5, 10)
    out = model(x)
    loss = model._get_monteclora_loss()
    terms = []
    for name in ("lin0", "lin1"):
        s = getattr(model.base_model.model, name).lora_monteclora_sampler["default"]
        kl = (
            monteclora.dirichlet_kl(torch.exp(s.expert_weights_prior), 0.1)
            + monteclora.wishart_kl(s.std_prior)
            + monteclora.gaussian_kl(s.gaussian_var_prior.diagonal(), 3)
        )
        terms.append(1e-5 * kl + (s.expert_weights**2).sum())
    assert torch.allclose(loss, sum(terms) / 2, atol=1e-6) and loss > 0
    (out.sum() + loss).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.model.lin1.lora_monteclora_sampler.default.expert_weights_prior" in trainable
    assert len(trainable) == 8


def test_refusals_name_the_fix():
    with pytest.raises(ConfigError, match="`num_samples` must be greater than 0"):
        lorakit.MontecloraConfig(num_samples=0)
    with pytest.raises(ConfigError, match="`dirichlet_prior` must be greater than 0"):
        lorakit.MontecloraConfig(dirichlet_prior=0.0)
    with pytest.raises(ConfigError, match=r"variant combination: \('monteclora_config', 'use_dora'\)"):
        lorakit.LoraConfig(monteclora_config={}, use_dora=True)
    with pytest.raises(ConfigError, match="MonteCLoRA does not support adapting Embedding layers"):
        lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(target_modules=["embed_tokens"], monteclora_config={}))


# -- PEFT interop ----------------------------------------------------------------------------------------------
def test_same_seed_gives_peft_s_parameters_draws_outputs_losses_and_gradients():
    ours, theirs = _model(lorakit).train(), _model(peft).train()
    so, st = ours.state_dict(), theirs.state_dict()
    assert so.keys() == st.keys() and all(torch.equal(so[k], st[k]) for k in so)
    x = torch.randn(5, 10)
    for step in range(3):  # the third forward draws a new store, from the global RNG: seeded alike for both
        torch.manual_seed(step)
        yo = ours(x)
        torch.manual_seed(step)
        yt = theirs(x)
        lo, lt = ours._get_monteclora_loss(), theirs._get_monteclora_loss()
        assert torch.allclose(yo, yt, atol=ATOL) and torch.allclose(lo, lt, atol=1e-6)
    (yo.sum() + lo).backward()
    (yt.sum() + lt).backward()
    go = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    gt = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert go.keys() == gt.keys() and all(torch.allclose(go[n], gt[n], atol=1e-4) for n in go)


def _llama(module: type) -> nn.Module:
    config = module.LoraConfig(
        target_modules=["q_proj", "v_proj"], r=4, monteclora_config=module.MontecloraConfig(num_samples=2)
    )
    torch.manual_seed(0)
    model = module.get_peft_model(tiny_llama(0), config)
    perturb_([p for p in model.parameters() if p.requires_grad], seed=3)
    return model.eval()


@both_ways
def test_files_load_both_ways_with_equal_outputs_and_variational_parameters(writer, reader, tmp_path):
    model = _llama(writer)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = reader.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert (logits(loaded) - logits(model)).abs().max() < ATOL
    saved = {k: v for k, v in model.state_dict().items() if "monteclora" in k}
    assert len(saved) == 16 and all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())


def test_same_file_keys_and_config_as_peft(tmp_path):
    _llama(lorakit).save_pretrained(tmp_path / "lorakit")
    _llama(peft).save_pretrained(tmp_path / "peft")
    shapes = lambda d: {k: tuple(v.shape) for k, v in load_file(d / "adapter_model.safetensors").items()}  # noqa: E731
    ours, theirs = shapes(tmp_path / "lorakit"), shapes(tmp_path / "peft")
    assert ours == theirs
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_monteclora_sampler.gaussian_var_prior"
    assert ours[key] == (4, 4)
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")


def test_vllm_gets_the_plain_lora_it_is_outside_training(tmp_path):
    from lorakit.adapters import state
    from lorakit.config import read_config
    from lorakit.export.vllm import _served, vllm_problems
    from lorakit.io import files

    model = _llama(lorakit)
    model.save_pretrained(tmp_path)
    config, (tensors, _) = read_config(tmp_path), files.read_weights(tmp_path)
    assert not vllm_problems(config, tensors)
    served, served_config = _served(tensors, config, None)
    assert served_config.monteclora_config is None and len(served) == 8 and len(tensors) == 24
    plain = lorakit.get_peft_model(tiny_llama(0), served_config).eval()
    state.load_adapter_state_dict(plain, served, "default", "served")
    assert (logits(plain) - logits(model)).abs().max() < ATOL


def test_trainer_mixin_adds_the_variational_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    from lorakit.api.helpers import MontecloraTrainerMixin

    class MontecloraTrainer(MontecloraTrainerMixin, Trainer):
        pass

    model = _llama(lorakit).train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    ids = input_ids(seed=2)
    trainer = MontecloraTrainer(model=model, args=args)
    total, outputs = trainer.compute_loss(model, {"input_ids": ids, "labels": ids.clone()}, return_outputs=True)
    extra = model._get_monteclora_loss()  # of that forward's draws
    assert extra > 1e-4 and torch.allclose(total, outputs.loss + extra, atol=1e-7)
    total.backward()
    sampler = model.base_model.model.model.layers[0].self_attn.q_proj.lora_monteclora_sampler["default"]
    assert sampler.std_prior.grad is not None
