"""Curvature of a trained model: Hessian-vector-product operators, the estimators built on them (Lanczos,
Hutchinson, per-example Gauss-Newton coherence, m-sharpness), the linear-stability verdict, the report that
combines them, and the Trainer hook that writes it."""

from .arguments import SharpnessArguments
from .hook import SharpnessCallback, SharpnessReportMixin, SharpnessResult
from .options import ReportOptions
from .report import SharpnessReport, sharpness_report

__all__ = ["ReportOptions", "SharpnessArguments", "SharpnessCallback", "SharpnessReport", "SharpnessReportMixin", "SharpnessResult",
           "sharpness_report"]
