"""FSDP2 (``fully_shard``) on two gloo processes gives the weights of one process running the same global
micro-batches: micro-batch k of a step is the union of the processes' k-th micro-batches, perturbed by its joint
gradient with the global norm (``docs/design.md`` section 2.6)."""

from __future__ import annotations

import pytest
from builders import (
    SequentialSAMTrainer,
    image_dataset,
    lm_dataset_without_labels_in,
    sam_args,
    tiny_bert,
    tiny_llama,
    tiny_vit,
    token_dataset,
)
from processes import MSAM_FSDP, launch_two_processes
from references import max_abs_diff
from safetensors.torch import load_file

from hf_msam import SAMTrainingArguments

ADAMW = dict(optim="adamw_torch", learning_rate=1e-2, adam_epsilon=1e-3)  # as the script, which says why


def global_micro_batch_order(num_examples: int, world: int = 2, per_device: int = 8, micro: int = 4) -> list[int]:
    """The example order in which one process with batch ``world * per_device`` and micro-batches of
    ``world * micro`` sees the global micro-batches of ``world`` processes: process r takes examples
    [s W P + r P, s W P + (r + 1) P) in step s (accelerate's sharding of a sequential loader), and its k-th
    micro-batch [.. + k M, .. + (k + 1) M)."""
    order = []
    for step in range(num_examples // (world * per_device)):
        for k in range(per_device // micro):
            for rank in range(world):
                start = step * world * per_device + rank * per_device + k * micro
                order += range(start, start + micro)
    return order


def _one_process(tmp_path, model, data, **overrides):
    values = dict(per_device_train_batch_size=16, max_steps=2, sam_rho=0.2, sam_micro_batch_size=8, **ADAMW)
    values.update(overrides)
    SequentialSAMTrainer(model=model, args=sam_args(tmp_path, **values), train_dataset=data).train()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def bert_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_bert")
    launch_two_processes(MSAM_FSDP, "bert", str(out), timeout=300)
    return out


@pytest.fixture(scope="module")
def lm_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_lm")
    launch_two_processes(MSAM_FSDP, "lm", str(out), timeout=300)
    return out


def _lora_bert():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_bert(seed=12), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                         task_type="SEQ_CLS"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting, make_model, overrides",
    [
        ("micro4", lambda: tiny_bert(seed=12), {}),
        ("asam", lambda: tiny_bert(seed=12), dict(sam_adaptive=True, sam_rho=1.0)),
        ("lora", _lora_bert, {}),
    ],
)
def test_fsdp2_equals_one_process_on_the_global_micro_batches(bert_weights, tmp_path, setting, make_model, overrides):
    data = token_dataset(32, seed=12).select(global_micro_batch_order(32))
    expected = _one_process(tmp_path, make_model(), data, **overrides)
    sharded = load_file(str(bert_weights / f"{setting}.safetensors"))
    assert sharded.keys() == expected.keys()
    assert max_abs_diff(sharded, expected) < 1e-6


@pytest.mark.slow
def test_fsdp2_perturbs_with_the_global_norm_not_per_process(bert_weights, tmp_path):
    # per-process perturbations (each process's micro-batch by its own gradient, the DDP semantics) differ
    sharded = load_file(str(bert_weights / "micro4.safetensors"))
    per_process = _one_process(tmp_path, tiny_bert(seed=12), token_dataset(32, seed=12), sam_micro_batch_size=4)
    assert max_abs_diff(sharded, per_process) > 1e-4


@pytest.mark.slow
def test_fsdp2_vit(tmp_path_factory, tmp_path):
    out = tmp_path_factory.mktemp("fsdp_vit")
    launch_two_processes(MSAM_FSDP, "vit", str(out), timeout=300)
    data = image_dataset(32, seed=13).select(global_micro_batch_order(32))
    expected = _one_process(tmp_path, tiny_vit(seed=13), data)
    assert max_abs_diff(load_file(str(out / "micro4.safetensors")), expected) < 1e-6


@pytest.mark.slow
def test_fsdp2_with_gradient_accumulation(bert_weights, tmp_path):
    # 2 accumulation steps of 4 per process: each accumulation chunk's global micro-batch is 8 consecutive examples
    expected = _one_process(tmp_path, tiny_bert(seed=12), token_dataset(32, seed=12), per_device_train_batch_size=8,
                            gradient_accumulation_steps=2)
    assert max_abs_diff(load_file(str(bert_weights / "accumulate.safetensors")), expected) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("setting, unsupervised", [("holes", ()), ("empty", (8, 16))])
def test_fsdp2_causal_lm_with_unequal_and_missing_tokens(lm_weights, tmp_path, setting, unsupervised):
    data = lm_dataset_without_labels_in(*unsupervised).select(global_micro_batch_order(32))
    expected = _one_process(tmp_path, tiny_llama(seed=19), data)
    assert max_abs_diff(load_file(str(lm_weights / f"{setting}.safetensors")), expected) < 1e-6


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(fsdp_config={"fsdp_version": 1}), "fsdp_config"),
        (dict(fsdp_config={"fsdp_version": 2}, sam_global=True), "sam_global"),
        (dict(fsdp_config={"fsdp_version": 2}, sam_micro_batch_mode="vmap"), "sam_micro_batch_mode"),
        (dict(fsdp_config={"fsdp_version": 2}, sharpness_report=True), "hf-msam sharpness"),
    ],
)
def test_what_fsdp_cannot_do_is_refused_when_the_arguments_are_built(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        SAMTrainingArguments(output_dir=str(tmp_path), fsdp=True, use_cpu=True, **overrides)
