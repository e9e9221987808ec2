"""Data for the recipes and for ``hf-msam sharpness``: text and image classification sets, validated up front.

* :mod:`hf_msam.data.text` -- :func:`load_text_dataset` (a GLUE task, a local CSV / TSV / JSON-lines file, a
  folder of ``.txt`` files per class, a Hub data set, or the offline default BBC News) and :func:`tokenize`;
* :mod:`hf_msam.data.images` -- :func:`load_image_dataset` (an image folder through ``datasets``'
  ``imagefolder`` builder, a CSV of pixels, a Hub data set, or the offline default Fashion-MNIST / MNIST-5k) and
  :func:`image_transform` (with the train-time augmentation of ``run_image_classification.py``).

Both loaders return a small record (:class:`TextData`, :class:`ImageData`) whose splits are ``datasets.Dataset``
objects with the label column ``"label"`` (a ``ClassLabel``, or float targets for regression). Every problem a
user can fix raises :class:`DataError` naming the file or column and the fix, before any training starts.
"""

from .common import DataError
from .images import ImageData, default_image_source, image_transform, load_image_dataset
from .text import GLUE_TASKS, TextData, default_text_source, load_text_dataset, tokenize

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
