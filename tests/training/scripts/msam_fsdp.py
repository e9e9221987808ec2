"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): two mSAM steps with AdamW under FSDP2
(``fully_shard``) for each setting of one suite; rank 0 saves the full weights to OUT/<setting>.safetensors.

    python -m accelerate.commands.launch ... msam_fsdp.py SUITE OUT

accelerate selects FSDP only on accelerators (its state keeps ``MULTI_CPU`` on CPU); the script lifts that gate
for its own process, so that the Trainer's FSDP2 preparation (``fsdp2_prepare_model``) runs on gloo as it would
on GPUs.

Suites:
  bert: micro-batches of 4 (SAM and ASAM), gradient accumulation, LoRA.
  vit: a ViT image classifier, micro-batches of 4.
  lm: a causal LM with -100 holes (unequal token counts), and a second process with nothing supervised.
"""

import os
import sys

import accelerate.state
from accelerate.utils import DistributedType

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [TESTS]
from builders import (  # noqa: E402
    SequentialSAMTrainer,
    image_dataset,
    lm_dataset_without_labels_in,
    sam_args,
    tiny_bert,
    tiny_llama,
    tiny_vit,
    token_dataset,
)

from hf_msam.recipes.common import shutdown_distributed  # noqa: E402

_accelerator_state_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu


def lora_bert():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(tiny_bert(seed=12), config)


# AdamW's epsilon at 1e-3: with the default 1e-8 the update lr g / sqrt(v) of a parameter whose gradients are ~1e-7
# turns float32 differences of summation order (one process's batch against a reduce-scatter) into ~1e-5
ADAMW = dict(optim="adamw_torch", learning_rate=1e-2, adam_epsilon=1e-3)
LAYERS = {"bert": "BertLayer", "lm": "LlamaDecoderLayer", "vit": "ViTLayer"}  # each transformer layer its own FSDP unit
SUITES = {
    "bert": {
        "micro4": (lambda: tiny_bert(seed=12), lambda: token_dataset(32, seed=12), dict(sam_micro_batch_size=4)),
        "asam": (lambda: tiny_bert(seed=12), lambda: token_dataset(32, seed=12),
                 dict(sam_micro_batch_size=4, sam_adaptive=True, sam_rho=1.0)),
        "accumulate": (lambda: tiny_bert(seed=12), lambda: token_dataset(32, seed=12),
                       dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, sam_micro_batch_size=4)),
        "lora": (lora_bert, lambda: token_dataset(32, seed=12), dict(sam_micro_batch_size=4)),
    },
    "vit": {
        "micro4": (lambda: tiny_vit(seed=13), lambda: image_dataset(32, seed=13), dict(sam_micro_batch_size=4)),
    },
    "lm": {
        "holes": (lambda: tiny_llama(seed=19), lambda: lm_dataset_without_labels_in(), dict(sam_micro_batch_size=4)),
        "empty": (lambda: tiny_llama(seed=19), lambda: lm_dataset_without_labels_in(8, 16), dict(sam_micro_batch_size=4)),
    },
}


def main(suite: str, out_dir: str) -> None:
    import torch
    from safetensors.torch import save_file

    rank = int(os.environ.get("RANK", "0"))
    for setting, (make_model, make_data, overrides) in SUITES[suite].items():
        fsdp_config = {"fsdp_version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": [LAYERS[suite]]}
        values = dict(per_device_train_batch_size=8, max_steps=2, sam_rho=0.2, fsdp=True, fsdp_config=fsdp_config,
                      **ADAMW)
        values.update(overrides)
        trainer = SequentialSAMTrainer(model=make_model(), args=sam_args(os.path.join(out_dir, setting), **values),
                                       train_dataset=make_data())
        assert trainer.is_fsdp_enabled, trainer.accelerator.distributed_type
        trainer.train()
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in trainer.model_wrapped.state_dict().items()}
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(out_dir, f"{setting}.safetensors"))
        del trainer, full
        torch.distributed.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
