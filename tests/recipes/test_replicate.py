"""``benchmarks/replicate.py`` (the replication study) end to end on a tiny BERT and a tiny ViT: the run JSONs,
the summary, the table and the figure are written; a second invocation runs only what is missing and a third
runs nothing; settings that changed, unknown methods and uneven micro-batches are refused before training;
the binary task and the stratified held-out split follow their definitions."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from builders import save_tiny_bert

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("replicate", REPO / "benchmarks" / "replicate.py")
replicate = sys.modules["replicate"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(replicate)

TINY = [
    "--methods", "base", "msam2", "--rho", "0.05",
    "--text_train_examples", "24", "--text_eval_examples", "16", "--text_epochs", "1", "--text_batch_size", "8",
    "--text_max_length", "24", "--text_learning_rate", "1e-3",
    "--vision_epochs", "1", "--vision_batch_size", "8", "--vision_learning_rate", "1e-3",
    "--vit_hidden_size", "8", "--vit_num_layers", "1", "--vit_num_heads", "2",
    "--sharpness_num_examples", "8", "--sharpness_coherence_examples", "4", "--sharpness_lanczos_iterations", "3",
    "--sharpness_trace_probes", "2", "--sharpness_probe_steps", "2",
]  # fmt: skip


def write_images(path: Path, n: int = 40, side: int = 14, classes: int = 3) -> Path:
    """MNIST-5k layout (pixels 0-255 then the label, no header), gzipped; the class shows in the first pixels."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    pixels = rng.integers(0, 256, (n, side * side))
    pixels[:, :side] = labels[:, None] * 120
    with gzip.open(path, "wt") as handle:
        for row, label in zip(pixels, labels):
            handle.write(",".join(map(str, row)) + f",{label}\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicate")
    return {"bert": save_tiny_bert(root / "bert"), "images": write_images(root / "images.csv.gz")}


def study(assets, output_dir: Path, *extra: str) -> list[dict]:
    return replicate.main(["--output_dir", str(output_dir), "--text_model", str(assets["bert"]),
                           "--image_data", str(assets["images"]), *TINY, *extra])


def test_study_writes_runs_summary_figure_and_resumes(assets, tmp_path):
    out = tmp_path / "study"
    first = study(assets, out, "--seeds", "0")
    assert sorted((r["task"], r["method"], r["seed"]) for r in first) == [
        ("text", "base", 0), ("text", "msam2", 0), ("vision", "base", 0), ("vision", "msam2", 0)]
    runs = sorted((out / "runs").glob("*.json"))
    assert [p.name for p in runs] == ["text_base_seed0.json", "text_msam2_seed0.json", "vision_base_seed0.json",
                                      "vision_msam2_seed0.json"]
    for path in runs:
        record = json.loads(path.read_text())
        assert 0.0 <= record["eval_accuracy"] <= 1.0 and math.isfinite(record["eval_loss"])
        for key in ("lambda_max", "trace", "trace_stderr", "m_sharpness", "coherence_train_estimate", "step_time_s"):
            assert isinstance(record[key], float) and math.isfinite(record[key]), (path.name, key)
        assert record["step_time_s"] > 0 and record["optimizer_steps"] >= 1 and "git_commit" in record
        assert set(replicate.REPORT_KEYS) <= set(record) and set(record["missing_report_keys"]) < set(replicate.REPORT_KEYS)
        # every method's report measures the same thing: the same rho and micro-batch size of the m-sharpness
        assert record["m_sharpness_rho"] == 0.05 and record["m_sharpness_m"] == 2
    base, msam = (json.loads((out / "runs" / f"vision_{m}_seed0.json").read_text()) for m in ("base", "msam2"))
    assert (base["rho"], base["sam_micro_batch_size"]) == (0.0, None)
    assert (msam["rho"], msam["sam_micro_batch_size"], msam["micro_batches"]) == (0.05, 4, 2)
    assert base["settings"] == msam["settings"]  # same data, epochs, learning rate, batch

    summary = json.loads((out / "summary.json").read_text())
    entry = summary["tasks"]["vision"]["msam2"]
    assert entry["seeds"] == [0] and entry["lambda_max"]["mean"] == pytest.approx(msam["lambda_max"])
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| vision | msam2 | 1 |" in (out / "table.md").read_text()

    # A second invocation with one more seed runs only the new seed and leaves the finished runs untouched.
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in runs}
    second = study(assets, out, "--tasks", "vision", "--seeds", "0", "1")
    assert sorted((r["task"], r["method"], r["seed"]) for r in second) == [("vision", "base", 1), ("vision", "msam2", 1)]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in runs} == stamps
    summary = json.loads((out / "summary.json").read_text())
    values = [json.loads((out / "runs" / f"vision_msam2_seed{s}.json").read_text())["lambda_max"] for s in (0, 1)]
    assert values[0] != values[1]  # the seed changes the run
    stats = summary["tasks"]["vision"]["msam2"]["lambda_max"]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(np.mean(values))
    assert stats["std"] == pytest.approx(np.std(values, ddof=1))
    base_values = [json.loads((out / "runs" / f"vision_base_seed{s}.json").read_text())["lambda_max"] for s in (0, 1)]
    diffs = np.subtract(values, base_values)
    paired = summary["tasks"]["vision"]["msam2"]["minus_base"]["lambda_max"]
    assert paired["mean"] == pytest.approx(diffs.mean()) and paired["stderr"] == pytest.approx(diffs.std(ddof=1) / 2**0.5)

    # A third, identical invocation trains nothing.
    assert study(assets, out, "--tasks", "vision", "--seeds", "0", "1") == []

    # Runs stored with other settings stop the study before any training, naming what differs.
    with pytest.raises(SystemExit, match="text_epochs"):
        study(assets, out, "--seeds", "0", "--text_epochs", "2")
    with pytest.raises(SystemExit, match="rho"):
        study(assets, out, "--seeds", "0", "--rho", "0.1")


@pytest.mark.parametrize(
    "extra, message",
    [(["--methods", "msam0"], "--methods"), (["--methods", "adam"], "--methods"), (["--methods", "sam@-1"], "--methods"),
     (["--methods", "msam3"], "does not split into 3"), (["--tasks", "audio"], "--tasks"),
     (["--seeds", "1", "1"], "--seeds"), (["--methods", "sam", "sam"], "distinct methods"), (["--text_data", "missing.tsv"], "missing.tsv")],
)
def test_bad_arguments_are_refused_up_front(assets, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        study(assets, tmp_path / "bad", *extra)
    assert not (tmp_path / "bad").exists()


def test_binary_task_and_stratified_held_out_split(tmp_path):
    import datasets

    rows = [(1, 0.6, "a"), (2, 0.5, "b"), (3, -0.5, "c"), (4, -0.51, "d"), (5, 0.0, "e"), (6, 3.9, "f''s")]
    tsv = tmp_path / "s.tsv"
    tsv.write_text("".join(f"{i}\t{s}\t{t}\n" for i, s, t in rows))
    assert replicate.read_sentiment_tsv(tsv) == (["a", "d", "f''s"], [1, 0, 1])
    tsv.write_text("1\t0.7\tok\n2\tnot-a-number\tbad\n")
    with pytest.raises(ValueError, match="line 2"):
        replicate.read_sentiment_tsv(tsv)

    texts, labels = replicate.read_sentiment_tsv(replicate.TEXT_DATA)
    assert (labels.count(1), labels.count(0)) == (4982, 5061)  # the counts the data's README states
    table = datasets.Dataset.from_dict(
        {"text": texts, "label": labels, "row": list(range(len(texts)))},
        features=datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["n", "p"]),
                                    "row": datasets.Value("int64")}),
    )
    args = replicate.StudyArguments(tasks=["text"])
    train, held_out = replicate.split(table, args, 1000, None)
    again, _ = replicate.split(table, args, 1000, None)
    assert len(held_out) == math.ceil(0.2 * len(texts)) and len(train) == 1000
    assert train["row"] == again["row"]  # fixed
    assert not set(train["row"]) & set(held_out["row"])  # disjoint
    for part in (held_out, train):
        share = sum(part["label"]) / len(part)
        assert abs(share - 4982 / 10043) < 2 / len(part)  # stratified: the positive share of the whole set
