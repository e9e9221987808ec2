"""Hessian coherence (Dexter et al., ICLR 2024) from per-example Gauss-Newton blocks via the empirical NTK.

For per-example Hessians H_1..H_n (``docs/design.md`` section 3.3):

    S_ij  = sqrt(Tr(H_i H_j)),      sigma = lambda_max(S) / max_i lambda_max(H_i).

With the Gauss-Newton parts H_i = J_i^T A_i J_i (J_i the C x d Jacobian of the logits, A_i the Hessian
of the loss in the logits, ``heads.logit_hessian``), put Phi_i = A_i^{1/2} J_i. Then H_i = Phi_i^T Phi_i
and, with the weighted NTK blocks K_ij = Phi_i Phi_j^T = A_i^{1/2} J_i J_j^T A_j^{1/2} (C x C),

    Tr(H_i H_j) = ||K_ij||_F^2,     lambda_max(H_i) = lambda_max(K_ii),

and the Gauss-Newton matrix of the probe set, G = (1/n) sum_i H_i = (1/n) Phi^T Phi, shares its non-zero
eigenvalues with K / n (nC x nC): lambda_max(G) = lambda_max(K) / n exactly. ``gram.WeightedNTK``
computes K exactly within a memory budget, with the r = rank(A_i) non-null rows of Phi_i per example (an
orthogonal change of basis within each block, which leaves all of the above unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .heads import psd_sqrt


@dataclass
class CoherenceResult:
    sigma: float | None  # None when every H_i is zero
    lambda_max_ggn: float  # lambda_max of (1/n) sum_i H_i
    max_example_lambda_max: float  # max_i lambda_max(H_i)
    num_examples: int
    s_matrix: torch.Tensor | None = None  # S (n x n, float64), for the training-set extrapolation
    gram: torch.Tensor | None = None  # the weighted NTK K (nC x nC, float64), for the stability simulation


def coherence_from_blocks(k: torch.Tensor, n: int) -> CoherenceResult:
    """sigma and lambda_max of the mean from the (nC x nC) Gram matrix K of the rows of Phi_i."""
    k = k.double()
    k = (k + k.T) / 2
    c = k.shape[0] // n
    blocks = k.reshape(n, c, n, c).permute(0, 2, 1, 3)  # blocks[i, j] = K_ij
    s = blocks.pow(2).sum(dim=(2, 3)).sqrt()
    diag = blocks[torch.arange(n), torch.arange(n)]
    per_example = torch.linalg.eigvalsh(diag)[:, -1].clamp_min(0)
    top = float(per_example.max())
    lambda_s = float(torch.linalg.eigvalsh(s)[-1])
    return CoherenceResult(
        sigma=lambda_s / top if top > 0 else None,
        lambda_max_ggn=float(torch.linalg.eigvalsh(k)[-1]) / n,
        max_example_lambda_max=top,
        num_examples=n,
        s_matrix=s,
        gram=k,
    )


def coherence_from_hessians(hessians: torch.Tensor) -> CoherenceResult:
    """sigma straight from dense symmetric PSD per-example Hessians, shape (n, d, d) (reference form)."""
    h = hessians.double()
    n = h.shape[0]
    roots = psd_sqrt(h)
    # ||H_i^{1/2} H_j^{1/2}||_F: unlike sqrt(Tr(H_i H_j)), no square root of a rounded near-zero trace
    s = torch.einsum("iab,jbc->ijac", roots, roots).pow(2).sum(dim=(2, 3)).sqrt()
    top = float(torch.linalg.eigvalsh(h)[:, -1].max())
    return CoherenceResult(
        sigma=float(torch.linalg.eigvalsh(s)[-1]) / top if top > 0 else None,
        lambda_max_ggn=float(torch.linalg.eigvalsh(h.mean(dim=0))[-1]),
        max_example_lambda_max=top,
        num_examples=n,
        s_matrix=s,
    )


@dataclass
class TrainCoherence:
    """sigma of the training set estimated from the probe examples, with a bootstrap interval."""

    estimate: float
    interval: tuple[float, float]
    probe_sigma: float  # sigma of the probe examples themselves
    num_probe_examples: int
    num_train_examples: int
    replicates: int
    confidence: float


def _extrapolate(ys: torch.Tensor, sizes: list[int], n: int) -> torch.Tensor:
    """Least-squares fits of lambda_max(S_m) = a + b m + c sqrt(m) over ``sizes`` (fewer terms for fewer
    sizes), one per row of ``ys`` (G x len(sizes)), evaluated at m = n."""
    m = torch.tensor(sizes, dtype=torch.float64)
    columns = [torch.ones_like(m), m, m.sqrt()][: len(sizes)]
    coef = torch.linalg.pinv(torch.stack(columns, dim=1)) @ ys.T  # (terms, G)
    at_n = torch.tensor([1.0, float(n), float(n) ** 0.5], dtype=torch.float64)[: len(sizes)]
    return at_n @ coef


def _grid(q: int) -> list[int]:
    """Nested sizes from q/4 to q, geometrically spaced (at most 8)."""
    low = max(2, q // 4) if q >= 2 else 1
    points = torch.logspace(torch.log10(torch.tensor(float(low))), torch.log10(torch.tensor(float(q))), 8)
    return sorted({int(round(float(x))) for x in points})


def _extrapolated_lambda(s: torch.Tensor, n: int, orders: torch.Tensor) -> torch.Tensor:
    """One extrapolation per group of orders: ``orders`` is (G, R, q); returns (G,) values of lambda_max(S_n)."""
    sizes = _grid(orders.shape[-1])
    g, r, q = orders.shape
    out = []
    for m in sizes:
        idx = orders[:, :, :m].reshape(g * r, m)
        sub = s[idx[:, :, None], idx[:, None, :]]
        out.append(torch.linalg.eigvalsh(sub)[:, -1].reshape(g, r).mean(dim=1))
    return _extrapolate(torch.stack(out, dim=1), sizes, n)


def train_coherence(
    s: torch.Tensor,
    max_example_lambda_max: float,
    num_train_examples: int,
    *,
    confidence: float = 0.95,
    replicates: int = 100,
    orders: int = 4,
    seed: int = 0,
) -> TrainCoherence:
    """sigma of the n training examples from the S matrix of p probe examples drawn uniformly from them.

    lambda_max(S_m) of a uniformly drawn set of m examples grows with m: the mean of the off-diagonal
    entries adds about m times the top eigenvalue of the kernel S(x, y) (Nystrom / kernel-matrix
    asymptotics), the diagonal a constant, and the fluctuations of the off-diagonal entries about sqrt(m).
    The estimator fits lambda_max(S_m) = a + b m + c sqrt(m) by least squares over nested principal
    submatrices S_m of the probe's S (m from p/4 to p, each the mean over ``orders`` random orders) and
    evaluates it at m = n; it is kept at or above lambda_max(S_p), a hard lower bound (S_p is a principal
    submatrix of S_n). sigma = that / max_i lambda_max(H_i) over the probe examples (the training set's
    maximum can only be larger, so this errs towards a larger sigma, i.e. a later Theorem-1 threshold).

    Interval: percentile interval over ``replicates`` subsamples of round(0.632 p) distinct probe examples
    (the distinct examples of a bootstrap resample; duplicates would look like perfectly aligned pairs),
    each extrapolated the same way, widened to contain the estimate, kept above the hard lower bound.
    When p >= n the probe set is the training set and the answer is exact.

    The interval is conditional on the probe representing the training set's structure: it covers about 95%
    for equal-norm directions, but not for heavy-tailed per-example norms, outliers or small aligned groups the
    probe did not sample (a group under 1 - 0.05^(1/p) of the training set is absent with probability >= 5%,
    and then nothing in S_p shows it). No verdict uses it (``stability.stability_verdict``).
    """
    s = s.double()
    p = s.shape[0]
    probe_lambda = float(torch.linalg.eigvalsh(s)[-1])
    top = float(max_example_lambda_max)
    probe_sigma = probe_lambda / top
    if p >= num_train_examples or p < 3:
        # p < 3: too few nested sizes to fit; only the hard lower bound is known (the report warns)
        return TrainCoherence(probe_sigma, (probe_sigma, probe_sigma), probe_sigma, p, num_train_examples, 0,
                              confidence)
    g = torch.Generator().manual_seed(seed)
    point_orders = torch.stack([torch.randperm(p, generator=g) for _ in range(orders)])[None]
    estimate = max(float(_extrapolated_lambda(s, num_train_examples, point_orders)[0]), probe_lambda)
    q = max(3, round(0.632 * p))
    per_replicate = max(1, orders // 2)
    subsets = torch.stack([torch.randperm(p, generator=g)[:q] for _ in range(replicates)])
    shuffles = torch.stack([torch.stack([torch.randperm(q, generator=g) for _ in range(per_replicate)])
                            for _ in range(replicates)])
    boot = _extrapolated_lambda(s, num_train_examples, torch.gather(subsets[:, None, :].expand(-1, per_replicate, -1),
                                                                    2, shuffles))
    alpha = (1 - confidence) / 2
    low, high = (float(x) for x in torch.quantile(boot, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)))
    low = max(min(low, estimate), probe_lambda)
    high = max(high, estimate)
    return TrainCoherence(estimate / top, (low / top, high / top), probe_sigma, p, num_train_examples, replicates,
                          confidence)
