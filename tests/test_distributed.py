"""Issue 2, item 3e: two gloo processes give the weights of one process with the doubled batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import tiny_bert, token_dataset
from safetensors.torch import load_file
from trainer_utils import SequentialSAMTrainer, max_abs_diff, sam_args

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "msam_ddp.py")


def launch_two_processes(script: str, *script_args: str, timeout: int = 300) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo); fails the test with the output."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        script, *script_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert "terminate called" not in result.stderr


@pytest.fixture(scope="module")
def ddp_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch_two_processes(SCRIPT, str(out))
    return out


def _single_process(tmp_path, **overrides):
    model = tiny_bert(seed=12)
    args = sam_args(tmp_path, per_device_train_batch_size=16, max_steps=2, sam_rho=0.2, **overrides)
    SequentialSAMTrainer(model=model, args=args, train_dataset=token_dataset(32, seed=12)).train()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting, single_process",
    [
        ("micro4", dict(sam_micro_batch_size=4)),  # the micro-batch size defines the algorithm, not the hardware
        ("per_device", dict(sam_micro_batch_size=8)),  # each process's batch is one micro-batch: no all-reduce
        ("global", dict(sam_micro_batch_size=None)),  # sam_global: one perturbation for the 16 examples = SAM
    ],
)
def test_two_processes_equal_one_process_with_doubled_batch(ddp_weights, tmp_path, setting, single_process):
    distributed = load_file(str(ddp_weights / f"{setting}.safetensors"))
    expected = _single_process(tmp_path, **single_process)
    assert max_abs_diff(distributed, expected) < 1e-6
    assert (ddp_weights / f"{setting}.skipped").read_text() == "0"


@pytest.mark.slow
def test_ascent_gradient_is_not_all_reduced_without_sam_global(ddp_weights):
    per_device = load_file(str(ddp_weights / "per_device.safetensors"))
    global_sam = load_file(str(ddp_weights / "global.safetensors"))
    assert max_abs_diff(per_device, global_sam) > 1e-4
