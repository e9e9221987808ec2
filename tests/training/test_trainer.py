"""SAMTrainer semantics: each test compares with an independent reference. Tests that take ``device`` also run
on the GPU when there is one; those marked ``cuda`` (a real GradScaler, mixed precision with gradient accumulation)
run only there."""

from __future__ import annotations

import math

import pytest
import torch
from builders import (
    SequentialSAMTrainer,
    SequentialTrainer,
    image_dataset,
    lm_dataset,
    sam_args,
    tensor_batch,
    tiny_bert,
    tiny_bert_lora,
    tiny_llama,
    tiny_vit,
    token_dataset,
)
from references import max_abs_diff, reference_msam_gradient, reference_sgd_step, snapshot
from transformers import HfArgumentParser, TrainingArguments

from hf_msam import SAMTrainer, SAMTrainingArguments


# --- a. one step equals the plain-loop reference ------------------------------------------------------
@pytest.mark.parametrize(
    "micro_batch_size, adaptive",
    [(None, False), (4, False), (2, False), (3, False), (3, True)],
    ids=["sam-m1", "m2", "m4", "uneven-3-3-2", "asam-uneven"],
)
def test_one_step_matches_reference(tmp_path, device, micro_batch_size, adaptive):
    data = token_dataset(8, seed=1)
    model = tiny_bert(seed=1)
    reference = tiny_bert(seed=1).to(device)
    args = sam_args(tmp_path, device, sam_rho=0.2, sam_micro_batch_size=micro_batch_size, sam_adaptive=adaptive,
                    sam_adaptive_eta=0.05)
    trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=data)
    assert trainer.args.device.type == device
    trainer.train()

    gradient = reference_msam_gradient(reference, tensor_batch(data, 0, 8, device), micro_batch_size, 0.2, adaptive, 0.05)
    reference_sgd_step(reference, gradient, lr=0.5)
    assert max_abs_diff(snapshot(model), snapshot(reference)) < 1e-6
    assert max_abs_diff(snapshot(model), snapshot(tiny_bert(seed=1))) > 1e-3  # it did train


def test_label_smoothing_matches_reference(tmp_path):
    """The Trainer's label smoother pops `labels` from the batch: both passes must still see them."""
    data = token_dataset(8, seed=13)
    model, reference = tiny_bert(seed=13), tiny_bert(seed=13)
    args = sam_args(tmp_path, sam_rho=0.2, sam_micro_batch_size=4, label_smoothing_factor=0.1)
    SequentialSAMTrainer(model=model, args=args, train_dataset=data).train()

    def smoothed(m, batch):
        logits = m(input_ids=batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=0.1)

    gradient = reference_msam_gradient(reference, tensor_batch(data, 0, 8), 4, 0.2, loss_fn=smoothed)
    reference_sgd_step(reference, gradient, lr=0.5)
    assert max_abs_diff(snapshot(model), snapshot(reference)) < 1e-6


# --- b. rho = 0 is the stock Trainer, bit for bit -----------------------------------------------------
def test_zero_rho_is_stock_trainer_bit_for_bit(tmp_path):
    data = token_dataset(48, seed=2)
    common = dict(per_device_train_batch_size=8, max_steps=5, optim="adamw_torch", learning_rate=1e-2, max_grad_norm=1.0)
    sam_model, stock_model = tiny_bert(seed=2), tiny_bert(seed=2)
    SequentialSAMTrainer(
        model=sam_model, args=sam_args(tmp_path / "sam", sam_rho=0.0, sam_micro_batch_size=2, **common), train_dataset=data
    ).train()
    stock_args = TrainingArguments(
        output_dir=str(tmp_path / "stock"), lr_scheduler_type="constant", weight_decay=0.0, report_to="none",
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, **common,
    )
    SequentialTrainer(model=stock_model, args=stock_args, train_dataset=data).train()
    a, b = snapshot(sam_model), snapshot(stock_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max_abs_diff(a, snapshot(tiny_bert(seed=2))) > 1e-3


# --- c. restore is exact: learning rate 0 leaves the weights bit for bit -----------------------------
@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_zero_learning_rate_leaves_weights_exactly(tmp_path, optim):
    data = token_dataset(48, seed=3)
    model = tiny_bert(seed=3)
    start = snapshot(model)
    args = sam_args(tmp_path, optim=optim, learning_rate=0.0, sam_rho=0.5, sam_micro_batch_size=2, max_steps=3,
                    gradient_accumulation_steps=2)
    trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert trainer.state.log_history[0]["sam_ascent_grad_norm"] > 0  # perturbations did happen


# --- d. gradient accumulation 2 x 8 equals 1 x 16 ---------------------------------------------------
def _train_ga(tmp_path, make_model, data, ga, batch, steps=2, device="cpu", **overrides):
    model = make_model()
    args = sam_args(tmp_path / f"ga{ga}", device, per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                    sam_rho=0.1, sam_micro_batch_size=4, max_steps=steps, **overrides)
    trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return snapshot(model), trainer


def _reference_steps(make_model, data, device, token_level=False):
    """Two plain-loop mSAM steps of 16 examples (micro-batches of 4, rho 0.1); ``token_level``: each micro-batch
    weighted by its supervised shifted labels (a causal LM's)."""
    reference = make_model().to(device)
    for step in range(2):
        batch = tensor_batch(data, 16 * step, 16 * step + 16, device)
        weights = None
        if token_level:
            items = [int(batch["labels"][k : k + 4, 1:].ne(-100).sum()) for k in range(0, 16, 4)]
            weights = [i / sum(items) for i in items]
            assert len(set(items)) > 1  # the token weighting is really exercised
        reference_sgd_step(reference, reference_msam_gradient(reference, batch, 4, 0.1, weights=weights), lr=0.5)
    return snapshot(reference)


def test_gradient_accumulation_bert_head(tmp_path, device):
    """BERT heads accept **kwargs but return a plain mean (transformers#47688): no inflated GA step."""
    data = token_dataset(32, seed=4)
    with_ga, _ = _train_ga(tmp_path, lambda: tiny_bert(seed=4), data, ga=2, batch=8, device=device)
    without, _ = _train_ga(tmp_path, lambda: tiny_bert(seed=4), data, ga=1, batch=16, device=device)
    assert max_abs_diff(with_ga, without) < 1e-6
    # and both equal the reference mSAM step (so neither is scaled by GA)
    assert max_abs_diff(with_ga, _reference_steps(lambda: tiny_bert(seed=4), data, device)) < 1e-6


def test_gradient_accumulation_token_level_loss(tmp_path, device):
    """A causal LM whose loss uses num_items_in_batch; micro-batches hold unequal numbers of tokens."""
    data = lm_dataset(32, seed=5)
    with_ga, _ = _train_ga(tmp_path, lambda: tiny_llama(seed=5), data, ga=2, batch=8, device=device)
    without, _ = _train_ga(tmp_path, lambda: tiny_llama(seed=5), data, ga=1, batch=16, device=device)
    assert max_abs_diff(with_ga, without) < 1e-6
    assert max_abs_diff(with_ga, _reference_steps(lambda: tiny_llama(seed=5), data, device, token_level=True)) < 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("make_model, make_data", [(tiny_bert, token_dataset), (tiny_llama, lm_dataset)], ids=["bert", "llama"])
def test_gradient_accumulation_under_mixed_precision(tmp_path, precision, make_model, make_data):
    """Gradient accumulation 2 x 8 equals 1 x 16 under bf16 autocast and under fp16 with a real GradScaler."""
    data = make_data(32, seed=4)
    results = []
    for ga, batch in [(2, 8), (1, 16)]:
        weights, trainer = _train_ga(tmp_path, lambda: make_model(seed=4), data, ga=ga, batch=batch, device="cuda",
                                     bf16=precision == "bf16", fp16=precision == "fp16")
        assert (trainer.accelerator.scaler is not None) == (precision == "fp16")
        results.append(weights)
    assert max_abs_diff(*results) < 1e-6


# --- f. bf16 trains; a non-finite ascent gradient under fp16 is skipped -----------------------------
def _learnable_dataset(n=64, seed=6):
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 8), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})


def test_bf16_autocast_trains(tmp_path, device):
    data = _learnable_dataset()
    args = sam_args(tmp_path, device, bf16=True, optim="adamw_torch", learning_rate=3e-3, max_steps=40, sam_rho=0.05,
                    sam_micro_batch_size=4, per_device_train_batch_size=16)
    trainer = SequentialSAMTrainer(model=tiny_bert(seed=6, hidden_size=32, intermediate_size=64), args=args, train_dataset=data)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (what an fp16 overflow of the ascent pass gives)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def test_non_finite_ascent_gradient_is_skipped_under_fp16(tmp_path):
    data = token_dataset(8, seed=7)
    model, reference = tiny_bert(seed=7), tiny_bert(seed=7)
    calls = {"n": 0}

    def overflow_on_ascent(module, inputs, output):  # forward passes alternate: ascent, descent
        calls["n"] += 1
        return _InfiniteGradient.apply(output) if calls["n"] % 2 == 1 else output

    model.classifier.register_forward_hook(overflow_on_ascent)
    args = sam_args(tmp_path, fp16=True, sam_rho=0.3, sam_micro_batch_size=4)
    trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=data)
    assert trainer.accelerator.mixed_precision == "fp16"
    trainer.train()
    assert trainer.state.log_history[0]["sam_skipped"] == 2 and calls["n"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Both perturbations skipped: the step is the plain (rho = 0) gradient step at w. (On CPU accelerate runs an
    # fp16 request without autocast or GradScaler; the scaled path is tested in test_msam and on the GPU.)
    gradient = reference_msam_gradient(reference, tensor_batch(data, 0, 8), 4, rho=0.0)
    reference_sgd_step(reference, gradient, lr=0.5)
    assert max_abs_diff(snapshot(model), snapshot(reference)) < 1e-6


@pytest.mark.cuda
def test_fp16_overflowing_ascent_is_skipped_with_grad_scaler(tmp_path):
    """With the real GradScaler: the skipped run equals a run whose perturbation is numerically nothing.

    The loop path, whose forwards alternate ascent/descent as the hook counts them (the vmap path's skip is
    tested in ``tests/update/test_vmap.py``)."""
    data = token_dataset(8, seed=7)
    calls = {"n": 0}

    def overflow_on_ascent(module, inputs, output):
        calls["n"] += 1
        return _InfiniteGradient.apply(output) if calls["n"] % 2 == 1 else output

    skipped_model, tiny_rho_model = tiny_bert(seed=7), tiny_bert(seed=7)
    skipped_model.classifier.register_forward_hook(overflow_on_ascent)
    common = dict(fp16=True, sam_micro_batch_size=4, sam_micro_batch_mode="loop")
    trainer = SequentialSAMTrainer(model=skipped_model, args=sam_args(tmp_path / "a", "cuda", sam_rho=0.3, **common),
                                   train_dataset=data)
    assert trainer.accelerator.scaler is not None
    trainer.train()
    assert trainer.state.log_history[0]["sam_skipped"] == 2
    assert all(torch.isfinite(p).all() for p in skipped_model.parameters())
    SequentialSAMTrainer(model=tiny_rho_model, args=sam_args(tmp_path / "b", "cuda", sam_rho=1e-30, **common),
                         train_dataset=data).train()
    assert max_abs_diff(snapshot(skipped_model), snapshot(tiny_rho_model)) < 1e-6


# --- g. PEFT LoRA: only adapters move --------------------------------------------------------------
def test_peft_lora_perturbs_and_updates_only_adapters(tmp_path):
    data = token_dataset(8, seed=8)
    model, reference = tiny_bert_lora(seed=8), tiny_bert_lora(seed=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    trainer = SequentialSAMTrainer(model=model, args=sam_args(tmp_path, sam_rho=0.2, sam_micro_batch_size=4), train_dataset=data)
    trainer.train()
    assert len(trainer._sam.params) == len(trainable)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if "lora_" in n)
    reference_sgd_step(reference, reference_msam_gradient(reference, tensor_batch(data, 0, 8), 4, 0.2), lr=0.5)
    assert max_abs_diff(snapshot(model), snapshot(reference)) < 1e-6


# --- h. resume from a checkpoint ends where an uninterrupted run ends -------------------------------
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    data = token_dataset(64, seed=9)
    common = dict(optim="adamw_torch", learning_rate=1e-2, max_steps=4, sam_rho=0.1, sam_micro_batch_size=4)
    straight = tiny_bert(seed=9)
    SequentialSAMTrainer(model=straight, args=sam_args(tmp_path / "a", **common), train_dataset=data).train()

    interrupted_args = sam_args(tmp_path / "b", save_strategy="steps", save_steps=2, **common)
    SequentialSAMTrainer(model=tiny_bert(seed=9), args=interrupted_args, train_dataset=data).train()
    resumed = tiny_bert(seed=99)  # different init: everything must come from the checkpoint
    SequentialSAMTrainer(model=resumed, args=interrupted_args, train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2")
    )
    a, b = snapshot(straight), snapshot(resumed)
    assert max_abs_diff(a, b) == 0.0


# --- i. bad configuration fails when the arguments are built ----------------------------------------
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"sam_rho": -0.1}, "sam_rho"),
        ({"sam_rho": float("nan")}, "sam_rho"),
        ({"sam_micro_batch_size": 0}, "sam_micro_batch_size"),
        ({"sam_micro_batch_size": 9}, "sam_micro_batch_size"),
        ({"sam_global": True, "sam_micro_batch_size": 4}, "sam_global"),
        ({"sam_global": True, "gradient_accumulation_steps": 2}, "sam_global"),
        ({"sam_adaptive_eta": -1.0}, "sam_adaptive_eta"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "deepspeed"),
        ({"fsdp": True, "fsdp_config": {"fsdp_version": 1}}, "fsdp_config"),
    ],
)
def test_bad_configuration_fails_at_argument_time(tmp_path, overrides, field):
    with pytest.raises(ValueError) as error:
        sam_args(tmp_path, **overrides)
    message = str(error.value)
    assert field in message and ("yet" in message or "set" in message or ">=" in message or "lower" in message)


def test_arguments_are_flags_and_are_saved(tmp_path):
    parser = HfArgumentParser(SAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sam_rho", "0.1", "--sam_micro_batch_size", "4", "--sam_adaptive",
         "--sam_adaptive_eta", "0.02", "--per_device_train_batch_size", "16"]
    )
    assert (args.sam_rho, args.sam_micro_batch_size, args.sam_adaptive, args.sam_adaptive_eta) == (0.1, 4, True, 0.02)
    assert args.sam_num_micro_batches == 4
    saved = args.to_dict()
    assert saved["sam_rho"] == 0.1 and saved["sam_micro_batch_size"] == 4 and saved["sam_global"] is False
    with pytest.raises(ValueError, match="sam_micro_batch_size"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--sam_micro_batch_size", "32"])


def test_plain_training_arguments_are_kept_with_mSAM_defaults(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, hub_token="secret", use_cpu=True,
                             report_to="none")
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8))
    assert trainer.args is args and trainer.args.hub_token == "secret"
    assert trainer.sam_options.sam_rho == 0.01 and trainer.sam_options.sam_micro_batch_size is None


# --- j. a batch smaller than the micro-batch size trains --------------------------------------------
def test_last_batch_smaller_than_micro_batch(tmp_path):
    data = token_dataset(10, seed=10)  # batches of 8 and 2; micro-batches 4, 4 and 2
    model, reference = tiny_bert(seed=10), tiny_bert(seed=10)
    trainer = SequentialSAMTrainer(
        model=model, args=sam_args(tmp_path, sam_rho=0.2, sam_micro_batch_size=4, max_steps=-1, num_train_epochs=1),
        train_dataset=data,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    for start, stop in [(0, 8), (8, 10)]:
        reference_sgd_step(reference, reference_msam_gradient(reference, tensor_batch(data, start, stop), 4, 0.2), lr=0.5)
    assert max_abs_diff(snapshot(model), snapshot(reference)) < 1e-6


def test_logged_loss_is_the_unperturbed_loss(tmp_path):
    data = token_dataset(8, seed=11)
    model = tiny_bert(seed=11)
    with torch.no_grad():
        expected = model(**tensor_batch(data, 0, 8)).loss.item()
    trainer = SequentialSAMTrainer(model=model, args=sam_args(tmp_path, sam_rho=0.5, sam_micro_batch_size=4), train_dataset=data)
    trainer.train()
    entry = trainer.state.log_history[0]
    assert entry["loss"] == pytest.approx(expected, rel=1e-5)
    assert entry["sam_perturbed_loss"] > entry["loss"]  # rho = 0.5 climbs the loss
    assert entry["sam_skipped"] == 0 and math.isfinite(entry["sam_ascent_grad_norm"])


# --- BatchNorm running statistics move once per micro-batch (the ascent pass), not twice -------------
class _BatchNormClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(14)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def forward(self, features, labels=None):
        logits = self.net(features)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def test_batchnorm_statistics_are_updated_by_the_ascent_pass_only(tmp_path):
    import copy

    import datasets

    g = torch.Generator().manual_seed(14)
    data = datasets.Dataset.from_dict({"features": torch.randn(8, 6, generator=g).tolist(),
                                       "labels": torch.randint(0, 2, (8,), generator=g).tolist()})
    model = _BatchNormClassifier()
    reference = copy.deepcopy(model)
    args = sam_args(tmp_path, sam_rho=0.5, sam_micro_batch_size=4, learning_rate=0.0)
    SequentialSAMTrainer(model=model, args=args, train_dataset=data).train()
    reference.train()
    with torch.no_grad():  # one train-mode pass per micro-batch at the unperturbed weights
        for start in (0, 4):
            reference(torch.tensor(data["features"][start : start + 4]))
    bn, ref_bn = model.net[1], reference.net[1]
    assert torch.equal(bn.num_batches_tracked, ref_bn.num_batches_tracked) and int(bn.num_batches_tracked) == 2
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=0, atol=1e-7)


# --- a ViT with one example per micro-batch (shared gradient storage) ---------------
@pytest.mark.parametrize("n, micro_batch_size", [(8, 1), (7, 3)], ids=["micro-batch-1", "uneven-3-3-1"])
def test_vit_one_example_micro_batches_match_reference(tmp_path, device, n, micro_batch_size):
    data = image_dataset(n, seed=15)
    model, reference = tiny_vit(seed=15), tiny_vit(seed=15).to(device)
    args = sam_args(tmp_path, device, sam_rho=0.05, sam_micro_batch_size=micro_batch_size, per_device_train_batch_size=n)
    SequentialSAMTrainer(model=model, args=args, train_dataset=data).train()
    gradient = reference_msam_gradient(reference, tensor_batch(data, 0, n, device), micro_batch_size, 0.05)
    reference_sgd_step(reference, gradient, lr=0.5)
    assert max_abs_diff(snapshot(model), snapshot(reference)) < 1e-6


# --- dropout masks are shared by the two passes of a micro-batch ------------------------
def _relative_update_difference(start, a, b):
    """``||(a - start) - (b - start)|| / ||b - start||`` over all parameters, on the CPU."""
    a, b = ({k: v.cpu() for k, v in weights.items()} for weights in (a, b))
    diff = math.sqrt(sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in start))
    step = math.sqrt(sum(float(((b[k] - start[k]).double() ** 2).sum()) for k in start))
    return diff / step


DROPOUT_CASES = {
    "bert": (lambda: tiny_bert(seed=16, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2),
             lambda: token_dataset(16, seed=16)),
    "vit": (lambda: tiny_vit(seed=16, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2),
            lambda: image_dataset(16, seed=16)),
    "llama": (lambda: tiny_llama(seed=16, attention_dropout=0.2), lambda: lm_dataset(16, seed=16)),
}


def _stock_run(tmp_path, model, data, device="cpu", **overrides):
    values = dict(sam_args(tmp_path, device, **overrides).to_dict())
    args = TrainingArguments(**{k: v for k, v in values.items() if k in TrainingArguments.__dataclass_fields__
                                and k not in ("hub_token",)})
    SequentialTrainer(model=model, args=args, train_dataset=data).train()
    return snapshot(model)


@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_dropout_tiny_rho_equals_stock_step(tmp_path, device, case):
    """With rho -> 0 the SAM step tends to the stock step only if the descent pass draws the stock pass's masks
    (on the GPU the CUDA generator draws them)."""
    make_model, make_data = DROPOUT_CASES[case]
    data = make_data()
    common = dict(per_device_train_batch_size=8, max_steps=2)
    start = snapshot(make_model())
    sam_model, stock_model = make_model(), make_model()
    SequentialSAMTrainer(model=sam_model, args=sam_args(tmp_path / "sam", device, sam_rho=1e-7, **common),
                         train_dataset=data).train()
    stock = _stock_run(tmp_path / "stock", stock_model, data, device, **common)
    assert _relative_update_difference(start, snapshot(sam_model), stock) < 1e-5


@pytest.mark.parametrize("case", ["bert", "vit"])
def test_dropout_step_matches_reference_that_replays_the_rng(tmp_path, case):
    make_model, make_data = DROPOUT_CASES[case]
    data = make_data()
    model, reference = make_model(), make_model()
    first_forward_rng = []
    model.register_forward_pre_hook(lambda module, inputs: first_forward_rng.append(torch.get_rng_state()))
    args = sam_args(tmp_path, sam_rho=0.3, sam_micro_batch_size=3, per_device_train_batch_size=8)
    SequentialSAMTrainer(model=model, args=args, train_dataset=data).train()

    reference.train()
    batch = tensor_batch(data, 0, 8)
    gradient = reference_msam_gradient(reference, batch, 3, 0.3, cpu_rng_state=first_forward_rng[0])
    unreplayed = reference_msam_gradient(reference, batch, 3, 0.3)
    reference_sgd_step(reference, gradient, lr=0.5)
    assert max_abs_diff(snapshot(model), snapshot(reference)) < 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(gradient, unreplayed)) > 1e-4  # the masks matter


# --- the loss weighting of the mSAM path against the stock Trainer ------------------------
def test_tiny_rho_equals_stock_trainer_token_loss_with_accumulation(tmp_path):
    """rho = 1e-7, no dropout: a causal LM with -100 holes, micro-batches of 4 and gradient accumulation 2 gives the
    stock step (which counts the step's tokens itself), so every micro-batch's weight is right."""
    data = lm_dataset(32, seed=17)
    common = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=2)
    start = snapshot(tiny_llama(seed=17))
    sam_model = tiny_llama(seed=17)
    args = sam_args(tmp_path / "sam", sam_rho=1e-7, sam_micro_batch_size=4, **common)
    SequentialSAMTrainer(model=sam_model, args=args, train_dataset=data).train()
    stock = _stock_run(tmp_path / "stock", tiny_llama(seed=17), data, **common)
    assert _relative_update_difference(start, snapshot(sam_model), stock) < 1e-5
    labels = torch.tensor(data["labels"])[:, 1:]
    items = [int(labels[k : k + 4].ne(-100).sum()) for k in range(0, 32, 4)]
    assert len(set(items)) > 1  # unequal micro-batches: equal weights would not give the stock step


# --- the first sam_perturbed_loss after a resume covers one logging window --------------
def test_perturbed_loss_logged_after_resume_equals_uninterrupted_run(tmp_path):
    data = token_dataset(64, seed=18)
    common = dict(optim="adamw_torch", learning_rate=1e-2, max_steps=4, sam_rho=0.1, sam_micro_batch_size=4)
    straight = SequentialSAMTrainer(model=tiny_bert(seed=18), args=sam_args(tmp_path / "a", **common), train_dataset=data)
    straight.train()

    interrupted_args = sam_args(tmp_path / "b", save_strategy="steps", save_steps=2, **common)
    SequentialSAMTrainer(model=tiny_bert(seed=18), args=interrupted_args, train_dataset=data).train()
    resumed = SequentialSAMTrainer(model=tiny_bert(seed=98), args=interrupted_args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))

    def perturbed_losses(trainer):
        return {e["step"]: e["sam_perturbed_loss"] for e in trainer.state.log_history if "sam_perturbed_loss" in e}

    expected, got = perturbed_losses(straight), perturbed_losses(resumed)
    assert set(got) >= {3, 4}
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-6)
