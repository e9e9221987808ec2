"""LoRA in both recipes (TRL's ModelConfig flag names): only the adapters and the head train, the run saves and
pushes adapters, and the trainer's model is a PeftModel (so the card can say so)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_msam.recipes import common, glue, vit
from builders import save_tiny_bert, save_tiny_vit, write_image_folder, write_text_csv
from fake_hub import GOOD_TOKEN, FakeHub, online_hub

FAST = ["--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--learning_rate", "5e-3",
        "--sam_micro_batch_size", "4", "--logging_steps", "1", "--seed", "0", "--save_strategy", "no",
        "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1"]


def _adapter_run(out, base_dir, head: str) -> dict[str, torch.Tensor]:
    """The saved adapter: LoRA A/B of the targeted layers and the trained copy of the head, nothing else."""
    assert not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["lora_dropout"] == 0.1
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)
    assert not [k for k in weights if "lora_" not in k and f"{head}." not in k], "only adapters and the head"
    base = load_file(base_dir / "model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_b), "LoRA B starts at zero: a trained adapter has moved"
    trained_head = {k.split(f"{head}.")[-1]: v for k, v in weights.items() if f"{head}." in k}
    base_head = {k.split(f"{head}.")[-1]: v for k, v in base.items() if k.startswith(f"{head}.")}
    assert trained_head.keys() == base_head.keys()
    assert any(not torch.equal(trained_head[k], base_head[k]) for k in base_head), "the head trained"
    return weights


def test_glue_lora_trains_only_adapters_saves_and_pushes_them(tmp_path, monkeypatch, capsys):
    base = save_tiny_bert(tmp_path / "bert")
    train, dev = write_text_csv(tmp_path / "train.csv", n=32), write_text_csv(tmp_path / "dev.csv", n=16, seed=1)
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(base), "--train_file", str(train), "--validation_file", str(dev),
            "--output_dir", str(out), *FAST, "--lora_target_modules", "query", "value",
            "--sharpness_num_examples", "8", "--sharpness_coherence_examples", "4"]
    with FakeHub() as fake:
        online_hub(monkeypatch, fake.endpoint)
        assert glue.main(argv + ["--push_to_hub", "--hub_model_id", "tiny-lora", "--hub_token", GOOD_TOKEN]) == 0
    weights = _adapter_run(out, base, head="classifier")
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights if "lora_" in k} == {"query", "value"}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(fake.files)
    assert "model.safetensors" not in fake.files
    banner = capsys.readouterr().out
    assert "hf-msam glue" in banner and "LoRA adapters" in banner and f"output: {out}" in banner


def test_vit_lora_keeps_the_classifier_trainable(tmp_path):
    base = save_tiny_vit(tmp_path / "vit")
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(base), "--train_dir", str(write_image_folder(tmp_path / "train", per_class=8)),
            "--validation_dir", str(write_image_folder(tmp_path / "dev", per_class=2, seed=1)),
            "--output_dir", str(out), *FAST, "--sharpness_report", "False"]
    assert vit.main(argv) == 0
    weights = _adapter_run(out, base, head="classifier")
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights if "lora_" in k}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}  # every linear layer but the head


def test_only_adapters_move_and_the_trainer_holds_a_peft_model(tmp_path):
    """One mSAM step on a LoRA-wrapped BERT with dropout on: every frozen base weight is bit-identical, the
    adapters and the head's trainable copy move, and the model the Trainer holds is a PeftModel."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from hf_msam import SAMTrainer, SAMTrainingArguments

    base = save_tiny_bert(tmp_path / "bert")
    model = AutoModelForSequenceClassification.from_pretrained(base, hidden_dropout_prob=0.1)
    model = common.PeftArguments(use_peft=True, lora_r=2, lora_task_type="SEQ_CLS").wrap(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = Dataset.from_dict({"input_ids": [[2, 5 + i % 7, 9, 3] for i in range(8)], "labels": [i % 2 for i in range(8)]})
    args = SAMTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=8,
                                sam_rho=0.1, sam_micro_batch_size=4, learning_rate=1e-2, report_to="none",
                                sharpness_report=False, use_cpu=True)
    trainer = SAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert isinstance(trainer.model, PeftModel)
    moved = {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    assert moved and moved <= trainable
    assert any("lora_" in k for k in moved) and any("classifier" in k for k in moved)
    assert all("lora_" in k or "modules_to_save" in k for k in trainable)


@pytest.mark.parametrize("extra, message", [(["--lora_task_type", "IMAGE_CLS"], "not a PEFT task type"),
                                            (["--lora_target_modules", "no_such_layer"], "--lora_target_modules")])
def test_bad_lora_settings_are_clear_errors(tmp_path, capsys, extra, message):
    argv = ["--model_name_or_path", str(save_tiny_bert(tmp_path / "bert")),
            "--train_file", str(write_text_csv(tmp_path / "train.csv", n=16)), "--output_dir", str(tmp_path / "run"),
            *FAST, *extra]
    assert glue.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
