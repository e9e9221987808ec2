"""Top eigenvalues (Lanczos) and trace (Hutchinson) of a symmetric operator given as a flat matvec."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LanczosResult:
    """Ritz values (descending), their residuals ||H x - theta x|| and the convergence history."""

    eigenvalues: list[float]
    residuals: list[float]
    iterations: int
    converged: bool
    history: list[float] = field(default_factory=list)  # top Ritz value after each iteration (one HVP each)
    smallest: float | None = None  # smallest Ritz value: a Rayleigh quotient, so lambda_min(H) <= smallest


def lanczos(
    matvec: Matvec,
    dim: int,
    *,
    top_k: int = 1,
    max_iterations: int = 30,
    tol: float = 1e-4,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LanczosResult:
    """The ``top_k`` largest (algebraic) eigenvalues of a symmetric operator by Lanczos iteration.

    Lanczos (1950) with full reorthogonalisation (classical Gram-Schmidt applied twice, Paige's remedy
    for the loss of orthogonality; Golub & Van Loan, Matrix Computations, 4th ed., section 10.3). After
    j steps, A Q_j = Q_j T_j + beta_j q_{j+1} e_j^T, so a Ritz pair (theta, x = Q_j y) of the tridiagonal
    T_j has residual ||A x - theta x|| = |beta_j| |y_j| (ibid., 10.1.4) at no extra product. Stops when
    every one of the ``top_k`` residuals is at most ``tol * max(|theta_1|, tiny)``, when the Krylov space
    is exhausted, or after ``max_iterations`` products. One product with ``matvec`` per iteration.
    """
    if dim < 1:
        raise ValueError("dim: the operator has no dimensions")
    max_iterations = max(1, min(max_iterations, dim))
    top_k = max(1, min(top_k, max_iterations))
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(dim, generator=g, dtype=torch.float32).to(device)
    q /= q.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    theta = torch.zeros(1, dtype=torch.float64)
    values = theta
    residual = torch.zeros(1, dtype=torch.float64)
    converged = False
    for j in range(max_iterations):
        w = matvec(basis[j]).to(torch.float32)
        alphas.append(float(torch.dot(w.double(), basis[j].double())))
        for _ in range(2):
            for b in basis:
                w -= torch.dot(b, w) * b
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(t)
        order = torch.argsort(values, descending=True)[:top_k]
        theta, y_last = values[order], vectors[-1, order]
        residual = (beta * y_last).abs()
        history.append(float(theta[0]))
        scale = max(float(theta.abs().max()), torch.finfo(torch.float32).tiny)
        exhausted = beta <= 1e-10 * scale or j + 1 == dim
        if (len(alphas) >= top_k and bool((residual <= tol * scale).all())) or exhausted:
            converged = True
            break
        betas.append(beta)
        basis.append(w / beta)
    return LanczosResult(
        eigenvalues=[float(x) for x in theta],
        residuals=[float(x) for x in residual],
        iterations=len(alphas),
        converged=converged,
        history=history,
        smallest=float(values.min()),
    )


@dataclass
class TraceResult:
    trace: float
    stderr: float | None  # None with a single probe
    samples: list[float]


def hutchinson_trace(
    matvec: Matvec, dim: int, *, probes: int = 20, seed: int = 0, device: torch.device | str = "cpu"
) -> TraceResult:
    """Tr(A) ~ (1/k) sum_j z_j^T A z_j with Rademacher z_j (Hutchinson 1990), and its standard error.

    Each sample is unbiased, E[z^T A z] = Tr(A); the standard error is the sample standard deviation
    over sqrt(k) (Var z^T A z = 2 (||A||_F^2 - sum_i A_ii^2) for Rademacher probes). One product per probe.
    """
    if probes < 1:
        raise ValueError("trace_probes: need at least one probe")
    g = torch.Generator(device="cpu").manual_seed(seed)
    samples = []
    for _ in range(probes):
        z = (torch.randint(0, 2, (dim,), generator=g) * 2 - 1).to(device=device, dtype=torch.float32)
        samples.append(float(torch.dot(matvec(z).double(), z.double())))
    mean = sum(samples) / probes
    if probes > 1:
        var = sum((s - mean) ** 2 for s in samples) / (probes - 1)
        stderr = math.sqrt(var / probes)
    else:
        stderr = None
    return TraceResult(trace=mean, stderr=stderr, samples=samples)
