"""Side benchmark: a cheaper mSAM inner loop that skips the word-embedding matrix's untouched rows.

all-MiniLM-L6-v2 has 22.7M trainable parameters, 11.7M of them (52%) in the word-embedding matrix
(30522 x 384). A micro-batch of 8 x 64 tokens touches at most 512 of its rows, yet the current loop
(``hf_msam.msam.MicroBatchSAM``) pays dense, parameter-sized work on the whole matrix per micro-batch: a
fresh 47 MB ascent gradient from ``autograd.grad``, its norm, the perturbation add and the restore copy.

Variants, each a full optimizer step (micro-batch loop, clip 1.0, AdamW, zero_grad), timed interleaved:
  current     the loop of ``SAMTrainer._msam_step`` with ``MicroBatchSAM`` (dense everywhere)
  sparse_emb  ascent pass with ``nn.Embedding.sparse=True`` (autograd.grad returns a sparse COO gradient
              for the big embedding): norm over its coalesced values, perturbation by ``index_add_`` of
              the touched rows, exact restore by ``index_copy_`` of those rows saved before the add; the
              saved dense copy then covers only the other tensors (-47 MB of extra memory)
  sparse_both also the descent pass sparse, accumulated in place into a dense ``.grad`` allocated once

It checks that every variant restores the weights bit for bit and gives the same summed descent gradient
as ``current`` (to float32 round-off: the sparse embedding backward sums duplicate tokens in another order).

    python benchmarks/msam_speedups.py   # -> benchmarks/results/msam_speedups_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_step as bs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--micro", default="8,4,32")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--out", default=str(bs.ROOT / "benchmarks" / "results" / "msam_speedups_cpu.json"))
    a = p.parse_args()

    import torch
    from torch import nn

    from hf_msam.msam import EPS, MicroBatchSAM, split_micro_batches

    torch.set_num_threads(a.threads)
    model, ds = bs.build("cpu", bs.BATCH * 2)
    model.train()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=bs.BATCH, shuffle=False)))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0)  # lr 0: weights stay put, every rep sees the same point
    rho = bs.RHO
    big = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad and m.num_embeddings >= 4096]
    big_ids = {id(m.weight) for m in big}
    dense = [q for q in params if id(q) not in big_ids]
    sam = MicroBatchSAM(params, rho=rho)
    dense_saved = [torch.empty_like(q) for q in dense]

    def loss_of(micro):
        return model(**micro).loss

    def current(mb):
        sam.save_weights()
        for micro, w in split_micro_batches(batch, mb):
            sam.perturb(loss_of(micro))
            (w * loss_of(micro)).backward()
            sam.restore()

    def sparse(mb, sparse_descent=False):
        torch._foreach_copy_(dense_saved, [q.detach() for q in dense])
        if sparse_descent:
            for m in big:
                if m.weight.grad is None:
                    m.weight.grad = torch.zeros_like(m.weight)
        for micro, w in split_micro_batches(batch, mb):
            for m in big:
                m.sparse = True
            grads = torch.autograd.grad(loss_of(micro), params, allow_unused=True)
            for m in big:
                m.sparse = sparse_descent
            by_id = {id(q): g for q, g in zip(params, grads)}
            dense_g = [by_id[id(q)] if by_id[id(q)] is not None else torch.zeros_like(q) for q in dense]
            sparse_g = [by_id[id(m.weight)].coalesce() for m in big]
            sq = torch.stack([n.float() for n in torch._foreach_norm(dense_g, 2.0)]).square().sum()
            for g in sparse_g:
                sq = sq + g.values().float().square().sum()
            norm = math.sqrt(sq.item())
            saved_rows = []
            with torch.no_grad():
                if math.isfinite(norm):
                    scale = rho / (norm + EPS)
                    torch._foreach_add_(dense, dense_g, alpha=scale)
                    for m, g in zip(big, sparse_g):
                        rows = g.indices()[0]
                        saved_rows.append((m.weight, rows, m.weight.index_select(0, rows)))
                        m.weight.index_add_(0, rows, g.values(), alpha=scale)
            del grads, dense_g, sparse_g, by_id
            (w * loss_of(micro)).backward()
            with torch.no_grad():
                torch._foreach_copy_(dense, dense_saved)
                for weight, rows, old in saved_rows:
                    weight.index_copy_(0, rows, old)
        for m in big:
            m.sparse = False

    variants = {"current": current, "sparse_emb": sparse, "sparse_both": lambda mb: sparse(mb, True)}

    def full_step(fn, mb):
        fn(mb)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # correctness: same descent gradient, exact restore
    start = [q.detach().clone() for q in params]
    check = {}
    for mb in (8, 4):
        ref = None
        for name, fn in variants.items():
            torch.manual_seed(123)
            fn(mb)
            g = [q.grad.to_dense().clone() for q in params]
            opt.zero_grad(set_to_none=True)
            restored = all(torch.equal(q, s) for q, s in zip(params, start))
            if ref is None:
                ref = g
            # global relative difference over all tensors (per-tensor ratios are meaningless for tensors whose exact
            # gradient is 0, e.g. attention key biases: softmax is invariant to them)
            diff = math.sqrt(sum(float((x - y).double().square().sum()) for x, y in zip(g, ref)))
            scale = math.sqrt(sum(float(y.double().square().sum()) for y in ref))
            check[f"{name}_mb{mb}"] = {"restored_bit_for_bit": restored, "rel_diff_summed_descent_grad_vs_current": diff / scale,
                                       "max_abs_diff": max(float((x - y).abs().max()) for x, y in zip(g, ref))}
    print(check, flush=True)
    if a.check_only:
        Path(a.out).with_name("msam_speedups_check_cpu.json").write_text(json.dumps(check, indent=1) + "\n")
        return

    micro = [None if m == "32" else int(m) for m in a.micro.split(",")]
    samples = {f"{n}_m{bs.BATCH // (mb or bs.BATCH)}": [] for mb in micro for n in variants}
    cpu_samples = {k: [] for k in samples}
    for rep in range(a.warmup + a.reps):
        for mb in micro:
            for n, fn in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                full_step(fn, mb)
                if rep >= a.warmup:
                    samples[f"{n}_m{bs.BATCH // (mb or bs.BATCH)}"].append(time.perf_counter() - t0)
                    cpu_samples[f"{n}_m{bs.BATCH // (mb or bs.BATCH)}"].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in samples.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_samples.items()}
    gains = {}
    for mb in micro:
        m = bs.BATCH // (mb or bs.BATCH)
        for n in ("sparse_emb", "sparse_both"):
            gains[f"{n}_m{m}_saving_s"] = med[f"current_m{m}"] - med[f"{n}_m{m}"]
            gains[f"{n}_m{m}_ratio_vs_current"] = med[f"{n}_m{m}"] / med[f"current_m{m}"]
            gains[f"{n}_m{m}_cpu_saving_s"] = cpu_med[f"current_m{m}"] - cpu_med[f"{n}_m{m}"]
            gains[f"{n}_m{m}_cpu_ratio_vs_current"] = cpu_med[f"{n}_m{m}"] / cpu_med[f"current_m{m}"]
    out = {"setup": {"threads": a.threads, "reps": a.reps, "warmup": a.warmup, "batch": bs.BATCH, "seq_len": bs.SEQ_LEN,
                     "big_embeddings": [tuple(m.weight.shape) for m in big], "dense_params": sum(q.numel() for q in dense),
                     "step": "micro-batch loop + clip_grad_norm_(1.0) + AdamW.step + zero_grad, lr 0, hand-written loop",
                     "machine": bs._machine()},
           "check": check, "median_s": med, "cpu_median_s": cpu_med, "samples_s": samples, "cpu_samples_s": cpu_samples,
           "loadavg_end": os.getloadavg(), "gains": gains}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for k, v in med.items():
        print(f"{k:18s} {v:.3f}s wall  {cpu_med[k]:.3f}s cpu")
    print(json.dumps(gains, indent=1))
    print("->", a.out)


if __name__ == "__main__":
    main()
