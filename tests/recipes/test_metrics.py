"""hf_msam.metrics: the shipped ``evaluate`` module against scipy / scikit-learn and hand-computed values."""

from __future__ import annotations

import math

import evaluate
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import EvalPrediction

from hf_msam.metrics import METRIC_PATH, compute_metrics_fn, load_metric

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 2, 40)
GUESSES = np.where(RNG.random(40) < 0.7, LABELS, 1 - LABELS)
THREE_LABELS = RNG.integers(0, 3, 40)
THREE_GUESSES = np.where(RNG.random(40) < 0.6, THREE_LABELS, RNG.integers(0, 3, 40))
TARGETS = RNG.normal(size=30)
VALUES = TARGETS + RNG.normal(scale=0.5, size=30)


def _hand_binary(guesses, labels) -> dict[str, float]:
    tp = float(np.sum((guesses == 1) & (labels == 1)))
    tn = float(np.sum((guesses == 0) & (labels == 0)))
    fp = float(np.sum((guesses == 1) & (labels == 0)))
    fn = float(np.sum((guesses == 0) & (labels == 1)))
    return {"accuracy": (tp + tn) / len(labels), "f1": 2 * tp / (2 * tp + fp + fn),
            "matthews_correlation": (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))}


@pytest.mark.parametrize("task", ["sst2", "mnli", "qnli", "rte", "wnli", "mrpc", "qqp", "cola", "accuracy"])
def test_classification_configs_match_sklearn_and_the_formulas(task):
    guesses, labels = (THREE_GUESSES, THREE_LABELS) if task == "mnli" else (GUESSES, LABELS)
    result = load_metric(None if task == "accuracy" else task).compute(predictions=guesses, references=labels)
    expected = {"accuracy": accuracy_score(labels, guesses)}
    if task in ("mrpc", "qqp"):
        expected["f1"] = f1_score(labels, guesses)
    if task == "cola":
        expected = {"matthews_correlation": matthews_corrcoef(labels, guesses)}
    assert result.keys() == expected.keys()
    for name, value in result.items():
        assert value == pytest.approx(expected[name], abs=1e-12)
        if task != "mnli":
            assert value == pytest.approx(_hand_binary(guesses, labels)[name], abs=1e-12)


@pytest.mark.parametrize("task, regression", [("stsb", False), (None, True)])
def test_regression_configs_match_scipy(task, regression):
    result = load_metric(task, regression).compute(predictions=VALUES, references=TARGETS)
    values32, targets32 = VALUES.astype(np.float32), TARGETS.astype(np.float32)  # the module's feature type
    assert result["pearson"] == pytest.approx(pearsonr(values32, targets32)[0], abs=1e-6)
    assert result["spearmanr"] == pytest.approx(spearmanr(values32, targets32)[0], abs=1e-6)
    if regression:
        assert result["mse"] == pytest.approx(float(np.mean((values32.astype(np.float64) - targets32) ** 2)), rel=1e-6)
    else:
        assert set(result) == {"pearson", "spearmanr"}


def test_a_constant_regressor_has_no_correlation_nan_not_zero():
    with pytest.warns(Warning):  # scipy itself: correlation of a constant input is undefined
        assert math.isnan(pearsonr(np.full(30, 0.5), TARGETS)[0])
    metrics = compute_metrics_fn(None, is_regression=True)(
        EvalPrediction(predictions=np.full((30, 1), 0.5, dtype=np.float32), label_ids=TARGETS.astype(np.float32)))
    assert math.isnan(metrics["pearson"]) and math.isnan(metrics["spearmanr"])
    assert metrics["mse"] == pytest.approx(float(np.mean((0.5 - TARGETS.astype(np.float32)) ** 2)), rel=1e-6)
    assert math.isnan(metrics["combined_score"])  # the mean of the three, as run_glue.py takes it


def test_compute_metrics_fn_argmax_and_combined_score():
    logits = RNG.normal(size=(40, 2))
    metrics = compute_metrics_fn("mrpc")(EvalPrediction(predictions=logits, label_ids=LABELS))
    guesses = logits.argmax(-1)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(LABELS, guesses))
    assert metrics["f1"] == pytest.approx(f1_score(LABELS, guesses))
    assert metrics["combined_score"] == pytest.approx((metrics["accuracy"] + metrics["f1"]) / 2)
    assert compute_metrics_fn("sst2")(EvalPrediction(predictions=(logits,), label_ids=LABELS)).keys() == {"accuracy"}


def test_evaluate_interface_add_batch_and_combine():
    metric = evaluate.load(METRIC_PATH, "mrpc", keep_in_memory=True)
    for start in range(0, 40, 16):
        metric.add_batch(predictions=GUESSES[start:start + 16], references=LABELS[start:start + 16])
    assert metric.compute() == pytest.approx({"accuracy": accuracy_score(LABELS, GUESSES), "f1": f1_score(LABELS, GUESSES)})
    combined = evaluate.combine([load_metric("cola"), load_metric("sst2")])
    assert combined.compute(predictions=GUESSES, references=LABELS) == pytest.approx(
        {"matthews_correlation": matthews_corrcoef(LABELS, GUESSES), "accuracy": accuracy_score(LABELS, GUESSES)})


def test_unknown_configuration_names_the_choices():
    with pytest.raises(KeyError, match="Unknown configuration 'sts'.*stsb"):
        evaluate.load(METRIC_PATH, "sts", keep_in_memory=True)
