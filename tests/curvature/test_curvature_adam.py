"""Adam/AdamW preconditioned sharpness: against a dense P^-1/2 H P^-1/2 of a tiny model (second moments
recomputed in the test from the recorded gradients), the checkpoint's optimizer.pt against the live
optimizer, the threshold against an exact simulation of Adam with a frozen preconditioner, the preconditioner
against the one a real Adam/AdamW step divides by (amsgrad, foreach, fused), the refusal of every other optimizer,
and the learning rate the verdicts judge (the last step's, from the schedule's formula)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from builders import TinyClassifier, classifier_batches, tiny_bert, tiny_vit, token_dataset
from references import dense_hessian

from hf_msam.curvature.adam import (
    NOT_ANALYSED,
    adam_stability_threshold,
    adam_state_from_optimizer,
    adam_state_from_state_dict,
    preconditioned_lambda_max,
)
from hf_msam.curvature.operators import HessianOperator, flatten, trainable_parameters


def test_preconditioned_lambda_max_matches_dense_on_a_tiny_model():
    model = TinyClassifier(classes=3, seed=4)
    batches = classifier_batches(n=20, classes=3, chunk=20)
    beta1, beta2, eps = 0.8, 0.95, 1e-6
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(beta1, beta2), eps=eps, weight_decay=0.01)
    v = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for step in range(3):
        optimizer.zero_grad()
        model(**batches[0]).loss.backward()
        g = flatten([p.grad for p in model.parameters()]).double()
        v = beta2 * v + (1 - beta2) * g**2
        optimizer.step()
    p_diag = (v / (1 - beta2**3)).sqrt() + eps
    h = dense_hessian(model, batches).double()
    want = float(torch.linalg.eigvalsh(h / p_diag.sqrt()[:, None] / p_diag.sqrt()[None, :])[-1])
    state = adam_state_from_optimizer(optimizer, trainable_parameters(model))
    assert torch.allclose(state.preconditioner.double(), p_diag, rtol=1e-5)
    assert (state.beta1, state.learning_rate, state.step) == (beta1, 0.05, 3)
    op = HessianOperator(model, batches)
    got = preconditioned_lambda_max(op.matvec, state.preconditioner, max_iterations=60, tol=1e-6)
    assert got.eigenvalues[0] == pytest.approx(want, rel=1e-4)
    assert adam_stability_threshold(0.9, 0.01) == pytest.approx(3800.0)


@pytest.mark.parametrize("factor, diverges", [(0.9, False), (1.1, True)])
def test_threshold_predicts_adam_with_a_frozen_preconditioner(factor, diverges):
    # quadratic L = w^T H w / 2, gradient H w; Adam with P frozen is m <- b1 m + (1 - b1) H w, w <- w - eta P^-1 m
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    h = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    p_diag = torch.rand(6, generator=g, dtype=torch.float64) + 0.2
    beta1 = 0.9
    lam = preconditioned_lambda_max(lambda v: (h @ v.double()).float(), p_diag.float(), max_iterations=6).eigenvalues[0]
    # eta at which lambda_max(P^-1 H) equals the threshold, times factor
    eta = factor * (2 + 2 * beta1) / ((1 - beta1) * lam)
    assert (lam >= adam_stability_threshold(beta1, eta)) == diverges
    w = torch.randn(6, generator=g, dtype=torch.float64)
    m = torch.zeros(6, dtype=torch.float64)
    for _ in range(4000):
        m = beta1 * m + (1 - beta1) * (h @ w)
        w = w - eta * m / p_diag
    norm = float(w.norm())  # inf or nan once it has overflowed
    assert (not norm < 1e3) == diverges and (norm < 1e-3) != diverges


def test_checkpoint_optimizer_state_equals_the_live_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_bert(seed=3)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_steps=2,
                             save_strategy="steps", report_to=[], use_cpu=True, learning_rate=1e-3,
                             weight_decay=0.1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(8, seed=1))
    trainer.train()
    live = adam_state_from_optimizer(trainer.optimizer, trainable_parameters(model))
    saved = torch.load(os.path.join(tmp_path, "checkpoint-2", "optimizer.pt"), weights_only=True)
    loaded = adam_state_from_state_dict(saved, model)
    assert torch.equal(live.preconditioner, loaded.preconditioner)
    # the default linear decay over 2 steps: the groups' rate after the last step is 0, initial_lr the peak
    assert (loaded.learning_rate, loaded.learning_rate_peak, loaded.step) == (0.0, pytest.approx(1e-3), 2)
    with pytest.raises(ValueError, match="not this model's|trainable ones"):
        adam_state_from_state_dict(saved, tiny_bert(seed=3, hidden_size=8, intermediate_size=16))


def _tiny_vit():
    return tiny_vit(3, seed=1, num_channels=3)


def _images(n: int = 8):
    g = torch.Generator().manual_seed(2)
    return [{"pixel_values": torch.randn(3, 8, 8, generator=g), "labels": int(i % 3)} for i in range(n)]


@pytest.mark.parametrize("architecture", ["bert", "vit"])
def test_report_adam_sharpness_equals_arnoldi_on_the_unsymmetrised_product(architecture):
    # an independent route: Arnoldi (scipy) on P^-1 H itself (no similarity transform), after AdamW steps
    from scipy.sparse.linalg import LinearOperator, eigs
    from transformers import default_data_collator

    from hf_msam import sharpness_report

    if architecture == "bert":
        model, data = tiny_bert(seed=6), [dict(x) for x in token_dataset(8, seed=6)]
    else:
        model, data = _tiny_vit(), _images()
    batch = default_data_collator(data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    state = adam_state_from_optimizer(optimizer, trainable_parameters(model))
    report = sharpness_report(model, data, num_examples=8, measures=["adam"], adam_state=state, lanczos_iterations=40,
                              lanczos_tol=1e-6, learning_rate=1e-2, train_batch_size=4).to_dict()
    op = HessianOperator(model, [batch])

    def product(v):  # P^-1 H v, non-symmetric: ARPACK's Arnoldi iteration, not Lanczos
        vector = torch.from_numpy(v).float()
        return (op.matvec(vector) / state.preconditioner).double().numpy()

    arnoldi = eigs(LinearOperator((op.dim, op.dim), matvec=product, dtype=float), k=1, which="LR", tol=1e-8,
                   v0=torch.ones(op.dim, dtype=torch.float64).numpy())[0]
    assert report["adam_preconditioned_lambda_max"] == pytest.approx(float(arnoldi.real[0]), rel=1e-4)
    assert report["examples_used"]["adam"] == "probe[0:8]" and report["errors"] == []


class _TwoTensorQuadratic(torch.nn.Module):
    """L = sum_k h_k w_k^2 / 2 over two parameter tensors (no bias names: one weight-decay group)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.first = torch.nn.Parameter(torch.randn(3, 2, generator=g))
        self.second = torch.nn.Parameter(torch.randn(4, generator=g))
        self.curvature = [torch.rand(3, 2, generator=g) + 0.5, torch.rand(4, generator=g) + 0.5]

    def gradients(self, scale: float) -> list[torch.Tensor]:
        return [scale * h * p.detach() for h, p in zip(self.curvature, (self.first, self.second))]


def _preconditioner_of_one_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> torch.Tensor:
    """The per-coordinate P that ``optimizer.step()`` divides by, read off the update itself: with a zero gradient
    and no weight decay the step is  -lr * m_hat / P  with m_hat = b1 m / (1 - b1^(t+1)), m the first moment."""
    beta1 = optimizer.param_groups[0]["betas"][0]
    lr = optimizer.param_groups[0]["lr"]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    t = int(float(optimizer.state[params[0]]["step"]))
    parts = []
    for p, w in zip(params, before):
        m_hat = optimizer.state[p]["exp_avg"].double() / (1 - beta1**t)
        parts.append((-lr * m_hat / (p.detach().double() - w.double())).reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("optimizer_class, kernel", [(torch.optim.Adam, {}), (torch.optim.AdamW, {"foreach": True}),
                                                    (torch.optim.AdamW, {"fused": True})])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_preconditioner_is_the_one_the_optimizer_step_divides_by(optimizer_class, kernel, amsgrad):
    # gradients that shrink 100-fold: AMSGrad's max_exp_avg_sq keeps the early, large second moments. The
    # foreach and fused kernels (the Trainer's adamw_torch / adamw_torch_fused) must divide by the same P.
    model = _TwoTensorQuadratic()
    params = [model.first, model.second]
    optimizer = optimizer_class(params, lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.0, amsgrad=amsgrad,
                                **kernel)
    for step in range(30):
        for p, grad in zip(params, model.gradients(0.85**step)):
            p.grad = grad
        optimizer.step()
    want = _preconditioner_of_one_step(optimizer, params)  # the preconditioner of step 31
    live = adam_state_from_optimizer(optimizer, params)  # the state after step 31
    assert torch.allclose(live.preconditioner.double(), want, rtol=1e-4)
    saved = adam_state_from_state_dict(optimizer.state_dict(), model)
    assert torch.equal(saved.preconditioner, live.preconditioner) and saved.step == live.step == 31


class _AdamSubclass(torch.optim.Adam):
    pass


class AdamW8bit(torch.optim.AdamW):  # stands in for bitsandbytes' class (not installed): judged by its module
    __module__ = "bitsandbytes.optim.adamw"


def _transformers_adafactor(params):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False)


OTHER_OPTIMIZERS = {
    "NAdam": (lambda ps: torch.optim.NAdam(ps, lr=1e-2), "Nesterov"),
    "RAdam": (lambda ps: torch.optim.RAdam(ps, lr=1e-2), "rectification"),
    "Adamax": (lambda ps: torch.optim.Adamax(ps, lr=1e-2), "infinity-norm"),
    "Adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=1e-2), "sum of all past squared"),
    "RMSprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-2), "no bias correction"),
    "SGD momentum": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), "no preconditioner"),
    "torch Adafactor": (lambda ps: torch.optim.Adafactor(ps, lr=1e-2), "factors the second moments"),
    "transformers Adafactor": (_transformers_adafactor, "factors the second moments"),
    "Adam subclass": (lambda ps: _AdamSubclass(ps, lr=1e-2), "subclasses torch.optim.Adam"),
    "bitsandbytes 8-bit": (lambda ps: AdamW8bit(ps, lr=1e-2), "quantised"),
    "Adam maximize": (lambda ps: torch.optim.Adam(ps, lr=1e-2, maximize=True), "maximize=True"),
}


@pytest.mark.parametrize("name", list(OTHER_OPTIMIZERS))
def test_other_optimizers_get_no_adam_analysis_and_a_reason(name):
    from hf_msam.curvature.hook import adam_state_of

    build, reason = OTHER_OPTIMIZERS[name]
    model = _TwoTensorQuadratic()
    params = [model.first, model.second]
    optimizer = build(params)
    for step in range(2):
        for p, grad in zip(params, model.gradients(1.0)):
            p.grad = grad
        optimizer.step()
    with pytest.raises(ValueError, match=reason):
        adam_state_from_optimizer(optimizer, params)
    said = adam_state_of(optimizer, model)
    assert isinstance(said, str) and reason in said
    if name in ("Adam subclass", "bitsandbytes 8-bit"):
        return  # their saved states carry Adam's keys (the real bitsandbytes one: see the next test)
    with pytest.raises(ValueError, match="not torch.s Adam|Nesterov|maximize"):  # its checkpoint too
        adam_state_from_state_dict(optimizer.state_dict(), model)


def test_plain_sgd_needs_no_adam_reason_and_a_bitsandbytes_state_dict_is_refused():
    from hf_msam.curvature.hook import adam_state_of

    model = _TwoTensorQuadratic()
    assert adam_state_of(torch.optim.SGD([model.first, model.second], lr=0.1), model) is None
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "params": [0, 1]}]
    state = {i: {"state1": torch.zeros(3, dtype=torch.uint8), "state2": torch.zeros(3, dtype=torch.uint8)}
             for i in range(2)}
    with pytest.raises(ValueError, match="bitsandbytes"):
        adam_state_from_state_dict({"state": state, "param_groups": groups}, model)


def test_a_trainer_run_with_nadam_reports_why_there_is_no_adam_analysis(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_msam import SharpnessCallback

    model = tiny_bert(seed=5)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    callback = SharpnessCallback(num_examples=4, measures=["eigenvalues", "adam"], lanczos_iterations=3, top_k=1,
                                 batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(8, seed=5), callbacks=[callback],
                      optimizers=(torch.optim.NAdam(model.parameters(), lr=1e-3), None))
    trainer.train()
    report = callback.result.report.to_dict()
    assert report["lambda_max"] > 0 and report["adam_preconditioned_lambda_max"] is None
    assert report["adam_edge_ratio"] is None and report["adam_optimizer"] is None
    assert [e for e in report["errors"] if e.startswith("adam: ")] == [
        f"adam: optimizer: torch.optim.nadam.NAdam: {NOT_ANALYSED['NAdam']}; no Adam analysis"]


def test_report_warns_when_the_default_measures_meet_an_optimizer_without_adam_analysis():
    from hf_msam import sharpness_report

    model = TinyClassifier(classes=3, seed=4)
    data = [{"features": f, "labels": y} for b in classifier_batches(n=8, classes=3, chunk=8)
            for f, y in zip(b["features"], b["labels"])]
    report = sharpness_report(model, data, num_examples=8, measures=None, lanczos_iterations=3, top_k=1,
                              trace_probes=2, adam_unavailable="optimizer: RAdam ...").to_dict()
    assert "adam: optimizer: RAdam ..." in report["warnings"] and report["adam_preconditioned_lambda_max"] is None
    assert not any(e.startswith("adam") for e in report["errors"])


# The learning rate in force: transformers' linear schedule with warm-up gives step s (0-based) the rate
# peak * s / warmup while s < warmup, then peak * (steps - s) / (steps - warmup).
PEAK, STEPS, WARMUP = 1e-3, 4, 1


def _linear_schedule_rate(s: int) -> float:
    return PEAK * s / WARMUP if s < WARMUP else PEAK * (STEPS - s) / (STEPS - WARMUP)


@pytest.mark.parametrize("entry", ["mixin", "callback"])
def test_a_trainer_report_judges_the_learning_rate_of_the_last_step(tmp_path, entry):
    from transformers import Trainer, TrainingArguments
    from builders import sam_args

    from hf_msam import SAMTrainer, SharpnessCallback

    schedule = dict(max_steps=STEPS, learning_rate=PEAK, lr_scheduler_type="linear", warmup_steps=WARMUP)
    options = dict(num_examples=4, measures=["eigenvalues", "adam"], lanczos_iterations=3, top_k=1, batch_size=4)
    train, model = token_dataset(8, seed=8), tiny_bert(seed=8)
    if entry == "mixin":
        args = sam_args(tmp_path, optim="adamw_torch", per_device_train_batch_size=4, sam_rho=0.05,
                        sharpness_report=True, **{f"sharpness_{k}": v for k, v in options.items()}, **schedule)
        trainer = SAMTrainer(model=model, args=args, train_dataset=train)
        trainer.train()
        report = trainer.sharpness_result.report.to_dict()
    else:
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                 save_strategy="no", disable_tqdm=True, **schedule)
        callback = SharpnessCallback(**options)
        trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
        trainer.train()
        report = callback.result.report.to_dict()
    final = _linear_schedule_rate(STEPS - 1)  # a third of the peak
    assert report["learning_rate"] == pytest.approx(final) and report["learning_rate_final"] == pytest.approx(final)
    assert report["learning_rate_peak"] == pytest.approx(PEAK) and "last optimizer step" in report["learning_rate_source"]
    assert report["adam_stability_threshold"] == pytest.approx(adam_stability_threshold(0.9, final))
    assert report["adam_edge_ratio"] == pytest.approx(report["adam_preconditioned_lambda_max"] * (1 - 0.9) * final / 3.8)


def test_cli_takes_the_learning_rate_in_force_from_the_checkpoint(tmp_path, capsys):
    from builders import save_text_classifier, write_review_csv
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_msam.curvature.cli import main

    model, tokenizer = save_text_classifier(tmp_path / "base")
    data = tmp_path / "reviews.csv"
    write_review_csv(data, ["0", "1"])
    encoded = tokenizer(["good film"] * 4 + ["bad plot"] * 4)
    train = [{"input_ids": ids, "labels": i % 2} for i, ids in enumerate(encoded["input_ids"])]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, save_strategy="steps",
                             save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, max_steps=STEPS,
                             learning_rate=PEAK, lr_scheduler_type="linear", warmup_steps=WARMUP)
    Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer)).train()
    flags = ["--data", str(data), "--text_column", "review", "--label_column", "sentiment", "--train_batch_size", "4",
             "--num_examples", "6", "--measures", "eigenvalues", "adam", "--lanczos_iterations", "3", "--top_k", "1",
             "--quiet"]
    output = tmp_path / "report.json"
    assert main([str(tmp_path / "run" / "checkpoint-2"), "--output", str(output), *flags]) == 0
    report = json.loads(output.read_text())
    # the checkpoint was saved after two steps: its optimizer holds the rate of the next step, s = 2
    assert report["learning_rate"] == pytest.approx(_linear_schedule_rate(2)) and report["errors"] == []
    assert report["learning_rate_peak"] == pytest.approx(PEAK) and "optimizer.pt" in report["learning_rate_source"]
    assert report["adam_stability_threshold"] == pytest.approx(adam_stability_threshold(0.9, _linear_schedule_rate(2)))
    assert f"eta: {report['learning_rate_source']} (schedule peak 0.001)" in capsys.readouterr().out
    # the last checkpoint of a schedule that decays to zero holds rate 0: no threshold, say what to pass
    assert main([str(tmp_path / "run" / "checkpoint-4"), "--output", str(output), *flags]) == 2
    assert "--learning_rate" in capsys.readouterr().err
    assert main([str(tmp_path / "run" / "checkpoint-4"), "--output", str(output), "--learning_rate", "3e-4",
                 *flags]) == 0
    report = json.loads(output.read_text())
    assert report["learning_rate"] == 3e-4 and report["learning_rate_source"] == "--learning_rate"
    assert report["learning_rate_final"] == 0.0 and report["learning_rate_peak"] == pytest.approx(PEAK)


def test_report_options_judge_the_rate_of_the_last_step_and_refuse_to_pick_among_groups():
    from transformers import TrainingArguments

    from hf_msam.curvature.arguments import SharpnessArguments, report_options

    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", learning_rate=0.1)
    options = report_options(SharpnessArguments(), args, 10, last_step_rates=[0.02, 0.02])
    assert (options["learning_rate"], options["learning_rate_final"], options["learning_rate_peak"]) == (0.02, 0.02, 0.1)
    before = report_options(SharpnessArguments(), args, 10)  # no step taken yet: the peak stands in, and says so
    assert before["learning_rate"] == 0.1 and "no optimizer step" in before["learning_rate_source"]
    mixed = report_options(SharpnessArguments(), args, 10, last_step_rates=[0.02, 0.01])
    assert "learning_rate" not in mixed and "different rates [0.01, 0.02]" in mixed["learning_rate_source"]


def test_adam_with_coupled_weight_decay_is_judged_on_the_objective_it_descends():
    # torch.optim.Adam(weight_decay=wd) adds wd * w to the gradient: it descends L + wd ||w||^2 / 2, whose Hessian
    # is H + wd I. Two parameter groups (wd on the weights only, as the Trainer splits them) and a dense reference.
    from hf_msam import sharpness_report

    model = TinyClassifier(classes=3, seed=2)
    batches = classifier_batches(n=10, classes=3, chunk=10)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    wd = 0.5
    optimizer = torch.optim.Adam([{"params": weights, "weight_decay": wd}, {"params": biases, "weight_decay": 0.0}],
                                 lr=0.05, betas=(0.9, 0.99))
    for _ in range(3):
        optimizer.zero_grad()
        model(**batches[0]).loss.backward()
        optimizer.step()
    state = adam_state_from_optimizer(optimizer, trainable_parameters(model))
    assert state.optimizer == "Adam"
    decay = torch.cat([torch.full((p.numel(),), wd if n.endswith("weight") else 0.0, dtype=torch.float64)
                       for n, p in model.named_parameters()])
    h = dense_hessian(model, batches).double() + torch.diag(decay)
    scale = state.preconditioner.double().rsqrt()
    want = float(torch.linalg.eigvalsh(scale[:, None] * h * scale[None, :])[-1])
    data = [{"features": f, "labels": y} for f, y in zip(batches[0]["features"], batches[0]["labels"])]
    report = sharpness_report(model, data, num_examples=10, measures=["adam"], adam_state=state, learning_rate=0.05,
                              lanczos_iterations=60, lanczos_tol=1e-6, batch_size=10).to_dict()
    assert report["adam_preconditioned_lambda_max"] == pytest.approx(want, rel=1e-4) and report["errors"] == []


def test_a_report_at_an_evaluation_judges_the_step_just_taken(tmp_path):
    from builders import sam_args

    from hf_msam import SAMTrainer

    options = dict(num_examples=4, measures=["eigenvalues", "adam"], lanczos_iterations=3, top_k=1, batch_size=4)
    args = sam_args(tmp_path, optim="adamw_torch", per_device_train_batch_size=4, sam_rho=0.05, max_steps=STEPS,
                    learning_rate=PEAK, lr_scheduler_type="linear", warmup_steps=WARMUP, eval_strategy="steps",
                    eval_steps=3, sharpness_at_eval=True, **{f"sharpness_{k}": v for k, v in options.items()})
    train = token_dataset(8, seed=9)
    trainer = SAMTrainer(model=tiny_bert(seed=9), args=args, train_dataset=train, eval_dataset=train)
    trainer.train()
    entries = {e["step"]: e for e in trainer.state.log_history if "eval_sharpness_learning_rate" in e}
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    assert sorted(entries) == [3, 4]  # eval_steps, and the Trainer's evaluation at the last step
    for step, entry in entries.items():
        # the evaluation after step k judges the rate of that step (s = k - 1, 0-based), the one the Trainer logs
        rate = _linear_schedule_rate(step - 1)
        assert entry["eval_sharpness_learning_rate"] == pytest.approx(rate) and logged[step] == pytest.approx(rate)
        assert entry["eval_sharpness_adam_stability_threshold"] == pytest.approx(adam_stability_threshold(0.9, rate))
        assert entry["eval_sharpness_learning_rate_peak"] == PEAK
