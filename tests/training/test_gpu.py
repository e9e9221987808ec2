"""The trainer tests on a CUDA GPU (fp32, bf16, fp16 with a real GradScaler), shared gradient
storage and dropout masks on the GPU generator. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import image_dataset, tiny_bert, tiny_vit, token_dataset
from msam_reference import reference_msam_gradient, reference_sgd_step
from test_trainer import DROPOUT_CASES, _InfiniteGradient, _learnable_dataset, _relative_update_difference, _stock_run

from hf_msam import RandomState
from trainer_utils import SequentialSAMTrainer, lm_dataset, max_abs_diff, sam_args, snapshot, tensor_batch, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_args(tmp_path, **overrides):
    return sam_args(tmp_path, use_cpu=False, **overrides)


def on_cuda(batch):
    return {k: v.cuda() for k, v in batch.items()}


@pytest.mark.parametrize("micro_batch_size, adaptive", [(None, False), (2, False), (3, False), (3, True)])
def test_one_step_matches_reference_fp32(tmp_path, micro_batch_size, adaptive):
    data = token_dataset(8, seed=1)
    model, reference = tiny_bert(seed=1), tiny_bert(seed=1).cuda()
    args = cuda_args(tmp_path, sam_rho=0.2, sam_micro_batch_size=micro_batch_size, sam_adaptive=adaptive, sam_adaptive_eta=0.05)
    trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=data)
    assert trainer.args.device.type == "cuda"
    trainer.train()
    gradient = reference_msam_gradient(reference, on_cuda(tensor_batch(data, 0, 8)), micro_batch_size, 0.2, adaptive, 0.05)
    reference_sgd_step(reference, gradient, lr=0.5)
    assert max_abs_diff(snapshot(model), snapshot(reference)) < 1e-6


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("make_model, make_data", [(tiny_bert, token_dataset), (tiny_llama, lm_dataset)], ids=["bert", "llama"])
def test_gradient_accumulation_equivalence(tmp_path, precision, make_model, make_data):
    data = make_data(32, seed=4)
    results = []
    for ga, batch in [(2, 8), (1, 16)]:
        model = make_model(seed=4)
        args = cuda_args(tmp_path / f"{ga}", per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                         sam_rho=0.1, sam_micro_batch_size=4, max_steps=2,
                         bf16=precision == "bf16", fp16=precision == "fp16")
        trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=data)
        assert (trainer.accelerator.scaler is not None) == (precision == "fp16")
        trainer.train()
        results.append(snapshot(model))
    assert max_abs_diff(*results) < 1e-6


def test_bf16_trains(tmp_path):
    args = cuda_args(tmp_path, bf16=True, optim="adamw_torch", learning_rate=3e-3, max_steps=40, sam_rho=0.05,
                     sam_micro_batch_size=4, per_device_train_batch_size=16)
    trainer = SequentialSAMTrainer(model=tiny_bert(seed=6, hidden_size=32, intermediate_size=64), args=args,
                                   train_dataset=_learnable_dataset())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_fp16_overflowing_ascent_is_skipped_with_grad_scaler(tmp_path):
    """With the real GradScaler: the skipped run equals a run whose perturbation is numerically nothing.

    The loop path, whose forwards alternate ascent/descent as the hook counts them (the vmap path's skip is
    tested in ``test_vectorized.py``)."""
    data = token_dataset(8, seed=7)
    calls = {"n": 0}

    def overflow_on_ascent(module, inputs, output):
        calls["n"] += 1
        return _InfiniteGradient.apply(output) if calls["n"] % 2 == 1 else output

    skipped_model, tiny_rho_model = tiny_bert(seed=7), tiny_bert(seed=7)
    skipped_model.classifier.register_forward_hook(overflow_on_ascent)
    trainer = SequentialSAMTrainer(model=skipped_model, args=cuda_args(tmp_path / "a", fp16=True, sam_rho=0.3, sam_micro_batch_size=4, sam_micro_batch_mode="loop"),
                                   train_dataset=data)
    assert trainer.accelerator.scaler is not None
    trainer.train()
    assert trainer.state.log_history[0]["sam_skipped"] == 2
    assert all(torch.isfinite(p).all() for p in skipped_model.parameters())
    SequentialSAMTrainer(model=tiny_rho_model, args=cuda_args(tmp_path / "b", fp16=True, sam_rho=1e-30, sam_micro_batch_size=4, sam_micro_batch_mode="loop"),
                         train_dataset=data).train()
    assert max_abs_diff(snapshot(skipped_model), snapshot(tiny_rho_model)) < 1e-6


def test_random_state_replays_the_cuda_generator():
    x = torch.ones(4096, device="cuda")
    torch.manual_seed(20)
    single_pass = torch.nn.functional.dropout(x, 0.5)
    after_single_pass = torch.cuda.get_rng_state()
    torch.manual_seed(20)
    randomness = RandomState.capture()
    first = torch.nn.functional.dropout(x, 0.5)
    randomness.restore()
    second = torch.nn.functional.dropout(x, 0.5)
    assert torch.equal(first, second) and torch.equal(second, single_pass)
    assert torch.equal(torch.cuda.get_rng_state(), after_single_pass)


@pytest.mark.parametrize("n, micro_batch_size", [(8, 1), (7, 3)], ids=["micro-batch-1", "uneven-3-3-1"])
def test_vit_one_example_micro_batches_match_reference(tmp_path, n, micro_batch_size):
    data = image_dataset(n, seed=15)
    model, reference = tiny_vit(seed=15), tiny_vit(seed=15).cuda()
    args = cuda_args(tmp_path, sam_rho=0.05, sam_micro_batch_size=micro_batch_size, per_device_train_batch_size=n)
    SequentialSAMTrainer(model=model, args=args, train_dataset=data).train()
    gradient = reference_msam_gradient(reference, on_cuda(tensor_batch(data, 0, n)), micro_batch_size, 0.05)
    reference_sgd_step(reference, gradient, lr=0.5)
    assert max_abs_diff(snapshot(model), snapshot(reference)) < 1e-6


@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_dropout_tiny_rho_equals_stock_step(tmp_path, case):
    """The CUDA generator draws the masks here: the descent pass must replay it."""
    make_model, make_data = DROPOUT_CASES[case]
    data = make_data()
    common = dict(per_device_train_batch_size=8, max_steps=2)
    start = snapshot(make_model())
    sam_model = make_model()
    SequentialSAMTrainer(model=sam_model, args=cuda_args(tmp_path / "sam", sam_rho=1e-7, **common), train_dataset=data).train()
    stock = _stock_run(tmp_path / "stock", make_model(), data, use_cpu=False, **common)
    on_cpu = {k: v.cpu() for k, v in snapshot(sam_model).items()}
    assert _relative_update_difference(start, on_cpu, {k: v.cpu() for k, v in stock.items()}) < 1e-5
