"""The curvature report inside training: log_history, TensorBoard, sharpness.json, the
model card, the model saved first, the stock Trainer + callback, and bf16 training with an fp32 report.

The reference for every number is ``sharpness_report`` run directly on a fresh float32 model loaded from the
saved weights, on the same training set: the plumbing must neither change the weights nor the data."""

from __future__ import annotations

import glob
import json
import logging
import os

import pytest
import torch
from builders import sam_args, tiny_bert, token_dataset
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import hf_msam.curvature.hook as hook
from hf_msam import SAMTrainer, SharpnessCallback, sharpness_report

# Cheap but complete enough: Lanczos, Hutchinson and m-sharpness on 8 probe examples.
OPTIONS = dict(num_examples=8, measures=["eigenvalues", "trace", "m_sharpness"], lanczos_iterations=4, top_k=2,
               trace_probes=2, batch_size=8)
SHARPNESS_ARGS = {f"sharpness_{k}": v for k, v in OPTIONS.items()}
TIMING = "seconds"


def _without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if TIMING not in k}


def _reference(output_dir, train_dataset, **verdict) -> dict:
    """The report of the saved weights on a fresh fp32 model, computed directly."""
    model = tiny_bert(seed=99)  # different initial weights: everything must come from the file
    model.load_state_dict(load_file(os.path.join(output_dir, "model.safetensors")))
    return _without_timings(sharpness_report(model, train_dataset, progress=False, **OPTIONS, **verdict).to_dict())


def _rates_of_a_run(peak: float, last_step: float) -> dict:
    """What a report made in training records beside the learning rate it judges (the last step's)."""
    return dict(learning_rate_peak=peak, learning_rate_final=last_step,
                learning_rate_source="the rate of the last optimizer step")


def _assert_reports_close(actual: dict, expected: dict, rel: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert actual[key] == pytest.approx(value, rel=rel, abs=1e-9), key
        elif isinstance(value, list) and value and isinstance(value[0], float):
            assert actual[key] == pytest.approx(value, rel=rel, abs=1e-9), key
        else:
            assert actual[key] == value, key


# --- SAMTrainer: sharpness_report + sharpness_at_eval, TensorBoard on ------------------------------------
@pytest.fixture(scope="module")
def sam_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sam_run")
    train, evaluation = token_dataset(24, seed=5), token_dataset(8, seed=6)
    args = sam_args(out, max_steps=2, sam_rho=0.1, sam_micro_batch_size=4, report_to="tensorboard",
                    eval_strategy="steps", eval_steps=1, sharpness_report=True, sharpness_at_eval=True,
                    **SHARPNESS_ARGS)
    trainer = SAMTrainer(model=tiny_bert(seed=5), args=args, train_dataset=train, eval_dataset=evaluation)
    trainer.train()
    return trainer, train, out


def test_final_entry_with_eval_loss_holds_the_report(sam_run):
    trainer, train, out = sam_run
    history = trainer.state.log_history
    final = [e for e in history if "eval_loss" in e][-1]
    assert final is history[-1] and "train_runtime" in history[-2]  # the final report comes after training
    expected = _reference(out, train, learning_rate=0.5, train_batch_size=8, num_train_examples=24,
                          rho=0.1, m=4, optimizer="sgd")
    assert final["eval_sharpness_lambda_max"] == pytest.approx(expected["lambda_max"], rel=1e-6)
    assert final["eval_sharpness_trace"] == pytest.approx(expected["trace"], rel=1e-6)
    assert final["eval_sharpness_m_sharpness"] == pytest.approx(expected["m_sharpness"], rel=1e-6)
    assert final["eval_sharpness_m_sharpness_rho"] == 0.1 and final["eval_sharpness_m_sharpness_m"] == 4
    assert final["eval_sharpness_train_batch_size"] == 8 and final["eval_sharpness_num_train_examples"] == 24
    assert final["step"] == trainer.state.global_step == 2


def test_every_evaluation_holds_a_report_of_its_own_weights(sam_run):
    trainer, _, _ = sam_run
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evaluations) == 3  # steps 1, 2 and the final entry
    assert all(isinstance(e.get("eval_sharpness_lambda_max"), float) for e in evaluations)
    # step 1 and step 2 see different weights; the final entry sees the weights of step 2
    assert evaluations[0]["eval_sharpness_lambda_max"] != evaluations[1]["eval_sharpness_lambda_max"]
    assert evaluations[1]["eval_sharpness_lambda_max"] == evaluations[2]["eval_sharpness_lambda_max"]


def test_tensorboard_event_file_holds_the_numbers(sam_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _, out = sam_run
    directories = {os.path.dirname(p) for p in glob.glob(os.path.join(out, "runs", "**", "events.out.tfevents.*"),
                                                         recursive=True)}
    assert len(directories) == 1
    events = EventAccumulator(directories.pop())
    events.Reload()
    values = [(s.step, s.value) for s in events.Scalars("eval/sharpness_lambda_max")]
    logged = [(e["step"], e["eval_sharpness_lambda_max"]) for e in trainer.state.log_history
              if "eval_sharpness_lambda_max" in e]
    assert [step for step, _ in values] == [step for step, _ in logged]
    assert [v for _, v in values] == pytest.approx([v for _, v in logged], rel=1e-6)  # stored as float32


def test_json_and_plot_are_the_final_report(sam_run):
    trainer, _, out = sam_run
    with open(os.path.join(out, "sharpness.json")) as handle:
        written = json.load(handle)
    assert written == json.loads(json.dumps(trainer.sharpness_result.report.to_dict()))
    assert written["lambda_max"] == trainer.state.log_history[-1]["eval_sharpness_lambda_max"]
    with open(os.path.join(out, "sharpness.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_model_card_shows_the_report(sam_run):
    trainer, _, out = sam_run
    trainer.create_model_card(model_name="tiny")
    with open(os.path.join(out, "README.md")) as handle:
        card = handle.read()
    value = trainer.state.log_history[-1]["eval_sharpness_lambda_max"]
    assert f"| Largest Hessian eigenvalue lambda_max | {value:.4f}".rstrip("0").rstrip(".") in card


def test_saved_model_is_the_final_model(sam_run):
    trainer, _, out = sam_run
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in trainer.model.state_dict().items() if k in saved)


# --- a failing report costs nothing --------------------------------------------------------------------
def test_failing_report_keeps_the_saved_model_and_warns(tmp_path, monkeypatch, caplog):
    seen_model_file: list[bool] = []

    def broken(*args, **kwargs):
        seen_model_file.append(os.path.isfile(tmp_path / "model.safetensors"))
        raise RuntimeError("estimator exploded")

    monkeypatch.setattr(hook, "sharpness_report", broken)
    (tmp_path / "sharpness.json").write_text("{}")  # a previous run's report must not survive
    args = sam_args(tmp_path, sam_rho=0.1, sharpness_report=True, **SHARPNESS_ARGS)
    trainer = SAMTrainer(model=tiny_bert(seed=7), args=args, train_dataset=token_dataset(16, seed=7),
                         eval_dataset=token_dataset(8, seed=8))
    with caplog.at_level(logging.WARNING, logger="hf_msam.curvature.hook"):
        trainer.train()
    assert seen_model_file == [True]  # saved before the report started
    assert "estimator exploded" in caplog.text
    final = trainer.state.log_history[-1]
    assert "eval_loss" in final and "estimator exploded" in final["eval_sharpness_error"]
    assert not (tmp_path / "sharpness.json").exists()
    assert trainer.sharpness_result.report is None


# --- stock Trainer + callback --------------------------------------------------------------------------
def test_stock_trainer_with_callback(tmp_path, capfd):
    train = token_dataset(16, seed=9)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, learning_rate=0.3,
                             optim="sgd", report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=False)
    callback = SharpnessCallback(**OPTIONS)
    trainer = Trainer(model=tiny_bert(seed=9), args=args, train_dataset=train, callbacks=[callback])
    trainer.train()
    assert "sharpness report: 100%" in capfd.readouterr().err  # the tqdm bar ran to its end
    expected = _reference(tmp_path, train, learning_rate=0.3, train_batch_size=8, num_train_examples=16,
                          optimizer="sgd", steps_trained=1, **_rates_of_a_run(peak=0.3, last_step=0.3))
    _assert_reports_close(_without_timings(callback.result.report.to_dict()), expected)
    entry = trainer.state.log_history[-1]
    assert entry["eval_sharpness_lambda_max"] == callback.result.report.lambda_max
    assert entry["step"] == 1
    with open(tmp_path / "sharpness.json") as handle:
        assert json.load(handle) == json.loads(json.dumps(callback.result.report.to_dict()))
    assert (tmp_path / "sharpness.png").is_file()


def test_callback_rejects_unknown_options_before_training():
    with pytest.raises(TypeError, match="sharpness_lanczos_iters"):
        SharpnessCallback(lanczos_iters=3)


# --- bf16 training, fp32 report ------------------------------------------------------------------------
def test_bf16_trained_model_gets_an_fp32_report(tmp_path):
    train = token_dataset(16, seed=10)
    args = sam_args(tmp_path, bf16=True, sam_rho=0.1, sharpness_report=True, **SHARPNESS_ARGS)
    trainer = SAMTrainer(model=tiny_bert(seed=10), args=args, train_dataset=train)
    trainer.train()
    model = trainer.model
    assert hasattr(model, "_original_forward")  # accelerate patched forward with bf16 autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    report = trainer.sharpness_result.report.to_dict()
    expected = _reference(tmp_path, train, learning_rate=0.5, train_batch_size=8, num_train_examples=16,
                          rho=0.1, m=8, optimizer="sgd", steps_trained=trainer.state.global_step,
                          **_rates_of_a_run(peak=0.5, last_step=0.5))
    _assert_reports_close(_without_timings(report), expected)
    # the check is sharp: the patched forward still computes in bf16, far from the 1e-6 tolerance above
    batch = {k: torch.tensor(v) for k, v in train[:8].items()}
    with torch.no_grad():
        autocast_logits = model(**batch).logits
        fp32_logits = model._original_forward(**batch).logits
    assert (autocast_logits - fp32_logits).abs().max() > 1e-4 * fp32_logits.abs().max()


# --- AdamW: the preconditioned sharpness from the Trainer's own optimizer; the verdict in TensorBoard ------
def test_adamw_run_reports_the_preconditioned_sharpness_and_tensorboard_holds_the_verdict(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hf_msam.curvature.adam import adam_stability_threshold, adam_state_from_optimizer
    from hf_msam.curvature.operators import trainable_parameters

    train = token_dataset(16, seed=11)
    options = {**SHARPNESS_ARGS, "sharpness_measures": ["eigenvalues", "coherence", "adam"]}
    args = sam_args(tmp_path, max_steps=2, optim="adamw_torch", learning_rate=1e-3, sam_rho=0.05,
                    sharpness_report=True, report_to="tensorboard", **options)
    trainer = SAMTrainer(model=tiny_bert(seed=11), args=args, train_dataset=train)
    trainer.train()
    report = trainer.sharpness_result.report.to_dict()
    state = adam_state_from_optimizer(trainer.optimizer, trainable_parameters(trainer.model))
    expected = sharpness_report(trainer.model, train, progress=False, **OPTIONS | {"measures": ["adam"]},
                                adam_state=state, learning_rate=1e-3).to_dict()
    assert report["adam_preconditioned_lambda_max"] == pytest.approx(expected["adam_preconditioned_lambda_max"])
    assert report["adam_stability_threshold"] == pytest.approx(adam_stability_threshold(0.9, 1e-3))
    assert report["adam_edge_ratio"] == pytest.approx(
        report["adam_preconditioned_lambda_max"] / report["adam_stability_threshold"])
    assert report["stability_verdict"] in ("stable", "unstable", "inconclusive") and report["stability_reason"]
    final = trainer.state.log_history[-1]
    assert final["eval_sharpness_stability_verdict"] == report["stability_verdict"]
    assert final["eval_sharpness_stability_reason"] == report["stability_reason"]
    directory = os.path.dirname(glob.glob(os.path.join(tmp_path, "runs", "**", "events.out.tfevents.*"),
                                          recursive=True)[0])
    events = EventAccumulator(directory)
    events.Reload()
    text = events.Tensors("eval/sharpness_stability_reason/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text == report["stability_reason"]
    assert [s.value for s in events.Scalars("eval/sharpness_adam_edge_ratio")] == pytest.approx(
        [report["adam_edge_ratio"]], rel=1e-6)
