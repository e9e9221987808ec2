"""A fake Hugging Face Hub on 127.0.0.1 that answers the few API calls ``huggingface_hub`` makes to push a folder
(whoami, create repo, preupload, commit) and records what arrives, for the recipe and publishing tests."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GOOD_TOKEN = "hf_testtoken_0123456789abcdef"


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
