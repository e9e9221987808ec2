"""Reshuffled epochs against the independent-batch models of the mean-square verdict: exact critical rates.

The Trainer's ``RandomSampler`` permutes the n training examples every epoch and cuts the permutation into n/B
batches of B distinct examples, so the batches of one epoch are disjoint. ``hf_msam.curvature.stability`` models
each step as an independent batch: a uniform B-subset (``without_replacement``) or B draws with replacement
(``with_replacement``, c = 1/B, the noisier). This script computes, by exact enumeration, the learning rate at
which the second moment of linearised SGD under reshuffled epochs starts to grow, E[P (x) P] over one epoch's
product P = prod_j (I - eta H_hat_j), and divides it by each model's critical rate:

- ``scalar_two_level``: k of the n examples curve one direction by 1, the others by 0 (every k); the epoch's
  expectation by dynamic programming over the batches (the count of curving examples left is hypergeometric),
  exact for any number of batches per epoch.
- ``matrices``: random PSD H_i in 2 or 3 dimensions, a cluster of aligned examples plus isotropic noise (the
  family where reshuffling is least stable), n <= 8, every ordered partition of the n examples enumerated.

    python benchmarks/bench_reshuffling.py        # CPU -> results/reshuffling_cpu.json (~4 min)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import torch

from hf_msam.curvature.stability import critical_learning_rate, gauss_newton_factors

RESULTS = Path(__file__).resolve().parent / "results" / "reshuffling_cpu.json"


def ordered_partitions(items: list[int], b: int) -> Iterator[list[list[int]]]:
    """Every sequence of disjoint B-subsets covering ``items``: the epochs of random reshuffling, equally likely."""
    if not items:
        yield []
        return
    for first in itertools.combinations(items, b):
        rest = [i for i in items if i not in first]
        for tail in ordered_partitions(rest, b):
            yield [list(first), *tail]


def reshuffled_epoch_rate(h: torch.Tensor, eta: float, b: int) -> float:
    """log rho(E[P (x) P]) per step over reshuffled epochs of the n examples with Hessians h (n x d x d), B | n."""
    n, d, _ = h.shape
    eye = torch.eye(d, dtype=torch.float64)
    total = torch.zeros(d * d, d * d, dtype=torch.float64)
    count = 0
    for epoch in ordered_partitions(list(range(n)), b):
        p = eye
        for batch in epoch:
            p = (eye - (eta / b) * h[batch].sum(0)) @ p
        total += torch.kron(p, p)
        count += 1
    return math.log(float(torch.linalg.eigvals(total / count).abs().max())) / (n // b)


def first_growth(rate: Callable[[float], float], start: float) -> float:
    """The smallest eta > 0 at which ``rate`` turns non-negative: geometric scan from ``start`` both ways, then
    bisection to 1e-9 relative."""
    lo = start
    while rate(lo) >= 0:
        lo /= 1.1
    hi = lo * 1.1
    while rate(hi) < 0:
        lo, hi = hi, hi * 1.1
    while hi - lo > 1e-9 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) < 0 else (lo, mid)
    return hi


def hypergeometric(total: int, marked: int, draws: int, k: int) -> float:
    if k < 0 or k > marked or draws - k > total - marked:
        return 0.0
    return math.comb(marked, k) * math.comb(total - marked, draws - k) / math.comb(total, draws)


def log_or_minus_inf(x: float) -> float:
    """log x, with -inf for 0 (an epoch or a step that annihilates the direction)."""
    return math.log(x) if x > 0 else -math.inf


def scalar_rates(n: int, b: int, k: int) -> dict[str, Callable[[float], float]]:
    """Exact log growth per step of E v^2 when k of n examples curve the direction by 1 and the rest by 0."""

    def reshuffled(eta: float) -> float:
        @lru_cache(None)
        def rest(batch: int, left: int) -> float:  # E prod over batches >= batch, with ``left`` curving examples
            if batch == n // b:
                return 1.0
            remaining = n - batch * b
            return sum(hypergeometric(remaining, left, b, j) * (1 - eta * j / b) ** 2 * rest(batch + 1, left - j)
                       for j in range(min(b, left) + 1))

        return log_or_minus_inf(rest(0, k)) / (n // b)

    def subsets(eta: float) -> float:
        return log_or_minus_inf(sum(hypergeometric(n, k, b, j) * (1 - eta * j / b) ** 2
                                    for j in range(min(b, k) + 1)))

    def draws(eta: float) -> float:
        q = k / n
        return log_or_minus_inf(sum(math.comb(b, j) * q**j * (1 - q) ** (b - j) * (1 - eta * j / b) ** 2
                            for j in range(b + 1)))

    return {"reshuffled": reshuffled, "without_replacement": subsets, "with_replacement": draws}


def cluster_problem(n: int, gen: torch.Generator) -> torch.Tensor:
    d = int(torch.randint(2, 4, (1,), generator=gen))
    k = int(torch.randint(2, n, (1,), generator=gen))
    direction = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    scale, noise = 3 * float(torch.rand(1, generator=gen)), float(torch.rand(1, generator=gen))
    u = noise * torch.randn(n, d, 1, generator=gen, dtype=torch.float64)
    u[:k] += scale * direction
    return u @ u.transpose(1, 2)


def factors_from_hessians(h: torch.Tensor) -> torch.Tensor:
    """``gauss_newton_factors`` of dense PSD H_i: Phi_i = H_i^(1/2) (d rows per example), K = Phi Phi^T."""
    values, vectors = torch.linalg.eigh(h)
    phi = (vectors * values.clamp_min(0).sqrt()[:, None, :]).transpose(1, 2)
    n, d, _ = h.shape
    return gauss_newton_factors(torch.einsum("iar,jbr->iajb", phi, phi).reshape(n * d, n * d), n)


def ratio_range(ratios: list[float]) -> dict[str, float]:
    return {"min": min(ratios), "max": max(ratios)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=25, help="random matrix problems per (n, B)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
              "ratio": "critical rate of reshuffled epochs / critical rate of the model", "scalar_two_level": [],
              "matrices": []}
    for b in (2, 4):
        for batches in (2, 4, 8, 16, 32):
            n = b * batches
            ratios = {"without_replacement": [], "with_replacement": []}
            for k in range(1, n):
                rates = scalar_rates(n, b, k)
                truth = first_growth(rates["reshuffled"], 1.0)
                for model in ratios:
                    ratios[model].append(truth / first_growth(rates[model], 1.0))
            row = {"batch_size": b, "batches_per_epoch": batches, "n": n,
                   **{f"over_{m}": ratio_range(r) for m, r in ratios.items()}}
            print(json.dumps(row), flush=True)
            result["scalar_two_level"].append(row)
    gen = torch.Generator().manual_seed(0)
    for n, b in ((4, 2), (6, 2), (6, 3), (8, 2), (8, 4)):
        ratios = {"without_replacement": [], "with_replacement": []}
        for _ in range(a.trials):
            h = cluster_problem(n, gen)
            factors = factors_from_hessians(h)
            crit = {m: critical_learning_rate(factors, batch_size=b, num_train_examples=n, sampler=m) for m in ratios}
            truth = first_growth(lambda eta: reshuffled_epoch_rate(h, eta, b), crit["without_replacement"])
            for model in ratios:
                ratios[model].append(truth / crit[model])
        row = {"batch_size": b, "batches_per_epoch": n // b, "n": n, "problems": a.trials,
               **{f"over_{m}": ratio_range(r) for m, r in ratios.items()}}
        print(json.dumps(row), flush=True)
        result["matrices"].append(row)
    result["seconds"] = round(time.time() - start, 1)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
