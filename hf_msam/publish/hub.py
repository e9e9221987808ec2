"""Pushing a trained model to the Hugging Face Hub: the preflight check the recipes run *before* training,
the upload of a finished ``output_dir`` (``huggingface_hub.HfApi``), and ``hf-msam push OUTPUT_DIR``.

The token is resolved like ``huggingface_hub`` does (``--hub_token``, then ``HF_TOKEN``, then the token saved
by ``hf auth login``) and is never logged, printed or written to ``output_dir``. Checkpoints
(``checkpoint-*``), pickles (``*.bin``, ``*.pt``) and private files (``_*``) are never uploaded: the weights
go up as safetensors only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, constants, is_offline_mode
from huggingface_hub.errors import HfHubHTTPError

__all__ = ["HubError", "IGNORE_PATTERNS", "main", "preflight", "push_later_message", "push_output_dir", "resolve_token"]

IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    "_*",
    "runs/**",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.ckpt",
]


class HubError(RuntimeError):
    """The Hub cannot be used (offline, no token, unreachable, refused); the message says what to do."""


def resolve_token(explicit: str | None = None) -> str | None:
    """``explicit``, else ``huggingface_hub.get_token()`` (``HF_TOKEN``, then the token saved by ``hf auth login``)."""
    return explicit or huggingface_hub.get_token()


def preflight(repo_id: str | None, token: str | None, default_name: str | None = None) -> str:
    """Check, before any training, that a push can succeed; return the full ``namespace/name`` repo id.

    Raises :class:`HubError` for: offline mode (``HF_HUB_OFFLINE=1``), no token, an invalid token, an
    unreachable endpoint (``HF_ENDPOINT``).
    """
    later = "Or train without --push_to_hub and push the finished output_dir later with `hf-msam push OUTPUT_DIR`."
    if is_offline_mode():
        raise HubError(
            "--push_to_hub was given but the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1). Unset "
            f"HF_HUB_OFFLINE to push. {later}"
        )
    if not token:
        raise HubError(
            "--push_to_hub needs a Hugging Face token with write access, and none was found: run `hf auth login`, "
            f"or set HF_TOKEN in the environment (avoid --hub_token on shared machines: it shows in `ps`). {later}"
        )
    endpoint = constants.ENDPOINT
    try:
        user = HfApi(token=token).whoami()
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise HubError(
                f"The Hugging Face token was refused by {endpoint} (401 Unauthorized): log in again with "
                f"`hf auth login` or set a valid HF_TOKEN. {later}"
            ) from None
        raise HubError(f"The Hub at {endpoint} answered with an error ({status}): {_clean(exc, token)}. {later}") from None
    except Exception as exc:  # connection refused, DNS, TLS, timeouts, offline-mode errors
        raise HubError(
            f"The Hugging Face Hub at {endpoint} cannot be reached ({type(exc).__name__}: {_clean(exc, token)}). "
            f"Check the network or HF_ENDPOINT. {later}"
        ) from None
    name = repo_id or default_name
    if not name:
        raise HubError("No repository name: pass --hub_model_id NAME or NAMESPACE/NAME.")
    return name if "/" in name else f"{user.get('name')}/{name}"


def _clean(exc: BaseException, token: str | None) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text.replace(token, "***") if token else text


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload model trained with hf_msam (mSAM)",
) -> str:
    """Create ``repo_id`` if needed and upload ``output_dir`` (model, tokenizer/processor, card, results),
    without checkpoints or pickles. Returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message=commit_message,
        revision=revision,
        ignore_patterns=IGNORE_PATTERNS,
    )
    return str(getattr(info, "commit_url", info))


def push_later_message(output_dir: str | os.PathLike, repo_id: str | None) -> str:
    target = f" --hub_model_id {repo_id}" if repo_id else ""
    return (
        f"Everything trained is kept in {output_dir}. Push it later with:\n"
        f"    hf-msam push {output_dir}{target}"
    )


def _weights_in(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("*.safetensors")) + sorted(output_dir.glob("adapter_model.safetensors"))


def main(argv: list[str] | None = None) -> int:
    """``hf-msam push OUTPUT_DIR [--hub_model_id NAME]``: refresh the model card and upload a finished run."""
    parser = argparse.ArgumentParser(
        prog="hf-msam push",
        description="Push a finished output_dir (safetensors weights, tokenizer/processor, model card, results) "
        "to the Hugging Face Hub. Checkpoints and pickles are not uploaded.",
    )
    parser.add_argument("output_dir", help="the output_dir of a finished `hf-msam glue` / `hf-msam vit` run")
    parser.add_argument("--hub_model_id", default=None, help="NAME or NAMESPACE/NAME (default: the run's own)")
    parser.add_argument("--hub_token", default=None, help="a write token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to")
    parser.add_argument("--commit_message", default="Upload model trained with hf_msam (mSAM)")
    parser.add_argument("--no_card", action="store_true", help="do not rebuild README.md from the run's results")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    if not output_dir.is_dir():
        print(f"hf-msam push: {output_dir} is not a directory (expected a finished run's output_dir).", file=sys.stderr)
        return 2
    if not _weights_in(output_dir):
        print(
            f"hf-msam push: no *.safetensors weights in {output_dir}: is this the output_dir of a finished run? "
            "(Training saves the final model there; checkpoints are in checkpoint-*/ and are not pushed.)",
            file=sys.stderr,
        )
        return 2
    from . import card

    saved = card.load_card_data(output_dir)
    repo_id = args.hub_model_id or saved.get("hub_model_id")
    token = resolve_token(args.hub_token)
    try:
        repo_id = preflight(repo_id, token, default_name=output_dir.resolve().name)
    except HubError as exc:
        print(f"hf-msam push: {exc}", file=sys.stderr)
        return 2
    if not args.no_card and saved:
        saved["hub_model_id"] = repo_id
        card.write_model_card(output_dir, saved)
    try:
        url = push_output_dir(output_dir, repo_id, token, private=args.private or None, revision=args.revision,
                              commit_message=args.commit_message)
    except Exception as exc:
        print(f"hf-msam push: the upload to {repo_id} failed ({type(exc).__name__}: {_clean(exc, token)}). "
              f"{push_later_message(output_dir, repo_id)}", file=sys.stderr)
        return 1
    print(f"Pushed {output_dir} to {repo_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
