"""DeepSpeed ZeRO-1 and ZeRO-2 on two gloo processes (2-layer models) give the weights of one process with the doubled
batch, as DDP does, and with dropout on, DDP's weights: the parameters are replicated, so each process perturbs them
by its own micro-batches; the descent gradients go through the engine, which steps once per optimizer step
(``docs/design.md`` section 2.7). ZeRO-3 is refused."""

from __future__ import annotations

import pytest
from builders import (
    ADAMW,
    TWO_LAYERS,
    SequentialSAMTrainer,
    first_step_supervised_tokens,
    lm_dataset_without_labels_in,
    sam_args,
    tiny_bert,
    tiny_llama,
    token_dataset,
)
from processes import MSAM_DEEPSPEED, launch_two_processes
from references import max_abs_diff
from safetensors.torch import load_file

from hf_msam import SAMTrainingArguments



@pytest.fixture(scope="module")
def deepspeed_weights(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    launch_two_processes(MSAM_DEEPSPEED, str(out), timeout=300)
    return out


def _one_process(tmp_path, model=None, data=None, **overrides):
    """The plain Trainer loop of one process on the step's 16 examples (no DeepSpeed); the tiny BERT by default."""
    model = model if model is not None else tiny_bert(seed=12, **TWO_LAYERS)
    data = data if data is not None else token_dataset(32, seed=12)
    values = dict(per_device_train_batch_size=16, max_steps=2, sam_rho=0.2, **ADAMW)
    values.update(overrides)
    SequentialSAMTrainer(model=model, args=sam_args(tmp_path, **values), train_dataset=data).train()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting, single_process",
    [
        ("zero2_micro4", dict(sam_micro_batch_size=4)),  # each process's micro-batches of 4, perturbed on their own
        ("zero1_micro4", dict(sam_micro_batch_size=4)),
        ("zero2_accumulate", dict(sam_micro_batch_size=4)),  # two chunks of 4 per process: the same micro-batches
        ("zero2_per_device", dict(sam_micro_batch_size=8)),  # each process's batch is one micro-batch
        ("zero2_global", dict(sam_micro_batch_size=None)),  # sam_global: one perturbation for the 16 examples = SAM
    ],
)
def test_zero_1_and_2_equal_one_process_with_doubled_batch(deepspeed_weights, tmp_path, setting, single_process):
    distributed = load_file(str(deepspeed_weights / f"{setting}.safetensors"))
    expected = _one_process(tmp_path, **single_process)
    assert max_abs_diff(distributed, expected) < 1e-6
    assert (deepspeed_weights / f"{setting}.skipped").read_text() == "0"


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting, unsupervised, single_process",
    [
        ("zero2_holes", (), dict(sam_micro_batch_size=4)),  # token counts differ between the processes
        ("zero2_empty", (8, 16), dict(sam_micro_batch_size=4)),  # step 1: the second process has no label at all
        ("zero2_empty_global", (8, 16), dict(sam_micro_batch_size=None)),
    ],
)
def test_zero2_with_unequal_supervision_equals_one_process(deepspeed_weights, tmp_path, setting, unsupervised,
                                                           single_process):
    data = lm_dataset_without_labels_in(*unsupervised)
    per_process = first_step_supervised_tokens(data)
    assert per_process[0] != per_process[1] and (per_process[1] == 0) == bool(unsupervised)
    expected = _one_process(tmp_path, tiny_llama(seed=19, **TWO_LAYERS), data, **single_process)
    assert max_abs_diff(load_file(str(deepspeed_weights / f"{setting}.safetensors")), expected) < 1e-6
    assert (deepspeed_weights / f"{setting}.skipped").read_text() == "0"


@pytest.mark.slow
def test_zero2_with_dropout_and_padding_equals_ddp(deepspeed_weights, ddp_dropout_weights):
    # each process draws its own dropout masks, which one process cannot replay; with the same seeds DDP draws the
    # same ones, and ZeRO-2 must give DDP's weights (global SAM on a padded 2-layer BERT with dropout 0.1)
    zero2 = load_file(str(deepspeed_weights / "zero2_dropout_global.safetensors"))
    assert max_abs_diff(zero2, load_file(str(ddp_dropout_weights / "global.safetensors"))) < 1e-6
    assert (deepspeed_weights / "zero2_dropout_global.skipped").read_text() == "0"


@pytest.mark.slow
def test_deepspeed_perturbations_are_per_process(deepspeed_weights):
    per_device = load_file(str(deepspeed_weights / "zero2_per_device.safetensors"))
    global_sam = load_file(str(deepspeed_weights / "zero2_global.safetensors"))
    assert max_abs_diff(per_device, global_sam) > 1e-4


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(deepspeed={"zero_optimization": {"stage": 3}}), "recipes/accelerate/fsdp2.yaml"),
        (dict(deepspeed={"zero_optimization": {"stage": 2}}, sam_micro_batch_mode="vmap"), "sam_micro_batch_mode"),
        (dict(deepspeed={"zero_optimization": {"stage": 2}}, sharpness_report=True), "hf-msam sharpness"),
        (dict(deepspeed={"zero_optimization": {"stage": 2}}, fp16=True), "bf16"),
    ],
)
def test_what_deepspeed_cannot_do_is_refused_when_the_arguments_are_built(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        SAMTrainingArguments(output_dir=str(tmp_path), **overrides)


def test_zero3_from_accelerate_environment_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match="ZeRO stages .* FSDP2"):
        SAMTrainingArguments(output_dir=str(tmp_path))
