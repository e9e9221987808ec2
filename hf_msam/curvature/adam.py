"""Adam / AdamW at the edge of stability: the preconditioned sharpness against its threshold.

Cohen et al., "Adaptive Gradient Methods at the Edge of Stability" (2022): with the preconditioner frozen,
Adam on a quadratic with Hessian H is heavy-ball momentum on P^-1 H, P = diag(sqrt(v_hat) + eps), which
is stable iff every eigenvalue a of eta P^-1 H satisfies a < (2 + 2 beta1) / (1 - beta1) (38 for beta1 =
0.9). The report gives lambda_max(P^-1 H), the threshold (2 + 2 beta1) / ((1 - beta1) eta) and their ratio
(the "edge ratio": about 1 when training sits at the adaptive edge of stability, above 1 unstable).

P^-1 H is similar to the symmetric P^-1/2 H P^-1/2, whose top eigenvalue Lanczos finds from Hessian-vector
products. v_hat = v / (1 - beta2^t) is Adam's bias-corrected second moment (``exp_avg_sq``, ``step``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .spectrum import LanczosResult, lanczos


@dataclass
class AdamState:
    """What the preconditioned sharpness needs from an Adam/AdamW optimizer."""

    preconditioner: torch.Tensor  # flat P = sqrt(v_hat) + eps over the trainable parameters, in model order
    beta1: float
    learning_rate: float
    eps: float
    step: int


def adam_stability_threshold(beta1: float, learning_rate: float) -> float:
    """(2 + 2 beta1) / ((1 - beta1) eta), Cohen et al. 2022 (38 / eta for beta1 = 0.9)."""
    return (2 + 2 * beta1) / ((1 - beta1) * learning_rate)


def _group_value(groups: Sequence[Mapping[str, Any]], key: str) -> Any:
    values = {repr(g[key]) for g in groups}
    if len(values) != 1:
        raise ValueError(f"optimizer: parameter groups disagree on {key} ({sorted(values)}); one preconditioned "
                         "sharpness needs one value")
    return groups[0][key]


def _preconditioner(
    states: Sequence[Mapping[str, Any] | None], params: Sequence[torch.Tensor], groups: Sequence[Mapping[str, Any]]
) -> AdamState:
    beta1, beta2 = _group_value(groups, "betas")
    eps = float(_group_value(groups, "eps"))
    learning_rate = float(groups[0].get("initial_lr", groups[0]["lr"]))
    parts, step = [], 0
    for index, (param, state) in enumerate(zip(params, states)):
        if not state or "exp_avg_sq" not in state:
            raise ValueError(f"optimizer: trainable parameter {index} (shape {tuple(param.shape)}) has no Adam "
                             "state (exp_avg_sq); report the Adam sharpness after at least one optimizer step")
        v = state["exp_avg_sq"]
        if v.shape != param.shape:
            raise ValueError(f"optimizer: the second moments of parameter {index} have shape {tuple(v.shape)}, "
                             f"the model's parameter {tuple(param.shape)}: the optimizer state is not this model's")
        step = int(float(state["step"]))
        v_hat = v.detach().double() / (1 - beta2**step)
        parts.append((v_hat.sqrt() + eps).reshape(-1).float())
    return AdamState(torch.cat(parts), float(beta1), learning_rate, eps, step)


def adam_state_from_optimizer(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> AdamState:
    """The preconditioner of a live Adam/AdamW optimizer (an accelerate wrapper is unwrapped) for ``params``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = [g for g in inner.param_groups if any(p is q for p in g["params"] for q in params)]
    if "betas" not in (groups[0] if groups else {}):
        raise ValueError(f"optimizer: {type(inner).__name__} is not Adam/AdamW (no betas in its parameter groups)")
    return _preconditioner([inner.state.get(p) for p in params], params, groups)


def trainer_parameter_order(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters in the order ``Trainer.create_optimizer`` hands them to the optimizer
    (weight-decay group first, then the rest), which is the order of a checkpoint's ``optimizer.pt``."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named if n in decay] + [n for n, _ in named if n not in decay]


def adam_state_from_state_dict(state_dict: Mapping[str, Any], model: torch.nn.Module) -> AdamState:
    """The preconditioner from an ``optimizer.state_dict()`` saved by the Trainer (``checkpoint-*/optimizer.pt``),
    its parameters matched to ``model`` in the Trainer's order (``trainer_parameter_order``)."""
    groups = state_dict.get("param_groups")
    if not groups or "betas" not in groups[0]:
        raise ValueError("optimizer state: no Adam/AdamW parameter groups (betas) in it; pass the optimizer.pt of "
                         "a checkpoint trained with Adam or AdamW")
    indices = [i for g in groups for i in g["params"]]
    order = trainer_parameter_order(model)
    if len(indices) != len(order):
        raise ValueError(f"optimizer state: {len(indices)} parameters, the model has {len(order)} trainable ones; "
                         "pass the optimizer.pt saved with this model")
    params = dict(model.named_parameters())
    by_name = dict(zip(order, (state_dict["state"].get(i) for i in indices)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return _preconditioner([by_name[n] for n in names], [params[n] for n in names], groups)


def preconditioned_lambda_max(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    preconditioner: torch.Tensor,
    *,
    max_iterations: int = 30,
    tol: float = 1e-3,
    seed: int = 0,
) -> LanczosResult:
    """Top eigenvalue of P^-1 H by Lanczos on P^-1/2 H P^-1/2 (``matvec`` is v -> H v, one product each)."""
    scale = preconditioner.rsqrt()
    return lanczos(lambda v: scale * matvec(scale * v), preconditioner.numel(), top_k=1,
                   max_iterations=max_iterations, tol=tol, seed=seed, device=preconditioner.device)
