"""Fit the curvature report to a time budget (``docs/curvature.md``).

The report's cost is a sum of unit costs times counts, all measured on the model and data before the long
work starts (``ReportCosts``): a Hessian-vector product costs about ``hvp`` seconds per probe example (Lanczos
iterations, Hutchinson probes), a gradient ``gradient`` seconds per example (m-sharpness takes a gradient and
a perturbed forward: 1.5 gradients), the linear-stability probe one HVP on a training batch per step, and the
coherence ``gram.GramPlan.row_evaluations`` one-example rows (an exact plan recomputes examples that do not
stay resident: about n + n^2 / (2R) evaluations; a sketched plan evaluates each example once and sketches its
rows) plus the Gram products.

``plan_report`` keeps the requested sizes when they fit ``max_seconds``; otherwise it scales every size by the
largest common factor f in (0, 1] whose estimate fits (bisection; the estimate grows with f), each size kept
at or above a floor (``FLOORS``, or the request when smaller) so that the numbers stay meaningful. What was
cut is listed in ``ReportPlan.cuts`` (the report's ``budget_cuts``). When even the floors do not fit, the
plan is the floors and says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .gram import plan_gram

CPU_DEFAULT_SECONDS = 600.0  # at most 10 minutes on a CPU
CPU_MIN_SECONDS = 120.0  # a CPU report gets at least 2 minutes, even after a shorter training
ACCELERATOR_DEFAULT_SECONDS = 1800.0
M_SHARPNESS_GRADIENTS = 1.5  # a gradient and a perturbed forward (a forward ~ half a forward + backward)
FLOORS = {"num_examples": 32, "lanczos_iterations": 10, "trace_probes": 4, "coherence_examples": 32,
          "probe_steps": 10, "adam_iterations": 10}  # fmt: skip


def default_max_seconds(device_type: str, training_seconds: float | None = None) -> float:
    """The budget when none is given: on a CPU the training time, between 2 and 10 minutes (10 minutes when the
    training time is unknown); on an accelerator 30 minutes."""
    if device_type != "cpu":
        return ACCELERATOR_DEFAULT_SECONDS
    if training_seconds is None:
        return CPU_DEFAULT_SECONDS
    return min(CPU_DEFAULT_SECONDS, max(CPU_MIN_SECONDS, float(training_seconds)))


@dataclass(frozen=True)
class ReportSizes:
    """The sizes the report's cost depends on (0 for a measure that is not computed)."""

    num_examples: int
    lanczos_iterations: int
    trace_probes: int
    coherence_examples: int
    probe_steps: int
    m_sharpness: bool
    probe_batch_size: int  # examples per step of the linear-stability probe
    adam_iterations: int = 0  # Lanczos iterations on the Adam-preconditioned Hessian


@dataclass(frozen=True)
class ReportCosts:
    """Unit costs in seconds, measured on the model before planning."""

    hvp: float  # one Hessian-vector product, per probe example
    gradient: float  # one gradient, per probe example
    coherence_row: float  # the Gauss-Newton rows of one example
    coherence_rows_per_example: int
    coherence_dim: int
    gram_flops_per_second: float
    coherence_memory_gb: float
    coherence_sketch: str | int = "exact"  # gram.plan_gram's sketch option
    coherence_sketch_row: float = 0.0  # seconds to sketch the rows of one example


def estimate(sizes: ReportSizes, costs: ReportCosts) -> dict[str, float]:
    """Estimated seconds of each measure (and of the gradient) for ``sizes``."""
    n = sizes.num_examples
    seconds = {
        "gradient": costs.gradient * n,
        "eigenvalues": costs.hvp * n * sizes.lanczos_iterations,
        "trace": costs.hvp * n * sizes.trace_probes,
        "m_sharpness": costs.gradient * n * M_SHARPNESS_GRADIENTS if sizes.m_sharpness else 0.0,
        "coherence": 0.0,
        "probe": costs.hvp * min(sizes.probe_batch_size, n) * sizes.probe_steps,
        "adam": costs.hvp * n * sizes.adam_iterations,
    }
    if sizes.coherence_examples:
        gram = plan_gram(sizes.coherence_examples, costs.coherence_rows_per_example, costs.coherence_dim,
                         costs.coherence_memory_gb, sketch=costs.coherence_sketch)
        sketching = gram.num_examples * costs.coherence_sketch_row if gram.sketch_dim else 0.0
        seconds["coherence"] = (gram.row_evaluations * costs.coherence_row + sketching
                                + gram.gram_flops / costs.gram_flops_per_second)
    return seconds


@dataclass
class ReportPlan:
    sizes: ReportSizes
    seconds: dict[str, float]
    max_seconds: float
    factor: float = 1.0
    cuts: list[str] = field(default_factory=list)
    fits: bool = True

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def describe(self) -> str:
        """One line for the log: the plan, its estimate and what was cut."""
        s = self.sizes
        parts = [f"{s.num_examples} probe examples"]
        if s.lanczos_iterations:
            parts.append(f"{s.lanczos_iterations} Lanczos iterations")
        if s.trace_probes:
            parts.append(f"{s.trace_probes} trace probes")
        if s.coherence_examples:
            parts.append(f"{s.coherence_examples} coherence examples")
        if s.probe_steps:
            parts.append(f"{s.probe_steps} probe steps")
        if s.adam_iterations:
            parts.append(f"{s.adam_iterations} Adam Lanczos iterations")
        line = f"sharpness report plan: {', '.join(parts)}; estimated {_clock_time(self.total_seconds)}"
        line += f" (budget {_clock_time(self.max_seconds)})"
        if self.cuts:
            line += "; cut to fit: " + ", ".join(self.cuts)
        if not self.fits:
            line += "; the smallest plan does not fit the budget"
        return line


def _clock_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "no limit"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _scaled(sizes: ReportSizes, factor: float) -> ReportSizes:
    def scale(name: str) -> int:
        wanted = getattr(sizes, name)
        if wanted == 0:
            return 0
        return max(min(wanted, FLOORS[name]), min(wanted, math.ceil(wanted * factor)))

    scaled = {name: scale(name) for name in FLOORS}
    return replace(sizes, **scaled)


def plan_report(requested: ReportSizes, costs: ReportCosts, max_seconds: float) -> ReportPlan:
    """The requested sizes if their estimate fits ``max_seconds``, else every size scaled by the largest
    common factor that fits (each at or above its floor)."""
    total: Callable[[ReportSizes], float] = lambda sizes: sum(estimate(sizes, costs).values())  # noqa: E731
    sizes, factor, fits = requested, 1.0, True
    if total(requested) > max_seconds:
        low, high = 0.0, 1.0  # total(_scaled(., low)) is the floor plan
        fits = total(_scaled(requested, low)) <= max_seconds
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if total(_scaled(requested, mid)) <= max_seconds else (low, mid)
        factor = low
        sizes = _scaled(requested, factor)
    cuts = [f"{name} {getattr(requested, name)} -> {getattr(sizes, name)}" for name in FLOORS
            if getattr(sizes, name) != getattr(requested, name)]
    return ReportPlan(sizes, estimate(sizes, costs), max_seconds, factor, cuts, fits)


class ReportProgress:
    """One tqdm bar over every phase of the report, in wall-clock seconds, with an honest time left.

    The bar's position is the time elapsed and its total the time elapsed plus the predicted time left, so its
    percentage is the share of the time done. The time left is, for the current phase after its first unit
    (HVPs, probes, row evaluations), its units left times its measured seconds per unit (before: its plan
    estimate times the ratio below), plus the plan's estimates of the later phases times the ratio of the time
    spent so far to the plan's estimate of the work done so far. When the report runs three times slower than
    planned (a loaded machine) the bar says so after one unit, instead of counting down the plan.
    """

    def __init__(self, seconds: dict[str, float], enabled: bool, clock: Callable[[], float] = time.perf_counter):
        from tqdm.auto import tqdm

        self.seconds, self.clock = dict(seconds), clock
        self.bar = tqdm(total=max(sum(seconds.values()), 1e-9), desc="sharpness report", disable=not enabled,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]")
        self.began = self.phase_began = clock()
        self.name, self.units, self.done = "", 1, 0
        self.finished: set[str] = set()
        self.elapsed, self.left = 0.0, sum(seconds.values())  # as last shown

    def start(self, name: str, units: int) -> None:
        self.name, self.units, self.done, self.phase_began = name, max(1, units), 0, self.clock()
        self._refresh()

    def step(self, done: int | None = None) -> None:
        """One more unit done (or ``done`` units in all) in the current phase."""
        self.done = self.done + 1 if done is None else done
        self._refresh()

    def finish(self) -> None:
        self.finished.add(self.name)
        self._refresh()

    def time_left(self, now: float) -> float:
        """Predicted seconds left at ``now`` (class docstring)."""
        current = self.name if self.name and self.name not in self.finished else None
        share = min(self.done, self.units) / self.units
        planned_done = sum(self.seconds.get(name, 0.0) for name in self.finished)
        if current is not None:
            planned_done += share * self.seconds.get(current, 0.0)
        ratio = (now - self.began) / planned_done if planned_done > 0 else 1.0
        later = sum(seconds for name, seconds in self.seconds.items() if name not in self.finished and name != current)
        left = later * ratio
        if current is not None:
            if self.done > 0:
                left += max(0, self.units - self.done) * (now - self.phase_began) / self.done
            else:
                left += self.seconds.get(current, 0.0) * ratio
        return left

    def _refresh(self) -> None:
        now = self.clock()
        self.elapsed, self.left = elapsed, left = now - self.began, self.time_left(now)
        self.bar.total = max(elapsed + left, 1e-9)
        self.bar.set_postfix_str(f"{self.name} {self.done}/{self.units}, about {_clock_time(left)} left", refresh=False)
        self.bar.update(elapsed - self.bar.n)

    def close(self) -> None:
        self.left = 0.0
        self.bar.total = max(self.bar.n, 1e-9)
        self.bar.refresh()
        self.bar.close()
