"""Runs shared by the FSDP2 and DeepSpeed tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from processes import MSAM_DDP, launch_two_processes


@pytest.fixture(scope="session")
def ddp_dropout_weights(tmp_path_factory) -> Path:
    """DDP with ``sam_global`` on 2 processes, a padded 2-layer BERT with dropout 0.1 (the DDP script's ``dropout``
    suite): OUT/global.safetensors. One process cannot draw two processes' dropout masks, so the sharded backends
    are compared with this run, whose global SAM is tested against a plain loop (test_distributed.py)."""
    out = tmp_path_factory.mktemp("ddp_dropout")
    launch_two_processes(MSAM_DDP, "dropout", str(out), timeout=300)
    return out
