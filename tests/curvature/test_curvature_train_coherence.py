"""The training set's coherence from probe examples: rank-one per-example Hessians H_i = u_i u_i^T with unit
u_i, so S_ij = |u_i . u_j|, max_i lambda_max(H_i) = 1 and the training set's sigma is lambda_max(S_n), known
exactly. The probe is a uniform draw of p of the n examples; the interval must cover the truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bench_verdict import FAMILIES, directions

from hf_msam.curvature.coherence import coherence_from_hessians, train_coherence

N, D, P, DRAWS = 400, 30, 64, 50


@pytest.mark.parametrize("family", FAMILIES)
def test_interval_covers_the_training_set_sigma(family):
    rng = np.random.default_rng(123)
    covered = 0
    for draw in range(DRAWS):
        u = directions(family, N, D, rng)
        s = np.abs(u @ u.T)
        truth = float(np.linalg.eigvalsh(s)[-1])
        probe = rng.choice(N, P, replace=False)
        result = train_coherence(torch.from_numpy(s[np.ix_(probe, probe)]), 1.0, N, seed=draw)
        low, high = result.interval
        assert low <= result.estimate <= high
        assert result.probe_sigma == pytest.approx(float(np.linalg.eigvalsh(s[np.ix_(probe, probe)])[-1]))
        covered += low - 1e-9 <= truth <= high + 1e-9
    assert covered >= 0.9 * DRAWS, (family, covered)
    if family == "identical":
        assert result.estimate == pytest.approx(N) and result.interval == pytest.approx((N, N))
    if family == "orthogonal":
        assert result.estimate == pytest.approx(1.0) and result.interval == pytest.approx((1.0, 1.0))


def test_the_s_matrix_of_the_report_path_is_the_dense_one():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, 4, 2, generator=g, dtype=torch.float64)
    h = u @ u.transpose(1, 2)
    result = coherence_from_hessians(h)
    want = torch.einsum("iab,jba->ij", h, h).sqrt()
    assert torch.allclose(result.s_matrix, want, atol=1e-10)


def test_probe_set_equal_to_the_training_set_is_exact():
    s = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]], dtype=torch.float64)
    result = train_coherence(s, 1.0, 3)
    exact = float(torch.linalg.eigvalsh(s)[-1])
    assert result.estimate == pytest.approx(exact) and result.interval == pytest.approx((exact, exact))
