"""Helpers for the SAMTrainer tests: known batch order, tiny models, weight snapshots."""

from __future__ import annotations

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer

from hf_msam import SAMTrainer, SAMTrainingArguments


class SequentialSAMTrainer(SAMTrainer):
    """Batches in dataset order, so a test knows which examples form each step (docs/design.md section 7)."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def sam_args(output_dir, **overrides) -> SAMTrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return SAMTrainingArguments(**values)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def tensor_batch(dataset, start: int, stop: int) -> dict[str, torch.Tensor]:
    rows = dataset[start:stop]
    return {k: torch.tensor(v) for k, v in rows.items()}


def tiny_llama(seed: int = 0, **overrides):
    """A 1-layer causal LM whose loss is normalised by ``num_items_in_batch`` when it is given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation="eager",
        **overrides,
    )
    return LlamaForCausalLM(config)


def lm_dataset(n: int = 32, length: int = 10, seed: int = 0):
    """Token sequences whose labels have random -100 holes, so micro-batches hold unequal token counts."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=g)
    labels = ids.clone()
    labels[torch.rand(n, length, generator=g) < 0.4] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def lm_dataset_without_labels_in(start: int | None = None, stop: int | None = None, n: int = 32, seed: int = 19):
    """``lm_dataset`` with every label of the examples ``start:stop`` set to -100 (a chunk with nothing supervised)."""
    data = lm_dataset(n, seed=seed)
    if start is None:
        return data
    return data.map(lambda row, index: {"labels": [-100] * len(row["labels"]) if start <= index < stop else row["labels"]},
                    with_indices=True)


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the shifted supervised tokens (a user's loss, to be divided by a count)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def token_loss_func(outputs, labels, num_items_in_batch):
    """A ``compute_loss_func`` normalised by the count the Trainer passes."""
    return summed_token_loss(outputs.logits, labels) / num_items_in_batch
