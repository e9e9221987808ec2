"""hf_msam: micro-batch sharpness-aware minimization (mSAM) for the Hugging Face Trainer, and the
sharpness / Hessian-coherence report of what it trains."""

from .arguments import SAMArguments, SAMTrainingArguments
from .curvature.arguments import SharpnessArguments
from .curvature.report import SharpnessReport, sharpness_report
from .msam import (
    MicroBatchSAM,
    Perturbation,
    RandomState,
    sparse_embedding_gradients,
    split_micro_batches,
    trainable_embeddings,
)
from .reporting import SharpnessCallback, SharpnessReportMixin, SharpnessResult
from .trainer import SAMTrainer
from .vectorized import VectorizedMicroBatchSAM

__version__ = "0.1.0"

__all__ = [
    "MicroBatchSAM",
    "Perturbation",
    "RandomState",
    "SAMArguments",
    "SAMTrainer",
    "SAMTrainingArguments",
    "SharpnessArguments",
    "SharpnessCallback",
    "SharpnessReportMixin",
    "SharpnessResult",
    "SharpnessReport",
    "VectorizedMicroBatchSAM",
    "sharpness_report",
    "sparse_embedding_gradients",
    "split_micro_batches",
    "trainable_embeddings",
]
