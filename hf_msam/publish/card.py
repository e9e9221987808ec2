"""Model cards for models trained with mSAM: base model, data, mSAM settings, results, curvature report.

Two steps, so that a card can be rebuilt from a finished ``output_dir`` (``hf-msam push``):

1. :func:`card_data_from_trainer` gathers everything from a ``SAMTrainer`` (arguments, ``log_history``,
   model config, data sizes) plus the ``create_model_card`` keyword arguments into a JSON-able dict,
   saved as ``output_dir/msam_card.json`` (no token, no paths to secrets). The training-results table and
   the hyperparameters come from ``transformers.modelcard`` (``parse_log_history``,
   ``extract_hyperparameters_from_trainer``), as in the stock Trainer's card.
2. :func:`write_model_card` renders ``output_dir/README.md`` from that dict, the curvature report
   (``hook.REPORT_JSON``, in words by ``curvature.summary``) and its plot (``hook.REPORT_PLOT``) when present, with
   the template ``model_card_template.md`` (beside this module) through ``huggingface_hub.ModelCard.from_template`` (YAML metadata:
   base model, datasets, licence, library (``peft`` for adapters), tags including ``msam``, model-index with
   the evaluation metrics).

``SAMTrainer.create_model_card`` calls :func:`create_model_card`, so ``trainer.push_to_hub()`` and the recipes
both produce this card.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..curvature.hook import REPORT_JSON, REPORT_PLOT
from ..curvature.summary import format_value, summarise
from ..training.arguments import micro_batches_per_device, sam_options_of
from ..training.trainer import MODEL_TAGS

__all__ = ["CARD_DATA_NAME", "TEMPLATE_PATH", "base_model_license", "card_data_from_trainer",
           "create_model_card", "load_card_data", "render_model_card", "write_model_card"]

CARD_DATA_NAME = "msam_card.json"
TEMPLATE_PATH = Path(__file__).parent / "model_card_template.md"  # package data
# Metric names the Hub's model-index understands (transformers.modelcard.METRIC_TAGS) -> display names.
_INDEX_METRICS = {"accuracy": "Accuracy", "f1": "F1", "matthews_correlation": "Matthews Correlation",
                  "pearson": "Pearson", "pearsonr": "Pearson", "spearmanr": "Spearmanr", "precision": "Precision",
                  "recall": "Recall"}
_INDEX_TYPES = {"pearson": "pearsonr"}
_NOT_RESULTS = {"runtime", "samples_per_second", "steps_per_second", "epoch", "step"}


def _hub_id(name: str | None) -> str | None:
    """``name`` if it is a Hub repo id (``model`` or ``org/model``) and not a local path, else None."""
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def base_model_license(name_or_path: str | None) -> str | None:
    """The ``license`` in the model card of the base model, when that card is at hand without the network:
    ``README.md`` of a local model folder, or of a Hub id in the local Hugging Face cache. None otherwise."""
    if not name_or_path:
        return None
    readme: str | os.PathLike | None = Path(name_or_path) / "README.md"
    if not Path(readme).is_file():
        readme = try_to_load_from_cache(name_or_path, "README.md") if _hub_id(name_or_path) else None
        if not isinstance(readme, str):
            return None
    return ModelCard.load(readme, ignore_metadata_errors=True).data.license


def card_data_from_trainer(trainer, **kwargs) -> dict[str, Any]:
    """Everything the card shows, from a trained ``SAMTrainer`` and ``create_model_card``'s keyword arguments
    (``model_name, finetuned_from, tasks, dataset, dataset_tags, dataset_args, language, license, tags``) plus
    the hf_msam extras ``label_names``, ``hub_model_id``.

    For a PEFT model (LoRA) the card is a PEFT card: ``library_name: peft`` and ``base_model`` from the adapter's
    ``base_model_name_or_path``. The licence is the base model's when its card is at hand
    (:func:`base_model_license`) and none is given."""
    import torch
    import transformers
    from peft import PeftModel
    from transformers.modelcard import parse_log_history

    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_peft = isinstance(model, PeftModel)
    config = getattr(model, "config", None)
    output_dir = Path(args.output_dir)

    finetuned_from = kwargs.get("finetuned_from")
    if finetuned_from is None and is_peft:
        finetuned_from = model.peft_config[model.active_adapter].base_model_name_or_path
    if finetuned_from is None and config is not None:
        finetuned_from = getattr(config, "_name_or_path", None) or None
    tasks = kwargs.get("tasks") or _task_of(model.get_base_model() if is_peft else model)
    tasks = tasks[0] if isinstance(tasks, (list, tuple)) else tasks
    dataset_tags = kwargs.get("dataset_tags")
    dataset_tags = [dataset_tags] if isinstance(dataset_tags, str) else list(dataset_tags or [])
    dataset_args = kwargs.get("dataset_args")
    dataset_args = dataset_args[0] if isinstance(dataset_args, (list, tuple)) else dataset_args

    optimizer = str(getattr(args.optim, "value", args.optim))
    world = max(args.world_size, 1)
    ga = args.gradient_accumulation_steps
    sam = sam_options_of(args)  # a plain TrainingArguments: the mSAM defaults, as SAMTrainer trained with
    micro = sam.sam_micro_batch_size
    per_device = args.per_device_train_batch_size
    per_process = micro if micro else per_device
    if getattr(trainer, "is_fsdp_enabled", False):  # micro-batch k is the union of the processes' k-th (design 2.6)
        m = micro_batches_per_device(sam, per_device) * ga
        micro_batch = f"{per_process * world} (the union of the {world} processes' micro-batches of {per_process})"
    else:
        m = 1 if sam.sam_global else micro_batches_per_device(sam, per_device) * world * ga
        micro_batch = micro if micro else f"{per_device} (the per-device batch)"
    msam = {
        "rho": sam.sam_rho,
        "micro-batch size": micro_batch,
        "m (micro-batches per optimizer step)": m,
        "adaptive (ASAM)": sam.sam_adaptive,
        "global SAM": sam.sam_global,
        "base optimizer": optimizer,
        "learning rate": args.learning_rate,
        "mini-batch size (all processes, all accumulation steps)": per_device * world * ga,
    }
    if sam.sam_adaptive:
        msam["ASAM eta"] = sam.sam_adaptive_eta

    hyper = _hyperparameters(trainer)
    _, training_results, _ = parse_log_history(trainer.state.log_history)

    label_names = kwargs.get("label_names")
    if label_names is None and config is not None and getattr(config, "id2label", None) and config.num_labels > 1:
        label_names = [config.id2label[i] for i in sorted(config.id2label)]
    return {
        "model_name": kwargs.get("model_name") or output_dir.resolve().name,
        "hub_model_id": kwargs.get("hub_model_id") or args.hub_model_id,
        "base_model": _hub_id(finetuned_from),
        "base_model_source": finetuned_from if finetuned_from and not _hub_id(finetuned_from) else None,
        "library_name": "peft" if is_peft else "transformers",
        "task": tasks,
        "dataset": kwargs.get("dataset") or (dataset_tags[0] if dataset_tags else "a custom data set"),
        "dataset_tags": dataset_tags,
        "dataset_args": dataset_args,
        "language": kwargs.get("language"),
        "license": kwargs.get("license") or base_model_license(finetuned_from),
        "tags": list(dict.fromkeys(list(getattr(model, "model_tags", None) or []) + list(kwargs.get("tags") or []))),
        "num_labels": getattr(config, "num_labels", None),
        "label_names": label_names,
        "train_examples": _length(trainer.train_dataset),
        "eval_examples": _length(trainer.eval_dataset),
        "msam": msam,
        "hyperparameters": hyper,
        "results": _final_results(trainer.state.log_history),
        "training_results": training_results or [],
        "versions": {"hf_msam": importlib.metadata.version("hf_msam"), "transformers": transformers.__version__,
                     "torch": torch.__version__, "huggingface_hub": huggingface_hub.__version__},
    }


def _hyperparameters(trainer) -> dict[str, Any]:
    """``transformers.modelcard.extract_hyperparameters_from_trainer`` (the stock card's table) as JSON-able
    values, with the optimizer's name instead of its enum's repr, and bf16 named too (it names fp16 only)."""
    from transformers.modelcard import extract_hyperparameters_from_trainer

    optim = trainer.args.optim
    hyper = {}
    for key, value in extract_hyperparameters_from_trainer(trainer).items():
        if not isinstance(value, (int, float, bool)):
            value = str(getattr(value, "value", value)).replace(str(optim), str(getattr(optim, "value", optim)))
        hyper[key] = value
    if trainer.args.bf16:
        hyper["mixed_precision_training"] = "bf16"
    return hyper


def _task_of(model) -> str:
    """The pipeline task of ``model``'s class (``transformers.modelcard.TASK_MAPPING``, the Auto-class tables);
    text classification when the class is in none of them."""
    from transformers.modelcard import TASK_MAPPING

    name = type(model).__name__
    for task, mapping in TASK_MAPPING.items():
        if any(name in ((value,) if isinstance(value, str) else value) for value in mapping.values()):
            return task
    return "text-classification"


def _length(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # None, or an iterable dataset
        return None


def _final_results(history: list[dict]) -> dict[str, float]:
    """The metrics of the last evaluation (the last log entry with ``eval_loss``), without the prefix, the
    timings and the curvature numbers (the card has its own section for those)."""
    evals = [h for h in history if "eval_loss" in h]
    if not evals:
        return {}
    results = {}
    for key, value in evals[-1].items():
        name = key.removeprefix("eval_")
        if key.startswith("eval_") and name not in _NOT_RESULTS and not name.startswith("sharpness_") and (
            isinstance(value, (int, float)) and not isinstance(value, bool)
        ):
            results[name] = float(value)
    return results


def _training_table(lines: list[dict[str, Any]]) -> str:
    """``transformers.modelcard.make_markdown_table`` of the per-evaluation rows (``parse_log_history``), every
    row with the columns of all rows (an evaluation may log more metrics than another)."""
    from transformers.modelcard import make_markdown_table

    columns = list(dict.fromkeys(key for line in lines for key in line))
    return make_markdown_table([{key: line.get(key, "") for key in columns} for line in lines])


def load_card_data(output_dir: str | os.PathLike) -> dict[str, Any]:
    """The card data saved by :func:`create_model_card` (empty dict if there is none)."""
    path = Path(output_dir) / CARD_DATA_NAME
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def render_model_card(output_dir: str | os.PathLike, data: dict[str, Any]) -> str:
    """The card's markdown (YAML metadata included) for ``data`` and the curvature report in ``output_dir``."""
    output_dir = Path(output_dir)
    task = data.get("task") or "text-classification"
    dataset_id = _hub_id((data.get("dataset_tags") or [None])[0])
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
    tags = list(dict.fromkeys(MODEL_TAGS + [task, "generated_from_trainer"] + list(data.get("tags") or [])))
    base = data.get("base_model")
    card_data = ModelCardData(
        base_model=base,
        datasets=[dataset_id] if dataset_id else None,
        language=data.get("language"),
        license=data.get("license"),
        library_name=data.get("library_name") or "transformers",
        pipeline_tag=task,
        tags=tags,
        model_name=model_name,
        eval_results=eval_results or None,
    )

    report_path = output_dir / REPORT_JSON
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    summary = summarise(report) if report else None
    label_names = data.get("label_names")
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        hub_model_id=data.get("hub_model_id"),
        base_model=base,
        base_model_url=f"https://huggingface.co/{base}" if base else None,
        base_model_note=f"a fine-tuned version of `{data['base_model_source']}`" if data.get("base_model_source") else None,
        is_peft=data.get("library_name") == "peft",
        base_model_path=data.get("base_model_source"),
        dataset_text=dataset_name + (f" (`{dataset_id}`" + (f", `{data['dataset_args']}`" if data.get("dataset_args") else "") + ")" if dataset_id else ""),
        task=task,
        pipeline_tag=task,
        num_labels=data.get("num_labels"),
        label_names=", ".join(label_names[:20]) + (" ..." if len(label_names) > 20 else "") if label_names else None,
        train_examples=data.get("train_examples", "unknown"),
        eval_examples=data.get("eval_examples", "unknown"),
        results=[(k.replace("_", " ").title(), format_value(v)) for k, v in results.items()],
        msam=[(k, format_value(v)) for k, v in (data.get("msam") or {}).items()],
        hyperparameters=[(k, format_value(v)) for k, v in (data.get("hyperparameters") or {}).items()],
        training_table=_training_table(data.get("training_results") or []),
        has_report=report is not None,
        report_json=REPORT_JSON,
        curvature=summary.rows if summary else [],
        verdict=summary.verdict if summary else None,
        sharpness_note=(report or {}).get("optimizer_note"),
        sharpness_plot=REPORT_PLOT if (output_dir / REPORT_PLOT).is_file() else None,
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
