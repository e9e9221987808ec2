"""Hub preflight and ``hf-msam push`` against a fake Hub on 127.0.0.1 (never the real network)."""

from __future__ import annotations

import json
import socket

import pytest

from hf_msam.publish import hub
from fake_hub import GOOD_TOKEN, FakeHub, files_containing, online_hub


def _finished_run(directory):
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"weights")
    (directory / "config.json").write_text("{}")
    (directory / "training_args.bin").write_bytes(b"pickle")
    (directory / "checkpoint-5").mkdir()
    (directory / "checkpoint-5" / "model.safetensors").write_bytes(b"old")
    (directory / "msam_card.json").write_text(json.dumps({
        "model_name": "run", "task": "text-classification", "dataset": "tiny", "results": {"accuracy": 0.75},
        "msam": {"rho": 0.05}, "hyperparameters": {"learning_rate": 1e-3}}))
    return directory


def test_preflight_refuses_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE"):
        hub.preflight("me/model", GOOD_TOKEN)


def test_preflight_refuses_missing_token(monkeypatch):
    with FakeHub() as fake:
        online_hub(monkeypatch, fake.endpoint, token=None)
        with pytest.raises(hub.HubError, match="token"):
            hub.preflight("me/model", hub.resolve_token(None))
        assert fake.requests == []  # nothing sent without a token


def test_preflight_refuses_bad_token_and_unreachable_endpoint(monkeypatch):
    with FakeHub() as fake:
        online_hub(monkeypatch, fake.endpoint)
        with pytest.raises(hub.HubError, match="401"):
            hub.preflight("me/model", "hf_wrong")
        assert hub.preflight("model", GOOD_TOKEN) == "tester/model"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    online_hub(monkeypatch, f"http://127.0.0.1:{port}")
    with pytest.raises(hub.HubError, match="cannot be reached") as info:
        hub.preflight("me/model", GOOD_TOKEN)
    assert GOOD_TOKEN not in str(info.value)


def test_push_command_uploads_model_and_card_not_checkpoints(tmp_path, monkeypatch, capsys):
    run = _finished_run(tmp_path / "run")
    with FakeHub() as fake:
        online_hub(monkeypatch, fake.endpoint)
        assert hub.main([str(run), "--hub_model_id", "my-model"]) == 0
    assert "POST /api/repos/create" in fake.paths()
    assert any("/api/models/tester/my-model/commit/" in p for p in fake.paths())
    assert {"model.safetensors", "README.md", "config.json"} <= set(fake.files)
    assert not [f for f in fake.files if f.startswith("checkpoint-") or f.endswith(".bin")]
    card = fake.files["README.md"].decode()
    assert "msam" in card and "0.75" in card
    assert files_containing(run, GOOD_TOKEN) == []
    assert GOOD_TOKEN not in capsys.readouterr().out


def test_push_command_refuses_a_folder_without_weights(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert hub.main([str(tmp_path / "empty")]) == 2
    assert "safetensors" in capsys.readouterr().err


def test_failed_upload_keeps_the_folder_and_says_how_to_retry(tmp_path, monkeypatch, capsys):
    run = _finished_run(tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    with FakeHub(fail_commit=True) as fake:
        online_hub(monkeypatch, fake.endpoint)
        monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda *_: None, raising=False)
        assert hub.main([str(run), "--hub_model_id", "my-model"]) == 1
    err = capsys.readouterr().err
    assert f"hf-msam push {run}" in err
    assert set(before) <= {p.name for p in run.iterdir()}
    assert (run / "model.safetensors").read_bytes() == b"weights"


def test_token_order_explicit_then_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_environment")
    assert hub.resolve_token("hf_explicit") == "hf_explicit"
    assert hub.resolve_token(None) == "hf_from_environment"


def test_preflight_names_the_endpoint_it_could_not_reach(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    online_hub(monkeypatch, f"http://127.0.0.1:{port}")
    with pytest.raises(hub.HubError, match=f"127.0.0.1:{port}"):
        hub.preflight("me/model", GOOD_TOKEN)


def test_model_push_outside_the_recipes_carries_the_msam_tags(tmp_path, monkeypatch):
    """``SAMTrainer`` tags the model (``add_model_tags``), so ``model.push_to_hub`` writes them into the card."""
    import yaml

    from builders import tiny_bert
    from hf_msam import SAMTrainer, SAMTrainingArguments

    model = tiny_bert()
    SAMTrainer(model=model, args=SAMTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    with FakeHub() as fake:
        online_hub(monkeypatch, fake.endpoint)
        monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                            fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        model.push_to_hub("tester/pushed", token=GOOD_TOKEN)
    assert "model.safetensors" in fake.files
    tags = yaml.safe_load(fake.files["README.md"].decode().split("---")[1])["tags"]
    assert {"msam", "hf_msam"} <= set(tags)
