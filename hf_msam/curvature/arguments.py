"""Options of the curvature report, as dataclass fields shared by ``SAMTrainingArguments`` and the
``hf-msam sharpness`` command line."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SharpnessArguments:
    """When and how the sharpness / coherence report of ``DESIGN.md`` section 3 is computed."""

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
