"""The probe set of a curvature report: a fixed, seeded draw of training examples, made model-ready (the
Trainer's ``remove_unused_columns`` and label renaming) and collated in chunks.

One draw serves every measure: the Hessian measures take its first ``num_examples``, coherence its first
``coherence_examples`` (which may be more); ``SharpnessReport.examples_used`` says which. See ``docs/curvature.md``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .operators import Batch

LABEL_KEYS = ("label", "label_ids")
Collator = Callable[[list[dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class ProbeSet:
    """The probe examples of one report.

    Attributes:
        examples: the first ``num_examples`` of ``pool``, which the Hessian measures take.
        pool: the seeded draw from the dataset; coherence takes its first ``coherence_examples``.
        indices: the dataset rows of ``pool``, in order.
        batches: ``examples`` collated in chunks of ``batch_size``.
        collate: the data collator.
        batch_size: examples per chunk.
        dataset_size: rows in the dataset the draw came from.
    """

    examples: list[dict[str, Any]]
    pool: list[dict[str, Any]]
    indices: list[int]
    batches: list[Batch]
    collate: Collator
    batch_size: int
    dataset_size: int

    def first(self, count: int) -> ProbeSet:
        """The same draw cut to its first ``count`` examples for the Hessian measures (the budget's cut)."""
        if count >= len(self.examples):
            return self
        examples = self.examples[:count]
        return ProbeSet(examples, self.pool, self.indices, collate_chunks(self.collate, examples, self.batch_size),
                        self.collate, self.batch_size, self.dataset_size)


def draw_probe_set(model: torch.nn.Module, dataset: Any, *, num_examples: int, coherence_examples: int | None,
                   seed: int, batch_size: int, data_collator: Collator | None, tokenizer: Any) -> ProbeSet:
    """One seeded draw of ``max(num_examples, coherence_examples)`` examples, with the collator: ``data_collator``,
    else ``DataCollatorWithPadding(tokenizer)`` when ``tokenizer`` is given, else right padding with
    ``config.pad_token_id`` then ``default_data_collator``."""
    pool, indices = _probe_examples(dataset, max(num_examples, coherence_examples or 0), seed, model)
    examples = pool[:num_examples]
    if data_collator is None:
        if tokenizer is not None:
            from transformers import DataCollatorWithPadding

            data_collator = DataCollatorWithPadding(tokenizer)
        else:
            pad = getattr(getattr(model, "config", None), "pad_token_id", None)
            data_collator = _pad_collator(0 if pad is None else int(pad))
    batches = collate_chunks(data_collator, examples, batch_size)
    return ProbeSet(examples, pool, indices, batches, data_collator, batch_size, len(dataset))


def collate_chunks(collate: Collator, items: Sequence[dict[str, Any]], size: int) -> list[Batch]:
    """``items`` collated in chunks of ``size``."""
    return [collate(chunk) for chunk in chunks(items, size)]


def _forward_arguments(model: torch.nn.Module) -> set[str] | None:
    """Named parameters of the model's forward (None when it takes only **kwargs)."""
    forward = getattr(model, "_original_forward", model.forward)
    params = inspect.signature(forward).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named or None


def _clean_example(example: Mapping[str, Any], accepted: set[str] | None) -> dict[str, Any]:
    """Model-ready fields: ``label``/``label_ids`` renamed to ``labels``; strings, None and fields the
    forward does not take dropped (the Trainer's ``remove_unused_columns``)."""
    out: dict[str, Any] = {}
    for key, value in example.items():
        key = "labels" if key in LABEL_KEYS else key
        if value is None or isinstance(value, str):
            continue
        if accepted is not None and key not in accepted:
            continue
        out[key] = value
    return out


def _probe_examples(
    dataset: Any, num_examples: int, seed: int, model: torch.nn.Module
) -> tuple[list[dict[str, Any]], list[int]]:
    total = len(dataset)
    if total == 0:
        raise ValueError("dataset: the probe set is empty; pass a dataset with at least one example")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_examples].tolist()
    accepted = _forward_arguments(model)
    examples = [_clean_example(dataset[i], accepted) for i in order]
    if not all("labels" in e for e in examples):
        raise ValueError(
            "dataset: examples have no `labels` (or `label`) field; the curvature is that of the training "
            "loss, which needs the targets: add a labels column"
        )
    return examples, order


def _as_collatable(value: Any) -> Any:
    """A field value in a form ``default_data_collator`` stacks: 0-d tensors, 0-d arrays and NumPy scalars
    become Python scalars, arrays become tensors; lists, Python scalars and tensors stay as they are."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) and np.ndim(value) == 0:
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value


def _pad_collator(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Right-pad ragged sequence fields (``input_ids`` with ``pad_token_id``, the rest with 0), add an
    attention mask if padding was needed and none was given, then ``default_data_collator``.

    Fields may be Python scalars or lists, tensors of any dimension, NumPy scalars or arrays (the rows of
    an HF ``Dataset`` in the python, torch or numpy format)."""
    from transformers import default_data_collator

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        features = [{k: _as_collatable(v) for k, v in f.items()} for f in features]
        ragged = [
            k for k, v in features[0].items()
            if isinstance(v, (list, torch.Tensor)) and len({len(f[k]) for f in features}) > 1
        ]
        if ragged:
            if "input_ids" in ragged and "attention_mask" not in features[0]:
                for f in features:
                    f["attention_mask"] = [1] * len(f["input_ids"])
                ragged.append("attention_mask")
            for key in ragged:
                width = max(len(f[key]) for f in features)
                value = pad_token_id if key == "input_ids" else 0
                for f in features:
                    f[key] = torch.cat([torch.as_tensor(f[key]), torch.full((width - len(f[key]),), value)])
        return default_data_collator(features)

    return collate


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
