"""hf_msam.publish.card: the card of a real (tiny) training run, its curvature section, its metadata (base model,
datasets, licence, library, tags) and its citations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from hf_msam.publish.card import card_data_from_trainer, load_card_data, render_model_card, write_model_card
from builders import save_tiny_bert, write_text_csv

DATA = {
    "model_name": "minilm-bbc", "hub_model_id": "tester/minilm-bbc",
    "base_model": "sentence-transformers/all-MiniLM-L6-v2", "task": "text-classification",
    "dataset": "GLUE MRPC", "dataset_tags": ["nyu-mll/glue"], "dataset_args": "mrpc", "language": "en",
    "num_labels": 2, "label_names": ["no", "yes"], "train_examples": 100, "eval_examples": 20,
    "msam": {"rho": 0.05, "micro-batch size": 8, "m (micro-batches per optimizer step)": 4},
    "hyperparameters": {"learning_rate": 1e-4}, "results": {"loss": 0.31, "accuracy": 0.8512, "f1": 0.9},
    "training_results": [{"Training Loss": 0.5, "Epoch": 1.0, "Step": 10, "Validation Loss": 0.31,
                          "Accuracy": 0.8512}],
    "versions": {"hf_msam": "0.1.0"},
}
# The report keys of the stability verdict (sharpness.json) that the card shows in words.
VERDICT_REPORT = {
    "num_examples": 16, "lambda_max": 12.5, "trace": 340.25, "trace_stderr": 3.5, "m_sharpness": 0.0125,
    "m_sharpness_rho": 0.05, "m_sharpness_m": 4, "coherence": 3.75, "coherence_examples": 16,
    "coherence_hessian": "gauss-newton", "coherence_train_estimate": 7.5, "coherence_train_interval": [6.25, 9.5],
    "num_train_examples": 32, "learning_rate": 0.01, "train_batch_size": 8,
    "eta_critical_theorem1": 0.0123, "eta_critical_gd": 0.16, "stable_sgd": False, "stability_basis": "theorem1",
    "stability_verdict": "unstable",
    "stability_reason": "lambda_max 12.5 exceeds sigma/(eta sqrt(n/B - 1)) at the upper end of the sigma interval.",
    "adam_preconditioned_lambda_max": 1234.5, "adam_stability_threshold": 3800.0, "adam_edge_ratio": 0.325,
    "hvp_count": 80, "hvp_counts": {"eigenvalues": 30}, "seconds": {"trace": 0.5}, "schema_version": 1,
}
CITATIONS = {"foret2021sharpness": "2010.01412", "behdin2023msam": "2302.09693", "dexter2024precise": "2401.12332"}


def _metadata(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}")[1].split("\n## ")[0]


def _table_rows(section: str) -> list[str]:
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    return lines[2:]  # after the header and the |---| line


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<(https?://[^>]+)>", text)


def _dead_links(card: str, folder: Path) -> list[str]:
    """Links a reader cannot follow: relative files missing from ``folder``, and web addresses other than
    the base model's Hub page and the cited papers' arXiv pages."""
    meta = _metadata(card)
    live = {f"https://arxiv.org/abs/{number}" for number in CITATIONS.values()}
    if meta.get("base_model"):
        live.add(f"https://huggingface.co/{meta['base_model']}")
    dead = []
    for link in _links(card):
        if link.startswith(("http://", "https://")):
            if link not in live:
                dead.append(link)
        elif not (folder / link).is_file():
            dead.append(link)
    return dead


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """The default text recipe on a tiny BERT: 2 epochs with an evaluation after each, the final evaluation and
    the curvature report, as the default run does."""
    from hf_msam.recipes import glue

    root = tmp_path_factory.mktemp("card_run")
    out = root / "run"
    argv = ["--model_name_or_path", str(save_tiny_bert(root / "bert")),
            "--train_file", str(write_text_csv(root / "train.csv", n=32, seed=0)),
            "--validation_file", str(write_text_csv(root / "dev.csv", n=16, seed=1)),
            "--output_dir", str(out), "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3", "--sam_micro_batch_size", "4",
            "--logging_steps", "1", "--seed", "0", "--sharpness_num_examples", "16"]
    assert glue.main(argv) == 0
    return out


def test_card_of_a_real_run_has_one_row_per_evaluation_the_theorem1_label_and_no_dead_link(text_run):
    card = (text_run / "README.md").read_text()
    rows = _table_rows(_section(card, "Training results"))
    assert len(rows) == len(set(rows)) == 2, rows  # one row per evaluation during training (epochs 1 and 2)
    assert [row.split("|")[3].strip() for row in rows] == ["4", "8"]  # steps
    assert "largest stable" not in card
    theorem1 = [line for line in card.splitlines() if "Theorem 1" in line and "|" in line]
    # Theorem 1 with the estimated training-set sigma proves nothing: the row must not say "provably"
    assert theorem1 and all("gives instability" in line and "provabl" not in line for line in theorem1), theorem1
    curvature = _section(card, "Curvature report (sharpness and Hessian coherence)")
    for internal in ("hvp_count", "seconds", "schema_version", "lanczos_iterations", "probe_sampling"):
        assert internal not in curvature, internal
    assert len(_table_rows(curvature)) <= 10
    assert "[sharpness.json](sharpness.json)" in curvature
    assert re.search(r"SGD stability verdict.*\*\*(stable|unstable|inconclusive)\*\*\. \w", curvature)  # a reason follows
    assert _dead_links(card, text_run) == []
    assert "github.com/hf-msam" not in card


def test_curvature_section_shows_the_verdict_in_words_and_the_adam_numbers(tmp_path):
    (tmp_path / "sharpness.json").write_text(json.dumps(VERDICT_REPORT))
    (tmp_path / "sharpness.png").write_bytes(b"\x89PNG")
    card = write_model_card(tmp_path, dict(DATA)).read_text()
    curvature = _section(card, "Curvature report (sharpness and Hessian coherence)")
    assert "**unstable**" in curvature and VERDICT_REPORT["stability_reason"] in curvature
    assert "learning rate 0.01 and batch size 8" in curvature
    rows = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in _table_rows(curvature)}
    assert rows["Largest Hessian eigenvalue lambda_max"] == "12.5"
    assert rows["Hessian trace (Hutchinson)"] == "340.25 ± 3.5"
    assert rows["Hessian coherence sigma of the 32 training examples (estimate, interval)"] == "7.5 [6.25, 9.5]"
    assert rows["Learning rate from which Theorem 1 gives instability (batch size 8, estimated sigma)"] == "0.0123"
    assert rows["Preconditioned sharpness lambda_max(P^-1 H) of Adam"] == "1234.5"
    assert rows["Adam edge-of-stability threshold (2 + 2 beta1) / ((1 - beta1) eta)"] == "3800"
    assert rows["Preconditioned sharpness / threshold"] == "0.325"
    assert "hvp_count" not in curvature and "seconds" not in curvature and "schema_version" not in curvature
    assert "![Curvature report](sharpness.png)" in curvature
    assert _dead_links(card, tmp_path) == []


def test_curvature_section_leads_with_the_gauss_newton_headline(tmp_path):
    headline = {"ggn_verdict": "stable", "stable_ggn": True, "ggn_scope": "probe", "eta_ratio_ggn": 0.4,
                "mean_square_rate": -0.0125, "lambda_max_gap": 0.75, "drift_steps": 2500.0, "steps_trained": 120,
                "gradient_ratio": 0.002, "at_minimum": False, "ggn_reason": "Linearised SGD contracts in mean square.",
                "stability_verdict": "inconclusive", "stability_reason": "The probe holds part of the training set."}
    (tmp_path / "sharpness.json").write_text(json.dumps({**VERDICT_REPORT, **headline}))
    curvature = _section(render_model_card(tmp_path, dict(DATA)), "Curvature report (sharpness and Hessian coherence)")
    first, second = [line for line in curvature.splitlines() if "verdict" in line and "**" in line]
    assert first.startswith("Gauss-Newton mean-square verdict for the probe's examples at learning rate 0.01")
    for text in ("**stable**", "eta / eta_crit = 0.4", "-0.0125", "0.75", "2500 steps (120 steps trained)",
                 "gradient ratio 0.002", "not at a minimum", headline["ggn_reason"]):
        assert text in first, text
    assert second.startswith("SGD stability verdict for the training set") and "**inconclusive**" in second


def test_verdict_of_a_report_without_the_verdict_keys(tmp_path):
    report = {k: v for k, v in VERDICT_REPORT.items() if not k.startswith(("stability_v", "stability_r", "adam_"))}
    (tmp_path / "sharpness.json").write_text(json.dumps(report))
    curvature = _section(render_model_card(tmp_path, dict(DATA)), "Curvature report (sharpness and Hessian coherence)")
    assert "**unstable**" in curvature and "Theorem 1" in curvature
    assert "Adam" not in curvature


def test_card_without_curvature_report(tmp_path):
    path = write_model_card(tmp_path, dict(DATA))
    text = path.read_text()
    meta = _metadata(text)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "msam" in meta["tags"] and meta["datasets"] == ["nyu-mll/glue"]
    assert meta["library_name"] == "transformers"
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"accuracy": 0.8512, "f1": 0.9}
    assert "| rho | 0.05 |" in text and "| micro-batch size | 8 |" in text
    assert "No curvature report" in text
    assert "0.8512" in _section(text, "Training results")
    assert load_card_data(tmp_path)["results"]["accuracy"] == 0.8512


@pytest.mark.parametrize("base_model, dataset", [("bert-base-cased", "beans"), ("google/vit-base-patch16-224", "uoft-cs/cifar10")])
def test_metadata_for_hub_ids_with_and_without_an_organisation(tmp_path, base_model, dataset):
    data = {**DATA, "base_model": base_model, "dataset_tags": [dataset]}
    card = render_model_card(tmp_path, data)
    meta = _metadata(card)
    assert meta["base_model"] == base_model and meta["datasets"] == [dataset]
    assert f"[{base_model}](https://huggingface.co/{base_model})" in card


def test_citations_are_bibtex_entries_of_the_three_papers(tmp_path):
    card = render_model_card(tmp_path, dict(DATA))
    citation = _section(card, "Citation")
    entries = re.findall(r"@(\w+)\{(\w+),(.*?)\n\}", citation, flags=re.S)
    assert {key for _, key, _ in entries} == set(CITATIONS)
    for kind, key, body in entries:
        assert kind in {"inproceedings", "article"}
        fields = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?$", body, flags=re.M))
        assert {"title", "author", "year"} <= set(fields), key
        assert body.count("{") == body.count("}")
        assert CITATIONS[key] in body
    assert "Foret" in citation and "Behdin" in citation and "Dexter" in citation


def _trainer(tmp_path, model, **args):
    from builders import token_dataset
    from hf_msam import SAMTrainer, SAMTrainingArguments

    arguments = SAMTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1,
                                     report_to=[], sam_micro_batch_size=4, use_cpu=True, **args)
    return SAMTrainer(model=model, args=arguments, train_dataset=token_dataset(16))


def test_trainer_tags_the_model_so_that_any_push_carries_the_tags(tmp_path):
    from builders import tiny_bert

    model = tiny_bert()
    _trainer(tmp_path, model)
    assert {"msam", "hf_msam"} <= set(model.model_tags)
    model.add_model_tags(["my-tag"])
    card = render_model_card(tmp_path, card_data_from_trainer(_trainer(tmp_path, model)))
    assert {"msam", "hf_msam", "my-tag"} <= set(_metadata(card)["tags"])


def test_lora_model_card_is_a_peft_card_with_the_base_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    from builders import tiny_bert

    model = tiny_bert()
    model.config._name_or_path = "prajjwal1/bert-tiny"
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    data = card_data_from_trainer(_trainer(tmp_path, peft_model))
    meta = _metadata(render_model_card(tmp_path, data))
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "prajjwal1/bert-tiny"
    assert "msam" in meta["tags"]
    card = render_model_card(tmp_path, data)
    assert "AutoPeftModelForSequenceClassification.from_pretrained" in card and "pipeline(" not in card
    image = render_model_card(tmp_path, {**data, "task": "image-classification"})
    assert 'AutoModelForImageClassification.from_pretrained("prajjwal1/bert-tiny")' in image
    assert "PeftModel.from_pretrained(base" in image


def test_licence_taken_from_the_base_model_card(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = save_tiny_bert(tmp_path / "base")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    model = AutoModelForSequenceClassification.from_pretrained(base)
    data = card_data_from_trainer(_trainer(tmp_path, model))
    assert data["license"] == "mit"
    assert _metadata(render_model_card(tmp_path, data))["license"] == "mit"
    assert card_data_from_trainer(_trainer(tmp_path, model), license="apache-2.0")["license"] == "apache-2.0"


def test_licence_of_a_hub_base_model_in_the_local_cache(tmp_path, monkeypatch):
    """A Hub id whose card is in the local Hugging Face cache (no network): its licence is used."""
    from builders import tiny_bert

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--base" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n")
    (cache / "models--org--base" / "refs").mkdir()
    (cache / "models--org--base" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    model = tiny_bert()
    model.config._name_or_path = "org/base"
    assert card_data_from_trainer(_trainer(tmp_path, model))["license"] == "cc-by-4.0"
    model.config._name_or_path = "org/unknown"
    assert card_data_from_trainer(_trainer(tmp_path, model))["license"] is None


def test_hyperparameters_of_the_trainer(tmp_path):
    from builders import tiny_bert

    data = card_data_from_trainer(_trainer(tmp_path, tiny_bert(), learning_rate=3e-4, seed=7,
                                           gradient_accumulation_steps=2, warmup_steps=2))
    hyper = data["hyperparameters"]
    assert hyper["learning_rate"] == 3e-4 and hyper["seed"] == 7
    assert hyper["train_batch_size"] == 8 and hyper["total_train_batch_size"] == 16
    assert hyper["gradient_accumulation_steps"] == 2 and hyper["training_steps"] == 1
    assert "adamw" in hyper["optimizer"] and hyper["lr_scheduler_type"] == "linear"
    json.dumps(data)  # saved as msam_card.json
    assert data["msam"]["rho"] == 0.01 and data["msam"]["micro-batch size"] == 4
    assert data["msam"]["m (micro-batches per optimizer step)"] == 4  # 2 per chunk, 2 accumulation chunks


@pytest.mark.parametrize("architecture, task, usage", [
    ("bert", "text-classification", 'pipeline("text-classification"'),
    ("vit", "image-classification", 'pipeline("image-classification"'),
    ("llama", "text-generation", 'pipeline("text-generation"'),
])
def test_task_follows_the_model_head(tmp_path, architecture, task, usage):
    from builders import tiny_bert
    from builders import save_tiny_vit
    from builders import tiny_llama
    from transformers import ViTForImageClassification

    model = {"bert": tiny_bert, "llama": tiny_llama,
             "vit": lambda: ViTForImageClassification.from_pretrained(save_tiny_vit(tmp_path / "vit"))}[architecture]()
    data = card_data_from_trainer(_trainer(tmp_path, model))
    assert data["task"] == task
    card = render_model_card(tmp_path, data)
    assert _metadata(card)["pipeline_tag"] == task and usage in card
