"""The glue and vit recipes end to end on tiny models and a few dozen examples, on CPU: training, the model
card, safetensors only, the Hub push against a fake Hub on 127.0.0.1, preflight failures, a failed push,
bad input, one JSON argv, and ``accelerate launch --multi_gpu --num_processes 2`` (gloo)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_msam.recipes import glue, vit
from builders import save_tiny_bert, save_tiny_vit, write_image_folder, write_text_csv
from fake_hub import GOOD_TOKEN, FakeHub, files_containing, online_hub
from processes import run_process_group

REPO = Path(__file__).resolve().parents[2]
FAST = ["--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--learning_rate", "1e-3", "--sam_micro_batch_size", "4", "--logging_steps", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def text_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return {"model": save_tiny_bert(root / "bert"), "train": write_text_csv(root / "train.csv", n=32, seed=0),
            "dev": write_text_csv(root / "dev.csv", n=16, seed=1)}


@pytest.fixture(scope="module")
def image_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {"model": save_tiny_vit(root / "vit"), "train": write_image_folder(root / "train", per_class=12),
            "dev": write_image_folder(root / "dev", per_class=4, seed=1)}


def _glue_args(assets, out):
    return ["--model_name_or_path", str(assets["model"]), "--train_file", str(assets["train"]),
            "--validation_file", str(assets["dev"]), "--output_dir", str(out), *FAST]


def _one_model_one_card(out: Path):
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("pytorch_model*.bin"))
    card = (out / "README.md").read_text()
    assert "msam" in card and "## mSAM settings" in card
    return card


def test_glue_trains_writes_card_and_pushes_without_leaking_the_token(text_assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with FakeHub() as fake:
        online_hub(monkeypatch, fake.endpoint)
        argv = _glue_args(text_assets, out) + ["--push_to_hub", "--hub_model_id", "tiny-glue",
                                               "--hub_token", GOOD_TOKEN, "--save_strategy", "epoch",
                                               "--sharpness_num_examples", "16"]
        assert glue.main(argv) == 0
    card = _one_model_one_card(out)
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["wall_time_s"] > 0
    assert "| rho | 0.01 |" in card and "Accuracy" in card
    assert list(out.glob("checkpoint-*")), "a checkpoint was saved locally"
    if (out / "sharpness.json").is_file():  # the curvature report (on by default in the recipes) is in the card
        assert "No curvature report" not in card and "sharpness.json" in fake.files
    calls = [p for p in fake.paths() if "agent-harnesses" not in p]  # huggingface_hub's own user-agent lookup
    assert calls[0] == "GET /api/whoami-v2"  # the preflight came first
    assert {"model.safetensors", "README.md", "config.json", "tokenizer.json"} <= set(fake.files)
    assert not [f for f in fake.files if f.startswith("checkpoint-") or f.endswith((".bin", ".pt"))]
    assert files_containing(out, GOOD_TOKEN) == []  # training_args.bin, trainer_state.json, README, ...


def test_glue_preflight_failure_trains_nothing(text_assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert glue.main(_glue_args(text_assets, out) + ["--push_to_hub", "--hub_model_id", "x"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert not out.exists()
    with FakeHub() as fake:
        online_hub(monkeypatch, fake.endpoint, token=None)
        assert glue.main(_glue_args(text_assets, out) + ["--push_to_hub", "--hub_model_id", "x"]) == 2
    assert "token" in capsys.readouterr().err and not out.exists()


def test_glue_failed_push_keeps_everything_and_says_how_to_push_later(text_assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with FakeHub(fail_commit=True) as fake:
        online_hub(monkeypatch, fake.endpoint)
        monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda *_: None, raising=False)
        status = glue.main(_glue_args(text_assets, out) + ["--push_to_hub", "--hub_model_id", "tiny-glue",
                                                           "--save_strategy", "no", "--sharpness_report", "False"])
    assert status == 3
    assert f"hf-msam push {out} --hub_model_id tester/tiny-glue" in capsys.readouterr().err
    _one_model_one_card(out)
    assert (out / "tokenizer.json").is_file() and (out / "all_results.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task_name", "sst3"], "Unknown GLUE task 'sst3'"),
        (["--label_column", "stars"], "no label column 'stars'"),
        (["--sam_rho", "-1"], "sam_rho"),
    ],
)
def test_glue_bad_input_is_a_clear_error(text_assets, tmp_path, capsys, extra, message):
    argv = _glue_args(text_assets, tmp_path / "run") + extra
    if extra[0] == "--task_name":
        argv = [a for a in argv if a not in {"--train_file", str(text_assets["train"]), "--validation_file",
                                             str(text_assets["dev"])}]
    assert glue.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_vit_image_folder_from_one_json_argv(image_assets, tmp_path):
    out = tmp_path / "run"
    args = {"model_name_or_path": str(image_assets["model"]), "train_dir": str(image_assets["train"]),
            "validation_dir": str(image_assets["dev"]), "output_dir": str(out), "num_train_epochs": 2,
            "per_device_train_batch_size": 8, "sam_micro_batch_size": 4, "learning_rate": 1e-3,
            "save_strategy": "no", "sharpness_report": False}
    path = tmp_path / "args.json"
    path.write_text(json.dumps(args))
    assert vit.main([str(path)]) == 0
    card = _one_model_one_card(out)
    assert "image-classification" in card and (out / "preprocessor_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "bright", "1": "dark"}


def test_glue_do_predict_writes_run_glue_prediction_file(text_assets, tmp_path):
    """--do_predict --test_file --max_predict_samples: ``predict_results.txt`` as run_glue.py writes it, holding
    the label names the saved model predicts (recomputed here from the saved model and tokenizer)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    test = tmp_path / "test.csv"
    test.write_text("text\ngood film\nawful plot was sad\nthe acting was nice\nbad\n")
    out = tmp_path / "run"
    argv = _glue_args(text_assets, out) + ["--do_predict", "--test_file", str(test), "--max_predict_samples", "3",
                                           "--save_strategy", "no", "--sharpness_report", "False"]
    assert glue.main(argv) == 0
    lines = (out / "predict_results.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 4
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    expected = []
    for text in ["good film", "awful plot was sad", "the acting was nice"]:
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits
        expected.append(model.config.id2label[int(logits.argmax(-1))])
    assert lines[1:] == [f"{i}\t{label}" for i, label in enumerate(expected)]
    assert glue.main(_glue_args(text_assets, tmp_path / "other") + ["--do_predict"]) == 2  # nothing to predict


def test_glue_second_evaluation_split_is_merged_with_the_mm_suffix(text_assets, tmp_path, monkeypatch):
    """MNLI's matched and mismatched evaluations both land in eval_results.json / all_results.json, the second
    with the ``_mm`` suffix (eval_accuracy_mm, eval_samples_mm), as run_glue.py writes them."""
    real = glue.load_text_dataset

    def with_mismatched(*args, **kwargs):
        data = real(*args, **kwargs)
        data.extra_validation = {"mm": data.validation.select(range(6))}
        return data

    monkeypatch.setattr(glue, "load_text_dataset", with_mismatched)
    out = tmp_path / "run"
    assert glue.main(_glue_args(text_assets, out) + ["--save_strategy", "no", "--sharpness_report", "False"]) == 0
    for name in ("eval_results.json", "all_results.json"):
        results = json.loads((out / name).read_text())
        assert results["eval_samples"] == 16 and results["eval_samples_mm"] == 6, name
        assert {"eval_accuracy", "eval_accuracy_mm", "eval_loss", "eval_loss_mm"} <= set(results), name
    results = json.loads((out / "eval_results.json").read_text())
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    dev = with_mismatched(text_assets["train"], validation_data=text_assets["dev"]).extra_validation["mm"]
    with torch.no_grad():
        logits = model(**tokenizer(list(dev["text"]), return_tensors="pt", padding=True)).logits
    assert results["eval_accuracy_mm"] == pytest.approx(float((logits.argmax(-1).numpy() == np.asarray(dev["label"])).mean()))


def test_glue_with_compiled_vmap_passes_pads_to_a_multiple_of_8(text_assets, tmp_path, monkeypatch):
    """--sam_vmap_compile: the recipe runs the compiled vmap path and pads every batch to a multiple of 8, so that
    the passes compile for few sequence lengths."""
    from torch._dynamo.utils import counters

    built = []

    class Recorded(glue.SAMTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(glue, "SAMTrainer", Recorded)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    argv = _glue_args(text_assets, tmp_path / "run") + ["--sam_micro_batch_mode", "vmap", "--sam_vmap_compile", "True",
                                                        "--save_strategy", "no", "--sharpness_report", "False"]
    assert glue.main(argv) == 0
    (trainer,) = built
    assert trainer._vmap_verified and counters["stats"]["unique_graphs"] >= graphs + 2
    lengths = {batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader()}
    assert trainer.data_collator.pad_to_multiple_of == 8 and all(length % 8 == 0 for length in lengths)


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "all_checkpoints"])
def test_hub_strategy_pushing_during_training_is_refused_before_anything_runs(text_assets, tmp_path, monkeypatch,
                                                                              capsys, strategy):
    out = tmp_path / "run"
    with FakeHub() as fake:
        online_hub(monkeypatch, fake.endpoint)
        status = glue.main(_glue_args(text_assets, out) + ["--push_to_hub", "--hub_model_id", "tiny",
                                                           "--hub_strategy", strategy])
    assert status == 2
    err = capsys.readouterr().err
    assert f"--hub_strategy {strategy} is not supported" in err and "--hub_strategy end" in err
    assert fake.requests == [] and not out.exists()


def test_vit_column_names_and_their_old_aliases(tmp_path):
    from hf_msam import SAMTrainingArguments
    from hf_msam.recipes import common

    types = (vit.ModelArguments, vit.DataArguments, common.PeftArguments, SAMTrainingArguments)
    for flags in (["--image_column_name", "img", "--label_column_name", "y"], ["--image_column", "img", "--label_column", "y"]):
        (_, data_args, *_), _ = common.parse_args(["--output_dir", str(tmp_path), *flags], types, {}, lambda _: {})
        assert (data_args.image_column_name, data_args.label_column_name) == ("img", "y")


def _launch(script: str, args: list[str], cwd: Path, timeout: float = 240):
    """``accelerate launch`` two gloo processes in a session of their own; a run that has not ended after
    ``timeout`` seconds (a process that never exits) is killed, group and all, and fails the test."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "multi_gpu.yaml"), "--num_processes", "2",
           "--mixed_precision", "no", str(REPO / "recipes" / script), *args]
    return run_process_group(cmd, timeout=timeout, what=f"{script} under 2 processes", cwd=cwd, env=env)


def test_shutdown_lines_the_processes_up_before_the_group_goes(monkeypatch):
    import torch.distributed as dist

    from hf_msam.recipes import common

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    common.shutdown_distributed()
    assert calls == ["barrier", "destroy"]


@pytest.mark.slow
def test_accelerate_launch_glue_two_processes_leave_together_every_time(text_assets, tmp_path):
    """The recipe under ``accelerate launch --config_file multi_gpu.yaml --num_processes 2`` (gloo on CPU), three
    times: every run writes its outputs and every process exits (one once stayed alive after all was written)."""
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        proc = _launch("glue.py", _glue_args(text_assets, out) + ["--save_strategy", "no", "--sharpness_report", "False"],
                       tmp_path, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "terminate called" not in proc.stderr
        _one_model_one_card(out)
        state = json.loads((out / "trainer_state.json").read_text())
        assert state["global_step"] == 2  # 32 examples / (2 processes x 8)
        assert "| num_devices | 2 |" in (out / "README.md").read_text()  # transformers' hyperparameter name
        assert (out / "all_results.json").is_file()


@pytest.mark.slow
def test_accelerate_launch_vit_two_processes(image_assets, tmp_path):
    out = tmp_path / "run"
    args = ["--model_name_or_path", str(image_assets["model"]), "--train_dir", str(image_assets["train"]),
            "--validation_dir", str(image_assets["dev"]), "--output_dir", str(out), *FAST,
            "--save_strategy", "no", "--sharpness_report", "False"]
    proc = _launch("vit.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    _one_model_one_card(out)


@pytest.mark.parametrize("name, processes, machines", [("single_process", 1, 1), ("multi_gpu", 8, 1), ("multi_node", 16, 2),
                                                      ("fsdp2", 2, 1)])
def test_accelerate_config_files_load(name, processes, machines):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO / "recipes" / "accelerate" / f"{name}.yaml"))
    assert (config.num_processes, config.num_machines) == (processes, machines)
    if name == "fsdp2":  # version 2, and a full state dict for the report afterwards and the Hub push
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_cli_dispatches_to_the_recipes(capsys):
    from hf_msam import cli

    for command in ("glue", "vit"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "--sam_micro_batch_size" in out and "--sharpness_report" in out and "--eval_strategy" in out
