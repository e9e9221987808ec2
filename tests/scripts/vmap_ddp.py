"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): two mSAM steps on the vmap path
(per-device batch 8, micro-batch 4) for a padded tiny BERT and a tiny Llama with -100 holes; rank 0 writes
the weights to OUT/<name>.safetensors for comparison with one process and a doubled batch."""

import os
import sys

import torch
from hf_msam.recipes.common import shutdown_distributed
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import tiny_bert  # noqa: E402
from test_vectorized import padded_dataset  # noqa: E402
from trainer_utils import SequentialSAMTrainer, lm_dataset, sam_args, tiny_llama  # noqa: E402

RUNS = {
    "bert": (lambda: tiny_bert(seed=15), lambda: padded_dataset(32, seed=15)),
    "llama": (lambda: tiny_llama(seed=15), lambda: lm_dataset(32, seed=15)),
}


def main(out_dir: str) -> None:
    for name, (make_model, make_data) in RUNS.items():
        model = make_model()
        args = sam_args(os.path.join(out_dir, name + "_run"), per_device_train_batch_size=8, max_steps=2, sam_rho=0.2,
                        sam_micro_batch_size=4, sam_micro_batch_mode="vmap")
        trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=make_data())
        assert trainer.accelerator.num_processes == 2, trainer.accelerator.state
        trainer.train()
        assert trainer._vmap_verified
        if trainer.accelerator.is_main_process:
            save_file({k: v.detach().contiguous() for k, v in model.named_parameters()}, os.path.join(out_dir, f"{name}.safetensors"))
    del trainer  # the DDP wrapper must go while the process group is still registered
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
