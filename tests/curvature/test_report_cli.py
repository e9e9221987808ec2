"""``hf-msam sharpness``: a tiny saved text model and a tiny CSV give a JSON, a PNG and a
table; images work too; labels follow the model's own label2id; bad input gets a message naming the fix."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from builders import save_text_classifier, tiny_bert, tiny_vit, write_review_csv
from transformers import BertForSequenceClassification, BertTokenizerFast

from hf_msam.cli import main as hf_msam_main
from hf_msam.curvature.cli import main
from hf_msam.curvature.report import sharpness_report

CHEAP = ["--num_examples", "6", "--measures", "eigenvalues", "trace", "--lanczos_iterations", "3", "--top_k", "2",
         "--trace_probes", "2", "--quiet"]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    save_text_classifier(folder, label2id={"pos": 0, "neg": 1})  # not the sorted order of the names
    return folder


def test_cli_writes_json_png_and_prints_a_table(text_model, tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    write_review_csv(data, ["neg", "pos"])
    output = tmp_path / "out" / "report.json"
    status = hf_msam_main(["sharpness", str(text_model), "--data", str(data), "--text_column", "review",
                           "--label_column", "sentiment", "--learning_rate", "0.1", "--train_batch_size", "4",
                           "--output", str(output), *CHEAP])
    assert status == 0
    report = json.loads(output.read_text())
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["num_examples"] == 6 and report["num_train_examples"] == 10  # the whole file, not a split
    assert report["learning_rate"] == 0.1 and report["train_batch_size"] == 4
    assert report["eta_critical_gd"] == pytest.approx(2 / report["lambda_max"])
    printed = capsys.readouterr().out
    assert "Curvature report" in printed and f"{report['lambda_max']:.4g}" in printed


def test_cli_matches_labels_to_the_model_label2id(text_model, tmp_path):
    """Rows labelled "pos" must be class 0 of this model (sorted order would make them 1): the probe loss is
    that of the model's classes, computed here by hand."""
    data = tmp_path / "reviews.csv"
    write_review_csv(data, ["pos"], rows=6)
    output = tmp_path / "report.json"
    assert main([str(text_model), "--data", str(data), "--text_column", "review", "--label_column", "sentiment",
                 "--output", str(output), *CHEAP]) == 0
    model = BertForSequenceClassification.from_pretrained(text_model)
    tokenizer = BertTokenizerFast.from_pretrained(text_model)
    with open(data) as handle:
        texts = [row["review"] for row in csv.DictReader(handle)]
    with torch.no_grad():
        logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(6, dtype=torch.long)).item()
    assert json.loads(output.read_text())["loss"] == pytest.approx(expected, rel=1e-5)


def test_cli_on_an_image_model(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor

    folder = tmp_path / "vit"
    tiny_vit(2, seed=0, num_channels=3, attn_implementation=None, label2id={"cat": 0, "dog": 1},
             id2label={0: "cat", 1: "dog"}).save_pretrained(folder)
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(folder)
    images = tmp_path / "images"
    for label in ("cat", "dog"):
        (images / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray((torch.rand(10, 10, 3) * 255).to(torch.uint8).numpy()).save(images / label / f"{i}.png")
    output = tmp_path / "vit.json"
    assert main([str(folder), "--data", str(images), "--output", str(output), *CHEAP]) == 0
    report = json.loads(output.read_text())
    assert report["num_train_examples"] == 8 and report["lambda_max"] is not None
    assert output.with_suffix(".png").is_file()


def test_cli_report_equals_the_python_entry_point(text_model, tmp_path):
    """Same model file, same tokenized examples (the whole file as the probe set, so the loader's row order
    does not matter): the command line adds nothing to the numbers."""
    data = tmp_path / "reviews.csv"
    write_review_csv(data, ["0", "1"], rows=8)
    output = tmp_path / "report.json"
    assert main([str(text_model), "--data", str(data), "--text_column", "review", "--label_column", "sentiment",
                 "--output", str(output), *CHEAP, "--num_examples", "8"]) == 0
    model = BertForSequenceClassification.from_pretrained(text_model)
    tokenizer = BertTokenizerFast.from_pretrained(text_model)
    with open(data) as handle:
        rows = list(csv.DictReader(handle))
    examples = [{**tokenizer(r["review"]), "labels": int(r["sentiment"])} for r in rows]
    expected = sharpness_report(model, examples, tokenizer=tokenizer, num_examples=8, measures=["eigenvalues", "trace"],
                                lanczos_iterations=3, top_k=2, trace_probes=2)
    written = json.loads(output.read_text())
    assert written["num_examples"] == 8
    for key in ("loss", "lambda_max", "trace"):
        assert written[key] == pytest.approx(getattr(expected, key), rel=1e-5), key
    scale = 1e-5 * abs(expected.lambda_max)  # row order changes float sums: errors relative to the spectrum's top
    assert written["top_eigenvalues"] == pytest.approx(expected.top_eigenvalues, rel=1e-5, abs=scale)


# --- bad input -----------------------------------------------------------------------------------------
def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_cli_bad_input_names_the_problem(text_model, tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    write_review_csv(data, ["neg", "pos"])
    out = ["--output", str(tmp_path / "r.json")]
    assert "missing.csv" in _error(capsys, [str(text_model), "--data", str(tmp_path / "missing.csv"), *out])
    message = _error(capsys, [str(text_model), "--data", str(data), "--text_column", "body", "--label_column",
                              "sentiment", *out])
    assert "'body'" in message and "review" in message
    message = _error(capsys, [str(text_model), "--data", str(data), "--label_column", "stars", *out])
    assert "'stars'" in message and "--label_column" in message
    message = _error(capsys, [str(text_model), "--data", str(data), "--text_column", "review", "--label_column",
                              "sentiment", "--measures", "lambda_max", *out])
    assert "--measures" in message and "eigenvalues" in message
    message = _error(capsys, [str(tmp_path), "--data", str(data), *out])
    assert "config.json" in message
    message = _error(capsys, [str(text_model), "--data", str(data), "--output", str(tmp_path / "r.txt")])
    assert ".json" in message


def test_cli_refuses_labels_the_model_does_not_have(tmp_path, capsys):
    regression = tmp_path / "regression"
    save_text_classifier(regression, num_labels=1)
    data = tmp_path / "reviews.csv"
    write_review_csv(data, ["neg", "pos"])
    args = ["--data", str(data), "--text_column", "review", "--label_column", "sentiment", "--output",
            str(tmp_path / "r.json")]
    assert "regression model" in _error(capsys, [str(regression), *args])
    classifier = tmp_path / "classifier"
    save_text_classifier(classifier, label2id={"good": 0, "bad": 1})
    message = _error(capsys, [str(classifier), *args])
    assert "not among the classes" in message and "good" in message


def test_cli_refuses_pickled_weights(tmp_path, capsys):
    folder = tmp_path / "pickled"
    model = tiny_bert()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    data = tmp_path / "reviews.csv"
    write_review_csv(data, ["0", "1"])
    message = _error(capsys, [str(folder), "--data", str(data), "--output", str(tmp_path / "r.json")])
    assert "safetensors" in message


def test_cli_reads_a_checkpoint_optimizer_state_and_prints_the_verdict(tmp_path, capsys):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model, tokenizer = save_text_classifier(tmp_path / "base")
    data = tmp_path / "reviews.csv"
    write_review_csv(data, ["0", "1"])
    rows = list(csv.DictReader(open(data)))
    encoded = tokenizer([r["review"] for r in rows], truncation=True, max_length=16)
    train = [{"input_ids": ids, "labels": int(r["sentiment"])} for ids, r in zip(encoded["input_ids"], rows)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, learning_rate=2e-3,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    output = tmp_path / "report.json"
    status = main([str(checkpoint), "--data", str(data), "--text_column", "review", "--label_column", "sentiment",
                   "--learning_rate", "2e-3", "--train_batch_size", "4", "--output", str(output), "--num_examples", "6",
                   "--measures", "eigenvalues", "adam", "--lanczos_iterations", "3", "--top_k", "2", "--quiet"])
    assert status == 0
    report = json.loads(output.read_text())
    assert report["adam_preconditioned_lambda_max"] > 0 and report["errors"] == []
    assert report["adam_stability_threshold"] == pytest.approx((2 + 2 * 0.9) / (0.1 * 2e-3))
    assert report["adam_edge_ratio"] == pytest.approx(report["adam_preconditioned_lambda_max"]
                                                      / report["adam_stability_threshold"])
    printed = capsys.readouterr().out
    assert f"verdict: {report['stability_reason']}" in printed and report["stability_verdict"] in printed
    status = main([str(checkpoint), "--data", str(data), "--text_column", "review", "--label_column", "sentiment",
                   "--output", str(tmp_path / "r2.json"), "--optimizer_state", str(tmp_path / "missing.pt"), *CHEAP])
    assert status == 2 and "missing.pt: no such file" in capsys.readouterr().err
