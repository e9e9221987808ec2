"""The recipes' evaluation metric as an ``evaluate`` module: GLUE's metrics, accuracy and regression, offline.

``evaluate.load("glue", task)`` fetches its script from the Hub; this module is shipped inside ``hf_msam``
and loaded by path (``hf_msam.metrics.load_metric``, or ``evaluate.load(hf_msam.metrics.METRIC_PATH, task)``),
so users get evaluate's interface: ``compute``, ``add_batch``/``add``, ``evaluate.combine``.

Configurations and what each computes (the metrics of GLUE, Wang et al. 2019, as reported by
``transformers``' ``run_glue.py``):

* ``cola``: Matthews correlation ``(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``
  (``sklearn.metrics.matthews_corrcoef``, multi-class form for other label sets);
* ``mrpc``, ``qqp``: accuracy and binary F1 ``2PR / (P + R)`` of the positive class 1;
* ``stsb``: Pearson's ``r`` and Spearman's ``rho`` (``scipy.stats``);
* ``sst2``, ``mnli``, ``mnli_matched``, ``mnli_mismatched``, ``qnli``, ``rte``, ``wnli``, ``accuracy``:
  accuracy, the share of predictions equal to their reference;
* ``regression``: mean squared error ``mean((p - y)^2)``, Pearson and Spearman.

A constant prediction has no correlation with anything: Pearson and Spearman are NaN there (scipy's
value), not 0.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS_OF_CONFIG = {
    "cola": ("matthews_correlation",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "sst2": ("accuracy",),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "accuracy": ("accuracy",),
    "regression": ("mse", "pearson", "spearmanr"),
}
REGRESSION_CONFIGS = {"stsb", "regression"}

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (classification) or values (``stsb``, ``regression``).
    references: the true class ids or values, as many as predictions.
Returns:
    a dict with the configuration's metrics (see the module's description), as Python floats.
Example:
    >>> metric = evaluate.load(METRIC_PATH, "mrpc")
    >>> metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])
    {'accuracy': 0.6666666666666666, 'f1': 0.8}
"""
_CITATION = """@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MsamGlue(evaluate.Metric):
    """GLUE's metrics, accuracy and regression metrics; the configuration names the task."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in METRICS_OF_CONFIG:
            raise KeyError(
                f"Unknown configuration {self.config_name!r} of the hf_msam metric; use one of "
                f"{', '.join(METRICS_OF_CONFIG)}."
            )
        value = datasets.Value("float32" if self.config_name in REGRESSION_CONFIGS else "int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": value, "references": value}),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict:
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        compute = {
            "accuracy": lambda: accuracy_score(references, predictions),
            "f1": lambda: f1_score(references, predictions),
            "matthews_correlation": lambda: matthews_corrcoef(references, predictions),
            "pearson": lambda: _correlation(pearsonr, predictions, references),
            "spearmanr": lambda: _correlation(spearmanr, predictions, references),
            "mse": lambda: np.mean((predictions.astype(np.float64) - references) ** 2),
        }
        return {name: float(compute[name]()) for name in METRICS_OF_CONFIG[self.config_name]}


def _correlation(function, predictions: np.ndarray, references: np.ndarray) -> float:
    """``function``'s statistic, NaN when either side is constant (no correlation is defined)."""
    if np.ptp(predictions) == 0 or np.ptp(references) == 0:
        return float("nan")
    return float(function(predictions, references)[0])
