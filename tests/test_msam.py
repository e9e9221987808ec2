"""The torch-only mSAM module against the plain-loop reference of docs/design.md section 2.1."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_bert
from msam_reference import reference_msam_gradient

from hf_msam import MicroBatchSAM, split_micro_batches


def _batch(n=10, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 64, (n, length), generator=g),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def _msam_gradient_with_module(model, batch, micro_batch_size, **sam_kwargs):
    """The loop from the module docstring, returning the accumulated ``.grad``."""
    sam = MicroBatchSAM(model.parameters(), **sam_kwargs)
    model.zero_grad(set_to_none=True)
    for micro, share in split_micro_batches(batch, micro_batch_size):
        sam.perturb(model(**micro).loss)
        (share * model(**micro).loss).backward()
        sam.restore()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "micro_batch_size, adaptive",
    [(None, False), (5, False), (3, False), (2, False), (4, True), (None, True)],
    ids=["sam-m1", "m2", "uneven-3-3-3-1", "m5", "asam-uneven", "asam-m1"],
)
def test_module_matches_plain_loop_reference(micro_batch_size, adaptive):
    batch = _batch()
    model = tiny_bert(seed=1)
    expected = reference_msam_gradient(model, batch, micro_batch_size, rho=0.3, adaptive=adaptive, eta=0.05)
    got = _msam_gradient_with_module(model, batch, micro_batch_size, rho=0.3, adaptive=adaptive, adaptive_eta=0.05)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and it differs from the plain gradient, so the comparison has teeth
    plain = reference_msam_gradient(model, batch, micro_batch_size, rho=0.0)
    assert max((a - b).abs().max().item() for a, b in zip(got, plain)) > 1e-4


def test_restore_is_bit_exact_and_grad_untouched():
    model = tiny_bert(seed=2)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # descent gradients of earlier chunks
    sam = MicroBatchSAM(model.parameters(), rho=0.5)
    storage = [p.data_ptr() for p in model.parameters()]
    for micro, _ in split_micro_batches(_batch(), 3):
        result = sam.perturb(model(**micro).loss)
        assert not result.skipped and result.grad_norm > 0
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert sam.is_perturbed
        sam.restore()
        assert not sam.is_perturbed
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert [p.data_ptr() for p in model.parameters()] == storage  # the very same tensors are back
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_perturbation_has_norm_rho_and_only_moves_trainable_tensors():
    model = tiny_bert(seed=3)
    frozen = [p for n, p in model.named_parameters() if "embeddings" in n]
    for p in frozen:
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sam = MicroBatchSAM(model.parameters(), rho=0.25)
    sam.perturb(model(**_batch()).loss)
    moved = {n: (p.detach() - before[n]) for n, p in model.named_parameters()}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    norm = math.sqrt(sum(float((d**2).sum()) for n, d in moved.items()))
    assert norm == pytest.approx(0.25, rel=1e-5)


def test_non_finite_ascent_gradient_is_skipped_and_weights_untouched():
    model = tiny_bert(seed=4)
    before = [p.detach().clone() for p in model.parameters()]
    sam = MicroBatchSAM(model.parameters(), rho=0.1)
    loss = model(**_batch()).loss * torch.tensor(float("inf"))
    result = sam.perturb(loss)
    assert result.skipped and not math.isfinite(result.grad_norm) and not sam.is_perturbed
    sam.restore()  # nothing to undo
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_fp16_loss_scale_changes_reported_norm_not_direction():
    """A GradScaler-scaled loss perturbs exactly like the unscaled one and reports the unscaled norm."""
    batch = _batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model = tiny_bert(seed=5)
    sam = MicroBatchSAM(model.parameters(), rho=0.1)
    plain = sam.perturb(model(**batch).loss)
    perturbed_plain = [p.detach().clone() for p in model.parameters()]
    sam.restore()
    scaled = sam.perturb(scaler.scale(model(**batch).loss), grad_scale=scaler.get_scale())
    assert scaled.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)
    for a, b in zip(model.parameters(), perturbed_plain):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-7)


def test_zero_rho_leaves_weights_alone():
    model = tiny_bert(seed=6)
    before = [p.detach().clone() for p in model.parameters()]
    sam = MicroBatchSAM(model.parameters(), rho=0.0)
    sam.perturb(model(**_batch()).loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf")])
def test_bad_rho_is_refused(rho):
    with pytest.raises(ValueError, match="rho"):
        MicroBatchSAM(tiny_bert().parameters(), rho=rho)


def test_no_trainable_parameters_is_refused():
    model = tiny_bert()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        MicroBatchSAM(model.parameters())


def test_split_micro_batches_slices_batch_tensors_only():
    batch = {"input_ids": torch.arange(20).view(10, 2), "labels": torch.arange(10), "scalar": torch.tensor(3.0), "x": "keep"}
    parts = list(split_micro_batches(batch, 4))
    assert [p["labels"].tolist() for p, _ in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [share for _, share in parts] == [0.4, 0.4, 0.2]
    assert all(p["scalar"] is batch["scalar"] and p["x"] == "keep" for p, _ in parts)
    assert len(list(split_micro_batches(batch, None))) == 1
    with pytest.raises(ValueError, match="micro_batch_size"):
        list(split_micro_batches(batch, 0))
