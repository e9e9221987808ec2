"""Linear stability of SGD at a minimum: the critical learning rates and the simulated probe.

Linearised SGD at a minimum w* (Dexter et al., ICLR 2024; ``docs/design.md`` section 3.4) moves
v = w - w* by v <- (I - (eta/B) sum_i x_i H_i) v with x_i ~ Bernoulli(B/n) independent. As restated
in ``docs/design.md`` sections 3.4-3.5 (and checked numerically in ``tests/test_curvature_stability.py``):

- Theorem 1: lambda_max(H) >= (sigma / eta) (n/B - 1)^(-1/2) implies instability, i.e. SGD is unstable
  for eta >= eta_1 = sigma / (lambda_max sqrt(n/B - 1)).
- The gradient-descent bound: E[v_t] = (I - eta H)^t v_0 diverges, and with it E||v_t||^2, for
  eta > eta_GD = 2 / lambda_max.

Both are sufficient conditions for instability, not for stability.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def eta_critical_theorem1(lambda_max: float, sigma: float, n: int, batch_size: int) -> float | None:
    """sigma / (lambda_max sqrt(n/B - 1)); None when B >= n (full batch: no SGD noise) or lambda_max <= 0."""
    if lambda_max <= 0 or batch_size >= n:
        return None
    return sigma / (lambda_max * math.sqrt(n / batch_size - 1))


def eta_critical_gd(lambda_max: float) -> float | None:
    """2 / lambda_max; None when lambda_max <= 0 (no direction in which gradient descent can diverge)."""
    return 2.0 / lambda_max if lambda_max > 0 else None


@dataclass
class ProbeResult:
    growth_rate: float  # geometric mean of ||v_{t+1}|| / ||v_t|| over the steps
    step_factors: list[float]
    num_hvps: int


BatchHvp = Callable[[list[int], torch.Tensor], torch.Tensor]


def sample_batch(
    generator: torch.Generator, num_examples: int, batch_size: int, sampling: str
) -> list[int]:
    """Indices of one SGD batch: ``bernoulli`` includes each example with probability B/n (the paper's
    model, random size); ``uniform`` draws B examples uniformly with replacement (i.i.d. draws from the
    data distribution the probe set samples)."""
    if sampling == "bernoulli":
        keep = torch.rand(num_examples, generator=generator) < min(1.0, batch_size / num_examples)
        return keep.nonzero().flatten().tolist()
    if sampling == "uniform":
        return torch.randint(0, num_examples, (batch_size,), generator=generator).tolist()
    raise ValueError(f"probe_sampling: {sampling!r} is neither 'bernoulli' nor 'uniform'")


def linear_stability_probe(
    batch_hvp: BatchHvp,
    dim: int,
    num_examples: int,
    *,
    learning_rate: float,
    batch_size: int,
    steps: int,
    sampling: str = "uniform",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ProbeResult:
    """Simulate v <- v - (eta/B) sum_{i in batch} H_i v over ``steps`` sampled batches.

    ``batch_hvp(indices, v)`` returns sum_{i in indices} H_i v (indices may repeat). v starts as a
    seeded Gaussian direction and is renormalised after each step; the growth rate is the geometric mean
    of the per-step factors ||v_{t+1}|| / ||v_t|| (the top Lyapunov exponent, exponentiated): above 1
    the linearised dynamics move away from the minimum.
    """
    if steps < 1:
        raise ValueError("probe_steps: need at least one step")
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(dim, generator=g, dtype=torch.float32).to(device)
    v /= v.norm()
    factors, hvps = [], 0
    for _ in range(steps):
        idx = sample_batch(g, num_examples, batch_size, sampling)
        if idx:
            v = v - (learning_rate / batch_size) * batch_hvp(idx, v)
            hvps += 1
        norm = float(v.norm())
        factors.append(norm)
        if norm == 0 or not math.isfinite(norm):
            break
        v /= norm
    logs = [math.log(f) if f > 0 else -math.inf for f in factors]
    growth = math.exp(sum(logs) / len(logs)) if all(math.isfinite(x) for x in logs) else (
        0.0 if any(f == 0 for f in factors) else math.inf
    )
    return ProbeResult(growth_rate=growth, step_factors=factors, num_hvps=hvps)
