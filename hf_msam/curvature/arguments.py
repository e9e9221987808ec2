"""Options of the curvature report, as dataclass fields shared by ``SAMTrainingArguments`` and the
``hf-msam sharpness`` command line.

Every option of :func:`hf_msam.curvature.report.sharpness_report` is a ``sharpness_<name>`` field here (the
command line drops the ``sharpness_`` prefix). ``None`` means "the report's own default", so the defaults
live in one place. The inputs of the stability verdict (learning rate, total batch size, training-set
size) are not options: :func:`report_options` takes them from the run itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .options import validate_options

PREFIX = "sharpness_"


@dataclass
class SharpnessArguments:
    """When and how the sharpness / coherence report of ``docs/design.md`` section 3 is computed."""

    sharpness_report: bool = field(
        default=False,
        metadata={"help": "Compute the curvature report on the final model (saved first) at the end of training."},
    )
    sharpness_at_eval: bool = field(
        default=False, metadata={"help": "Also compute the curvature report at every evaluation."}
    )
    sharpness_num_examples: int = field(
        default=256, metadata={"help": "Training examples in the fixed probe set of the curvature report."}
    )
    sharpness_seed: int = field(
        default=0, metadata={"help": "Seed of the probe-set choice and of the random probes (fixed across runs)."}
    )
    sharpness_measures: list[str] | None = field(
        default=None,
        metadata={"help": "Measures to compute, among eigenvalues trace m_sharpness coherence probe adam (adam: "
                          "Adam/AdamW runs only). None: all. The verdict needs eigenvalues and coherence."},
    )
    sharpness_lanczos_iterations: int | None = field(
        default=None, metadata={"help": "Maximum Lanczos iterations (HVPs) for the top eigenvalues. None: the report's default."}
    )
    sharpness_lanczos_tol: float | None = field(
        default=None, metadata={"help": "Relative residual at which Lanczos stops. None: the report's default."}
    )
    sharpness_top_k: int | None = field(
        default=None, metadata={"help": "Number of top Hessian eigenvalues reported. None: the report's default."}
    )
    sharpness_trace_probes: int | None = field(
        default=None, metadata={"help": "Rademacher probes of the Hutchinson trace. None: the report's default."}
    )
    sharpness_rho: float | None = field(
        default=None,
        metadata={"help": "Radius rho of the m-sharpness. None: the run's sam_rho (when > 0), else the report's default."},
    )
    sharpness_m: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batch size m of the m-sharpness. None: the run's mSAM micro-batch (sam_micro_batch_size, "
            "else the per-device batch), else the report's default."
        },
    )
    sharpness_probe_steps: int | None = field(
        default=None, metadata={"help": "Sampled batches of the linear-stability probe. None: the report's default."}
    )
    sharpness_probe_sampling: str | None = field(
        default=None,
        metadata={"help": "Batches of the stability probe: 'without_replacement' (B distinct examples, the "
                          "Trainer's sampler), 'uniform' (B draws with replacement) or 'bernoulli'. None: the "
                          "report's default."},
    )
    sharpness_coherence_examples: int | None = field(
        default=None,
        metadata={"help": "Examples whose per-example Gauss-Newton blocks give the coherence: the first N of the "
                          "probe draw, which may exceed sharpness_num_examples (a Gram row costs far less than an "
                          "HVP on many examples). None: the examples of the Hessian measures."},
    )
    sharpness_coherence_memory_gb: float | None = field(
        default=None,
        metadata={"help": "Memory (GB) of the coherence's Jacobian-row buffers (more: fewer recomputed rows). "
                          "None: the report's default."},
    )
    sharpness_coherence_sketch: str | None = field(
        default=None,
        metadata={"help": "Coherence Gram: 'exact', 'auto' (exact when the Jacobian rows of every coherence example "
                          "fit sharpness_coherence_memory_gb, else a CountSketch of each row, so that each example "
                          "is evaluated once; the report gives the sketch dimension and the estimated relative "
                          "error of sigma) or a sketch dimension (an integer, e.g. 262144). None: the report's "
                          "default ('auto')."},
    )
    sharpness_batch_size: int | None = field(
        default=None, metadata={"help": "Examples per forward/backward pass of the report. None: the report's default."}
    )
    # --- time budget (hf_msam.curvature.budget) ---
    sharpness_max_seconds: float | None = field(
        default=None,
        metadata={
            "help": "Time budget of the report in seconds: the first products are timed and the probe-set size, "
            "Lanczos iterations, trace probes, coherence examples and probe steps are scaled down to fit it "
            "(what was cut is in the report's budget_cuts). None: on a CPU the training time, between 2 and 10 "
            "minutes (10 minutes without a training run); 30 minutes on an accelerator. inf: no limit."
        },
    )

    def __post_init__(self) -> None:
        validate_sharpness_options(self)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # mixed into TrainingArguments
            parent()


def option_names() -> list[str]:
    """The report's keyword options carried by :class:`SharpnessArguments`, without the prefix."""
    return [f.name[len(PREFIX) :] for f in fields(SharpnessArguments) if f.name not in {"sharpness_report", "sharpness_at_eval"}]


def validate_sharpness_options(options: Any) -> None:
    """Refuse options that cannot work, naming the field and the fix (before any training starts); the rules are
    the report's own (``options.validate_options``)."""
    validate_options({name: getattr(options, PREFIX + name) for name in option_names()}, prefix=PREFIX)


def report_options(
    options: Any,
    training_args: Any | None = None,
    num_train_examples: int | None = None,
    training_seconds: float | None = None,
    last_step_rates: Sequence[float] | None = None,
    steps_trained: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``sharpness_report`` for a run.

    ``options`` holds the ``sharpness_*`` fields (a :class:`SharpnessArguments`); ``training_args`` (a
    ``TrainingArguments``, possibly the same object) gives the run's defaults for rho and m and the
    verdict inputs: its learning rate and total train batch size (per device x processes x accumulation),
    with ``num_train_examples`` the training-set size, and its optimizer's name (the report notes that the
    theory is about plain SGD). ``training_seconds`` (the run's ``train_runtime``) sets the default time
    budget on a CPU; ``steps_trained`` (the run's optimizer steps) is shown beside the drift timescale. Options
    left at None are omitted.

    The learning rate the verdicts judge (``learning_rate``) is the one in force: ``last_step_rates``, the rates
    the parameter groups took at the last optimizer step (``hook.StepRates``), not the schedule's peak
    ``TrainingArguments.learning_rate`` (``learning_rate_peak``); with a schedule that decays to zero, the
    scheduler's next rate would be 0 after the last step. Before any step the peak stands in; when the groups
    took different rates there is no single one (``learning_rate`` omitted). ``learning_rate_source`` says which.
    """
    kwargs = {name: getattr(options, PREFIX + name) for name in option_names()}
    if training_args is not None:
        sam_rho = getattr(training_args, "sam_rho", None)
        if kwargs["rho"] is None and sam_rho:
            kwargs["rho"] = float(sam_rho)
        if kwargs["m"] is None and hasattr(training_args, "sam_micro_batch_size"):
            kwargs["m"] = _run_micro_batch_size(training_args)
        kwargs.update(learning_rates(float(training_args.learning_rate), last_step_rates,
                                     step_source="the rate of the last optimizer step"))
        kwargs["train_batch_size"] = total_train_batch_size(training_args)
        kwargs["num_train_examples"] = num_train_examples
        kwargs["optimizer"] = str(getattr(training_args.optim, "value", training_args.optim))
    kwargs["training_seconds"] = training_seconds
    kwargs["steps_trained"] = steps_trained
    return {name: value for name, value in kwargs.items() if value is not None}


def learning_rates(
    peak: float | None,
    step_rates: Sequence[float] | None,
    *,
    step_source: str,
    given: float | None = None,
    given_source: str | None = None,
) -> dict[str, Any]:
    """``learning_rate`` (the rate the verdicts judge), ``learning_rate_final``, ``learning_rate_peak`` and
    ``learning_rate_source`` of the report, for training runs and the command line alike.

    ``step_rates`` are the rates of the optimizer's parameter groups (at the last step; ``step_source`` says
    where they come from) and ``peak`` the schedule's peak. The rate judged is ``given`` when there is one
    (``given_source``), else the groups' single rate, else none when the groups took different rates, else the
    peak (no step taken yet). Unknown values are None.
    """
    rates = sorted(set(step_rates or ()))
    final = rates[0] if len(rates) == 1 else None
    if given is not None:
        rate, source = given, given_source
    elif final is not None:
        rate, source = final, step_source
    elif rates:
        rate, source = None, (f"none: the parameter groups took different rates {rates} at the last optimizer "
                              "step, and the verdicts need one")
    else:
        rate = peak
        source = None if peak is None else "TrainingArguments.learning_rate (no optimizer step taken yet)"
    return {"learning_rate": rate, "learning_rate_final": final, "learning_rate_peak": peak,
            "learning_rate_source": source}


def total_train_batch_size(training_args: Any) -> int:
    """Examples per optimizer step over all processes: the ``B`` of the stability verdict."""
    return int(
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    )


def _run_micro_batch_size(training_args: Any) -> int:
    """The examples one mSAM perturbation sees: the micro-batch, the per-device batch, or the whole batch (global)."""
    if getattr(training_args, "sam_global", False):
        return total_train_batch_size(training_args)
    return int(training_args.sam_micro_batch_size or training_args.per_device_train_batch_size)
