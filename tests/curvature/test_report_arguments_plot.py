"""The report's training arguments (every option a ``sharpness_*`` flag, run-derived defaults and verdict
inputs) and its plot, on hand-made reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_msam import SAMTrainingArguments, SharpnessArguments
from hf_msam.curvature.arguments import option_names, report_options
from hf_msam.curvature.plot import plot_report, report_figure


def _args(**overrides) -> SAMTrainingArguments:
    values = dict(output_dir="unused", use_cpu=True, report_to="none", per_device_train_batch_size=8,
                  learning_rate=0.3, optim="sgd")
    values.update(overrides)
    return SAMTrainingArguments(**values)


def test_every_report_option_is_a_flag_and_the_flag_reaches_the_report():
    from dataclasses import fields

    from hf_msam.curvature.options import ReportOptions

    assert set(option_names()) <= {f.name for f in fields(ReportOptions)}
    parser = HfArgumentParser(SAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "unused", "--use_cpu", "true", "--sharpness_measures", "eigenvalues", "trace",
         "--sharpness_top_k", "3", "--sharpness_lanczos_tol", "1e-4", "--sharpness_m", "2"])
    options = report_options(args, args, 100)
    assert options["measures"] == ["eigenvalues", "trace"] and options["top_k"] == 3 and options["m"] == 2
    assert options["lanczos_tol"] == 1e-4
    assert "trace_probes" not in options  # None: left to the report's default


@pytest.mark.parametrize(
    "overrides, rho, m",
    [
        (dict(sam_rho=0.2, sam_micro_batch_size=2), 0.2, 2),  # the run's own mSAM micro-batch
        (dict(sam_rho=0.2), 0.2, 8),  # SAM on each per-device batch
        (dict(sam_rho=0.0), None, 8),  # plain optimizer: rho is left to the report
        (dict(sam_rho=0.2, sharpness_rho=0.05, sharpness_m=4), 0.05, 4),  # explicit options win
    ],
)
def test_rho_and_m_default_to_the_run(overrides, rho, m):
    options = report_options(*2 * [_args(**overrides)], 40)
    assert options.get("rho") == rho and options["m"] == m


def test_verdict_inputs_come_from_the_run():
    args = _args(gradient_accumulation_steps=3)
    options = report_options(args, args, 1234)
    assert options["learning_rate"] == 0.3
    assert options["train_batch_size"] == 8 * 3 * args.world_size
    assert options["num_train_examples"] == 1234 and options["optimizer"] == "sgd"


def test_stock_arguments_give_report_defaults_without_sam_fields():
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", learning_rate=0.1)
    options = report_options(SharpnessArguments(), args, 10)
    assert "rho" not in options and "m" not in options and options["learning_rate"] == 0.1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sharpness_measures", ["lambda_max"], "eigenvalues"),
        ("sharpness_top_k", 0, "sharpness_top_k"),
        ("sharpness_lanczos_tol", float("nan"), "sharpness_lanczos_tol"),
        ("sharpness_probe_sampling", "poisson", "bernoulli"),
    ],
)
def test_bad_options_are_refused_up_front(field, value, message):
    with pytest.raises(ValueError, match=message):
        _args(**{field: value})


# --- plot ------------------------------------------------------------------------------------------------
REPORT = dict(top_eigenvalues=[12.5, 8.0, 5.0, 2.0, -0.5], lambda_max=12.5, lambda_max_ggn=11.0, trace=40.0,
              trace_stderr=2.0, coherence=3.0, coherence_train_estimate=6.0, learning_rate=0.1, train_batch_size=32,
              num_train_examples=1000, stable_sgd=False)


def _line(axes, label_start: str):
    return next(line for line in axes.get_lines() if line.get_label().startswith(label_start))


def test_plot_draws_the_spectrum_and_both_critical_curves(tmp_path):
    spectrum, stability = report_figure(REPORT).axes
    stems = spectrum.containers[0].markerline.get_ydata()
    assert list(stems) == REPORT["top_eigenvalues"]
    gd = _line(stability, "GD").get_ydata()
    assert np.allclose(gd, 2 / 12.5)
    theorem1 = _line(stability, "Theorem 1")
    b, eta = np.asarray(theorem1.get_xdata()), np.asarray(theorem1.get_ydata())
    assert np.allclose(eta, 6.0 / (12.5 * np.sqrt(1000 / b - 1)))  # sigma scaled to the training set
    assert eta[b == 32][0] == pytest.approx(6.0 / (12.5 * math.sqrt(1000 / 32 - 1)))
    run = _line(stability, "this run")
    assert list(run.get_xdata()) == [32] and list(run.get_ydata()) == [0.1] and "unstable" in run.get_label()
    path = plot_report(REPORT, tmp_path / "sub" / "sharpness.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_report_without_numbers_says_so(tmp_path):
    spectrum, stability = report_figure({"lambda_max": None}).axes
    assert "not computed" in spectrum.texts[0].get_text()
    assert "no positive" in stability.texts[0].get_text()
    no_coherence = report_figure({**REPORT, "coherence": None, "coherence_train_estimate": None}).axes[1]
    assert all(not line.get_label().startswith("Theorem 1") for line in no_coherence.get_lines())
    assert "coherence" in no_coherence.texts[0].get_text()
    assert plot_report({}, tmp_path / "empty.png").is_file()


def test_plot_marks_the_verdict_and_draws_the_coherence_interval_as_a_band():
    report = {**REPORT, "coherence_train_interval": [4.0, 9.0], "coherence_train_confidence": 0.95,
              "stability_verdict": "inconclusive", "stable_sgd": None,
              "stability_reason": "Not a minimum: the Hessian has negative curvature."}
    figure = report_figure(report)
    stability = figure.axes[1]
    band = next(c for c in stability.collections if c.get_label().startswith("Theorem 1, σ interval"))
    vertices = np.concatenate([path.vertices for path in band.get_paths()])
    b = 32.0
    at_b = vertices[np.isclose(vertices[:, 0], b), 1]
    lows = [x / (12.5 * math.sqrt(1000 / b - 1)) for x in (4.0, 9.0)]
    assert min(at_b) == pytest.approx(lows[0]) and max(at_b) == pytest.approx(lows[1])
    run = _line(stability, "this run")
    assert "(inconclusive)" in run.get_label() and run.get_color() == "tab:gray"
    assert any("negative curvature" in t.get_text() and "inconclusive" in t.get_text() for t in figure.texts)
    stable = _line(report_figure({**report, "stability_verdict": "stable"}).axes[1], "this run")
    assert "(stable)" in stable.get_label() and stable.get_color() == "tab:green"
