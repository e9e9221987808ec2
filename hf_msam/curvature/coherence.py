"""Hessian coherence (Dexter et al., ICLR 2024) from per-example Gauss-Newton blocks via the empirical NTK.

For per-example Hessians H_1..H_n (``docs/design.md`` section 3.3):

    S_ij  = sqrt(Tr(H_i H_j)),      sigma = lambda_max(S) / max_i lambda_max(H_i).

With the Gauss-Newton parts H_i = J_i^T A_i J_i (J_i the C x d Jacobian of the logits, A_i the Hessian
of the loss in the logits, ``heads.logit_hessian``), put Phi_i = A_i^{1/2} J_i. Then H_i = Phi_i^T Phi_i
and, with the weighted NTK blocks K_ij = Phi_i Phi_j^T = A_i^{1/2} J_i J_j^T A_j^{1/2} (C x C),

    Tr(H_i H_j) = ||K_ij||_F^2,     lambda_max(H_i) = lambda_max(K_ii),

and the Gauss-Newton matrix of the probe set, G = (1/n) sum_i H_i = (1/n) Phi^T Phi, shares its non-zero
eigenvalues with K / n (nC x nC): lambda_max(G) = lambda_max(K) / n exactly. ``gram.weighted_ntk_gram``
computes K exactly within a memory budget, with the r = rank(A_i) non-null rows of Phi_i per example (an
orthogonal change of basis within each block, which leaves all of the above unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .gram import weighted_ntk_gram
from .heads import psd_sqrt
from .operators import Batch


@dataclass
class CoherenceResult:
    sigma: float | None  # None when every H_i is zero
    lambda_max_ggn: float  # lambda_max of (1/n) sum_i H_i
    max_example_lambda_max: float  # max_i lambda_max(H_i)
    num_examples: int


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
    )


def ntk_coherence(
    model: torch.nn.Module,
    examples: Sequence[Batch],
    problem_type: str,
    *,
    memory_gb: float = 2.0,
    resident_examples: int | None = None,
) -> CoherenceResult:
    """``coherence_from_blocks`` of the weighted empirical NTK of one-example batches (``gram``)."""
    k = weighted_ntk_gram(model, examples, problem_type, memory_gb=memory_gb, resident_examples=resident_examples)
    return coherence_from_blocks(k, len(examples))
