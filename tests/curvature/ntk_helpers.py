"""Shared by the coherence and Gram tests: the dense per-example Jacobian and loss Hessian built independently
with torch.func (``jacrev`` of the logits, ``hessian`` of the loss in the logits), the Gram K of one-example
batches through ``WeightedNTK`` with a chosen buffer plan."""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian, jacrev

from hf_msam.curvature.gram import GramPlan, WeightedNTK


def dense_jacobian_and_loss_hessian(model, example, loss_of_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """J (C x d, float64, over every trainable parameter) of the logits of one example, and A = the Hessian of
    ``loss_of_logits(logits, labels)`` in the logits (C x C, float64)."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    model.eval()
    inputs = {k: v for k, v in example.items() if k != "labels"}

    def logits_of(p):
        return functional_call(model, p, args=(), kwargs=inputs).logits.reshape(-1)

    jac = jacrev(logits_of)(params)
    j = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in params], dim=1).double()
    z = logits_of(params).detach().double()
    return j, hessian(lambda zz: loss_of_logits(zz, example["labels"]))(z)


def ntk_gram(model, examples, problem_type, *, memory_gb: float = 2.0, resident_examples: int | None = None,
             stream_examples: int = 8, sketch: str | int = "exact", seed: int = 0) -> torch.Tensor:
    """K of one-example batches within ``memory_gb`` of row buffers; ``resident_examples`` overrides the exact
    plan (to force recomputed rows); ``sketch`` as in ``gram.plan_gram`` (CountSketch ``seed``)."""
    ntk = WeightedNTK(model, examples, problem_type)
    plan = ntk.plan(len(examples), memory_gb, stream_examples=stream_examples, sketch=sketch)
    if resident_examples is not None and not plan.sketch_dim:
        plan = GramPlan(len(examples), ntk.rows_per_example, ntk.dim, min(resident_examples, len(examples)),
                        min(stream_examples, len(examples)))
    return ntk.compute(plan, seed=seed)
