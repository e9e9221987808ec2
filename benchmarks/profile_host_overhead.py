"""Host-side cost of one mSAM step, loop against vmap, where the arithmetic is negligible (issue 8).

On the H200 the vmap path's step hardly depended on m (``results/step_cuda_bf16_vmap_mathsdpa.json``: 126 ms
at m = 1, 122 ms at m = 8) and SAM on it took twice the loop's step: the GPU waited on the host. This
measures that host cost on a CPU, with a 6-layer BERT of width 16 (so small that every operator is dispatch
and bookkeeping), batch 32, length 16, dropout 0.1, SDPA, one thread: the wall time of a step, and the number
of aten operator calls in it (``torch.profiler``; deterministic, and on a GPU each one is at least a launch),
with the vmap step's calls split by phase.

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
from hf_msam.vectorized import VectorizedMicroBatchSAM, _with_4d_attention_mask, stack_micro_batches

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


def aten_calls(work) -> int:
    """aten operator calls of one call of ``work`` (after one untimed call)."""
    work()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        work()
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def vmap_phases(model: torch.nn.Module, vectorized: VectorizedMicroBatchSAM, batch: dict[str, torch.Tensor], m: int) -> dict[str, int]:
    """aten calls of the parts of one vmap step, and of one plain forward + ``autograd.grad`` for comparison."""
    micro_batches = [micro_batch for micro_batch, _ in split_micro_batches(batch, BATCH // m)]
    stacked = _with_4d_attention_mask(model, stack_micro_batches(micro_batches))

    def batched_points():
        return [p.detach().unsqueeze(0).expand(m, *p.shape).clone().requires_grad_(True) for p in vectorized.params]

    def ascent():
        points = batched_points()
        return torch.autograd.grad(vectorized._losses(points, stacked).sum(), points, allow_unused=True)

    grads = [torch.zeros(m, *p.shape) if g is None else g.detach() for g, p in zip(ascent(), vectorized.params)]
    parameters = list(model.parameters())
    points_calls = aten_calls(batched_points)
    return {
        "batched_points": points_calls,
        "vmap_forward": aten_calls(lambda: vectorized._losses(batched_points(), stacked)) - points_calls,
        "ascent_forward_and_backward": aten_calls(ascent),
        "perturbation_arithmetic": aten_calls(lambda: vectorized._perturbations([g.clone() for g in grads], 1.0))
        - aten_calls(lambda: [g.clone() for g in grads]),
        "descent_points": aten_calls(lambda: [p.unsqueeze(0) + g for p, g in zip(vectorized.params, grads)]),
        "plain_forward_and_grad_one_micro_batch": aten_calls(lambda: torch.autograd.grad(model(**micro_batches[0]).loss, parameters)),
        "trainable_tensors": len(vectorized.params),
    }


def measure(step, repeats: int) -> dict[str, float]:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_ms_median": 1000 * statistics.median(times), "step_ms_samples": [1000 * t for t in times], "aten_calls": aten_calls(step)}


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
        results[f"vmap_m{m}"]["phases_aten_calls"] = vmap_phases(model, vectorized, batch, m)
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
    print("vmap step phases (aten calls):", json.dumps(results[f"vmap_m{args.m[0]}"]["phases_aten_calls"]))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
