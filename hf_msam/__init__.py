"""hf_msam: micro-batch sharpness-aware minimization (mSAM) for the Hugging Face Trainer, and the
sharpness / Hessian-coherence report of what it trains.

The names below load on first use (PEP 562), so ``import hf_msam.update`` needs torch alone; the Trainer
side (``SAMTrainer``, the arguments, the report hook) imports transformers when first touched.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

__version__ = importlib.metadata.version("hf_msam")

_EXPORTS = {
    "MicroBatchSAM": "hf_msam.update",
    "Perturbation": "hf_msam.update",
    "RandomState": "hf_msam.update",
    "VectorizedMicroBatchSAM": "hf_msam.update",
    "sparse_embedding_gradients": "hf_msam.update",
    "split_micro_batches": "hf_msam.update",
    "trainable_embeddings": "hf_msam.update",
    "SAMArguments": "hf_msam.training",
    "SAMTrainer": "hf_msam.training",
    "SAMTrainingArguments": "hf_msam.training",
    "SharpnessArguments": "hf_msam.curvature",
    "SharpnessCallback": "hf_msam.curvature",
    "SharpnessReport": "hf_msam.curvature",
    "SharpnessReportMixin": "hf_msam.curvature",
    "SharpnessResult": "hf_msam.curvature",
    "sharpness_report": "hf_msam.curvature",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads the names
    from .curvature import (  # noqa: F401
        SharpnessArguments, SharpnessCallback, SharpnessReport, SharpnessReportMixin, SharpnessResult, sharpness_report,
    )
    from .training import SAMArguments, SAMTrainer, SAMTrainingArguments  # noqa: F401
    from .update import (  # noqa: F401
        MicroBatchSAM, Perturbation, RandomState, VectorizedMicroBatchSAM, sparse_embedding_gradients,
        split_micro_batches, trainable_embeddings,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_msam' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
