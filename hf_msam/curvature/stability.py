"""Linear stability of SGD at a minimum: the critical learning rates and the simulated probe.

Linearised SGD at a minimum w* (Dexter et al., ICLR 2024; ``docs/design.md`` section 3.4) moves
v = w - w* by v <- (I - (eta/B) sum_i x_i H_i) v with x_i ~ Bernoulli(B/n) independent. As restated
in ``docs/design.md`` sections 3.4-3.5 (and checked numerically in ``tests/test_curvature_stability.py``):

- Theorem 1: lambda_max(H) >= (sigma / eta) (n/B - 1)^(-1/2) implies instability, i.e. SGD is unstable
  for eta >= eta_1 = sigma / (lambda_max sqrt(n/B - 1)).
- The gradient-descent bound: E[v_t] = (I - eta H)^t v_0 diverges, and with it E||v_t||^2, for
  eta > eta_GD = 2 / lambda_max.

Both are sufficient conditions for instability, not for stability. Stability is shown by
``mean_square_growth``: the growth rate of the second moment E||v_t||^2 of the linearised dynamics,
computed exactly from the per-example Gauss-Newton matrices of the probe examples (the matrices of the
coherence) in the subspace where they act, with the training set's gradient noise;
``stability_verdict`` combines all three.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import torch

NEGATIVE_CURVATURE_TOL = 1e-2  # lambda_min < -tol * lambda_max: not a minimum
GRADIENT_TOL = 1e-2  # ||g||^2 / (2 lambda_max L_ref) above this: not a minimum
SUBSPACE_TOL = 1e-4  # Gauss-Newton eigen-directions kept: eigenvalue >= tol * the largest


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


def gauss_newton_factors(gram: torch.Tensor, num_examples: int, *, max_dim: int = 32,
                         tol: float = SUBSPACE_TOL) -> torch.Tensor:
    """Per-example factors F_i (p x C x r) with F_i^T F_i = Q^T H_i Q, from the weighted NTK K = Phi Phi^T.

    With H_i = Phi_i^T Phi_i (``coherence``), every H_i acts in the row space of Phi; the eigenvectors of
    the probe's Gauss-Newton matrix G = Phi^T Phi / p are Q_k = Phi^T u_k / sqrt(mu_k) for the eigenpairs
    (mu_k, u_k) of K. Keeping the r <= ``max_dim`` directions with mu_k >= ``tol`` mu_1 (where the
    dynamics can grow; the others have eta H ~ 0 and a factor ~ 1), Phi_i Q = K_{i,:} U_r diag(mu_r)^(-1/2).
    """
    k = gram.double()
    mu, u = torch.linalg.eigh((k + k.T) / 2)
    mu, u = mu.flip(0), u.flip(1)
    keep = int(min(max_dim, int((mu >= tol * mu[0]).sum()))) if mu[0] > 0 else 0
    if keep == 0:
        raise ValueError("every per-example Gauss-Newton matrix is zero: no direction can grow")
    factors = k @ u[:, :keep] / mu[:keep].sqrt()  # (pC x r): row block i is F_i
    return factors.reshape(num_examples, -1, keep)


@dataclass
class MeanSquareResult:
    """The per-step growth rate log rho(M) of E||v||^2 under linearised SGD, with a confidence interval."""

    rate: float  # log rho(M); < 0: E||v_t||^2 -> 0 (mean-square stable)
    rate_interval: tuple[float, float]
    generator_eigenvalue: float  # ell = lambda_max(L), rho(M) = 1 + eta ell
    subspace_dim: int
    noise_scale: float  # 1/B - 1/n
    confidence: float


def noise_scale(num_train: int, batch_size: int) -> float:
    """1/B - 1/n = (n/B - 1)/n: Bernoulli(B/n) batches of the n training examples scaled by 1/B have
    covariance (1/B - 1/n) E_i[H_i (x) H_i] (the noise factor n/B - 1 of Theorem 1); 0 at full batch."""
    return max(0.0, 1.0 / batch_size - 1.0 / num_train)


def mean_square_growth(
    factors: torch.Tensor,
    *,
    learning_rate: float,
    batch_size: int,
    num_train_examples: int,
    confidence: float = 0.95,
) -> MeanSquareResult:
    """Growth of E||v_t||^2 for v <- (I - eta H_hat) v, H_hat the Bernoulli batch Hessian of the training set,
    with the per-example matrices H_i = F_i^T F_i of the probe examples (``gauss_newton_factors``).

    The second moment X_t = E[v_t v_t^T] follows the linear, positive map M(X) = E[(I - eta H_hat) X
    (I - eta H_hat)] = (I - eta H) X (I - eta H) + eta^2 s E_i[H_i X H_i], s = 1/B - 1/n (``noise_scale``),
    so E||v_t||^2 = tr M^t(X_0) and the dynamics are mean-square stable iff rho(M) < 1. M = I + eta L with
    L(X) = -(H X + X H) + eta (H X H + s E_i[H_i X H_i]), self-adjoint in the trace inner product, and the
    spectral radius of a positive map is its largest real eigenvalue (Krein-Rutman), so
    rho(M) = 1 + eta lambda_max(L): computed exactly (dense eigh on r^2 x r^2), with no cancellation for tiny
    eta. Simulating chains instead estimates E||v_T||^2 by a sample mean of heavy-tailed ||v_T||^2, which
    falls short of it (and can report contraction where the mean square grows).

    Interval: the probe examples are a sample of the training set; by Hellmann-Feynman the influence of
    example i on lambda_max(L) is <X, dL_i X> (X the top eigenvector, dL_i the change of L when the mean over
    examples moves towards i), giving a normal interval with standard error sd(influence)/sqrt(p) and the
    finite-population factor sqrt(1 - p/n).
    """
    p, _, r = factors.shape
    f = factors.double()
    h = f.transpose(1, 2) @ f  # (p, r, r)
    mean = h.mean(0)
    eye = torch.eye(r, dtype=torch.float64)
    scale = noise_scale(num_train_examples, batch_size)
    eta = learning_rate
    second = torch.einsum("iab,icd->acbd", h, h).reshape(r * r, r * r) / p
    generator = -(torch.kron(mean, eye) + torch.kron(eye, mean)) + eta * (torch.kron(mean, mean) + scale * second)
    values, vectors = torch.linalg.eigh((generator + generator.T) / 2)
    ell = float(values[-1])
    x = vectors[:, -1].reshape(r, r)
    x = (x + x.T) / 2
    d = h - mean
    xhx = torch.einsum("ab,ibc,cd,ida->i", x, h, x, h)
    influence = (-2 * torch.einsum("ab,ibc,ca->i", x, d, x) + 2 * eta * torch.einsum("ab,ibc,cd,da->i", x, d, x, mean)
                 + eta * scale * (xhx - xhx.mean()))
    fpc = max(0.0, 1.0 - p / num_train_examples)
    stderr = float(influence.std()) / math.sqrt(p) * math.sqrt(fpc) if p > 1 else 0.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)

    def log_radius(value: float) -> float:
        return math.log(max(1.0 + eta * value, torch.finfo(torch.float64).tiny))

    return MeanSquareResult(log_radius(ell), (log_radius(ell - z * stderr), log_radius(ell + z * stderr)), ell, r,
                            scale, confidence)


@dataclass
class Verdict:
    verdict: str  # "stable", "unstable" or "inconclusive"
    reason: str  # one sentence
    basis: str  # "not_at_minimum", "gd_bound", "theorem1", "mean_square", "no_proof", "missing_inputs"

    @property
    def stable_sgd(self) -> bool | None:
        return {"stable": True, "unstable": False}.get(self.verdict)


def stability_verdict(
    *,
    learning_rate: float | None,
    batch_size: int | None,
    num_train_examples: int | None,
    lambda_max: float | None,
    lambda_min: float | None,
    gradient_ratio: float | None,
    interpolates: bool | None,
    sigma_high: float | None,
    mean_square: MeanSquareResult | None,
) -> Verdict:
    """The three-way verdict for SGD with ``learning_rate`` eta and ``batch_size`` B on n examples.

    1. Inconclusive away from a minimum, where the linear theory does not apply: a Ritz value ``lambda_min``
       below -``NEGATIVE_CURVATURE_TOL`` lambda_max (a Rayleigh quotient, so negative curvature is certain),
       ``gradient_ratio`` = ||g||^2 / (2 lambda_max L_ref) above ``GRADIENT_TOL`` (one step 1/lambda_max along
       -g would still remove that fraction of the loss L_ref of a chance-level predictor, in the quadratic
       model), or probe examples not fitted.
    2. Unstable when proved: eta >= 2 / lambda_max (lambda_max a Ritz value, a lower bound of the true one),
       or eta >= Theorem 1's rate with the upper end ``sigma_high`` of the training-set coherence interval.
    3. Stable when the mean square contracts with confidence (upper end of the rate's interval < 0).
    4. Inconclusive otherwise.
    """
    if learning_rate is None or batch_size is None or num_train_examples is None:
        return Verdict("inconclusive", "The learning rate, batch size and training-set size are needed for a "
                       "verdict; pass learning_rate, train_batch_size and num_train_examples.", "missing_inputs")
    if lambda_max is None or lambda_max <= 0:
        return Verdict("inconclusive", "No positive largest Hessian eigenvalue was measured, so there is no "
                       "curvature to judge stability by.", "missing_inputs")
    if lambda_min is not None and lambda_min < -NEGATIVE_CURVATURE_TOL * lambda_max:
        return Verdict("inconclusive", f"Not a minimum: the Hessian has negative curvature ({lambda_min:.3g}, "
                       f"beyond {NEGATIVE_CURVATURE_TOL:g} x lambda_max), so the linear stability theory does "
                       "not apply.", "not_at_minimum")
    if gradient_ratio is not None and gradient_ratio > GRADIENT_TOL:
        return Verdict("inconclusive", f"Not a minimum: the gradient is large (||g||^2 / (2 lambda_max L_ref) = "
                       f"{gradient_ratio:.3g} > {GRADIENT_TOL:g}), so the linear stability theory does not "
                       "apply.", "not_at_minimum")
    if interpolates is None:
        return Verdict("inconclusive", "Whether the model fits every probe example is unknown (no accuracy for "
                       "this head), so it is not shown to be at a minimum where the linear theory applies.",
                       "not_at_minimum")
    if not interpolates:
        return Verdict("inconclusive", "Not a minimum of every example: the model does not fit every probe "
                       "example, so the linear stability theory (at an interpolating minimum) does not apply.",
                       "not_at_minimum")
    eta, gd = learning_rate, eta_critical_gd(lambda_max)
    if gd is not None and eta >= gd:
        return Verdict("unstable", f"The learning rate {eta:.3g} is at or above 2 / lambda_max = {gd:.3g}, where "
                       "even full-batch gradient descent moves away from this minimum.", "gd_bound")
    if sigma_high is not None:
        eta1 = eta_critical_theorem1(lambda_max, sigma_high, num_train_examples, batch_size)
        if eta1 is not None and eta >= eta1:
            return Verdict("unstable", f"The learning rate {eta:.3g} is at or above Theorem 1's rate {eta1:.3g} "
                           "(computed with the upper end of the coherence interval), so SGD with this batch size "
                           "cannot stay at this minimum.", "theorem1")
    if mean_square is None:
        return Verdict("inconclusive", "No instability is proved, and showing stability needs the mean-square "
                       "growth from the per-example Gauss-Newton matrices (the coherence measure).", "no_proof")
    high = mean_square.rate_interval[1]
    if high < 0:
        return Verdict("stable", f"Linearised SGD contracts in mean square at this learning rate and batch size "
                       f"(log E||v||^2 falls by {-mean_square.rate:.3g} per step, {mean_square.confidence:.0%} "
                       f"upper bound {high:.3g} < 0).", "mean_square")
    return Verdict("inconclusive", f"No instability is proved, and the mean square of linearised SGD does not "
                   f"contract with confidence (log growth per step {mean_square.rate:.3g}, upper bound "
                   f"{high:.3g} >= 0).", "no_proof")
