"""m-sharpness: the quantity mSAM minimises (``docs/design.md`` sections 2 and 3.2; Foret et al. 2021, section 4.1;
Andriushchenko & Flammarion 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .operators import Batch, _grads, batch_size, curvature_mode, model_device, output_field, to_device, trainable_parameters


def m_sharpness(model: torch.nn.Module, micro_batches: Sequence[Batch], rho: float) -> float:
    """sum_k (|D_k| / |D|) [L_k(w + rho g_k / ||g_k||) - L_k(w)], g_k = grad L_k(w).

    The weights are the micro-batch shares, so equal micro-batches give the plain mean over k. The SAM
    ascent step of each micro-batch is taken over the trainable parameters only, and the weights are
    restored bit for bit (``copy_``) after each micro-batch. A zero gradient gives a zero step.
    """
    if not micro_batches:
        raise ValueError("m_sharpness: no micro-batches")
    params = trainable_parameters(model)
    sizes = [batch_size(b) for b in micro_batches]
    total = float(sum(sizes))
    result = 0.0
    with curvature_mode(model):
        device = model_device(model)
        saved = [p.detach().clone() for p in params]
        try:
            for size, batch in zip(sizes, micro_batches):
                batch = to_device(batch, device)
                loss = output_field(model(**batch), "loss")
                grads = _grads(loss, params)
                norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
                scale = rho / float(norm) if float(norm) > 0 else 0.0
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.add_(g, alpha=scale)
                    perturbed = output_field(model(**batch), "loss")
                    for p, s in zip(params, saved):
                        p.copy_(s)
                result += (size / total) * (float(perturbed) - float(loss.detach()))
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
    return result
