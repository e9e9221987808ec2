"""Accuracy of the stability verdict's estimators on problems with known answers.

    python benchmarks/bench_verdict.py

writes ``benchmarks/results/verdict_cpu.json``:

- ``train_coherence``: the training set's sigma from p probe examples, for rank-one per-example Hessians
  H_i = u_i u_i^T (unit u_i in R^30, n = 1000) of four families (random directions, a 10% aligned cluster,
  identical, orthogonal), 50 draws each: coverage of the 95% interval, the median relative error of the
  estimate, and the same for the old scaling sigma_probe * n / p (how often it fell below the truth).
- ``mean_square_vs_chains``: the exact mean-square rate log rho(M) against the sample mean of ||v_T||^2
  over simulated chains (the estimator the report does not use), on a small least-squares problem.
- ``deep_null_space``: the whole report on exact least-squares minima with d >> n and eta lambda = 3e-6.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_msam import sharpness_report  # noqa: E402
from hf_msam.curvature.coherence import train_coherence  # noqa: E402
from hf_msam.curvature.stability import gauss_newton_factors, mean_square_growth  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = ("random", "cluster", "identical", "orthogonal")


def directions(family: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """The unit vectors u_i (rows) of the rank-one per-example Hessians H_i = u_i u_i^T of one of ``FAMILIES``:
    random directions in R^d, a cluster (the first 10% of the examples share one direction, the rest are random),
    all identical, or orthogonal (the n unit vectors of R^n). Also used by tests/curvature/test_curvature_train_coherence.py."""
    if family == "orthogonal":
        return np.eye(n)
    u = rng.standard_normal((n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    if family == "identical":
        u[:] = u[0]
    elif family == "cluster":
        u[: n // 10] = u[0]
    return u


def coherence_accuracy(n: int = 1000, d: int = 30, probes: tuple[int, ...] = (32, 64), draws: int = 50) -> list[dict]:
    rows = []
    for family in FAMILIES:
        rng = np.random.default_rng(0)
        cases = {p: {"covered": 0, "errors": [], "old_errors": [], "old_below": 0} for p in probes}
        for draw in range(draws):
            u = directions(family, n, d, rng)
            s = np.abs(u @ u.T)
            truth = float(np.linalg.eigvalsh(s)[-1])
            for p in probes:
                probe = rng.choice(n, p, replace=False)
                result = train_coherence(torch.from_numpy(s[np.ix_(probe, probe)]), 1.0, n, seed=draw)
                low, high = result.interval
                case = cases[p]
                case["covered"] += low - 1e-9 <= truth <= high + 1e-9
                case["errors"].append(abs(result.estimate - truth) / truth)
                old = result.probe_sigma * n / p
                case["old_errors"].append(abs(old - truth) / truth)
                case["old_below"] += old < truth * (1 - 1e-9)
        for p, case in cases.items():
            rows.append({
                "family": family, "n": n, "d": d, "probe_examples": p, "draws": draws,
                "interval_coverage": case["covered"] / draws,
                "median_relative_error": float(np.median(case["errors"])),
                "old_scaling_median_relative_error": float(np.median(case["old_errors"])),
                "old_scaling_fraction_below_truth": case["old_below"] / draws,
            })
            print(rows[-1], flush=True)
    return rows


def chains_vs_exact(chains: int = 64, steps: int = 600) -> dict:
    """Least squares, 8 examples in R^3, B = 2, Bernoulli batches, eta = 0.7 x the exact mean-square critical rate."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 2 * x[:, :, None] * x[:, None, :]
    n, b = 8, 2
    factors = gauss_newton_factors(2 * x @ x.T, n)
    lo, hi = 0.0, 2.0 / float(torch.linalg.eigvalsh(h.mean(0))[-1])
    for _ in range(60):
        mid = (lo + hi) / 2
        rate = mean_square_growth(factors, learning_rate=mid, batch_size=b, num_train_examples=n,
                                  sampler="bernoulli").rate
        lo, hi = (lo, mid) if rate >= 0 else (mid, hi)
    eta = 0.7 * hi
    exact = mean_square_growth(factors, learning_rate=eta, batch_size=b, num_train_examples=n,
                               sampler="bernoulli").rate
    g = torch.Generator().manual_seed(3)
    v = torch.randn(chains, 3, generator=g, dtype=torch.float64)
    v /= v.norm(dim=1, keepdim=True)
    log_norm = torch.zeros(chains, dtype=torch.float64)
    at_half = log_norm
    for t in range(steps):
        keep = (torch.rand(chains, n, generator=g) < b / n).double()
        v = v - (eta / b) * torch.einsum("ki,ide,ke->kd", keep, h, v)
        norm = v.norm(dim=1)
        log_norm = log_norm + 2 * norm.log()
        v = v / norm[:, None]
        if t + 1 == steps // 2:
            at_half = log_norm.clone()

    def log_mean(values: torch.Tensor) -> float:
        return float(torch.logsumexp(values, 0) - math.log(chains))

    chain_rate = (log_mean(log_norm) - log_mean(at_half)) / (steps - steps // 2)
    lyapunov = float((log_norm - at_half).mean()) / (steps - steps // 2)
    return {"eta_over_critical": 0.7, "exact_rate": exact, "chains": chains, "steps": steps,
            "chain_mean_rate": chain_rate, "chain_almost_sure_rate": lyapunov}


class LeastSquares(torch.nn.Module):
    """A linear regression head with the transformers interface: loss = mean_i (x_i . w - y_i)^2 (also used by
    tests/curvature/test_curvature_verdict.py)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.config = type("Config", (), {"problem_type": "regression", "num_labels": 1})()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, features: torch.Tensor, labels: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = (features @ self.w)[:, None]
        return SequenceClassifierOutput(loss=((logits[:, 0] - labels) ** 2).mean(), logits=logits)


def deep_null_space(seeds: int = 8, n: int = 16, d: int = 2000) -> list[dict]:
    rows = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(n, d, generator=g), torch.randn(n, generator=g)
        w = torch.linalg.lstsq(x.double(), y.double()[:, None], driver="gelsd").solution[:, 0].float()
        lam = float(torch.linalg.eigvalsh(2 * x.double() @ x.double().T)[-1]) / n
        report = sharpness_report(LeastSquares(w), [{"features": x[i], "labels": float(y[i])} for i in range(n)],
                                  num_examples=n, measures=["eigenvalues", "coherence", "probe"],
                                  learning_rate=3e-6 / lam, train_batch_size=4, num_train_examples=4000,
                                  lanczos_iterations=20, probe_steps=30, seed=seed).to_dict()
        keys = ("stability_verdict", "stable_ggn", "mean_square_rate", "eta_ratio_ggn", "probe_growth_rate",
                "gradient_ratio", "lambda_min_ritz")
        rows.append({key: report[key] for key in keys})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    start = time.time()
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "train_coherence": coherence_accuracy(),
        "mean_square_vs_chains": chains_vs_exact(),
        "deep_null_space": deep_null_space(),
    }
    result["seconds"] = time.time() - start
    path = os.path.join(HERE, "results", "verdict_cpu.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
