"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): two mSAM steps with AdamW under
DeepSpeed ZeRO-1 or ZeRO-2 for each setting; rank 0 saves the weights to OUT/<setting>.safetensors and the first
step's count of skipped perturbations to OUT/<setting>.skipped.

    python -m accelerate.commands.launch ... msam_deepspeed.py OUT

On a CPU-only torch accelerate finds no distributed backend for DeepSpeed (its ``PartialState`` leaves ``backend``
None and counts one process, so each process would train alone on the whole data). The script builds the state
itself with gloo and DeepSpeed's CPU accelerator, and the arguments use that configured state, so that the
Trainer's own DeepSpeed preparation (``deepspeed.initialize`` through accelerate) runs as it would on GPUs.

Settings (8 examples per process and step; 2-layer models; micro-batches of 4 unless named):
  zero2_micro4, zero1_micro4: a tiny BERT under ZeRO-2 and ZeRO-1.
  zero2_per_device: each process's batch is one micro-batch.
  zero2_global: ``sam_global`` (one perturbation for the 16 examples).
  zero2_accumulate: per-device batches of 4, gradient accumulation 2: the engine's boundary at the second chunk only.
  zero2_holes: a tiny causal LM with -100 holes (the processes hold different numbers of supervised tokens).
  zero2_empty, zero2_empty_global: every label of the second process's chunk is -100 in the first step, so it has
      no micro-batch while the first has two: it runs zero-loss backwards, since ZeRO-2 reduces in every backward.
  zero2_dropout_global: ``sam_global`` on padded sequences with dropout 0.1, as the DDP script's ``dropout`` suite.
"""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"

import deepspeed.ops  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [TESTS, os.path.join(TESTS, "update")]  # builders.py and test_vmap.py
import test_vmap  # noqa: E402
from builders import (  # noqa: E402
    ADAMW,
    TWO_LAYERS,
    SequentialSAMTrainer,
    lm_dataset_without_labels_in,
    sam_args,
    tiny_bert,
    tiny_llama,
    token_dataset,
)

from hf_msam.recipes.common import shutdown_distributed  # noqa: E402

# DeepSpeed's shared-memory all-reduce serves only its inference all-reduce; on CPU it is a C++ op built at the first
# process group (a compiler and about two minutes), so it is left unbuilt: ZeRO's collectives go through gloo.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

BERT = (lambda: tiny_bert(seed=12, **TWO_LAYERS), lambda: token_dataset(32, seed=12))
# the DDP script's dropout suite (tests/training/scripts/msam_ddp.py): padded sequences, dropout 0.1
BERT_DROPOUT = (lambda: tiny_bert(seed=12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **TWO_LAYERS),
                lambda: test_vmap.padded_dataset(32, seed=15))
LLAMA_HOLES = (lambda: tiny_llama(seed=19, **TWO_LAYERS), lambda: lm_dataset_without_labels_in())
LLAMA_EMPTY = (lambda: tiny_llama(seed=19, **TWO_LAYERS), lambda: lm_dataset_without_labels_in(8, 16))
# setting -> (ZeRO stage, (model, training data), SAMTrainingArguments overrides)
SETTINGS = {
    "zero2_micro4": (2, BERT, dict(sam_micro_batch_size=4)),
    "zero1_micro4": (1, BERT, dict(sam_micro_batch_size=4)),
    "zero2_per_device": (2, BERT, dict()),
    "zero2_global": (2, BERT, dict(sam_global=True)),
    "zero2_accumulate": (2, BERT, dict(per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                       sam_micro_batch_size=4)),
    "zero2_holes": (2, LLAMA_HOLES, dict(sam_micro_batch_size=4)),
    "zero2_empty": (2, LLAMA_EMPTY, dict(sam_micro_batch_size=4)),
    "zero2_empty_global": (2, LLAMA_EMPTY, dict(sam_global=True)),
    "zero2_dropout_global": (2, BERT_DROPOUT, dict(sam_global=True)),
}


def deepspeed_config(stage: int) -> dict:
    """The Trainer fills the "auto" values from its arguments; the optimizer is the Trainer's (torch AdamW)."""
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }


def main(out_dir: str) -> None:
    PartialState(backend="gloo")
    for setting, (stage, (make_model, make_data), overrides) in SETTINGS.items():
        AcceleratorState._reset_state()  # each trainer prepares its own DeepSpeed plugin; the process group stays
        values = dict(per_device_train_batch_size=8, max_steps=2, sam_rho=0.2, use_cpu=False,
                      deepspeed=deepspeed_config(stage), accelerator_config={"use_configured_state": True}, **ADAMW)
        values.update(overrides)
        model = make_model()
        trainer = SequentialSAMTrainer(model=model, args=sam_args(os.path.join(out_dir, setting), **values),
                                       train_dataset=make_data())
        assert trainer.is_deepspeed_enabled and trainer.accelerator.num_processes == 2, trainer.accelerator.state
        trainer.train()
        assert trainer.model_wrapped.global_steps == 2  # the engine stepped once per optimizer step
        if trainer.accelerator.is_main_process:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                      os.path.join(out_dir, f"{setting}.safetensors"))
            with open(os.path.join(out_dir, f"{setting}.skipped"), "w") as handle:
                handle.write(str(trainer.state.log_history[0]["sam_skipped"]))
        del trainer
        torch.distributed.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
