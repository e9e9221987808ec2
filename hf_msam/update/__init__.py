"""The mSAM update, torch only: the SAM/ASAM perturbation rule, the loop engine (one micro-batch at a time)
and the vmap engine (every micro-batch in one batched forward/backward). See ``docs/design.md``."""

from .loop import (
    MicroBatchSAM,
    Perturbation,
    RandomState,
    sparse_embedding_gradients,
    split_micro_batches,
    trainable_embeddings,
)
from .vmap import VectorizedMicroBatchSAM

__all__ = [
    "MicroBatchSAM",
    "Perturbation",
    "RandomState",
    "VectorizedMicroBatchSAM",
    "sparse_embedding_gradients",
    "split_micro_batches",
    "trainable_embeddings",
]
