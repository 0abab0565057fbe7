"""CorDA's maths (lorakit.ops.corda, the 'corda' initializer in lorakit.ops.init) against dense references: the
covariance as X^T X of all inputs stacked, the decomposition W = U diag(S) V^T, and the adapter as the projection of
W on the top (IPM) or bottom (KPM) eigenvectors of (W C')(W C')^T, computed independently with eigh."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops import corda as ops
from lorakit.ops.init import INITIALIZERS, get_initializer, mutates_base

OUT, IN = 12, 10


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g)
    X = torch.randn(200, IN, generator=g) @ torch.randn(IN, IN, generator=g)  # correlated inputs
    return W, X


def _damped(cov: torch.Tensor) -> torch.Tensor:
    """The reference C': C + 0.01 * mean(diag C) * I (one step: these covariances are well conditioned)."""
    return cov + 0.01 * torch.diagonal(cov).mean() * torch.eye(cov.shape[0])


def test_covariance_of_batches_is_that_of_all_inputs_stacked_each_scaled_by_its_max():
    _, X = _data()
    batches = [X[:50].reshape(5, 10, IN), X[50:120], X[120:].reshape(1, 80, IN)]  # (B, T, in) and (N, in) alike
    total = sum(ops.covariance_step(b) for b in batches)
    dense = sum((b.reshape(-1, IN) / b.max().abs()).T @ (b.reshape(-1, IN) / b.max().abs()) for b in batches)
    assert torch.allclose(total, dense, rtol=1e-5, atol=1e-5)
    unscaled = X[50:120].T @ X[50:120]
    assert not torch.allclose(ops.covariance_step(X[50:120]), unscaled, rtol=1e-3)  # the scaling is there


def test_covariance_refuses_non_finite_or_all_zero_inputs():
    with pytest.raises(ValueError, match="inf / NaN"):
        ops.covariance_step(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="inf / NaN"):
        ops.covariance_step(torch.zeros(3, 2))  # 0 / 0
    with pytest.raises(ValueError, match="mean diagonal"):
        ops.damped_inverse(torch.zeros(4, 4))


def test_damped_inverse_is_accurate_even_for_a_singular_covariance():
    x = torch.randn(3, IN)  # rank 3 < IN: C is singular, the damping makes it invertible
    fixed, inverse = ops.damped_inverse(x.T @ x)
    assert torch.dist(fixed @ inverse, torch.eye(IN)) < 0.05
    assert torch.allclose(fixed - x.T @ x, torch.diag(torch.diagonal(fixed - x.T @ x)), atol=1e-6)  # only I added


def test_decomposition_reconstructs_the_weight_with_s_descending():
    W, X = _data()
    eig = ops.decompose(W, X.T @ X)
    assert eig.S_WC.shape == (IN,) and eig.U_WC.shape == (OUT, IN) and eig.V_WC.shape == (IN, IN)
    assert torch.all(eig.S_WC[:-1] >= eig.S_WC[1:])
    assert torch.allclose(eig.U_WC @ torch.diag(eig.S_WC) @ eig.V_WC.T, W, atol=1e-4)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("r", [1, 3, IN])
def test_adapter_is_the_projection_of_W_on_the_kept_eigenvectors(method, r):
    W, X = _data(1)
    cov = X.T @ X
    scaling = 2.0
    eig = ops.crop(ops.decompose(W, cov), r, method)
    init = INITIALIZERS["corda"](W, r, scaling, eigens=eig)
    assert init.A.shape == (r, IN) and init.B.shape == (OUT, r)
    # dense reference: eigenvectors of (W C')(W C')^T (ascending), the last r for IPM, the first r for KPM
    WC = W.double() @ _damped(cov.double())  # in fp64: fp32's eigh loses the small eigenvalues KPM keeps
    _, vecs = torch.linalg.eigh(WC @ WC.T)
    rank = IN  # (W C')(W C')^T is (OUT, OUT) of rank IN: its OUT - IN zero eigenvalues are not W C''s directions
    kept = vecs[:, -r:] if method == "ipm" else vecs[:, OUT - rank : OUT - rank + r]
    projection = (kept @ kept.T @ W.double()).float()
    assert torch.allclose(scaling * init.B @ init.A, projection, atol=1e-3)
    assert torch.allclose(init.residual + scaling * init.B @ init.A, W, atol=1e-5)  # the model starts unchanged
    if r == IN:
        assert init.residual.abs().max() < 1e-3  # all of W went into the adapter (up to C's inverse accuracy)


def test_ipm_and_kpm_take_opposite_ends_and_the_split_is_symmetric():
    W, X = _data(2)
    full = ops.decompose(W, X.T @ X)
    ipm, kpm = ops.crop(full, 2, "ipm"), ops.crop(full, 2, "kpm")
    assert torch.equal(ipm.S_WC, full.S_WC[:2]) and torch.equal(kpm.S_WC, full.S_WC[-2:])
    A, B = ops.factors(ipm, 0.5)
    # both sides carry sqrt(S / s): the row norms of A over V's and the column norms of B over U's are equal
    assert torch.allclose(B.norm(dim=0) / ipm.U_WC.norm(dim=0), A.norm(dim=1) / ipm.V_WC.norm(dim=0), rtol=1e-5)


def test_initializer_refusals_name_the_fix():
    W, X = _data()
    eig = ops.crop(ops.decompose(W, X.T @ X), 4, "ipm")
    corda = get_initializer("corda")
    with pytest.raises(ValueError, match="preprocess_corda"):
        corda(W, 4, 1.0)
    with pytest.raises(ValueError, match="same model and config"):
        corda(W, 3, 1.0, eigens=eig)  # a decomposition cut for another rank
    with pytest.raises(ValueError, match="r <= min"):
        ops.crop(ops.decompose(W, X.T @ X), IN + 1, "ipm")
    with pytest.raises(ValueError, match="'ipm' or 'kpm'"):
        ops.crop(eig, 2, "middle")
    with pytest.raises(ValueError, match="does not fit"):
        ops.decompose(W, torch.eye(IN + 1))
    assert mutates_base("corda") and mutates_base("CorDA") and not mutates_base("eva")
