"""Subprocesses for the tests: a process group killed as a whole when it hangs, and 2-process ``accelerate`` runs
of the scripts under ``tests/*/scripts`` (which put ``tests/`` on ``sys.path`` themselves to find these helpers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FSDP2_CONFIG = str(REPO / "recipes" / "accelerate" / "fsdp2.yaml")
GLUE_FSDP = str(TESTS / "recipes" / "scripts" / "glue_fsdp.py")
"""The glue recipe with FSDP allowed on CPU (``tests/fsdp_on_cpu.py``): ``GLUE_FSDP [RECIPE FLAGS]``."""
MSAM_DDP = str(TESTS / "training" / "scripts" / "msam_ddp.py")
"""Two mSAM steps per setting of a suite on 2 gloo processes: ``MSAM_DDP SUITE OUT`` (suites ``bert``, ``lm``, ``vmap``)."""
MSAM_FSDP = str(TESTS / "training" / "scripts" / "msam_fsdp.py")
"""Two mSAM steps per setting under FSDP2 on 2 gloo processes: ``MSAM_FSDP SUITE OUT`` (suites ``bert``, ``vit``, ``lm``)."""
MSAM_DEEPSPEED = str(TESTS / "training" / "scripts" / "msam_deepspeed.py")
"""Two mSAM steps per setting under DeepSpeed ZeRO-1/2 on 2 gloo processes: ``MSAM_DEEPSPEED OUT`` (needs deepspeed)."""
REPORT_DDP = str(TESTS / "curvature" / "scripts" / "report_ddp.py")
"""One mSAM step with the final curvature report on 2 gloo processes: ``REPORT_DDP OUT``."""


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


def launch_fsdp2(script: str, *script_args: str, timeout: int = 240, env: dict[str, str] | None = None,
                 launcher_args: tuple[str, ...] = ()) -> None:
    """``accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 --mixed_precision no`` on
    CPU (gloo), with ``env`` added to this process's environment; fails the test with the output.

    With no GPU visible the launcher still starts 2 processes (torchrun) with the config's FSDP settings in their
    environment (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION=2``, ...); no ``--cpu``, which would start one process
    without them. In those processes accelerate keeps ``MULTI_CPU`` and ignores FSDP unless ``script`` lifts the
    gate (``fsdp_on_cpu.allow_fsdp_on_cpu``). ``--mixed_precision no`` overrides the config's bf16, as
    ``launcher_args`` (``--fsdp_state_dict_type SHARDED_STATE_DICT``) override its other entries."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2_CONFIG, "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", "0", *launcher_args, script, *script_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO), **(env or {})}
    launcher = run_process_group(command, timeout=timeout, what="the 2-process FSDP2 run (hung collective?)",
                                 env=env)
    stdout, stderr = launcher.stdout, launcher.stderr
    assert launcher.returncode == 0, f"exit {launcher.returncode}\n{stdout[-3000:]}\n{stderr[-6000:]}"
    assert "terminate called" not in stderr
