"""What the tests compare against, written without ``hf_msam``: the plain-loop mSAM step of docs/design.md
section 2.1 (per-tensor Python loops, fresh copies, float64 accumulation of the averaged descent gradient; slow and
obvious on purpose), the dense Hessian by ``torch.func``, and the weight comparisons.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian


def loss_of(model, batch):
    return model(**batch).loss


def reference_msam_gradient(
    model: torch.nn.Module,
    batch: dict,
    micro_batch_size: int | None,
    rho: float,
    adaptive: bool = False,
    eta: float = 0.01,
    weights: list[float] | None = None,
    loss_fn=loss_of,
    cpu_rng_state: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``sum_k (|D_k| / |D|) grad L_k(w + e_k)`` for the trainable parameters of ``model``.

    ``weights`` overrides ``|D_k| / |D|`` (token-level losses weight by supervised tokens). With ``cpu_rng_state``
    (dropout on, CPU) the CPU generator starts from that state and the descent pass of each micro-batch
    replays the state its ascent pass started from, so both passes draw the same dropout masks.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    w = [p.detach().clone() for p in params]
    n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    size = n if micro_batch_size is None else micro_batch_size
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    starts = list(range(0, n, size))
    if cpu_rng_state is not None:
        torch.set_rng_state(cpu_rng_state)
    for index, start in enumerate(starts):
        stop = min(start + size, n)
        micro = {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        state_before_ascent = torch.get_rng_state()
        loss = loss_fn(model, micro)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        if adaptive:
            t = [wi.abs() + eta for wi in w]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, grads)))
            e = [rho * ti * ti * gi / (norm + 1e-12) for ti, gi in zip(t, grads)]
        else:
            norm = torch.sqrt(sum((gi**2).sum() for gi in grads))
            e = [rho * gi / (norm + 1e-12) for gi in grads]
        with torch.no_grad():
            for p, wi, ei in zip(params, w, e):
                p.copy_(wi + ei)
        if cpu_rng_state is not None:
            torch.set_rng_state(state_before_ascent)
        descent = torch.autograd.grad(loss_fn(model, micro), params, allow_unused=True)
        share = (stop - start) / n if weights is None else weights[index]
        for acc, d in zip(total, descent):
            if d is not None:
                acc += share * d.double()
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)
    return [acc.float() for acc in total]


def reference_sgd_step(model: torch.nn.Module, gradient: list[torch.Tensor], lr: float) -> None:
    with torch.no_grad():
        for p, g in zip([p for p in model.parameters() if p.requires_grad], gradient):
            p.sub_(lr * g)


def dense_hessian(model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    """The Hessian of the example-weighted mean loss over the trainable parameters, by torch.func.hessian."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for name, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for name, p in model.named_parameters() if p.requires_grad])
    sizes = [int(b["labels"].shape[0]) for b in batches]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            count = int(torch.Size(shape).numel())
            params[name] = flat[offset : offset + count].view(shape)
            offset += count
        total = sum(s * functional_call(model, params, args=(), kwargs=b).loss for s, b in zip(sizes, batches))
        return total / sum(sizes)

    model.eval()
    return hessian(loss)(flat0).detach()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest elementwise difference of two weight dicts with the same keys, compared on the CPU (either may
    come from a GPU run)."""
    assert a.keys() == b.keys()
    return max((a[k].float().cpu() - b[k].float().cpu()).abs().max().item() for k in a)
