"""The SAM/ASAM rule exists once (``hf_msam.update.rule``): both engines take their perturbation from it, and it
is the dense formula e = rho * T^2 g / (||T g|| + EPS), T = |w| + eta (ASAM) or 1 (SAM)."""

from __future__ import annotations

import pytest
import torch

import hf_msam.update.rule as rule_module
from hf_msam.update.loop import MicroBatchSAM
from hf_msam.update.rule import EPS, SAMRule, global_norm, row_norms
from hf_msam.update.vmap import VectorizedMicroBatchSAM, stack_micro_batches


def reference_perturbation(grads, weights, rho, adaptive, eta):
    """The dense formula on one micro-batch, written out plainly."""
    t = [w.abs() + eta if adaptive else torch.ones_like(w) for w in weights]
    norm = torch.cat([(ti * g).flatten() for ti, g in zip(t, grads)]).norm()
    return [rho * ti * ti * g / (norm + EPS) for ti, g in zip(t, grads)]


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_the_rule_is_the_dense_formula_for_one_and_for_stacked_micro_batches(adaptive):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(3, 4, generator=g), torch.randn(5, generator=g)] for _ in range(3)]
    rule = SAMRule(0.3, adaptive, 0.1)
    expected = [reference_perturbation(gk, weights, 0.3, adaptive, 0.1) for gk in grads]

    for k in range(3):  # one micro-batch: the loop's call
        e = [x.clone() for x in grads[k]]
        _, finite = rule.perturb_(e, lambda: weights, global_norm)
        assert finite
        for a, b in zip(e, expected[k]):
            torch.testing.assert_close(a, b)

    # Stacked rows [m, n] with a non-finite micro-batch: the vmap path's call; that row gets e_k = 0.
    rows = [torch.stack([torch.cat([x.flatten() for x in gk]) for gk in grads])]
    rows[0][1, 0] = float("inf")
    flat_w = [torch.cat([w.flatten() for w in weights]).unsqueeze(0)]
    norms, finite = rule.perturb_(rows, lambda: flat_w, row_norms, spread=lambda v: [v.unsqueeze(1)])
    assert finite.tolist() == [True, False, True]
    assert torch.equal(rows[0][1], torch.zeros_like(rows[0][1]))
    for k in (0, 2):
        torch.testing.assert_close(rows[0][k], torch.cat([x.flatten() for x in expected[k]]))


class _Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, labels):
        return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}


def _loop_gradient(model, micro_batches, weights, rho, adaptive):
    sam = MicroBatchSAM(model.parameters(), rho=rho, adaptive=adaptive)
    for mb, w in zip(micro_batches, weights):
        sam.perturb(model(**mb)["loss"])
        (w * model(**mb)["loss"]).backward()
        sam.restore()
    return [p.grad.clone() for p in model.parameters()]


def _vmap_gradient(model, micro_batches, weights, rho, adaptive):
    sam = VectorizedMicroBatchSAM(model, rho=rho, adaptive=adaptive)
    sam.step(stack_micro_batches(micro_batches), torch.tensor(weights))
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("engine", [_loop_gradient, _vmap_gradient], ids=["loop", "vmap"])
def test_both_engines_perturb_by_the_rule(monkeypatch, engine, adaptive):
    g = torch.Generator().manual_seed(1)
    micro_batches = [{"x": torch.randn(4, 4, generator=g), "labels": torch.randn(4, generator=g)} for _ in range(2)]
    weights = [0.5, 0.5]

    def plain_gradient():
        model = _Regressor()
        for mb, w in zip(micro_batches, weights):
            (w * model(**mb)["loss"]).backward()
        return [p.grad.clone() for p in model.parameters()]

    with_rule = engine(_Regressor(), micro_batches, weights, 0.5, adaptive)
    assert max((a - b).abs().max().item() for a, b in zip(with_rule, plain_gradient())) > 1e-4

    calls = []
    original = SAMRule.perturb_

    def spy(self, grads, *args, **kwargs):  # the rule, then no perturbation at all: e_k = 0
        calls.append(self)
        result = original(self, grads, *args, **kwargs)
        for e in grads:
            e.zero_()
        return result

    monkeypatch.setattr(rule_module.SAMRule, "perturb_", spy)
    without = engine(_Regressor(), micro_batches, weights, 0.5, adaptive)
    assert calls and all(rule.adaptive == adaptive and rule.rho == 0.5 for rule in calls)
    for a, b in zip(without, plain_gradient()):
        torch.testing.assert_close(a, b)
