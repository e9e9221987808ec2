"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): a tiny causal LM with -100 holes, so the
processes hold different numbers of supervised tokens, and, in the `empty_*` settings, a first step in which every
label of the second process's chunk is -100. Rank 0 writes the weights to OUT/<setting>.safetensors."""

import os
import sys

import torch
from hf_msam.recipes.common import shutdown_distributed
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trainer_utils import SequentialSAMTrainer, lm_dataset_without_labels_in, sam_args, tiny_llama  # noqa: E402

# setting -> (examples whose labels are all -100, SAMTrainingArguments overrides); 8 examples per process and step
SETTINGS = {
    "holes_micro4": ((), dict(sam_micro_batch_size=4)),
    "empty_micro4": ((8, 16), dict(sam_micro_batch_size=4)),
    "empty_per_device": ((8, 16), dict()),
    "empty_global": ((8, 16), dict(sam_global=True)),
}


def main(out_dir: str) -> None:
    for name, (unsupervised, overrides) in SETTINGS.items():
        data = lm_dataset_without_labels_in(*unsupervised)
        model = tiny_llama(seed=19)
        args = sam_args(os.path.join(out_dir, name), per_device_train_batch_size=8, max_steps=2, sam_rho=0.2, **overrides)
        trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=data)
        assert trainer.accelerator.num_processes == 2, trainer.accelerator.state
        trainer.train()
        if trainer.accelerator.is_main_process:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"{name}.safetensors"))
    del trainer  # the DDP wrapper must go while the process group is still registered
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
