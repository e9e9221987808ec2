"""``SAMTrainer``: mSAM inside ``transformers.Trainer`` by overriding ``training_step`` only.

The Trainer keeps the *base* optimizer (``args.optim`` or the one passed in) and its own loop: gradient
accumulation, clipping, ``optimizer.step()``, the scheduler and ``zero_grad``. Each call of
``training_step`` receives one per-device chunk of the step's mini-batch; it cuts the chunk into
micro-batches and, for each one, perturbs the weights along its own ascent gradient, back-propagates the
descent loss at the perturbed point into ``.grad`` and restores the weights exactly (``hf_msam.update.loop``).

How the traps of the Trainer are handled (``docs/design.md`` section 2.3):

* ``.grad`` holds the descent gradients of earlier chunks: ascent gradients come from
  ``torch.autograd.grad`` and never touch it.
* DDP: the ascent pass runs on the unwrapped module, so it never reaches the reducer (no all-reduce,
  per-device perturbations), and every descent backward but the last of a chunk runs under ``no_sync``. While the
  vmap path is in use, every chunk reduces by hand instead, also those that run with the loop (``docs/design.md`` 2.4).
* DeepSpeed ZeRO-1/2 (parameters replicated): the ascent as under DDP; every descent backward runs through the
  engine without its step, the accumulation boundary set on the last of the step's last chunk only, and the engine
  steps once, after the last restore (``docs/design.md`` 2.7). The loop path only.
* Loss scale: each micro-batch's loss is the model's own mean over its supervised items (labels that are
  not -100); it is weighted by ``world_size * items_k / items_step``, with ``items_step`` counted over the
  whole optimizer step on all processes. That is ``sum_k |D_k| / |D| d_k`` for every head, including the
  BERT-family heads that ignore ``num_items_in_batch`` (transformers#47688), uneven last batches included.
* fp16: ascent gradients are taken from the scaled loss (the direction is scale-invariant) and checked
  for inf/NaN; ``scaler.unscale_`` is left to the loop. A non-finite ascent skips that perturbation.
* BatchNorm running statistics are updated by the ascent pass only; the descent pass leaves them as found.
* Dropout: the descent pass of a micro-batch replays the random state of its ascent pass (CPU and the current
  accelerator, ``hf_msam.update.loop.RandomState``), so both see the same masks and the generators end where the
  stock step's single pass would leave them; with a tiny ``rho`` and one micro-batch per chunk the step is the
  stock step, dropout on.
* Embedding tables (``sam_sparse_embeddings``, on by default): both passes run with the trainable ``nn.Embedding``
  modules set to ``sparse=True``, so the ascent gradient of a table holds only the rows the micro-batch looks up,
  those rows alone are perturbed (in place) and restored, and the descent rows are added into the table's dense
  ``.grad`` in place (one process; under DDP the descent stays dense for the reducer). A table tied to an LM
  head gets a dense gradient and the dense treatment; the update is the same either way. A micro-batch of ``b``
  sequences of length ``L`` reaches at most ``b * L`` rows, so this removes most of the per-micro-batch
  parameter-sized work for a model whose word embedding holds much of its parameters. The vmap path treats the
  model's input table by rows too (``hf_msam.update.vmap.InputTableRows``), so the table gets no copy per
  micro-batch.
* A chunk with nothing supervised (all labels -100) has no micro-batch, but still runs the synced backward (of
  zero, like the stock step) and, under ``sam_global``, the ascent all-reduce: every process takes part in the
  same collectives in every step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers import DataCollatorWithFlattening, GenerationMixin, Trainer, TrainingArguments
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_utils import unwrap_peft_model

from . import path
from .arguments import SAMArguments, sam_options_of, sam_rule_of, validate_sam_arguments
from .distributed import (
    ShardedPerturbation,
    all_reduce_gradients_mean_,
    all_reduce_mean_,
    check_backend,
    deepspeed_backward,
    fsdp_fallback_warning,
    global_counts,
    join_all_reduce_mean,
    most_over_processes,
    sync_buffers,
    wrap_layers_around_input_embeddings,
    zero_stage_of,
)
from ..update.loop import (
    MicroBatchSAM,
    Perturbation,
    RandomState,
    batch_size_of,
    sparse_embedding_gradients,
    split_micro_batches,
    trainable_embeddings,
)
from ..curvature.hook import SharpnessReportMixin
from ..update.vmap import VectorizedMicroBatchSAM, stack_micro_batches, unsupported_reason

logger = logging.getLogger(__name__)

# The tags SAMTrainer puts on the model (``model.add_model_tags``), so that every push of it carries them.
MODEL_TAGS = ["msam", "sam", "sharpness-aware-minimization", "hf_msam"]

class SAMTrainer(SharpnessReportMixin, Trainer):
    """A ``transformers.Trainer`` that trains with micro-batch sharpness-aware minimization (mSAM).

    Takes the same arguments as ``Trainer``. ``args`` is kept as passed (``trainer.args is args``): a
    :class:`SAMTrainingArguments`, or any ``TrainingArguments`` (a user's subclass included), whose missing
    ``sam_*`` fields take the defaults of :class:`~hf_msam.training.arguments.SAMArguments` (``sam_options``). With
    ``sam_rho=0`` every step is the stock ``Trainer.training_step``, bit for bit.

    Logged with the Trainer's logs (``loss`` is the unperturbed training loss):
    ``sam_perturbed_loss`` (mean loss at the perturbed points), ``sam_ascent_grad_norm`` (mean ``||g_k||``),
    ``sam_skipped`` (perturbations skipped since the last log for a non-finite ascent gradient).
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *pargs, **kwargs):
        if args is not None:  # SAMTrainingArguments checked themselves when built; a plain TrainingArguments did not
            validate_sam_arguments(sam_options_of(args), args)
        super().__init__(model, args, *pargs, **kwargs)
        plugin = self.accelerator.state.deepspeed_plugin  # None without DeepSpeed
        zero_stage = zero_stage_of(plugin.deepspeed_config) if plugin else None  # of the config the engine is built from
        check_backend(self.args, self.sam_options, self.accelerator.distributed_type, self.args.n_gpu,
                      zero_stage=zero_stage, mixed_precision=self.accelerator.mixed_precision)
        if self.is_fsdp_enabled:
            wrap_layers_around_input_embeddings(self.accelerator.state.fsdp_plugin, self.model)
        fallback = fsdp_fallback_warning(self.args, self.accelerator.distributed_type, self.accelerator.num_processes)
        if fallback is not None:
            logger.warning(fallback)
        micro_batch_size = self.sam_options.sam_micro_batch_size
        if micro_batch_size is not None and isinstance(self.data_collator, DataCollatorWithFlattening):
            raise ValueError(_packed_batch_error(micro_batch_size))
        if hasattr(self.model, "add_model_tags"):  # as TRL's trainers do: any push of this model carries the tags
            self.model.add_model_tags(MODEL_TAGS)
        self._sam: MicroBatchSAM | None = None
        self._sharded: ShardedPerturbation | None = None  # the FSDP2 path's perturbation state
        self._sharded_module: nn.Module | None = None
        self._sam_module: nn.Module | None = None  # the module self._sam was built for
        self._last_unwrapped: tuple[nn.Module, nn.Module] | None = None  # (model as passed, its unwrapped module)
        self._batchnorms: list[nn.Module] = []
        self._embeddings: list[nn.Embedding] = []  # tables treated by rows on the loop path (sam_sparse_embeddings)
        self._sam_items_in_step: float | None = None
        self._in_micro_batch_pass = False  # compute_loss is running for a micro-batch of an mSAM step
        # Items of a batch: labels[..., 1:] for every causal LM, also those the Trainer misses (GPT-2: no loss_type).
        self._sam_loss_shifts_labels = self._loss_shifts_labels or _causal_lm_loss(unwrap_peft_model(self.model))
        self._vmap: VectorizedMicroBatchSAM | None = None
        self._vmap_ineligible: str | None = None  # why the model cannot take the vmap path (None: it can)
        self._vmap_verified = False  # a vmap group has run
        self._vmap_failed: str | None = None  # why a group failed on this process, until the others know (DDP)
        self._vmap_group_size: int | None = None
        self._logged_fallbacks: set[str] = set()
        # Since the last training log: perturbations, skipped ones, sum of ||g_k||, sum of weighted L_k(w + e_k).
        self._sam_stats = torch.zeros(4, dtype=torch.float64, device=self.args.device)
        self._sam_last_logged_step = 0  # where the window of _sam_stats starts; reset when training (re)starts

    @property
    def sam_options(self) -> SAMArguments:
        """The mSAM settings, read from ``self.args`` at each use (:func:`~hf_msam.training.arguments.sam_options_of`): the
        ``sam_*`` fields it has, the defaults of the others. ``self.args`` is the object the user passed, so a change
        to it after the trainer is built counts, as it does for every other field."""
        return sam_options_of(self.args)

    # ------------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        """Also count the supervised items of the whole optimizer step on all processes (``|D|``)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.sam_options.sam_rho > 0:
            local = sum(self._count_items(batch) for batch in batch_samples)
            if self.accelerator.num_processes > 1:
                total = self.accelerator.reduce(torch.tensor(float(local), device=device), reduction="sum")
                self._sam_items_in_step = float(total.item())
            else:
                self._sam_items_in_step = float(local)
        return batch_samples, num_items_in_batch

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One per-device chunk of an mSAM step; returns the unperturbed loss, scaled like the stock step's."""
        if self.sam_options.sam_rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)

        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            return self._msam_step(model, inputs)

    def _msam_step(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        args = self.args
        options = self.sam_options
        sam = self._get_sam(model)
        ascent_model = self._unwrapped(model)  # bypasses the DDP reducer; keeps autocast
        world = self.accelerator.num_processes
        scaler = self.accelerator.scaler
        grad_scale = float(scaler.get_scale()) if scaler is not None else 1.0
        items_step = self._sam_items_in_step
        if items_step is None:  # called outside the Trainer loop: this chunk is the whole local step
            items_step = float(self._count_items(inputs) * self.current_gradient_accumulation_steps * world)

        size = None if options.sam_global else options.sam_micro_batch_size
        if size is not None and _is_packed(inputs):
            raise ValueError(_packed_batch_error(size))
        split = [mb for mb, _ in split_micro_batches(inputs, size)]
        counts = self._item_counts(split)
        clean_loss = torch.zeros((), device=args.device)
        if self.is_fsdp_enabled:
            return self._sharded_msam_step(model, split, counts, items_step, grad_scale, clean_loss)
        vmap = self._vmap_chosen(model, split, counts)
        by_hand = world > 1 and self._vmap_reduces_by_hand(model)  # the vmap path's all-reduce, whichever path runs
        if by_hand:  # no pass runs the wrapper's forward, which broadcasts the buffers (broadcast_buffers)
            sync_buffers(model)
        if vmap:
            done = self._vmap_step(model, split, counts, items_step, grad_scale, clean_loss)
            split, counts = split[done:], counts[done:]  # "auto" met an error vmap cannot run: the loop does the rest
        micro_batches = [(mb, items) for mb, items in zip(split, counts) if items > 0]  # nothing supervised: no loss
        deepspeed = self.is_deepspeed_enabled
        passes = 0  # descent backwards of the chunk under DeepSpeed
        if deepspeed:  # ZeRO-2 reduces in every backward: as many on every process, at least the stock step's one
            passes = max(1, most_over_processes(len(micro_batches), args.device) if world > 1 else len(micro_batches))
        if not micro_batches and not vmap and not by_hand and not deepspeed:  # nothing supervised: still take part
            if options.sam_global and world > 1:
                join_all_reduce_mean(sam.params)
            self._zero_loss_backward(model, inputs)
            return clean_loss
        # Descent rows added into .grad in place; not under DDP or DeepSpeed, whose reductions expect dense gradients.
        descent_rows = self._embeddings if world == 1 and not deepspeed else []
        for index, (micro_batch, items) in enumerate(micro_batches):
            weight = world * items / items_step

            randomness = RandomState.capture()  # the descent pass replays the ascent pass's dropout masks
            with self.compute_loss_context_manager(), sparse_embedding_gradients(self._embeddings):
                loss_at_w = self._micro_batch_loss(ascent_model, micro_batch, items)
            clean_loss += weight * loss_at_w.detach().float()
            grads = sam.ascent_gradients(loss_at_w * grad_scale if scaler is not None else loss_at_w)
            if options.sam_global and world > 1:
                all_reduce_mean_(grads, weight / world)
            perturbation = sam.perturb_with(grads, grad_scale=grad_scale)
            del grads

            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or by_hand else self.accelerator.no_sync(model)
            randomness.restore()
            descent_tables = sparse_embedding_gradients(descent_rows, accumulating=True)
            try:
                with sync, _frozen_batchnorm_statistics(self._batchnorms):
                    with self.compute_loss_context_manager(), descent_tables:
                        loss_at_w_plus_e = self._micro_batch_loss(ascent_model if by_hand else model, micro_batch, items)
                    if deepspeed:
                        boundary = self.accelerator.sync_gradients and index == passes - 1
                        deepspeed_backward(self.accelerator.deepspeed_engine_wrapped.engine, weight * loss_at_w_plus_e,
                                           boundary)
                    else:
                        self.accelerator.backward(weight * loss_at_w_plus_e)
            finally:
                sam.restore()  # also when the descent pass fails: the weights never stay perturbed
            self._record(perturbation, weight / world * loss_at_w_plus_e.detach().float())
        if by_hand and self.accelerator.sync_gradients:
            self._vmap_all_reduce()
        if deepspeed:
            self._deepspeed_padding_and_step(model, inputs, len(micro_batches), passes)
        return clean_loss

    def _deepspeed_padding_and_step(self, model: nn.Module, inputs: dict[str, Any], done: int, passes: int) -> None:
        """After the chunk's ``done`` descent backwards under DeepSpeed: the zero-loss backwards up to ``passes`` (each
        with the all-reduce of the ascent that ``sam_global`` would have run), the last of them at the accumulation
        boundary when the step ends here, then the step's one engine step, taken at w (all weights restored)."""
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        sync = self.accelerator.sync_gradients
        for index in range(done, passes):
            if self.sam_options.sam_global and self.accelerator.num_processes > 1:
                join_all_reduce_mean(self._sam.params)
            boundary = sync and index == passes - 1
            self._zero_loss_backward(model, inputs, lambda loss: deepspeed_backward(engine, loss, boundary))
        if sync:
            engine.step()

    def _sharded_msam_step(self, model: nn.Module, split: list[dict[str, Any]], counts: list[int], items_step: float,
                           grad_scale: float, clean_loss: torch.Tensor) -> torch.Tensor:
        """mSAM under FSDP2: micro-batch k is the union of every process's k-th micro-batch, perturbed by its joint
        gradient (:class:`ShardedPerturbation`; ``docs/design.md`` section 2.6).

        Every pass reduce-scatters (gradient sync on, also within gradient accumulation): the ascent gradient must
        be the joint one, and the descent gradients then accumulate in the sharded ``.grad``. The ascent loss of
        process r is weighted ``world * items_r / items_k`` (``items_k`` over all processes), so that the mean the
        reduce-scatter takes is the gradient of micro-batch k's mean loss; the descent weight is the loop's.
        """
        world = self.accelerator.num_processes
        if self._sharded is None or self._sharded_module is not model:
            self._sharded = ShardedPerturbation(list(model.parameters()), sam_rule_of(self.sam_options))
            self._sharded_module = model
            self._batchnorms = _tracked_batchnorms(model)
        sam = self._sharded
        model.set_requires_gradient_sync(True)
        totals = global_counts(counts, self.args.device)
        for index, total in enumerate(totals):
            if total == 0:  # no process has anything supervised in micro-batch k: no pass anywhere
                continue
            micro_batch, items = (split[index], counts[index]) if index < len(split) else (split[-1], 0)
            sam.hold_gradients()
            randomness = RandomState.capture()
            weight = world * items / items_step
            ascent_weight = world * items / total * grad_scale  # the loss scale by hand: no scaler step follows
            loss_at_w = self._sharded_pass(model, micro_batch, items, ascent_weight, torch.Tensor.backward)
            clean_loss += weight * loss_at_w
            perturbation = sam.perturb(grad_scale=grad_scale)
            sam.give_back_gradients()
            randomness.restore()
            try:
                with _frozen_batchnorm_statistics(self._batchnorms):
                    loss_at_w_plus_e = self._sharded_pass(model, micro_batch, items, weight, self.accelerator.backward)
            finally:
                sam.restore()
            self._record(perturbation, weight / world * loss_at_w_plus_e)
        return clean_loss

    def _sharded_pass(self, model: nn.Module, micro_batch: dict[str, Any], items: int, weight: float,
                      backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Forward and ``backward(weight * L_k)`` through the FSDP2 model (its all-gathers and reduce-scatter); a
        micro-batch without supervised items back-propagates a zero, so that every process meets the same
        collectives. Returns ``L_k`` (0 without items), detached, in float32."""
        if items == 0:
            self._zero_loss_backward(model, micro_batch)
            return torch.zeros((), device=self.args.device)
        with self.compute_loss_context_manager():
            loss = self._micro_batch_loss(model, micro_batch, items)
        backward(weight * loss)
        return loss.detach().float()

    def _micro_batch_loss(self, model: nn.Module, micro_batch: dict[str, Any], items: int) -> torch.Tensor:
        """``L_k``, the mean loss of one micro-batch over its ``items`` supervised items: ``compute_loss`` with
        ``num_items_in_batch=items``, so that a loss normalised by it (by the model, a ``compute_loss_func``, the label
        smoother or an override) is that mean, as a model's plain mean loss is (``docs/design.md`` section 2.3)."""
        self._in_micro_batch_pass = True
        try:  # a copy of the batch: a label smoother or compute_loss_func pops its labels
            items_tensor = torch.tensor(items, device=self.args.device)
            return self.compute_loss(model, dict(micro_batch), num_items_in_batch=items_tensor)
        finally:
            self._in_micro_batch_pass = False

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``Trainer.compute_loss``; inside an mSAM pass without its factor for the processes.

        Outside an mSAM pass this is the stock method. ``Trainer.compute_loss`` multiplies a loss normalised by
        ``num_items_in_batch`` by the number of processes (``average_tokens_across_devices``: the stock count is the
        step's over all processes, and DDP averages the gradients). An mSAM pass gives the micro-batch's own count
        and weights the micro-batch itself (``world * items_k / items_step``), so the factor is divided out again, for
        a model that uses the count as for one that ignores it (a plain mean loss, transformers#47688).
        """
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The condition and the factor of Trainer.compute_loss (transformers 5.25); SAMTrainer refuses n_gpu > 1.
        multiplied = (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        )
        factor = self.accelerator.num_processes // self.get_tp_size()
        if not (self._in_micro_batch_pass and multiplied and factor != 1):
            return result
        if return_outputs:
            loss, outputs = result
            return loss / factor, outputs
        return result / factor

    def _zero_loss_backward(self, model: nn.Module, inputs: dict[str, Any],
                            backward: Callable[[torch.Tensor], None] | None = None) -> None:
        """A synced backward of zero through the (DDP-wrapped) model, as the stock step back-propagates a zero loss
        for a chunk without supervised items: the gradient all-reduce of the step then runs on every process.
        ``backward`` runs it (default ``accelerator.backward``; DeepSpeed's without the engine step).

        The zero comes from the model's outputs without labels, not from its loss, a mean over no items (NaN) here.
        """
        unsupervised = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        with self.compute_loss_context_manager():
            outputs = model(**unsupervised)
        values = outputs.values() if isinstance(outputs, Mapping) else outputs
        tensors = [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad and v.is_floating_point()]
        (backward or self.accelerator.backward)(sum(t.sum() for t in tensors) * 0.0)

    def _unwrapped(self, model: nn.Module) -> nn.Module:
        """``accelerator.unwrap_model(model)``, kept for the last ``model`` passed: the Trainer passes the same
        (wrapped) model every step, and accelerate's unwrapping looks up installed packages on every call."""
        if self._last_unwrapped is None or self._last_unwrapped[0] is not model:
            self._last_unwrapped = (model, self.accelerator.unwrap_model(model))
        return self._last_unwrapped[1]

    def _get_sam(self, model: nn.Module) -> MicroBatchSAM:
        """The perturbation state for the trainable parameters of ``model`` (built once per model)."""
        module = self._unwrapped(model)
        if self._sam is None or self._sam_module is not module:
            options = self.sam_options
            self._sam = MicroBatchSAM(module.parameters(), rule=sam_rule_of(options))
            self._sam_module = module
            self._batchnorms = _tracked_batchnorms(module)
            # sam_global all-reduces the ascent gradients as dense tensors; inductor cannot compile a backward that
            # returns a sparse gradient ("Cannot access storage of SparseTensorImpl").
            sparse = options.sam_sparse_embeddings and not options.sam_global and not self.args.torch_compile
            if options.sam_sparse_embeddings and self.args.torch_compile:
                self._log_fallback_once(
                    "sam_sparse_embeddings: embedding tables are treated whole with torch_compile=True (the compiled "
                    "backward cannot return sparse row gradients); the update is the same.",
                    level=logging.INFO,
                )
            self._embeddings = trainable_embeddings(module) if sparse else []
        return self._sam

    # ------------------------------------------------------------------------------------------------
    # The vectorised path (hf_msam.update.vmap)
    # ------------------------------------------------------------------------------------------------
    def _vmap_chosen(self, model: nn.Module, micro_batches: list[dict[str, Any]], counts: list[int]) -> bool:
        """Whether this chunk runs on the vmap path; logs the reason of a fallback once (``"auto"``, or an
        uneven chunk), raises with it for ``"vmap"`` when the model itself cannot take the path."""
        if self.is_deepspeed_enabled:  # "vmap" is refused: its reduction by hand would bypass the engine's
            return False
        mode = self.sam_options.sam_micro_batch_mode
        declined, reason = path.auto_declines(mode, self.args.device.type, len(micro_batches))
        if reason is not None:
            self._log_fallback_once(reason, level=logging.INFO)
        if declined:
            return False
        module = self._unwrapped(model)
        if self._vmap_ineligible is None and (self._vmap is None or self._vmap.module is not module):
            self._vmap_model_check(model)
        if self._vmap_failed is not None:  # this process left the path; the others learn it at the next all-reduce
            return False
        reason = self._vmap_ineligible
        if reason is not None:
            if mode == "vmap":
                raise ValueError(f"sam_micro_batch_mode='vmap' cannot run this training: {reason}. Use 'auto' or 'loop'.")
            self._log_fallback_once(f"sam_micro_batch_mode='auto' runs the loop: {reason}.")
            return False
        reason = path.chunk_declines(micro_batches, counts)
        if reason is not None:
            self._log_fallback_once(reason)
            return False
        return True

    def _vmap_model_check(self, model: nn.Module) -> None:
        """Build the vectorised step for the model, or set why the model or the Trainer set-up cannot take it."""
        self._get_sam(model)
        module = self._unwrapped(model)
        if self._batchnorms:
            reason = "the model has BatchNorm layers (their running statistics cannot be updated under vmap)"
        elif self.label_smoother is not None:
            reason = "a label smoother (label_smoothing_factor > 0) computes the loss outside the model"
        elif self.compute_loss_func is not None:
            reason = "a compute_loss_func computes the loss outside the model"
        elif type(self).compute_loss is not SAMTrainer.compute_loss:
            reason = f"{type(self).__name__} overrides compute_loss, which the vmap path cannot call"
        elif self.sam_options.sam_global:
            reason = "sam_global=True all-reduces the ascent gradient between the two passes"
        elif unsupported_reason(module) is not None:
            reason = unsupported_reason(module)
        else:
            options = self.sam_options
            self._vmap = VectorizedMicroBatchSAM(
                module,
                rule=sam_rule_of(options),
                compile=options.sam_vmap_compile,
                table_rows=options.sam_sparse_embeddings,
            )
            self._vmap_group_size = None
            return
        self._vmap_ineligible = reason

    def _vmap_step(
        self,
        model: nn.Module,
        micro_batches: list[dict[str, Any]],
        counts: list[int],
        items_step: float,
        grad_scale: float,
        clean_loss: torch.Tensor,
    ) -> int:
        """The micro-batches of the chunk in groups of vectorised passes, their weighted clean losses added into
        ``clean_loss``; returns how many ran. Under ``"auto"``, a group that raises before its backward began
        (an operation vmap rejects, a mask the path cannot hand in) is undone (the random state; ``.grad`` was not
        touched) and it and the rest of the chunk, and every later chunk, run with the loop, logged once."""
        world = self.accelerator.num_processes
        device = self.args.device
        weights = torch.tensor([world * c / items_step for c in counts], device=device, dtype=torch.float32)
        group = self._vmap_group_size or self._group_size_for_budget(len(micro_batches))
        for start in range(0, len(micro_batches), group):
            stacked = stack_micro_batches(micro_batches[start : start + group])
            group_weights = weights[start : start + group]
            randomness = RandomState.capture()  # to undo a failed group
            backward = _RecordingBackward(self.accelerator.backward)
            try:
                result = self._vmap.step(
                    stacked, group_weights, grad_scale, autocast=self.compute_loss_context_manager, backward=backward
                )
            except Exception as error:  # noqa: BLE001 - "auto": any error before .grad is written is undone
                if self.sam_options.sam_micro_batch_mode == "vmap" or backward.called:
                    raise
                randomness.restore()
                reason = f"the model's forward failed under vmap ({type(error).__name__}: {error})"
                self._log_fallback_once(f"sam_micro_batch_mode='auto' runs the loop: {reason}.")
                if world > 1:  # every process leaves the path together, after the step's all-reduce
                    self._vmap_failed = reason
                else:
                    self._vmap_ineligible = reason
                return start
            self._vmap_verified = True
            clean_loss += (group_weights * result.clean_losses).sum()
            self._record_vectorized(result, group_weights / world)
        return len(micro_batches)

    def _vmap_reduces_by_hand(self, model: nn.Module) -> bool:
        """Whether this run's gradients are all-reduced by :meth:`_vmap_all_reduce` instead of the DDP reducer: the
        vmap path is built for the model and no process has left it. Chunks that run with the loop then reduce by
        hand too, so that every process takes part in the same all-reduce whichever path its chunk took (an uneven
        or unsupervised micro-batch, a failed group)."""
        return self._vmap is not None and self._vmap.module is self._unwrapped(model) and self._vmap_ineligible is None

    def _vmap_all_reduce(self) -> None:
        """The step's all-reduce of the gradients by hand (:func:`~hf_msam.training.distributed.all_reduce_gradients_mean_`), which also tells every
        process whether one of them left the vmap path (a failed group under ``"auto"``): then all run the loop from
        the next step on."""
        failed = all_reduce_gradients_mean_(self._vmap.params, self.accelerator.num_processes, self._vmap_failed is not None)
        if failed:
            self._vmap_ineligible = self._vmap_failed or "the vmap step failed on another process"
            self._log_fallback_once(f"sam_micro_batch_mode='auto' runs the loop: {self._vmap_ineligible}.")
        self._vmap_failed = None

    def _group_size_for_budget(self, num_micro_batches: int) -> int:
        """Micro-batches per vectorised group within ``sam_vmap_memory_budget_mb`` (:func:`.path.group_size_for_budget`)."""
        self._vmap_group_size = path.group_size_for_budget(
            self._vmap.batched_params, num_micro_batches, self.sam_options.sam_vmap_memory_budget_mb, self.args.device
        )
        return self._vmap_group_size

    def _log_fallback_once(self, message: str, level: int = logging.WARNING) -> None:
        if message not in self._logged_fallbacks:
            self._logged_fallbacks.add(message)
            logger.log(level, message)

    def _item_counts(self, micro_batches: list[dict[str, Any]]) -> list[int]:
        """:meth:`_count_items` of every micro-batch, with one host sync for all of them."""
        counts = [self._count_items(mb, sync=False) for mb in micro_batches]
        if all(isinstance(c, int) for c in counts):
            return counts
        return [int(c) for c in torch.stack([torch.as_tensor(c, device=self.args.device) for c in counts]).tolist()]

    def _count_items(self, batch: dict[str, Any], sync: bool = True) -> int | torch.Tensor:
        """Supervised items of a batch, counted like the Trainer's ``num_items_in_batch``: labels that are not
        -100 (shifted for causal-LM losses); the number of examples when the batch has no labels. ``sync=False``
        leaves a count of labels on the device (a tensor)."""
        labels = batch.get("shift_labels")
        if labels is None:
            labels = batch.get("labels")
            if isinstance(labels, torch.Tensor) and self._sam_loss_shifts_labels:
                labels = labels[..., 1:]
        if isinstance(labels, torch.Tensor) and labels.dim() > 0:
            count = labels.ne(-100).sum()
            return int(count) if sync else count
        return batch_size_of(batch)

    # ------------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------------
    def _record(self, perturbation: Perturbation, perturbed_loss_share: torch.Tensor) -> None:
        stats = self._sam_stats
        stats[0] += 1
        if perturbation.skipped:
            stats[1] += 1
        else:
            stats[2] += perturbation.grad_norm
        stats[3] += perturbed_loss_share.to(stats.dtype)

    def _record_vectorized(self, result, perturbed_loss_weights: torch.Tensor) -> None:
        stats = self._sam_stats
        stats[0] += result.skipped.numel()
        stats[1] += result.skipped.sum().to(stats.dtype)
        stats[2] += torch.where(result.skipped, 0.0, result.grad_norms).sum().to(stats.dtype)
        stats[3] += (perturbed_loss_weights * result.perturbed_losses).sum().to(stats.dtype)

    def _init_training_state(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        """The Trainer's set-up of ``self.state`` (restored from the checkpoint on a resume); the window of the mSAM
        log counters then starts at ``state.global_step``, so that the first ``sam_perturbed_loss`` after a resume is a
        mean over the steps since then. Runs where training starts, like ``on_train_begin``, without a callback that
        would show in ``callback_handler.callbacks``."""
        started = super()._init_training_state(*args, **kwargs)
        self._sam_stats.zero_()
        self._sam_last_logged_step = self.state.global_step
        return started

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the mSAM counters (summed over processes since the last training log) to training logs."""
        if "loss" in logs and self.sam_options.sam_rho > 0:
            stats = self._sam_stats
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            perturbations, skipped, norm_sum, perturbed_loss = stats.tolist()
            if self.is_fsdp_enabled:  # every process records each global micro-batch's one perturbation (its norm too)
                world = self.accelerator.num_processes
                perturbations, skipped, norm_sum = perturbations / world, skipped / world, norm_sum / world
            if perturbations > 0:
                steps = max(self.state.global_step - self._sam_last_logged_step, 1)
                logs["sam_perturbed_loss"] = perturbed_loss / steps
                applied = perturbations - skipped
                logs["sam_ascent_grad_norm"] = norm_sum / applied if applied > 0 else float("nan")
                logs["sam_skipped"] = int(skipped)
            self._sam_stats.zero_()
            self._sam_last_logged_step = self.state.global_step
        super().log(logs, *args, **kwargs)

    def create_model_card(self, **kwargs) -> None:
        """Write ``output_dir/README.md`` with the mSAM settings, results and curvature report
        (``hf_msam.publish.card``; also used by ``push_to_hub``). Takes ``Trainer.create_model_card``'s arguments."""
        from ..publish.card import create_model_card

        create_model_card(self, **kwargs)


def _is_packed(batch: Mapping[str, Any]) -> bool:
    """Whether a batch is padding-free: several sequences concatenated in one row of shape ``[1, T]``, told apart by
    ``position_ids`` that restart at 0 or by flash-attention ``cu_seq_lens_q`` (``DataCollatorWithFlattening``)."""
    if batch_size_of(batch) != 1:
        return False
    if "cu_seq_lens_q" in batch:
        return True
    positions = batch.get("position_ids")
    return isinstance(positions, torch.Tensor) and bool((positions[..., 1:] == 0).any())


def _packed_batch_error(micro_batch_size: int) -> str:
    """Why ``sam_micro_batch_size`` cannot take packed batches, and the two ways out."""
    return (
        f"sam_micro_batch_size={micro_batch_size} cannot split padding-free (packed) batches: the collator "
        "(DataCollatorWithFlattening or one like it) concatenates the sequences of a batch into one row of shape [1, T] "
        "with position_ids / cu_seq_lens, so every batch would be a single micro-batch. Use a padding collator "
        "(DataCollatorWithPadding, DataCollatorForLanguageModeling) for micro-batches, or unset sam_micro_batch_size "
        "(one perturbation per per-device batch, which packed batches can take)."
    )


def _causal_lm_loss(model: nn.Module) -> bool:
    """Whether the model's loss scores label ``i + 1`` at position ``i`` (``ForCausalLMLoss``), so that the first label
    of each row is never used and a batch's items are ``labels[..., 1:] != -100``.

    Decided from the loss function the model's forward calls, ``PreTrainedModel.loss_function``, which falls back to
    ``ForCausalLMLoss`` when ``loss_type`` is unset (GPT-2's ``GPT2LMHeadModel``, which the Trainer's own check by
    ``loss_type`` misses), for a model that generates (``GenerationMixin``) and is not an encoder-decoder (whose labels
    are aligned with the decoder's outputs).
    """
    if not isinstance(model, GenerationMixin) or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return getattr(model, "loss_function", None) is ForCausalLMLoss


class _RecordingBackward:
    """``backward`` that records whether it was called: from then on a failed vmap group has written ``.grad``."""

    def __init__(self, backward: Callable[[torch.Tensor], None]) -> None:
        self.backward = backward
        self.called = False

    def __call__(self, loss: torch.Tensor) -> None:
        self.called = True
        self.backward(loss)


def _tracked_batchnorms(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``module`` that keep running statistics (which the descent pass must not move)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def _frozen_batchnorm_statistics(batchnorms: list[nn.Module]):
    """Run a pass in train mode without moving BatchNorm running statistics (the ascent pass already did)."""
    if not batchnorms:
        yield
        return
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in batchnorms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
