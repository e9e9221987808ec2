"""``sharpness_report``: the curvature report of ``docs/curvature.md`` for a Hugging Face model.

The pipeline (:func:`sharpness_report`): options (``options.ReportOptions``) -> a seeded probe set
(``probe_set.draw_probe_set``) -> the model's outputs checked -> a plan that fits the time budget
(:func:`_plan`, ``budget.plan_report``) -> the loss at the weights (:func:`_baseline`) -> the measures, one
function each (``measures``: ``eigenvalues``, ``trace``, ``m_sharpness``, ``coherence``, ``probe``, ``adam``),
then the ``verdict``. A measure that fails is reported as null with the reason in ``errors``.
:meth:`SharpnessReport.summary` gives the report in words (``summary``), for the model card and the command line.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .budget import ReportCosts, ReportPlan, ReportProgress, ReportSizes, default_max_seconds, plan_report
from .gram import WeightedNTK
from .heads import infer_problem_type, per_example_loss
from .measures import MEASURE_STEPS, MeasureContext, gradient, verdict
from .operators import Batch, HessianOperator, curvature_mode, model_device, output_field, to_device, trainable_parameters
from .options import MEASURES, ReportOptions
from .probe_set import Collator, ProbeSet, draw_probe_set
from .summary import CurvatureSummary, summarise

__all__ = ["MEASURES", "OPTIMIZER_NOTE", "SCHEMA_VERSION", "ReportOptions", "SharpnessReport", "sharpness_report"]

SCHEMA_VERSION = 1
VERDICT_CODES = {"stable": 1, "inconclusive": 0, "unstable": -1}
OPTIMIZER_NOTE = (
    "The stability theory (Theorem 1 of Dexter et al., the gradient-descent bound 2/lambda_max, the "
    "mean-square growth) is about plain SGD without momentum at a minimum; for momentum or adaptive "
    "optimizers the critical learning rates and the verdict are indicative only. For Adam/AdamW see "
    "adam_preconditioned_lambda_max against adam_stability_threshold (Cohen et al. 2022)."
)
logger = logging.getLogger(__name__)


@dataclass
class SharpnessReport:
    """The numbers of one curvature report; null (None) wherever a number was not computed."""

    schema_version: int = SCHEMA_VERSION
    num_examples: int = 0
    probe_indices: list[int] = field(default_factory=list)  # dataset rows of the probe set, in order
    examples_used: dict[str, str] = field(default_factory=dict)  # measure -> which probe examples it used
    num_parameters: int = 0
    problem_type: str | None = None
    loss: float | None = None
    grad_norm: float | None = None
    probe_accuracy: float | None = None
    interpolates: bool | None = None
    lambda_max: float | None = None
    lambda_max_residual: float | None = None
    lambda_min_ritz: float | None = None  # smallest Lanczos Ritz value: lambda_min(H) <= this
    top_eigenvalues: list[float] | None = None
    top_eigenvalue_residuals: list[float] | None = None
    lanczos_iterations: int | None = None
    lanczos_converged: bool | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    trace_probes: int | None = None
    m_sharpness: float | None = None
    m_sharpness_rho: float | None = None
    m_sharpness_m: int | None = None
    coherence: float | None = None
    coherence_examples: int | None = None
    coherence_hessian: str | None = None
    coherence_sketch_dim: int | None = None  # k of the CountSketch of the Jacobian rows; null: exact Gram
    coherence_sketch_error: float | None = None  # rms bound on the relative error of sigma from the sketch
    coherence_train_estimate: float | None = None
    coherence_train_interval: list[float] | None = None
    coherence_train_confidence: float | None = None
    lambda_max_ggn: float | None = None
    max_example_lambda_max_ggn: float | None = None
    learning_rate: float | None = None  # the rate both verdicts judge: the one in force (learning_rate_source)
    learning_rate_peak: float | None = None  # the schedule's peak (TrainingArguments.learning_rate)
    learning_rate_final: float | None = None  # the rate in force at the end of the run (its last optimizer step)
    learning_rate_source: str | None = None
    train_batch_size: int | None = None
    num_train_examples: int | None = None
    eta_critical_theorem1: float | None = None
    eta_critical_gd: float | None = None
    reference_loss: float | None = None  # loss of a chance-level predictor (log C; mean y^2 for regression)
    gradient_ratio: float | None = None  # ||g||^2 / (2 lambda_max reference_loss): small at a minimum
    # the headline: mean-square stability of linearised SGD on the Gauss-Newton matrices (stability.py)
    stable_ggn: bool | None = None  # true / false / null for stable / unstable / inconclusive
    ggn_verdict: str | None = None
    ggn_reason: str | None = None
    ggn_scope: str | None = None  # "training_set" (the probe is every training example) or "probe"
    mean_square_rate: float | None = None  # log growth of E||v||^2 per SGD step (linearised, Gauss-Newton)
    mean_square_sampler: str | None = None  # the SGD batches modelled: uniform B-subsets (the Trainer's)
    mean_square_subspace_dim: int | None = None
    mean_square_examples: int | None = None  # the first k coherence examples the mean-square verdict covers
    eta_critical_ggn: float | None = None  # the eta at which mean_square_rate crosses 0 (uniform B-subsets)
    eta_critical_ggn_with_replacement: float | None = None  # the same for B draws with replacement; null if B >= n
    eta_ratio_ggn: float | None = None  # learning_rate / eta_critical_ggn: >= 1 unstable; stable below the above
    lambda_max_gap: float | None = None  # lambda_max - lambda_max_ggn (the Hessian's residual term)
    stability_steps: float | None = None  # 1 / |mean_square_rate|
    drift_steps: float | None = None  # 1 / (eta |lambda_min|): drift along negative curvature; null: none
    steps_trained: int | None = None
    at_minimum: bool | None = None  # no negative curvature, small gradient, every probe example fitted
    # what the probe can say about the training set
    probe_is_training_set: bool | None = None
    probe_miss_fraction: float | None = None  # groups under this fraction of the training set may be unseen
    unseen_example_limit: float | None = None  # curvature of one unseen example (own direction) that diverges
    training_rate_bound: float | None = None  # lower bound of the training set's mean_square_rate
    stability_verdict: str | None = None  # "stable", "unstable" or "inconclusive" for the training set
    stability_reason: str | None = None
    stable_sgd: bool | None = None  # true / false / null for stable / unstable / inconclusive
    stability_basis: str | None = None
    adam_preconditioned_lambda_max: float | None = None
    adam_stability_threshold: float | None = None
    adam_edge_ratio: float | None = None
    adam_beta1: float | None = None
    adam_optimizer: str | None = None  # the optimizer analysed ("AdamW", "Adam, amsgrad", ...)
    probe_growth_rate: float | None = None
    probe_steps: int | None = None
    probe_sampling: str | None = None
    # the time budget (budget.py): the budget in seconds, the plan's estimate, and what was cut to fit it
    budget_seconds: float | None = None
    estimated_seconds: float | None = None
    budget_cuts: list[str] = field(default_factory=list)
    hvp_count: int = 0
    hvp_counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    optimizer_note: str = OPTIMIZER_NOTE
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (non-finite floats become null)."""
        return {key: _finite_or_none(value) for key, value in asdict(self).items()}

    def to_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=False)

    def metrics(self, prefix: str = "sharpness_") -> dict[str, float | int | str]:
        """For Trainer logs: the scalar numbers (booleans as 0/1, seconds as ``seconds_<measure>``), the headline
        and the training-set verdicts as ``ggn_verdict_code`` and ``stability_verdict_code`` (1 stable,
        0 inconclusive, -1 unstable) and, as text (TensorBoard files it as a text summary), ``ggn_verdict``,
        ``ggn_reason``, ``stability_verdict`` and ``stability_reason``."""
        flat: dict[str, float | int | str] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, bool):
                flat[prefix + key] = int(value)
            elif isinstance(value, (int, float)):
                flat[prefix + key] = value
        for key, value in self.seconds.items():
            flat[f"{prefix}seconds_{key}"] = value
        for name, reason in (("ggn_verdict", "ggn_reason"), ("stability_verdict", "stability_reason")):
            if getattr(self, name) is not None:
                flat[f"{prefix}{name}_code"] = VERDICT_CODES[getattr(self, name)]
                flat[prefix + name] = getattr(self, name)
                flat[prefix + reason] = getattr(self, reason)
        return flat

    def summary(self) -> CurvatureSummary:
        """The report in words: the few numbers a reader wants and the verdicts as sentences (``summary``)."""
        return summarise(self.to_dict())


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def sharpness_report(
    model: torch.nn.Module,
    dataset: Any,
    options: ReportOptions | None = None,
    *,
    data_collator: Collator | None = None,
    tokenizer: Any = None,
    **overrides: Any,
) -> SharpnessReport:
    """Curvature of the mean training loss of ``model`` on a fixed, seeded probe set from ``dataset``.

    ``options`` is a :class:`ReportOptions` (default: its defaults); keyword ``overrides`` replace its fields, so
    ``sharpness_report(model, data, num_examples=64, measures=["eigenvalues"], learning_rate=0.1)`` works alone.

    ``dataset`` is an HF ``Dataset`` or a list of dicts of model-ready examples with ``labels``;
    ``data_collator`` batches them (default: ``DataCollatorWithPadding(tokenizer)`` when ``tokenizer``
    is given, else right padding with ``config.pad_token_id`` then ``default_data_collator``). The probe
    set is ``num_examples`` examples drawn with ``seed``, processed in chunks of ``batch_size``;
    coherence uses its first ``coherence_examples`` (default all) and holds at most
    ``coherence_memory_gb`` of Jacobian rows; ``coherence_sketch`` ("auto", "exact" or a dimension k) chooses
    the exact Gram or a CountSketch of the rows (``gram.plan_gram``: "auto" sketches when the exact Gram would
    recompute examples), whose dimension and estimated relative error of sigma the report gives
    (``coherence_sketch_dim``, ``coherence_sketch_error``). The report fits ``max_seconds`` (default
    ``budget.default_max_seconds``): the first gradient, HVP and coherence rows are timed with ``clock``, and
    when the estimate exceeds the budget the probe-set size, Lanczos iterations, trace probes, coherence examples
    and probe steps are scaled down together (``budget.plan_report``; the plan and its estimate are printed
    before the work starts, what was cut is in ``budget_cuts``). The verdict needs the SGD ``learning_rate``,
    ``train_batch_size`` and ``num_train_examples`` (default ``len(dataset)``); ``learning_rate`` is the rate
    both verdicts judge, which in training is the one in force (``arguments.report_options``), and
    ``learning_rate_peak``, ``learning_rate_final`` and ``learning_rate_source`` are recorded beside it. ``adam_state``
    (``adam.adam_state_from_optimizer`` / ``adam_state_from_state_dict``) adds the Adam/AdamW preconditioned
    sharpness; its threshold uses ``learning_rate`` when given, else the optimizer's current rate (its parameter
    groups' ``lr``). ``adam_unavailable`` says why the run's optimizer has no Adam analysis
    (``adam.adam_state_from_optimizer``'s refusal): a warning, or the ``adam`` measure's error when ``measures``
    asks for it. ``steps_trained`` (the run's optimizer steps) is recorded beside the drift timescale.

    Raises ``ValueError`` for mistakes detectable up front (invalid options, empty probe set, missing labels, a
    model without a loss, integer labels on a regression head); anything else that fails is left null in the
    report and explained in ``errors``.
    """
    o = replace(options, **overrides) if options is not None else ReportOptions(**overrides)
    probe = draw_probe_set(model, dataset, num_examples=o.num_examples, coherence_examples=o.coherence_examples,
                           seed=o.seed, batch_size=o.batch_size, data_collator=data_collator, tokenizer=tokenizer)
    report = _new_report(model, probe, o)
    if o.asks_for_adam and o.adam_state is None and o.adam_unavailable is None:
        raise ValueError("measures: 'adam' needs adam_state, the Adam/AdamW optimizer's second moments")
    if o.adam_unavailable is not None:
        (report.errors if o.asks_for_adam else report.warnings).append(f"adam: {o.adam_unavailable}")
    if o.max_seconds is None:
        device_type = torch.device(o.device).type if o.device is not None else model_device(model).type
        o = replace(o, max_seconds=default_max_seconds(device_type, o.training_seconds))
    o = replace(o, max_seconds=float(o.max_seconds))
    with curvature_mode(model, o.device):
        _measure(report, model, probe, o)
    return report


def _new_report(model: torch.nn.Module, probe: ProbeSet, o: ReportOptions) -> SharpnessReport:
    """The report's inputs: probe set, parameters, the head's problem type and the SGD run it judges."""
    labels = probe.batches[0]["labels"]
    config = getattr(model, "config", None)
    problem_type = infer_problem_type(config, labels) if isinstance(labels, torch.Tensor) else None
    if problem_type == "regression" and not labels.is_floating_point():
        raise ValueError(
            "labels: integer class labels but the model has a regression head (num_labels=1 / "
            "problem_type='regression'); pass float targets for regression, or load the model with "
            "num_labels=<number of classes> for classification"
        )
    report = SharpnessReport(
        num_examples=len(probe.examples),
        probe_indices=probe.indices,
        num_parameters=sum(p.numel() for p in trainable_parameters(model)),
        problem_type=problem_type,
        learning_rate=o.learning_rate,
        learning_rate_peak=o.learning_rate_peak,
        learning_rate_final=o.learning_rate_final,
        learning_rate_source=o.learning_rate_source or ("given" if o.learning_rate is not None else None),
        train_batch_size=o.train_batch_size,
        num_train_examples=int(o.num_train_examples) if o.num_train_examples is not None else probe.dataset_size,
        steps_trained=o.steps_trained,
    )
    if o.optimizer is not None and "sgd" not in o.optimizer.lower():
        report.warnings.append(f"optimizer {o.optimizer!r} is not plain SGD: see optimizer_note")
    return report


def _measure(report: SharpnessReport, model: torch.nn.Module, probe: ProbeSet, o: ReportOptions) -> None:
    """Plan the measures within ``o.max_seconds`` (:func:`_plan`), cut the probe set and the options to the plan,
    then run the gradient, each chosen measure and the verdict into ``report``."""
    chosen = o.chosen_measures
    _check_outputs(model, probe.batches[0])
    plan, ntk = _plan(report, model, probe, o)
    sizes = plan.sizes
    probe = probe.first(sizes.num_examples)
    report.num_examples = len(probe.examples)
    o = replace(o, lanczos_iterations=sizes.lanczos_iterations or o.lanczos_iterations,
                trace_probes=sizes.trace_probes or o.trace_probes, probe_steps=sizes.probe_steps or o.probe_steps)
    _baseline(report, model, probe.batches)
    if not math.isfinite(report.loss):
        report.errors.append(
            f"loss: not finite ({report.loss}) at the current weights; no curvature measure was computed"
        )
        report.stability_verdict = "inconclusive"
        report.stability_reason = "The loss is not finite at these weights, so there is no minimum to judge."
        report.stability_basis = "not_at_minimum"
        return
    report.examples_used = _examples_used(len(probe.examples), sizes.coherence_examples, chosen)
    bar = ReportProgress({name: plan.seconds[name] for name in ("gradient", *chosen)}, o.progress, o.clock)
    ctx = MeasureContext(report, model, probe, HessianOperator(model, probe.batches), model_device(model), o, sizes,
                         ntk, bar)
    units = _progress_units(ctx)
    _timed(ctx, "gradient", gradient, units)
    for name in MEASURES:
        if name in chosen:
            _timed(ctx, name, MEASURE_STEPS[name], units)
    _timed(ctx, "verdict", verdict, units)
    bar.close()
    report.hvp_count = sum(report.hvp_counts.values())


def _examples_used(num_examples: int, coherence_examples: int, chosen: tuple[str, ...]) -> dict[str, str]:
    """Which probe examples each chosen measure uses: all ``num_examples``, or the first ``coherence_examples``."""
    everything, first = f"probe[0:{num_examples}]", f"probe[0:{coherence_examples}]"
    used = {
        "eigenvalues": everything, "trace": everything, "m_sharpness": everything, "adam": everything,
        "coherence": first, "lambda_max_ggn": first, "mean_square": first,
        "probe": f"SGD batches drawn from {everything}",
    }
    return {k: v for k, v in used.items()
            if k in chosen or (k in ("lambda_max_ggn", "mean_square") and "coherence" in chosen)}


def _progress_units(ctx: MeasureContext) -> dict[str, int]:
    """Steps of the progress bar per measure: its Hessian-vector products (coherence: its row evaluations)."""
    o, ntk = ctx.options, ctx.ntk
    coherence = (ntk.plan(ctx.sizes.coherence_examples, o.coherence_memory_gb, sketch=o.coherence_sketch)
                 .row_evaluations if isinstance(ntk, WeightedNTK) else 1)
    return {"gradient": 1, "verdict": 1, "eigenvalues": o.lanczos_iterations, "trace": o.trace_probes,
            "m_sharpness": 1, "coherence": coherence, "probe": o.probe_steps, "adam": ctx.sizes.adam_iterations}


def _timed(ctx: MeasureContext, name: str, step: Callable[[MeasureContext], None], units: dict[str, int]) -> None:
    """Run one measure, recording its seconds and Hessian-vector products; a failure is recorded in ``errors``."""
    report, o, op = ctx.report, ctx.options, ctx.op
    start, hvps = o.clock(), op.num_hvps
    ctx.bar.start(name, units[name])
    try:
        step(ctx)
    except Exception as exc:  # a failed measure stays null and is explained; the report never crashes
        report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
    report.seconds[name] = o.clock() - start
    report.hvp_counts[name] = report.hvp_counts.get(name, 0) + op.num_hvps - hvps
    ctx.bar.finish()


def _check_outputs(model: torch.nn.Module, batch: Batch) -> Any:
    outputs = model(**to_device(batch, model_device(model)))
    if output_field(outputs, "loss") is None:
        raise ValueError(
            "model: the forward returned no `loss` for a batch with `labels`; use a model with a task head "
            "that computes its loss (e.g. AutoModelForSequenceClassification), not a bare encoder"
        )
    if output_field(outputs, "logits") is None:
        raise ValueError("model: the forward returned no `logits`; the report needs a classification/regression head")
    return outputs


def _baseline(report: SharpnessReport, model: torch.nn.Module, batches: list[Batch]) -> None:
    """Loss at the weights, accuracy, whether every probe example is fit (``interpolates``), and the loss of
    a chance-level predictor (``reference_loss``: log C for C classes, log 2 per label, mean y^2 for
    regression, the loss of predicting 0), the scale of the verdict's gradient test."""
    total, fit, correct, count, squares = 0.0, True, 0, 0, 0.0
    with torch.no_grad():
        for b in batches:
            b = to_device(b, model_device(model))
            out = model(**b)
            size = int(b["labels"].shape[0])
            total += float(output_field(out, "loss")) * size
            count += size
            logits = output_field(out, "logits").reshape(size, -1)
            if report.problem_type == "single_label_classification":
                report.reference_loss = math.log(logits.shape[1])
            elif report.problem_type == "multi_label_classification":
                report.reference_loss = math.log(2)
            if report.problem_type == "single_label_classification":
                hits = logits.argmax(dim=1) == b["labels"].reshape(size)
                correct += int(hits.sum())
            elif report.problem_type == "multi_label_classification":
                hits = ((logits > 0) == (b["labels"].reshape(size, -1) > 0.5)).all(dim=1)
                correct += int(hits.sum())
            elif report.problem_type == "regression":
                y = b["labels"].reshape(size, -1).float()
                losses = per_example_loss(logits, y, "regression")
                fit &= bool((losses <= 1e-6 * max(1.0, float((y**2).mean()))).all())
                squares += float((y**2).mean(dim=1).sum())
    report.loss = total / count
    if report.problem_type == "regression":
        report.reference_loss = squares / count
    if report.problem_type in ("single_label_classification", "multi_label_classification"):
        report.probe_accuracy = correct / count
        report.interpolates = correct == count
    elif report.problem_type == "regression":
        report.interpolates = fit


def _plan(
    report: SharpnessReport, model: torch.nn.Module, probe_set: ProbeSet, o: ReportOptions
) -> tuple[ReportPlan, WeightedNTK | Exception | None]:
    """Time a gradient and an HVP on the first batch and the coherence rows of one example, fit the sizes to
    ``o.max_seconds`` (``budget.plan_report``), print the plan, and record it in the report. Returns the plan
    and the coherence Gram builder (or why it could not be set up)."""
    examples, pool, chosen = probe_set.examples, probe_set.pool, o.chosen_measures
    start = o.clock()
    first = HessianOperator(model, probe_set.batches[:1])
    tick = o.clock()
    first.gradient()
    gradient_seconds, tick = (o.clock() - tick) / first.num_examples, o.clock()
    first.matvec(torch.ones(first.dim))
    hvp_seconds = (o.clock() - tick) / first.num_examples
    n_coh = min(o.coherence_examples or len(examples), len(pool)) if "coherence" in chosen else 0
    ntk: WeightedNTK | Exception | None = None
    row_seconds, sketch_seconds, rows, dim, rate = 0.0, 0.0, 1, 1, 1.0
    if n_coh and report.problem_type is not None:
        try:
            ntk = WeightedNTK(model, [probe_set.collate([e]) for e in pool[:n_coh]], report.problem_type)
            gram = ntk.plan(n_coh, o.coherence_memory_gb, sketch=o.coherence_sketch)
            row_seconds = ntk.time_example(o.clock)
            sketch_seconds = ntk.time_sketch(gram, o.clock)
            rate = gram.gram_flops / max(ntk.time_products(gram, o.clock), 1e-12)
            rows, dim = ntk.rows_per_example, ntk.dim
        except Exception as exc:  # reported by the coherence measure
            ntk = exc
    if not isinstance(ntk, WeightedNTK):
        n_coh = 0
    verdict_inputs = report.learning_rate is not None and report.train_batch_size is not None
    requested = ReportSizes(
        num_examples=len(examples),
        lanczos_iterations=o.lanczos_iterations if "eigenvalues" in chosen else 0,
        trace_probes=o.trace_probes if "trace" in chosen else 0,
        coherence_examples=n_coh,
        probe_steps=o.probe_steps if "probe" in chosen and verdict_inputs else 0,
        m_sharpness="m_sharpness" in chosen,
        probe_batch_size=report.train_batch_size or 1,
        adam_iterations=o.lanczos_iterations if "adam" in chosen else 0,
    )
    costs = ReportCosts(hvp_seconds, gradient_seconds, row_seconds, rows, dim, rate, o.coherence_memory_gb,
                        o.coherence_sketch, sketch_seconds)
    plan = plan_report(requested, costs, o.max_seconds)
    report.seconds["planning"] = o.clock() - start
    report.hvp_counts["planning"] = first.num_hvps
    report.budget_seconds, report.estimated_seconds, report.budget_cuts = o.max_seconds, plan.total_seconds, plan.cuts
    logger.info(plan.describe())
    if o.progress:
        print(plan.describe(), file=sys.stderr, flush=True)
    if not plan.fits:
        report.warnings.append(f"budget: even the smallest plan is estimated at {plan.total_seconds:.0f} s, over "
                               f"the {o.max_seconds:.0f} s budget (max_seconds)")
    return plan, ntk
