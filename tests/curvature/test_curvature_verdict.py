"""The stability verdicts: the mean-square rate against the exact second-moment map (brute-force Kronecker
form, Monte-Carlo chains), and the verdicts against brute force on the training set: what a probe of p < n
examples may claim, on constructed least-squares problems (H_i = 2 x_i x_i^T, Gauss-Newton = Hessian) through
the whole report, and a property test over random tiny problems (heavy tails, outliers, rare clusters, more
directions than examples)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from bench_reshuffling import cluster_problem, factors_from_hessians, reshuffled_epoch_rate
from bench_verdict import LeastSquares
from test_curvature_stability import second_moment_radius, subset_second_moment_rate, two_aligned_examples

from hf_msam import sharpness_report
from hf_msam.curvature import stability
from hf_msam.curvature.stability import (
    batch_second_moment,
    critical_learning_rate,
    gauss_newton_factors,
    mean_square_growth,
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
def test_rate_is_the_log_of_the_exact_bernoulli_second_moment_radius(factor):
    # probe set = training set (p = n): the map is the exact one of Bernoulli(B/n) SGD on these H_i
    x = least_squares(8, 3, seed=1)
    h = 2 * x[:, :, None] * x[:, None, :]
    n, b = 8, 2
    lo, hi = 0.0, 2.0 / float(torch.linalg.eigvalsh(h.mean(0))[-1])
    for _ in range(50):  # exact mean-square critical eta by bisection
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if second_moment_radius(h, mid, n, b) >= 1 else (mid, hi)
    eta = factor * hi
    result = mean_square_growth(factors_of(x), learning_rate=eta, batch_size=b, num_train_examples=n,
                                sampler="bernoulli")
    assert result.rate == pytest.approx(math.log(second_moment_radius(h, eta, n, b)), rel=1e-6, abs=1e-12)
    assert result.eta_critical == pytest.approx(hi, rel=1e-9)
    assert (result.rate > 0) == (factor > 1)


def test_the_training_set_noise_factor_is_used():
    # identical H_i = h: the spread E_i[H_i X H_i] - H X H vanishes for uniform subsets; for Bernoulli batches
    # E[J^2] = (1 - eta lam)^2 + (eta lam)^2 (1/B - 1/n) along h, with the training set's n, not the probe's p
    n, p, b = 1000, 8, 4
    x = least_squares(1, 5, seed=2).expand(p, 5)
    lam = 2 * float(x[0] @ x[0])
    eta = 1.7 / lam
    assert 2 / (lam * (1 + 1 / b - 1 / n)) < eta < 2 / (lam * (1 + 1 / b - 1 / p))
    result = mean_square_growth(factors_of(x), learning_rate=eta, batch_size=b, num_train_examples=n,
                                sampler="bernoulli")
    assert batch_second_moment("bernoulli", n, b) == pytest.approx((1.0, 1 / b - 1 / n))
    exact = math.log((1 - eta * lam) ** 2 + (eta * lam) ** 2 * (1 / b - 1 / n))
    assert result.rate == pytest.approx(exact, rel=1e-9) and exact > 0
    subsets = mean_square_growth(factors_of(x), learning_rate=eta, batch_size=b, num_train_examples=n)
    assert subsets.rate == pytest.approx(math.log((1 - eta * lam) ** 2), rel=1e-9)


def test_brute_force_chains_agree_with_the_rate_when_noise_is_mild():
    # Monte-Carlo check of the second moment on the training set itself: mean over many chains of ||v_T||^2,
    # each step a uniformly random set of B distinct examples
    x = least_squares(6, 3, seed=5)
    h = 2 * x[:, :, None] * x[:, None, :]
    n, b, steps = 6, 3, 40
    eta = 0.5 / float(torch.linalg.eigvalsh(h.mean(0))[-1])
    rate = mean_square_growth(factors_of(x), learning_rate=eta, batch_size=b, num_train_examples=n).rate
    g = torch.Generator().manual_seed(0)
    runs = 20000
    v = torch.randn(runs, 3, generator=g, dtype=torch.float64)
    v /= v.norm(dim=1, keepdim=True)
    for _ in range(steps):
        keep = torch.zeros(runs, n, dtype=torch.float64)
        keep.scatter_(1, torch.rand(runs, n, generator=g).argsort(dim=1)[:, :b], 1.0)
        v = v - (eta / b) * torch.einsum("ri,ide,re->rd", keep, h, v)
    second = (v**2).sum(1).mean()
    # E||v_T||^2 <= rho^T * cond, and >= rho^T * (weight of the top mode): the rates agree to within log(d)/T
    assert abs(math.log(float(second)) / steps - rate) < math.log(3) / steps + 0.01


def verdicts(h_probe: torch.Tensor, eta: float, b: int, n: int, probe_is_training_set: bool,
             lambda_min: float = 0.0) -> tuple[stability.Verdict, stability.Verdict]:
    """(headline, training-set verdict) from dense probe H_i as the report computes them."""
    factors = factors_from_hessians(h_probe)
    ms = mean_square_growth(factors, learning_rate=eta, batch_size=b, num_train_examples=n)
    draws = critical_learning_rate(factors, batch_size=b, num_train_examples=n, sampler="with_replacement")
    lam = float(torch.linalg.eigvalsh(h_probe.mean(0))[-1])
    times = stability.timescales(ms, lam, lambda_min, lam)
    headline = stability.gauss_newton_verdict(ms, times, lam, "training_set" if probe_is_training_set else "probe",
                                              draws)
    bound = stability.training_set_growth_bound(factors, stability.candidate_directions(factors, ms.top_direction),
                                                learning_rate=eta, batch_size=b, num_train_examples=n)
    verdict = stability.stability_verdict(
        learning_rate=eta, batch_size=b, num_train_examples=n, headline=headline,
        probe_is_training_set=probe_is_training_set, training_bound=bound,
        unseen_limit=stability.unseen_example_limit(eta, b, n),
        miss_fraction=stability.probe_miss_fraction(h_probe.shape[0], n))
    return headline, verdict


def subset_rate_matrix_free(h: torch.Tensor, eta: float, b: int) -> float:
    """``subset_second_moment_rate`` without the d^2 x d^2 matrix: X -> mean over all C(n, B) subsets S of
    J_S X J_S, J_S = I - (eta/B) sum_{i in S} H_i, and its largest eigenvalue by ARPACK (the map is self-adjoint
    and positive, so that eigenvalue is its spectral radius)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    n, d, _ = h.shape
    steps = torch.stack([torch.eye(d, dtype=torch.float64) - (eta / b) * h[list(s)].sum(0)
                         for s in itertools.combinations(range(n), b)])

    def apply(x):
        m = torch.from_numpy(x).reshape(d, d)
        return (steps @ m @ steps).mean(0).reshape(-1).numpy()

    value = eigsh(LinearOperator((d * d, d * d), matvec=apply, dtype="float64"), k=1, which="LA", tol=1e-12)[0][0]
    return math.log(float(value))


def _agrees(verdict: str, truth: float) -> bool:
    return not ((verdict == "stable" and truth >= 0) or (verdict == "unstable" and truth <= 0))


def critical_rates(h: torch.Tensor, b: int) -> tuple[float, float]:
    """eta_crit of B draws with replacement and of uniform B-subsets (the first at most the second)."""
    factors, n = factors_from_hessians(h), h.shape[0]
    return (critical_learning_rate(factors, batch_size=b, num_train_examples=n, sampler="with_replacement"),
            critical_learning_rate(factors, batch_size=b, num_train_examples=n))


def random_problem(family: str, rng: torch.Generator) -> torch.Tensor:
    """Per-example PSD H_i (n x d x d) of a tiny training set of one family."""
    n = 7
    if family == "many_directions":  # 6 examples of rank 6 in R^36: 36 directions, more than any cap of 32
        u = torch.randn(6, 36, 6, generator=rng, dtype=torch.float64)
        return u @ u.transpose(1, 2) / 36
    d = 4
    u = torch.randn(n, d, 1, generator=rng, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    scale = torch.ones(n, dtype=torch.float64)
    if family == "lognormal":
        scale = torch.exp(1.5 * torch.randn(n, generator=rng, dtype=torch.float64))
    elif family == "pareto":
        scale = torch.rand(n, generator=rng, dtype=torch.float64) ** (-1 / 1.2)
    elif family == "outlier":
        scale[0] = 10.0
    elif family == "rare_cluster":  # one sharp example curving a direction of its own
        u[0] = 0
        u[0, -1] = 1
        u[1:, -1] = 0
        u[1:] /= u[1:].norm(dim=1, keepdim=True)
        scale[0] = 5.0
    return scale[:, None, None] * u @ u.transpose(1, 2)


@pytest.mark.parametrize("family", ["lognormal", "pareto", "outlier", "rare_cluster", "many_directions"])
def test_verdicts_never_contradict_brute_force_on_the_training_set(family):
    # every batch of B distinct training examples enumerated; the probe is the whole training set or a random part
    rng = torch.Generator().manual_seed(11)
    decided = {"training_set": 0, "probe": 0}
    trials = 1 if family == "many_directions" else 4
    for trial in range(trials):
        h = random_problem(family, rng)
        n, b = h.shape[0], 2 if trial % 2 else 3
        draws, subsets = critical_rates(h, b)
        # two learning rates below eta_crit of draws with replacement, two above that of B-subsets, one between
        for eta in (0.7 * draws, 0.97 * draws, (draws + subsets) / 2, 1.03 * subsets, 1.5 * subsets):
            truth = (subset_rate_matrix_free(h, eta, b) if family == "many_directions"
                     else subset_second_moment_rate(h, eta, b, "without_replacement"))
            headline, verdict = verdicts(h, eta, b, n, probe_is_training_set=True)
            assert _agrees(verdict.verdict, truth) and _agrees(headline.verdict, truth), (family, trial, eta)
            if family != "many_directions":  # the same verdicts hold for draws with replacement
                truth_draws = subset_second_moment_rate(h, eta, b, "with_replacement")
                assert _agrees(verdict.verdict, truth_draws), (family, trial, eta)
            # a quadratic loss with every example seen is decided, except where the samplers disagree
            between = draws <= eta < subsets
            assert (verdict.verdict == "inconclusive") == between, (family, trial, eta, verdict)
            if between:
                assert verdict.basis == headline.basis == "sampler_dependent"
            decided["training_set"] += not between
            probe = torch.randperm(n, generator=rng)[: n - 2]
            _, partial = verdicts(h[probe], eta, b, n, probe_is_training_set=False)
            assert _agrees(partial.verdict, truth), (family, trial, eta, partial)
            if family != "many_directions":
                assert _agrees(partial.verdict, truth_draws), (family, trial, eta, partial)
            decided["probe"] += partial.verdict != "inconclusive"
    assert decided["training_set"] == 4 * trials
    assert decided["probe"] >= 1  # the bound proves the clearly unstable cases from part of the training set


def test_two_aligned_examples_diverge_under_reshuffling_where_b_subsets_contract():
    # n = 8, B = 4, two examples curving one axis: reshuffled epochs (every ordered epoch enumerated) diverge from
    # 0.902 eta_crit of independent B-subsets; a verdict from the subsets alone said "stable" at 0.95
    h, b = two_aligned_examples(), 4
    draws, subsets = critical_rates(h, b)
    eta = 0.95 * subsets
    assert subset_second_moment_rate(h, eta, b, "without_replacement") < 0 < reshuffled_epoch_rate(h, eta, b)
    headline, verdict = verdicts(h, eta, b, 8, probe_is_training_set=True)
    assert (headline.verdict, verdict.verdict, verdict.basis) == ("inconclusive", "inconclusive", "sampler_dependent")
    assert "with replacement" in verdict.reason
    headline, verdict = verdicts(h, 0.99 * draws, b, 8, probe_is_training_set=True)
    assert headline.verdict == verdict.verdict == "stable" and reshuffled_epoch_rate(h, 0.99 * draws, b) < 0


@pytest.mark.parametrize("b", [2, 3])
def test_a_stable_verdict_holds_for_reshuffled_epochs(b):
    # the Trainer's sampler, every ordered epoch of n = 6 examples enumerated, on aligned clusters with noise (the
    # family where reshuffled epochs are least stable, benchmarks/bench_reshuffling.py); learning rates up to
    # eta_crit of B-subsets, the ones where a "stable" could be wrong
    gen = torch.Generator().manual_seed(3)
    stable = 0
    for _ in range(6):
        h = cluster_problem(6, gen)
        draws, subsets = critical_rates(h, b)
        for eta in (0.5 * draws, 0.999 * draws, (draws + subsets) / 2, 0.999 * subsets):
            _, verdict = verdicts(h, eta, b, 6, probe_is_training_set=True)
            if verdict.verdict == "stable":
                assert reshuffled_epoch_rate(h, eta, b) < 0, (h, eta)
                stable += 1
            else:
                assert verdict.basis == "sampler_dependent"
    assert stable == 12


def rank_one_report(scales: torch.Tensor, axes: torch.Tensor, *, probe: int, eta: float, b: int, seed: int = 0):
    """The report at the exact minimum w = 0 of least squares with x_i = sqrt(scale_i / 2) e_{axis_i}, so that
    H_i = scale_i e_{axis_i} e_{axis_i}^T (examples sharing an axis are aligned); the dataset is the training set."""
    n, d = scales.shape[0], int(axes.max()) + 1
    x = torch.zeros(n, d)
    x[torch.arange(n), axes] = (scales / 2).sqrt().float()
    data = [{"features": x[i], "labels": 0.0} for i in range(n)]
    return sharpness_report(LeastSquares(torch.zeros(d)), data, num_examples=probe,
                            measures=["eigenvalues", "coherence"], learning_rate=eta, train_batch_size=b, lanczos_iterations=20, seed=seed).to_dict()


def axis_rate(curvatures: torch.Tensor, n: int, eta: float, b: int) -> float:
    """Exact log growth of E v^2 along one axis that examples curve by ``curvatures`` (the others by 0) under
    uniform B-subsets of n: the batch curvature y = (1/B) sum_{i in S} k_i, E y and E y^2 from P(i in S) = B/n and
    P(i, j in S) = B(B-1)/(n(n-1)) (the enumeration of subsets, summed in closed form)."""
    k = curvatures.double()
    mean = float(k.sum()) * (1 / n) * 1.0
    pairs = float(k.sum() ** 2 - (k**2).sum())
    second = (float((k**2).sum()) * b / n + pairs * b * (b - 1) / (n * (n - 1))) / b**2
    return math.log(1 - 2 * eta * mean + eta**2 * second)


def test_axis_rate_is_the_enumeration_of_subsets():
    k = torch.tensor([3.0, 0.0, 1.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    h = torch.zeros(6, 1, 1, dtype=torch.float64)
    h[:, 0, 0] = k
    assert axis_rate(k, 6, 0.7, 2) == pytest.approx(subset_second_moment_rate(h, 0.7, 2, "without_replacement"))


@pytest.mark.parametrize(("probe", "eta"), [(64, 12.0), (64, 20.0), (64, 40.0), (16, 40.0)])
def test_a_probe_of_orthogonal_curvature_proves_no_instability(probe, eta):
    # n = 1000 orthogonal unit rank-one H_i, B = 32: every axis contracts for eta < 2B = 64, yet the probe's
    # lambda_max (1/p) is up to n/p times the training set's (1/n)
    n, b = 1000, 32
    truth = axis_rate(torch.ones(1, dtype=torch.float64), n, eta, b)
    assert truth < 0
    report = rank_one_report(torch.ones(n), torch.arange(n), probe=probe, eta=eta, b=b)
    assert report["stability_verdict"] != "unstable", report["stability_reason"]
    assert report["ggn_scope"] == "probe" and report["probe_is_training_set"] is False
    # the headline takes the probe's examples for the training set: their mean curvature is 1/p per axis, so it
    # calls eta >= 2p unstable (an error towards caution, stated as the probe's)
    assert report["stable_ggn"] is (eta < 2 * probe)


def test_an_unseen_sharp_example_is_never_called_stable():
    # n = 1000: one example with K = 200 on its own axis, the others 0.9 on a shared one; B = 32, eta = 1: +0.615
    # per step along the first axis. A probe of 64 examples misses it with probability 0.936, and the probe's
    # examples alone contract by a factor 100 per step
    n, b, eta = 1000, 32, 1.0
    scales = torch.full((n,), 0.9)
    scales[0] = 200.0
    axes = torch.ones(n, dtype=torch.long)
    axes[0] = 0
    truth = max(axis_rate(torch.tensor([200.0], dtype=torch.float64), n, eta, b),
                axis_rate(torch.full((n - 1,), 0.9, dtype=torch.float64), n, eta, b))
    assert truth == pytest.approx(0.615, abs=1e-3)
    report = rank_one_report(scales, axes, probe=64, eta=eta, b=b, seed=0)
    assert 0 not in report["probe_indices"]
    assert report["stability_verdict"] != "stable", report["stability_reason"]
    assert report["stability_basis"] == "probe_only" and report["stable_ggn"] is True
    assert report["unseen_example_limit"] == pytest.approx(2 * b / eta) and 200 > report["unseen_example_limit"]
    # a probe that holds it proves the training set unstable, whatever the unseen examples are
    seen = next(s for s in range(50) if 0 in torch.randperm(n, generator=torch.Generator().manual_seed(s))[:64])
    report = rank_one_report(scales, axes, probe=64, eta=eta, b=b, seed=seen)
    assert 0 in report["probe_indices"]
    assert (report["stability_verdict"], report["stability_basis"]) == ("unstable", "mean_square_bound")
    assert 0 < report["training_rate_bound"] <= truth + 1e-9


def test_a_rare_aligned_cluster_the_probe_missed_gives_no_instability_claim():
    # 30 of n = 1000 examples (3%) share one axis, the rest have their own; B = 32, eta = 20 is below the exact
    # threshold, and a probe holding at most one member sees sigma = 1
    n, b, eta = 1000, 32, 20.0
    axes = torch.cat([torch.zeros(30, dtype=torch.long), torch.arange(1, n - 29)])
    shared = axis_rate(torch.ones(30, dtype=torch.float64), n, eta, b)
    own = axis_rate(torch.ones(1, dtype=torch.float64), n, eta, b)
    assert shared < 0 and own < 0
    seed = next(s for s in range(50) if int((torch.randperm(n, generator=torch.Generator().manual_seed(s))[:64] < 30)
                                           .sum()) <= 1)
    report = rank_one_report(torch.ones(n), axes, probe=64, eta=eta, b=b, seed=seed)
    assert sum(i < 30 for i in report["probe_indices"]) <= 1
    assert report["stability_verdict"] != "unstable", report["stability_reason"]
    # the extrapolated sigma misses the cluster (true sigma 30): the report says what it is conditional on
    assert report["coherence_train_interval"][1] < 30
    assert any("conditional on the probe having seen every aligned group" in w for w in report["warnings"])


def least_squares_report(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, *, eta: float, b: int,
                         n_train: int | None = None, seed: int = 0):
    data = [{"features": x[i].float(), "labels": float(y[i])} for i in range(x.shape[0])]
    return sharpness_report(LeastSquares(w.float()), data, num_examples=x.shape[0],
                            measures=["eigenvalues", "coherence"], learning_rate=eta, train_batch_size=b,
                            num_train_examples=n_train, lanczos_iterations=20, seed=seed).to_dict()


def enumerated_critical_rate(h: torch.Tensor, b: int, sampler: str) -> float:
    """The critical eta of the enumeration of every batch of ``sampler``, by bisection."""
    lo, hi = 0.0, 2.0 / float(torch.linalg.eigvalsh(h.mean(0))[-1])
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if subset_second_moment_rate(h, mid, b, sampler) >= 0 else (mid, hi)
    return hi


@pytest.mark.parametrize(("factor", "of"), [(0.6, "with_replacement"), (0.95, "with_replacement"),
                                            (1.05, "without_replacement"), (1.6, "without_replacement")])
def test_least_squares_with_residuals_gets_a_decided_verdict(factor, of):
    # a quadratic loss away from its minimum (random weights, any residuals): the Hessian is constant, the
    # mean-square dynamics of v = w - w* exact, so the verdict is decided and equals the enumeration of batches,
    # below eta_crit of draws with replacement and above that of B distinct examples
    x = least_squares(8, 3, seed=3)
    y = torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = 2 * x[:, :, None] * x[:, None, :]
    b = 2
    crit = {sampler: enumerated_critical_rate(h, b, sampler) for sampler in ("without_replacement", "with_replacement")}
    eta = factor * crit[of]
    truth = subset_second_moment_rate(h, eta, b, "without_replacement")
    assert (truth < 0) == (subset_second_moment_rate(h, eta, b, "with_replacement") < 0) == (factor < 1)
    report = least_squares_report(x, y, torch.randn(3, generator=torch.Generator().manual_seed(5)), eta=eta, b=b)
    assert report["at_minimum"] is False and report["gradient_ratio"] > stability.GRADIENT_TOL
    assert report["probe_is_training_set"] is True and report["ggn_scope"] == "training_set"
    assert report["stability_verdict"] == ("stable" if truth < 0 else "unstable"), report["stability_reason"]
    assert report["stable_ggn"] is (truth < 0) and report["stability_basis"] == "mean_square"
    assert report["mean_square_rate"] == pytest.approx(truth, rel=1e-4, abs=1e-6)
    assert report["eta_critical_ggn"] == pytest.approx(crit["without_replacement"], rel=1e-4)
    assert report["eta_critical_ggn_with_replacement"] == pytest.approx(crit["with_replacement"], rel=1e-4)
    assert report["eta_ratio_ggn"] == pytest.approx(eta / crit["without_replacement"], rel=1e-4)
    assert report["drift_steps"] is None and abs(report["lambda_max_gap"]) < 1e-4 * report["lambda_max"]


def test_a_full_batch_is_gradient_descent_whatever_the_sampler():
    # B = n: every step takes the whole training set, so the verdict is gradient descent's, eta < 2 / lambda_max,
    # decided right below it (draws with replacement would diverge there, yet the Trainer never draws them)
    x = least_squares(8, 3, seed=3)
    y = torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lam = float(torch.linalg.eigvalsh(2 * x.T @ x / 8)[-1])
    for factor, verdict in ((0.98, "stable"), (1.02, "unstable")):
        report = least_squares_report(x, y, torch.randn(3, generator=torch.Generator().manual_seed(5)),
                                      eta=factor * 2 / lam, b=8)
        assert report["eta_critical_ggn"] == pytest.approx(2 / lam, rel=1e-4)
        assert report["eta_critical_ggn_with_replacement"] is None
        assert (report["ggn_verdict"], report["stability_verdict"]) == (verdict, verdict), report["ggn_reason"]
        assert "whole training set in every batch" in report["ggn_reason"]


def test_least_squares_between_the_samplers_thresholds_is_inconclusive():
    x = least_squares(8, 3, seed=3)
    y = torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = 2 * x[:, :, None] * x[:, None, :]
    draws, subsets = (enumerated_critical_rate(h, 2, s) for s in ("with_replacement", "without_replacement"))
    eta = (draws + subsets) / 2
    assert subset_second_moment_rate(h, eta, 2, "without_replacement") < 0 < subset_second_moment_rate(
        h, eta, 2, "with_replacement")
    report = least_squares_report(x, y, torch.randn(3, generator=torch.Generator().manual_seed(5)), eta=eta, b=2)
    assert (report["ggn_verdict"], report["stability_verdict"]) == ("inconclusive", "inconclusive")
    assert report["stable_ggn"] is None and report["stability_basis"] == "sampler_dependent"


@pytest.mark.parametrize("seed", range(3))
def test_deep_null_space_with_a_tiny_rate(seed):
    # d >> n at an exact least-squares minimum, eta lambda = 3e-6: the per-example Hessians share a huge null
    # space, the rate is -O(eta lambda) and must not be lost to rounding
    n, d = 16, 2000
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.linalg.lstsq(x.float().double(), y[:, None], driver="gelsd").solution[:, 0]
    lam = float(torch.linalg.eigvalsh(2 * x @ x.T)[-1]) / n
    whole = least_squares_report(x, y, w, eta=3e-6 / lam, b=4, seed=seed)
    assert whole["errors"] == [] and whole["interpolates"]
    assert (whole["stability_verdict"], whole["stability_basis"]) == ("stable", "mean_square")
    assert -1e-5 < whole["mean_square_rate"] < 0
    part = least_squares_report(x, y, w, eta=3e-6 / lam, b=4, n_train=4000, seed=seed)
    assert part["stable_ggn"] is True and part["ggn_scope"] == "probe"
    assert (part["stability_verdict"], part["stability_basis"]) == ("inconclusive", "probe_only")
    assert "probe" in part["stability_reason"] and part["probe_miss_fraction"] == pytest.approx(1 - 0.05 ** (1 / 16))


def test_negative_curvature_decides_only_when_the_drift_is_slower_than_the_verdicts_horizon():
    x = least_squares(8, 3, seed=1)
    factors = factors_of(x)
    lam = float(torch.linalg.eigvalsh(2 * x.T @ x / 8)[-1])
    ms = mean_square_growth(factors, learning_rate=0.01 / lam, batch_size=2, num_train_examples=8)
    draws = critical_learning_rate(factors, batch_size=2, num_train_examples=8, sampler="with_replacement")
    steps = 1 / abs(ms.rate)
    fast = stability.timescales(ms, lam, -1.0 / (ms.learning_rate * steps / 2), lam)
    slow = stability.timescales(ms, lam, -1.0 / (ms.learning_rate * steps * 2), lam)
    assert fast.drift_steps == pytest.approx(steps / 2) and slow.drift_steps == pytest.approx(steps * 2)
    assert stability.gauss_newton_verdict(ms, fast, lam, "training_set", draws).verdict == "inconclusive"
    assert stability.gauss_newton_verdict(ms, slow, lam, "training_set", draws).verdict == "stable"
    # a run shorter than the drift timescale: the verdict speaks of as many steps again, where the model holds
    short = stability.timescales(ms, lam, -1.0 / (ms.learning_rate * steps / 2), lam, steps_trained=int(steps / 4))
    assert short.horizon_steps == int(steps / 4) < short.drift_steps < short.stability_steps
    assert stability.gauss_newton_verdict(ms, short, lam, "training_set", draws).verdict == "stable"
    long = stability.timescales(ms, lam, -1.0 / (ms.learning_rate * steps / 2), lam, steps_trained=int(10 * steps))
    verdict = stability.gauss_newton_verdict(ms, long, lam, "training_set", draws)
    assert verdict.verdict == "inconclusive" and "settles" in verdict.reason
    # a Hessian sharper than the Gauss-Newton matrix beyond 2 / eta: the quadratic model is not this one
    sharp = stability.timescales(ms, 2.5 / ms.learning_rate, 0.0, lam)
    sharp_verdict = stability.gauss_newton_verdict(ms, sharp, 2.5 / ms.learning_rate, "training_set", draws)
    assert sharp_verdict.verdict == "inconclusive"


def test_the_cli_table_and_the_log_metrics_show_the_headline():
    from hf_msam.curvature.cli import format_table

    x = least_squares(8, 3, seed=3)
    y = torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lam = float(torch.linalg.eigvalsh(2 * x.T @ x / 8)[-1])
    data = [{"features": x[i].float(), "labels": float(y[i])} for i in range(8)]
    report = sharpness_report(LeastSquares(torch.zeros(3)), data, num_examples=8, measures=["eigenvalues", "coherence"],
                              learning_rate=0.2 / lam, train_batch_size=2, lanczos_iterations=10, steps_trained=37)
    d = report.to_dict()
    table = format_table(d)
    row = next(line for line in table.splitlines() if line.startswith("Gauss-Newton mean-square verdict (headline)"))
    assert row.endswith("stable (for the training set)")
    crit = f"{d['eta_critical_ggn']:.4g} / {d['eta_critical_ggn_with_replacement']:.4g}"
    assert f"{d['eta_ratio_ggn']:.4g} [{crit}]" in table
    assert "none / 37" in table and f"headline: {d['ggn_reason']}" in table
    metrics = report.metrics()
    assert metrics["sharpness_ggn_verdict"] == "stable" and metrics["sharpness_ggn_verdict_code"] == 1
    assert metrics["sharpness_stable_ggn"] == 1 and metrics["sharpness_eta_ratio_ggn"] == d["eta_ratio_ggn"] < 1
    assert metrics["sharpness_steps_trained"] == 37


def test_the_training_set_bound_holds_whatever_the_unseen_examples_are():
    # the probe's 4 examples are fixed; the 3 unseen ones are drawn from several families (aligned with the
    # probe's sharpest direction, equal, random, one very sharp): the bound never exceeds the enumerated rate
    g = torch.Generator().manual_seed(2)
    n, p, b, d = 7, 4, 2, 3
    u = torch.randn(p, d, 1, generator=g, dtype=torch.float64)
    seen = u @ u.transpose(1, 2)
    factors = factors_from_hessians(seen)
    top = torch.linalg.eigh(seen.sum(0))[1][:, -1:]
    unseen_families = [torch.zeros(3, d, d, dtype=torch.float64), (top @ top.T).expand(3, d, d) * 0.3,
                       seen.mean(0).expand(3, d, d)]
    for _ in range(4):
        w = torch.randn(3, d, 2, generator=g, dtype=torch.float64)
        unseen_families.append(w @ w.transpose(1, 2) * float(torch.rand(1, generator=g)) * 3)
    for eta in (0.2, 0.8, 2.0):
        ms = mean_square_growth(factors, learning_rate=eta, batch_size=b, num_train_examples=n)
        bound = stability.training_set_growth_bound(
            factors, stability.candidate_directions(factors, ms.top_direction), learning_rate=eta, batch_size=b,
            num_train_examples=n)
        for unseen in unseen_families:
            truth = subset_second_moment_rate(torch.cat([seen, unseen]), eta, b, "without_replacement")
            assert bound <= truth + 1e-9, (eta, bound, truth)


def test_mean_square_verdict_takes_the_first_examples_that_fit_its_row_limit(monkeypatch):
    """Past ``MEAN_SQUARE_MAX_ROWS`` the verdict covers the first k coherence examples, exactly as a report whose
    coherence probe is those k examples (every direction they curve), and says so."""
    torch.manual_seed(3)
    n, d = 24, 30
    x = torch.randn(n, d) * torch.linspace(0.3, 2.0, n)[:, None]
    data = [{"features": x[i], "labels": 0.0} for i in range(n)]

    def report(examples: int):
        return sharpness_report(LeastSquares(torch.zeros(d)), data, num_examples=n, coherence_examples=examples,
                                measures=["eigenvalues", "coherence"], learning_rate=0.05, train_batch_size=4,
                                lanczos_iterations=20, seed=0).to_dict()

    small = report(10)
    monkeypatch.setattr(stability, "MEAN_SQUARE_MAX_ROWS", 10)
    capped = report(n)
    assert capped["mean_square_examples"] == 10 and small["mean_square_examples"] == 10
    assert capped["mean_square_subspace_dim"] == small["mean_square_subspace_dim"] == 10
    assert capped["mean_square_rate"] == pytest.approx(small["mean_square_rate"], rel=1e-5)  # float32 Gram blocks
    assert capped["eta_critical_ggn"] == pytest.approx(small["eta_critical_ggn"], rel=1e-5)
    assert capped["ggn_scope"] == "probe" and capped["stability_verdict"] != "stable"
    assert any("first 10 of the 24 coherence examples" in w for w in capped["warnings"])
    assert stability.mean_square_examples(256, 2) == 5 and stability.mean_square_examples(8, 1) == 8
