"""Run both default recipes (no model, no data: all-MiniLM-L6-v2 on BBC News; a small ViT on MNIST-5k or
Fashion-MNIST) and record accuracy, wall time and the machine in benchmarks/results/.

    python benchmarks/run_defaults.py                      # CPU: default_text_cpu.json, default_vision_cpu.json
    python benchmarks/run_defaults.py --bf16               # CUDA GPU, bf16: default_text_cuda_bf16.json, ...
    python benchmarks/run_defaults.py --only text -- --num_train_epochs 2   # extra flags go to the recipe

Each recipe runs as `python -m hf_msam.recipes.<glue|vit>` in a fresh process, in a temporary folder, with the
output_dir it chooses by default (`runs/<model>-<data>`, the name its model card takes; nothing large is written
into the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from example_cards import copy_example  # benchmarks/example_cards.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECIPES = {"text": "glue", "vision": "vit"}


def machine(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": device}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import transformers

    info["transformers"] = transformers.__version__
    return info


def run(kind: str, device: str, bf16: bool, extra: list[str], example_card: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"hf_msam_default_{kind}_") as tmp:
        cmd = [sys.executable, "-m", f"hf_msam.recipes.{RECIPES[kind]}"]
        if device == "cpu":
            cmd += ["--use_cpu", "True"]
        if bf16:
            cmd += ["--bf16", "True"]
        cmd += extra
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        start = time.time()
        print(f"[run_defaults] {kind}: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=tmp, env=env)  # the recipe's log streams through
        wall = time.time() - start
        if proc.returncode != 0:
            raise SystemExit(f"{kind} default run failed with exit code {proc.returncode}")
        (out,) = (Path(tmp) / "runs").iterdir()  # the recipe's default output_dir
        results = json.loads((out / "all_results.json").read_text())
        card = json.loads((out / "msam_card.json").read_text())
        sharpness = json.loads((out / "sharpness.json").read_text()) if (out / "sharpness.json").is_file() else None
        if example_card:  # the card of this reference run (docs/model_cards/)
            print(f"[run_defaults] example card -> {copy_example(out, RECIPES[kind])}", flush=True)
    record = {
        "recipe": f"hf-msam {RECIPES[kind]} (default: no model, no data)",
        "command": " ".join(cmd[1:]),
        "output_dir": str(out.relative_to(tmp)),
        "data": card.get("dataset"),
        "base_model": card.get("base_model") or "ViT from config (trained from scratch)",
        "train_examples": card.get("train_examples"),
        "eval_examples": card.get("eval_examples"),
        "eval_accuracy": results.get("eval_accuracy"),
        "eval_loss": results.get("eval_loss"),
        "train_loss": results.get("train_loss"),
        "train_runtime_s": results.get("train_runtime"),
        "wall_time_s": round(wall, 1),
        "msam": card.get("msam"),
        "hyperparameters": card.get("hyperparameters"),
        "sharpness": sharpness,
        "machine": machine(device),
    }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(RECIPES), help="run one default only")
    parser.add_argument("--bf16", action="store_true", help="run on the CUDA GPU with bf16 mixed precision")
    parser.add_argument("--example_cards", action="store_true",
                        help="copy each run's model card, plot and report to docs/model_cards/<recipe>/")
    parser.add_argument("extra", nargs="*", help="flags passed on to the recipe (after --)")
    args = parser.parse_args()
    device = "cuda" if args.bf16 else "cpu"
    suffix = "cuda_bf16" if args.bf16 else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    for kind in [args.only] if args.only else ["text", "vision"]:
        record = run(kind, device, args.bf16, args.extra, args.example_cards)
        path = RESULTS / f"default_{kind}_{suffix}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{kind}: accuracy {record['eval_accuracy']:.4f}, wall {record['wall_time_s']} s -> {path}")


if __name__ == "__main__":
    main()
