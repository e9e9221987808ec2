"""Two gloo processes give the weights of one process with the doubled batch."""

from __future__ import annotations

import pytest
from builders import (
    SequentialSAMTrainer,
    first_step_supervised_tokens,
    lm_dataset_without_labels_in,
    sam_args,
    tiny_bert,
    tiny_llama,
    token_dataset,
)
from processes import MSAM_DDP, launch_two_processes
from references import max_abs_diff
from safetensors.torch import load_file

@pytest.fixture(scope="module")
def ddp_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch_two_processes(MSAM_DDP, "bert", str(out))
    return out


def _single_process(tmp_path, **overrides):
    model = tiny_bert(seed=12)
    args = sam_args(tmp_path, per_device_train_batch_size=16, max_steps=2, sam_rho=0.2, **overrides)
    SequentialSAMTrainer(model=model, args=args, train_dataset=token_dataset(32, seed=12)).train()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting, single_process",
    [
        ("micro4", dict(sam_micro_batch_size=4)),  # the micro-batch size defines the algorithm, not the hardware
        ("per_device", dict(sam_micro_batch_size=8)),  # each process's batch is one micro-batch: no all-reduce
        ("global", dict(sam_micro_batch_size=None)),  # sam_global: one perturbation for the 16 examples = SAM
    ],
)
def test_two_processes_equal_one_process_with_doubled_batch(ddp_weights, tmp_path, setting, single_process):
    distributed = load_file(str(ddp_weights / f"{setting}.safetensors"))
    expected = _single_process(tmp_path, **single_process)
    assert max_abs_diff(distributed, expected) < 1e-6
    assert (ddp_weights / f"{setting}.skipped").read_text() == "0"


@pytest.mark.slow
def test_ascent_gradient_is_not_all_reduced_without_sam_global(ddp_weights):
    per_device = load_file(str(ddp_weights / "per_device.safetensors"))
    global_sam = load_file(str(ddp_weights / "global.safetensors"))
    assert max_abs_diff(per_device, global_sam) > 1e-4


# --- processes with unequal supervised tokens, and a process with none ------------------
@pytest.fixture(scope="module")
def lm_ddp_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_lm")
    launch_two_processes(MSAM_DDP, "lm", str(out), timeout=240)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting, unsupervised, single_process",
    [
        ("holes_micro4", (), dict(sam_micro_batch_size=4)),  # token counts differ between the processes
        ("func_micro4", (), dict(sam_micro_batch_size=4)),  # a compute_loss_func normalised by num_items_in_batch
        ("empty_micro4", (8, 16), dict(sam_micro_batch_size=4)),  # step 1: the second process has no label at all
        ("empty_per_device", (8, 16), dict(sam_micro_batch_size=8)),
        ("empty_global", (8, 16), dict(sam_micro_batch_size=None)),
    ],
)
def test_two_processes_with_unequal_supervision_equal_one_process(lm_ddp_weights, tmp_path, setting, unsupervised,
                                                                   single_process):
    data = lm_dataset_without_labels_in(*unsupervised)
    per_process = first_step_supervised_tokens(data)
    assert per_process[0] != per_process[1] and (per_process[1] == 0) == bool(unsupervised)
    model = tiny_llama(seed=19)
    args = sam_args(tmp_path, per_device_train_batch_size=16, max_steps=2, sam_rho=0.2, **single_process)
    SequentialSAMTrainer(model=model, args=args, train_dataset=data).train()
    distributed = load_file(str(lm_ddp_weights / f"{setting}.safetensors"))
    assert max_abs_diff(distributed, {k: v.detach() for k, v in model.state_dict().items()}) < 1e-6
    assert (lm_ddp_weights / f"{setting}.skipped").read_text() == "0"
