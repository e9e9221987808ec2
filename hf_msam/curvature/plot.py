"""The picture of a curvature report: the top of the Hessian spectrum, and lambda_max against the critical
learning rates of SGD over batch sizes (``docs/design.md`` section 3.4).

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works on headless
machines and inside training scripts that use another backend.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .stability import eta_critical_gd, eta_critical_theorem1


VERDICT_COLOURS = {"stable": "tab:green", "unstable": "tab:red", "inconclusive": "tab:gray"}


def plot_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write :func:`report_figure` of ``report`` (a ``SharpnessReport.to_dict()``) as a PNG to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report_figure(report).savefig(path, dpi=110)
    return path


def report_figure(report: Mapping[str, Any]) -> Figure:
    """The two panels of a report, on a matplotlib Agg canvas.

    Left: the top eigenvalues (Lanczos), with the Gauss-Newton lambda_max when computed. Right: the critical
    learning rates 2 / lambda_max (gradient descent) and Theorem 1's ``eta_crit(B)`` over batch sizes B (with
    the training set's coherence ``coherence_train_estimate``, and as a band the curves of the ends of
    ``coherence_train_interval``), shaded where instability is proved (above 2 / lambda_max or above the
    curve of the interval's upper end), and the run's ``(B, eta)``
    (``train_batch_size``, ``learning_rate``) marked in the colour of its ``stability_verdict``, whose
    ``stability_reason`` is written under the panels. Quantities the report does not hold are left out and
    said so on the plot.
    """
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    spectrum_axes, stability_axes = figure.subplots(1, 2)
    _draw_spectrum(spectrum_axes, report)
    _draw_stability(stability_axes, report)
    reason = report.get("stability_reason")
    if reason:
        verdict = report.get("stability_verdict") or "no verdict"
        figure.get_layout_engine().set(rect=(0, 0.1, 1, 0.9))
        figure.text(0.5, 0.01, textwrap.fill(f"SGD stability verdict: {verdict}. {reason}", 150), ha="center",
                    va="bottom", fontsize=9)
    return figure


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _draw_spectrum(axes, report: Mapping[str, Any]) -> None:
    eigenvalues = [v for v in (report.get("top_eigenvalues") or []) if _finite(v) is not None]
    axes.set_title("Hessian spectrum (top eigenvalues)")
    axes.set_xlabel("index k")
    axes.set_ylabel(r"$\lambda_k(H)$")
    if not eigenvalues:
        axes.text(0.5, 0.5, "top eigenvalues not computed", ha="center", va="center", transform=axes.transAxes)
        return
    index = np.arange(1, len(eigenvalues) + 1)
    axes.stem(index, eigenvalues, basefmt="k-", label="Lanczos")
    ggn = _finite(report.get("lambda_max_ggn"))
    if ggn is not None:
        axes.axhline(ggn, color="tab:orange", linestyle="--", label=r"Gauss-Newton $\lambda_{max}$")
    axes.set_xticks(index)
    lines = []
    trace, stderr = _finite(report.get("trace")), _finite(report.get("trace_stderr"))
    if trace is not None:
        lines.append(f"trace = {trace:.4g}" + (f" ± {stderr:.2g}" if stderr is not None else ""))
    sigma = _finite(report.get("coherence"))
    if sigma is not None:
        lines.append(f"coherence σ = {sigma:.4g}")
    if lines:
        axes.text(0.97, 0.95, "\n".join(lines), ha="right", va="top", transform=axes.transAxes, fontsize=9,
                  bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    axes.legend(loc="upper center", fontsize=8)


def _draw_stability(axes, report: Mapping[str, Any]) -> None:
    learning_rate = _finite(report.get("learning_rate"))
    train_batch_size = report.get("train_batch_size")
    num_train_examples = report.get("num_train_examples")
    lambda_max = _finite(report.get("lambda_max"))
    if lambda_max is None:
        lambda_max = _finite(report.get("lambda_max_ggn"))
    axes.set_title(r"critical learning rate vs batch size")
    axes.set_xlabel("batch size B")
    axes.set_ylabel(r"learning rate $\eta$")
    if lambda_max is None or lambda_max <= 0:
        axes.text(0.5, 0.5, r"no positive $\lambda_{max}$: no stability threshold", ha="center", va="center",
                  transform=axes.transAxes)
        return
    top = max(filter(None, [num_train_examples, train_batch_size, 1024]))
    grid = np.geomspace(1, top, 200).round()
    batch_sizes = np.unique(np.append(grid, [train_batch_size] if train_batch_size else []))
    gd = eta_critical_gd(lambda_max)
    eta_gd = np.full_like(batch_sizes, gd)
    axes.plot(batch_sizes, eta_gd, color="tab:blue", label=rf"GD: $2/\lambda_{{max}}$ = {gd:.3g}")
    bound = eta_gd
    sigma = _finite(report.get("coherence_train_estimate"))
    if sigma is None:
        sigma = _finite(report.get("coherence"))
    if sigma is not None and num_train_examples:
        eta_t1 = np.array([eta_critical_theorem1(lambda_max, sigma, num_train_examples, int(b)) or np.inf
                           for b in batch_sizes])
        shown = np.isfinite(eta_t1)
        axes.plot(batch_sizes[shown], eta_t1[shown], color="tab:red",
                  label=r"Theorem 1: $\sigma / (\lambda_{max}\sqrt{n/B-1})$" + f", n={num_train_examples}")
        bound = np.minimum(eta_gd, eta_t1)
        interval = report.get("coherence_train_interval")
        if interval and all(_finite(x) is not None for x in interval):
            ends = [np.array([eta_critical_theorem1(lambda_max, float(x), num_train_examples, int(b)) or np.nan
                              for b in batch_sizes]) for x in interval]
            level = report.get("coherence_train_confidence")
            label = "Theorem 1, σ interval" + (f" ({level:.0%})" if _finite(level) is not None else "")
            axes.fill_between(batch_sizes, ends[0], ends[1], where=np.isfinite(ends[0]), color="tab:red", alpha=0.25,
                              label=label)
            bound = np.minimum(eta_gd, np.where(np.isfinite(ends[1]), ends[1], np.inf))  # proved with the upper end
    else:
        missing = "coherence σ" if sigma is None else "training-set size n"
        axes.text(0.03, 0.03, f"Theorem 1 curve needs the {missing}", transform=axes.transAxes, fontsize=8)
    axes.set_xscale("log")
    axes.set_yscale("log")
    ymax = float(np.max(bound)) * 100
    if learning_rate:
        ymax = max(ymax, learning_rate * 10)
    axes.fill_between(batch_sizes, bound, ymax, color="tab:red", alpha=0.08, label="unstable (proved)")
    axes.set_ylim(top=ymax)
    if learning_rate and train_batch_size:
        verdict = report.get("stability_verdict") or {True: "stable", False: "unstable"}.get(
            report.get("stable_sgd"), "no verdict")
        colour = VERDICT_COLOURS.get(verdict, "black")
        axes.plot([train_batch_size], [learning_rate], marker="*", markersize=16, color=colour,
                  markeredgecolor="black", linestyle="none",
                  label=rf"this run: B={train_batch_size}, $\eta$={learning_rate:.3g} ({verdict})")
    axes.legend(loc="lower right", fontsize=8)
