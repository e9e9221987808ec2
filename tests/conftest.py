"""Shared test set-up: no network, tiny models built from configs, tiny datasets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

# The benchmark scripts' constructions that tests share (bench_verdict's rank-one families, example_cards' copy).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def tiny_bert_config(num_labels: int = 2, **overrides):
    """A 1-layer BERT with no dropout, so that both passes of a micro-batch see the same function."""
    from transformers import BertConfig

    values = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
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


def tiny_vit(num_labels: int = 3, seed: int = 0, **overrides):
    """A 1-layer ViT on 8x8 one-channel images (4 patches + CLS), no dropout unless overridden.

    Its embeddings add ``cls_token`` and ``position_embeddings``, so with one example per pass their gradients
    come back from autograd sharing storage: the trap of in-place arithmetic on ascent gradients.
    """
    from transformers import ViTConfig, ViTForImageClassification

    values = dict(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    values.update(overrides)
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**values))


def image_dataset(n: int = 8, num_labels: int = 3, seed: int = 0):
    """``n`` random 1x8x8 images with random class labels."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 1, 8, 8, generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return datasets.Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": labels.tolist()})


@pytest.fixture
def tiny_bert_factory():
    return tiny_bert


@pytest.fixture
def token_dataset_factory():
    return token_dataset


def run_process_group(command: list[str], *, timeout: float, what: str, **popen) -> subprocess.CompletedProcess:
    """Run ``command`` in a session of its own and return its completed process; when it has not ended after
    ``timeout`` seconds (a hung collective, a process that never exits), kill the whole group, workers included,
    and fail the test with the end of its output."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **popen)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def launch_two_processes(script: str, *script_args: str, timeout: int = 300) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo); fails the test with the output."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        script, *script_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = run_process_group(command, timeout=timeout, what="the 2-process run (hung collective?)", env=env)
    stdout, stderr = launcher.stdout, launcher.stderr
    assert launcher.returncode == 0, f"exit {launcher.returncode}\n{stdout[-3000:]}\n{stderr[-6000:]}"
    assert "terminate called" not in stderr
