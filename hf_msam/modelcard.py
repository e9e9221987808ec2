"""Model cards for models trained with mSAM: base model, data, mSAM settings, results, curvature report.

Two steps, so that a card can be rebuilt from a finished ``output_dir`` (``hf-msam push``):

1. :func:`card_data_from_trainer` gathers everything from a ``SAMTrainer`` (arguments, ``log_history``,
   model config, data sizes) plus the ``create_model_card`` keyword arguments into a JSON-able dict,
   saved as ``output_dir/msam_card.json`` (no token, no paths to secrets).
2. :func:`write_model_card` renders ``output_dir/README.md`` from that dict, the curvature report in
   ``output_dir/sharpness.json`` and its plot ``output_dir/sharpness.png`` when present, with the template
   ``hf_msam/model_cards/msam_model_card.md`` through ``huggingface_hub.ModelCard.from_template`` (YAML
   metadata: base model, datasets, tags including ``msam``, model-index with the evaluation metrics).

``SAMTrainer.create_model_card`` calls :func:`create_model_card`, so ``trainer.push_to_hub()`` and the recipes
both produce this card.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["CARD_DATA_NAME", "TEMPLATE_PATH", "card_data_from_trainer", "create_model_card", "load_card_data",
           "render_model_card", "write_model_card"]

CARD_DATA_NAME = "msam_card.json"
TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "msam_model_card.md"
# Metric names the Hub's model-index understands (transformers.modelcard.METRIC_TAGS) -> display names.
_INDEX_METRICS = {"accuracy": "Accuracy", "f1": "F1", "matthews_correlation": "Matthews Correlation",
                  "pearson": "Pearson", "pearsonr": "Pearson", "spearmanr": "Spearmanr", "precision": "Precision",
                  "recall": "Recall"}
_INDEX_TYPES = {"pearson": "pearsonr"}
_SHARPNESS_MEANING = {
    "lambda_max": "largest Hessian eigenvalue",
    "lambda_max_residual": "Lanczos residual",
    "top_eigenvalues": "top Hessian eigenvalues",
    "trace": "Hessian trace (Hutchinson)",
    "trace_stderr": "standard error of the trace",
    "coherence": "Hessian coherence sigma",
    "m_sharpness": "mean loss increase at micro-batch SAM perturbations",
    "eta_critical_theorem1": "largest stable SGD learning rate, Theorem 1",
    "eta_critical_gd": "2 / lambda_max, gradient-descent bound",
    "stable_sgd": "SGD stability verdict at the run's learning rate and batch size",
    "growth_rate": "linearised SGD growth rate of ||v|| per step",
    "num_examples": "probe-set examples",
    "hvp_count": "Hessian-vector products used",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value[:8]) + (" ..." if len(value) > 8 else "")
    return str(value)


def _hub_id(name: str | None) -> str | None:
    """``name`` if it is a Hub repo id (``org/model``) and not a local path, else None."""
    if not name or os.path.exists(name) or not _HUB_ID.match(name):
        return None
    return name


def card_data_from_trainer(trainer, **kwargs) -> dict[str, Any]:
    """Everything the card shows, from a trained ``SAMTrainer`` and ``create_model_card``'s keyword arguments
    (``model_name, finetuned_from, tasks, dataset, dataset_tags, dataset_args, language, license, tags``) plus
    the hf_msam extras ``label_names``, ``hub_model_id``."""
    import torch
    import transformers

    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model) if trainer.model is not None else None
    config = getattr(model, "config", None)
    output_dir = Path(args.output_dir)

    finetuned_from = kwargs.get("finetuned_from")
    if finetuned_from is None and config is not None:
        finetuned_from = getattr(config, "_name_or_path", None) or None
    tasks = kwargs.get("tasks") or ("image-classification" if "pixel_values" in getattr(model, "main_input_name", "") else "text-classification")
    tasks = tasks[0] if isinstance(tasks, (list, tuple)) else tasks
    dataset_tags = kwargs.get("dataset_tags")
    dataset_tags = [dataset_tags] if isinstance(dataset_tags, str) else list(dataset_tags or [])
    dataset_args = kwargs.get("dataset_args")
    dataset_args = dataset_args[0] if isinstance(dataset_args, (list, tuple)) else dataset_args

    world = max(getattr(args, "world_size", 1), 1)
    ga = args.gradient_accumulation_steps
    total = args.per_device_train_batch_size * world * ga
    micro = getattr(args, "sam_micro_batch_size", None)
    per_device = args.per_device_train_batch_size
    m_per_device = math.ceil(per_device / micro) if micro else 1
    msam = {
        "rho": getattr(args, "sam_rho", None),
        "micro-batch size": micro if micro else f"{per_device} (the per-device batch)",
        "m (micro-batches per optimizer step)": 1 if getattr(args, "sam_global", False) else m_per_device * world * ga,
        "adaptive (ASAM)": getattr(args, "sam_adaptive", False),
        "global SAM": getattr(args, "sam_global", False),
        "base optimizer": str(getattr(args.optim, "value", args.optim)),
        "learning rate": args.learning_rate,
        "mini-batch size (all processes, all accumulation steps)": total,
    }
    if getattr(args, "sam_adaptive", False):
        msam["ASAM eta"] = getattr(args, "sam_adaptive_eta", None)

    hyper = {
        "learning_rate": args.learning_rate,
        "train_batch_size (per device)": per_device,
        "eval_batch_size (per device)": args.per_device_eval_batch_size,
        "seed": args.seed,
        "num_processes": world,
        "gradient_accumulation_steps": ga,
        "total_train_batch_size": total,
        "optimizer": f"{getattr(args.optim, 'value', args.optim)} (betas={args.adam_beta1},{args.adam_beta2}, eps={args.adam_epsilon}, weight_decay={args.weight_decay})",
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps (a fraction if < 1)": getattr(args, "warmup_steps", 0),
        "num_epochs" if args.max_steps <= 0 else "training_steps": args.num_train_epochs if args.max_steps <= 0 else args.max_steps,
        "mixed_precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "no"),
    }

    results, header, rows = _results_from_history(trainer.state.log_history)
    train_n = _length(getattr(trainer, "train_dataset", None))
    eval_n = _length(getattr(trainer, "eval_dataset", None))
    label_names = kwargs.get("label_names")
    if label_names is None and config is not None and getattr(config, "id2label", None) and config.num_labels > 1:
        label_names = [config.id2label[i] for i in sorted(config.id2label)]
    try:
        import huggingface_hub

        hub_version = huggingface_hub.__version__
    except Exception:  # pragma: no cover
        hub_version = "?"
    import hf_msam

    return {
        "model_name": kwargs.get("model_name") or output_dir.resolve().name,
        "hub_model_id": kwargs.get("hub_model_id") or args.hub_model_id,
        "base_model": _hub_id(finetuned_from),
        "base_model_source": finetuned_from if finetuned_from and not _hub_id(finetuned_from) else None,
        "task": tasks,
        "dataset": kwargs.get("dataset") or (dataset_tags[0] if dataset_tags else "a custom data set"),
        "dataset_tags": dataset_tags,
        "dataset_args": dataset_args,
        "language": kwargs.get("language"),
        "license": kwargs.get("license"),
        "tags": list(kwargs.get("tags") or []),
        "num_labels": getattr(config, "num_labels", None),
        "label_names": label_names,
        "train_examples": train_n,
        "eval_examples": eval_n,
        "msam": msam,
        "hyperparameters": hyper,
        "results": results,
        "training_header": header,
        "training_rows": rows,
        "versions": {"hf_msam": hf_msam.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "huggingface_hub": hub_version},
    }


def _length(dataset) -> int | None:
    try:
        return len(dataset)
    except Exception:
        return None


def _results_from_history(history: list[dict]) -> tuple[dict[str, float], list[str], list[list[str]]]:
    """Final evaluation metrics (the last entry with ``eval_loss``) and a per-evaluation table."""
    evals = [h for h in history if "eval_loss" in h]
    skip = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch", "step"}
    results: dict[str, float] = {}
    if evals:
        for key, value in evals[-1].items():
            if key.startswith("eval_") and key not in skip and isinstance(value, (int, float)):
                results[key[len("eval_"):]] = float(value)
    metric_keys = [k for k in results if k != "loss"]
    header = ["Training Loss", "Epoch", "Step", "Validation Loss"] + [k.replace("_", " ").title() for k in metric_keys]
    rows, last_loss = [], "No log"
    for entry in history:
        if "loss" in entry:
            last_loss = _fmt(float(entry["loss"]))
        if "eval_loss" in entry:
            rows.append([last_loss, _fmt(float(entry.get("epoch", 0) or 0)), str(entry.get("step", "")),
                         _fmt(float(entry["eval_loss"]))] + [_fmt(entry.get(f"eval_{k}", float("nan"))) for k in metric_keys])
    return results, header, rows


def load_card_data(output_dir: str | os.PathLike) -> dict[str, Any]:
    """The card data saved by :func:`create_model_card` (empty dict if there is none)."""
    path = Path(output_dir) / CARD_DATA_NAME
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _sharpness_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for key, value in report.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                if isinstance(subvalue, (int, float, bool, str)) and len(str(subvalue)) < 80:
                    rows.append((f"{key}.{sub}", _fmt(subvalue), _SHARPNESS_MEANING.get(sub, "")))
        elif isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) < 80):
            rows.append((key, _fmt(value), _SHARPNESS_MEANING.get(key, "")))
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value) and len(value) <= 20:
            rows.append((key, _fmt(value), _SHARPNESS_MEANING.get(key, "")))
    return rows


def render_model_card(output_dir: str | os.PathLike, data: dict[str, Any]) -> str:
    """The card's markdown (YAML metadata included) for ``data`` and the curvature report in ``output_dir``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    output_dir = Path(output_dir)
    task = data.get("task") or "text-classification"
    dataset_id = (data.get("dataset_tags") or [None])[0]
    dataset_name = data.get("dataset") or "custom data"
    results = data.get("results") or {}
    model_name = data.get("model_name") or output_dir.resolve().name

    eval_results = []
    for key, value in results.items():
        if key in _INDEX_METRICS:
            eval_results.append(EvalResult(
                task_type=task, dataset_type=dataset_id or "custom", dataset_name=dataset_name,
                dataset_config=data.get("dataset_args"), dataset_split="validation",
                metric_type=_INDEX_TYPES.get(key, key), metric_name=_INDEX_METRICS[key], metric_value=round(value, 4),
            ))
    tags = ["msam", "sam", "sharpness-aware-minimization", "hf_msam", task, "generated_from_trainer"]
    tags = list(dict.fromkeys(tags + list(data.get("tags") or [])))
    card_data = ModelCardData(
        base_model=data.get("base_model"),
        datasets=[dataset_id] if dataset_id and _HUB_ID.match(dataset_id) else None,
        language=data.get("language"),
        license=data.get("license"),
        library_name="transformers",
        pipeline_tag=task,
        tags=tags,
        model_name=model_name,
        eval_results=eval_results or None,
    )

    report_path = output_dir / "sharpness.json"
    sharpness, note = [], None
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
            sharpness = _sharpness_rows(report) if isinstance(report, dict) else []
            if isinstance(report, dict) and isinstance(report.get("optimizer_note") or report.get("note"), str):
                note = report.get("optimizer_note") or report.get("note")
        except (OSError, ValueError):
            sharpness = [("sharpness.json", "unreadable", "")]
    base = data.get("base_model")
    label_names = data.get("label_names")
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        hub_model_id=data.get("hub_model_id"),
        base_model=base,
        base_model_url=f"https://huggingface.co/{base}" if base else None,
        base_model_note=f"a fine-tuned version of `{data['base_model_source']}`" if data.get("base_model_source") else None,
        dataset_text=dataset_name + (f" (`{dataset_id}`" + (f", `{data['dataset_args']}`" if data.get("dataset_args") else "") + ")" if dataset_id else ""),
        task=task,
        pipeline_tag=task,
        num_labels=data.get("num_labels"),
        label_names=", ".join(label_names[:20]) + (" ..." if len(label_names) > 20 else "") if label_names else None,
        train_examples=data.get("train_examples", "unknown"),
        eval_examples=data.get("eval_examples", "unknown"),
        results=[(k.replace("_", " ").title(), _fmt(v)) for k, v in results.items()],
        msam=[(k, _fmt(v)) for k, v in (data.get("msam") or {}).items()],
        hyperparameters=[(k, _fmt(v)) for k, v in (data.get("hyperparameters") or {}).items()],
        training_header=data.get("training_header") or [],
        training_rows=data.get("training_rows") or [],
        sharpness=sharpness,
        sharpness_note=note,
        sharpness_plot="sharpness.png" if (output_dir / "sharpness.png").is_file() else None,
        versions=sorted((data.get("versions") or {}).items()),
    )
    return str(card)


def write_model_card(output_dir: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Save ``data`` as ``msam_card.json`` and the rendered card as ``README.md`` in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CARD_DATA_NAME).write_text(json.dumps(data, indent=2, default=str) + "\n")
    path = output_dir / "README.md"
    path.write_text(render_model_card(output_dir, data))
    return path


def create_model_card(trainer, **kwargs) -> Path | None:
    """``SAMTrainer.create_model_card``: write ``README.md`` (and ``msam_card.json``) on the main process."""
    if not trainer.is_world_process_zero():
        return None
    return write_model_card(trainer.args.output_dir, card_data_from_trainer(trainer, **kwargs))
