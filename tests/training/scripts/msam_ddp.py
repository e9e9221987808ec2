"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): two mSAM steps for each setting of one
suite. Rank 0 writes the weights to OUT/<setting>.safetensors and the first step's count of skipped perturbations
to OUT/<setting>.skipped, for comparison with one process and the doubled batch.

    python -m accelerate.commands.launch ... msam_ddp.py SUITE OUT

Suites:
  bert: a tiny BERT with micro-batches of 4, with one micro-batch per process, and with ``sam_global``.
  lm: a tiny causal LM with -100 holes, so the processes hold different numbers of supervised tokens; in the
      ``empty_*`` settings every label of the second process's chunk is -100 in the first step; ``func_micro4``
      computes the loss with a ``compute_loss_func`` normalised by ``num_items_in_batch``.
  vmap: the vmap path (micro-batches of 4) for a padded 2-layer BERT and Llama with -100 holes; a model with a
      parameter that only the second process uses (``unused``), and the same with the second process's buffer
      changed before the second step (``buffer_changed``), which DDP's broadcast_buffers undoes; a Llama whose
      second process has nothing supervised in the first step (``empty``: it runs the loop); under "auto" (picked
      on CPU here) a model whose first vmap group fails on the second process only (``fails_on_one``).
  dropout: ``sam_global`` with AdamW for a padded 2-layer BERT with dropout 0.1 (each process draws its own masks
      from the same seed), the FSDP2 run's reference (``tests/training/test_fsdp.py``).
"""

import os
import sys

import hf_msam.training.path
from hf_msam.recipes.common import shutdown_distributed
from safetensors.torch import save_file

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [TESTS, os.path.join(TESTS, "update")]  # builders.py and test_vmap.py
import test_vmap  # noqa: E402
from builders import (  # noqa: E402
    ADAMW,
    TWO_LAYERS,
    SequentialSAMTrainer,
    lm_dataset,
    lm_dataset_without_labels_in,
    sam_args,
    tiny_bert,
    tiny_llama,
    token_dataset,
    token_loss_func,
)
from transformers import TrainerCallback  # noqa: E402

VMAP = dict(sam_micro_batch_size=4, sam_micro_batch_mode="vmap")
# suite -> setting -> (model, training data, SAMTrainingArguments overrides and compute_loss_func); 8 examples per
# process and step
SUITES = {
    "bert": {
        "micro4": (lambda: tiny_bert(seed=12), lambda: token_dataset(32, seed=12), dict(sam_micro_batch_size=4)),
        "per_device": (lambda: tiny_bert(seed=12), lambda: token_dataset(32, seed=12), dict()),
        "global": (lambda: tiny_bert(seed=12), lambda: token_dataset(32, seed=12), dict(sam_global=True)),
    },
    "lm": {
        "holes_micro4": (lambda: tiny_llama(seed=19), lambda: lm_dataset_without_labels_in(), dict(sam_micro_batch_size=4)),
        # a compute_loss_func that divides by num_items_in_batch: the same update as the model's own loss
        "func_micro4": (lambda: tiny_llama(seed=19), lambda: lm_dataset_without_labels_in(),
                        dict(sam_micro_batch_size=4, compute_loss_func=token_loss_func)),
        "empty_micro4": (lambda: tiny_llama(seed=19), lambda: lm_dataset_without_labels_in(8, 16), dict(sam_micro_batch_size=4)),
        "empty_per_device": (lambda: tiny_llama(seed=19), lambda: lm_dataset_without_labels_in(8, 16), dict()),
        "empty_global": (lambda: tiny_llama(seed=19), lambda: lm_dataset_without_labels_in(8, 16), dict(sam_global=True)),
    },
    "vmap": {
        "bert": (lambda: test_vmap.tiny_bert(seed=15), lambda: test_vmap.padded_dataset(32, seed=15), VMAP),
        "llama": (lambda: test_vmap.tiny_llama(seed=15), lambda: lm_dataset(32, seed=15), VMAP),
        "unused": (test_vmap.LengthBranchClassifier, test_vmap.two_length_dataset, VMAP),
        "buffer_changed": (test_vmap.LengthBranchClassifier, test_vmap.two_length_dataset, VMAP),
        "empty": (lambda: test_vmap.tiny_llama(seed=19), lambda: lm_dataset_without_labels_in(8, 16), VMAP),
        "fails_on_one": (lambda: test_vmap.FailsUnderVmapOnce(1, rank=1),
                         lambda: test_vmap.padded_dataset(32, seed=24).remove_columns("attention_mask"),
                         dict(VMAP, sam_micro_batch_mode="auto")),
    },
    "dropout": {
        "global": (lambda: tiny_bert(seed=12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **TWO_LAYERS),
                   lambda: test_vmap.padded_dataset(32, seed=15),
                   dict(sam_global=True, **ADAMW)),
    },
}


class ChangeBufferOnSecondProcess(TrainerCallback):
    """Before the second step, process 1 sets ``temperature`` to 3 (process 0 keeps 1)."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1 and args.process_index == 1:
            model.temperature.fill_(3.0)


def main(suite: str, out_dir: str) -> None:
    if suite == "vmap":
        hf_msam.training.path.AUTO_VMAP_DEVICE_TYPES = ("cpu",)  # "auto" picks the vmap path on these CPU processes
    for name, (make_model, make_data, settings) in SUITES[suite].items():
        model = make_model()
        overrides = dict(settings)
        loss_func = overrides.pop("compute_loss_func", None)
        args = sam_args(os.path.join(out_dir, f"{name}_run"), per_device_train_batch_size=8, max_steps=2, sam_rho=0.2,
                        **overrides)
        trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=make_data(), compute_loss_func=loss_func)
        if name == "buffer_changed":
            trainer.add_callback(ChangeBufferOnSecondProcess())
        assert trainer.accelerator.num_processes == 2, trainer.accelerator.state
        trainer.train()
        assert args.sam_micro_batch_mode != "vmap" or trainer._vmap_verified  # the vmap path ran, not the loop
        if trainer.accelerator.is_main_process and hasattr(model, "vmapped_calls"):
            with open(os.path.join(out_dir, f"{name}.vmapped_calls"), "w") as handle:
                handle.write(str(model.vmapped_calls))
        if trainer.accelerator.is_main_process:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"{name}.safetensors"))
            with open(os.path.join(out_dir, f"{name}.skipped"), "w") as handle:
                handle.write(str(trainer.state.log_history[0]["sam_skipped"]))
    del trainer  # the DDP wrapper must go while the process group is still registered
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
