"""The glue recipe under ``accelerate launch --config_file recipes/accelerate/fsdp2.yaml`` on 2 CPU processes (gloo)
against the same recipe in one process: same weights, and an output folder the one-process tools can use."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builders import save_tiny_bert, write_text_csv
from processes import GLUE_FSDP, REPO, launch_fsdp2, run_process_group

STEPS = 4  # 32 examples / global batch 16 = 2 steps per epoch, 2 epochs
# AdamW's epsilon at 1e-3: with the default 1e-8 the update lr g / sqrt(v) of a parameter whose gradients are tiny
# turns float32 differences of summation order (one process's batch against a reduce-scatter) into large ones
RECIPE = ["--learning_rate", "1e-2", "--adam_epsilon", "1e-3", "--sam_rho", "1.0", "--num_train_epochs", "2",
          "--seed", "0", "--logging_steps", "1", "--save_strategy", "no", "--sharpness_report", "false"]


@pytest.fixture(scope="module")
def text_assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny saved BERT (no dropout: each process would draw its own masks) and 32 + 16 CSV examples."""
    root = tmp_path_factory.mktemp("text")
    model = save_tiny_bert(root / "bert")
    config = json.loads((model / "config.json").read_text())
    assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == 0.0
    assert config.get("classifier_dropout") is None  # falls back to hidden_dropout_prob
    return {"model": model, "train": write_text_csv(root / "train.csv", n=32, seed=0),
            "dev": write_text_csv(root / "dev.csv", n=16, seed=1)}


def _args(assets: dict[str, Path], out: Path, batch: int) -> list[str]:
    return ["--model_name_or_path", str(assets["model"]), "--train_file", str(assets["train"]),
            "--validation_file", str(assets["dev"]), "--output_dir", str(out),
            "--per_device_train_batch_size", str(batch), *RECIPE]


@pytest.fixture(scope="module")
def one_process(text_assets, tmp_path_factory) -> tuple[Path, Path]:
    """The recipe in one process on batches of 16 (SAM on each whole batch, one micro-batch): its output folder and
    the folder of the batches it trained on."""
    root = tmp_path_factory.mktemp("one_process")
    out, batches = root / "run", root / "batches"
    batches.mkdir()
    _one_process(text_assets, out, batches)
    return out, batches


def _one_process(assets: dict[str, Path], out: Path, batches: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO), "GLUE_FSDP_BATCHES": str(batches)}
    run = run_process_group([sys.executable, GLUE_FSDP, *_args(assets, out, 16)], timeout=180,
                            what="the one-process recipe", env=env)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_glue_under_fsdp2_on_two_processes_trains_the_one_process_weights(text_assets, one_process, tmp_path):
    """``accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 --mixed_precision no``
    with batches of 8 per process trains the weights of one process on batches of 16, to 1e-6 after 4 AdamW steps.

    Without a GPU the launcher still starts 2 processes with the config's FSDP environment (no ``--cpu``: it would
    start one process without it); the script lifts accelerate's accelerator-only gate in each of them
    (``tests/fsdp_on_cpu.py``), so the Trainer shards the model with ``fully_shard`` on gloo. SAM with one micro-batch
    per process under FSDP perturbs the union of the processes' batches by its joint gradient (global norm): SAM on
    the global batch. That batch is checked to be the one-process batch: the Trainer's sampler with the same seed
    draws the same order, and process r gets the r-th of each pair of consecutive batches of 8. The sharpness
    report is off in both runs (refused under FSDP); the output folder then takes ``hf-msam sharpness``.
    """
    (one, one_batches), sharded = one_process, tmp_path / "fsdp"
    sharded_batches = tmp_path / "fsdp_batches"
    sharded_batches.mkdir()
    launch_fsdp2(GLUE_FSDP, *_args(text_assets, sharded, 8), env={"GLUE_FSDP_BATCHES": str(sharded_batches)})

    whole = json.loads((one_batches / "batches-0.json").read_text())
    halves = [json.loads((sharded_batches / f"batches-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(whole) == len(halves[0]) == len(halves[1]) == STEPS
    for step, batch in enumerate(whole):
        assert len(batch) == 16 and batch == halves[0][step] + halves[1][step], step

    expected, got = load_file(one / "model.safetensors"), load_file(sharded / "model.safetensors")
    initial = load_file(text_assets["model"] / "model.safetensors")
    assert sorted(got) == sorted(expected)
    assert max((expected[k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # the weights moved
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)

    assert sorted(p.name for p in sharded.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(sharded.glob("pytorch_model*.bin"))
    card = (sharded / "README.md").read_text()
    assert "## mSAM settings" in card and "| rho | 1 |" in card and "| num_devices | 2 |" in card
    # one perturbation per step, of the global batch: what the one-process run of batch 16 did
    assert "| m (micro-batches per optimizer step) | 1 |" in card
    assert "| micro-batch size | 16 (the union of the 2 processes' micro-batches of 8) |" in card
    assert json.loads((sharded / "trainer_state.json").read_text())["global_step"] == STEPS

    from hf_msam import cli

    report = tmp_path / "report" / "sharpness.json"
    argv = ["sharpness", str(sharded), "--data", str(text_assets["train"]), "--output", str(report), "--quiet",
            "--learning_rate", "1e-2", "--train_batch_size", "16", "--num_examples", "16",
            "--lanczos_iterations", "4", "--trace_probes", "2", "--coherence_examples", "16", "--probe_steps", "2"]
    assert cli.main(argv) == 0
    assert json.loads(report.read_text())


def test_fsdp2_wraps_the_layers_but_not_the_module_holding_the_input_embeddings():
    """BERT's ``_no_split_modules`` name ``BertEmbeddings``, which holds the input embeddings that accelerate shards
    as a unit of their own: with no layer classes given only ``BertLayer`` is wrapped; classes given stay."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from builders import tiny_bert
    from hf_msam.training.distributed import wrap_layers_around_input_embeddings

    model = tiny_bert()
    assert {"BertLayer", "BertEmbeddings"} <= set(model._no_split_modules)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    wrap_layers_around_input_embeddings(plugin, model)
    assert plugin.transformer_cls_names_to_wrap == ["BertLayer"]
    given = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                           transformer_cls_names_to_wrap=["BertEmbeddings", "BertLayer"])
    wrap_layers_around_input_embeddings(given, model)
    assert given.transformer_cls_names_to_wrap == ["BertEmbeddings", "BertLayer"]


@pytest.mark.slow
def test_glue_under_fsdp2_with_sharded_checkpoints_still_saves_the_full_model(text_assets, one_process, tmp_path):
    """With ``--fsdp_state_dict_type SHARDED_STATE_DICT`` the checkpoints are sharded, and ``Trainer.save_model``
    alone would write no weights at the end; the recipe saves the full model (safetensors) all the same, the
    one-process weights to 1e-6."""
    out = tmp_path / "fsdp_sharded"
    args = [*_args(text_assets, out, 8), "--save_strategy", "steps", "--save_steps", "2"]
    launch_fsdp2(GLUE_FSDP, *args, launcher_args=("--fsdp_state_dict_type", "SHARDED_STATE_DICT"))
    checkpoint = out / f"checkpoint-{STEPS}"
    assert any("pytorch_model_fsdp" in p.name for p in checkpoint.iterdir()), sorted(checkpoint.iterdir())
    assert not list(checkpoint.glob("*.safetensors"))  # the checkpoint holds the shards, not a full model
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    expected, got = load_file(one_process[0] / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
