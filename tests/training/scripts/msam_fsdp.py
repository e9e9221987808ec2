"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): mSAM with AdamW under FSDP2
(``fully_shard``, 2-layer models: each layer a unit of its own) for each setting of one suite; rank 0 saves the full
weights to OUT/<setting>.safetensors.

    python -m accelerate.commands.launch ... msam_fsdp.py SUITE OUT

accelerate selects FSDP only on accelerators (its state keeps ``MULTI_CPU`` on CPU); the script lifts that gate
for its own process, so that the Trainer's FSDP2 preparation (``fsdp2_prepare_model``, with the mixed precision
policy of ``bf16=True``) runs on gloo as it would on GPUs.

Suites (two steps each, unless said):
  bert: micro-batches of 4 (SAM and ASAM), gradient accumulation, LoRA; ``poisoned``: micro-batches of 4, where
      process 1's shard of the first ascent gradient holds a NaN (each process writes OUT/poisoned.rank<r>.json:
      the skips it recorded, the ``sam_skipped`` and ``sam_ascent_grad_norm`` it logged).
  vit: a ViT image classifier, micro-batches of 4.
  lm: a causal LM with -100 holes (unequal token counts), and a second process with nothing supervised.
  bf16: ``bf16=True``: mSAM with micro-batches of 4 (``micro4``; each process writes OUT/micro4.rank<r>.json, what
      :class:`RestoreCheckingSAMTrainer` saw of its float32 shards) and the stock step (``stock``, rho 0).
  dropout: padded sequences with dropout 0.1, one micro-batch per process (the per-device batch).
  resume: 4 steps of a linear schedule with dropout, saving checkpoint-2 (``sharded``: SHARDED_STATE_DICT,
      ``full``: FULL_STATE_DICT) in OUT/<setting>/.
  resumed: the ``resume`` settings resumed from OUT/<setting>/checkpoint-2, weights in OUT/<setting>_resumed.safetensors.
"""

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [TESTS, os.path.join(TESTS, "update")]  # builders.py and test_vmap.py
import test_vmap  # noqa: E402
from builders import (  # noqa: E402
    ADAMW,
    TWO_LAYERS,
    SequentialSAMTrainer,
    image_dataset,
    lm_dataset_without_labels_in,
    sam_args,
    tiny_bert,
    tiny_llama,
    tiny_vit,
    token_dataset,
)
from fsdp_on_cpu import allow_fsdp_on_cpu  # noqa: E402

from hf_msam.recipes.common import shutdown_distributed  # noqa: E402
from hf_msam.update.loop import Perturbation  # noqa: E402

allow_fsdp_on_cpu()


def lora_bert() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(tiny_bert(seed=12, **TWO_LAYERS), config)


class PoisonedAscentSAMTrainer(SequentialSAMTrainer):
    """On process 1 only, the ascent pass of the first micro-batch of the first step leaves a NaN in one element of
    process 1's shard of the ascent gradient (after the reduce-scatter): process 0's shards stay finite, so process 0
    learns that the perturbation is skipped from the global norm alone. Counts the skips this process records."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.poisoned = False
        self.recorded_skips = 0

    def _sharded_pass(self, model: nn.Module, micro_batch: dict[str, Any], items: int, weight: float,
                      backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        loss = super()._sharded_pass(model, micro_batch, items, weight, backward)
        if backward is torch.Tensor.backward and self.state.global_step == 0 and not self.poisoned:
            self.poisoned = True
            if self.args.process_index == 1:
                grad = next(p.grad.to_local() for p in model.parameters() if p.grad is not None and p.grad.to_local().numel())
                grad.view(-1)[0] = float("nan")
        return loss

    def _record(self, perturbation: Perturbation, perturbed_loss_share: torch.Tensor) -> None:
        self.recorded_skips += int(perturbation.skipped)
        super()._record(perturbation, perturbed_loss_share)


class RestoreCheckingSAMTrainer(SequentialSAMTrainer):
    """Records what this process's float32 shards (``to_local()`` of each parameter) are: their dtypes, their squared
    distance from the step's starting point at each descent pass (the process's share of ``||e_k||^2``), and whether
    they hold the step's starting values bit for bit once the step's micro-batches are done."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dtypes: set[str] = set()
        self.descent_squared_distances: list[float] = []
        self.restored: list[bool] = []
        self._start: list[torch.Tensor] = []

    def _sharded_msam_step(self, model: nn.Module, *args: Any) -> torch.Tensor:
        self._start = [p.to_local().clone() for p in model.parameters()]
        loss = super()._sharded_msam_step(model, *args)
        self.dtypes.update(str(p.to_local().dtype) for p in model.parameters())
        self.restored.append(all(torch.equal(p.to_local(), w) for p, w in zip(model.parameters(), self._start)))
        return loss

    def _sharded_pass(self, model: nn.Module, micro_batch: dict[str, Any], items: int, weight: float,
                      backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        if backward is not torch.Tensor.backward:  # the descent pass, at w + e_k
            squares = sum(float((p.to_local().double() - w.double()).square().sum())
                          for p, w in zip(model.parameters(), self._start))
            self.descent_squared_distances.append(squares)
        return super()._sharded_pass(model, micro_batch, items, weight, backward)


@dataclass(frozen=True)
class Setting:
    """A model, its training data, the ``SAMTrainingArguments`` that differ from :data:`ADAMW`'s two steps, the
    ``fsdp_config`` entries beyond the layer units, and the trainer class."""

    model: Callable[[], nn.Module]
    data: Callable[[], Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    fsdp_config: dict[str, Any] = field(default_factory=dict)
    trainer: type[SequentialSAMTrainer] = SequentialSAMTrainer


LAYERS = {"BertLayer", "LlamaDecoderLayer", "ViTLayer"}  # each transformer layer of a model its own FSDP unit
DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
MICRO4 = dict(sam_micro_batch_size=4)
# 64 examples: the 4 steps are one epoch, so the resumed run must skip the 2 steps' batches it already trained on
RESUME = dict(max_steps=4, lr_scheduler_type="linear", save_strategy="steps", save_steps=2, **MICRO4)


def bert() -> nn.Module:
    return tiny_bert(seed=12, **TWO_LAYERS)


def bert_with_dropout() -> nn.Module:
    return tiny_bert(seed=12, **TWO_LAYERS, **DROPOUT)


def tokens() -> Any:
    return token_dataset(32, seed=12)


SUITES = {
    "bert": {
        "micro4": Setting(bert, tokens, MICRO4),
        "asam": Setting(bert, tokens, dict(MICRO4, sam_adaptive=True, sam_rho=1.0)),
        "accumulate": Setting(bert, tokens, dict(MICRO4, per_device_train_batch_size=4, gradient_accumulation_steps=2)),
        "lora": Setting(lora_bert, tokens, MICRO4),
        "poisoned": Setting(bert, tokens, MICRO4, trainer=PoisonedAscentSAMTrainer),
    },
    "vit": {
        "micro4": Setting(lambda: tiny_vit(seed=13, **TWO_LAYERS), lambda: image_dataset(32, seed=13), MICRO4),
    },
    "lm": {
        "holes": Setting(lambda: tiny_llama(seed=19, **TWO_LAYERS), lm_dataset_without_labels_in, MICRO4),
        "empty": Setting(lambda: tiny_llama(seed=19, **TWO_LAYERS), lambda: lm_dataset_without_labels_in(8, 16), MICRO4),
    },
    "bf16": {
        "micro4": Setting(bert, tokens, dict(MICRO4, bf16=True), trainer=RestoreCheckingSAMTrainer),
        "stock": Setting(bert, tokens, dict(sam_rho=0.0, bf16=True)),
    },
    "dropout": {
        "padded": Setting(bert_with_dropout, lambda: test_vmap.padded_dataset(32, seed=15)),
    },
    "resume": {
        "sharded": Setting(bert_with_dropout, lambda: token_dataset(64, seed=12), RESUME,
                           dict(state_dict_type="SHARDED_STATE_DICT")),
        "full": Setting(bert_with_dropout, lambda: token_dataset(64, seed=12), RESUME,
                        dict(state_dict_type="FULL_STATE_DICT")),
    },
}


def write_json(path: str, value: Any) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle)


def main(suite: str, out_dir: str) -> None:
    from safetensors.torch import save_file

    rank = int(os.environ.get("RANK", "0"))
    resumed = suite == "resumed"
    for name, setting in SUITES["resume" if resumed else suite].items():
        model = setting.model()
        layers = sorted({type(m).__name__ for m in model.modules()} & LAYERS)
        fsdp_config = {"fsdp_version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": layers,
                       **setting.fsdp_config}
        values = dict(per_device_train_batch_size=8, max_steps=2, sam_rho=0.2, fsdp=True, fsdp_config=fsdp_config,
                      **ADAMW)
        values.update(setting.overrides)
        run_dir = os.path.join(out_dir, name)
        trainer = setting.trainer(model=model, args=sam_args(run_dir, **values), train_dataset=setting.data())
        assert trainer.is_fsdp_enabled, trainer.accelerator.distributed_type
        trainer.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-2") if resumed else None)
        assert trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2, trainer.accelerator.distributed_type
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in trainer.model_wrapped.state_dict().items()}
        if rank == 0:
            path = os.path.join(out_dir, f"{name}_resumed.safetensors" if resumed else f"{name}.safetensors")
            save_file({k: v.contiguous() for k, v in full.items()}, path)
        logged_skips = [entry["sam_skipped"] for entry in trainer.state.log_history if "sam_skipped" in entry]
        if isinstance(trainer, PoisonedAscentSAMTrainer):
            write_json(os.path.join(out_dir, f"{name}.rank{rank}.json"),
                       dict(recorded_skips=trainer.recorded_skips, logged_skips=logged_skips,
                            logged_norms=[entry["sam_ascent_grad_norm"] for entry in trainer.state.log_history
                                          if "sam_ascent_grad_norm" in entry]))
        if isinstance(trainer, RestoreCheckingSAMTrainer):
            write_json(os.path.join(out_dir, f"{name}.rank{rank}.json"),
                       dict(dtypes=sorted(trainer.dtypes), restored=trainer.restored, logged_skips=logged_skips,
                            descent_squared_distances=trainer.descent_squared_distances))
        del trainer, full
        torch.distributed.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
