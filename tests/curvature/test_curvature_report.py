"""``sharpness_report``: contract, state restoration, m-sharpness against a plain loop, and bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from builders import tiny_bert, token_dataset

import hf_msam
from hf_msam.curvature.msharpness import m_sharpness

KEYS = ("schema_version", "num_examples", "num_parameters", "lambda_max", "lambda_max_residual", "top_eigenvalues",
        "trace", "trace_stderr", "m_sharpness", "coherence", "lambda_max_ggn", "eta_critical_theorem1",
        "eta_critical_gd", "stable_sgd", "probe_growth_rate", "hvp_count", "coherence_train_estimate",
        "coherence_train_interval", "stability_verdict", "stability_reason", "probe_indices", "examples_used",
        "adam_preconditioned_lambda_max", "adam_stability_threshold", "adam_edge_ratio")
SMALL = dict(num_examples=12, lanczos_iterations=8, top_k=2, trace_probes=3, batch_size=8, m=4, probe_steps=3)


def test_report_contract_and_restored_state(tmp_path):
    model = tiny_bert(3)
    model.train()
    model._original_forward = model.forward  # what accelerate's autocast patch leaves behind
    model.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("patched forward used"))
    before = copy.deepcopy(model.state_dict())
    report = hf_msam.sharpness_report(model, token_dataset(20, 6, 3), learning_rate=0.5, train_batch_size=4,
                                      num_train_examples=100, **SMALL)
    d = report.to_dict()
    assert all(k in d for k in KEYS)
    assert d["errors"] == [] and d["num_examples"] == 12
    assert d["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert d["hvp_count"] == sum(d["hvp_counts"].values()) >= 8 + 3
    assert d["lambda_max"] == d["top_eigenvalues"][0]
    assert d["eta_critical_gd"] == pytest.approx(2 / d["lambda_max"])
    sigma, (low, high) = d["coherence_train_estimate"], d["coherence_train_interval"]
    assert d["coherence"] <= low <= sigma <= high
    assert d["eta_critical_theorem1"] == pytest.approx(sigma / (d["lambda_max"] * math.sqrt(100 / 4 - 1)))
    # a freshly initialised model on random labels is no minimum: no verdict either way, and it says why
    assert (d["stability_verdict"], d["stable_sgd"], d["stability_basis"]) == ("inconclusive", None, "not_at_minimum")
    assert "minimum" in d["stability_reason"]
    assert (d["ggn_verdict"], d["stable_ggn"], d["at_minimum"]) == ("inconclusive", None, False)
    assert d["drift_steps"] == pytest.approx(1 / (0.5 * -d["lambda_min_ritz"]))
    assert d["drift_steps"] < d["stability_steps"] == pytest.approx(1 / abs(d["mean_square_rate"]))
    assert len(d["probe_indices"]) == 12 and len(set(d["probe_indices"])) == 12
    assert d["examples_used"]["coherence"] == d["examples_used"]["eigenvalues"] == "probe[0:12]"
    assert model.training and model.forward.__name__ == "<lambda>"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    metrics = report.metrics()
    texts = {k: v for k, v in metrics.items() if isinstance(v, str)}
    assert texts == {"sharpness_stability_verdict": "inconclusive", "sharpness_stability_reason": d["stability_reason"],
                     "sharpness_ggn_verdict": "inconclusive", "sharpness_ggn_reason": d["ggn_reason"]}
    assert metrics["sharpness_stability_verdict_code"] == metrics["sharpness_ggn_verdict_code"] == 0
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in metrics.items() if k not in texts)
    assert metrics["sharpness_lambda_max"] == d["lambda_max"]
    report.to_json(str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["lambda_max"] == d["lambda_max"]


def test_report_is_seeded_and_measures_select():
    ds = token_dataset(20, 6, 2)
    a = hf_msam.sharpness_report(tiny_bert(2), ds, measures=["eigenvalues"], **SMALL).to_dict()
    b = hf_msam.sharpness_report(tiny_bert(2), ds, measures=["eigenvalues"], **SMALL).to_dict()
    assert a["lambda_max"] == b["lambda_max"]
    assert a["trace"] is None and a["coherence"] is None and a["m_sharpness"] is None
    assert a["stable_sgd"] is None and a["eta_critical_theorem1"] is None
    assert a["stability_verdict"] == "inconclusive" and "learning rate" in a["stability_reason"]
    assert list(a["examples_used"]) == ["eigenvalues"]


def test_bf16_model_keeps_dtype_and_weights():
    model = tiny_bert(2).to(torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    report = hf_msam.sharpness_report(model, token_dataset(12, 6, 2), measures=["eigenvalues"], **SMALL)
    assert report.lambda_max is not None
    assert all(v.dtype == before[k].dtype and torch.equal(before[k], v) for k, v in model.state_dict().items())


def _plain_m_sharpness(model, batches, rho):
    """Reference: a fresh copy per micro-batch, .backward() gradients, explicit SAM step."""
    total = sum(len(b["labels"]) for b in batches)
    out = 0.0
    for b in batches:
        m = copy.deepcopy(model).eval()
        loss = m(**b).loss
        loss.backward()
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in m.parameters() if p.grad is not None))
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    p += rho * p.grad / norm
            out += len(b["labels"]) / total * (float(m(**b).loss) - float(loss))
    return out


def test_m_sharpness_matches_plain_loop_and_restores_weights_exactly():
    model = tiny_bert(3, seed=1)
    ds = token_dataset(10, 6, 3)
    batches = [{"input_ids": torch.tensor(ds["input_ids"][i : i + 4]), "labels": torch.tensor(ds["labels"][i : i + 4])}
               for i in range(0, 10, 4)]
    before = [p.detach().clone() for p in model.parameters()]
    got = m_sharpness(model, batches, rho=0.1)
    assert got == pytest.approx(_plain_m_sharpness(model, batches, 0.1), rel=1e-4, abs=1e-7)
    assert got > 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_bad_input_errors_name_the_field():
    from transformers import BertModel

    from builders import tiny_bert_config

    ds = token_dataset(8, 6, 2)
    with pytest.raises(ValueError, match="loss"):
        hf_msam.sharpness_report(BertModel(tiny_bert_config()), ds, **SMALL)
    with pytest.raises(ValueError, match="labels"):
        hf_msam.sharpness_report(tiny_bert(2), ds.remove_columns("labels"), **SMALL)
    with pytest.raises(ValueError, match="empty"):
        hf_msam.sharpness_report(tiny_bert(2), [], **SMALL)
    with pytest.raises(ValueError, match="regression"):
        hf_msam.sharpness_report(tiny_bert(1), ds, **SMALL)
    with pytest.raises(ValueError, match="measures"):
        hf_msam.sharpness_report(tiny_bert(2), ds, measures=["lambda"], **SMALL)


def test_non_finite_loss_gives_a_report_that_says_so():
    model = tiny_bert(2)
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    report = hf_msam.sharpness_report(model, token_dataset(8, 6, 2), **SMALL)
    d = report.to_dict()
    assert d["lambda_max"] is None and d["coherence"] is None and d["hvp_count"] == 0
    assert any("not finite" in e for e in d["errors"])
    assert (d["stability_verdict"], d["stable_sgd"]) == ("inconclusive", None) and "not finite" in d["stability_reason"]
    json.dumps(d, allow_nan=False)


def test_regression_head_with_float_targets_and_a_failing_measure_is_reported():
    report = hf_msam.sharpness_report(tiny_bert(1), token_dataset(12, 6, 1), measures=["eigenvalues", "probe"],
                                      **SMALL)
    d = report.to_dict()
    assert d["problem_type"] == "regression" and d["lambda_max"] is not None
    assert d["probe_growth_rate"] is None and any(e.startswith("probe:") for e in d["errors"])


def test_ragged_list_of_dicts_is_padded_and_text_dropped():
    model = tiny_bert(2, seed=3)
    lengths = [3, 5, 4, 6, 2, 5]
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 64, (n,), generator=g).tolist(), "label": i % 2, "text": "a sentence"}
            for i, n in enumerate(lengths)]
    report = hf_msam.sharpness_report(model, rows, measures=["m_sharpness"], **SMALL)
    model.eval()
    with torch.no_grad():
        want = sum(float(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["label"]])).loss)
                   for r in rows) / len(rows)
    assert report.errors == [] and report.num_examples == len(rows)
    assert report.loss == pytest.approx(want, rel=1e-5)


def test_coherence_on_more_examples_than_the_hessian_measures():
    """coherence_examples > num_examples: the Hessian measures keep their num_examples, coherence takes the first
    coherence_examples of the same seeded draw, equal to a report whose probe set is that large."""
    model, data = tiny_bert(3, seed=5), token_dataset(30, 6, 3, seed=6)
    options = dict(lanczos_iterations=6, top_k=1, trace_probes=2, batch_size=8, m=4, learning_rate=0.1,
                   train_batch_size=4, max_seconds=math.inf, measures=("eigenvalues", "coherence"))
    split = hf_msam.sharpness_report(model, data, num_examples=8, coherence_examples=20, **options)
    whole = hf_msam.sharpness_report(model, data, num_examples=20, coherence_examples=20, **options)
    small = hf_msam.sharpness_report(model, data, num_examples=8, **options)
    assert split.errors == [] and split.num_examples == 8 and split.coherence_examples == 20
    assert split.examples_used["eigenvalues"] == "probe[0:8]" and split.examples_used["coherence"] == "probe[0:20]"
    assert split.probe_indices == whole.probe_indices and split.probe_indices[:8] == small.probe_indices
    assert split.coherence == pytest.approx(whole.coherence, rel=1e-9)
    assert split.lambda_max == pytest.approx(small.lambda_max, rel=1e-9)
    with pytest.raises(ValueError, match="coherence_examples"):
        hf_msam.sharpness_report(model, data, num_examples=8, coherence_examples=0, **options)
