"""Adam / AdamW at the edge of stability: the preconditioned sharpness against its threshold.

Cohen et al., "Adaptive Gradient Methods at the Edge of Stability" (2022): with the preconditioner frozen,
Adam on a quadratic with Hessian H is heavy-ball momentum on P^-1 H, P = diag(sqrt(v_hat) + eps), which
is stable iff every eigenvalue a of eta P^-1 H satisfies a < (2 + 2 beta1) / (1 - beta1) (38 for beta1 =
0.9). The report gives lambda_max(P^-1 H), the threshold (2 + 2 beta1) / ((1 - beta1) eta) and their ratio
(the "edge ratio": about 1 when training sits at the adaptive edge of stability, above 1 unstable).

P^-1 H is similar to the symmetric P^-1/2 H P^-1/2, whose top eigenvalue Lanczos finds from Hessian-vector
products. v_hat = v / (1 - beta2^t) is Adam's bias-corrected second moment (``exp_avg_sq``, ``step``); with
``amsgrad`` v is its running maximum ``max_exp_avg_sq``, as in torch's update. beta2 and eps are taken per
parameter group.
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
    step: int


def adam_stability_threshold(beta1: float, learning_rate: float) -> float:
    """(2 + 2 beta1) / ((1 - beta1) eta), Cohen et al. 2022 (38 / eta for beta1 = 0.9)."""
    return (2 + 2 * beta1) / ((1 - beta1) * learning_rate)


def _one_value(name: str, values: Sequence[Any]) -> Any:
    """The value every parameter group shares; a clear error when they differ."""
    if len({repr(v) for v in values}) != 1:
        raise ValueError(f"optimizer: parameter groups disagree on {name} ({sorted({repr(v) for v in values})}); "
                         "one preconditioned sharpness threshold needs one value")
    return values[0]


def _second_moment_key(group: Mapping[str, Any]) -> str:
    """The state entry whose v torch's Adam/AdamW step divides by (``torch/optim/adam.py``: denom =
    sqrt(v / (1 - beta2^t)) + eps): ``max_exp_avg_sq``, the running maximum of v, with ``amsgrad``, else
    ``exp_avg_sq``."""
    return "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"


def _preconditioner(
    states: Sequence[Mapping[str, Any] | None],
    params: Sequence[torch.Tensor],
    param_groups: Sequence[Mapping[str, Any]],
) -> AdamState:
    """P = sqrt(v / (1 - beta2^t)) + eps per coordinate, ``param_groups[i]`` the group of ``params[i]``."""
    groups = list({id(g): g for g in param_groups}.values())
    beta1 = _one_value("beta1", [g["betas"][0] for g in groups])
    learning_rate = float(groups[0].get("initial_lr", groups[0]["lr"]))
    parts, step = [], 0
    for index, (param, state, group) in enumerate(zip(params, states, param_groups)):
        key = _second_moment_key(group)
        if not state or key not in state:
            raise ValueError(f"optimizer: trainable parameter {index} (shape {tuple(param.shape)}) has no Adam "
                             f"state ({key}); report the Adam sharpness after at least one optimizer step")
        v = state[key]
        if v.shape != param.shape:
            raise ValueError(f"optimizer: the second moments of parameter {index} have shape {tuple(v.shape)}, "
                             f"the model's parameter {tuple(param.shape)}: the optimizer state is not this model's")
        beta2, eps = float(group["betas"][1]), float(group["eps"])
        step = int(float(state["step"]))
        v_hat = v.detach().double() / (1 - beta2**step)
        parts.append((v_hat.sqrt() + eps).reshape(-1).float())
    return AdamState(torch.cat(parts), float(beta1), learning_rate, step)


def adam_state_from_optimizer(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> AdamState:
    """The preconditioner of a live Adam/AdamW optimizer (an accelerate wrapper is unwrapped) for ``params``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = [g for g in inner.param_groups if any(p is q for p in g["params"] for q in params)]
    if "betas" not in (groups[0] if groups else {}):
        raise ValueError(f"optimizer: {type(inner).__name__} is not Adam/AdamW (no betas in its parameter groups)")
    group_of = {id(p): g for g in groups for p in g["params"]}
    return _preconditioner([inner.state.get(p) for p in params], params, [group_of[id(p)] for p in params])


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
    group_of = dict(zip(order, (g for g in groups for _ in g["params"])))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return _preconditioner([by_name[n] for n in names], [params[n] for n in names], [group_of[n] for n in names])


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
