"""The measures of a curvature report, one function each, run in turn by ``report.run_measures``.

Each takes the shared :class:`MeasureContext` (the model, the Hessian operator of the probe set, the options cut
to the time budget, the progress bar) and fills its fields of ``context.report``; a measure that raises is
left null and explained in ``errors``. The formulas and their sources are in ``docs/curvature.md``:

* :func:`eigenvalues`: Lanczos top-k of the Hessian H of the mean probe loss, with residuals and the smallest
  Ritz value (an upper bound of lambda_min(H)).
* :func:`trace`: Hutchinson's estimate of tr(H) with Rademacher probes, and its standard error.
* :func:`m_sharpness`: the loss increase at the SAM perturbation of radius rho, averaged over micro-batches of m.
* :func:`coherence`: sigma = lambda_max(S) / max_i lambda_max(H_i) of the per-example Gauss-Newton matrices
  (Dexter et al. 2024), from the weighted empirical NTK (``gram``), and lambda_max of their mean.
* :func:`probe`: the growth rate of simulated linearised SGD on the probe set (``stability.linear_stability_probe``).
* :func:`adam`: lambda_max(P^-1 H) of Adam/AdamW against its edge-of-stability threshold (Cohen et al. 2022).
* :func:`verdict`: the critical learning rates, the training set's sigma, the mean-square growth of linearised
  SGD on the Gauss-Newton matrices and the training-set verdict (``stability``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import stability
from .adam import adam_stability_threshold, preconditioned_lambda_max
from .budget import ReportProgress, ReportSizes
from .coherence import CoherenceResult, coherence_from_blocks, train_coherence
from .gram import WeightedNTK, sketch_error_bound
from .heads import per_example_loss
from .msharpness import m_sharpness as m_sharpness_of
from .operators import HessianOperator, output_field, to_device
from .options import ReportOptions
from .probe_set import ProbeSet, chunks, collate_chunks
from .spectrum import hutchinson_trace, lanczos

if TYPE_CHECKING:
    from .report import SharpnessReport

logger = logging.getLogger(__name__)


@dataclass
class MeasureContext:
    """What the measures of one report share.

    Attributes:
        report: the report being filled.
        model: the model, in curvature mode (float32, eval, on its device).
        probe: the probe set, already cut to the budget's ``num_examples``.
        op: the Hessian operator of the mean loss over ``probe.batches``.
        device: where the vectors live.
        options: the report's options, with the budget's Lanczos iterations, trace probes and probe steps.
        sizes: the budget's plan (``budget.plan_report``).
        ntk: the coherence Gram builder, or why it could not be set up (None: coherence not asked for).
        bar: the progress bar; each Hessian-vector product is one step.
        gauss_newton: the coherence result the verdict uses (set by :func:`coherence`).
    """

    report: SharpnessReport
    model: torch.nn.Module
    probe: ProbeSet
    op: HessianOperator
    device: torch.device
    options: ReportOptions
    sizes: ReportSizes
    ntk: WeightedNTK | Exception | None
    bar: ReportProgress
    gauss_newton: CoherenceResult | None = None

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v on the probe set, counted by the progress bar."""
        result = self.op.matvec(v)
        self.bar.step()
        return result

    @property
    def has_verdict_inputs(self) -> bool:
        return self.report.learning_rate is not None and self.report.train_batch_size is not None


def gradient(ctx: MeasureContext) -> None:
    """The norm of the gradient of the mean probe loss (the verdict's test of a minimum)."""
    ctx.report.grad_norm = float(ctx.op.gradient().norm())


def eigenvalues(ctx: MeasureContext) -> None:
    """Top-k Hessian eigenvalues by Lanczos, their residuals and the smallest Ritz value."""
    o, report = ctx.options, ctx.report
    result = lanczos(ctx.hvp, ctx.op.dim, top_k=o.top_k, max_iterations=o.lanczos_iterations, tol=o.lanczos_tol,
                     seed=o.seed, device=ctx.device)
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


def trace(ctx: MeasureContext) -> None:
    """Hutchinson's trace estimate of the Hessian and its standard error."""
    o, report = ctx.options, ctx.report
    result = hutchinson_trace(ctx.hvp, ctx.op.dim, probes=o.trace_probes, seed=o.seed + 1, device=ctx.device)
    report.trace, report.trace_stderr, report.trace_probes = result.trace, result.stderr, o.trace_probes


def m_sharpness(ctx: MeasureContext) -> None:
    """m-sharpness at radius rho over micro-batches of m probe examples (``msharpness.m_sharpness``)."""
    o = ctx.options
    micro = collate_chunks(ctx.probe.collate, ctx.probe.examples, o.m)
    ctx.report.m_sharpness = m_sharpness_of(ctx.model, micro, o.rho)
    ctx.report.m_sharpness_rho, ctx.report.m_sharpness_m = o.rho, o.m


def coherence(ctx: MeasureContext) -> None:
    """Gauss-Newton coherence sigma of the first ``coherence_examples`` and lambda_max of their mean Gauss-Newton
    matrix. The per-example Gauss-Newton matrices are those of the head's standard loss, so the model's loss is
    checked against it first."""
    report, o, ntk = ctx.report, ctx.options, ctx.ntk
    if report.problem_type is None:
        raise ValueError("labels are not a tensor after collation; cannot tell the head's loss")
    _check_standard_loss(ctx.model, ctx.probe.batches[0], report.problem_type, ctx.device)
    if not isinstance(ntk, WeightedNTK):
        raise ntk if ntk is not None else ValueError("coherence: no examples")
    n_coh = ctx.sizes.coherence_examples
    gram = ntk.plan(n_coh, o.coherence_memory_gb, sketch=o.coherence_sketch)
    k = ntk.compute(gram, on_progress=_progress_steps(ctx.bar), seed=o.seed + 4)
    result = coherence_from_blocks(k, n_coh)
    report.coherence, report.coherence_examples = result.sigma, n_coh
    if gram.sketch_dim:
        report.coherence_sketch_dim = gram.sketch_dim
        report.coherence_sketch_error = sketch_sigma_error(k, n_coh, gram.sketch_dim)
    ctx.gauss_newton = result
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


def _check_standard_loss(model: torch.nn.Module, batch: Any, problem_type: str, device: torch.device) -> None:
    """Refuse a model whose loss is not the mean standard loss of its logits (coherence needs that head's H_i)."""
    batch = to_device(batch, device)
    with torch.no_grad():
        out = model(**batch)
    mine = float(per_example_loss(output_field(out, "logits"), batch["labels"], problem_type).mean())
    theirs = float(output_field(out, "loss"))
    if not math.isclose(mine, theirs, rel_tol=1e-4, abs_tol=1e-6):
        raise ValueError(
            f"the model's loss ({theirs:.6g}) is not the mean {problem_type} loss of its logits "
            f"({mine:.6g}); coherence needs the per-example loss Hessians of a standard head"
        )


def _progress_steps(bar: ReportProgress) -> Callable[[int, int], None]:
    """A ``WeightedNTK.compute`` progress callback that moves ``bar`` to the examples done."""
    return lambda done, total: bar.step(done)


def sketch_sigma_error(k: torch.Tensor, n: int, sketch_dim: int) -> float | None:
    """Root-mean-square bound on the relative error of sigma computed from a CountSketched Gram ``k``:
    ``gram.sketch_error_bound`` / lambda_max(S) (max_i lambda_max(H_i) is exact: the diagonal blocks are); None
    when sigma is undefined."""
    result = coherence_from_blocks(k, n)
    if result.sigma is None:
        return None
    lambda_s = result.sigma * result.max_example_lambda_max
    return sketch_error_bound(k, k.shape[0] // n, sketch_dim) / lambda_s


def probe(ctx: MeasureContext) -> None:
    """The linear-stability probe: linearised SGD simulated with batches of ``train_batch_size`` probe examples
    (each step a Hessian-vector product with one SGD batch's Hessian)."""
    report, o = ctx.report, ctx.options
    if not ctx.has_verdict_inputs:
        raise ValueError("needs learning_rate and train_batch_size")
    result = stability.linear_stability_probe(
        _BatchHessian(ctx), ctx.op.dim, len(ctx.probe.examples), learning_rate=report.learning_rate,
        batch_size=report.train_batch_size, steps=o.probe_steps, sampling=o.probe_sampling,
        seed=o.seed + 2, device=ctx.device,
    )
    report.probe_growth_rate, report.probe_steps = result.growth_rate, len(result.step_factors)
    report.probe_sampling = o.probe_sampling
    report.hvp_counts["probe"] = result.num_hvps  # products with SGD-batch Hessians, not the full one


class _BatchHessian:
    """(indices, v) -> |batch| H_batch v for the probe's SGD batches of probe examples."""

    def __init__(self, ctx: MeasureContext) -> None:
        self.ctx = ctx

    def __call__(self, idx: list[int], v: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        parts = [ctx.probe.collate([ctx.probe.examples[i] for i in part])
                 for part in chunks(idx, ctx.options.batch_size)]
        product = HessianOperator(ctx.model, parts).matvec(v) * len(idx)
        ctx.bar.step()
        return product


def adam(ctx: MeasureContext) -> None:
    """Adam/AdamW: lambda_max(P^-1 H) with the optimizer's preconditioner P (``adam.preconditioned_lambda_max``)
    against the threshold (2 + 2 beta1) / ((1 - beta1) eta)."""
    report, o, state = ctx.report, ctx.options, ctx.options.adam_state
    if state.preconditioner.numel() != ctx.op.dim:
        raise ValueError(f"adam_state has {state.preconditioner.numel()} second moments, the model "
                         f"{ctx.op.dim} trainable parameters: pass the optimizer state of this model")
    l2 = None if state.l2 is None else state.l2.to(ctx.device)
    result = preconditioned_lambda_max(ctx.hvp, state.preconditioner.to(ctx.device), l2=l2,
                                       max_iterations=ctx.sizes.adam_iterations, tol=o.lanczos_tol, seed=o.seed + 3)
    eta = report.learning_rate if report.learning_rate is not None else state.learning_rate
    if eta is None:
        raise ValueError("no learning rate: the optimizer's parameter groups have different rates; pass "
                         "learning_rate")
    report.adam_preconditioned_lambda_max = result.eigenvalues[0]
    report.adam_stability_threshold = adam_stability_threshold(state.beta1, eta)
    report.adam_edge_ratio = result.eigenvalues[0] / report.adam_stability_threshold
    report.adam_beta1, report.adam_optimizer = state.beta1, state.optimizer


MEASURE_STEPS: dict[str, Callable[[MeasureContext], None]] = {
    "eigenvalues": eigenvalues, "trace": trace, "m_sharpness": m_sharpness, "coherence": coherence, "probe": probe,
    "adam": adam,
}


def verdict(ctx: MeasureContext) -> None:
    """The critical learning rates, the training set's coherence, the mean-square growth of linearised SGD on the
    Gauss-Newton matrices (the headline ``stable_ggn``, with its timescales) and the training-set verdict
    (``stability.stability_verdict``) for the run's own eta, B and n."""
    report = ctx.report
    lam = report.lambda_max
    if lam is not None:
        report.eta_critical_gd = stability.eta_critical_gd(lam)
        if lam > 0 and report.grad_norm is not None and report.reference_loss:
            report.gradient_ratio = report.grad_norm**2 / (2 * lam * report.reference_loss)
    report.at_minimum = at_minimum(report)
    gauss_newton, n = ctx.gauss_newton, report.num_train_examples
    training = _GaussNewtonVerdict()
    if gauss_newton is not None and gauss_newton.sigma is not None and n is not None:
        training = _gauss_newton_verdict(report, gauss_newton, ctx.options.seed, ctx.probe.dataset_size)
    result = stability.stability_verdict(
        learning_rate=report.learning_rate, batch_size=report.train_batch_size, num_train_examples=n,
        headline=training.headline, probe_is_training_set=bool(report.probe_is_training_set),
        training_bound=training.bound, unseen_limit=training.limit, miss_fraction=training.miss,
    )
    report.stability_verdict, report.stability_reason = result.verdict, result.reason
    report.stable_sgd, report.stability_basis = result.stable_sgd, result.basis
    if training.headline is not None:
        logger.info("curvature report: Gauss-Newton mean-square verdict %s for %s (eta / eta_crit = %.3g, rate %.3g "
                    "per step); training-set verdict %s (%s)", report.ggn_verdict, report.ggn_scope,
                    report.eta_ratio_ggn if report.eta_ratio_ggn is not None else math.nan, report.mean_square_rate,
                    result.verdict, result.basis)


@dataclass
class _GaussNewtonVerdict:
    """What the training-set verdict takes from the Gauss-Newton mean-square analysis (None: not computed)."""

    headline: Any = None  # stability.gauss_newton_verdict
    bound: float | None = None  # lower bound of the training set's mean-square rate
    limit: float | None = None  # curvature of one unseen example that diverges
    miss: float | None = None  # groups under this fraction of the training set may be unseen


def _gauss_newton_verdict(report: SharpnessReport, gauss_newton: CoherenceResult, seed: int,
                          dataset_size: int) -> _GaussNewtonVerdict:
    """The training set's sigma (extrapolated from the probe), Theorem 1's critical rate, and the mean-square
    growth of linearised SGD on the Gauss-Newton factors of the first ``mean_square_examples`` examples."""
    lam, eta, n, b = report.lambda_max, report.learning_rate, report.num_train_examples, report.train_batch_size
    out = _GaussNewtonVerdict()
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
    if eta is None or not eta > 0 or b is None:
        return out
    if k < p:
        report.warnings.append(
            f"stability: the mean-square verdict covers the first {k} of the {p} coherence examples "
            f"({k * rows} Gauss-Newton rows; each solver product costs O(k C r^2) with r <= k C)")
    factors = stability.gauss_newton_factors(gauss_newton.gram[: k * rows, : k * rows], k)
    mean_square = stability.mean_square_growth(factors, learning_rate=eta, batch_size=b, num_train_examples=n)
    # B >= n: each step's batch is the whole training set (gradient descent) whatever the order, so the
    # B-subsets' rate is exact and no second sampler bounds it
    with_replacement = report.eta_critical_ggn_with_replacement = stability.critical_learning_rate(
        factors, batch_size=b, num_train_examples=n, sampler="with_replacement") if b < n else None
    times = stability.timescales(mean_square, lam, report.lambda_min_ritz, report.lambda_max_ggn,
                                 report.steps_trained)
    scope = "training_set" if report.probe_is_training_set else "probe"
    out.headline = stability.gauss_newton_verdict(mean_square, times, lam, scope, with_replacement)
    report.mean_square_rate, report.mean_square_sampler = mean_square.rate, mean_square.sampler
    report.mean_square_subspace_dim = mean_square.subspace_dim
    report.eta_critical_ggn, report.eta_ratio_ggn = mean_square.eta_critical, mean_square.eta_ratio
    report.stability_steps, report.drift_steps = times.stability_steps, times.drift_steps
    report.lambda_max_gap = times.lambda_max_gap
    report.ggn_verdict, report.ggn_reason, report.ggn_scope = out.headline.verdict, out.headline.reason, scope
    report.stable_ggn = out.headline.stable_sgd
    out.limit = report.unseen_example_limit = stability.unseen_example_limit(eta, b, n)
    out.miss = report.probe_miss_fraction = stability.probe_miss_fraction(k, n)
    directions = stability.candidate_directions(factors, mean_square.top_direction)
    out.bound = report.training_rate_bound = stability.training_set_growth_bound(
        factors, directions, learning_rate=eta, batch_size=b, num_train_examples=n)
    return out


def at_minimum(report: SharpnessReport) -> bool | None:
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
