"""The options of one curvature report (:class:`ReportOptions`) and the one place they are validated.

:class:`ReportOptions` holds every keyword option of :func:`hf_msam.curvature.report.sharpness_report` with its
default. :class:`hf_msam.curvature.arguments.SharpnessArguments` carries the same options as ``sharpness_<name>``
fields (None: the default here) and validates them with :func:`validate_options`, so a bad option is refused
before training starts, with the same rule the report applies. See ``docs/curvature.md`` for what each measure is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .adam import AdamState
from .gram import parse_sketch
from .stability import PROBE_SAMPLINGS

MEASURES = ("eigenvalues", "trace", "m_sharpness", "coherence", "probe", "adam")
POSITIVE_INTS = ("num_examples", "lanczos_iterations", "top_k", "trace_probes", "m", "probe_steps",
                 "coherence_examples", "batch_size")
POSITIVE_FLOATS = ("lanczos_tol", "rho", "coherence_memory_gb")


@dataclass
class ReportOptions:
    """How one report is computed (``sharpness_report``'s keyword options; see its docstring).

    Validated on construction (:func:`validate_options`); ``dataclasses.replace`` validates again."""

    num_examples: int = 256
    seed: int = 0
    measures: Sequence[str] | None = None  # None: all (adam only when there is an optimizer state)
    lanczos_iterations: int = 30
    lanczos_tol: float = 1e-3
    top_k: int = 5
    trace_probes: int = 20
    rho: float = 0.05
    m: int = 16
    batch_size: int = 32
    learning_rate: float | None = None
    learning_rate_peak: float | None = None
    learning_rate_final: float | None = None
    learning_rate_source: str | None = None
    train_batch_size: int | None = None
    num_train_examples: int | None = None
    probe_steps: int = 30
    probe_sampling: str = "without_replacement"
    coherence_examples: int | None = None
    coherence_memory_gb: float = 2.0
    coherence_sketch: str | int = "auto"
    optimizer: str | None = None
    adam_state: AdamState | None = None
    adam_unavailable: str | None = None
    steps_trained: int | None = None
    progress: bool = False
    device: torch.device | str | None = None
    max_seconds: float | None = None  # None: budget.default_max_seconds
    training_seconds: float | None = None
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self) -> None:
        validate_options({name: getattr(self, name) for name in (*POSITIVE_INTS, *POSITIVE_FLOATS, "coherence_sketch",
                                                                  "max_seconds", "measures", "probe_sampling")})
        self.coherence_sketch = parse_sketch(self.coherence_sketch)

    @property
    def chosen_measures(self) -> tuple[str, ...]:
        """The measures to run: ``measures`` (default all), without ``adam`` when there is no optimizer state."""
        chosen = tuple(MEASURES if self.measures is None else self.measures)
        return chosen if self.adam_state is not None else tuple(x for x in chosen if x != "adam")

    @property
    def asks_for_adam(self) -> bool:
        """Whether ``measures`` names ``adam`` explicitly (then a missing Adam analysis is an error)."""
        return "adam" in (self.measures or ())


def validate_options(values: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse report options that cannot work, naming the option (``prefix`` + its name) and the fix.

    ``values`` maps option names (without prefix) to values; None means "the default" and is always accepted."""
    for name, value in values.items():
        if value is None:
            continue
        label = prefix + name
        if name in POSITIVE_INTS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be an integer >= 1 (or None for the default), got {value!r}.")
        if name in POSITIVE_FLOATS and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{label} must be a finite number > 0 (or None for the default), got {value!r}.")
        if name == "coherence_sketch":
            try:
                parse_sketch(value)
            except ValueError:
                raise ValueError(f"{label} must be 'auto', 'exact' or a sketch dimension (an integer >= 1, e.g. "
                                 f"262144), or None for the default, got {value!r}.") from None
        if name == "max_seconds" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{label} must be a number of seconds > 0, inf for no limit (or None for the default), "
                             f"got {value!r}.")
        if name == "measures" and (isinstance(value, str) or not value or any(m not in MEASURES for m in value)):
            raise ValueError(f"{label} must be a non-empty list of measures among {list(MEASURES)} (or None for "
                             f"all), got {value!r}.")
        if name == "probe_sampling" and value not in PROBE_SAMPLINGS:
            raise ValueError(f"{label} must be one of {list(PROBE_SAMPLINGS)} (or None), got {value!r}.")
