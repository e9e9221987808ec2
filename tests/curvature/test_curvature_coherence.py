"""Coherence sigma: closed-form constructions, and the NTK route against dense per-example Gauss-Newton
matrices built independently with torch.func (jacrev of the logits, hessian of the loss in the logits)."""

from __future__ import annotations

import pytest
import torch
from builders import TinyClassifier, classifier_batches, tiny_bert, token_dataset
from ntk_helpers import dense_jacobian_and_loss_hessian, ntk_gram

from hf_msam.curvature.coherence import coherence_from_blocks, coherence_from_hessians
from hf_msam.curvature.heads import infer_problem_type


def _rank_one(directions: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return scales[:, None, None] * directions[:, :, None] * directions[:, None, :]


def test_sigma_is_one_for_orthogonal_and_n_for_identical_hessians():
    n = 7
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    orthogonal = _rank_one(q[:, :n].T, torch.full((n,), 2.5, dtype=torch.float64))
    assert coherence_from_hessians(orthogonal).sigma == pytest.approx(1.0, rel=1e-12)
    identical = _rank_one(q[:, :1].T.expand(n, 10), torch.full((n,), 0.7, dtype=torch.float64))
    assert coherence_from_hessians(identical).sigma == pytest.approx(float(n), rel=1e-12)
    # the construction of docs/design.md section 3.5: k examples share a direction, the rest are orthogonal
    k = 3
    mixed = torch.stack([_rank_one(q[:, :1].T, torch.ones(1, dtype=torch.float64))[0]] * k
                        + [_rank_one(q[:, i : i + 1].T, torch.ones(1, dtype=torch.float64))[0] for i in range(1, n - k + 1)])
    assert coherence_from_hessians(mixed).sigma == pytest.approx(float(k), rel=1e-12)


def _dense_ggn_sigma(model, examples, loss_of_logits):
    """sigma and lambda_max(mean H_i) from dense H_i = J_i^T A_i J_i (A_i by torch.func.hessian)."""
    hs = []
    for ex in examples:
        j, a = dense_jacobian_and_loss_hessian(model, ex, loss_of_logits)
        hs.append(j.T @ a @ j)
    h = torch.stack(hs)
    gram = torch.einsum("iab,jba->ij", h, h)
    s = gram.clamp_min(0).sqrt()
    sigma = float(torch.linalg.eigvalsh(s)[-1]) / float(torch.linalg.eigvalsh(h)[:, -1].max())
    return sigma, float(torch.linalg.eigvalsh(h.mean(0))[-1])


def ntk_coherence(model, examples, problem_type, *, resident_examples):
    """Coherence from the weighted-NTK Gram of one-example batches (buffers for ``resident_examples``)."""
    return coherence_from_blocks(ntk_gram(model, examples, problem_type, resident_examples=resident_examples),
                                 len(examples))


def test_ntk_sigma_equals_dense_gauss_newton_cross_entropy_three_classes():
    model = TinyClassifier(classes=3, seed=2)
    batch = classifier_batches(n=9, classes=3, chunk=9)[0]
    examples = [{"features": batch["features"][i : i + 1], "labels": batch["labels"][i : i + 1]} for i in range(9)]
    sigma, lam = _dense_ggn_sigma(
        model, examples, lambda z, y: torch.nn.functional.cross_entropy(z[None], y.reshape(1))
    )
    got = ntk_coherence(model, examples, infer_problem_type(None, batch["labels"]), resident_examples=4)
    assert got.sigma == pytest.approx(sigma, rel=1e-5)
    assert got.lambda_max_ggn == pytest.approx(lam, rel=1e-5)
    assert 1.0 <= got.sigma


def test_ntk_sigma_equals_dense_gauss_newton_mse_regression():
    model = TinyClassifier(classes=1, seed=3)
    batch = classifier_batches(n=8, classes=1, chunk=8)[0]
    examples = [{"features": batch["features"][i : i + 1], "labels": batch["labels"][i : i + 1]} for i in range(8)]
    sigma, lam = _dense_ggn_sigma(model, examples, lambda z, y: ((z - y.double()) ** 2).mean())
    got = ntk_coherence(model, examples, "regression", resident_examples=3)
    assert got.sigma == pytest.approx(sigma, rel=1e-5)
    assert got.lambda_max_ggn == pytest.approx(lam, rel=1e-5)
    assert 1.0 <= got.sigma <= 8.0 + 1e-9  # rank-one H_i


def test_ntk_sigma_on_tiny_bert_with_padding_matches_dense():
    """Right-padded examples (trimmed on the NTK route) give the coherence of the unpadded ones."""
    model = tiny_bert(3, seed=4)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("classifier", "bert.pooler"))
    ds = token_dataset(5, 6, 3, seed=5)
    plain = [{"input_ids": torch.tensor([ds["input_ids"][i][: 3 + i % 3]]), "labels": torch.tensor([ds["labels"][i]])}
             for i in range(5)]
    padded = []
    for ex in plain:
        length = ex["input_ids"].shape[1]
        ids = torch.cat([ex["input_ids"], torch.zeros(1, 6 - length, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones(1, length, dtype=torch.long), torch.zeros(1, 6 - length, dtype=torch.long)], dim=1)
        padded.append({"input_ids": ids, "attention_mask": mask, "labels": ex["labels"]})
    sigma, lam = _dense_ggn_sigma(model, plain, lambda z, y: torch.nn.functional.cross_entropy(z[None], y.reshape(1)))
    got = ntk_coherence(model, padded, "single_label_classification", resident_examples=2)
    assert got.sigma == pytest.approx(sigma, rel=1e-4)
    assert got.lambda_max_ggn == pytest.approx(lam, rel=1e-4)
