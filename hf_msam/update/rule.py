"""The SAM/ASAM perturbation rule, the one place both engines (:mod:`.loop`, :mod:`.vmap`) take it from.

For the ascent gradient ``g_k`` of micro-batch ``k`` and the weights ``w``::

    e_k = rho * T^2 g_k / (||T g_k|| + EPS * grad_scale)

with ``T = 1`` for SAM (Foret et al., 2021) and ``T = |w| + eta`` elementwise for ASAM (Kwon et al., 2021);
mSAM (Behdin et al., 2023) takes one ``e_k`` per micro-batch. ``||.||`` runs over every trainable tensor
together. ``grad_scale`` is the factor the gradients carry (the fp16 loss scale): the direction of ``e_k`` does
not depend on it, so only the guard ``EPS`` is scaled with it. A non-finite norm (an fp16 overflow, a bad batch)
means no perturbation: ``e_k = 0``. ASAM's ``T`` applies to every trainable tensor, biases and LayerNorm weights
included, as davda54/sam and pytorch-optimizer do (the ASAM authors' code applies it to weight matrices only). See ``docs/design.md`` section 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

EPS = 1e-12
"""The constant in the denominator of the perturbation, as in Foret et al. (2021)."""


@dataclass(frozen=True)
class SAMRule:
    """``rho``, and ASAM's ``T = |w| + eta`` when ``adaptive``: what the perturbation ``e_k`` depends on."""

    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.01

    def __post_init__(self) -> None:
        if not (isinstance(self.rho, (int, float)) and math.isfinite(self.rho) and self.rho >= 0):
            raise ValueError(f"rho must be a finite number >= 0, got {self.rho!r}.")
        if self.eta < 0 or not math.isfinite(self.eta):
            raise ValueError(f"adaptive_eta must be a finite number >= 0, got {self.eta!r}.")
        object.__setattr__(self, "rho", float(self.rho))
        object.__setattr__(self, "eta", float(self.eta))

    def perturb_(
        self,
        grads: list[torch.Tensor],
        weights: Callable[[], Sequence[torch.Tensor]],
        norm: Callable[[list[torch.Tensor]], float | torch.Tensor],
        grad_scale: float = 1.0,
        spread: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
    ):
        """``g_k -> e_k`` in place in ``grads``; returns ``(||T g_k||, finite)``.

        Args:
            grads: the ascent gradients, buffers the rule may overwrite.
            weights: gives ``w`` in the layout of ``grads`` (broadcastable to it); called for ASAM only.
            norm: ``||.||`` of each micro-batch over ``grads``: a Python float for one micro-batch (the loop, which
                needs it on the host anyway), or a ``[m]`` tensor for stacked micro-batches (vmap, no host sync).
            spread: for stacked micro-batches, ``[m]`` values -> one broadcastable tensor per entry of ``grads``.
                None: one micro-batch; a non-finite norm then leaves ``grads`` unfinished and returns
                ``finite=False`` (the caller skips), else ``grads`` hold ``e_k``.
        """
        scales = None
        if self.adaptive:
            scales = torch._foreach_abs(list(weights()))
            torch._foreach_add_(scales, self.eta)  # T = |w| + eta
            torch._foreach_mul_(grads, scales)  # T g_k
        norms = norm(grads)
        if spread is None:
            if not math.isfinite(norms):
                return norms, False
            if scales is not None:
                torch._foreach_mul_(grads, scales)  # T^2 g_k
            torch._foreach_mul_(grads, self.rho / (norms + EPS * grad_scale))
            return norms, True
        finite = torch.isfinite(norms)
        factors = spread(torch.where(finite, self.rho / (norms + EPS * grad_scale), torch.zeros_like(norms)))
        skipped = spread(~finite)
        for i, g in enumerate(grads):
            if scales is not None:
                g.mul_(scales[i])  # T^2 g_k
            g.mul_(factors[i].to(g.dtype))
            g.masked_fill_(skipped[i], 0.0)  # inf * 0 is nan: clear skipped micro-batches explicitly
        return norms, finite


class FollowsRule:
    """``rho``, ``adaptive`` and ``adaptive_eta`` of an engine, read from its ``rule``."""

    rule: SAMRule

    @property
    def rho(self) -> float:
        return self.rule.rho

    @property
    def adaptive(self) -> bool:
        return self.rule.adaptive

    @property
    def adaptive_eta(self) -> float:
        return self.rule.eta


def global_norm(tensors: list[torch.Tensor]) -> float:
    """``||concat(tensors)||_2`` as a Python float (one device sync: the finiteness check needs it)."""
    norms = torch._foreach_norm(tensors, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0).item()


def row_norms(rows: Sequence[torch.Tensor], extra: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``||.||`` of each row ``k`` over every tensor ``[m, n]`` of ``rows`` and every ``[m]`` norm of ``extra``,
    ``[m]`` in float32, accumulated in float32 or wider."""
    pieces = [torch.linalg.vector_norm(g, dim=1, dtype=torch.promote_types(g.dtype, torch.float32)).float() for g in rows]
    return torch.linalg.vector_norm(torch.stack([*pieces, *extra]), dim=0)
