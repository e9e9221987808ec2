"""Step time and memory of SAM and mSAM on a compute-bound model: the sharded path in one process (FSDP2, world 1)
against the unsharded one, and the vmap path, eager and compiled, beside the loop (for one GPU, under 8 minutes).

BERT-base built from a config (109M parameters with a 2-class head, random init, no download), batch 32, length
128, AdamW; ``--bf16`` trains in bf16 (the Trainer's ``bf16=True``). Configs: ``sam`` (m = 1), ``loop_m{4,8}``
(mSAM, m micro-batches of 32/m examples, ``sam_micro_batch_mode="loop"``), ``vmap_m{4,8}`` (``"vmap"``) and
``vmapc_m{4,8}`` (``"vmap"`` with ``sam_vmap_compile=True``; its warmup steps compile). They run in three groups, each
one fresh process running its configs in turn, each config with a fresh model and Trainer:

- ``fsdp1``: ``sam``, ``loop_m4``, ``loop_m8`` under the Trainer's FSDP2 preparation (``fsdp=True``, one FSDP unit
  per ``BertLayer``), one process under torchrun (on a CPU, gloo, with accelerate's GPU-only gate lifted as in
  ``bench_fsdp_memory.py``). The vmap path is refused under FSDP, so it runs unsharded only.
- ``unsharded``: ``sam``, ``loop_m4``, ``loop_m8``, ``vmap_m4``, ``vmap_m8`` in one plain process.
- ``compiled``: ``vmapc_m4``, ``vmapc_m8``, unsharded.

Step time: ``on_step_begin -> on_step_end`` (device synchronised), median of ``--steps`` timed steps after ``--warmup``.
Memory (CUDA): ``max_memory_allocated`` during training minus ``memory_allocated`` after the Trainer's preparation
(the sharded model's and the unsharded model's weights are thus both left out). Each group has a time limit
(``--group-timeouts``); a group cut off keeps the configs it finished, and the JSON is rewritten after every group.

    python benchmarks/bench_fsdp_step.py --device cuda --bf16 --out fsdp_step_cuda_bf16.json   # ~6 min on one GPU
    python benchmarks/bench_fsdp_step.py --tiny --out /tmp/fsdp_step_tiny.json   # CPU smoke test, ~6 min (compiling)

``--tiny`` shrinks the model (2 layers of width 64), the batch (8, length 16) and the steps (1 warmup, 2 timed): it
only shows that every config runs, so it never writes into ``benchmarks/results/`` unless ``--out`` says so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_fsdp_memory import FSDP_CONFIG, bert_from_config, lift_fsdp_gate_on_cpu, machine, token_dataset

ROOT = Path(__file__).resolve().parent.parent
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512)
TINY_BERT = dict(vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64)
SIZES = {"base": (BERT_BASE, 32, 128), "tiny": (TINY_BERT, 8, 16)}  # (shape, batch, length)
CONFIGS = {  # name: (sam_micro_batch_mode, m, sam_vmap_compile)
    "sam": ("loop", 1, False),
    "loop_m4": ("loop", 4, False),
    "loop_m8": ("loop", 8, False),
    "vmap_m4": ("vmap", 4, False),
    "vmap_m8": ("vmap", 8, False),
    "vmapc_m4": ("vmap", 4, True),
    "vmapc_m8": ("vmap", 8, True),
}
GROUPS = {"fsdp1": ["sam", "loop_m4", "loop_m8"], "unsharded": ["sam", "loop_m4", "loop_m8", "vmap_m4", "vmap_m8"],
          "compiled": ["vmapc_m4", "vmapc_m8"]}


# ----------------------------------------------------------------------------------------------------------
# Worker side: one group, one process
# ----------------------------------------------------------------------------------------------------------
def run_config(config: str, sharded: bool, a: argparse.Namespace) -> dict[str, Any]:
    """``--warmup`` + ``--steps`` optimizer steps of one config with a fresh model and Trainer."""
    import torch
    from transformers import TrainerCallback

    from hf_msam import SAMTrainer, SAMTrainingArguments

    shape, batch, length = SIZES["tiny" if a.tiny else "base"]
    mode, m, compiled = CONFIGS[config]
    cuda = a.device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = SAMTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_fsdp_step_"), per_device_train_batch_size=batch,
        max_steps=a.warmup + a.steps, learning_rate=1e-4, optim="adamw_torch", bf16=a.bf16, use_cpu=not cuda,
        sam_rho=0.05, sam_micro_batch_size=batch // m if m > 1 else None, sam_micro_batch_mode=mode,
        sam_vmap_compile=compiled, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        dataloader_num_workers=0, dataloader_drop_last=True, seed=0,
        **(dict(fsdp=True, fsdp_config=FSDP_CONFIG) if sharded else {}),
    )
    data = token_dataset(batch * world * (a.warmup + a.steps), length, shape["vocab_size"])
    trainer = SAMTrainer(model=bert_from_config(shape), args=args, train_dataset=data)
    assert trainer.is_fsdp_enabled == sharded, trainer.accelerator.distributed_type
    out: dict[str, Any] = {"config": config, "sharded": sharded, "world": world,
                           "distributed_type": str(trainer.accelerator.distributed_type), "step_s": []}

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            out["params"] = sum(p.numel() for p in trainer.model.parameters())
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                out["mem_base_mb"] = torch.cuda.memory_allocated() / 2**20

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = clock()

        def on_step_end(self, args, state, control, **kw):
            out["step_s"].append(clock() - self.t0)

    trainer.add_callback(Timer())
    started = time.perf_counter()
    trainer.train()
    out["wall_s"] = time.perf_counter() - started  # the warmup steps' compilation included
    out["warmup_step_s"], out["step_s"] = out["step_s"][: a.warmup], out["step_s"][a.warmup :]
    if cuda:
        out["mem_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["mem_extra_mb"] = out["mem_peak_mb"] - out["mem_base_mb"]
    return out  # the Trainer and its model go with this frame, before the next config


def worker(a: argparse.Namespace) -> None:
    """Every config of the group ``a.worker`` in turn; one JSON line per finished config into ``a.result`` (rank 0)."""
    import torch

    sharded = a.worker == "fsdp1"
    if sharded and not a.device.startswith("cuda"):
        lift_fsdp_gate_on_cpu()
    torch.set_num_threads(a.threads)
    for config in GROUPS[a.worker]:
        if config not in a.configs.split(","):
            continue
        try:
            out = run_config(config, sharded, a)
        except Exception as error:  # noqa: BLE001  recorded; the group's other configs still run
            out = {"config": config, "sharded": sharded, "error": f"{type(error).__name__}: {error}"[:2000]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if int(os.environ.get("RANK", "0")) == 0:
            with open(a.result, "a") as f:
                f.write(json.dumps(out) + "\n")
    if sharded:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------
def run_group(group: str, a: argparse.Namespace, env: dict[str, str], timeout: float) -> tuple[list[dict], str | None]:
    """One group in a fresh process (torchrun, one process, for ``fsdp1``), killed with its workers after
    ``timeout`` seconds; returns the configs it finished, and why it stopped early (None: it did not)."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        result = f.name
    args = [__file__, "--worker", group, "--result", result, "--device", a.device, "--threads", str(a.threads),
            "--warmup", str(a.warmup), "--steps", str(a.steps), "--configs", a.configs]
    args += ["--bf16"] * a.bf16 + ["--tiny"] * a.tiny
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if group == "fsdp1" else []
    proc = subprocess.Popen([sys.executable, *launcher, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group: torchrun's worker is killed too
    stopped = None
    try:
        log = proc.communicate(timeout=timeout)[0]
        if proc.returncode != 0:
            stopped = f"exit {proc.returncode}: {log[-2000:]}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0]
        stopped = f"time limit {timeout:.0f} s: {log[-2000:]}"
    finished = [json.loads(line) for line in Path(result).read_text().splitlines() if line.strip()]
    os.unlink(result)
    return finished, stopped


def summarize(runs: dict[str, dict[str, dict]], stops: dict[str, str], a: argparse.Namespace, started: float) -> dict:
    """Per group and config: the median step and its ratio to the group's SAM (the vmap groups: the unsharded SAM),
    and FSDP2 in one process over the unsharded path, config by config."""
    shape, batch, length = SIZES["tiny" if a.tiny else "base"]
    groups: dict[str, dict] = {}
    for group, configs in runs.items():
        groups[group] = {}
        for name, r in configs.items():
            entry = dict(r)
            if r.get("step_s"):
                entry["median_step_s"] = statistics.median(r["step_s"])
            groups[group][name] = entry

    def median(group: str, name: str) -> float | None:
        return groups.get(group, {}).get(name, {}).get("median_step_s")

    for group, configs in groups.items():
        sam = median("fsdp1" if group == "fsdp1" else "unsharded", "sam")
        for entry in configs.values():
            if entry.get("median_step_s") and sam:
                entry["ratio_vs_sam"] = entry["median_step_s"] / sam
    sharded_over_unsharded = {}
    for name in GROUPS["fsdp1"]:
        s, u = median("fsdp1", name), median("unsharded", name)
        if s and u:
            sharded_over_unsharded[name] = {"step": s / u}
            ms, mu = (groups[g][name].get("mem_extra_mb") for g in ("fsdp1", "unsharded"))
            if ms is not None and mu is not None:
                sharded_over_unsharded[name]["mem_extra_mb"] = [ms, mu]
    return {
        "benchmark": "bench_fsdp_step",
        "setup": {"model": "BertForSequenceClassification from BertConfig, random init, 2 classes", "model_shape": shape,
                  "tiny": a.tiny, "batch": batch, "seq_len": length, "bf16": a.bf16, "device": a.device,
                  "optimizer": "AdamW (optim=adamw_torch)", "sam_rho": 0.05, "fsdp_config": FSDP_CONFIG,
                  "warmup_steps": a.warmup, "timed_steps": a.steps, "threads": a.threads,
                  "timing": "on_step_begin -> on_step_end, device synchronised; median over the timed steps",
                  "memory": "CUDA: max_memory_allocated during training - memory_allocated after the Trainer's preparation",
                  "groups": GROUPS},
        "machine": machine(), "wall_s": time.time() - started, "stopped_early": stops, "groups": groups,
        "sharded_over_unsharded": sharded_over_unsharded,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a 2-layer BERT of width 64, batch 8, length 16: a smoke test")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per config (default 3, --tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 10, --tiny 2)")
    p.add_argument("--groups", default="fsdp1,unsharded,compiled")
    p.add_argument("--configs", default=",".join(CONFIGS), help="run only these configs of the groups")
    p.add_argument("--group-timeouts", default="100,120,250", help="seconds per group, in the order of --groups")
    p.add_argument("--out", default=None, help="default: benchmarks/results/fsdp_step_<device>[_bf16].json")
    p.add_argument("--worker", choices=list(GROUPS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.warmup = a.warmup if a.warmup is not None else 1 if a.tiny else 3
    a.steps = a.steps if a.steps is not None else 2 if a.tiny else 10
    if a.worker:
        return worker(a)
    if a.tiny and a.out is None:
        raise SystemExit("--tiny is a smoke test: give --out (outside benchmarks/results/)")

    tag = a.device.split(":")[0] + ("_bf16" if a.bf16 else "")
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"fsdp_step_{tag}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    groups = a.groups.split(",")
    timeouts = [float(t) for t in a.group_timeouts.split(",")]
    runs: dict[str, dict[str, dict]] = {}
    stops: dict[str, str] = {}
    started = time.time()
    for group, timeout in zip(groups, timeouts):
        t0 = time.time()
        finished, stopped = run_group(group, a, env, timeout)
        runs[group] = {r["config"]: r for r in finished}
        if stopped:
            stops[group] = stopped
        for r in finished:
            step = statistics.median(r["step_s"]) if r.get("step_s") else float("nan")
            print(f"{group:10s} {r['config']:9s} median step {step * 1000:9.1f} ms  "
                  f"extra mem {r.get('mem_extra_mb', float('nan')):7.0f} MB  {r.get('error', '')}", flush=True)
        print(f"{group}: {time.time() - t0:.0f} s{'  STOPPED ' + stopped[:300] if stopped else ''}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summarize(runs, stops, a, started), indent=1) + "\n")  # a run cut short keeps its groups
    print(f"-> {out}")
    if stops or any("error" in r for configs in runs.values() for r in configs.values()):
        raise SystemExit("some configs did not finish (see 'stopped_early' and 'error' in the JSON)")


if __name__ == "__main__":
    main()
