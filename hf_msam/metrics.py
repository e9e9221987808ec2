"""Evaluation metrics with no network: GLUE's metrics and accuracy, computed with scikit-learn / scipy.

``evaluate.load("glue", task)`` fetches its script from the Hub, which these machines cannot reach; the
metrics here follow the same definitions and the same ``compute(predictions=..., references=...)``
call, and return the same keys (``accuracy``, ``f1``, ``matthews_correlation``, ``pearson``, ``spearmanr``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["GlueMetric", "compute_metrics_fn", "metric_names"]

_TASK_METRICS = {
    "cola": ("matthews_correlation",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
}


def metric_names(task_name: str | None, is_regression: bool = False) -> tuple[str, ...]:
    """The metrics reported for a GLUE task (accuracy for other classification, MSE + Pearson/Spearman for
    other regression)."""
    if task_name in _TASK_METRICS:
        return _TASK_METRICS[task_name]
    return ("mse", "pearson", "spearmanr") if is_regression else ("accuracy",)


class GlueMetric:
    """``evaluate``-style metric: ``GlueMetric("mrpc").compute(predictions=[...], references=[...])``."""

    def __init__(self, task_name: str | None = None, is_regression: bool = False):
        self.task_name = task_name
        self.names = metric_names(task_name, is_regression or task_name == "stsb")

    def compute(self, *, predictions, references) -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

        predictions = np.asarray(predictions)
        references = np.asarray(references)
        out: dict[str, float] = {}
        for name in self.names:
            if name == "accuracy":
                out[name] = float(accuracy_score(references, predictions))
            elif name == "f1":
                out[name] = float(f1_score(references, predictions))
            elif name == "matthews_correlation":
                out[name] = float(matthews_corrcoef(references, predictions))
            elif name == "pearson":
                out[name] = float(pearsonr(predictions, references)[0]) if np.std(predictions) > 0 else 0.0
            elif name == "spearmanr":
                out[name] = float(spearmanr(predictions, references)[0]) if np.std(predictions) > 0 else 0.0
            elif name == "mse":
                out[name] = float(np.mean((predictions - references) ** 2))
        return out


def compute_metrics_fn(task_name: str | None = None, is_regression: bool = False) -> Callable:
    """A ``Trainer(compute_metrics=...)`` function: argmax (or squeeze for regression), the task's metrics, and
    ``combined_score`` (their mean) when there are several, as in ``run_glue.py``."""
    metric = GlueMetric(task_name, is_regression)
    regression = is_regression or task_name == "stsb"

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.squeeze(logits) if regression else np.argmax(logits, axis=-1)
        result = metric.compute(predictions=predictions, references=eval_prediction.label_ids)
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics
