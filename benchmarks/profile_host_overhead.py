"""Host-side cost of one mSAM step, loop against vmap, where the arithmetic is negligible (issue 8).

On the H200 the vmap path's step hardly depended on m (``results/step_cuda_bf16_vmap_mathsdpa.json``: 126 ms
at m = 1, 122 ms at m = 8) and SAM on it took twice the loop's step: the GPU waited on the host. This
measures that host cost on a CPU, with a 6-layer BERT of width 16 (so small that every operator is dispatch
and bookkeeping), batch 32, length 16, dropout 0.1, SDPA, one thread: the wall time of a step, and the number
of aten operator calls in it (``torch.profiler``; deterministic, and on a GPU each one is at least a launch).

The loop is the loop path's arithmetic (``MicroBatchSAM``: ascent ``autograd.grad``, perturbation, descent
backward into ``.grad``, restore); vmap is ``VectorizedMicroBatchSAM.step``, one group of m micro-batches.

    python benchmarks/profile_host_overhead.py --out benchmarks/results/host_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import BertConfig, BertForSequenceClassification

from hf_msam.msam import MicroBatchSAM, RandomState, split_micro_batches
from hf_msam.vectorized import VectorizedMicroBatchSAM, stack_micro_batches

BATCH, LENGTH, RHO = 32, 16, 0.05


def build() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=6, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=LENGTH, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).train()
    batch = {
        "input_ids": torch.randint(1, 64, (BATCH, LENGTH)),
        "attention_mask": torch.ones(BATCH, LENGTH, dtype=torch.long),
        "labels": torch.randint(0, 2, (BATCH,)),
    }
    batch["attention_mask"][::2, LENGTH // 2 :] = 0  # padding in half of the rows
    return model, batch


def loop_step(model: torch.nn.Module, sam: MicroBatchSAM, batch: dict[str, torch.Tensor], m: int) -> None:
    for micro_batch, weight in split_micro_batches(batch, BATCH // m):
        randomness = RandomState.capture()
        sam.perturb(model(**micro_batch).loss)
        randomness.restore()
        (model(**micro_batch).loss * weight).backward()
        sam.restore()


def vmap_step(vectorized: VectorizedMicroBatchSAM, batch: dict[str, torch.Tensor], m: int) -> None:
    micro_batches = [micro_batch for micro_batch, _ in split_micro_batches(batch, BATCH // m)]
    vectorized.step(stack_micro_batches(micro_batches), torch.full((m,), 1.0 / m))


def measure(step, repeats: int) -> dict[str, float]:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    calls = sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))
    return {"step_ms_median": 1000 * statistics.median(times), "step_ms_samples": [1000 * t for t in times], "aten_calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="micro-batches per step (divisors of 32)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, batch = build()
    sam = MicroBatchSAM(model.parameters(), rho=RHO)
    vectorized = VectorizedMicroBatchSAM(model, rho=RHO)
    results = {}
    for m in args.m:
        results[f"loop_m{m}"] = measure(lambda: loop_step(model, sam, batch, m), args.repeats)
        results[f"vmap_m{m}"] = measure(lambda: vmap_step(vectorized, batch, m), args.repeats)
        model.zero_grad(set_to_none=True)
        print(f"m={m:2d}  loop {results[f'loop_m{m}']['step_ms_median']:6.1f} ms {results[f'loop_m{m}']['aten_calls']:6d} aten calls"
              f"  |  vmap {results[f'vmap_m{m}']['step_ms_median']:6.1f} ms {results[f'vmap_m{m}']['aten_calls']:6d} aten calls", flush=True)
    out = {
        "benchmark": "profile_host_overhead",
        "setup": {"model": "BERT, 6 layers, hidden 16, 2 heads, dropout 0.1, SDPA", "batch": BATCH, "length": LENGTH, "rho": RHO,
                  "threads": 1, "repeats": args.repeats, "aten_calls": "aten operator calls in one step (torch.profiler)"},
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "configs": results,
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
