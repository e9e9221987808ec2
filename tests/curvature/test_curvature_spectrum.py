"""HVPs, Lanczos and Hutchinson against dense Hessians from torch.func.hessian."""

from __future__ import annotations

import math

import pytest
import torch
from builders import TinyClassifier, classifier_batches, tiny_bert, token_dataset
from references import dense_hessian

from hf_msam.curvature.operators import HessianOperator, flatten, trainable_parameters
from hf_msam.curvature.spectrum import hutchinson_trace, lanczos


def _bert_with_few_trainable(num_labels: int = 3):
    """Tiny BERT with only the pooler and the head trainable (also tests the trainable-only restriction)."""
    model = tiny_bert(num_labels)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("classifier", "bert.pooler"))
    ds = token_dataset(12, 6, num_labels)
    batches = [
        {"input_ids": torch.tensor(ds["input_ids"][i : i + 8]), "labels": torch.tensor(ds["labels"][i : i + 8])}
        for i in range(0, 12, 8)
    ]
    return model, batches


@pytest.fixture(scope="module")
def mlp_case():
    model = TinyClassifier(classes=3)
    batches = classifier_batches(classes=3)
    return model, batches, dense_hessian(model, batches)


@pytest.fixture(scope="module")
def bert_case():
    model, batches = _bert_with_few_trainable()
    return model, batches, dense_hessian(model, batches)


def test_hvp_matches_dense_and_finite_differences(mlp_case):
    model, batches, h = mlp_case
    op = HessianOperator(model, batches)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3))
    hv = op.matvec(v)
    assert torch.allclose(hv, h @ v, rtol=1e-4, atol=1e-5)
    # central difference of gradients: (g(w + eps v) - g(w - eps v)) / (2 eps), in float64
    model64 = TinyClassifier(classes=3).double()
    model64.load_state_dict(model.state_dict())
    b64 = [{"features": b["features"].double(), "labels": b["labels"]} for b in batches]
    params = trainable_parameters(model64)
    sizes = [len(b["labels"]) for b in b64]

    def grad_at(shift: torch.Tensor) -> torch.Tensor:
        offset = 0
        with torch.no_grad():
            for p in params:
                p.add_(shift[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        loss = sum(s * model64(**b).loss for s, b in zip(sizes, b64)) / sum(sizes)
        g = flatten(torch.autograd.grad(loss, params))
        offset = 0
        with torch.no_grad():
            for p in params:
                p.sub_(shift[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return g

    eps = 1e-5
    fd = (grad_at(eps * v.double()) - grad_at(-eps * v.double())) / (2 * eps)
    assert torch.allclose(hv.double(), fd, rtol=1e-4, atol=1e-5)
    assert op.num_hvps == 1


@pytest.mark.parametrize("case", ["mlp_case", "bert_case"])
def test_lanczos_top_k_matches_eigvalsh(case, request):
    model, batches, h = request.getfixturevalue(case)
    exact = torch.linalg.eigvalsh(h.double()).flip(0)
    op = HessianOperator(model, batches)
    assert op.dim == h.shape[0]
    result = lanczos(op.matvec, op.dim, top_k=3, max_iterations=min(op.dim, 80), tol=1e-5, seed=0)
    assert result.converged
    assert op.num_hvps == result.iterations
    for got, want in zip(result.eigenvalues, exact[:3].tolist()):
        assert abs(got - want) <= 1e-4 * abs(want)


def test_lanczos_residuals_are_true_residuals(mlp_case):
    model, batches, h = mlp_case
    op = HessianOperator(model, batches)
    result = lanczos(op.matvec, op.dim, top_k=2, max_iterations=6, tol=0.0, seed=1)
    assert not result.converged and result.iterations == 6
    # explicit Ritz pairs of the same Krylov space: residual ||H x - theta x|| (recomputed densely)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(op.dim, generator=g).double()
    basis = [q / q.norm()]
    for _ in range(5):
        w = h.double() @ basis[-1]
        for _ in range(2):
            for b in basis:
                w -= (b @ w) * b
        basis.append(w / w.norm())
    qm = torch.stack(basis, dim=1)
    values, vectors = torch.linalg.eigh(qm.T @ h.double() @ qm)
    for k in range(2):
        x = qm @ vectors[:, -1 - k]
        residual = float((h.double() @ x - values[-1 - k] * x).norm())
        assert result.eigenvalues[k] == pytest.approx(float(values[-1 - k]), rel=1e-4)
        assert result.residuals[k] == pytest.approx(residual, rel=1e-2, abs=1e-6)


def test_hutchinson_trace_within_three_standard_errors(bert_case):
    model, batches, h = bert_case
    op = HessianOperator(model, batches)
    result = hutchinson_trace(op.matvec, op.dim, probes=30, seed=0)
    exact = float(torch.trace(h))
    assert result.stderr is not None and result.stderr > 0
    assert abs(result.trace - exact) <= 3 * result.stderr
    assert op.num_hvps == 30
    # the standard error is that of the mean: Var(z^T H z) = 2 (||H||_F^2 - sum_i H_ii^2)
    sd = math.sqrt(2 * (float((h**2).sum()) - float((torch.diag(h) ** 2).sum())))
    assert 0.5 < result.stderr / (sd / math.sqrt(30)) < 2.0
