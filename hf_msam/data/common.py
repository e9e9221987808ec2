"""What the text and image loaders share: the error type, label-column choice, held-out splits, sample caps."""

from __future__ import annotations

import logging
import math

import datasets

logger = logging.getLogger("hf_msam.data")

LABEL_COLUMN_GUESSES = ("label", "labels", "target", "score")


class DataError(ValueError):
    """A problem with the user's data or data arguments; the message names the file/column and the fix."""


def pick_label_column(table: datasets.Dataset, label_column: str | None, where) -> str:
    """``label_column`` when ``table`` has it, else the first of ``label``/``labels``/``target``/``score``."""
    columns = list(table.column_names)
    if label_column is not None:
        if label_column not in columns:
            raise DataError(
                f"{where}: no label column {label_column!r}; its columns are {columns}. Pass --label_column with "
                "one of them."
            )
        return label_column
    for name in LABEL_COLUMN_GUESSES:
        if name in columns:
            return name
    raise DataError(f"{where}: no label column found among {columns}. Name it with --label_column COLUMN.")


def rename_label(table: datasets.Dataset, column: str) -> datasets.Dataset:
    """``table`` with its label column named ``label`` (a column already called ``label`` is dropped)."""
    if column == "label":
        return table
    if "label" in table.column_names:
        table = table.remove_columns("label")
    return table.rename_column(column, "label")


def hold_out(table: datasets.Dataset, validation_split: float, seed: int, where: str) -> tuple:
    """Split ``validation_split`` of ``table`` off for evaluation (fixed per ``seed``), stratified by a
    ``ClassLabel`` label column (``train_test_split(stratify_by_column="label")``) so every class keeps its share;
    a plain random split where stratifying is impossible (a class with one example, fewer held-out examples
    than classes) or the labels are regression targets."""
    if not 0 < validation_split < 1:
        raise DataError(f"validation_split must be between 0 and 1 to hold out evaluation data, got {validation_split}.")
    n = len(table)
    if n < 2 or int(n * validation_split) < 1 and n - math.ceil(n * validation_split) < 1:
        raise DataError(
            f"{where}: {n} example(s) is too few to hold out evaluation data; add examples or pass separate "
            "evaluation data (--validation_file / --validation_dir)."
        )
    if isinstance(table.features["label"], datasets.ClassLabel):
        try:
            parts = table.train_test_split(test_size=validation_split, seed=seed, stratify_by_column="label")
            return parts["train"], parts["test"]
        except ValueError as exc:  # scikit-learn's reason: too few examples of a class, or too small a split
            logger.info("%s: held-out split not stratified (%s)", where, exc)
    parts = table.train_test_split(test_size=validation_split, seed=seed)
    return parts["train"], parts["test"]


def first(table: datasets.Dataset | None, count: int | None, seed: int | None = None):
    """The first ``count`` rows of ``table`` (after a shuffle with ``seed`` when given); all when None."""
    if table is None or count is None:
        return table
    if seed is not None:
        table = table.shuffle(seed=seed)
    return table.select(range(min(count, len(table))))
