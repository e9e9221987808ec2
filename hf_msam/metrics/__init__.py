"""Evaluation metrics of the recipes through ``evaluate``, with no network.

The metric is an ``evaluate.Metric`` module shipped in this package (:data:`METRIC_PATH`, ``msam_glue.py``)
and loaded by path, one configuration per GLUE task plus ``accuracy`` and ``regression``::

    metric = hf_msam.metrics.load_metric("mrpc")        # == evaluate.load(METRIC_PATH, "mrpc")
    metric.add_batch(predictions=[1, 0], references=[1, 1])
    metric.compute()                                     # {'accuracy': 0.5, 'f1': 0.666...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import evaluate
import numpy as np

__all__ = ["METRIC_PATH", "compute_metrics_fn", "load_metric", "metric_config"]

METRIC_PATH = str(Path(__file__).with_name("msam_glue.py"))
GLUE_METRIC_TASKS = {"cola", "mrpc", "qqp", "stsb", "sst2", "mnli", "qnli", "rte", "wnli"}


def metric_config(task_name: str | None = None, is_regression: bool = False) -> str:
    """The metric configuration of a task: the GLUE task itself, else ``regression`` or ``accuracy``."""
    if task_name in GLUE_METRIC_TASKS:
        return task_name
    return "regression" if is_regression else "accuracy"


def load_metric(task_name: str | None = None, is_regression: bool = False) -> evaluate.EvaluationModule:
    """``evaluate.load`` of the shipped metric module, kept in memory (no cache files, safe in every process)."""
    return evaluate.load(METRIC_PATH, metric_config(task_name, is_regression), keep_in_memory=True)


def compute_metrics_fn(task_name: str | None = None, is_regression: bool = False) -> Callable:
    """A ``Trainer(compute_metrics=...)`` function: argmax (or squeeze for regression), the task's metrics, and
    ``combined_score`` (their mean) when there are several, as in ``run_glue.py``."""
    metric = load_metric(task_name, is_regression)
    regression = metric.config_name in ("stsb", "regression")

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.squeeze(logits, axis=-1) if regression else np.argmax(logits, axis=-1)
        result = metric.compute(predictions=predictions, references=eval_prediction.label_ids)
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics
