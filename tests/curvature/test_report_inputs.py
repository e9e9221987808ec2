"""Every form a user's rows come in gives the same report: Python scalars, 0-d and 1-d
tensors, NumPy scalars and arrays, and an HF ``Dataset`` in the python, torch and numpy formats, through
``sharpness_report``, the ``hf-msam sharpness`` command line and the Trainer hook.

The reference is the report of the same examples given as plain Python lists and ints."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from builders import tiny_bert
from transformers import Trainer, TrainingArguments

from hf_msam import SharpnessCallback, sharpness_report

OPTIONS = dict(num_examples=6, measures=["eigenvalues", "coherence"], lanczos_iterations=3, top_k=1, batch_size=4)


def _rows(regression: bool = False, ragged: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(6):
        length = 3 + i % 3 if ragged else 5
        label = float(torch.randn(1, generator=g)) if regression else i % 2
        rows.append({"input_ids": torch.randint(1, 64, (length,), generator=g).tolist(), "labels": label})
    return rows


def _report(data, num_labels: int = 2):
    return sharpness_report(tiny_bert(num_labels, seed=1), data, **OPTIONS)


def _assert_same(report, expected) -> None:
    assert report.errors == [] and expected.errors == []
    assert report.lambda_max == pytest.approx(expected.lambda_max, rel=1e-6)
    assert report.coherence == pytest.approx(expected.coherence, rel=1e-6)
    assert report.loss == pytest.approx(expected.loss, rel=1e-6)


FORMS = {
    "0-d tensor labels": lambda r: {"input_ids": r["input_ids"], "labels": torch.tensor(r["labels"])},
    "1-d tensors": lambda r: {"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor([r["labels"]])},
    "tensor ids, 0-d labels": lambda r: {"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["labels"])},
    "numpy scalars and arrays": lambda r: {"input_ids": np.array(r["input_ids"]), "labels": np.asarray(r["labels"])[()]},
    "numpy 0-d arrays": lambda r: {"input_ids": np.array(r["input_ids"]), "labels": np.asarray(r["labels"])},
    "`label` key, 0-d tensor": lambda r: {"input_ids": r["input_ids"], "label": torch.tensor(r["labels"])},
}


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
@pytest.mark.parametrize("form", list(FORMS))
def test_report_accepts_every_row_form(form, regression):
    rows = _rows(regression)
    expected = _report(rows, 1 if regression else 2)
    _assert_same(_report([FORMS[form](r) for r in rows], 1 if regression else 2), expected)


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "equal-length"])
@pytest.mark.parametrize("fmt", [None, "torch", "numpy"])
def test_report_accepts_a_dataset_in_every_format(fmt, ragged, regression):
    rows = _rows(regression, ragged)
    expected = _report(rows, 1 if regression else 2)
    _assert_same(_report(datasets.Dataset.from_list(rows).with_format(fmt), 1 if regression else 2), expected)


@pytest.mark.parametrize("fmt", ["torch", "numpy"])
def test_trainer_hook_on_a_formatted_dataset(tmp_path, fmt):
    """The stock Trainer trains on a formatted dataset; its callback's report equals the plain-rows report."""
    rows = _rows(ragged=False)
    train = datasets.Dataset.from_list(rows).with_format(fmt)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=1, learning_rate=0.0,
                             optim="sgd", report_to="none", save_strategy="no", use_cpu=True)
    callback = SharpnessCallback(**{k: v for k, v in OPTIONS.items()})
    Trainer(model=tiny_bert(2, seed=1), args=args, train_dataset=train, callbacks=[callback]).train()
    report = callback.result.report
    assert report is not None, callback.result.error
    _assert_same(report, _report(rows))


def test_cli_reads_numeric_json_lines_labels(tmp_path):
    """JSON-lines with integer labels (a NumPy/Arrow int64 column once loaded) through ``hf-msam sharpness``."""
    from builders import REVIEW_WORDS, save_text_classifier
    from transformers import BertForSequenceClassification, BertTokenizerFast

    from hf_msam.curvature.cli import main

    folder = tmp_path / "model"
    save_text_classifier(folder)
    data = tmp_path / "reviews.jsonl"
    lines = [{"text": " ".join(REVIEW_WORDS[i : i + 3 + i % 2]), "label": i % 2} for i in range(6)]
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    output = tmp_path / "report.json"
    assert main([str(folder), "--data", str(data), "--output", str(output), "--num_examples", "6", "--measures",
                 "eigenvalues", "coherence", "--lanczos_iterations", "3", "--top_k", "1", "--quiet"]) == 0
    written = json.loads(output.read_text())
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    examples = [{**tokenizer(line["text"]), "labels": torch.tensor(line["label"])} for line in lines]
    expected = sharpness_report(BertForSequenceClassification.from_pretrained(folder), examples, tokenizer=tokenizer,
                                num_examples=6, measures=["eigenvalues", "coherence"], lanczos_iterations=3, top_k=1)
    assert written["errors"] == [] and expected.errors == []
    assert written["lambda_max"] == pytest.approx(expected.lambda_max, rel=1e-5)
    assert written["coherence"] == pytest.approx(expected.coherence, rel=1e-5)


@pytest.mark.parametrize("fmt", ["torch", "numpy"])
def test_report_with_a_tokenizer_on_a_formatted_dataset(tmp_path, fmt):
    """``tokenizer=`` (``DataCollatorWithPadding``) on ragged rows of a formatted Dataset."""
    from builders import REVIEW_WORDS, save_text_classifier

    model, tokenizer = save_text_classifier(tmp_path / "model")
    rows = [{**tokenizer(" ".join(REVIEW_WORDS[i : i + 2 + i % 3])), "labels": i % 2} for i in range(6)]
    kwargs = dict(tokenizer=tokenizer, num_examples=6, measures=["eigenvalues", "coherence"], lanczos_iterations=3,
                  top_k=1)
    expected = sharpness_report(model, rows, **kwargs)
    _assert_same(sharpness_report(model, datasets.Dataset.from_list(rows).with_format(fmt), **kwargs), expected)
