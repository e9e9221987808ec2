"""Helpers for the recipe, data, hub and model-card tests: tiny saved models, tiny data files, and a fake
Hugging Face Hub on 127.0.0.1 that answers the few API calls ``huggingface_hub`` makes to push a folder
(whoami, create repo, preupload, commit) and records what arrives."""

from __future__ import annotations

import base64
import csv
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GOOD_TOKEN = "hf_testtoken_0123456789abcdef"
WORDS = "good great fine nice bad awful poor sad the a movie film plot acting was is very not".split()
POSITIVE = {"good", "great", "fine", "nice"}


def write_vocab(path: Path) -> Path:
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


def save_tiny_bert(directory: Path, num_labels: int = 2) -> Path:
    """A 1-layer BERT and its tokenizer (``BertTokenizerFast(vocab=PATH)``; ``vocab_file=`` would be ignored)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(directory / "vocab_src.txt")
    tokenizer = BertTokenizerFast(vocab=str(vocab), model_max_length=32)
    assert tokenizer("good movie")["input_ids"][1] != tokenizer.unk_token_id
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_vit(directory: Path, image_size: int = 8) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=image_size, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=2,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(directory)
    return directory


def sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(5)]
        rows.append((" ".join(words), "pos" if POSITIVE & set(words) else "neg"))
    return rows


def write_text_csv(path: Path, n: int = 32, seed: int = 0, delimiter: str = ",", columns=("text", "label")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows(sentences(n, seed))
    return path


def write_image_folder(root: Path, per_class: int = 12, size: int = 8, seed: int = 0) -> Path:
    """Two classes: dark and bright noise images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, (low, high) in {"dark": (0, 100), "bright": (155, 255)}.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(low, high, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 playing the Hub API; ``requests`` records every call."""

    def __init__(self, fail_commit: bool = False):
        self.requests: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.fail_commit = fail_commit
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                auth = self.headers.get("Authorization", "")
                hub.requests.append({"method": method, "path": self.path, "auth": auth, "body": body})
                path = self.path.split("?")[0]
                if auth != f"Bearer {GOOD_TOKEN}":
                    return self._reply(401, {"error": "Invalid credentials"})
                if path == "/api/whoami-v2":
                    return self._reply(200, {"name": "tester", "type": "user", "orgs": [], "auth": {}})
                if path == "/api/repos/create":
                    name = json.loads(body).get("name")
                    org = json.loads(body).get("organization") or "tester"
                    return self._reply(200, {"url": f"{hub.endpoint}/{org}/{name}", "name": f"{org}/{name}"})
                if path == "/api/validate-yaml":  # the client checks README.md's metadata before committing
                    hub.validated.append(json.loads(body).get("content", ""))
                    return self._reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    if hub.fail_commit:
                        return self._reply(500, {"error": "storage unavailable"})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            value = item["value"]
                            hub.files[value["path"]] = base64.b64decode(value["content"])
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{'a' * 40}",
                                             "commitOid": "a" * 40, "success": True})
                return self._reply(404, {"error": f"not faked: {method} {path}"})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        return [f"{r['method']} {r['path'].split('?')[0]}" for r in self.requests]


def online_hub(monkeypatch, endpoint: str, token: str | None = GOOD_TOKEN) -> None:
    """Point huggingface_hub at ``endpoint`` in this process, online, with ``token`` (or none)."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    else:
        monkeypatch.setenv("HF_TOKEN", token)


def files_containing(directory: Path, needle: str) -> list[str]:
    found = []
    for path in directory.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            found.append(str(path.relative_to(directory)))
    return found
