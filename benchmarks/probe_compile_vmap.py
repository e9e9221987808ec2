"""Would ``torch.compile`` take the host's work off the vectorised passes? A probe of the ascent pass.

The vmap path is bound by the host on a GPU at all-MiniLM-L6-v2's size (``profile_host_overhead.py``): each pass
dispatches hundreds of small operations. This compiles the vmapped loss of ``VectorizedMicroBatchSAM`` (one
``vmap`` over ``functional_call``) and times the ascent pass (forward + ``autograd.grad`` to the batched points)
against the eager one, on the 6-layer BERT of width 16 of ``profile_host_overhead.py`` (batch 32, length 16, m = 4,
one CPU thread), for dropout off and on, and checks the losses and gradients against eager:

* backends ``aot_eager`` (the traced aten graph, run op by op) and ``inductor`` (fused kernels); on CUDA also
  ``inductor`` with ``mode="reduce-overhead"`` (CUDA graphs); for attention dropout under SDPA also inductor with
  no fusion (``max_fusion_size=1``), where the fused CPU code gave NaN;
* dropout 0.1 in the hidden layers only, in the attention probabilities only (SDPA's ``dropout_p``), and the same
  with eager attention; inductor with ``fallback_random=True``, so that it draws eager's masks.

    python benchmarks/probe_compile_vmap.py --out benchmarks/results/compile_vmap_cpu.json
    python benchmarks/probe_compile_vmap.py --device cuda --out compile_vmap_cuda.json
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
import torch._inductor.config as inductor_config
from profile_host_overhead import BATCH, aten_calls, build
from torch.profiler import ProfilerActivity, profile

from hf_msam.update.loop import split_micro_batches
from hf_msam.update.vmap import VectorizedMicroBatchSAM, stack_micro_batches

M = 4
CASES = {  # name: (hidden dropout, attention dropout, attention implementation)
    "no_dropout": (0.0, 0.0, "sdpa"),
    "hidden_dropout": (0.1, 0.0, "sdpa"),
    "attention_dropout_sdpa": (0.0, 0.1, "sdpa"),
    "attention_dropout_eager": (0.0, 0.1, "eager"),
}


def model_for(case: str, device: str) -> tuple[VectorizedMicroBatchSAM, dict]:
    hidden, attention, implementation = CASES[case]
    model, batch = build()
    model.set_attn_implementation(implementation)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = attention if "attention.self" in name else hidden
    model.config.attention_probs_dropout_prob = attention  # read by the SDPA path as dropout_p
    model.to(device)
    micro_batches = [mb for mb, _ in split_micro_batches({k: v.to(device) for k, v in batch.items()}, BATCH // M)]
    vectorized = VectorizedMicroBatchSAM(model, rho=0.05)
    return vectorized, vectorized.masks.of(stack_micro_batches(micro_batches))


def ascent(vectorized: VectorizedMicroBatchSAM, losses, batch: dict, seed: int = 0):
    """Forward at the batched points and ``autograd.grad``: the ascent pass of ``VectorizedMicroBatchSAM.step``."""
    torch.manual_seed(seed)
    points = vectorized._ascent_points(M)
    values = losses(points, batch, ascent=True)
    return values.detach(), torch.autograd.grad(values.sum(), points)


def launches(work) -> int | None:
    """CUDA kernel launches of one call of ``work`` (``torch.profiler``); ``None`` on a CPU."""
    if not torch.cuda.is_available():
        return None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        work()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if "LaunchKernel" in e.key)


def timed(work, repeats: int, device: str) -> list[float]:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return times


def probe(case: str, backend: str, mode: str | None, options: dict | None, device: str, repeats: int) -> dict:
    vectorized, batch = model_for(case, device)
    eager_losses, eager_grads = ascent(vectorized, vectorized._losses, batch)
    torch._dynamo.reset()
    compiled = torch.compile(vectorized._losses, backend=backend, mode=mode, options=options)
    entry: dict = {}
    with inductor_config.patch(fallback_random=True):
        try:
            start = time.perf_counter()
            losses, grads = ascent(vectorized, compiled, batch)
            entry["first_call_s"] = time.perf_counter() - start  # compile time, for the forward and its backward
            entry["losses_finite"] = bool(torch.isfinite(losses).all())
            entry["max_abs_loss_diff_vs_eager"] = (losses - eager_losses).abs().max().item()
            entry["max_abs_grad_diff_vs_eager"] = max((a - b).abs().max().item() for a, b in zip(grads, eager_grads))
            del losses, grads
            for _ in range(3):
                ascent(vectorized, compiled, batch)
            samples = timed(lambda: ascent(vectorized, compiled, batch), repeats, device)
            entry["ascent_ms_median"] = statistics.median(samples)
            entry["aten_calls"] = aten_calls(lambda: ascent(vectorized, compiled, batch))
            entry["cuda_kernel_launches"] = launches(lambda: ascent(vectorized, compiled, batch))
        except Exception as error:  # noqa: BLE001 - recorded: what fails is a finding
            entry["error"] = f"{type(error).__name__}: {str(error)[:500]}"
    return entry


def eager_entry(case: str, device: str, repeats: int) -> dict:
    vectorized, batch = model_for(case, device)
    for _ in range(3):
        ascent(vectorized, vectorized._losses, batch)
    samples = timed(lambda: ascent(vectorized, vectorized._losses, batch), repeats, device)
    return {"ascent_ms_median": statistics.median(samples), "aten_calls": aten_calls(lambda: ascent(vectorized, vectorized._losses, batch)),
            "cuda_kernel_launches": launches(lambda: ascent(vectorized, vectorized._losses, batch))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = {  # name: (backend, mode, inductor options, the cases it runs on)
        "aot_eager": ("aot_eager", None, None, ["no_dropout"]),  # eager's ops, so eager's randomness
        "inductor": ("inductor", None, None, list(CASES)),
        "inductor_no_fusion": ("inductor", None, {"max_fusion_size": 1}, ["attention_dropout_sdpa"]),
    }
    if args.device == "cuda":
        variants["inductor_reduce-overhead"] = ("inductor", "reduce-overhead", None, list(CASES))
    results = {}
    for case in CASES:
        results[case] = {"eager": eager_entry(case, args.device, args.repeats)}
        for name, (backend, mode, options, cases) in variants.items():
            if case not in cases:
                continue
            results[case][name] = probe(case, backend, mode, options, args.device, args.repeats)
            print(case, name, json.dumps(results[case][name]), flush=True)
        print(case, "eager", json.dumps(results[case]["eager"]), flush=True)
    out = {
        "benchmark": "probe_compile_vmap",
        "setup": {"model": "BERT, 6 layers, hidden 16, 2 heads (profile_host_overhead.build)", "batch": BATCH, "micro_batches": M,
                  "device": args.device, "threads": 1, "repeats": args.repeats, "timed": "ascent: vmapped forward + autograd.grad",
                  "inductor_config": {"fallback_random": True}, "cases": {k: dict(zip(("hidden_dropout", "attention_dropout", "attention"), v)) for k, v in CASES.items()}},
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "results": results,
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
