"""hf_msam.modelcard: the card carries the metadata, mSAM settings, results and the curvature report."""

from __future__ import annotations

import json

import yaml

from hf_msam.modelcard import load_card_data, write_model_card

DATA = {
    "model_name": "minilm-bbc", "hub_model_id": "tester/minilm-bbc",
    "base_model": "sentence-transformers/all-MiniLM-L6-v2", "task": "text-classification",
    "dataset": "GLUE MRPC", "dataset_tags": ["nyu-mll/glue"], "dataset_args": "mrpc", "language": "en",
    "num_labels": 2, "label_names": ["no", "yes"], "train_examples": 100, "eval_examples": 20,
    "msam": {"rho": 0.05, "micro-batch size": 8, "m (micro-batches per optimizer step)": 4},
    "hyperparameters": {"learning_rate": 1e-4}, "results": {"loss": 0.31, "accuracy": 0.8512, "f1": 0.9},
    "training_header": ["Training Loss", "Epoch", "Step", "Validation Loss", "Accuracy"],
    "training_rows": [["0.5", "1", "10", "0.31", "0.8512"]], "versions": {"hf_msam": "0.1.0"},
}


def _metadata(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def test_card_without_curvature_report(tmp_path):
    path = write_model_card(tmp_path, dict(DATA))
    text = path.read_text()
    meta = _metadata(text)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "msam" in meta["tags"] and meta["datasets"] == ["nyu-mll/glue"]
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"accuracy": 0.8512, "f1": 0.9}
    assert "| rho | 0.05 |" in text and "| micro-batch size | 8 |" in text
    assert "No curvature report" in text
    assert load_card_data(tmp_path)["results"]["accuracy"] == 0.8512


def test_card_rebuilt_with_the_curvature_report_and_plot(tmp_path):
    write_model_card(tmp_path, dict(DATA))
    report = {"lambda_max": 12.5, "trace": 340.25, "coherence": 3.75, "eta_critical_theorem1": 0.0123,
              "stable_sgd": False, "top_eigenvalues": [12.5, 9.0], "details": {"hvp_count": 42}}
    (tmp_path / "sharpness.json").write_text(json.dumps(report))
    (tmp_path / "sharpness.png").write_bytes(b"\x89PNG")
    text = write_model_card(tmp_path, load_card_data(tmp_path)).read_text()
    assert "| lambda_max | 12.5 (largest Hessian eigenvalue) |" in text
    assert "| coherence | 3.75" in text and "| stable_sgd | False" in text and "details.hvp_count" in text
    assert "![Curvature report](sharpness.png)" in text
    assert "No curvature report" not in text
