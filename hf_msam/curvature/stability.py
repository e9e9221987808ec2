"""Linear stability of SGD near a minimum: the mean-square rate, the critical learning rates, the verdicts.

Linearised SGD moves v = w - w* by v <- (I - eta H_hat) v, H_hat the mean of the per-example matrices H_i over
one batch. Each step's batch is modelled as independent: a uniformly random set of B distinct examples (the
marginal of the Trainer's random reshuffling) or B draws with replacement (``batch_second_moment``; Dexter et
al.'s Bernoulli batches are an option). ``mean_square_growth`` gives the exact growth rate of E||v_t||^2 and
the critical rate eta_crit from the per-example Gauss-Newton matrices of the probe examples (the matrices of
the coherence), over every direction they curve. What may be claimed for the training set (``docs/design.md``
section 3.4, ``docs/curvature.md``):

- the verdict is decided where both samplers agree (``gauss_newton_verdict``);
- when the probe is the whole training set, the rates decide "stable" / "unstable" for it;
- otherwise only instability can be shown, by ``training_set_growth_bound``, a lower bound on the training
  set's rate that holds whatever the unseen examples are; the probe's own verdict is the headline
  (``gauss_newton_verdict``) with its scope, and ``unseen_example_limit`` and ``probe_miss_fraction`` say
  what an unseen example or group could change.

Theorem 1 (Dexter et al., ICLR 2024, as restated: instability for eta >= sigma / (lambda_max sqrt(n/B - 1)),
Bernoulli batches) and the gradient-descent bound 2 / lambda_max are reported as numbers; with a probe's
estimate of sigma or lambda_max they prove nothing about the training set, and the verdicts do not use them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

NEGATIVE_CURVATURE_TOL = 1e-2  # lambda_min < -tol * lambda_max: not a minimum
GRADIENT_TOL = 1e-2  # ||g||^2 / (2 lambda_max L_ref) above this: not a minimum
PROBE_SAMPLINGS = ("without_replacement", "uniform", "bernoulli")
SUBSPACE_TOL = 1e-6  # Gauss-Newton eigen-directions kept: eigenvalue >= tol * the largest
DENSE_LIMIT = 1500  # symmetric unknowns r(r+1)/2 up to which the generator is assembled and diagonalised
EIGSH_TOL = 1e-10  # ARPACK's relative tolerance beyond
LOBPCG_TOL = 1e-12  # LOBPCG's residual tolerance, relative to lambda_max(A) = 2 lambda_max(H)
LOBPCG_MAX_ITERATIONS = 500
MEAN_SQUARE_MAX_ROWS = 1024  # Gauss-Newton rows (examples x rows per example) the mean-square verdict takes at most


def mean_square_examples(num_examples: int, rows_per_example: int) -> int:
    """How many of the first probe examples the mean-square analysis takes: all of them while their factors have at
    most ``MEAN_SQUARE_MAX_ROWS`` rows, else as many as fit. Each product of ``SecondMomentGenerator`` costs
    O(p C r^2) with r <= p C directions, and Lanczos needs tens to hundreds of them, so the cost grows with the
    cube of the rows p C and the limit keeps it bounded. The verdict then covers those examples (every direction
    they curve, no cap within them), which the report states (``mean_square_examples``, ``ggn_scope``)."""
    return max(1, min(num_examples, MEAN_SQUARE_MAX_ROWS // max(1, rows_per_example)))


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
    """Indices of one SGD batch: ``without_replacement`` B distinct examples, uniformly (one step of the
    Trainer's random reshuffling; all of them when B >= n); ``bernoulli`` includes each example with
    probability B/n (the paper's model, random size); ``uniform`` draws B examples uniformly with replacement."""
    if sampling == "without_replacement":
        return torch.randperm(num_examples, generator=generator)[:batch_size].tolist()
    if sampling == "bernoulli":
        keep = torch.rand(num_examples, generator=generator) < min(1.0, batch_size / num_examples)
        return keep.nonzero().flatten().tolist()
    if sampling == "uniform":
        return torch.randint(0, num_examples, (batch_size,), generator=generator).tolist()
    raise ValueError(f"probe_sampling: {sampling!r} is not one of {list(PROBE_SAMPLINGS)}")


def linear_stability_probe(
    batch_hvp: BatchHvp,
    dim: int,
    num_examples: int,
    *,
    learning_rate: float,
    batch_size: int,
    steps: int,
    sampling: str = "without_replacement",
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


def gauss_newton_factors(gram: torch.Tensor, num_examples: int, *, tol: float = SUBSPACE_TOL) -> torch.Tensor:
    """Per-example factors F_i (p x C x r) with F_i^T F_i = Q^T H_i Q, from the weighted NTK K = Phi Phi^T.

    With H_i = Phi_i^T Phi_i (``coherence``), every H_i acts in the row space of Phi; the eigenvectors of
    the probe's Gauss-Newton matrix G = Phi^T Phi / p are Q_k = Phi^T u_k / sqrt(mu_k) for the eigenpairs
    (mu_k, u_k) of K. Every direction with mu_k >= ``tol`` mu_1 is kept (no cap on their number: noise-driven
    growth can live where the mean curvature is small and one example's is large); Phi_i Q =
    K_{i,:} U_r diag(mu_r)^(-1/2). In a dropped direction every example's curvature is at most p tol lambda_max(G).
    """
    k = gram.double()
    mu, u = torch.linalg.eigh((k + k.T) / 2)
    mu, u = mu.flip(0), u.flip(1)
    keep = int((mu >= tol * mu[0]).sum()) if mu[0] > 0 else 0
    if keep == 0:
        raise ValueError("every per-example Gauss-Newton matrix is zero: no direction can grow")
    factors = k @ u[:, :keep] / mu[:keep].sqrt()  # (pC x r): row block i is F_i
    return factors.reshape(num_examples, -1, keep)


SAMPLERS = ("without_replacement", "with_replacement", "bernoulli")


def batch_second_moment(sampler: str, num_train: int, batch_size: int) -> tuple[float, float]:
    """(a, c) with E[H_hat X H_hat] = a H X H + c E_i[H_i X H_i] for the batch mean H_hat of one SGD step
    over the n training examples (H = E_i H_i, E_i the mean over the n examples).

    - ``without_replacement``: a uniformly random set of B distinct examples, H_hat = (1/B) sum_{i in S} H_i
      (the Trainer's random reshuffling, each step taken as an independent uniform B-subset).
      P(i in S) = B/n and P(i, j in S) = B(B - 1)/(n(n - 1)) for i != j give
      E[H_hat (x) H_hat] = c E_i[H_i (x) H_i] + (1 - c) H (x) H with c = (1/B)(n - B)/(n - 1).
    - ``with_replacement``: B independent uniform draws: c = 1/B, a = 1 - 1/B.
    - ``bernoulli``: each example kept with probability B/n, scaled by 1/B (Dexter et al.'s model):
      a = 1, c = 1/B - 1/n.
    """
    n, b = num_train, batch_size
    if sampler == "without_replacement":
        c = (n - b) / (b * (n - 1)) if b < n else 0.0
        return 1.0 - c, c
    if sampler == "with_replacement":
        return 1.0 - 1.0 / b, 1.0 / b
    if sampler == "bernoulli":
        return 1.0, max(0.0, 1.0 / b - 1.0 / n)
    raise ValueError(f"sampler: {sampler!r} is not one of {list(SAMPLERS)}")


class SecondMomentGenerator:
    """The generator L of the second moment of linearised SGD, matrix-free, on symmetric r x r matrices.

    M(X) = E[(I - eta H_hat) X (I - eta H_hat)] = X + eta L(X), L(X) = -A(X) + eta Q(X) with
    A(X) = H X + X H and Q(X) = a H X H + c E_i[H_i X H_i] (``batch_second_moment``). The factors are rotated
    to the eigenbasis of H = diag(m), where A is the entrywise product with m_k + m_l. Q is applied as
    F_i^T (F_i X F_i^T) F_i summed over examples: O(p C r^2) per product, no r^2 x r^2 matrix. Symmetric
    matrices are handled as vectors of r(r + 1)/2 entries (off-diagonal ones scaled by sqrt 2, so that the
    Euclidean inner product is the trace one and L stays symmetric).
    """

    def __init__(self, factors: torch.Tensor, a: float, c: float):
        f = factors.double()
        p, rows, r = f.shape
        mean = torch.einsum("icr,ics->rs", f, f) / p
        self.m, self.basis = torch.linalg.eigh((mean + mean.T) / 2)
        self.f = (f @ self.basis).reshape(p * rows, r)
        self.p, self.rows, self.r, self.a, self.c = p, rows, r, a, c
        self.upper = torch.triu_indices(r, r)
        off = self.upper[0] != self.upper[1]
        self.weight = torch.ones(self.upper.shape[1], dtype=torch.float64)
        self.weight[off] = math.sqrt(2.0)
        self.sum_m = self.m[:, None] + self.m[None, :]
        self.dim = self.upper.shape[1]

    def to_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """(k, r(r+1)/2) vectors -> (k, r, r) symmetric matrices."""
        out = torch.zeros(x.shape[0], self.r, self.r, dtype=torch.float64)
        out[:, self.upper[0], self.upper[1]] = x / self.weight
        return out + out.transpose(1, 2) - torch.diag_embed(out.diagonal(dim1=1, dim2=2))

    def to_vector(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.upper[0], self.upper[1]] * self.weight

    def q(self, x: torch.Tensor) -> torch.Tensor:
        """Q(X) for a batch (k, r, r) of symmetric X."""
        m = self.m
        mean_part = m[:, None] * x * m[None, :]
        fx = self.f @ x  # (k, pC, r): F_i X stacked
        blocks = fx.reshape(-1, self.p, self.rows, self.r)
        f = self.f.reshape(self.p, self.rows, self.r)
        inner = blocks @ f.transpose(1, 2)  # (k, p, C, C): F_i X F_i^T
        outer = (inner @ f).reshape(-1, self.p * self.rows, self.r)  # (k, pC, r): F_i X F_i^T F_i stacked
        spread = self.f.T @ outer / self.p  # sum_i F_i^T (F_i X F_i^T F_i) / p
        return self.a * mean_part + self.c * spread

    def generator(self, x: torch.Tensor, eta: float) -> torch.Tensor:
        return -self.sum_m * x + eta * self.q(x)

    def top_eigenvalue(self, apply: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, torch.Tensor]:
        """Largest eigenvalue and its eigenvector (as an r x r matrix) of a symmetric operator on symmetric
        matrices: dense eigh up to ``DENSE_LIMIT`` unknowns, else ARPACK's Lanczos (scipy eigsh)."""
        if self.dim <= DENSE_LIMIT:
            return self._dense_top(apply)
        from scipy.sparse.linalg import eigsh

        values, vectors = eigsh(self._linear_operator(apply), k=1, which="LA", tol=EIGSH_TOL, v0=self._start()[:, 0])
        return float(values[0]), self.to_matrix(torch.from_numpy(vectors[:, 0])[None])[0]

    def contracting_top_eigenvalue(self, eta: float) -> tuple[float, torch.Tensor]:
        """lambda_max(L) and its eigenmatrix for eta < eta_crit, where A - eta Q is positive definite.

        Lanczos on L itself needs a number of iterations that grows with lambda_max(A) / gap, hopeless when the
        kept directions span many decades (at eta << eta_crit the top eigenvalues of L cluster at -2 m_min).
        Instead LOBPCG (Knyazev 2001; scipy lobpcg) finds the smallest eigenvalue of A - eta Q preconditioned by
        A^(-1), diagonal here. Q <= A / eta_crit in the Loewner order (eta_crit's definition) gives
        (1 - eta / eta_crit) A <= A - eta Q <= A, so the preconditioned condition number is at most
        1 / (1 - eta / eta_crit), whatever the spread of the curvature.
        """
        if self.dim <= DENSE_LIMIT:
            return self._dense_top(lambda x: self.generator(x, eta))
        from scipy.sparse.linalg import LinearOperator, lobpcg

        inverse_a = (1.0 / self.sum_m[self.upper[0], self.upper[1]]).numpy()[:, None]
        precondition = LinearOperator((self.dim, self.dim), dtype="float64", matvec=lambda v: v.ravel() * inverse_a[:, 0],
                                      matmat=lambda v: v * inverse_a)
        values, vectors = lobpcg(self._linear_operator(lambda x: -self.generator(x, eta)), self._start(),
                                 M=precondition, largest=False, tol=LOBPCG_TOL * float(self.sum_m.max()),
                                 maxiter=LOBPCG_MAX_ITERATIONS)
        low = int(values.argmin())
        return -float(values[low]), self.to_matrix(torch.from_numpy(vectors[:, low].copy())[None])[0]

    def _dense_top(self, apply: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, torch.Tensor]:
        dense = self._vector_apply(apply)(torch.eye(self.dim, dtype=torch.float64))
        values, vectors = torch.linalg.eigh((dense + dense.T) / 2)
        return float(values[-1]), self.to_matrix(vectors[:, -1][None])[0]

    def _vector_apply(self, apply: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda v: self.to_vector(apply(self.to_matrix(v)))

    def _linear_operator(self, apply: Callable[[torch.Tensor], torch.Tensor]):
        from scipy.sparse.linalg import LinearOperator

        vector_apply = self._vector_apply(apply)

        def matmat(v):
            columns = torch.from_numpy(v.reshape(self.dim, -1).T.copy())
            return vector_apply(columns).T.numpy()

        return LinearOperator((self.dim, self.dim), dtype="float64", matvec=lambda v: matmat(v)[:, 0], matmat=matmat)

    def _start(self):
        """Seeded start block: the identity, which overlaps the PSD Perron eigenmatrix (Krein-Rutman), and two
        seeded random matrices (LOBPCG's block), so that runs repeat."""
        eye = self.to_vector(torch.eye(self.r, dtype=torch.float64)[None])
        noise = torch.randn(2, self.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return torch.cat([eye, noise]).T.numpy()


@dataclass
class MeanSquareResult:
    """Mean-square growth of linearised SGD on the examples of the factors (see ``mean_square_growth``)."""

    rate: float  # log rho(M) per step; < 0: E||v_t||^2 -> 0 (mean-square stable)
    generator_eigenvalue: float  # ell = lambda_max(L), rho(M) = 1 + eta ell
    eta_critical: float | None  # the eta where rate crosses 0; None: no noise and no curvature to diverge by
    subspace_dim: int
    sampler: str
    noise_scale: float  # c of ``batch_second_moment``
    learning_rate: float
    top_direction: torch.Tensor  # unit r-vector: top eigenvector of the Perron eigenmatrix X (factor coordinates)

    @property
    def eta_ratio(self) -> float | None:
        """eta / eta_crit: below 1 iff mean-square stable."""
        return None if self.eta_critical is None else self.learning_rate / self.eta_critical


def mean_square_growth(
    factors: torch.Tensor,
    *,
    learning_rate: float,
    batch_size: int,
    num_train_examples: int,
    sampler: str = "without_replacement",
) -> MeanSquareResult:
    """Growth of E||v_t||^2 for v <- (I - eta H_hat) v when the n training examples have the per-example
    matrices of the factors' examples (``gauss_newton_factors``): exact when the factors hold every training
    example, and otherwise conditional on the training set's per-example curvature being the probe's.

    The second moment X_t = E[v_t v_t^T] follows the linear, positive map M(X) = E[(I - eta H_hat) X
    (I - eta H_hat)] = X + eta L(X) (``SecondMomentGenerator``), so E||v_t||^2 = tr M^t(X_0) and the dynamics
    are mean-square stable iff rho(M) < 1. M is self-adjoint in the trace inner product and positive, so its
    spectral radius is its largest real eigenvalue, attained at a PSD X (Krein-Rutman): rho(M) = 1 + eta
    lambda_max(L), computed without the cancellation that makes 1 - O(eta lambda) indistinguishable from 1.

    The critical rate: lambda_max(-A + eta Q) is the maximum of affine functions of eta, hence convex in eta,
    negative at eta = 0 (A is positive definite in the kept subspace), so it crosses 0 once, at
    eta_crit = 1 / lambda_max(A^(-1/2) Q A^(-1/2)) (the generalised problem Q X = theta A X; A is diagonal in
    the eigenbasis of H). eta < eta_crit iff mean-square stable. Below it lambda_max(L) is found by
    ``contracting_top_eigenvalue`` (preconditioned, fast however spread the curvature), at or above it by
    ``top_eigenvalue`` (Lanczos, where eta Q dominates).
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate: must be > 0 (got {learning_rate})")
    a, c = batch_second_moment(sampler, num_train_examples, batch_size)
    op = SecondMomentGenerator(factors, a, c)
    eta = learning_rate
    theta = _critical_theta(op)
    if eta * theta < 1:
        ell, x = op.contracting_top_eigenvalue(eta)
    else:
        ell, x = op.top_eigenvalue(lambda m: op.generator(m, eta))
    values, vectors = torch.linalg.eigh(x)
    top = op.basis @ vectors[:, values.abs().argmax()]
    rate = math.log1p(eta * ell) if eta * ell > -1 else math.log(torch.finfo(torch.float64).tiny)
    return MeanSquareResult(rate, ell, 1.0 / theta if theta > 0 else None, op.r, sampler, c, eta, top)


def _critical_theta(op: SecondMomentGenerator) -> float:
    """theta = lambda_max(A^(-1/2) Q A^(-1/2)), so that eta_crit = 1 / theta (``mean_square_growth``)."""
    scale = op.sum_m.rsqrt()
    theta, _ = op.top_eigenvalue(lambda m: scale * op.q(scale * m))
    return theta


def critical_learning_rate(factors: torch.Tensor, *, batch_size: int, num_train_examples: int,
                           sampler: str = "without_replacement") -> float | None:
    """eta_crit of ``mean_square_growth`` alone (one eigenvalue problem): linearised SGD with independent batches
    of ``sampler`` is mean-square stable iff eta < eta_crit. None: no noise and no curvature to diverge by.

    Q grows with the sampler's noise c (Q = H X H + c (E_i[H_i X H_i] - H X H), the bracket a positive map), so
    eta_crit of draws with replacement (c = 1/B) is at most that of uniform B-subsets (c = (1/B)(n-B)/(n-1))."""
    a, c = batch_second_moment(sampler, num_train_examples, batch_size)
    theta = _critical_theta(SecondMomentGenerator(factors, a, c))
    return 1.0 / theta if theta > 0 else None


def unseen_example_limit(learning_rate: float, batch_size: int, num_train: int,
                         sampler: str = "without_replacement") -> float:
    """The curvature K* = 2 / (eta (a/n + c)) (= 2B/eta for uniform B-subsets and for Bernoulli batches) from
    which one training example that curves a direction no other example curves (lambda_max(H_j) = K there)
    makes linearised SGD diverge in mean square: that direction is invariant, and its second moment changes by
    the factor E(1 - eta y)^2 = 1 - 2 eta K/n + eta^2 (a K^2/n^2 + c K^2/n) per step, y its batch curvature."""
    a, c = batch_second_moment(sampler, num_train, batch_size)
    return 2.0 / (learning_rate * (a / num_train + c))


def training_set_growth_bound(
    factors: torch.Tensor,
    directions: torch.Tensor,
    *,
    learning_rate: float,
    batch_size: int,
    num_train_examples: int,
    sampler: str = "without_replacement",
) -> float:
    """A lower bound on log rho(M) of the n training examples that holds whatever the n - p examples outside
    the probe are (any PSD per-example matrices), from the p probe examples of ``factors``.

    rho(M) >= <X, M(X)> for X = u u^T, u a unit vector (M self-adjoint in the trace inner product), and
    <X, M(X)> = 1 - 2 eta E_i a_i + eta^2 (a (E_i a_i)^2 + c E_i a_i^2) with a_i = u^T H_i u over the n
    training examples. The probe gives a_i for its p examples (sums S1, S2); the unseen ones add t = their sum
    (>= 0) and at least t^2/(n - p) to the sum of squares (Cauchy-Schwarz), so the bound is the minimum over
    t >= 0 of a convex quadratic in t, in closed form. Maximised over the rows of ``directions`` (k x r, in the
    factors' coordinates).
    """
    a, c = batch_second_moment(sampler, num_train_examples, batch_size)
    f = factors.double()
    p, n, eta = f.shape[0], num_train_examples, learning_rate
    u = directions.double() / directions.double().norm(dim=1, keepdim=True)
    curv = torch.einsum("icr,kr->kic", f, u).pow(2).sum(2)  # (k, p): a_i = ||F_i u||^2
    s1, s2 = curv.sum(1), curv.pow(2).sum(1)
    # g(t) = 1 - 2 eta (s1 + t)/n + eta^2 (a (s1 + t)^2/n^2 + c (s2 + t^2/(n - p))/n)
    curvature_t = a / n**2 + (c / (n * (n - p)) if n > p else 0.0)
    if n > p and curvature_t > 0:
        slope_at_0 = -2 * eta / n + eta**2 * 2 * a * s1 / n**2
        t = (-slope_at_0 / (2 * eta**2 * curvature_t)).clamp_min(0)
    else:
        t = torch.zeros_like(s1)
    unseen_squares = t**2 / (n - p) if n > p else torch.zeros_like(t)
    g = 1 - 2 * eta * (s1 + t) / n + eta**2 * (a * (s1 + t) ** 2 / n**2 + c * (s2 + unseen_squares) / n)
    return math.log(max(float(g.max()), torch.finfo(torch.float64).tiny))


def candidate_directions(factors: torch.Tensor, top_direction: torch.Tensor) -> torch.Tensor:
    """Unit directions to try in ``training_set_growth_bound``: the top direction of the Perron eigenmatrix,
    each probe example's sharpest direction, and the eigenvectors of the probe's mean (factor coordinates)."""
    f = factors.double()
    mean = torch.einsum("icr,ics->rs", f, f) / f.shape[0]
    per_example = torch.linalg.eigh(f.transpose(1, 2) @ f)[1][:, :, -1]
    return torch.cat([top_direction[None].double(), per_example, torch.linalg.eigh(mean)[1].T])


@dataclass
class Verdict:
    verdict: str  # "stable", "unstable" or "inconclusive"
    reason: str  # one sentence
    basis: str  # see ``stability_verdict``

    @property
    def stable_sgd(self) -> bool | None:
        return {"stable": True, "unstable": False}.get(self.verdict)


DRIFT_TOL = 1e-4  # lambda_min >= -tol lambda_max is taken as no negative curvature (float32 HVP rounding)


@dataclass
class Timescales:
    """When the quadratic (Gauss-Newton) model may be trusted over the time the mean-square rate speaks of."""

    stability_steps: float  # 1 / |log growth of E||v||^2 per step|: steps for an e-fold change
    drift_steps: float | None  # 1 / (eta |lambda_min|): e-fold drift along negative curvature; None: none
    lambda_max_gap: float | None  # lambda_max(Hessian) - lambda_max(Gauss-Newton), both on the probe
    horizon_steps: float  # the steps the verdict speaks of: stability_steps, at most the steps trained


def timescales(mean_square: MeanSquareResult, lambda_max: float | None, lambda_min: float | None,
               lambda_max_ggn: float | None, steps_trained: int | None = None) -> Timescales:
    """The stability timescale, the drift timescale along negative curvature, the Hessian's excess sharpness,
    and the verdict's horizon min(stability_steps, steps_trained)."""
    rate, eta = mean_square.rate, mean_square.learning_rate
    drift = None
    if lambda_min is not None and lambda_max is not None and lambda_min < -DRIFT_TOL * lambda_max:
        drift = 1.0 / (eta * -lambda_min)
    gap = lambda_max - lambda_max_ggn if lambda_max is not None and lambda_max_ggn is not None else None
    stability_steps = math.inf if rate == 0 else 1.0 / abs(rate)
    horizon = stability_steps if not steps_trained else min(stability_steps, float(steps_trained))
    return Timescales(stability_steps, drift, gap, horizon)


def gauss_newton_verdict(mean_square: MeanSquareResult, times: Timescales, lambda_max: float | None,
                         scope: str, eta_critical_with_replacement: float | None) -> Verdict:
    """The headline: is linearised SGD on the Gauss-Newton matrices mean-square stable at eta?

    Decided where both independent samplers of B examples agree: "stable" when draws with replacement contract
    (eta < ``eta_critical_with_replacement``; then uniform B-subsets contract too, their eta_crit being at least
    as large), "unstable" when uniform B-subsets grow (eta >= ``mean_square.eta_critical``; then draws with
    replacement grow too); "inconclusive" (``sampler_dependent``) between the two critical rates. With B >= n
    every step is gradient descent on the whole training set, exact in the B-subsets' rate: pass None. The
    Trainer's reshuffled epochs are bounded by neither model: they can diverge below the subsets' eta_crit and contract
    above it, and contracted wherever draws with replacement did in every case measured
    (``benchmarks/bench_reshuffling.py``, ``docs/curvature.md``), so "stable" speaks for them too, "unstable" of
    independent batches. The band is narrow for large n / B: its two noise levels differ by (n - B) / (n - 1).

    The verdict is "inconclusive" (``quadratic_model_fails``) also where the quadratic model fails over the
    verdict's horizon, the e-fold time of the second moment ``stability_steps`` or, when shorter, the run's own
    length ``steps_trained`` (the verdict speaks of SGD continued from these weights for as long again): the
    weights drift along negative curvature within it (``drift_steps`` < ``horizon_steps``), or the rate says
    stable while eta >= 2 / lambda_max of the Hessian (its residual term makes it sharper than the Gauss-Newton
    matrix: gradient descent on it diverges). The horizon matters at small learning rates: the second moment's
    slowest mode, along the flattest kept direction, then takes far longer to settle than any run.
    ``scope``: "training set" when the factors hold every training example, else "probe" (the rate is then
    that of a training set whose per-example curvature is the probe's).
    """
    eta, ratio = mean_square.learning_rate, mean_square.eta_ratio
    where = "the training set" if scope == "training_set" else "the probe's examples"
    numbers = (f"log E||v||^2 changes by {mean_square.rate:.3g} per step"
               + (f", eta / eta_crit = {ratio:.3g}" if ratio is not None else ""))
    if times.drift_steps is not None and times.drift_steps < times.horizon_steps:
        horizon = ("the steps trained" if times.horizon_steps < times.stability_steps
                   else "the second moment settles")
        return Verdict("inconclusive", "Not at a minimum where the quadratic model holds long enough: the weights "
                       f"drift along negative curvature in {times.drift_steps:.3g} steps, before {horizon} "
                       f"({times.horizon_steps:.3g} steps; {numbers}).", "quadratic_model_fails")
    if mean_square.rate < 0 and lambda_max is not None and eta * lambda_max >= 2:
        return Verdict("inconclusive", f"The Gauss-Newton dynamics contract ({numbers}) but eta = {eta:.3g} is at "
                       f"or above 2 / lambda_max = {2 / lambda_max:.3g} of the Hessian, which is sharper than the "
                       "Gauss-Newton matrix: the quadratic model does not describe these weights.",
                       "quadratic_model_fails")
    batches = ("the whole training set in every batch (B >= n)" if eta_critical_with_replacement is None
               else "independent batches of B examples (with or without replacement)")
    if mean_square.rate >= 0:
        return Verdict("unstable", f"Linearised SGD with {batches} on the Gauss-Newton matrices of {where} grows "
                       f"in mean square: {numbers}.", "mean_square")
    if eta_critical_with_replacement is None or eta < eta_critical_with_replacement:
        return Verdict("stable", f"Linearised SGD with {batches} on the Gauss-Newton matrices of {where} contracts "
                       f"in mean square: {numbers}.", "mean_square")
    return Verdict("inconclusive", f"Linearised SGD on the Gauss-Newton matrices of {where} contracts with uniform "
                   f"batches of B distinct examples ({numbers}) but grows with B draws with replacement (eta_crit "
                   f"{eta_critical_with_replacement:.3g}); between the two the verdict depends on the sampler, and "
                   "the Trainer's reshuffled epochs can diverge there.", "sampler_dependent")


def probe_miss_fraction(num_probe: int, num_train: int, confidence: float = 0.95) -> float:
    """q = 1 - (1 - confidence)^(1/p): a group of training examples making up a fraction >= q of the training
    set has at least one member among p uniformly drawn probe examples with probability >= ``confidence``
    (it is missed with probability C(n - qn, p) / C(n, p) <= (1 - q)^p); 0 when the probe is the training set."""
    return 0.0 if num_probe >= num_train else 1.0 - (1.0 - confidence) ** (1.0 / num_probe)


def stability_verdict(
    *,
    learning_rate: float | None,
    batch_size: int | None,
    num_train_examples: int | None,
    headline: Verdict | None,
    probe_is_training_set: bool,
    training_bound: float | None = None,
    unseen_limit: float | None = None,
    miss_fraction: float | None = None,
) -> Verdict:
    """The verdict for the training set (SGD with eta, B on the n training examples): only what is shown for
    the training set itself.

    1. ``missing_inputs``: eta, B or n unknown, or eta <= 0; ``no_proof``: no Gauss-Newton rate (``headline`` None).
    2. ``not_at_minimum``: the quadratic model fails over the stability timescale (``gauss_newton_verdict``).
    3. When the probe is the whole training set: the exact mean-square rates decide (``mean_square``), or the
       sampler does (``sampler_dependent``, "inconclusive": ``gauss_newton_verdict``).
    4. Otherwise only instability can be shown: ``training_bound`` (``training_set_growth_bound``, valid whatever
       the unseen examples are) above 0 is "unstable" (``mean_square_bound``); else "inconclusive"
       (``probe_only``), with the probe's own verdict, the curvature ``unseen_limit`` of an unseen example that
       would break it, and the ``miss_fraction`` of the training set the probe may have missed.
    """
    if learning_rate is None or batch_size is None or num_train_examples is None:
        return Verdict("inconclusive", "The learning rate, batch size and training-set size are needed for a "
                       "verdict; pass learning_rate, train_batch_size and num_train_examples.", "missing_inputs")
    if learning_rate <= 0:
        return Verdict("inconclusive", f"The learning rate is {learning_rate:g}: SGD does not move, so there is no "
                       "stability to judge; pass the run's positive learning_rate.", "missing_inputs")
    if headline is None:
        return Verdict("inconclusive", "The verdict needs the mean-square rate from the per-example Gauss-Newton "
                       "matrices (the coherence measure).", "no_proof")
    if headline.basis == "quadratic_model_fails":
        return Verdict("inconclusive", headline.reason, "not_at_minimum")
    if probe_is_training_set:
        return Verdict(headline.verdict, headline.reason, headline.basis)
    if training_bound is not None and training_bound > 0:
        return Verdict("unstable", f"Whatever the training examples outside the probe are, linearised SGD on the "
                       f"training set grows in mean square by at least {training_bound:.3g} per step (a bound from "
                       "the probe's examples alone).", "mean_square_bound")
    return Verdict("inconclusive", f"The probe holds part of the training set only, so this is not shown for the "
                   f"training set: for the probe's examples, {headline.verdict}. An unseen example with curvature "
                   f"above {unseen_limit:.3g} in a direction no other example curves would make SGD diverge; "
                   f"a group of examples under {miss_fraction:.1%} of the training set can be absent from the "
                   "probe (probability >= 5%).", "probe_only")
