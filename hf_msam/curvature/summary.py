"""A curvature report in words: the few numbers a reader wants, and the verdicts as sentences and as short labels.

Works on the report's JSON form (``SharpnessReport.to_dict()`` or a saved report file, possibly from an older
version without some keys), so the model card (``hf_msam.publish.card``) and the command line's table
(``cli.format_table``) say the same thing. ``SharpnessReport.summary()`` is :func:`summarise` of itself.

The verdict leads with the headline ``ggn_verdict`` (mean-square stability of linearised SGD on the Gauss-Newton
matrices, with eta / eta_crit, the mean-square rate, the Hessian's excess over the Gauss-Newton lambda_max, the
drift timescale beside the steps trained and the gradient ratio), then the training-set ``stability_verdict``
("stable" / "unstable" / "inconclusive") with its ``stability_reason``; reports without them give ``stable_sgd``
with the rule that decided it (``stability_basis``). Theorem 1 of Dexter et al. (2024) gives the learning rate
from which SGD with Bernoulli batches is unstable, eta >= sigma / (lambda_max sqrt(n/B - 1)), here with the
estimated training-set sigma; 2 / lambda_max is the gradient-descent bound. See ``docs/curvature.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_BASIS = {
    "theorem1": "by Theorem 1 of Dexter et al. (2024): lambda_max reaches sigma / (eta sqrt(n/B - 1))",
    "gd_bound": "by the gradient-descent bound: the learning rate exceeds 2 / lambda_max",
    "probe": "by the linear-stability probe (the simulated linearised SGD dynamics {grow})",
}


@dataclass
class CurvatureSummary:
    """What a reader of a report wants first.

    Attributes:
        rows: (quantity, value) pairs of the numbers that were computed.
        verdict: the verdicts as markdown sentences (the headline, then the training set's); None without one.
        headline_label: the headline ``ggn_verdict`` and its scope, e.g. "stable (for the training set)".
        verdict_label: the training-set ``stability_verdict`` and its basis, e.g. "unstable (by theorem1)".
    """

    rows: list[tuple[str, str]] = field(default_factory=list)
    verdict: str | None = None
    headline_label: str = "no verdict"
    verdict_label: str = "no verdict"


def format_value(value: Any) -> str:
    """A number for a reader: 4 significant digits, fixed-point between 1e-3 and 1e4; lists shortened to 8."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value[:8]) + (" ..." if len(value) > 8 else "")
    return str(value)


def summarise(report: Mapping[str, Any]) -> CurvatureSummary:
    """The summary of a report in its JSON form (:class:`CurvatureSummary`)."""
    return CurvatureSummary(rows=summary_rows(report), verdict=verdict_text(report),
                            headline_label=headline_label(report), verdict_label=verdict_label(report))


def summary_rows(r: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The computed numbers a reader wants, as (quantity, value) rows."""
    rows: list[tuple[str, str]] = []
    fmt = format_value

    def add(name: str, *keys: str, text: str | None = None) -> None:
        if all(r.get(k) is not None for k in keys):
            rows.append((name, text if text is not None else fmt(r[keys[0]])))

    n, batch = r.get("num_train_examples"), r.get("train_batch_size")
    add("Largest Hessian eigenvalue lambda_max", "lambda_max")
    add("Hessian trace (Hutchinson)", "trace", "trace_stderr", text=f"{fmt(r.get('trace'))} ± {fmt(r.get('trace_stderr'))}")
    if r.get("trace_stderr") is None:
        add("Hessian trace (Hutchinson)", "trace")
    add(f"m-sharpness (rho {fmt(r.get('m_sharpness_rho'))}, micro-batch size {r.get('m_sharpness_m')})", "m_sharpness")
    hessian = f" ({r['coherence_hessian']} Hessians)" if r.get("coherence_hessian") else ""
    add(f"Hessian coherence sigma of the {r.get('coherence_examples')} probe examples{hessian}", "coherence")
    if r.get("coherence_train_interval"):
        low, high = r["coherence_train_interval"]
        add(f"Hessian coherence sigma of the {n} training examples (estimate, interval)", "coherence_train_estimate",
            text=f"{fmt(r.get('coherence_train_estimate'))} [{fmt(low)}, {fmt(high)}]")
    else:
        add(f"Hessian coherence sigma of the {n} training examples (estimate)", "coherence_train_estimate")
    add(f"Learning rate from which Theorem 1 gives instability (batch size {batch}, estimated sigma)",
        "eta_critical_theorem1")
    add("Learning rate above which gradient descent is unstable (2 / lambda_max)", "eta_critical_gd")
    add("Preconditioned sharpness lambda_max(P^-1 H) of Adam", "adam_preconditioned_lambda_max")
    add("Adam edge-of-stability threshold (2 + 2 beta1) / ((1 - beta1) eta)", "adam_stability_threshold")
    add("Preconditioned sharpness / threshold", "adam_edge_ratio")
    return rows


def verdict_text(r: Mapping[str, Any]) -> str | None:
    """The verdicts in words (markdown): the Gauss-Newton headline, then the training set's; None without one."""
    lr, batch = r.get("learning_rate"), r.get("train_batch_size")
    at = f" at learning rate {format_value(lr)} and batch size {batch}" if lr and batch else ""
    where = "SGD stability verdict for the training set" + at
    if r.get("stability_verdict"):
        reason = f" {r['stability_reason']}" if r.get("stability_reason") else ""
        training = f"{where}: **{r['stability_verdict']}**.{reason}"
        return (_headline_text(r, at) + "\n\n" + training) if r.get("ggn_verdict") else training
    if r.get("stable_sgd") is None:
        return None
    growth = r.get("probe_growth_rate")
    grow = f"{'shrink' if r['stable_sgd'] else 'grow'} by a factor {growth:.6f} per step" if growth is not None else ""
    basis = _BASIS.get(r.get("stability_basis"), "").format(grow=grow)
    return f"{where}: **{'stable' if r['stable_sgd'] else 'unstable'}**" + (f", {basis}." if basis else ".")


def _headline_text(r: Mapping[str, Any], at: str) -> str:
    """The Gauss-Newton mean-square verdict in words, with the numbers that say whether the quadratic model holds."""
    fmt = format_value
    scope = "the training set" if r.get("ggn_scope") == "training_set" else "the probe's examples"
    with_replacement = r.get("eta_critical_ggn_with_replacement")
    crit = f"eta_crit {fmt(r.get('eta_critical_ggn'))} for B distinct examples" + (
        f", {fmt(with_replacement)} with replacement" if with_replacement is not None else "")
    numbers = [f"eta / eta_crit = {fmt(r.get('eta_ratio_ggn'))} ({crit})",
               f"log E‖v‖² per step {fmt(r.get('mean_square_rate'))}"]
    if r.get("lambda_max_gap") is not None:
        numbers.append(f"lambda_max of the Hessian minus the Gauss-Newton one {fmt(r['lambda_max_gap'])}")
    drift = "none" if r.get("drift_steps") is None else f"{fmt(r['drift_steps'])} steps"
    trained = f" ({r['steps_trained']} steps trained)" if r.get("steps_trained") is not None else ""
    numbers.append(f"drift along negative curvature 1/(eta |lambda_min|): {drift}{trained}")
    if r.get("gradient_ratio") is not None:
        numbers.append(f"gradient ratio {fmt(r['gradient_ratio'])}")
    flag = "; not at a minimum" if r.get("at_minimum") is False else ""
    return (f"Gauss-Newton mean-square verdict for {scope}{at}: **{r['ggn_verdict']}** ({', '.join(numbers)}"
            f"{flag}). {r.get('ggn_reason') or ''}").rstrip()


def headline_label(r: Mapping[str, Any]) -> str:
    """The headline verdict and its scope in a few words ("stable (for the training set)"; "no verdict")."""
    label = r.get("ggn_verdict") or "no verdict"
    if r.get("ggn_scope"):
        label += f" (for {'the training set' if r['ggn_scope'] == 'training_set' else 'the probe'})"
    return label


def verdict_label(r: Mapping[str, Any]) -> str:
    """The training-set verdict and the rule that decided it in a few words ("unstable (by theorem1)")."""
    label = r.get("stability_verdict") or "no verdict"
    if r.get("stability_basis"):
        label += f" (by {r['stability_basis']})"
    return label
