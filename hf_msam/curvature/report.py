"""``sharpness_report``: the curvature report of ``docs/design.md`` section 3 for a Hugging Face model.

Measures (the ``measures`` option): ``eigenvalues`` (Lanczos top-k of the Hessian), ``trace``
(Hutchinson), ``m_sharpness``, ``coherence`` (Gauss-Newton coherence sigma, the Gauss-Newton lambda_max,
the training set's sigma with its interval and the mean-square growth of linearised SGD), ``probe`` (the
simulated linear-stability probe, a diagnostic) and ``adam`` (the preconditioned sharpness of Adam/AdamW,
when the optimizer's state is given). The critical learning rates and the three-way verdict
(``stability.stability_verdict``) follow from them. A measure that fails is reported as null with the
reason in ``errors``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from . import stability
from .adam import AdamState, adam_stability_threshold, preconditioned_lambda_max
from .budget import ReportCosts, ReportPlan, ReportProgress, ReportSizes, default_max_seconds, plan_report
from .coherence import coherence_from_blocks, train_coherence
from .gram import WeightedNTK, parse_sketch, sketch_error_bound
from .heads import infer_problem_type, per_example_loss
from .msharpness import m_sharpness
from .operators import (
    Batch,
    HessianOperator,
    curvature_mode,
    model_device,
    output_field,
    to_device,
    trainable_parameters,
)
from .spectrum import hutchinson_trace, lanczos

SCHEMA_VERSION = 1
MEASURES = ("eigenvalues", "trace", "m_sharpness", "coherence", "probe", "adam")
VERDICT_CODES = {"stable": 1, "inconclusive": 0, "unstable": -1}
OPTIMIZER_NOTE = (
    "The stability theory (Theorem 1 of Dexter et al., the gradient-descent bound 2/lambda_max, the "
    "mean-square growth) is about plain SGD without momentum at a minimum; for momentum or adaptive "
    "optimizers the critical learning rates and the verdict are indicative only. For Adam/AdamW see "
    "adam_preconditioned_lambda_max against adam_stability_threshold (Cohen et al. 2022)."
)
LABEL_KEYS = ("label", "label_ids")
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
    eta_critical_ggn: float | None = None  # the eta at which mean_square_rate crosses 0
    eta_ratio_ggn: float | None = None  # learning_rate / eta_critical_ggn: below 1 iff stable
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


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def _forward_arguments(model: torch.nn.Module) -> set[str] | None:
    """Named parameters of the model's forward (None when it takes only **kwargs)."""
    forward = getattr(model, "_original_forward", model.forward)
    params = inspect.signature(forward).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named or None


def _clean_example(example: Mapping[str, Any], accepted: set[str] | None) -> dict[str, Any]:
    """Model-ready fields: ``label``/``label_ids`` renamed to ``labels``; strings, None and fields the
    forward does not take dropped (the Trainer's ``remove_unused_columns``)."""
    out: dict[str, Any] = {}
    for key, value in example.items():
        key = "labels" if key in LABEL_KEYS else key
        if value is None or isinstance(value, str):
            continue
        if accepted is not None and key not in accepted:
            continue
        out[key] = value
    return out


def _probe_examples(
    dataset: Any, num_examples: int, seed: int, model: torch.nn.Module
) -> tuple[list[dict[str, Any]], list[int]]:
    if num_examples < 1:
        raise ValueError("num_examples: the probe set must hold at least one example (got %d)" % num_examples)
    total = len(dataset)
    if total == 0:
        raise ValueError("dataset: the probe set is empty; pass a dataset with at least one example")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_examples].tolist()
    accepted = _forward_arguments(model)
    examples = [_clean_example(dataset[i], accepted) for i in order]
    if not all("labels" in e for e in examples):
        raise ValueError(
            "dataset: examples have no `labels` (or `label`) field; the curvature is that of the training "
            "loss, which needs the targets: add a labels column"
        )
    return examples, order


def _as_collatable(value: Any) -> Any:
    """A field value in a form ``default_data_collator`` stacks: 0-d tensors, 0-d arrays and NumPy scalars
    become Python scalars, arrays become tensors; lists, Python scalars and tensors stay as they are."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) and np.ndim(value) == 0:
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value


def _pad_collator(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Right-pad ragged sequence fields (``input_ids`` with ``pad_token_id``, the rest with 0), add an
    attention mask if padding was needed and none was given, then ``default_data_collator``.

    Fields may be Python scalars or lists, tensors of any dimension, NumPy scalars or arrays (the rows of
    an HF ``Dataset`` in the python, torch or numpy format)."""
    from transformers import default_data_collator

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        features = [{k: _as_collatable(v) for k, v in f.items()} for f in features]
        ragged = [
            k for k, v in features[0].items()
            if isinstance(v, (list, torch.Tensor)) and len({len(f[k]) for f in features}) > 1
        ]
        if ragged:
            if "input_ids" in ragged and "attention_mask" not in features[0]:
                for f in features:
                    f["attention_mask"] = [1] * len(f["input_ids"])
                ragged.append("attention_mask")
            for key in ragged:
                width = max(len(f[key]) for f in features)
                value = pad_token_id if key == "input_ids" else 0
                for f in features:
                    f[key] = torch.cat([torch.as_tensor(f[key]), torch.full((width - len(f[key]),), value)])
        return default_data_collator(features)

    return collate


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def sharpness_report(
    model: torch.nn.Module,
    dataset: Any,
    *,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    tokenizer: Any = None,
    num_examples: int = 256,
    seed: int = 0,
    measures: Sequence[str] | None = None,
    lanczos_iterations: int = 30,
    lanczos_tol: float = 1e-3,
    top_k: int = 5,
    trace_probes: int = 20,
    rho: float = 0.05,
    m: int = 16,
    batch_size: int = 32,
    learning_rate: float | None = None,
    learning_rate_peak: float | None = None,
    learning_rate_final: float | None = None,
    learning_rate_source: str | None = None,
    train_batch_size: int | None = None,
    num_train_examples: int | None = None,
    probe_steps: int = 30,
    probe_sampling: str = "without_replacement",
    coherence_examples: int | None = None,
    coherence_memory_gb: float = 2.0,
    coherence_sketch: str | int = "auto",
    optimizer: str | None = None,
    adam_state: AdamState | None = None,
    adam_unavailable: str | None = None,
    steps_trained: int | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    max_seconds: float | None = None,
    training_seconds: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> SharpnessReport:
    """Curvature of the mean training loss of ``model`` on a fixed, seeded probe set from ``dataset``.

    ``dataset`` is an HF ``Dataset`` or a list of dicts of model-ready examples with ``labels``;
    ``data_collator`` batches them (default: ``DataCollatorWithPadding(tokenizer)`` when ``tokenizer``
    is given, else right padding with ``config.pad_token_id`` then ``default_data_collator``). The probe
    set is ``num_examples`` examples drawn with ``seed``, processed in chunks of ``batch_size``;
    coherence uses its first ``coherence_examples`` (default all) and holds at most
    ``coherence_memory_gb`` of Jacobian rows; ``coherence_sketch`` ("auto", "exact" or a dimension k) chooses
    the exact Gram or a CountSketch of the rows (``gram.plan_gram``: "auto" sketches when the exact Gram would
    recompute examples), whose dimension and estimated relative error of sigma the report gives
    (``coherence_sketch_dim``, ``coherence_sketch_error``). The report fits ``max_seconds`` (default
    ``budget.default_max_seconds``: on a CPU the ``training_seconds``, between 2 and 10 minutes; 30 minutes on
    an accelerator): the first gradient, HVP and coherence rows are timed with ``clock``, and when the
    estimate exceeds the budget the probe-set size, Lanczos iterations, trace probes, coherence examples
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

    Raises ``ValueError`` for mistakes detectable up front (empty probe set, missing labels, a model
    without a loss, integer labels on a regression head, unknown measures); anything else that fails is
    left null in the report and explained in ``errors``.
    """
    chosen = tuple(MEASURES if measures is None else measures)
    unknown = [x for x in chosen if x not in MEASURES]
    if unknown:
        raise ValueError(f"measures: unknown {unknown}; choose from {list(MEASURES)}")
    for name, value in (("batch_size", batch_size), ("m", m), ("top_k", top_k), ("trace_probes", trace_probes),
                        ("lanczos_iterations", lanczos_iterations), ("probe_steps", probe_steps)):
        if value < 1:
            raise ValueError(f"{name}: must be at least 1 (got {value})")
    if probe_sampling not in stability.PROBE_SAMPLINGS:
        raise ValueError(f"probe_sampling: {probe_sampling!r} is not one of {list(stability.PROBE_SAMPLINGS)}")
    if coherence_examples is not None and coherence_examples < 1:
        raise ValueError(f"coherence_examples: must be at least 1 (got {coherence_examples})")
    coherence_sketch = parse_sketch(coherence_sketch)
    if adam_state is None:  # the default measures include adam only when there is an optimizer state
        chosen = tuple(x for x in chosen if x != "adam")
    # One seeded draw: the Hessian measures use its first num_examples, coherence its first coherence_examples
    # (``examples_used`` in the report says which).
    pool, indices = _probe_examples(dataset, max(num_examples, coherence_examples or 0), seed, model)
    examples = pool[:num_examples]
    if data_collator is None:
        if tokenizer is not None:
            from transformers import DataCollatorWithPadding

            data_collator = DataCollatorWithPadding(tokenizer)
        else:
            pad = getattr(getattr(model, "config", None), "pad_token_id", None)
            data_collator = _pad_collator(0 if pad is None else int(pad))
    collate = data_collator
    batches = [collate(chunk) for chunk in _chunks(examples, batch_size)]
    probe_set = _ProbeSet(examples, pool, batches, collate)
    config = getattr(model, "config", None)
    labels = batches[0]["labels"]
    problem_type = infer_problem_type(config, labels) if isinstance(labels, torch.Tensor) else None
    if problem_type == "regression" and not labels.is_floating_point():
        raise ValueError(
            "labels: integer class labels but the model has a regression head (num_labels=1 / "
            "problem_type='regression'); pass float targets for regression, or load the model with "
            "num_labels=<number of classes> for classification"
        )
    n_train = int(num_train_examples) if num_train_examples is not None else len(dataset)
    report = SharpnessReport(
        num_examples=len(examples),
        probe_indices=indices,
        num_parameters=sum(p.numel() for p in trainable_parameters(model)),
        problem_type=problem_type,
        learning_rate=learning_rate,
        learning_rate_peak=learning_rate_peak,
        learning_rate_final=learning_rate_final,
        learning_rate_source=learning_rate_source or ("given" if learning_rate is not None else None),
        train_batch_size=train_batch_size,
        num_train_examples=n_train,
        steps_trained=steps_trained,
    )
    if optimizer is not None and "sgd" not in optimizer.lower():
        report.warnings.append(f"optimizer {optimizer!r} is not plain SGD: see optimizer_note")
    if "adam" in (measures or ()) and adam_state is None and adam_unavailable is None:
        raise ValueError("measures: 'adam' needs adam_state, the Adam/AdamW optimizer's second moments")
    if adam_unavailable is not None:
        (report.errors if "adam" in (measures or ()) else report.warnings).append(f"adam: {adam_unavailable}")
    if max_seconds is None:
        device_type = torch.device(device).type if device is not None else model_device(model).type
        max_seconds = default_max_seconds(device_type, training_seconds)
    if not max_seconds > 0:
        raise ValueError(f"max_seconds: the report's time budget must be > 0 seconds (got {max_seconds})")
    options = _Options(chosen, lanczos_iterations, lanczos_tol, top_k, trace_probes, rho, m, batch_size, seed,
                       probe_steps, probe_sampling, coherence_examples, coherence_memory_gb, progress,
                       float(max_seconds), clock, adam_state, coherence_sketch, len(dataset))
    with curvature_mode(model, device):
        _fill(report, model, probe_set, options)
    return report


@dataclass(frozen=True)
class _ProbeSet:
    """The probe examples of one report.

    Attributes:
        examples: the first ``num_examples`` of ``pool``, which the Hessian measures take.
        pool: the seeded draw from the dataset; coherence takes its first ``coherence_examples``.
        batches: ``examples`` collated in chunks of ``batch_size``.
        collate: the data collator.
    """

    examples: list[dict[str, Any]]
    pool: list[dict[str, Any]]
    batches: list[Batch]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]


@dataclass
class _Options:
    measures: tuple[str, ...]
    lanczos_iterations: int
    lanczos_tol: float
    top_k: int
    trace_probes: int
    rho: float
    m: int
    batch_size: int
    seed: int
    probe_steps: int
    probe_sampling: str
    coherence_examples: int | None
    coherence_memory_gb: float
    progress: bool
    max_seconds: float
    clock: Callable[[], float]
    adam_state: AdamState | None
    coherence_sketch: str | int = "auto"
    dataset_size: int = 0


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
    report: SharpnessReport, model: torch.nn.Module, probe_set: _ProbeSet, o: _Options
) -> tuple[ReportPlan, WeightedNTK | Exception | None]:
    """Time a gradient and an HVP on the first batch and the coherence rows of one example, fit the sizes to
    ``o.max_seconds`` (``budget.plan_report``), print the plan, and record it in the report. Returns the plan
    and the coherence Gram builder (or why it could not be set up)."""
    examples, pool, chosen = probe_set.examples, probe_set.pool, o.measures
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


def _fill(report: SharpnessReport, model: torch.nn.Module, probe_set: _ProbeSet, o: _Options) -> None:
    """Plan the measures within ``o.max_seconds`` (:func:`_plan`), then run each chosen one into ``report``."""
    examples, batches, collate, chosen = probe_set.examples, probe_set.batches, probe_set.collate, o.measures
    _check_outputs(model, batches[0])
    plan, ntk = _plan(report, model, probe_set, o)
    sizes = plan.sizes
    if sizes.num_examples < len(examples):
        examples = examples[: sizes.num_examples]
        batches = [collate(chunk) for chunk in _chunks(examples, o.batch_size)]
        report.num_examples = len(examples)
    o = replace(o, lanczos_iterations=sizes.lanczos_iterations or o.lanczos_iterations,
                trace_probes=sizes.trace_probes or o.trace_probes, probe_steps=sizes.probe_steps or o.probe_steps)
    _baseline(report, model, batches)
    if not math.isfinite(report.loss):
        report.errors.append(
            f"loss: not finite ({report.loss}) at the current weights; no curvature measure was computed"
        )
        report.stability_verdict = "inconclusive"
        report.stability_reason = "The loss is not finite at these weights, so there is no minimum to judge."
        report.stability_basis = "not_at_minimum"
        return
    op = HessianOperator(model, batches)
    device = model_device(model)
    verdict_inputs = report.learning_rate is not None and report.train_batch_size is not None
    n_coh = sizes.coherence_examples
    everything, first = f"probe[0:{len(examples)}]", f"probe[0:{n_coh}]"
    report.examples_used = {
        "eigenvalues": everything, "trace": everything, "m_sharpness": everything, "adam": everything,
        "coherence": first, "lambda_max_ggn": first, "mean_square": first,
        "probe": f"SGD batches drawn from {everything}",
    }
    report.examples_used = {k: v for k, v in report.examples_used.items()
                            if k in chosen or (k in ("lambda_max_ggn", "mean_square") and "coherence" in chosen)}
    gauss_newton: dict[str, Any] = {}
    units = {
        "gradient": 1,
        "verdict": 1,
        "eigenvalues": o.lanczos_iterations,
        "trace": o.trace_probes,
        "m_sharpness": 1,
        "coherence": (ntk.plan(n_coh, o.coherence_memory_gb, sketch=o.coherence_sketch).row_evaluations
                      if isinstance(ntk, WeightedNTK) else 1),
        "probe": o.probe_steps,
        "adam": sizes.adam_iterations,
    }
    bar = ReportProgress({name: plan.seconds[name] for name in ("gradient", *chosen)}, o.progress, o.clock)

    def counted(v: torch.Tensor) -> torch.Tensor:
        result = op.matvec(v)
        bar.step()
        return result

    def run(name: str, fn: Callable[[], None]) -> None:
        start, hvps = o.clock(), op.num_hvps
        bar.start(name, units[name])
        try:
            fn()
        except Exception as exc:  # a failed measure stays null and is explained; the report never crashes
            report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        report.seconds[name] = o.clock() - start
        report.hvp_counts[name] = report.hvp_counts.get(name, 0) + op.num_hvps - hvps
        bar.finish()

    def gradient() -> None:
        report.grad_norm = float(op.gradient().norm())

    run("gradient", gradient)

    def eigenvalues() -> None:
        result = lanczos(counted, op.dim, top_k=o.top_k, max_iterations=o.lanczos_iterations,
                         tol=o.lanczos_tol, seed=o.seed, device=device)
        report.top_eigenvalues = result.eigenvalues
        report.top_eigenvalue_residuals = result.residuals
        report.lambda_max, report.lambda_max_residual = result.eigenvalues[0], result.residuals[0]
        report.lanczos_iterations, report.lanczos_converged = result.iterations, result.converged
        report.lambda_min_ritz = result.smallest
        if not result.converged:
            report.warnings.append(
                f"eigenvalues: Lanczos stopped after {result.iterations} iterations before the residuals "
                f"reached lanczos_tol={o.lanczos_tol} relative; see top_eigenvalue_residuals"
            )

    def trace() -> None:
        result = hutchinson_trace(counted, op.dim, probes=o.trace_probes, seed=o.seed + 1, device=device)
        report.trace, report.trace_stderr, report.trace_probes = result.trace, result.stderr, o.trace_probes

    def sharpness() -> None:
        micro = [collate(chunk) for chunk in _chunks(examples, o.m)]
        report.m_sharpness = m_sharpness(model, micro, o.rho)
        report.m_sharpness_rho, report.m_sharpness_m = o.rho, o.m

    def coherence() -> None:
        if report.problem_type is None:
            raise ValueError("labels are not a tensor after collation; cannot tell the head's loss")
        check_batch = to_device(batches[0], device)
        with torch.no_grad():
            out = model(**check_batch)
        mine = float(per_example_loss(output_field(out, "logits"), check_batch["labels"], report.problem_type).mean())
        theirs = float(output_field(out, "loss"))
        if not math.isclose(mine, theirs, rel_tol=1e-4, abs_tol=1e-6):
            raise ValueError(
                f"the model's loss ({theirs:.6g}) is not the mean {report.problem_type} loss of its logits "
                f"({mine:.6g}); coherence needs the per-example loss Hessians of a standard head"
            )
        if not isinstance(ntk, WeightedNTK):
            raise ntk if ntk is not None else ValueError("coherence: no examples")
        gram = ntk.plan(n_coh, o.coherence_memory_gb, sketch=o.coherence_sketch)
        k = ntk.compute(gram, on_progress=lambda done, total: bar.step(done), seed=o.seed + 4)
        result = coherence_from_blocks(k, n_coh)
        report.coherence, report.coherence_examples = result.sigma, n_coh
        if gram.sketch_dim:
            report.coherence_sketch_dim = gram.sketch_dim
            report.coherence_sketch_error = sketch_sigma_error(k, n_coh, gram.sketch_dim)
        gauss_newton["result"] = result
        report.coherence_hessian = "gauss-newton"
        report.lambda_max_ggn = result.lambda_max_ggn
        report.max_example_lambda_max_ggn = result.max_example_lambda_max
        if result.sigma is None:
            report.warnings.append("coherence: every per-example Gauss-Newton matrix is zero; sigma undefined")
        if not report.interpolates:
            report.warnings.append(
                "coherence: the model does not fit every probe example, so the Gauss-Newton H_i are an "
                "approximation of the per-example Hessians (exact only at an interpolating minimum)"
            )

    def probe() -> None:
        if not verdict_inputs:
            raise ValueError("needs learning_rate and train_batch_size")

        def batch_hvp(idx: list[int], v: torch.Tensor) -> torch.Tensor:
            chunks = [collate([examples[i] for i in part]) for part in _chunks(idx, o.batch_size)]
            product = HessianOperator(model, chunks).matvec(v) * len(idx)
            bar.step()
            return product

        result = stability.linear_stability_probe(
            batch_hvp, op.dim, len(examples), learning_rate=report.learning_rate,
            batch_size=report.train_batch_size, steps=o.probe_steps, sampling=o.probe_sampling,
            seed=o.seed + 2, device=device,
        )
        report.probe_growth_rate, report.probe_steps = result.growth_rate, len(result.step_factors)
        report.probe_sampling = o.probe_sampling
        report.hvp_counts["probe"] = result.num_hvps  # products with SGD-batch Hessians, not the full one

    def adam() -> None:
        state = o.adam_state
        if state.preconditioner.numel() != op.dim:
            raise ValueError(f"adam_state has {state.preconditioner.numel()} second moments, the model "
                             f"{op.dim} trainable parameters: pass the optimizer state of this model")
        l2 = None if state.l2 is None else state.l2.to(device)
        result = preconditioned_lambda_max(counted, state.preconditioner.to(device), l2=l2,
                                           max_iterations=sizes.adam_iterations, tol=o.lanczos_tol, seed=o.seed + 3)
        eta = report.learning_rate if report.learning_rate is not None else state.learning_rate
        if eta is None:
            raise ValueError("no learning rate: the optimizer's parameter groups have different rates; pass "
                             "learning_rate")
        report.adam_preconditioned_lambda_max = result.eigenvalues[0]
        report.adam_stability_threshold = adam_stability_threshold(state.beta1, eta)
        report.adam_edge_ratio = result.eigenvalues[0] / report.adam_stability_threshold
        report.adam_beta1, report.adam_optimizer = state.beta1, state.optimizer

    steps = {"eigenvalues": eigenvalues, "trace": trace, "m_sharpness": sharpness, "coherence": coherence,
             "probe": probe, "adam": adam}
    for name in MEASURES:
        if name in chosen:
            run(name, steps[name])
    run("verdict", lambda: _verdict(report, gauss_newton.get("result"), o.seed, o.dataset_size))
    bar.close()
    report.hvp_count = sum(report.hvp_counts.values())


def sketch_sigma_error(k: torch.Tensor, n: int, sketch_dim: int) -> float | None:
    """Root-mean-square bound on the relative error of sigma computed from a CountSketched Gram ``k``:
    ``gram.sketch_error_bound`` / lambda_max(S) (max_i lambda_max(H_i) is exact: the diagonal blocks are); None
    when sigma is undefined."""
    result = coherence_from_blocks(k, n)
    if result.sigma is None:
        return None
    lambda_s = result.sigma * result.max_example_lambda_max
    return sketch_error_bound(k, k.shape[0] // n, sketch_dim) / lambda_s


def _verdict(report: SharpnessReport, gauss_newton: Any, seed: int, dataset_size: int) -> None:
    """The critical learning rates, the training set's coherence, the mean-square growth of linearised SGD on the
    Gauss-Newton matrices (the headline ``stable_ggn``, with its timescales) and the training-set verdict
    (``stability.stability_verdict``) for the run's own eta, B and n."""
    lam = report.lambda_max
    eta, n, b = report.learning_rate, report.num_train_examples, report.train_batch_size
    if lam is not None:
        report.eta_critical_gd = stability.eta_critical_gd(lam)
        if lam > 0 and report.grad_norm is not None and report.reference_loss:
            report.gradient_ratio = report.grad_norm**2 / (2 * lam * report.reference_loss)
    report.at_minimum = _at_minimum(report)
    headline, bound, limit, miss = None, None, None, None
    if gauss_newton is not None and gauss_newton.sigma is not None and n is not None:
        p = gauss_newton.num_examples
        rows = gauss_newton.gram.shape[0] // p
        k = report.mean_square_examples = stability.mean_square_examples(p, rows)
        report.probe_is_training_set = dataset_size == n and k >= n
        trained = train_coherence(gauss_newton.s_matrix, gauss_newton.max_example_lambda_max, n, seed=seed)
        report.coherence_train_estimate = trained.estimate
        report.coherence_train_interval = list(trained.interval)
        report.coherence_train_confidence = trained.confidence
        if not report.probe_is_training_set:
            report.warnings.append(
                f"coherence: the training set's sigma and its interval are extrapolated from {p} of {n} examples, "
                "conditional on the probe having seen every aligned group and outlier (a group under "
                f"{stability.probe_miss_fraction(p, n):.1%} of the training set can be absent with probability "
                ">= 5%); no verdict uses them")
        if 1 < trained.num_probe_examples < min(8, n):
            report.warnings.append(f"coherence: {trained.num_probe_examples} examples are too few to extrapolate "
                                   "sigma to the training set; the interval is the probe's sigma only")
        if lam is not None and b is not None:
            report.eta_critical_theorem1 = stability.eta_critical_theorem1(lam, trained.estimate, n, b)
        if eta is not None and eta > 0 and b is not None:
            if k < p:
                report.warnings.append(
                    f"stability: the mean-square verdict covers the first {k} of the {p} coherence examples "
                    f"({k * rows} Gauss-Newton rows; each solver product costs O(k C r^2) with r <= k C)")
            factors = stability.gauss_newton_factors(gauss_newton.gram[: k * rows, : k * rows], k)
            mean_square = stability.mean_square_growth(factors, learning_rate=eta, batch_size=b, num_train_examples=n)
            times = stability.timescales(mean_square, lam, report.lambda_min_ritz, report.lambda_max_ggn,
                                         report.steps_trained)
            scope = "training_set" if report.probe_is_training_set else "probe"
            headline = stability.gauss_newton_verdict(mean_square, times, lam, scope)
            report.mean_square_rate, report.mean_square_sampler = mean_square.rate, mean_square.sampler
            report.mean_square_subspace_dim = mean_square.subspace_dim
            report.eta_critical_ggn, report.eta_ratio_ggn = mean_square.eta_critical, mean_square.eta_ratio
            report.stability_steps, report.drift_steps = times.stability_steps, times.drift_steps
            report.lambda_max_gap = times.lambda_max_gap
            report.ggn_verdict, report.ggn_reason, report.ggn_scope = headline.verdict, headline.reason, scope
            report.stable_ggn = headline.stable_sgd
            limit = report.unseen_example_limit = stability.unseen_example_limit(eta, b, n)
            miss = report.probe_miss_fraction = stability.probe_miss_fraction(k, n)
            directions = stability.candidate_directions(factors, mean_square.top_direction)
            bound = report.training_rate_bound = stability.training_set_growth_bound(
                factors, directions, learning_rate=eta, batch_size=b, num_train_examples=n)
    verdict = stability.stability_verdict(
        learning_rate=eta, batch_size=b, num_train_examples=n, headline=headline,
        probe_is_training_set=bool(report.probe_is_training_set), training_bound=bound, unseen_limit=limit,
        miss_fraction=miss,
    )
    report.stability_verdict, report.stability_reason = verdict.verdict, verdict.reason
    report.stable_sgd, report.stability_basis = verdict.stable_sgd, verdict.basis
    if headline is not None:
        logger.info("curvature report: Gauss-Newton mean-square verdict %s for %s (eta / eta_crit = %.3g, rate %.3g "
                    "per step); training-set verdict %s (%s)", report.ggn_verdict, report.ggn_scope,
                    report.eta_ratio_ggn if report.eta_ratio_ggn is not None else math.nan, report.mean_square_rate,
                    verdict.verdict, verdict.basis)


def _at_minimum(report: SharpnessReport) -> bool | None:
    """False when the report shows the weights are not at a minimum of every probe example: negative curvature
    (``lambda_min_ritz`` < -``NEGATIVE_CURVATURE_TOL`` lambda_max, certain: a Rayleigh quotient), a large
    gradient (``gradient_ratio`` > ``GRADIENT_TOL``) or an unfitted example; None when unknown."""
    lam, low = report.lambda_max, report.lambda_min_ritz
    if lam is not None and low is not None and low < -stability.NEGATIVE_CURVATURE_TOL * lam:
        return False
    if report.gradient_ratio is not None and report.gradient_ratio > stability.GRADIENT_TOL:
        return False
    if report.interpolates is None or lam is None or report.gradient_ratio is None:
        return None if report.interpolates is not False else False
    return report.interpolates
