"""The per-example losses of ``transformers`` classification/regression heads, and their Hessians in the
logits (the A_i of the Gauss-Newton split H_i ~ J_i^T A_i J_i).

The heads (``BertForSequenceClassification`` and kin) pick their loss from ``config.problem_type``,
inferring it on the first forward when unset: one label -> ``regression`` (``MSELoss`` over all
entries), integer labels -> ``single_label_classification`` (``CrossEntropyLoss``), else
``multi_label_classification`` (``BCEWithLogitsLoss``). All three are means, so the model's loss is
(1/n) sum_i l_i with the per-example l_i below.
"""

from __future__ import annotations

import torch

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def infer_problem_type(config: object, labels: torch.Tensor) -> str:
    """The head's loss, exactly as ``transformers`` chooses it."""
    problem_type = getattr(config, "problem_type", None)
    if problem_type is not None:
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(f"config.problem_type: {problem_type!r} is none of {PROBLEM_TYPES}")
        return problem_type
    num_labels = getattr(config, "num_labels", None)
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """l_i for each example (shape (n,)), so that the head's loss is their mean."""
    n = logits.shape[0]
    z = logits.reshape(n, -1).float()
    if problem_type == "single_label_classification":
        return torch.nn.functional.cross_entropy(z, labels.reshape(n).long(), reduction="none")
    y = labels.reshape(n, -1).to(z.dtype)
    if problem_type == "regression":
        return ((z - y) ** 2).mean(dim=1)
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none").mean(dim=1)


def logit_hessian(logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    """A_i = d^2 l_i / dz_i^2, shape (n, C, C).

    Cross-entropy: diag(p) - p p^T with p = softmax(z); MSE over C outputs, l = (1/C) sum_c (z_c - y_c)^2:
    (2/C) I; binary cross-entropy, l = (1/C) sum_c BCE(z_c, y_c): diag(s (1 - s)) / C with s = sigmoid(z).
    None depends on the labels.
    """
    n = logits.shape[0]
    z = logits.reshape(n, -1).double()
    c = z.shape[1]
    if problem_type == "single_label_classification":
        p = torch.softmax(z, dim=1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if problem_type == "regression":
        return (2.0 / c) * torch.eye(c, dtype=z.dtype).expand(n, c, c).clone()
    s = torch.sigmoid(z)
    return torch.diag_embed(s * (1 - s)) / c


def psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    """The PSD square root of each symmetric PSD matrix in a batch.

    Eigenvalues at or below d * eps * (largest |eigenvalue|) are rounding noise of a zero eigenvalue and
    are set to 0: their square roots (~1e-8 in float64) would otherwise show up as spurious overlap.
    """
    values, vectors = torch.linalg.eigh(a)
    cutoff = a.shape[-1] * torch.finfo(values.dtype).eps * values.abs().amax(dim=-1, keepdim=True)
    roots = torch.where(values > cutoff, values.clamp_min(0).sqrt(), torch.zeros_like(values))
    return (vectors * roots[..., None, :]) @ vectors.transpose(-1, -2)
