"""The three-way stability verdict: the mean-square simulation against the exact second-moment map of
Bernoulli linearised SGD (brute-force Kronecker form), the training set's noise factor n/B - 1, and every
branch of the verdict on constructed least-squares problems (H_i = 2 x_i x_i^T, Gauss-Newton = Hessian)."""

from __future__ import annotations

import math

import pytest
import torch
from bench_verdict import LeastSquares
from test_curvature_stability import second_moment_radius

from hf_msam.curvature.coherence import coherence_from_blocks, train_coherence
from hf_msam.curvature.stability import (
    gauss_newton_factors,
    mean_square_growth,
    noise_scale,
    stability_verdict,
)


def least_squares(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows x_i of a least-squares problem; H_i = 2 x_i x_i^T, Phi_i = sqrt(2) x_i^T, K = 2 X X^T."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def factors_of(x: torch.Tensor) -> torch.Tensor:
    return gauss_newton_factors(2 * x @ x.T, x.shape[0])


def test_factors_reproduce_the_per_example_hessians_in_their_subspace():
    x = least_squares(6, 9, seed=0)
    f = factors_of(x)
    h = 2 * x[:, :, None] * x[:, None, :]
    # the same quadratic forms: sum_i ||F_i a||^2 = sum_i v^T H_i v for v = Q a, Q orthonormal with H = Q diag Q^T
    eig, q = torch.linalg.eigh(h.sum(0))
    q = q[:, eig > 1e-9 * eig.max()].flip(1)
    restricted = torch.einsum("dr,ide,es->irs", q, h, q)
    got = f.transpose(1, 2) @ f
    # F_i^T F_i = Q'^T H_i Q' for some orthonormal basis Q' of the same subspace: compare invariants
    assert torch.allclose(torch.linalg.eigvalsh(got.sum(0)), torch.linalg.eigvalsh(restricted.sum(0)), atol=1e-9)
    assert torch.allclose(torch.einsum("irs,jsr->ij", got, got), torch.einsum("irs,jsr->ij", restricted, restricted),
                          atol=1e-8)


@pytest.mark.parametrize("factor", [0.5, 0.9, 1.1, 2.0])
def test_rate_is_the_log_of_the_exact_second_moment_radius(factor):
    # probe set = training set (p = n): the map is the exact one of Bernoulli(B/n) SGD on these H_i
    x = least_squares(8, 3, seed=1)
    h = 2 * x[:, :, None] * x[:, None, :]
    n, b = 8, 2
    lo, hi = 0.0, 2.0 / float(torch.linalg.eigvalsh(h.mean(0))[-1])
    for _ in range(50):  # exact mean-square critical eta by bisection
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if second_moment_radius(h, mid, n, b) >= 1 else (mid, hi)
    eta = factor * hi
    result = mean_square_growth(factors_of(x), learning_rate=eta, batch_size=b, num_train_examples=n)
    assert result.rate == pytest.approx(math.log(second_moment_radius(h, eta, n, b)), rel=1e-6, abs=1e-12)
    assert result.rate_interval == pytest.approx((result.rate, result.rate))  # p = n: no sampling error
    assert (result.rate > 0) == (factor > 1)


def test_the_training_set_noise_factor_is_used():
    # identical H_i = h: E[J^2] = (1 - eta lam)^2 + (eta lam)^2 (1/B - 1/n) along h, exact threshold
    # eta* = 2 / (lam (1 + 1/B - 1/n)); 8 probe examples of n = 1000, B = 4. With the probe's own noise
    # factor p/B - 1 the threshold would be 2 / (lam (1 + 1/B - 1/p)), above this eta.
    n, p, b = 1000, 8, 4
    x = least_squares(1, 5, seed=2).expand(p, 5)
    lam = 2 * float(x[0] @ x[0])
    eta = 1.7 / lam
    assert 2 / (lam * (1 + 1 / b - 1 / n)) < eta < 2 / (lam * (1 + 1 / b - 1 / p))
    result = mean_square_growth(factors_of(x), learning_rate=eta, batch_size=b, num_train_examples=n)
    assert noise_scale(n, b) == pytest.approx(1 / b - 1 / n)
    exact = math.log((1 - eta * lam) ** 2 + (eta * lam) ** 2 * (1 / b - 1 / n))
    assert result.rate == pytest.approx(exact, rel=1e-9) and exact > 0
    assert result.rate_interval[0] > 0


def test_brute_force_chains_agree_with_the_rate_when_noise_is_mild():
    # Monte-Carlo check of the second moment on the training set itself: mean over many chains of ||v_T||^2
    x = least_squares(6, 3, seed=5)
    h = 2 * x[:, :, None] * x[:, None, :]
    n, b, steps = 6, 3, 40
    eta = 0.5 / float(torch.linalg.eigvalsh(h.mean(0))[-1])
    rate = mean_square_growth(factors_of(x), learning_rate=eta, batch_size=b, num_train_examples=n).rate
    g = torch.Generator().manual_seed(0)
    eig, q = torch.linalg.eigh(h.sum(0))
    runs = 20000
    v = torch.randn(runs, 3, generator=g, dtype=torch.float64)
    v /= v.norm(dim=1, keepdim=True)
    for _ in range(steps):
        keep = (torch.rand(runs, n, generator=g) < b / n).double()
        v = v - (eta / b) * torch.einsum("ri,ide,re->rd", keep, h, v)
    second = (v**2).sum(1).mean()
    # E||v_T||^2 <= rho^T * cond, and >= rho^T * (weight of the top mode): the rates agree to within log(d)/T
    assert abs(math.log(float(second)) / steps - rate) < math.log(3) / steps + 0.01


def _verdict(x: torch.Tensor, eta: float, b: int, n: int, seed: int, lambda_min: float = 0.0, **overrides):
    k = 2 * x @ x.T
    coherence = coherence_from_blocks(k, x.shape[0])
    sigma = train_coherence(coherence.s_matrix, coherence.max_example_lambda_max, n, seed=seed)
    inputs = dict(learning_rate=eta, batch_size=b, num_train_examples=n, lambda_max=coherence.lambda_max_ggn,
                  lambda_min=lambda_min, gradient_ratio=0.0, interpolates=True, sigma_high=sigma.interval[1],
                  mean_square=mean_square_growth(gauss_newton_factors(k, x.shape[0]), learning_rate=eta,
                                                 batch_size=b, num_train_examples=n))
    inputs.update(overrides)
    return stability_verdict(**inputs), coherence.lambda_max_ggn


@pytest.mark.parametrize("seed", range(6))
def test_deep_null_space_with_a_tiny_rate_is_stable(seed):
    x = least_squares(16, 3000, seed=seed)  # d >> n: the per-example Hessians share a huge null space
    lam = float(torch.linalg.eigvalsh(2 * x @ x.T)[-1]) / 16
    verdict, _ = _verdict(x, 3e-6 / lam, b=4, n=2000, seed=seed)
    assert verdict.verdict == "stable" and verdict.stable_sgd is True, verdict


def test_rate_above_two_over_lambda_max_is_unstable():
    x = least_squares(16, 40, seed=4)
    lam = float(torch.linalg.eigvalsh(2 * x @ x.T)[-1]) / 16
    verdict, _ = _verdict(x, 2.2 / lam, b=4, n=2000, seed=0)
    assert (verdict.verdict, verdict.basis, verdict.stable_sgd) == ("unstable", "gd_bound", False)


def test_between_the_exact_threshold_and_theorem1_is_never_stable():
    # docs/design.md section 3.5: sigma = 1 (orthogonal rank-one H_i = 2n e_i e_i^T), n = 100, B = 1, lambda_max = 2:
    # exact mean-square eta_crit = 0.01, Theorem 1's 0.0503
    n = 100
    x = math.sqrt(n) * torch.eye(n, dtype=torch.float64)
    h = 2 * x[:, :, None] * x[:, None, :]
    assert second_moment_radius(h[:10, :10, :10], 0.0, 10, 1) == pytest.approx(1.0)
    for seed in range(4):
        verdict, lam = _verdict(x, 0.025, b=1, n=n, seed=seed)
        assert lam == pytest.approx(2.0)
        assert verdict.verdict in ("inconclusive", "unstable") and verdict.verdict != "stable", verdict
    above, _ = _verdict(x, 0.06, b=1, n=n, seed=0)
    assert (above.verdict, above.basis) == ("unstable", "theorem1")


def test_away_from_a_minimum_is_inconclusive():
    x = least_squares(16, 3000, seed=0)
    lam = float(torch.linalg.eigvalsh(2 * x @ x.T)[-1]) / 16
    for overrides in ({"lambda_min": -0.05 * lam}, {"gradient_ratio": 0.5}, {"interpolates": False}):
        verdict, _ = _verdict(x, 3e-6 / lam, b=4, n=2000, seed=0, **overrides)
        assert (verdict.verdict, verdict.basis, verdict.stable_sgd) == ("inconclusive", "not_at_minimum", None)
        assert "minimum" in verdict.reason
    # even a rate above 2 / lambda_max proves nothing away from a minimum
    verdict, _ = _verdict(x, 3 / lam, b=4, n=2000, seed=0, lambda_min=-0.05 * lam)
    assert verdict.verdict == "inconclusive"


@pytest.mark.parametrize("seed", range(8))
def test_report_at_an_exact_deep_null_space_minimum_says_stable(seed):
    # issue 9: d >> n, eta lambda = 3e-6 at an exact least-squares minimum; the old probe said "unstable" for
    # some seeds because float32 rounding decided a growth rate of 1 - O(eta lambda r / d)
    from hf_msam import sharpness_report

    n, d = 16, 2000
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, generator=g)
    w = torch.linalg.lstsq(x.double(), y.double()[:, None], driver="gelsd").solution[:, 0].float()
    model = LeastSquares(w)
    data = [{"features": x[i], "labels": float(y[i])} for i in range(n)]
    lam = float(torch.linalg.eigvalsh(2 * x.double() @ x.double().T)[-1]) / n
    report = sharpness_report(model, data, num_examples=n, measures=["eigenvalues", "coherence", "probe"],
                              learning_rate=3e-6 / lam, train_batch_size=4, num_train_examples=4000,
                              lanczos_iterations=20, probe_steps=30, seed=seed).to_dict()
    assert report["interpolates"] and report["errors"] == []
    assert report["stable_sgd"] is True
    assert report["stability_verdict"] == "stable", report["stability_reason"]
    assert report["mean_square_rate_interval"][1] < 0
