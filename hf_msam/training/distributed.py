"""What each distributed backend does under mSAM, and what is refused: the one table and the collectives.

DDP is supported: the ascent pass runs on the unwrapped module (no all-reduce, per-process perturbations), and
the vmap path, which never runs the wrapper's forward, reduces by hand what the reducer would
(``docs/design.md`` section 2.4). DeepSpeed and FSDP are refused, when the arguments are built and again when the
trainer sees the accelerator, by :func:`check_backend`. The ascent norm needs no reduction: each process perturbs
with its own micro-batches' gradients (``sam_global`` all-reduces the gradient itself, before the norm).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn


@dataclass(frozen=True)
class Refused:
    """A backend SAMTrainer refuses: its ``TrainingArguments`` field, accelerate's environment flag and
    ``DistributedType``, and why."""

    field: str
    name: str
    environment: str
    distributed_type: DistributedType
    reason: str


REFUSED = (
    Refused("deepspeed", "DeepSpeed", "ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED,
            "its engine steps inside backward, which breaks the two passes of SAM"),
    Refused("fsdp", "FSDP", "ACCELERATE_USE_FSDP", DistributedType.FSDP,
            "gradient norms would need reducing across shards"),
)


def check_backend(args: Any, distributed_type: DistributedType | None = None, n_gpu: int = 1) -> None:
    """Raise, naming the field and the way out, for a backend in :data:`REFUSED` (asked for by ``args`` or the
    environment, or the accelerator's ``distributed_type``) and for ``torch.nn.DataParallel`` (``n_gpu > 1``)."""
    for refused in REFUSED:
        asked = bool(getattr(args, refused.field, None))
        asked = asked or os.environ.get(refused.environment, "false").lower() == "true"
        if asked or distributed_type == refused.distributed_type:
            raise ValueError(
                f"{refused.field}: SAMTrainer does not support {refused.name} yet ({refused.reason}). "
                f"Remove --{refused.field}, or train with DDP via accelerate launch (--multi_gpu)."
            )
    if n_gpu > 1:
        raise ValueError(
            f"SAMTrainer does not support torch.nn.DataParallel over {n_gpu} GPUs in one process: "
            "launch one process per GPU with `accelerate launch --multi_gpu` (or torchrun)."
        )


def all_reduce_mean_(tensors: list[torch.Tensor], weight: float) -> None:
    """Global SAM: replace each process's ascent gradient ``g_r`` by ``sum_r weight_r * g_r`` over processes, in one
    all-reduce (with ``weight_r = items_r / items_step`` that is the gradient of the whole mini-batch's mean loss)."""
    flat = torch._utils._flatten_dense_tensors(tensors).mul_(weight)
    torch.distributed.all_reduce(flat)
    for tensor, reduced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(reduced)


def all_reduce_gradients_mean_(params: Sequence[torch.Tensor], world: int, flag: bool = False) -> bool:
    """What the DDP reducer does at the synced backward, for the vmap path (which runs on the unwrapped module):
    ``.grad`` of every trainable parameter becomes its mean over processes, in one all-reduce. A parameter without a
    gradient here (unused by this process's batches) gets a zero one first, as the reducer gives it, so that every
    process reduces the same buffer. One more number in the buffer carries ``flag``; returns whether any process
    raised it (one host read)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flags = torch.full((1,), float(flag) * world, dtype=grads[0].dtype, device=grads[0].device)
    flat = torch._utils._flatten_dense_tensors([*grads, flags]).div_(world)
    torch.distributed.all_reduce(flat)
    reduced = torch._utils._unflatten_dense_tensors(flat, [*grads, flags])
    for grad, mean in zip(grads, reduced):
        grad.copy_(mean)
    return bool(reduced[-1].item() > 0.5)


def sync_buffers(model: nn.Module) -> None:
    """What the DDP wrapper's forward does first: broadcast process 0's buffers (when ``broadcast_buffers``)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and model._check_sync_bufs_pre_fwd():
        model._sync_buffers()
