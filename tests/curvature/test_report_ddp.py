"""The final report of a 2-process DDP run (gloo on CPU) equals the single-process report of
the same training (one process, the doubled per-device batch), and every rank logs the same numbers."""

from __future__ import annotations

import json
import os

import pytest
from conftest import tiny_bert, token_dataset
from safetensors.torch import load_file
from conftest import launch_two_processes
from test_report_trainer import SHARPNESS_ARGS, _assert_reports_close, _without_timings
from trainer_utils import SequentialSAMTrainer, max_abs_diff, sam_args

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "report_ddp.py")


@pytest.mark.slow
def test_two_process_report_equals_single_process(tmp_path):
    launch_two_processes(SCRIPT, str(tmp_path / "ddp"))
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    with open(tmp_path / "ddp" / "run" / "sharpness.json") as handle:
        distributed = _without_timings(json.load(handle))

    single_args = sam_args(tmp_path / "single", per_device_train_batch_size=16, sam_rho=0.1, sam_micro_batch_size=4,
                           sharpness_report=True, **SHARPNESS_ARGS)
    trainer = SequentialSAMTrainer(model=tiny_bert(seed=13), args=single_args, train_dataset=token_dataset(16, seed=13))
    trainer.train()
    weights = load_file(str(tmp_path / "ddp" / "weights.safetensors"))
    assert max_abs_diff(weights, dict(trainer.model.state_dict())) < 1e-6  # same training, so same model

    single = _without_timings(trainer.sharpness_result.report.to_dict())
    assert distributed["train_batch_size"] == single["train_batch_size"] == 16
    _assert_reports_close(distributed, single, rel=1e-4)  # weights agree to 1e-6, not bit for bit
    assert ranks[0] == ranks[1]  # rank 1 logs the numbers rank 0 computed, timings included
    assert ranks[0]["eval_sharpness_lambda_max"] == distributed["lambda_max"]
