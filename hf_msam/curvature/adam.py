"""Adam / AdamW at the edge of stability: the preconditioned sharpness against its threshold.

Cohen et al., "Adaptive Gradient Methods at the Edge of Stability" (2022): with the preconditioner frozen,
Adam on a quadratic with Hessian H is heavy-ball momentum on P^-1 H, P = diag(sqrt(v_hat) + eps), which
is stable iff every eigenvalue a of eta P^-1 H satisfies a < (2 + 2 beta1) / (1 - beta1) (38 for beta1 =
0.9). The report gives lambda_max(P^-1 H), the threshold (2 + 2 beta1) / ((1 - beta1) eta) and their ratio
(the "edge ratio": about 1 when training sits at the adaptive edge of stability, above 1 unstable).

P^-1 H is similar to the symmetric P^-1/2 H P^-1/2, whose top eigenvalue Lanczos finds from Hessian-vector
products. v_hat = v / (1 - beta2^t) is Adam's bias-corrected second moment (``exp_avg_sq``, ``step``); with
``amsgrad`` v is its running maximum ``max_exp_avg_sq``, as in torch's update. beta2 and eps are taken per
parameter group. Adam's coupled weight decay wd (not AdamW's decoupled one) puts wd w into the gradient, so
H becomes H + diag(wd). Only ``torch.optim.Adam`` and ``AdamW`` are analysed (any kernel: for-loop, foreach,
fused); every other optimizer is refused with its reason (``NOT_ANALYSED``), since the threshold is derived
for Adam's heavy-ball step.
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
    learning_rate: float | None  # the groups' lr: the rate of the next step (None when the groups differ)
    learning_rate_peak: float | None  # the groups' initial_lr, set by an LR scheduler (None without one)
    step: int
    optimizer: str  # what was analysed: "AdamW", "Adam", with ", amsgrad" where a group uses it
    l2: torch.Tensor | None = None  # flat coupled weight decay (Adam's L2 term), added to H; None without one


def adam_stability_threshold(beta1: float, learning_rate: float) -> float:
    """(2 + 2 beta1) / ((1 - beta1) eta), Cohen et al. 2022 (38 / eta for beta1 = 0.9)."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate: the Adam threshold needs a rate > 0 (got {learning_rate}: the end of a "
                         "schedule that decays to zero?); pass the rate of the last optimizer step")
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


def _check_groups(groups: Sequence[Mapping[str, Any]]) -> None:
    """Refuse the setting of torch's Adam under which the step is not heavy-ball momentum on P^-1 H."""
    for group in groups:
        if group.get("maximize", False):
            raise ValueError("optimizer: Adam with maximize=True ascends the loss; the edge-of-stability threshold "
                             "is about descent, so there is no Adam analysis")


def _decoupled(group: Mapping[str, Any]) -> bool:
    return bool(group.get("decoupled_weight_decay", True))


def _l2(group: Mapping[str, Any]) -> float:
    """The coupled weight decay of a group: Adam (not AdamW) adds weight_decay * w to the gradient, so it
    descends L + weight_decay ||w||^2 / 2, whose Hessian is H + weight_decay I."""
    return 0.0 if _decoupled(group) else float(group.get("weight_decay", 0.0))


def _describe(groups: Sequence[Mapping[str, Any]]) -> str:
    """"AdamW" or "Adam" (torch's AdamW is Adam with ``decoupled_weight_decay``; a state saved by a torch that
    did not record it is taken as the Trainer's AdamW), with ", amsgrad" where a group uses it."""
    name = "/".join(sorted({"AdamW" if _decoupled(g) else "Adam" for g in groups}, reverse=True))
    return name + (", amsgrad" if any(g.get("amsgrad", False) for g in groups) else "")


def _preconditioner(
    states: Sequence[Mapping[str, Any] | None],
    params: Sequence[torch.Tensor],
    param_groups: Sequence[Mapping[str, Any]],
) -> AdamState:
    """P = sqrt(v / (1 - beta2^t)) + eps per coordinate, ``param_groups[i]`` the group of ``params[i]``."""
    groups = list({id(g): g for g in param_groups}.values())
    _check_groups(groups)
    beta1 = _one_value("beta1", [g["betas"][0] for g in groups])
    rates = {float(g["lr"]) for g in groups}
    peaks = {float(g["initial_lr"]) for g in groups if "initial_lr" in g}
    parts, l2, step = [], [], 0
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
        l2.append(torch.full((param.numel(),), _l2(group)))
    return AdamState(torch.cat(parts), float(beta1), rates.pop() if len(rates) == 1 else None,
                     peaks.pop() if len(peaks) == 1 else None, step, _describe(groups),
                     torch.cat(l2) if any(_l2(g) for g in groups) else None)


NOT_ANALYSED = {
    "NAdam": "NAdam takes a Nesterov step with a momentum schedule (momentum_decay), not Adam's heavy-ball step",
    "RAdam": "RAdam rescales each step by its variance rectification r_t and takes unpreconditioned momentum "
             "steps while r_t is undefined",
    "Adamax": "Adamax divides by an infinity-norm running maximum without bias correction, not sqrt(v_hat) + eps",
    "Adagrad": "Adagrad has no momentum and divides by the root of the sum of all past squared gradients",
    "RMSprop": "RMSprop has no bias correction and its own momentum (a different stability threshold)",
    "Adafactor": "Adafactor factors the second moments into row and column statistics and clips the update",
    "SGD": "SGD has no preconditioner (the SGD verdict covers plain SGD; with momentum it is indicative only)",
}


def _refusal(optimizer: Any) -> str | None:
    """Why ``optimizer`` gets no Adam analysis; None for torch's Adam and AdamW (their foreach and fused kernels
    compute the same update, so the Trainer's ``adamw_torch`` and ``adamw_torch_fused`` are both analysed)."""
    kind = type(optimizer)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        return None
    if kind.__module__.split(".")[0] == "bitsandbytes":
        return (f"{name} keeps its moments quantised (8-bit state1/state2 with block-wise scales), not "
                "exp_avg_sq; no Adam analysis")
    if isinstance(optimizer, torch.optim.Adam):
        return f"{name} subclasses torch.optim.Adam and may change its update; only Adam and AdamW are analysed"
    reason = NOT_ANALYSED.get(kind.__name__, "only torch.optim.Adam and AdamW are analysed")
    return f"{name}: {reason}; no Adam analysis"


def adam_state_from_optimizer(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> AdamState:
    """The preconditioner of a live ``torch.optim.Adam``/``AdamW`` optimizer (an accelerate wrapper is unwrapped)
    for ``params``; ``ValueError`` naming the reason for any other optimizer (``NOT_ANALYSED``)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    reason = _refusal(inner)
    if reason is not None:
        raise ValueError(f"optimizer: {reason}")
    groups = [g for g in inner.param_groups if any(p is q for p in g["params"] for q in params)]
    group_of = {id(p): g for g in groups for p in g["params"]}
    return _preconditioner([inner.state.get(p) for p in params], params, [group_of[id(p)] for p in params])


def trainer_parameter_order(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters in the order ``Trainer.create_optimizer`` hands them to the optimizer
    (weight-decay group first, then the rest), which is the order of a checkpoint's ``optimizer.pt``."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named if n in decay] + [n for n, _ in named if n not in decay]


def state_dict_refusal(state_dict: Mapping[str, Any]) -> str | None:
    """Why a saved optimizer state is not torch's Adam/AdamW, told by its keys: Adam's parameter groups alone
    hold both ``betas`` and ``amsgrad`` (NAdam adds ``momentum_decay``; RAdam and Adamax lack ``amsgrad``), and
    its per-parameter state holds ``exp_avg_sq`` (bitsandbytes keeps quantised ``state1``/``state2``)."""
    groups = state_dict.get("param_groups") or [{}]
    if "momentum_decay" in groups[0]:
        return f"NAdam's parameter groups (momentum_decay): {NOT_ANALYSED['NAdam']}"
    if "betas" not in groups[0] or "amsgrad" not in groups[0]:
        return f"not torch's Adam/AdamW (parameter group keys {sorted(k for k in groups[0] if k != 'params')})"
    states = [s for s in state_dict.get("state", {}).values() if s]
    if any("state2" in s for s in states):
        return "bitsandbytes' quantised moments (state1/state2), not exp_avg_sq"
    return None


def adam_state_from_state_dict(state_dict: Mapping[str, Any], model: torch.nn.Module) -> AdamState:
    """The preconditioner from an ``optimizer.state_dict()`` saved by the Trainer (``checkpoint-*/optimizer.pt``),
    its parameters matched to ``model`` in the Trainer's order (``trainer_parameter_order``)."""
    groups = state_dict.get("param_groups")
    reason = state_dict_refusal(state_dict)
    if reason is not None:
        raise ValueError(f"optimizer state: {reason}; pass the optimizer.pt of a checkpoint trained with Adam or AdamW")
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
    l2: torch.Tensor | None = None,
    max_iterations: int = 30,
    tol: float = 1e-3,
    seed: int = 0,
) -> LanczosResult:
    """Top eigenvalue of P^-1 (H + diag(l2)) by Lanczos on P^-1/2 (H + diag(l2)) P^-1/2 (``matvec`` is v -> H v,
    one product each; ``l2`` Adam's coupled weight decay, ``AdamState.l2``)."""
    scale = preconditioner.rsqrt()
    hessian = matvec if l2 is None else (lambda v: matvec(v) + l2 * v)
    return lanczos(lambda v: scale * hessian(scale * v), preconditioner.numel(), top_k=1,
                   max_iterations=max_iterations, tol=tol, seed=seed, device=preconditioner.device)
