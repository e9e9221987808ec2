"""The torch-only mSAM module against the plain-loop reference of docs/design.md section 2.1."""

from __future__ import annotations

import math

import pytest
import torch
from builders import image_dataset, tiny_bert, tiny_vit
from references import reference_msam_gradient

from hf_msam import MicroBatchSAM, RandomState, split_micro_batches


def _batch(n=10, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 64, (n, length), generator=g),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def _msam_gradient_with_module(model, batch, micro_batch_size, loss_fn=lambda m, b: m(**b).loss, **sam_kwargs):
    """The loop from the module docstring, returning the accumulated ``.grad``."""
    sam = MicroBatchSAM(model.parameters(), **sam_kwargs)
    model.zero_grad(set_to_none=True)
    for micro, share in split_micro_batches(batch, micro_batch_size):
        randomness = RandomState.capture()
        sam.perturb(loss_fn(model, micro))
        randomness.restore()
        (share * loss_fn(model, micro)).backward()
        sam.restore()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _images(n, seed=0):
    data = image_dataset(n, seed=seed)
    return {k: torch.tensor(v) for k, v in data[:].items()}


def _assert_matches_reference(model, batch, micro_batch_size, rho, adaptive):
    """The module's mSAM gradient equals the reference's, and differs from the plain gradient (the test has teeth)."""
    expected = reference_msam_gradient(model, batch, micro_batch_size, rho=rho, adaptive=adaptive, eta=0.05)
    got = _msam_gradient_with_module(model, batch, micro_batch_size, rho=rho, adaptive=adaptive, adaptive_eta=0.05)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    plain = reference_msam_gradient(model, batch, micro_batch_size, rho=0.0)
    assert max((a - b).abs().max().item() for a, b in zip(got, plain)) > 1e-4


@pytest.mark.parametrize(
    "micro_batch_size, adaptive",
    [(None, False), (5, False), (3, False), (2, False), (4, True), (None, True)],
    ids=["sam-m1", "m2", "uneven-3-3-3-1", "m5", "asam-uneven", "asam-m1"],
)
def test_module_matches_plain_loop_reference(micro_batch_size, adaptive):
    batch = _batch()
    model = tiny_bert(seed=1)
    _assert_matches_reference(model, batch, micro_batch_size, 0.3, adaptive)


# --- ascent gradients that share storage ----------------------------------------------
@pytest.mark.parametrize("n, micro_batch_size", [(4, 1), (7, 3)], ids=["micro-batch-1", "uneven-3-3-1"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_vit_with_one_example_per_micro_batch_matches_reference(n, micro_batch_size, adaptive):
    """ViT embeddings add cls_token and position_embeddings: for a single example autograd hands both the same
    gradient storage, so in-place arithmetic on one corrupts the other unless the gradients are made private."""
    batch = _images(n, seed=7)
    model = tiny_vit(seed=7)
    _assert_matches_reference(model, batch, micro_batch_size, 0.05, adaptive)


def test_perturbation_of_shared_gradient_storage_has_norm_rho():
    model = tiny_vit(seed=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sam = MicroBatchSAM(model.parameters(), rho=0.05)
    micro = {k: v[:1] for k, v in _images(2, seed=8).items()}
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(model(**micro).loss, sam.params)))
    expected_step = {n: 0.05 * g / math.sqrt(sum(float((h**2).sum()) for h in grads.values())) for n, g in grads.items()}
    sam.perturb(model(**micro).loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[n], expected_step[n], rtol=0, atol=1e-7)
    sam.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ascent_gradients_have_storage_of_their_own():
    """What the global-SAM all-reduce writes into in place: no two gradients (nor a gradient and a weight) share memory."""
    model = tiny_vit(seed=8)
    sam = MicroBatchSAM(model.parameters(), rho=0.05)
    grads = sam.ascent_gradients(model(**{k: v[:1] for k, v in _images(2, seed=8).items()}).loss)
    storages = [g.untyped_storage().data_ptr() for g in grads] + [p.untyped_storage().data_ptr() for p in sam.params]
    assert len(set(storages)) == len(storages)
    torch._foreach_mul_(grads, 2.0)  # in-place arithmetic on all of them is allowed


class _BiasedLinear(torch.nn.Module):
    """A linear model whose loss adds ``offset.sum()``: autograd returns the gradient of ``offset`` as an expanded
    scalar (stride 0, one element for the whole tensor), on which in-place arithmetic is refused."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.linear = torch.nn.Linear(5, 3)
        self.offset = torch.nn.Parameter(torch.randn(4, 3))

    def forward(self, features, labels):
        loss = torch.nn.functional.cross_entropy(self.linear(features), labels)
        return {"loss": loss + 0.1 * self.offset.sum()}


def test_expanded_gradient_of_a_sum_matches_reference():
    g = torch.Generator().manual_seed(9)
    batch = {"features": torch.randn(6, 5, generator=g), "labels": torch.randint(0, 3, (6,), generator=g)}
    model = _BiasedLinear()
    loss_fn = lambda m, b: m(**b)["loss"]  # noqa: E731
    assert torch.autograd.grad(loss_fn(model, batch), model.offset)[0].stride() == (0, 0)  # the case under test
    expected = reference_msam_gradient(model, batch, 4, rho=0.2, loss_fn=loss_fn)
    got = _msam_gradient_with_module(model, batch, 4, loss_fn=loss_fn, rho=0.2)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all(p.is_contiguous() for p in model.parameters())  # the weights keep their layout


# --- dropout: both passes of a micro-batch draw the same masks ------------------------
def test_random_state_replays_dropout_masks_and_ends_where_one_pass_ends(device):
    get_rng_state = torch.cuda.get_rng_state if device == "cuda" else torch.get_rng_state
    x = torch.ones(1000, device=device)
    torch.manual_seed(10)
    single_pass = torch.nn.functional.dropout(x, 0.5)
    after_single_pass = get_rng_state()
    torch.manual_seed(10)
    randomness = RandomState.capture()
    first = torch.nn.functional.dropout(x, 0.5)
    randomness.restore()
    second = torch.nn.functional.dropout(x, 0.5)
    assert torch.equal(first, second) and torch.equal(second, single_pass)
    assert torch.equal(get_rng_state(), after_single_pass)


@pytest.mark.parametrize(
    "make_model, make_batch",
    [
        (lambda: tiny_bert(seed=11, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2), lambda: _batch(seed=11)),
        (lambda: tiny_vit(seed=11, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2), lambda: _images(10, seed=11)),
    ],
    ids=["bert", "vit"],
)
def test_dropout_module_loop_matches_reference_that_replays_the_rng(make_model, make_batch):
    batch = make_batch()
    model = make_model()
    model.train()
    start = torch.get_rng_state()
    expected = reference_msam_gradient(model, batch, 3, rho=0.3, cpu_rng_state=start)
    torch.set_rng_state(start)
    got = _msam_gradient_with_module(model, batch, 3, rho=0.3)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # without the replay the descent pass sees other masks: the comparison has teeth
    torch.set_rng_state(start)
    unreplayed = reference_msam_gradient(model, batch, 3, rho=0.3)
    assert max((a - b).abs().max().item() for a, b in zip(expected, unreplayed)) > 1e-4


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
