"""Test session set-up: no network, the benchmarks on ``sys.path``, and the ``device`` fixture.

Builders (tiny models, datasets, Trainer arguments) are in ``builders.py``, the independent references in
``references.py``, subprocess helpers in ``processes.py``, the fake Hub in ``fake_hub.py``: tests import them by
module name (``tests/`` is on ``sys.path`` because this conftest lives there).
"""

from __future__ import annotations

import os
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


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    """Each test that takes ``device`` runs on the CPU, and on the GPU when there is one (skipped otherwise)."""
    return request.param
