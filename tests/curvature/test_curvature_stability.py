"""The restated Theorem 1 and the linear-stability probe against exact / brute-force linearised SGD."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from bench_reshuffling import factors_from_hessians, reshuffled_epoch_rate
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_msam.curvature.coherence import coherence_from_hessians
from hf_msam.curvature import stability
from hf_msam.curvature.operators import HessianOperator
from hf_msam.curvature.stability import (
    batch_second_moment,
    critical_learning_rate,
    eta_critical_gd,
    eta_critical_theorem1,
    gauss_newton_factors,
    linear_stability_probe,
    mean_square_growth,
    sample_batch,
)


def second_moment_radius(h: torch.Tensor, eta: float, n: int, b: int) -> float:
    """Spectral radius of the exact second-moment map of Bernoulli linearised SGD, M -> E[J M J^T]:
    E[J (x) J] = (I - eta H)(x)(I - eta H) + (eta/B)^2 q(1-q) sum_i H_i (x) H_i, q = B/n (x_i independent)."""
    d = h.shape[1]
    q = b / n
    mean = torch.eye(d, dtype=torch.float64) - eta * h.mean(0)
    op = torch.kron(mean, mean) + (eta / b) ** 2 * q * (1 - q) * sum(torch.kron(x, x) for x in h)
    return float(torch.linalg.eigvals(op).abs().max())


def monte_carlo_second_moment(h: torch.Tensor, eta: float, b: int, steps: int, runs: int, seed: int) -> float:
    """Brute force: simulate runs of v <- (I - (eta/B) sum_i x_i H_i) v, return mean ||v_T||^2 / ||v_0||^2."""
    g = torch.Generator().manual_seed(seed)
    n, d, _ = h.shape
    v = torch.randn(runs, d, generator=g, dtype=torch.float64)
    v /= v.norm(dim=1, keepdim=True)
    for _ in range(steps):
        x = (torch.rand(runs, n, generator=g) < b / n).double()
        v = v - (eta / b) * torch.einsum("ri,ide,re->rd", x, h, v)
    return float((v**2).sum(dim=1).mean())


def constructions(seed: int = 0):
    """Per-example Hessians: the sigma-aligned construction of docs/design.md section 3.5, and random PSD ones."""
    n = 8
    for sigma in (1, 2, 4, 8):
        d = n - sigma + 1
        h = torch.zeros(n, d, d, dtype=torch.float64)
        for i in range(n):
            k = 0 if i < sigma else i - sigma + 1
            h[i, k, k] = 2.0 * n / sigma
        yield f"aligned-{sigma}", h
    g = torch.Generator().manual_seed(seed)
    for rank in (1, 2):
        for trial in range(3):
            u = torch.randn(n, 5, rank, generator=g, dtype=torch.float64)
            shared = torch.randn(5, 1, generator=g, dtype=torch.float64)
            u = u + (trial * 1.5) * shared  # more alignment in later trials
            yield f"random-r{rank}-{trial}", u @ u.transpose(1, 2)


def test_theorem1_never_calls_a_stable_setting_unstable(capsys):
    rows = []
    for name, h in constructions():
        n = h.shape[0]
        sigma = coherence_from_hessians(h).sigma
        lam = float(torch.linalg.eigvalsh(h.mean(0))[-1])
        for b in (1, 2, 4):
            eta1 = eta_critical_theorem1(lam, sigma, n, b)
            # Theorem 1 calls every eta >= eta1 unstable: the exact second moment must not contract there
            for factor in (1.0, 1.05, 1.5, 3.0):
                assert second_moment_radius(h, eta1 * factor, n, b) >= 1 - 1e-9, (name, b, factor)
            lo, hi = 0.0, eta1  # exact critical eta by bisection (the map is stable at eta -> 0)
            for _ in range(50):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if second_moment_radius(h, mid, n, b) >= 1 - 1e-12 else (mid, hi)
            rows.append((name, b, sigma, hi, eta1))
    with capsys.disabled():
        print("\nTheorem 1 tightness (eta_theorem1 / eta_exact):")
        for name, b, sigma, exact, eta1 in rows:
            print(f"  {name:14s} B={b} sigma={sigma:6.3f} exact={exact:.4f} thm1={eta1:.4f} ratio={eta1 / exact:.3f}")
    assert min(eta1 / exact for *_, exact, eta1 in rows) >= 1 - 1e-6
    # the aligned construction with sigma = 1 and n/B = 2 is tight (docs/design.md section 3.5)
    tight = [eta1 / exact for name, b, _, exact, eta1 in rows if name == "aligned-1" and b == 4]
    assert abs(tight[0] - 1) < 1e-6


def test_brute_force_simulation_agrees_with_exact_second_moment():
    name, h = next(iter(constructions()))
    n, b = h.shape[0], 2
    lam = float(torch.linalg.eigvalsh(h.mean(0))[-1])
    eta1 = eta_critical_theorem1(lam, coherence_from_hessians(h).sigma, n, b)
    grows = monte_carlo_second_moment(h, 1.2 * eta1, b, steps=60, runs=4000, seed=1)
    shrinks = monte_carlo_second_moment(h, 0.2 * eta1, b, steps=60, runs=4000, seed=1)
    assert second_moment_radius(h, 1.2 * eta1, n, b) > 1 and grows > 10
    assert second_moment_radius(h, 0.2 * eta1, n, b) < 1 and shrinks < 0.1


def test_critical_learning_rates_formulas():
    assert eta_critical_gd(4.0) == 0.5
    assert eta_critical_gd(0.0) is None
    assert math.isclose(eta_critical_theorem1(2.0, 3.0, 101, 1), 3.0 / (2.0 * 10.0))
    assert eta_critical_theorem1(2.0, 3.0, 32, 32) is None


class QuadraticRegression(torch.nn.Module):
    """Linear least squares, loss = mean_i (x_i . w - y_i)^2: per-example Hessians H_i = 2 x_i x_i^T."""

    def __init__(self, d: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(d))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> SequenceClassifierOutput:
        logits = features @ self.w
        return SequenceClassifierOutput(loss=((logits - labels) ** 2).mean(), logits=logits[:, None])


def _probe_on_model(x: torch.Tensor, eta: float, b: int, steps: int, sampling: str):
    model = QuadraticRegression(x.shape[1])
    y = x @ torch.randn(x.shape[1], generator=torch.Generator().manual_seed(9))

    def batch_hvp(idx: list[int], v: torch.Tensor) -> torch.Tensor:
        batch = {"features": x[idx], "labels": y[idx]}
        return HessianOperator(model, [batch]).matvec(v) * len(idx)

    return linear_stability_probe(batch_hvp, x.shape[1], x.shape[0], learning_rate=eta, batch_size=b,
                                  steps=steps, sampling=sampling, seed=5)


def _brute_force_growth(x: torch.Tensor, eta: float, b: int, steps: int, sampling: str) -> float:
    """The same sampled batches (same generator), dense H_i = 2 x_i x_i^T, float64."""
    h = 2 * x.double()[:, :, None] * x.double()[:, None, :]
    g = torch.Generator().manual_seed(5)
    v = torch.randn(x.shape[1], generator=g, dtype=torch.float32).double()
    v /= v.norm()
    logs = []
    for _ in range(steps):
        idx = sample_batch(g, x.shape[0], b, sampling)
        if idx:
            v = v - (eta / b) * h[idx].sum(0) @ v
        logs.append(math.log(float(v.norm())))
        v /= v.norm()
    return math.exp(sum(logs) / len(logs))


def test_probe_verdict_agrees_with_brute_force_simulation():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    h = 2 * x.double()[:, :, None] * x.double()[:, None, :]
    lam = float(torch.linalg.eigvalsh(h.mean(0))[-1])
    for sampling in ("bernoulli", "uniform", "without_replacement"):
        for eta in (0.3 / lam, 3.0 / lam):
            got = _probe_on_model(x, eta, 4, 40, sampling)
            want = _brute_force_growth(x, eta, 4, 40, sampling)
            assert got.num_hvps <= 40
            assert math.isclose(got.growth_rate, want, rel_tol=1e-4)
            assert (got.growth_rate > 1) == (want > 1) == (eta > 1.0 / lam)


def subset_second_moment_rate(h: torch.Tensor, eta: float, b: int, sampler: str) -> float:
    """Brute force: log of the spectral radius of E[J (x) J], J = I - (eta/B) sum_{i in batch} H_i, averaged over
    every batch the sampler can draw: all C(n, B) subsets of B distinct examples (``without_replacement``) or
    all n^B ordered draws (``with_replacement``), each equally likely."""
    n, d, _ = h.shape
    draws = (itertools.combinations(range(n), b) if sampler == "without_replacement"
             else itertools.product(range(n), repeat=b))
    eye = torch.eye(d, dtype=torch.float64)
    total, count = torch.zeros(d * d, d * d, dtype=torch.float64), 0
    for batch in draws:
        step = eye - (eta / b) * h[list(batch)].sum(0)
        total += torch.kron(step, step)
        count += 1
    return math.log(float(torch.linalg.eigvalsh(total / count).abs().max()))


def test_every_direction_counts_where_one_example_is_sharp_and_the_mean_is_flat():
    # seven examples with identity curvature on 33 coordinates, one with K = 6.9 on its own axis: the mean
    # curvature there (K/8) is the smallest of the 34 directions, yet it is the one that diverges
    n, b, d, eta = 8, 2, 34, 1.0
    h = torch.zeros(n, d, d, dtype=torch.float64)
    h[:7, :33, :33] = torch.eye(33, dtype=torch.float64)
    h[7, 33, 33] = 6.9
    truth = subset_second_moment_rate(h, eta, b, "without_replacement")
    assert truth == pytest.approx(math.log(1 - 2 * 6.9 / 8 + 6.9**2 / 8 / b), rel=1e-9)  # +0.811, the K axis
    result = mean_square_growth(factors_from_hessians(h), learning_rate=eta, batch_size=b, num_train_examples=n)
    assert result.subspace_dim == d
    assert result.rate == pytest.approx(truth, rel=1e-9, abs=1e-12)
    assert result.eta_critical == pytest.approx(2 * b / 6.9, rel=1e-9)  # K* = 2B/eta on an own axis


@pytest.mark.parametrize("sampler", ["without_replacement", "with_replacement"])
def test_rate_and_critical_rate_equal_enumeration_of_every_batch(sampler):
    g = torch.Generator().manual_seed(0)
    n, b, d = 8, 4, 4
    u = torch.randn(n, d, 2, generator=g, dtype=torch.float64)
    u[0] *= 3  # one sharp example
    h = u @ u.transpose(1, 2)
    factors = factors_from_hessians(h)
    eta_crit = critical_learning_rate(factors, batch_size=b, num_train_examples=n, sampler=sampler)
    assert eta_crit == mean_square_growth(factors, learning_rate=0.1, batch_size=b, num_train_examples=n,
                                          sampler=sampler).eta_critical
    for factor in (0.5, 0.98, 1.02, 1.5):
        eta = factor * eta_crit
        got = mean_square_growth(factors, learning_rate=eta, batch_size=b, num_train_examples=n, sampler=sampler)
        truth = subset_second_moment_rate(h, eta, b, sampler)
        assert got.rate == pytest.approx(truth, rel=1e-8, abs=1e-12), factor
        assert (truth < 0) == (factor < 1)


def test_the_default_sampler_is_the_trainers_uniform_subsets():
    # B distinct examples per step (random reshuffling), not Bernoulli batches nor draws with replacement: at this
    # eta Bernoulli batches and draws with replacement diverge, uniform B-subsets contract
    g = torch.Generator().manual_seed(0)
    n, b, d, eta = 8, 4, 4, 0.109
    u = torch.randn(n, d, 2, generator=g, dtype=torch.float64)
    u[0] *= 3
    h = u @ u.transpose(1, 2)
    truth = subset_second_moment_rate(h, eta, b, "without_replacement")
    assert truth < 0
    assert second_moment_radius(h, eta, n, b) > 1 and subset_second_moment_rate(h, eta, b, "with_replacement") > 0
    default = mean_square_growth(factors_from_hessians(h), learning_rate=eta, batch_size=b, num_train_examples=n)
    assert default.rate == pytest.approx(truth, rel=1e-8)


def test_batch_second_moment_coefficients_from_enumeration():
    # E[H_hat (x) H_hat] = a H (x) H + c E_i[H_i (x) H_i] on scalars H_i = e_i (basis vectors of R^n)
    n, b = 7, 3
    e = torch.eye(n, dtype=torch.float64)
    for sampler, draws in (("without_replacement", list(itertools.combinations(range(n), b))),
                           ("with_replacement", list(itertools.product(range(n), repeat=b)))):
        means = torch.stack([e[list(d)].sum(0) / b for d in draws])
        second = means.T @ means / len(draws)
        a, c = batch_second_moment(sampler, n, b)
        mean = e.mean(0)
        assert torch.allclose(second, a * torch.outer(mean, mean) + c * e / n, atol=1e-12), sampler
    assert batch_second_moment("without_replacement", n, b)[1] == pytest.approx((n - b) / (b * (n - 1)))


def test_the_iterative_solver_equals_the_dense_generator(monkeypatch):
    # about 60 directions: over 1500 symmetric unknowns, past the dense limit, so ARPACK's Lanczos on the matrix-free
    # generator answers; the same factors through the assembled matrix must agree
    g = torch.Generator().manual_seed(3)
    u = torch.randn(10, 60, 6, generator=g, dtype=torch.float64)
    u[0] *= 4
    phi = u.transpose(1, 2).reshape(60, 60)  # 6 rows Phi_i per example: H_i = Phi_i^T Phi_i
    factors = gauss_newton_factors(phi @ phi.T, 10)
    r = factors.shape[2]
    assert r * (r + 1) // 2 > stability.DENSE_LIMIT
    iterative = mean_square_growth(factors, learning_rate=0.3, batch_size=3, num_train_examples=10)
    monkeypatch.setattr(stability, "DENSE_LIMIT", 10**6)
    dense = mean_square_growth(factors, learning_rate=0.3, batch_size=3, num_train_examples=10)
    assert iterative.rate == pytest.approx(dense.rate, rel=1e-7, abs=1e-10)
    assert iterative.eta_critical == pytest.approx(dense.eta_critical, rel=1e-7)


@pytest.mark.parametrize("ratio", [1e-6, 0.5, 0.97, 1.03, 4.0])
def test_the_iterative_solvers_equal_the_dense_generator_on_curvature_spanning_decades(monkeypatch, ratio):
    # per-example curvature over 8 decades: the top eigenvalues of L cluster at -2 m_min below eta_crit, where
    # unpreconditioned Lanczos did not converge in 50,000 iterations; every solver must give the dense answer
    g = torch.Generator().manual_seed(5)
    p, rows, r = 12, 3, 36
    factors = torch.randn(p, rows, r, generator=g, dtype=torch.float64) * torch.logspace(-2.5, 1.5, r, dtype=torch.float64)
    monkeypatch.setattr(stability, "DENSE_LIMIT", 10**6)
    eta = ratio * mean_square_growth(factors, learning_rate=1.0, batch_size=3, num_train_examples=50).eta_critical
    dense = mean_square_growth(factors, learning_rate=eta, batch_size=3, num_train_examples=50)
    monkeypatch.setattr(stability, "DENSE_LIMIT", 0)
    iterative = mean_square_growth(factors, learning_rate=eta, batch_size=3, num_train_examples=50)
    assert (dense.rate < 0) == (ratio < 1) == (iterative.rate < 0)
    assert iterative.generator_eigenvalue == pytest.approx(dense.generator_eigenvalue, rel=1e-7)
    assert iterative.eta_critical == pytest.approx(dense.eta_critical, rel=1e-7)
    assert abs(float(iterative.top_direction @ dense.top_direction)) == pytest.approx(1.0, abs=1e-6)


def one_sharp_example(n: int = 8, d: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(n, d, 2, generator=g, dtype=torch.float64)
    u[0] *= 3
    return u @ u.transpose(1, 2)


def two_aligned_examples(n: int = 8) -> torch.Tensor:
    h = torch.zeros(n, 1, 1, dtype=torch.float64)
    h[:2] = 1.0
    return h


@pytest.mark.parametrize("problem", [one_sharp_example, two_aligned_examples])
def test_reshuffled_epochs_contract_below_the_with_replacement_threshold(problem):
    # the Trainer reshuffles every epoch, so the batches of one epoch are disjoint; the models take each step's
    # batch as independent. Every ordered epoch of n = 8, B = 4 enumerated (bench_reshuffling.reshuffled_epoch_rate):
    # reshuffled epochs contract below eta_crit of B draws with replacement, the threshold of a "stable" verdict;
    # with two aligned examples they diverge below eta_crit of uniform B-subsets (from 0.902 of it)
    h, b = problem(), 4
    factors = factors_from_hessians(h)
    subsets = critical_learning_rate(factors, batch_size=b, num_train_examples=8)
    draws = critical_learning_rate(factors, batch_size=b, num_train_examples=8, sampler="with_replacement")
    assert draws < subsets
    assert reshuffled_epoch_rate(h, 0.999 * draws, b) < 0
    assert reshuffled_epoch_rate(h, 0.5 * draws, b) < 0
    if problem is two_aligned_examples:
        assert reshuffled_epoch_rate(h, 0.95 * subsets, b) > 0
    else:  # reshuffled epochs cross 0 at 1.024 times eta_crit of B-subsets on this problem
        assert reshuffled_epoch_rate(h, 1.02 * subsets, b) < 0 < reshuffled_epoch_rate(h, 1.03 * subsets, b)
