"""The final report of a 2-process DDP run (gloo on CPU) equals the single-process report of
the same training (one process, the doubled per-device batch), and every rank logs the same numbers."""

from __future__ import annotations

import json

import pytest
from builders import SequentialSAMTrainer, sam_args, tiny_bert, token_dataset
from processes import REPORT_DDP, launch_two_processes
from references import max_abs_diff
from safetensors.torch import load_file
from test_report_trainer import SHARPNESS_ARGS, _assert_reports_close, _without_timings

@pytest.mark.slow
def test_two_process_report_equals_single_process(tmp_path):
    launch_two_processes(REPORT_DDP, str(tmp_path / "ddp"))
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
