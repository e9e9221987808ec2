"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): a few mSAM steps per setting,
weights written by rank 0 to OUT/<setting>.safetensors for comparison with one process and a doubled batch."""

import os
import sys

import torch
from hf_msam.recipes.common import shutdown_distributed
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import tiny_bert, token_dataset  # noqa: E402
from trainer_utils import SequentialSAMTrainer, sam_args  # noqa: E402

SETTINGS = {
    "micro4": dict(sam_micro_batch_size=4),
    "per_device": dict(),
    "global": dict(sam_global=True),
}


def main(out_dir: str) -> None:
    data = token_dataset(32, seed=12)
    for name, overrides in SETTINGS.items():
        model = tiny_bert(seed=12)
        args = sam_args(os.path.join(out_dir, name), per_device_train_batch_size=8, max_steps=2, sam_rho=0.2, **overrides)
        trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=data)
        assert trainer.accelerator.num_processes == 2, trainer.accelerator.state
        trainer.train()
        if trainer.accelerator.is_main_process:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"{name}.safetensors"))
            with open(os.path.join(out_dir, f"{name}.skipped"), "w") as handle:
                handle.write(str(trainer.state.log_history[0]["sam_skipped"]))
    del trainer  # the DDP wrapper must go while the process group is still registered
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
