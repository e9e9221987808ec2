"""What each distributed backend does under mSAM, and what is refused: the checks, the collectives, the
perturbation of sharded parameters and DeepSpeed's descent backward.

DDP: the ascent pass runs on the unwrapped module (no all-reduce, per-process perturbations), and the vmap path,
which never runs the wrapper's forward, reduces by hand what the reducer would (``docs/design.md`` section 2.4).
The ascent norm needs no reduction: each process perturbs with its own micro-batches' gradients (``sam_global``
all-reduces the gradient itself, before the norm).

FSDP2 (``fully_shard``): each process holds a shard of every parameter, so one process cannot perturb the whole
weights by a gradient of its own. Micro-batch k of the step is the union of the processes' k-th micro-batches,
perturbed by its gradient: the ascent gradient is reduce-scattered (each process receives its shard of the mean),
``||g_k||`` (``||T g_k||`` for ASAM) is one all-reduce of the shards' sums of squares, and each process moves its
own shard in place by ``e_k`` (:class:`ShardedPerturbation`); the descent gradient accumulates as usual and the
shards are copied back bit for bit (``docs/design.md`` section 2.6).

DeepSpeed ZeRO-1/2 (:data:`DEEPSPEED_ZERO_STAGES`): the parameters are replicated, so the ascent is DDP's (on the
engine's module, whose post-accumulate gradient hooks ``torch.autograd.grad`` never fires), and each descent
backward runs through the engine without its step (:func:`deepspeed_backward`); the trainer steps the engine once
the weights are restored (``docs/design.md`` section 2.7).

What is refused (FSDP version 1, DeepSpeed ZeRO-3 and stage 0, and what the loop path alone does under a
backend), when the arguments are built and again when the trainer sees the accelerator: :func:`check_backend`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn

from ..update.loop import Perturbation
from ..update.rule import SAMRule


DEEPSPEED_ZERO_STAGES = (1, 2)
"""The ZeRO stages SAMTrainer trains under. Both replicate the parameters (ZeRO-1 partitions the optimizer states,
ZeRO-2 the gradients too), so each process perturbs its whole weights by its own micro-batches, as under DDP. ZeRO-3
shards the parameters as FSDP does; its way is FSDP2."""


def deepspeed_asked(args: Any, distributed_type: DistributedType | None = None) -> bool:
    """Whether DeepSpeed runs: ``args.deepspeed``, accelerate's environment (``ACCELERATE_USE_DEEPSPEED``) or the
    accelerator's ``distributed_type``."""
    return (
        bool(getattr(args, "deepspeed", None))
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        or distributed_type == DistributedType.DEEPSPEED
    )


def deepspeed_zero_stage(args: Any) -> int | None:
    """The ZeRO stage that the arguments ask for before the trainer is built: ``zero_optimization.stage`` of
    ``args.deepspeed`` (a dict, or the path of a JSON file; DeepSpeed's default 0 without it), else accelerate's
    environment (``ACCELERATE_DEEPSPEED_ZERO_STAGE``); None when neither says (the trainer checks the stage of the
    accelerator's DeepSpeed plugin again)."""
    config = getattr(args, "deepspeed", None)
    if isinstance(config, str) and os.path.isfile(config):
        with open(config, encoding="utf-8") as handle:
            config = json.load(handle)
    if isinstance(config, dict):
        return zero_stage_of(config)
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and stage is not None:
        return int(stage)
    return None


def zero_stage_of(config: dict[str, Any]) -> int:
    """``zero_optimization.stage`` of a DeepSpeed config (DeepSpeed's default 0 without it)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def deepspeed_backward(engine: Any, loss: torch.Tensor, boundary: bool) -> None:
    """One descent backward through the DeepSpeed engine, without its step: ``boundary`` tells ZeRO whether this
    backward ends the optimizer step's accumulation (the gradient reduction of ZeRO-1, the last partition update of
    ZeRO-2). ``scale_wrt_gas=False``: the descent weight ``world * items_k / items_step`` already averages over the
    step, as for the stock Trainer's loss. accelerate's ``backward`` would step the engine at the first backward of
    the step's last chunk; the trainer steps it (:meth:`DeepSpeedEngine.step`) once the weights are restored."""
    engine.set_gradient_accumulation_boundary(is_boundary=boundary)
    engine.backward(loss, scale_wrt_gas=False)


def fsdp_version(args: Any, distributed_type: DistributedType | None = None) -> int | None:
    """The FSDP version asked for: ``fsdp_config``'s ``version`` when ``args.fsdp`` is set (transformers strips the
    ``fsdp_`` prefix and defaults to 2), else accelerate's environment (``FSDP_VERSION``, default 1) when it asks
    for FSDP or the accelerator runs it; None without FSDP."""
    if getattr(args, "fsdp", None):
        config = getattr(args, "fsdp_config", None) or {}
        return int(config.get("version", config.get("fsdp_version", 2)))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or distributed_type == DistributedType.FSDP:
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def check_backend(args: Any, sam: Any, distributed_type: DistributedType | None = None, n_gpu: int = 1,
                  zero_stage: int | None = None, mixed_precision: str | None = None) -> None:
    """Raise, naming the field and the way out, for FSDP other than version 2, for what mSAM cannot do on sharded
    parameters (``sam`` the mSAM options: ``sam_global``, the vmap path), for DeepSpeed with a ZeRO stage outside
    :data:`DEEPSPEED_ZERO_STAGES` (``zero_stage``, the accelerator plugin's once the trainer is built, else read
    from ``args``), fp16 or what the loop path alone does under it, and for ``torch.nn.DataParallel``
    (``n_gpu > 1``). ``mixed_precision`` is the accelerator's (None: ``args.fp16`` says)."""
    version = fsdp_version(args, distributed_type)
    if version is not None and version != 2:
        raise ValueError(
            f"fsdp_config: SAMTrainer supports FSDP version 2 (fully_shard) only, got version {version}: set "
            "fsdp_config={'fsdp_version': 2}, or fsdp_version: 2 in the accelerate config "
            "(recipes/accelerate/fsdp2.yaml)."
        )
    if version == 2 and sam.sam_global:
        raise ValueError(
            "sam_global=True under FSDP: sharded micro-batch perturbations are already global (micro-batch k of "
            "every process is perturbed by their joint gradient). Unset sam_global and set sam_micro_batch_size "
            "to the per-process micro-batch (SAM: the per-device batch)."
        )
    backend = "FSDP" if version == 2 else "DeepSpeed" if deepspeed_asked(args, distributed_type) else None
    asked = [name for name in ("sharpness_report", "sharpness_at_eval") if getattr(args, name, False)]
    if backend is not None and asked:
        why = "and FSDP shards it" if backend == "FSDP" else "which is not tested inside DeepSpeed's engine"
        raise ValueError(
            f"{asked[0]}=True under {backend}: the curvature report differentiates the full model on one process, "
            f"{why}. Set --{asked[0]} false, train with the full weights saved (FSDP: fsdp_state_dict_type "
            "FULL_STATE_DICT, as recipes/accelerate/fsdp2.yaml), then run `hf-msam sharpness OUTPUT_DIR --data DATA "
            "--output REPORT.json` in one process (docs/curvature.md)."
        )
    if backend is not None and sam.sam_micro_batch_mode == "vmap":
        why = ("the full weights, which sharded parameters do not hold" if backend == "FSDP" else
               "the weights and reduces their gradients by hand, which would bypass DeepSpeed's engine")
        raise ValueError(
            f"sam_micro_batch_mode='vmap' under {backend}: the vmap path batches functional copies of {why}. "
            "Use sam_micro_batch_mode='loop' (or 'auto', which picks it)."
        )
    if backend == "DeepSpeed":
        stage = zero_stage if zero_stage is not None else deepspeed_zero_stage(args)
        if stage is not None and stage not in DEEPSPEED_ZERO_STAGES:
            shards = "shards the parameters, which no process can then perturb alone" if stage == 3 else "is untested"
            raise ValueError(
                f"deepspeed: SAMTrainer supports DeepSpeed ZeRO stages {list(DEEPSPEED_ZERO_STAGES)}, got stage {stage}, "
                f"which {shards}: set zero_optimization.stage to 1 or 2, or, to shard the parameters, train with "
                "FSDP2 (accelerate launch --config_file recipes/accelerate/fsdp2.yaml, or fsdp=True with "
                "fsdp_config={'fsdp_version': 2})."
            )
        fp16 = mixed_precision == "fp16" if mixed_precision is not None else bool(getattr(args, "fp16", False))
        if fp16:
            raise ValueError(
                "fp16 under DeepSpeed: DeepSpeed scales the loss inside its engine, so the ascent gradient, taken "
                "outside it, would be unscaled and could underflow. Set bf16 (or fp16.enabled false in the "
                "DeepSpeed config), or train with DDP or FSDP2, which take the ascent from the scaled loss."
            )
    if n_gpu > 1:
        raise ValueError(
            f"SAMTrainer does not support torch.nn.DataParallel over {n_gpu} GPUs in one process: "
            "launch one process per GPU with `accelerate launch --multi_gpu` (or torchrun)."
        )


def fsdp_fallback_warning(args: Any, distributed_type: DistributedType, num_processes: int) -> str | None:
    """What to tell a user who asked for FSDP (``args.fsdp`` or accelerate's environment) and whose processes run
    without it: accelerate selects FSDP on accelerators only, so on CPUs ``accelerate launch`` with an FSDP config
    runs plain data parallelism. The weights are then whole on every process and mSAM perturbs per process (the
    DDP semantics, ``docs/design.md`` section 2.3), not the union of the processes' micro-batches (section 2.6).
    None where FSDP runs, was not asked for, or one process makes the two semantics the same."""
    if num_processes < 2 or distributed_type == DistributedType.FSDP or fsdp_version(args) is None:
        return None
    return (
        f"FSDP was asked for, but accelerate runs {distributed_type.value} on these {num_processes} processes (it "
        "selects FSDP on accelerators only): the weights are not sharded, and mSAM perturbs each process's "
        "micro-batches by their own gradient (data-parallel semantics) instead of the union of the processes' "
        "micro-batches."
    )


def wrap_layers_around_input_embeddings(plugin: Any, model: nn.Module) -> None:
    """Under FSDP2 with accelerate's ``TRANSFORMER_BASED_WRAP`` and no layer classes named (as
    recipes/accelerate/fsdp2.yaml), take the classes that hold the input embeddings out of those taken from the
    model's ``_no_split_modules``.

    accelerate's ``fsdp2_prepare_model`` wraps each ``_no_split_modules`` class (BERT's: ``BertLayer`` and
    ``BertEmbeddings``), then calls ``fully_shard`` on ``get_input_embeddings()`` as a unit of its own. When an
    enclosing module was wrapped already, the embedding's weight is a DTensor by then, which ``fully_shard`` takes
    for tensor parallelism and fails on. Named here, the remaining classes are wrapped as before, the embedding
    table becomes its own unit and the rest of the enclosing module joins the root's. Layer classes the user named
    (``fsdp_transformer_layer_cls_to_wrap``) are left as they are.
    """
    from accelerate.utils.dataclasses import get_module_class_from_name
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if (getattr(plugin, "fsdp_version", 1) != 2 or plugin.auto_wrap_policy is not transformer_auto_wrap_policy
            or plugin.transformer_cls_names_to_wrap is not None):
        return
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    path = next((name for name, module in model.named_modules() if module is embeddings), None)
    if path is None:
        return
    parts = path.split(".")
    holding = {type(model.get_submodule(".".join(parts[:i]))).__name__ for i in range(len(parts) + 1)}
    names = [name for name in getattr(model, "_no_split_modules", None) or []
             if get_module_class_from_name(model, name) is not None]
    if any(name in holding for name in names):
        plugin.transformer_cls_names_to_wrap = [name for name in names if name not in holding]


def all_reduce_mean_(tensors: list[torch.Tensor], weight: float) -> None:
    """Global SAM: replace each process's ascent gradient ``g_r`` by ``sum_r weight_r * g_r`` over processes, in one
    all-reduce (with ``weight_r = items_r / items_step`` that is the gradient of the whole mini-batch's mean loss)."""
    flat = torch._utils._flatten_dense_tensors(tensors).mul_(weight)
    torch.distributed.all_reduce(flat)
    for tensor, reduced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(reduced)


def join_all_reduce_mean(params: Sequence[torch.Tensor]) -> None:
    """:func:`all_reduce_mean_` with nothing to add: a process without a micro-batch takes part in the global ascent's
    all-reduce of the others (zeros of the parameters' shapes, weight 0), so that every process meets it."""
    all_reduce_mean_([torch.zeros_like(p) for p in params], 0.0)


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


class ShardedPerturbation:
    """Per-micro-batch SAM perturbation of FSDP2-sharded parameters (DTensors), the same rule as the loop's.

    The ascent gradient is read from ``.grad`` (FSDP2 reduce-scatters it there: each process holds its shard of
    the gradient of the micro-batch's joint loss), so the accumulated descent gradient is held aside meanwhile
    (:meth:`hold_gradients`, :meth:`give_back_gradients`). The norm is global (:func:`sharded_norm`), so every
    process scales by the same factor and skips together. Each process moves its own shard in place (FSDP2
    all-gathers from its sharded storage at the next forward; swapping ``p.data`` would be ignored) and copies
    the shard it held back afterwards, bit for bit. Beyond the descent gradient, the perturbation holds the ascent
    gradient's shards (which become ``e_k`` in place) and one copy of the weights' shards.
    """

    def __init__(self, params: list[nn.Parameter], rule: SAMRule) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.rule = rule
        self._held: list[torch.Tensor | None] = []
        self._saved: list[torch.Tensor] | None = None

    def hold_gradients(self) -> None:
        """Set the accumulated ``.grad`` aside, so that the next backward leaves the ascent gradient alone there."""
        self._held = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    def give_back_gradients(self) -> None:
        for p, held in zip(self.params, self._held):
            p.grad = held
        self._held = []

    def _shards(self) -> list[torch.Tensor]:
        return [p.to_local() if hasattr(p, "to_local") else p.data for p in self.params]

    @torch.no_grad()
    def perturb(self, grad_scale: float = 1.0) -> Perturbation:
        """``w -> w + e_k`` shard by shard, for the ascent gradient now in ``.grad``."""
        shards = self._shards()
        # the ascent gradient's shards become e_k in place: give_back_gradients discards them afterwards
        grads = [
            (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad) if p.grad is not None
            else torch.zeros_like(w)
            for p, w in zip(self.params, shards)
        ]
        norm, finite = self.rule.perturb_(grads, lambda: shards, sharded_norm, grad_scale)
        if not finite:
            return Perturbation(norm / grad_scale, skipped=True)
        self._saved = [w.clone() for w in shards]
        torch._foreach_add_(shards, grads)
        return Perturbation(norm / grad_scale, skipped=False)

    @torch.no_grad()
    def restore(self) -> None:
        """``w + e_k -> w``: each shard gets back the values it held, copied (not ``w - e_k``)."""
        if self._saved is None:
            return
        torch._foreach_copy_(self._shards(), self._saved)
        self._saved = None


def sharded_norm(shards: list[torch.Tensor]) -> float:
    """``||g||`` over every process's shards: the local norm as :func:`~hf_msam.update.rule.global_norm` takes it
    (one fused kernel), squared, summed over processes by one all-reduce, and its square root."""
    norms = torch._foreach_norm(shards, 2.0)
    squares = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0).double().square()
    torch.distributed.all_reduce(squares)
    return float(squares.sqrt())


def global_counts(counts: list[int], device: torch.device) -> list[float]:
    """The supervised items of each micro-batch index summed over processes, padded to the most micro-batches any
    process has (a process with fewer runs empty passes, so that every process meets the same collectives)."""
    padded = torch.zeros(most_over_processes(len(counts), device), dtype=torch.float64, device=device)
    padded[: len(counts)] = torch.tensor(counts, dtype=torch.float64)
    torch.distributed.all_reduce(padded)
    return padded.tolist()


def most_over_processes(number: int, device: torch.device) -> int:
    """The largest of the processes' ``number`` (one all-reduce)."""
    largest = torch.tensor([number], device=device)
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    return int(largest)
