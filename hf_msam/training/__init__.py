"""mSAM in the Hugging Face Trainer: the arguments, ``SAMTrainer``, and what each distributed backend does."""

from .arguments import SAMArguments, SAMTrainingArguments
from .trainer import SAMTrainer

__all__ = ["SAMArguments", "SAMTrainer", "SAMTrainingArguments"]
