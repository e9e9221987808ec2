"""What FSDP2 mSAM holds per process, measured from the tensors, for 1, 2 and 4 processes (gloo on a CPU), beside
the unsharded loop in one process.

A BERT built from a config (the shape of all-MiniLM-L6-v2, 22.7M parameters, random init, no download) trains a
few ``SAMTrainer`` steps with AdamW and micro-batches of 4 out of 8 examples per process (m = 2), under the
Trainer's own FSDP2 preparation (``fsdp=True``, ``fsdp_config={"fsdp_version": 2, ...}``, one FSDP unit per
``BertLayer``); accelerate selects FSDP only on accelerators, so each worker lifts that gate for itself as
``tests/training/scripts/msam_fsdp.py`` does. Every gradient is dense on both paths (the sharded path takes no
embedding rows; the unsharded one is run with ``sam_sparse_embeddings=False`` to match).

Per process, from the tensors (local shards of DTensors, ``to_local()``; bytes = numel x element size, and the
distinct storages' bytes, FSDP2's padding included):

- ``param_local``: the parameters it holds; ``param_full``: the whole model's (global shapes).
- ``grad``: the accumulated descent gradient in ``.grad`` before the optimizer step.
- ``optimizer_state``: AdamW's state after the step (``exp_avg``, ``exp_avg_sq``, ``step``).
- the perturbation's buffers at the moment they all live, right after ``w -> w + e_k`` (recorded by subclasses of
  ``ShardedPerturbation`` / ``MicroBatchSAM`` and of the rule, installed in ``hf_msam.training.trainer`` for the
  worker only): ``ascent_grad`` (the ascent gradient, which becomes ``e_k`` in place; on the loop it becomes
  ``w + e_k`` and the parameters hold it), ``saved_copy`` (copies of the weights kept for the restore: the saved
  shards under FSDP2; on the loop the parameters' own tensors are kept, no copy), ``held_grad`` (the descent
  gradient accumulated so far, held aside under FSDP2, in ``.grad`` on the loop); the maximum over the step's
  micro-batches, then the median over the timed steps.
- peak RSS (VmHWM) over the process's life and during training alone (reset after the Trainer's preparation), and
  the RSS before the model (the libraries alone), after building it, and after the preparation (sharding).

Each configuration runs ``--repeats`` times (interleaved); the JSON holds every process's numbers and the medians
over repeats.

    python benchmarks/bench_fsdp_memory.py   # -> benchmarks/results/fsdp_memory_cpu.json (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SMALL_BERT = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                  max_position_embeddings=512)
"""The shape of all-MiniLM-L6-v2 (22.7M parameters with a 2-class head)."""
BATCH, MICRO, SEQ_LEN = 8, 4, 32
WORLDS = (1, 2, 4)
FSDP_CONFIG = {"fsdp_version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": ["BertLayer"]}
PROBE: dict[str, Any] = {}
"""What the instrumented perturbation saw during the current step (worker side)."""


# ----------------------------------------------------------------------------------------------------------
# Shared with bench_fsdp_step.py: the model, the data, the FSDP gate on CPU, the launch
# ----------------------------------------------------------------------------------------------------------
def bert_from_config(shape: dict[str, int], seed: int = 0):
    """A ``BertForSequenceClassification`` (2 classes) of ``shape``, random init."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(num_labels=2, **shape))


def token_dataset(n: int, length: int, vocab: int, seed: int = 0):
    """``n`` random token sequences of ``length`` (no padding) with random binary labels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, length), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels[i]}

    return Tokens()


def lift_fsdp_gate_on_cpu() -> None:
    """Let accelerate select FSDP on gloo (it keeps ``MULTI_CPU`` on a CPU), so that the Trainer's FSDP2
    preparation runs as on GPUs: the tests' patch, ``tests/fsdp_on_cpu.py``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from fsdp_on_cpu import allow_fsdp_on_cpu

    allow_fsdp_on_cpu()


def launch(world: int | None, script: str, args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``script args`` in one plain process (``world`` None) or in ``world`` processes under torchrun
    (``--standalone``: a free port on this host)."""
    if world is None:
        command = [sys.executable, script, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), script, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def rss_mb(field: str = "VmRSS") -> float:
    """``field`` of ``/proc/self/status`` (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict[str, Any]:
    """The host and the versions a result depends on."""
    import accelerate
    import torch
    import transformers

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        cpu = platform.processor()
    info = {"cpu_model": cpu, "nproc": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------------------------------------
# Worker side: one process of one configuration
# ----------------------------------------------------------------------------------------------------------
def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_bytes(tensors) -> dict[str, int]:
    """``bytes``: numel x element size of the local tensors (a DTensor's shard); ``storage_bytes``: the bytes of
    their distinct storages (padding and views' bases included). ``None`` entries are skipped."""
    local = [_local(t) for t in tensors if t is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local}
    return {"bytes": sum(t.numel() * t.element_size() for t in local), "storage_bytes": sum(storages.values())}


def _record_perturbation(ascent: dict[str, int], saved: list, held: list, own: set[int]) -> None:
    """Keep, per step, the largest of each buffer over the micro-batches: ``saved`` entries whose storage is one of
    the parameters' own (``own``: the loop keeps them, no copy) count nothing."""
    copies = [s for s in saved if _local(s).untyped_storage().data_ptr() not in own]
    now = {"ascent_grad": ascent, "saved_copy": tensor_bytes(copies), "held_grad": tensor_bytes(held)}
    now["extra"] = {k: now["ascent_grad"][k] + now["saved_copy"][k] for k in ("bytes", "storage_bytes")}
    for name, value in now.items():
        best = PROBE.setdefault(name, {"bytes": 0, "storage_bytes": 0})
        for k in best:
            best[k] = max(best[k], value[k])


def install_probes() -> None:
    """Replace, in ``hf_msam.training.trainer``, the perturbation classes by subclasses that record their buffers
    (their rule records the ascent gradient it scales into ``e_k``)."""
    import torch

    import hf_msam.training.trainer as trainer_module
    from hf_msam.update.loop import MicroBatchSAM
    from hf_msam.training.distributed import ShardedPerturbation
    from hf_msam.update.rule import SAMRule

    class RecordingRule(SAMRule):
        def perturb_(self, grads, *args, **kwargs):
            PROBE["last_ascent"] = tensor_bytes(grads)
            return super().perturb_(grads, *args, **kwargs)

    def recording(rule: SAMRule) -> SAMRule:
        return RecordingRule(rule.rho, rule.adaptive, rule.eta)

    class RecordingSharded(ShardedPerturbation):
        def __init__(self, params, rule) -> None:
            super().__init__(params, recording(rule))

        def perturb(self, grad_scale: float = 1.0):
            result = super().perturb(grad_scale)
            if not result.skipped:
                own = {s.untyped_storage().data_ptr() for s in self._shards()}
                _record_perturbation(PROBE.pop("last_ascent"), self._saved, self._held, own)
            return result

    class RecordingLoop(MicroBatchSAM):
        def __init__(self, params, rule) -> None:
            super().__init__(params, rule=recording(rule))

        @torch.no_grad()
        def perturb_with(self, grads, grad_scale: float = 1.0):
            own = {p.untyped_storage().data_ptr() for p in self.params}  # the tensors the parameters hold at w
            result = super().perturb_with(grads, grad_scale)
            if not result.skipped:
                _record_perturbation(PROBE.pop("last_ascent"), self._saved, [p.grad for p in self.params], own)
            return result

    trainer_module.ShardedPerturbation = RecordingSharded
    trainer_module.MicroBatchSAM = lambda params, rule: RecordingLoop(params, rule)


def worker(a: argparse.Namespace) -> None:
    import torch
    from transformers import TrainerCallback

    from hf_msam import SAMTrainer, SAMTrainingArguments

    torch.set_num_threads(1)
    sharded = a.worker == "fsdp"
    if sharded:
        lift_fsdp_gate_on_cpu()
    install_probes()
    rank = int(os.environ.get("RANK", "0"))
    rss_before_model = rss_mb()  # the interpreter, torch, transformers, accelerate
    model = bert_from_config(SMALL_BERT)
    out: dict[str, Any] = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "sharded": sharded,
                           "rss_before_model_mb": rss_before_model, "rss_after_model_mb": rss_mb(), "steps": []}
    args = SAMTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_fsdp_memory_"), per_device_train_batch_size=BATCH,
        max_steps=a.warmup + a.steps, learning_rate=1e-4, optim="adamw_torch", sam_rho=0.05, sam_micro_batch_size=MICRO,
        sam_micro_batch_mode="loop", sam_sparse_embeddings=False, report_to="none", save_strategy="no",
        logging_steps=10**6, disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0,
        **(dict(fsdp=True, fsdp_config=FSDP_CONFIG) if sharded else {}),
    )
    world = out["world"]
    trainer = SAMTrainer(model=model, args=args,
                         train_dataset=token_dataset(BATCH * world * (a.warmup + a.steps), SEQ_LEN, SMALL_BERT["vocab_size"]))
    assert trainer.is_fsdp_enabled == sharded, trainer.accelerator.distributed_type

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            params = list(trainer.model.parameters())
            out["param_local"] = tensor_bytes(params)
            out["param_full_bytes"] = sum(p.numel() * p.element_size() for p in params)  # a DTensor's numel is global
            out["params"] = sum(p.numel() for p in params)
            out["rss_after_prepare_mb"] = rss_mb()
            out["peak_rss_before_train_mb"] = rss_mb("VmHWM")
            with open("/proc/self/clear_refs", "w") as f:  # "5": the kernel resets VmHWM to the current RSS
                f.write("5")

        def on_step_begin(self, args, state, control, **kw):
            PROBE.clear()
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.grad = tensor_bytes([p.grad for p in trainer.model.parameters()])

        def on_step_end(self, args, state, control, **kw):
            optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
            moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            out["steps"].append({"step_s": time.perf_counter() - self.t0, "grad": self.grad,
                                 "optimizer_state": tensor_bytes(moments),
                                 **{k: PROBE[k] for k in ("ascent_grad", "saved_copy", "held_grad", "extra")}})

    trainer.add_callback(Measure())
    trainer.train()
    out["steps"] = out["steps"][a.warmup:]
    out["peak_rss_train_mb"] = rss_mb("VmHWM")
    out["peak_rss_mb"] = max(out["peak_rss_before_train_mb"], out["peak_rss_train_mb"])
    Path(a.result, f"rank{rank}.json").write_text(json.dumps(out))
    if sharded:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------
def process_summary(p: dict[str, Any]) -> dict[str, Any]:
    """One process of one run: its bytes (medians over the timed steps) and the ratios to its local parameters."""
    steps = p["steps"]

    def med(name: str, key: str = "bytes") -> float:
        return statistics.median(s[name][key] for s in steps)

    local = p["param_local"]["bytes"]
    row = {"rank": p["rank"], "param_local_bytes": local, "param_local_storage_bytes": p["param_local"]["storage_bytes"],
           "param_full_bytes": p["param_full_bytes"], "grad_bytes": med("grad"),
           "optimizer_state_bytes": med("optimizer_state"), "ascent_grad_bytes": med("ascent_grad"),
           "saved_copy_bytes": med("saved_copy"), "held_grad_bytes": med("held_grad"), "extra_bytes": med("extra"),
           "extra_storage_bytes": med("extra", "storage_bytes"),
           "peak_rss_mb": p["peak_rss_mb"], "peak_rss_train_mb": p["peak_rss_train_mb"],
           "rss_before_model_mb": p["rss_before_model_mb"], "rss_after_model_mb": p["rss_after_model_mb"],
           "rss_after_prepare_mb": p["rss_after_prepare_mb"], "step_s": statistics.median(s["step_s"] for s in steps)}
    row["ratios"] = {"param_local_over_full": local / p["param_full_bytes"],
                     "grad_over_param_local": row["grad_bytes"] / local,
                     "optimizer_state_over_param_local": row["optimizer_state_bytes"] / local,
                     "extra_over_param_local": row["extra_bytes"] / local,
                     "saved_copy_over_param_local": row["saved_copy_bytes"] / local,
                     "ascent_grad_over_param_local": row["ascent_grad_bytes"] / local}
    return row


def summarize(runs: dict[str, list[list[dict]]], a: argparse.Namespace, started: float, failures: dict) -> dict[str, Any]:
    """Per configuration: every repeat's processes, and per rank the medians over repeats."""
    configs = {}
    for name, repeats in runs.items():
        if not repeats:
            continue
        rows = [[process_summary(p) for p in sorted(rep, key=lambda p: p["rank"])] for rep in repeats]
        per_rank = []
        for rank in range(len(rows[0])):
            mine = [rep[rank] for rep in rows]
            median = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k not in ("rank", "ratios")}
            median["ratios"] = {k: statistics.median(r["ratios"][k] for r in mine) for k in mine[0]["ratios"]}
            median["rank"] = rank
            per_rank.append(median)
        configs[name] = {"world": len(rows[0]), "sharded": name != "unsharded", "per_rank_median_over_repeats": per_rank,
                         "repeats": rows}
        # one line per configuration: the median over its processes of the per-rank medians over repeats
        configs[name]["summary"] = {
            **{k: statistics.median(r["ratios"][k] for r in per_rank) for k in per_rank[0]["ratios"]},
            **{k: statistics.median(r[k] for r in per_rank) for k in ("param_local_bytes", "extra_bytes", "peak_rss_mb",
                                                                        "peak_rss_train_mb", "rss_before_model_mb")},
        }
    return {
        "benchmark": "bench_fsdp_memory",
        "setup": {
            "model": "BertForSequenceClassification from BertConfig (the shape of all-MiniLM-L6-v2), random init, 2 classes",
            "model_shape": SMALL_BERT, "per_device_batch": BATCH, "sam_micro_batch_size": MICRO, "seq_len": SEQ_LEN,
            "optimizer": "AdamW (optim=adamw_torch), fp32", "sam_rho": 0.05, "sam_micro_batch_mode": "loop",
            "sam_sparse_embeddings": False, "fsdp_config": FSDP_CONFIG, "threads_per_process": 1, "backend": "gloo (CPU)",
            "launch": "torch.distributed.run --standalone --nproc_per_node WORLD; unsharded: one plain process",
            "warmup_steps": a.warmup, "timed_steps": a.steps, "repeats": a.repeats,
            "bytes": "numel x element size of each process's local tensors (DTensor.to_local()); *_storage_bytes: their "
                     "distinct storages (FSDP2's padding included)",
            "perturbation": "right after w -> w + e_k, the largest over the step's micro-batches, median over timed steps: "
                            "ascent_grad (becomes e_k in place under FSDP2, w + e_k on the loop), saved_copy (copies of the "
                            "weights kept for the restore), held_grad (the descent gradient accumulated so far), "
                            "extra = ascent_grad + saved_copy",
            "rss": "peak_rss_mb: VmHWM over the process's life (it builds the full model before sharding); "
                   "peak_rss_train_mb: VmHWM reset after the Trainer's preparation, read after training; "
                   "rss_before_model_mb: VmRSS with the libraries loaded, before the model; rss_after_model_mb, "
                   "rss_after_prepare_mb: VmRSS after building the model and after the Trainer's preparation (sharding)",
        },
        "machine": machine(), "wall_s": time.time() - started, "failures": failures, "configs": configs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=list(WORLDS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fsdp_memory_cpu.json"))
    p.add_argument("--worker", choices=["fsdp", "unsharded"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    configs: list[tuple[str, int | None]] = [("unsharded", None)] + [(f"fsdp_world{w}", w) for w in a.worlds]
    runs: dict[str, list[list[dict]]] = {name: [] for name, _ in configs}
    failures: dict[str, list[str]] = {}
    started = time.time()
    for r in range(a.repeats):
        for name, world in configs:
            result = tempfile.mkdtemp(prefix="bench_fsdp_memory_")
            t0 = time.time()
            proc = launch(world, __file__, ["--worker", "unsharded" if world is None else "fsdp", "--result", result,
                                            "--warmup", str(a.warmup), "--steps", str(a.steps)], env, timeout=600)
            if proc.returncode != 0:
                print(f"repeat {r} {name} FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                failures.setdefault(name, []).append(proc.stderr[-2000:])
                continue
            runs[name].append([json.loads(f.read_text()) for f in Path(result).glob("rank*.json")])
            print(f"repeat {r} {name}: {time.time() - t0:.0f} s", flush=True)
    result = summarize(runs, a, started, failures)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'config':14s} {'rank':>4s} {'local/full':>10s} {'extra/local':>11s} {'saved/local':>11s} "
          f"{'grad/local':>10s} {'adam/local':>10s} {'peak RSS MB':>11s} {'train peak':>10s}")
    for name, c in result["configs"].items():
        for row in c["per_rank_median_over_repeats"]:
            q = row["ratios"]
            print(f"{name:14s} {row['rank']:4d} {q['param_local_over_full']:10.3f} {q['extra_over_param_local']:11.3f} "
                  f"{q['saved_copy_over_param_local']:11.3f} {q['grad_over_param_local']:10.3f} "
                  f"{q['optimizer_state_over_param_local']:10.3f} {row['peak_rss_mb']:11.0f} {row['peak_rss_train_mb']:10.0f}")
    print(f"wall {result['wall_s']:.0f} s -> {a.out}")
    if failures:
        raise SystemExit(f"configs failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
