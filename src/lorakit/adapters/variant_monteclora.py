"""MonteCLoRA as a variant (Sengupta et al. 2024; the maths: lorakit.ops.monteclora): in a training forward A is a
learned mixture of K noisy copies of itself; evaluation, merging and the file's A and B are plain LoRA's.

Per adapter the layer holds a ``MontecloraSampler`` in ``layer.lora_monteclora_sampler[adapter]`` (PEFT's names and
file keys ``<layer>.lora_monteclora_sampler.<tensor>``): the learned sigma (r,) and pi (K,) as ``std_prior`` and
``expert_weights_prior`` (drawn from U(0, 1)), and two persistent buffers, ``gaussian_var_prior`` (r, r) and
``expert_weights`` (K,). State changes of the forward, as in PEFT: each training forward takes the next random draws
from the sampler's store (made ``buffer_size`` forwards at a time, the first when the adapter is made) and writes that
forward's diag(v) and w into the two buffers, where the variational loss (``LoraModel._get_monteclora_loss``) reads
them with their gradients.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.adapters.variant_lora import Lora, LoraLayer
from lorakit.config import MontecloraConfig
from lorakit.ops import monteclora


class MontecloraSampler(nn.Module):
    """The variational parameters of one adapter and its store of random draws (PEFT's class name)."""

    def __init__(
        self, in_features: int, r: int, options: MontecloraConfig, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.in_features, self.r, self.options = in_features, r, options
        k = options.num_samples
        self.std_prior = nn.Parameter(torch.rand(r, dtype=dtype, device=device))  # sigma (r,)
        self.expert_weights_prior = nn.Parameter(torch.rand(k, dtype=dtype, device=device))  # pi (K,)
        self.register_buffer("gaussian_var_prior", torch.eye(r, dtype=dtype, device=device))  # diag(v) (r, r)
        self.register_buffer("expert_weights", torch.ones(k, dtype=dtype, device=device) / k)  # w (K,)
        self._draws: list[tuple[Tensor, Tensor, Tensor]] = []
        self._refill(dtype, device)

    def _refill(self, dtype: torch.dtype, device: torch.device) -> None:
        """``buffer_size`` forwards' draws at once, in PEFT's order (so that a seed gives both libraries the same
        draws): z (n, K, in, r), z_d (n, K), then the diagonals of n Wishart(r, I_r) matrices."""
        n, k = self.options.buffer_size, self.options.num_samples
        with torch.no_grad():
            z = torch.randn((n, k, self.in_features, self.r), dtype=dtype, device=device)
            z_d = torch.randn((n, k), dtype=dtype, device=device)
            diagonals = [monteclora.wishart_diagonal(self.r, device).to(dtype) for _ in range(n)]  # float32, then cast
        self._draws = [(z[i], diagonals[i], z_d[i]) for i in range(n)]
        self._draws.reverse()  # pop() takes them first to last

    def forward(self) -> tuple[Tensor, Tensor]:
        """(N (K, in, r), w (K,)) of the next draws; writes diag(v) and w into the buffers (the variational loss's)."""
        if not self._draws:
            self._refill(self.std_prior.dtype, self.std_prior.device)
        z, z_w, z_d = (t.to(self.std_prior) for t in self._draws.pop())
        v = monteclora.variances(self.std_prior, z_w)  # (r,)
        self.gaussian_var_prior = torch.diag(v)
        w = torch.softmax(monteclora.mixture_logits(self.expert_weights_prior, z_d), dim=-1)  # (K,)
        self.expert_weights = w
        return monteclora.noise(z, v, self.options.sample_scaler), w

    def variational_loss(self) -> tuple[Tensor | float, Tensor | float]:
        """(kl_loss_weight * (KL_dirichlet + KL_wishart + KL_gauss), sum(w ** 2) or 0) in training mode; (0.0, 0.0)
        otherwise, as PEFT's ``get_variational_loss``."""
        if not self.training:
            return 0.0, 0.0
        o = self.options
        kl = (
            monteclora.dirichlet_kl(torch.exp(self.expert_weights_prior), o.dirichlet_prior)
            + monteclora.wishart_kl(self.std_prior)
            + monteclora.gaussian_kl(self.gaussian_var_prior.diagonal(), o.num_samples)
        )
        entropy = (self.expert_weights**2).sum() if o.use_entropy else 0.0
        return o.kl_loss_weight * kl, entropy

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, r={self.r}, num_samples={self.options.num_samples}"


class Monteclora(Lora):
    """MonteCLoRA: a MontecloraSampler per adapter in ``layer.lora_monteclora_sampler``."""

    name = "monteclora"
    title = "MonteCLoRA"
    runs_on = "nn.Linear and GPT-2 Conv1D layers"
    plain = False  # its training forward mixes noisy copies of A: the layers' fused plain path stays off

    def __init__(self, options: MontecloraConfig) -> None:
        self.options = options

    def create(self, layer: LoraLayer, adapter: str) -> None:
        A = layer.lora_A[adapter].weight
        if not hasattr(layer, "lora_monteclora_sampler"):
            layer.lora_monteclora_sampler = nn.ModuleDict()
        sampler = MontecloraSampler(layer.in_features, layer.r[adapter], self.options, dtype=A.dtype, device=A.device)
        layer.lora_monteclora_sampler[adapter] = sampler.train(layer.training)

    def parameters(self, layer: LoraLayer, adapter: str) -> list[nn.Parameter]:
        sampler = layer.lora_monteclora_sampler[adapter]
        return [sampler.std_prior, sampler.expert_weights_prior]

    def delete(self, layer: LoraLayer, adapter: str) -> None:
        del layer.lora_monteclora_sampler[adapter]

    def linear_forward(self, layer: LoraLayer, adapter: str, x: Tensor, base: Tensor, result: Tensor) -> Tensor:
        """``result + B(dropout(x) @ A_eff.T) * s``: A_eff the mixture of noisy A's in training (ops.monteclora), A
        itself otherwise; A itself too, with PEFT's warning, if the draws gave NaNs."""
        A, B = layer.lora_A[adapter], layer.lora_B[adapter]
        h = layer.lora_dropout[adapter](x.to(A.weight.dtype))  # (..., in)
        weight = A.weight  # (r, in)
        if layer.training:
            N, w = layer.lora_monteclora_sampler[adapter]()  # (K, in, r), (K,)
            if torch.isnan(N).any() or torch.isnan(w).any():
                warnings.warn("Monteclora sampling produced NaNs, using base weights.", stacklevel=3)
            else:
                weight = monteclora.mixed_A(A.weight, N, w)
        return result + (B(F.linear(h, weight)) * layer.scaling[adapter]).to(result.dtype)

    def variational_loss(self, layer: LoraLayer, adapter: str) -> tuple[Tensor | float, Tensor | float]:
        return layer.lora_monteclora_sampler[adapter].variational_loss()
