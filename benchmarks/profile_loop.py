"""Where one mSAM micro-batch of the loop path spends its time on CPU: time per phase, 1 thread by default.

all-MiniLM-L6-v2 (dropout as configured), batch 32, length 64, micro-batches of 32/m examples, the phases of
``SAMTrainer._msam_step`` written out and timed one by one (``time.process_time``, robust to other processes
on a shared machine): ascent forward, ``autograd.grad``, the perturbation arithmetic (norm, scale, add, swap),
descent forward, descent backward into ``.grad``, restore; and the optimizer step. Each m runs twice: ``dense``
(every gradient dense) and ``rows`` (``sparse_embedding_gradients``: the embedding
tables by the rows a micro-batch uses, as ``SAMTrainer`` does by default). Also times the embedding table's own
share (a memset, an add and a norm over the 30522 x 384 word embedding), and counts minor page faults per step.

    python benchmarks/profile_loop.py --m 1 8 16 --threads 2 --out benchmarks/results/profile_loop_cpu_2threads.json
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import BATCH, LR, RHO, build  # noqa: E402

from hf_msam.update.loop import (  # noqa: E402
    MicroBatchSAM,
    RandomState,
    sparse_embedding_gradients,
    split_micro_batches,
    trainable_embeddings,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 16], help="micro-batches per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, ds = build("cpu", BATCH)
    model.train()
    batch = {k: torch.stack([ds[i][k] for i in range(BATCH)]) for k in ds[0]}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    sam = MicroBatchSAM(params, rho=RHO)
    result = {"setup": {"model": "all-MiniLM-L6-v2", "batch": BATCH, "threads": a.threads, "clock": "process_time",
                        "trainable_params": sum(p.numel() for p in params)}, "per_m": {}}
    clock = time.process_time
    for m, variant in [(m, variant) for m in a.m for variant in ("dense", "rows")]:
        embeddings = trainable_embeddings(model) if variant == "rows" else []
        phases: dict[str, list[float]] = {}
        faults = []

        def timed(name, fn):
            t0 = clock()
            out = fn()
            phases.setdefault(name, []).append(clock() - t0)
            return out

        for step in range(a.steps + 1):
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for micro, share in split_micro_batches(batch, BATCH // m):
                rng = RandomState.capture()
                with sparse_embedding_gradients(embeddings):
                    loss = timed("ascent_forward", lambda: model(**micro).loss)
                grads = timed("ascent_autograd_grad", lambda: sam.ascent_gradients(loss))
                timed("perturb_norm_scale_add", functools.partial(sam.perturb_with, grads))
                del grads
                rng.restore()
                with sparse_embedding_gradients(embeddings, accumulating=True):
                    loss2 = timed("descent_forward", lambda: model(**micro).loss)
                timed("descent_backward", lambda: (share * loss2).backward())
                timed("restore", sam.restore)
            timed("optimizer_clip_step_zero_grad", lambda: (torch.nn.utils.clip_grad_norm_(params, 1.0), opt.step(),
                                                            opt.zero_grad(set_to_none=True)))
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
            if step == 0:  # warm-up
                phases.clear()
                faults.clear()
        per_step = {k: sum(v) / a.steps for k, v in phases.items()}
        result["per_m"][f"{variant}_m{m}"] = {"per_step_s": per_step, "step_total_s": sum(per_step.values()),
                                              "minor_page_faults_per_step": statistics.median(faults)}
        print(variant, m, json.dumps({k: round(v, 4) for k, v in per_step.items()}), round(sum(per_step.values()), 3),
              statistics.median(faults), flush=True)

    table = model.bert.embeddings.word_embeddings.weight
    samples = {"zeros_like_table": [], "add_table_into_table": [], "norm_of_table": []}
    buf = torch.zeros_like(table)
    for _ in range(5):
        t0 = clock(); z = torch.zeros_like(table); samples["zeros_like_table"].append(clock() - t0); del z
        t0 = clock(); buf.add_(table.detach()); samples["add_table_into_table"].append(clock() - t0)
        t0 = clock(); torch.linalg.vector_norm(buf); samples["norm_of_table"].append(clock() - t0)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    result["word_embedding_table"] = {"shape": list(table.shape), **medians}
    print(result["word_embedding_table"])
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
