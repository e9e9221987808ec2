"""The curvature report inside training (``docs/design.md`` section 4): where its numbers go, and when.

``Trainer.evaluate`` logs its metrics *before* ``on_evaluate`` fires, and a callback is never handed the
Trainer, so a plain callback cannot put numbers into the log entry that holds ``eval_loss`` (the one the
model card reads) nor into the reporting integrations. Hence two entry points:

* :class:`SharpnessReportMixin` (``SAMTrainer`` inherits it; put it before ``Trainer`` in your own
  subclass): with ``sharpness_at_eval`` every evaluation computes the report first and adds its
  ``eval_sharpness_*`` numbers to the evaluation's metrics before ``self.log``; with ``sharpness_report``
  the end of ``train()`` saves the model, computes the report on the final model, writes
  ``output_dir/sharpness.json`` and ``sharpness.png``, and logs an evaluation entry (``eval_loss`` and the
  ``eval_sharpness_*`` numbers; only the numbers when there is no evaluation set).
* :class:`SharpnessCallback` for a stock ``Trainer``: at ``on_train_end`` it saves the model, computes the
  report, writes the JSON and the plot, and appends the numbers to ``state.log_history``. It cannot reach the
  integrations (TensorBoard has closed its writer by then) nor the model card: use the mixin for those.

The keys carry the evaluation prefix (``eval_sharpness_lambda_max``), so ``metric_for_best_model=
"sharpness_lambda_max"`` works, TensorBoard files them under ``eval/``, and the card's results table names
them "Sharpness Lambda Max". The report runs on a fixed probe set of training examples (the trainer's data
collator, a fixed seed), in float32 with autocast off (``hf_msam.curvature.report``). Under DDP only the
global rank 0 computes it, on the unwrapped model and the whole training set, exactly as a single process
would, and broadcasts the result; the other ranks wait in that broadcast (within the process group's
timeout, ``ddp_timeout``). A report that fails is a warning plus an ``eval_sharpness_error`` entry, never an
exception: the model is saved before the report starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .adam import AdamState, adam_state_from_optimizer
from .arguments import PREFIX, SharpnessArguments, report_options
from .operators import trainable_parameters
from .plot import plot_report
from .report import SharpnessReport, sharpness_report

logger = logging.getLogger(__name__)

REPORT_JSON = "sharpness.json"
REPORT_PLOT = "sharpness.png"


@dataclass
class SharpnessResult:
    """One curvature report as the training run sees it, identical on every process.

    ``report`` is None when the report failed (``error`` says why); ``metrics`` holds the flat numbers that
    were logged (or the ``<prefix>_sharpness_error`` message).
    """

    report: SharpnessReport | None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def compute_sharpness(
    model: torch.nn.Module,
    dataset: Any,
    *,
    data_collator: Callable | None,
    options: Mapping[str, Any],
    metric_key_prefix: str = "eval",
    progress: bool = True,
) -> SharpnessResult:
    """The report of ``model`` on ``dataset`` (its training set) with ``options`` (``report_options``).

    Under ``torch.distributed`` only the global rank 0 computes and the result is broadcast; every rank must
    call this. The random-number state of the process is left as it was, so a report at evaluation time
    does not change the training that follows. Never raises for a failing report.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        return _compute_here(model, dataset, data_collator, options, metric_key_prefix, progress)
    payload: list[SharpnessResult | None] = [None]
    if torch.distributed.get_rank() == 0:
        payload[0] = _compute_here(model, dataset, data_collator, options, metric_key_prefix, progress)
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]


def _compute_here(model, dataset, data_collator, options, metric_key_prefix, progress) -> SharpnessResult:
    prefix = f"{metric_key_prefix}_{PREFIX}"
    try:
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                "the curvature report needs the training set as a map-style dataset (an HF Dataset or a list of "
                f"examples) to draw its fixed probe set from, got {type(dataset).__name__}"
            )
        devices = [model_device.index or 0] if (model_device := _device_of(model)).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            report = sharpness_report(model, dataset, data_collator=data_collator, progress=progress, **options)
    except Exception as error:  # a failing report must never cost the training
        message = f"{type(error).__name__}: {error}"
        logger.warning("The curvature (sharpness) report failed and was skipped: %s", message)
        return SharpnessResult(report=None, metrics={f"{prefix}error": message}, error=message)
    return SharpnessResult(report=report, metrics=report.metrics(prefix=prefix))


def adam_state_of(optimizer: Any, model: torch.nn.Module) -> AdamState | str | None:
    """The Adam/AdamW second moments of the run's optimizer for the report's ``adam`` measure, or why there is
    no Adam analysis (another optimizer, or a state that cannot be read); None for plain SGD, which the SGD
    verdict is about, or no optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is None or (type(inner) is torch.optim.SGD and not any(g["momentum"] for g in inner.param_groups)):
        return None
    try:
        return adam_state_from_optimizer(inner, trainable_parameters(model))
    except ValueError as error:
        return str(error)


def run_report_options(
    options: SharpnessArguments,
    args: Any,
    state: TrainerState,
    dataset: Any,
    step_rates: Sequence[float],
    optimizer: Any,
    model: torch.nn.Module,
) -> dict[str, Any]:
    """The keyword options of ``sharpness_report`` for a training run, for the mixin and the callback alike:
    ``arguments.report_options`` of the ``sharpness_*`` ``options`` and the run (``args``, the training-set size,
    its ``train_runtime``, the rates of the last optimizer step, the steps trained), plus ``adam_state`` or
    ``adam_unavailable`` (:func:`adam_state_of`)."""
    num_train = len(dataset) if hasattr(dataset, "__len__") else None
    kwargs = report_options(options, args, num_train, training_seconds(state.log_history), step_rates,
                            state.global_step)
    adam = adam_state_of(optimizer, model)
    if adam is not None:
        kwargs["adam_state" if isinstance(adam, AdamState) else "adam_unavailable"] = adam
    return kwargs


class StepRates(TrainerCallback):
    """The learning rates of the parameter groups at the last optimizer step: ``on_optimizer_step`` runs after
    ``optimizer.step()`` and before the scheduler's step, so ``lr`` is then the rate that step took (the rate
    the Trainer logs). After the last step the scheduler's rate is the next step's: 0 at the end of a linear
    decay, where no step takes it."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.rates = [float(group["lr"]) for group in optimizer.param_groups]


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def write_report_files(result: SharpnessResult, output_dir: str | os.PathLike) -> None:
    """``output_dir/sharpness.json`` (``SharpnessReport.to_dict()``) and ``sharpness.png``; a failure to write
    is a warning. Call on the main process only."""
    if result.report is None:
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        result.report.to_json(os.path.join(output_dir, REPORT_JSON))
        plot_report(result.report.to_dict(), os.path.join(output_dir, REPORT_PLOT))
    except Exception as error:
        logger.warning("Could not write the curvature report to %s: %s: %s", output_dir, type(error).__name__, error)


def remove_stale_report_files(output_dir: str | os.PathLike) -> None:
    """Delete a previous run's report files: they describe weights that are about to be overwritten."""
    for name in (REPORT_JSON, REPORT_PLOT):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def training_seconds(log_history: list[dict[str, Any]]) -> float | None:
    """The run's ``train_runtime`` (logged by ``Trainer.train`` before ``on_train_end``); None before the end
    of training, where the report's default time budget does not depend on it."""
    return next((float(e["train_runtime"]) for e in reversed(log_history) if "train_runtime" in e), None)


def sharpness_options_of(args: Any) -> SharpnessArguments:
    """The ``sharpness_*`` options of a run (a plain copy): those of its arguments when they carry them, else
    the defaults (reports off)."""
    if not isinstance(args, SharpnessArguments):
        return SharpnessArguments()
    return SharpnessArguments(**{f.name: getattr(args, f.name) for f in fields(SharpnessArguments)})


class SharpnessReportMixin:
    """Curvature reports for a ``Trainer`` subclass; list it before ``Trainer``: ``class T(SharpnessReportMixin,
    Trainer)``. Options come from the ``sharpness_*`` fields of ``args`` (:class:`SharpnessArguments`, part of
    ``SAMTrainingArguments``); with plain ``TrainingArguments`` it does nothing.

    After a report, ``self.sharpness_result`` holds it (a :class:`SharpnessResult`, the same on every process).
    """

    sharpness_result: SharpnessResult | None = None
    _sharpness_pending: dict[str, Any] | None = None

    _last_step_rates: tuple[float, ...] = ()  # the rates of the parameter groups at the last optimizer step
    _rates_recorded_of: torch.optim.Optimizer | None = None  # the optimizer whose steps record them

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """``Trainer.create_optimizer``; each step of the optimizer then records the learning rates it took (the rate
        in force, which the verdicts judge; :class:`StepRates` says why not the scheduler's). A step post-hook rather
        than a callback, so that the Trainer's callbacks stay the ones it was given."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if optimizer is not None and optimizer is not self._rates_recorded_of:
            optimizer.register_step_post_hook(self._record_step_rates)
            self._rates_recorded_of = optimizer
        return optimizer

    def _record_step_rates(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._last_step_rates = tuple(float(group["lr"]) for group in optimizer.param_groups)

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``, then (``sharpness_report``) save the model and report on it."""
        output = super().train(*args, **kwargs)
        if sharpness_options_of(self.args).sharpness_report:
            self._final_sharpness_report()
        return output

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """``Trainer.evaluate``; with ``sharpness_at_eval`` the report's numbers join the logged metrics."""
        if self._sharpness_pending is not None or not sharpness_options_of(self.args).sharpness_at_eval:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self.sharpness_result = self._sharpness(metric_key_prefix)
        with self._logging_also(self.sharpness_result.metrics):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the pending report numbers to the evaluation entries logged inside ``evaluate``."""
        if self._sharpness_pending is not None:
            logs.update(self._sharpness_pending)
        super().log(logs, *args, **kwargs)

    @contextlib.contextmanager
    def _logging_also(self, metrics: dict[str, Any]) -> Iterator[None]:
        """Every ``log`` call inside the block (one per evaluation set) also carries ``metrics``."""
        self._sharpness_pending = metrics
        try:
            yield
        finally:
            self._sharpness_pending = None

    def _sharpness(self, metric_key_prefix: str) -> SharpnessResult:
        """The report on the current model and the training set (every process calls this)."""
        dataset = self.train_dataset
        options = run_report_options(sharpness_options_of(self.args), self.args, self.state, dataset,
                                     self._last_step_rates, self.optimizer, self.model)
        return compute_sharpness(
            self.model,
            dataset,
            data_collator=self.data_collator,
            options=options,
            metric_key_prefix=metric_key_prefix,
            progress=self.is_world_process_zero() and not self.args.disable_tqdm,
        )

    def _final_sharpness_report(self) -> None:
        """Save the model first, then report, write the files, and log the final evaluation entry."""
        self.save_model()
        if self.args.should_save:
            remove_stale_report_files(self.args.output_dir)
        self.sharpness_result = result = self._sharpness("eval")
        if self.is_world_process_zero():
            write_report_files(result, self.args.output_dir)
        if self.eval_dataset is None:
            self.log(dict(result.metrics))
            return
        try:
            with self._logging_also(result.metrics):
                self.evaluate()
        except Exception as error:  # after training: record the report even if the evaluation itself fails
            logger.warning("The final evaluation failed (%s: %s); logging the curvature report alone.",
                           type(error).__name__, error)
            self.log(dict(result.metrics))


class SharpnessCallback(StepRates):
    """The curvature report of the final model for a stock ``transformers.Trainer``.

    ``Trainer(..., callbacks=[SharpnessCallback(num_examples=64)])``. At ``on_train_end`` it saves the model
    (``save_pretrained`` of the model and processing class into ``output_dir``), computes the report on the
    training set the Trainer trained on (with its data collator), writes ``output_dir/sharpness.json`` and
    ``sharpness.png``, and appends the ``eval_sharpness_*`` numbers to ``state.log_history``. Options: a
    :class:`SharpnessArguments`, else the run's own ``sharpness_*`` arguments when it has them, plus keyword
    overrides without the prefix (``num_examples``, ``measures``, ...). The result is kept in ``self.result``.

    The verdicts judge the learning rate of the last optimizer step, which it records (:class:`StepRates`).
    Do not combine it with ``SAMTrainer``'s own ``sharpness_report`` (the report would run twice).
    """

    def __init__(self, options: SharpnessArguments | None = None, **overrides: Any) -> None:
        self.options = options
        self.overrides = {PREFIX + name: value for name, value in overrides.items()}
        if overrides:  # validate the overrides now, not after training
            replace(options or SharpnessArguments(), **self.overrides)
        self.result: SharpnessResult | None = None
        super().__init__()

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        processing_class: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            return
        if state.is_world_process_zero:
            model.save_pretrained(args.output_dir)
            if processing_class is not None:
                processing_class.save_pretrained(args.output_dir)
            remove_stale_report_files(args.output_dir)
        options = replace(self.options or sharpness_options_of(args), **self.overrides)
        dataset = getattr(train_dataloader, "dataset", None)
        collator = getattr(train_dataloader, "collate_fn", None)
        report_kwargs = run_report_options(options, args, state, dataset, self.rates, kwargs.get("optimizer"), model)
        self.result = compute_sharpness(
            model,
            dataset,
            data_collator=collator,
            options=report_kwargs,
            progress=state.is_world_process_zero and not args.disable_tqdm,
        )
        if state.is_world_process_zero:
            write_report_files(self.result, args.output_dir)
        entry = {**self.result.metrics, "step": state.global_step}
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        state.log_history.append(entry)
