"""Where an mSAM step's time goes: torch.profiler over ``SAMTrainer.training_step`` (the real code path).

Same model/data/threads as ``bench_step.py``. For each micro-batch size it profiles ``--steps`` calls of
``training_step`` (after one warm-up call) and groups the self CPU time of the aten ops into buckets:
matmuls, other forward/backward kernels, the embedding backward, parameter-sized vector work of mSAM
(foreach copy / norm / add, zero-filled allocations) and the rest (Python and dispatcher overhead is the
gap between the wall time and the summed op time).

    python benchmarks/profile_msam.py   # -> benchmarks/results/profile_msam_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_step as bs  # noqa: E402

BUCKETS = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product")),
    ("embedding_backward", ("aten::embedding_dense_backward", "aten::embedding_backward", "aten::index_add", "aten::_embedding_bag", "aten::embedding_sparse_backward", "aten::_coalesce", "aten::sort")),
    ("msam_foreach_copy", ("aten::_foreach_copy_",)),
    ("msam_foreach_norm", ("aten::_foreach_norm", "aten::linalg_vector_norm", "aten::stack")),
    ("msam_foreach_add", ("aten::_foreach_add_",)),
    ("alloc_zero_fill", ("aten::zeros_like", "aten::zero_", "aten::fill_", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::zeros")),
    ("grad_accumulate_add", ("aten::add_",)),
    ("copy", ("aten::copy_", "aten::clone", "aten::to", "aten::_to_copy")),
    ("item_sync", ("aten::item", "aten::_local_scalar_dense")),
]


def bucket(name: str) -> str:
    for b, prefixes in BUCKETS:
        if name.startswith(prefixes):
            return b
    return "other_kernels"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--micro", default="none,8,4", help="micro-batch sizes (none = SAM, m=1)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(bs.ROOT / "benchmarks" / "results" / "profile_msam_cpu.json"))
    a = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from hf_msam import SAMTrainer, SAMTrainingArguments

    torch.set_num_threads(a.threads)
    model, ds = bs.build("cpu", bs.BATCH * 4)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs.BATCH, shuffle=False, drop_last=True)
    batch = next(iter(loader))
    result = {"setup": {"threads": a.threads, "steps_profiled": a.steps, "batch": bs.BATCH, "seq_len": bs.SEQ_LEN}, "runs": {}}
    for micro in a.micro.split(","):
        mb = None if micro == "none" else int(micro)
        args = SAMTrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs.BATCH, use_cpu=True,
                                    report_to="none", sam_rho=bs.RHO, sam_micro_batch_size=mb, learning_rate=bs.LR)
        trainer = SAMTrainer(model=model, args=args, train_dataset=ds)
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
        trainer.training_step(model, dict(batch))  # warm-up
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                trainer.training_step(model, dict(batch))
                model.zero_grad(set_to_none=True)
            wall = (time.perf_counter() - t0) / a.steps
        buckets: dict[str, float] = {}
        top = []
        for e in prof.key_averages():
            if not e.key.startswith("aten::"):
                continue
            buckets[bucket(e.key)] = buckets.get(bucket(e.key), 0.0) + e.self_cpu_time_total / 1e6 / a.steps
            top.append((e.self_cpu_time_total / 1e6 / a.steps, e.key, e.count // a.steps))
        top.sort(reverse=True)
        ops = sum(buckets.values())
        name = f"m={bs.BATCH // (mb or bs.BATCH)}"
        result["runs"][name] = {
            "wall_per_training_step_s": wall,
            "aten_self_time_s": ops,
            "python_dispatch_profiler_overhead_s": wall - ops,
            "buckets_s": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
            "top_ops": [{"op": k, "self_s": round(t, 4), "calls": c} for t, k, c in top[:15]],
        }
        print(name, f"wall {wall:.3f}s", {k: round(v, 3) for k, v in result["runs"][name]["buckets_s"].items()}, flush=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print("->", a.out)


if __name__ == "__main__":
    main()
