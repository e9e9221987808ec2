"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): one mSAM step with the final
curvature report; each rank writes its final log entry to OUT/rank<r>.json, rank 0 the weights to
OUT/weights.safetensors (the report itself goes to OUT/run/sharpness.json)."""

import json
import os
import sys

from hf_msam.recipes.common import shutdown_distributed
from safetensors.torch import save_file

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [TESTS, os.path.join(TESTS, "curvature")]  # builders.py and test_report_trainer.py
from builders import SequentialSAMTrainer, sam_args, tiny_bert, token_dataset  # noqa: E402
from test_report_trainer import SHARPNESS_ARGS  # noqa: E402


def main(out_dir: str) -> None:
    args = sam_args(os.path.join(out_dir, "run"), per_device_train_batch_size=8, sam_rho=0.1, sam_micro_batch_size=4,
                    sharpness_report=True, **SHARPNESS_ARGS)
    trainer = SequentialSAMTrainer(model=tiny_bert(seed=13), args=args, train_dataset=token_dataset(16, seed=13))
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.state
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(trainer.state.log_history[-1], handle)
    if rank == 0:
        save_file({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()},
                  os.path.join(out_dir, "weights.safetensors"))
    del trainer  # the DDP wrapper must go while the process group is still registered
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
