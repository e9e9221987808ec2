"""What the tests train and measure: tiny models built from configs, tiny datasets (in memory and on disk), and
the Trainer set-up with a known batch order.

Every transformer here shares :data:`TINY_LAYERS` (1 layer, hidden 16, 2 heads, eager attention); a test that needs
another shape passes overrides to the builder instead of writing a config of its own.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_msam import SAMTrainer, SAMTrainingArguments

ADAMW = dict(optim="adamw_torch", learning_rate=1e-2, adam_epsilon=1e-3)
"""AdamW of the multi-process equalities (weights to 1e-6 after two steps). Epsilon 1e-3: with the default 1e-8 the
update ``lr g / sqrt(v)`` of a parameter whose gradients are ~1e-7 turns float32 differences of summation order (one
process's batch against the processes' reduction) into ~1e-5."""

TINY_LAYERS = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   attn_implementation="eager")
"""The layer shape of every tiny transformer."""
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
"""BERT and ViT without dropout, so that both passes of a micro-batch see the same function."""
TWO_LAYERS = dict(num_hidden_layers=2)
"""Two transformer layers (an override of :data:`TINY_LAYERS`): under FSDP each layer is a unit sharded on its own."""


# --- tiny transformers from configs ------------------------------------------------------------------------
def tiny_bert_config(num_labels: int = 2, **overrides):
    """A 1-layer BERT config (vocabulary 64, 32 positions) with no dropout."""
    from transformers import BertConfig

    values = dict(vocab_size=64, max_position_embeddings=32, num_labels=num_labels, **TINY_LAYERS, **NO_DROPOUT)
    values.update(overrides)
    return BertConfig(**values)


def tiny_bert(num_labels: int = 2, seed: int = 0, **overrides):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels, **overrides))


def tiny_bert_lora(seed: int = 0):
    """:func:`tiny_bert` under PEFT LoRA (rank 4 on query and value, adapters initialised non-zero)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    model = tiny_bert(seed=seed)
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def tiny_vit_config(num_labels: int = 3, **overrides):
    """A 1-layer ViT config on 8x8 one-channel images (4 patches + CLS) with no dropout."""
    from transformers import ViTConfig

    values = dict(image_size=8, patch_size=4, num_channels=1, num_labels=num_labels, **TINY_LAYERS, **NO_DROPOUT)
    values.update(overrides)
    return ViTConfig(**values)


def tiny_vit(num_labels: int = 3, seed: int = 0, **overrides):
    """A :func:`tiny_vit_config` image classifier.

    Its embeddings add ``cls_token`` and ``position_embeddings``, so with one example per pass their gradients
    come back from autograd sharing storage: the trap of in-place arithmetic on ascent gradients.
    """
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config(num_labels, **overrides))


def tiny_llama_config(**overrides):
    """A 1-layer Llama config (vocabulary 64, 32 positions, 2 key-value heads)."""
    from transformers import LlamaConfig

    values = dict(vocab_size=64, max_position_embeddings=32, num_key_value_heads=2, **TINY_LAYERS)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **overrides):
    """A 1-layer causal LM whose loss is normalised by ``num_items_in_batch`` when it is given."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides))


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 language model (no dropout), whose ``loss_type`` is unset."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, attn_implementation="eager")
    return GPT2LMHeadModel(config)


# --- small torch models ------------------------------------------------------------------------------------
class TinyClassifier(torch.nn.Module):
    """A tanh MLP head with the ``transformers`` interface: ``forward(features, labels)`` -> loss, logits."""

    def __init__(self, features: int = 4, hidden: int = 5, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.classes = classes
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes)
        )

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.net(features)
        loss = None
        if labels is not None:
            if self.classes == 1:
                loss = torch.nn.functional.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def classifier_batches(n: int = 24, features: int = 4, classes: int = 3, chunk: int = 10, seed: int = 1):
    """Dict batches of ``chunk`` examples for :class:`TinyClassifier`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randn(n, generator=g) if classes == 1 else torch.randint(0, classes, (n,), generator=g)
    return [{"features": x[i : i + chunk], "labels": y[i : i + chunk]} for i in range(0, n, chunk)]


# --- tiny datasets -----------------------------------------------------------------------------------------
def token_dataset(n: int = 64, length: int = 8, num_labels: int = 2, seed: int = 0, vocab: int = 64):
    """``n`` random token sequences with random class labels (or float targets when num_labels == 1)."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    if num_labels == 1:
        labels = torch.randn(n, generator=g).tolist()
    else:
        labels = torch.randint(0, num_labels, (n,), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels})


def image_dataset(n: int = 8, num_labels: int = 3, seed: int = 0):
    """``n`` random 1x8x8 images with random class labels."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 1, 8, 8, generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return datasets.Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": labels.tolist()})


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


def first_step_supervised_tokens(data, per_device: int = 8, processes: int = 2) -> list[int]:
    """The supervised (shifted, not -100) labels of each process's chunk in the first step of sequential batches."""
    labels = torch.tensor(data["labels"])[:, 1:]
    return [int(labels[r * per_device : (r + 1) * per_device].ne(-100).sum()) for r in range(processes)]


def padded_lm_dataset(n: int, seed: int):
    """Sequences of lengths 3 to 8, right-padded to 8 (pad labels -100), with random -100 holes in the labels."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g)
    ids = torch.randint(1, 64, (n, 8), generator=g)
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.rand(n, 8, generator=g) < 0.25] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def tensor_batch(dataset, start: int, stop: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Rows ``start:stop`` of ``dataset`` as a dict of tensors on ``device``."""
    rows = dataset[start:stop]
    return {k: torch.tensor(v, device=device) for k, v in rows.items()}


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the shifted supervised tokens (a user's loss, to be divided by a count)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def token_loss_func(outputs, labels, num_items_in_batch):
    """A ``compute_loss_func`` normalised by the count the Trainer passes."""
    return summed_token_loss(outputs.logits, labels) / num_items_in_batch


# --- saved models and data files -----------------------------------------------------------------------------
WORDS = "good great fine nice bad awful poor sad the a movie film plot acting was is very not".split()
POSITIVE = {"good", "great", "fine", "nice"}


def write_vocab(path: Path) -> Path:
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


def save_tiny_bert(directory: Path, num_labels: int = 2) -> Path:
    """:func:`tiny_bert` (default attention) and its tokenizer (``BertTokenizerFast(vocab=PATH)``; ``vocab_file=``
    would be ignored)."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(directory / "vocab_src.txt")
    tokenizer = BertTokenizerFast(vocab=str(vocab), model_max_length=32)
    assert tokenizer("good movie")["input_ids"][1] != tokenizer.unk_token_id
    tiny_bert(num_labels, seed=0, vocab_size=len(tokenizer), attn_implementation=None).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_vit(directory: Path, image_size: int = 8) -> Path:
    """:func:`tiny_vit` on RGB images (default attention, 2 classes) and its image processor."""
    from transformers import ViTImageProcessor

    tiny_vit(2, seed=0, image_size=image_size, num_channels=3, attn_implementation=None).save_pretrained(directory)
    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(directory)
    return directory


def sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(5)]
        rows.append((" ".join(words), "pos" if POSITIVE & set(words) else "neg"))
    return rows


def write_text_csv(path: Path, n: int = 32, seed: int = 0, delimiter: str = ",", columns=("text", "label")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows(sentences(n, seed))
    return path


def write_image_folder(root: Path, per_class: int = 12, size: int = 8, seed: int = 0) -> Path:
    """Two classes: dark and bright noise images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, (low, high) in {"dark": (0, 100), "bright": (155, 255)}.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(low, high, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


REVIEW_WORDS = "good bad great awful fine poor nice sad happy dull film plot cast story acting".split()
"""The vocabulary of :func:`save_text_classifier` and :func:`write_review_csv` (the sharpness report's inputs)."""


def save_text_classifier(folder: Path, label2id: dict[str, int] | None = None, num_labels: int = 2):
    """:func:`tiny_bert_config`'s classifier (seed 3) and a tokenizer of :data:`REVIEW_WORDS`, saved in ``folder``;
    returns both."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *REVIEW_WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    overrides = {}
    if label2id is not None:
        overrides = dict(label2id=label2id, id2label={v: k for k, v in label2id.items()})
    torch.manual_seed(3)
    model = BertForSequenceClassification(tiny_bert_config(num_labels, **overrides))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def write_review_csv(path: Path, labels, rows: int = 10) -> None:
    """A CSV of ``rows`` random reviews (``review``, ``sentiment``), the labels taken from ``labels`` in turn."""
    rng = random.Random(0)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for i in range(rows):
            writer.writerow([" ".join(rng.choice(REVIEW_WORDS) for _ in range(rng.randint(2, 6))), labels[i % len(labels)]])


# --- the Trainer with a known batch order --------------------------------------------------------------------
class SequentialSAMTrainer(SAMTrainer):
    """Batches in dataset order, so a test knows which examples form each step (docs/design.md section 7)."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class SequentialTrainer(Trainer):
    """The stock Trainer with batches in dataset order."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def sam_args(output_dir, device: str = "cpu", **overrides) -> SAMTrainingArguments:
    """One plain-SGD step (learning rate 0.5, batch 8) on ``device`` ("cpu" or "cuda"), without logging to
    anything but the state, checkpoints, clipping or weight decay."""
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
        use_cpu=device == "cpu",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return SAMTrainingArguments(**values)


def image_examples(n: int, num_labels: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` one-example batches of random 8 x 8 images with labels cycling through the classes."""
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(1, 1, 8, 8, generator=g), "labels": torch.tensor([i % num_labels])}
            for i in range(n)]
