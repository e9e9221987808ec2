"""Host-side cost of one mSAM step, loop against vmap and SAM against the peer, where arithmetic is negligible.

On the H200 the vmap path's step hardly depended on m (``results/step_cuda_bf16_vmap_mathsdpa.json``: 126 ms
at m = 1, 122 ms at m = 8), SAM on it took twice the loop's step, and the loop's SAM took 1.4 to 1.9x the peer's
step: the GPU waited on the host. This measures that host cost on a CPU, with a 6-layer BERT of width 16 (so
small that every operator is dispatch and bookkeeping), batch 32, length 16, dropout 0.1, SDPA, one thread:

* ``step_ms_median``: the wall time of a step;
* ``kernel_ops``: the aten operations of one step that reach a kernel (a ``TorchDispatchMode`` below autograd and
  vmap; views, aliases and allocations are not counted): on a GPU each is at least one launch, which is what the
  host spends its time on there;
* ``aten_calls``: every aten call ``torch.profiler`` records, nested ones and views included (the earlier measure);
* ``host_reads``: the step's reads of a tensor's value on the host (``_local_scalar_dense``: ``.item()``, ``bool``);
  on a GPU each read of a device tensor is a sync. Reads made by ``torch.optim``'s code are left out: AdamW
  reads its step counters, one per parameter, which are host tensors on a GPU too (no sync there).

``loop_m{m}`` and ``vmap_m{m}`` are the two paths' arithmetic alone (``MicroBatchSAM``: ascent ``autograd.grad``,
perturbation, descent backward into ``.grad``, restore; ``VectorizedMicroBatchSAM.step``, one group), with the
vmap step's parts (``phases``); ``vmap_compiled_m{m}`` is the vmap step with ``compile=True`` (its kernels are not
counted: compiled code calls most of them without the dispatcher). ``harness`` is SAM (m = 1) as a whole
optimizer step (AdamW, clipping at 1): the stock step and SAM in ``transformers.Trainer`` (``SAMTrainer``, the
loop), and the stock step, SAM (``MicroBatchSAM``, embedding rows) and the peer (``pytorch_optimizer.SAM``) in
``bench_step.py``'s hand-written loop (``hand_step``). The three steps of one m, and the three steps of the
hand-written loop, are timed in turn (one of each per repeat).

    python benchmarks/profile_host_overhead.py --out benchmarks/results/host_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_step import HAND_CONFIGS, hand_step
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_msam import SAMTrainer, SAMTrainingArguments
from hf_msam.update.loop import MicroBatchSAM, RandomState, split_micro_batches
from hf_msam.update.vmap import VectorizedMicroBatchSAM, stack_micro_batches

BATCH, LENGTH, RHO, LR = 32, 16, 0.05, 1e-4
NOT_KERNELS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view", "detach", "alias", "lift_fresh"}
"""Operations that allocate or alias without a kernel; with the views (schemas whose outputs alias an input),
they are left out of ``kernel_ops``."""
DISPATCH_WRAPPERS = ("_dynamo", "_compile.py", f"utils{os.sep}_python_dispatch.py")
"""Where the frames between an operation's caller and ``TorchDispatchMode.__torch_dispatch__`` come from (torch 2.13
wraps the latter in ``torch._dynamo``'s ``disable``)."""


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


class KernelOps(TorchDispatchMode):
    """Counts the aten operations dispatched below autograd and vmap that reach a kernel (see ``NOT_KERNELS``), and
    the host reads among them (``_local_scalar_dense``: ``.item()``, ``.tolist()``, ``bool(tensor)``; on a GPU each
    read of a device tensor makes the host wait for the GPU), except those ``torch.optim``'s code makes."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        is_view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        name = func.overloadpacket.__name__
        if not is_view and name not in NOT_KERNELS:
            self.count += 1
        if name == "_local_scalar_dense":
            self.host_reads += not _made_by_torch_optimizer()
        return func(*args, **(kwargs or {}))


def _made_by_torch_optimizer() -> bool:
    """Whether the code that asked for the host read is ``torch.optim``'s (AdamW reads its step counters): the first
    caller of ``__torch_dispatch__`` outside the wrappers torch puts around it. A read in a closure that an optimizer
    calls is the closure's."""
    frame = sys._getframe(2)
    while any(f"torch{os.sep}{wrapper}" in frame.f_code.co_filename for wrapper in DISPATCH_WRAPPERS):
        frame = frame.f_back
    return f"torch{os.sep}optim{os.sep}" in frame.f_code.co_filename


def aten_calls(work) -> int:
    """aten operator calls of one call of ``work`` (after one untimed call)."""
    work()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        work()
    return _aten_events(prof)


def _aten_events(prof: profile) -> int:
    """The aten operator calls a finished ``torch.profiler`` run recorded."""
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def kernel_ops(work) -> KernelOps:
    """:class:`KernelOps` of one call of ``work`` (after one untimed call)."""
    work()
    with KernelOps() as counter:
        work()
    return counter


def vmap_phases(model: torch.nn.Module, vectorized: VectorizedMicroBatchSAM, batch: dict[str, torch.Tensor], m: int) -> dict:
    """Kernel ops and aten calls of the parts of one vmap step, and of one plain forward + ``autograd.grad`` for comparison."""
    micro_batches = [micro_batch for micro_batch, _ in split_micro_batches(batch, BATCH // m)]
    stacked = vectorized.masks.of(stack_micro_batches(micro_batches))

    def ascent():
        return vectorized._ascent(stacked, m)

    _, grads_per_tensor, rows = ascent()
    grads = vectorized.layout.rows(grads_per_tensor)
    parameters = list(model.parameters())
    parts = {
        "batched_points": lambda: vectorized._ascent_points(m),
        "gradient_rows": lambda: vectorized.layout.rows(grads_per_tensor),
        "ascent_forward_and_backward": ascent,
        "perturbation_arithmetic": lambda: vectorized._perturbations(*clones()),
        "descent_points": lambda: vectorized._descent_points(grads),
        "plain_forward_and_grad_one_micro_batch": lambda: torch.autograd.grad(model(**micro_batches[0]).loss, parameters),
    }

    def clones():  # inside perturbation_arithmetic, not part of it
        return [g.clone() for g in grads], 1.0, None if rows is None else dataclasses.replace(rows, values=rows.values.clone())

    phases = {"aten_calls": {name: aten_calls(work) for name, work in parts.items()},
              "kernel_ops": {name: kernel_ops(work).count for name, work in parts.items()}}
    phases["aten_calls"]["perturbation_arithmetic"] -= aten_calls(clones)
    phases["kernel_ops"]["perturbation_arithmetic"] -= kernel_ops(clones).count
    phases["trainable_tensors"] = len(vectorized.params)
    return phases


def measure(steps: dict[str, callable], repeats: int, uncounted: frozenset[str] = frozenset()) -> dict[str, dict]:
    """Per step: the median time after 3 untimed calls, with the timed calls of all ``steps`` taken in turn (one of
    each per repeat, so that the load of a shared machine drifting between them does not bias their ratios), and
    the step's kernel ops, host reads and aten calls. The steps named in ``uncounted`` (compiled code, whose own
    kernels bypass the dispatcher, and which a dispatch mode would recompile) get no kernel ops or host reads."""
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, step in steps.items():
        counted = None if name in uncounted else kernel_ops(step)
        counts = {} if counted is None else {"kernel_ops": counted.count, "host_reads": counted.host_reads}
        results[name] = {"step_ms_median": 1000 * statistics.median(times[name]), "step_ms_samples": [1000 * t for t in times[name]],
                         **counts, "aten_calls": aten_calls(step)}
    return results


def hand_loop_step(config: str) -> callable:
    """A whole AdamW step in the hand-written loop of ``bench_step.py`` (``hand_step``): one of its ``HAND_CONFIGS``."""
    model, batch = build()
    step = hand_step(config, model, torch.optim.AdamW, {"lr": LR}, lambda b: model(**b).loss)
    return lambda: step(batch)


def trainer_steps(kind: str, repeats: int) -> dict[str, float]:
    """The median time of the Trainer's optimizer steps (``on_step_begin`` -> ``on_step_end``), timed apart from the
    others, and one step's kernel ops, host reads and aten calls: ``stock`` or ``sam``."""
    model, batch = build()

    class Repeated(torch.utils.data.Dataset):
        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            return {k: v[i % BATCH] for k, v in batch.items()}

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_steps=3 + repeats + 4, learning_rate=LR,
                  optim="adamw_torch", report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, use_cpu=True)
    if kind == "stock":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=Repeated())
    else:
        trainer = SAMTrainer(model=model, args=SAMTrainingArguments(**common, sam_rho=RHO, sam_micro_batch_mode="loop"), train_dataset=Repeated())
    times, counts = [], {}

    class Probe(TrainerCallback):  # steps 0-2 warm up, then timed steps, then one profiled and one counted step
        def on_step_begin(self, args, state, control, **kwargs):
            self.probe = {3 + repeats + 1: profile(activities=[ProfilerActivity.CPU]), 3 + repeats + 2: KernelOps()}.get(state.global_step)
            if self.probe is not None:
                self.probe.__enter__()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.start
            if self.probe is not None:
                self.probe.__exit__(None, None, None)
                if isinstance(self.probe, KernelOps):
                    counts["kernel_ops"], counts["host_reads"] = self.probe.count, self.probe.host_reads
                else:
                    counts["aten_calls"] = _aten_events(self.probe)
            elif 3 <= state.global_step - 1 < 3 + repeats:
                times.append(elapsed)

    trainer.add_callback(Probe())
    trainer.train()
    return {"step_ms_median": 1000 * statistics.median(times), "step_ms_samples": [1000 * t for t in times], **counts}


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
    compiled = VectorizedMicroBatchSAM(model, rho=RHO, compile=True)
    results = {}
    for m in args.m:
        results.update(measure({f"loop_m{m}": lambda: loop_step(model, sam, batch, m),
                                f"vmap_m{m}": lambda: vmap_step(vectorized, batch, m),
                                f"vmap_compiled_m{m}": lambda: vmap_step(compiled, batch, m)},
                               args.repeats, uncounted=frozenset({f"vmap_compiled_m{m}"})))
        results[f"vmap_m{m}"]["phases"] = vmap_phases(model, vectorized, batch, m)
        model.zero_grad(set_to_none=True)
        loop, vmapped, fast = results[f"loop_m{m}"], results[f"vmap_m{m}"], results[f"vmap_compiled_m{m}"]
        print(f"m={m:2d}  loop {loop['step_ms_median']:6.1f} ms {loop['kernel_ops']:6d} kernel ops {loop['host_reads']:3d} host reads"
              f"  |  vmap {vmapped['step_ms_median']:6.1f} ms {vmapped['kernel_ops']:6d} kernel ops {vmapped['host_reads']:3d} host reads"
              f"  |  vmap compiled {fast['step_ms_median']:6.1f} ms", flush=True)
    harness = {f"{kind}_trainer": trainer_steps(kind, args.repeats) for kind in ("stock", "sam")}
    harness.update(measure({config: hand_loop_step(config) for config in HAND_CONFIGS}, args.repeats))
    for name, entry in harness.items():
        print(f"{name:14s} {entry['step_ms_median']:6.1f} ms {entry['kernel_ops']:6d} kernel ops {entry['aten_calls']:6d} aten calls"
              f" {entry['host_reads']:4d} host reads", flush=True)
    out = {
        "benchmark": "profile_host_overhead",
        "setup": {"model": "BERT, 6 layers, hidden 16, 2 heads, dropout 0.1, SDPA", "batch": BATCH, "length": LENGTH, "rho": RHO,
                  "threads": 1, "repeats": args.repeats, "optimizer_in_harness": f"AdamW lr={LR}, clip_grad_norm_(1.0)",
                  "kernel_ops": "aten operations of one step that reach a kernel (TorchDispatchMode; views, aliases, allocations excluded)",
                  "aten_calls": "aten operator calls in one step (torch.profiler; nested calls and views included)",
                  "host_reads": "_local_scalar_dense calls in one step (.item(), .tolist(), bool(tensor)), those made by "
                                "torch.optim's code left out (AdamW's reads of its step counters, host tensors on a GPU too)"},
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "configs": results,
        "harness": harness,
    }  # fmt: skip
    print("vmap step phases:", json.dumps(results[f"vmap_m{args.m[0]}"]["phases"]))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
