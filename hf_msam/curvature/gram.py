"""The weighted empirical NTK of one-example batches: the Gram matrix of the per-example Gauss-Newton factors,
computed exactly within a memory budget.

For example i with logits z_i (C values), Jacobian J_i = dz_i/dw (C x d) and A_i the Hessian of its loss in
the logits (``heads.logit_hessian``), eigendecomposed as A_i = U_i diag(a_i) U_i^T, the Gauss-Newton factor is

    Phi_i = diag(a_i)^{1/2} U_i^T J_i      (r x d; r = C - 1 for cross-entropy, whose A_i has the null
                                            vector 1, else r = C)

so that H_i = J_i^T A_i J_i = Phi_i^T Phi_i, and the Gram matrix is K = Phi Phi^T (nr x nr), block K_ij =
Phi_i Phi_j^T. Phi_i = U_i^T A_i^{1/2} J_i up to the dropped null rows, so K_ij = U_i^T (A_i^{1/2} J_i J_j^T
A_j^{1/2}) U_j: every quantity coherence takes from K (the Frobenius norm of a block, the eigenvalues of a
diagonal block, the eigenvalues of K) equals that of the weighted NTK A^{1/2} J J^T A^{1/2} (``docs/design.md``
section 3.3). Each row of Phi_i is one reverse pass, a vector-Jacobian product with a row of diag(a_i)^{1/2}
U_i^T as the cotangent; binary cross-entropy heads thus need one backward pass per example.

Memory. All n r rows of d floats do not fit (all-MiniLM-L6-v2: 256 rows of 22.7M floats are 23 GB), so

- *columns*: a weight of an ``nn.Embedding`` enters the loss only through the rows it looks up, so its
  Jacobian columns outside the rows the examples use are exactly zero and are left out (for a BERT, half
  of the parameters). This is checked on the first example: a weight also used otherwise (tied to an
  output layer, say) keeps all its columns.
- *rows*: a resident block of R examples and a stream block of s examples are held (``memory_gb``). Pass p
  computes the rows of examples [pR, (p+1)R), their Gram block, then streams the later examples s at a
  time, K[resident, stream] = Phi_resident Phi_stream^T. Row evaluations: n + sum_p (n - (p+1)R), about
  n + n^2 / (2R); ``GramPlan`` counts them exactly, for the planner and the progress bar.

Sketch. With a C-class head (r = C - 1 rows per example) few examples stay resident and the recomputation
dominates (5 classes, 2 GB: 8 resident examples, 1,501 evaluations for 151 examples instead of 151). The
sketched mode evaluates each example once: each row u (d floats) is compressed by a CountSketch (Charikar,
Chen and Farach-Colton 2002; Clarkson and Woodruff 2013), (Su)_b = sum_{l: h(l) = b} s(l) u_l with a seeded
random bucket h(l) in [0, k) and sign s(l) = +-1 per kept coordinate, so that all n r sketched rows stay
resident (n r k floats). <Su, Sv> is unbiased for <u, v> with

    Var <Su, Sv> = (||u||^2 ||v||^2 + <u, v>^2 - 2 sum_l u_l^2 v_l^2) / k  <=  (||u||^2 ||v||^2 + <u, v>^2) / k.

The diagonal blocks K_ii = Phi_i Phi_i^T are computed exactly from the unsketched rows (max_i lambda_max(H_i)
and the S_ii are then exact); only the blocks between examples carry sketch noise, and ``sketch_error_bound``
bounds its effect on lambda_max(S) (hence on sigma, whose denominator is exact) in root mean square.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .heads import logit_hessian
from .operators import Batch, _grads, curvature_mode, model_device, output_field, to_device, trainable_parameters

BYTES_PER_FLOAT = 4
DEFAULT_SKETCH_DIM = 2**18  # k of the CountSketch: relative noise of an entry about sqrt(2 / k) = 0.3%
SKETCH_MODES = ("auto", "exact")


def _trim_padding(example: Batch) -> Batch:
    """Drop trailing padded positions of a one-example batch (right padding only; exact with masking)."""
    mask = example.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return example
    length = int(mask[0].sum())
    if length == 0 or not bool(mask[0, :length].all()):
        return example
    full = mask.shape[1]
    return {
        key: value[:, :length] if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == full else value
        for key, value in example.items()
    }


def factor_rows(problem_type: str, num_logits: int) -> int:
    """r, the rows of Phi_i: the rank of A_i (C - 1 for cross-entropy over C > 1 classes, else C)."""
    if problem_type == "single_label_classification" and num_logits > 1:
        return num_logits - 1
    return num_logits


def _cotangents(logits: torch.Tensor, problem_type: str, rows: int) -> torch.Tensor:
    """diag(a)^{1/2} U^T restricted to the top ``rows`` eigenpairs of A (rows x C, float32)."""
    values, vectors = torch.linalg.eigh(logit_hessian(logits.detach().reshape(1, -1), problem_type)[0])
    values, vectors = values[-rows:].clamp_min(0), vectors[:, -rows:]
    return (values.sqrt()[:, None] * vectors.T).to(logits.dtype)


@dataclass(frozen=True)
class GramPlan:
    """How ``WeightedNTK.compute`` holds and recomputes rows for n examples."""

    num_examples: int
    rows_per_example: int
    dim: int  # columns kept (after dropping the unused rows of embedding tables)
    resident_examples: int
    stream_examples: int
    sketch_dim: int = 0  # k of the CountSketch; 0: exact

    @property
    def row_evaluations(self) -> int:
        """Examples whose rows are computed, counting recomputation: n + sum_p (n - (p+1)R) exact, n sketched."""
        n, r = self.num_examples, self.resident_examples
        if self.sketch_dim:
            return n
        return n + sum(max(0, n - end) for end in range(r, n + r, r))

    @property
    def gram_flops(self) -> float:
        """2 x multiply-adds of the products: exact, Phi_resident Phi_resident^T and Phi_resident Phi_stream^T;
        sketched, the exact diagonal blocks Phi_i Phi_i^T and the (n r x k) (k x n r) product of the sketches."""
        n, r, rows = self.num_examples, self.resident_examples, self.rows_per_example
        if self.sketch_dim:
            return 2.0 * n * rows * rows * self.dim + 2.0 * (n * rows) ** 2 * self.sketch_dim
        pairs = sum(min(r, n - a) * (n - a) for a in range(0, n, r))
        return 2.0 * pairs * rows * rows * self.dim

    @property
    def buffer_bytes(self) -> int:
        if self.sketch_dim:
            return (self.num_examples * self.sketch_dim + self.dim) * self.rows_per_example * BYTES_PER_FLOAT
        return (self.resident_examples + self.stream_examples) * self.rows_per_example * self.dim * BYTES_PER_FLOAT


def plan_gram(
    num_examples: int,
    rows_per_example: int,
    dim: int,
    memory_gb: float,
    *,
    stream_examples: int = 8,
    sketch: str | int = "exact",
) -> GramPlan:
    """Exact: the largest resident block that fits ``memory_gb`` beside a stream block of ``stream_examples``
    (fewer if even that does not fit; one example each at the least). ``sketch``: "exact"; an int k, the
    CountSketch dimension; "auto", exact when its resident block holds every example (each example evaluated
    once, no sketch error), else a sketch of ``DEFAULT_SKETCH_DIM`` halved until the sketches fit ``memory_gb``
    (and at most the exact dimension)."""
    sketch = parse_sketch(sketch)
    per_example = rows_per_example * dim * BYTES_PER_FLOAT
    fit = max(2, int(memory_gb * 2**30 // per_example))
    stream = max(1, min(stream_examples, fit // 4, num_examples))
    resident = max(1, min(fit - stream, num_examples))
    exact = GramPlan(num_examples, rows_per_example, dim, resident, stream)
    if sketch == "exact" or (sketch == "auto" and resident >= num_examples):
        return exact
    if sketch == "auto":
        k = DEFAULT_SKETCH_DIM
        while k > 1024 and (num_examples * k + dim) * rows_per_example * BYTES_PER_FLOAT > memory_gb * 2**30:
            k //= 2
        k = min(k, dim)
    else:
        k = sketch
    return GramPlan(num_examples, rows_per_example, dim, num_examples, 0, k)


def parse_sketch(value: str | int) -> str | int:
    """``"auto"``, ``"exact"`` or a CountSketch dimension k >= 1 (an int, or its digits as text)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not (value in SKETCH_MODES or (isinstance(value, int) and value >= 1)):
        raise ValueError(f"coherence_sketch must be 'auto', 'exact' or a sketch dimension >= 1, got {value!r}")
    return value


class CountSketch:
    """A seeded CountSketch R^dim -> R^k: bucket h(l) and sign s(l) per coordinate (module docstring)."""

    def __init__(self, dim: int, k: int, seed: int, device: torch.device | str = "cpu"):
        g = torch.Generator().manual_seed(seed)
        self.k = k
        self.buckets = torch.randint(0, k, (dim,), generator=g, dtype=torch.int32).to(device)
        self.signs = (torch.randint(0, 2, (dim,), generator=g, dtype=torch.int8) * 2 - 1).to(device)
        self._scratch = torch.empty(dim, device=device)

    def apply(self, row: torch.Tensor, out: torch.Tensor) -> None:
        """out (k floats) += S row."""
        torch.mul(row, self.signs, out=self._scratch)
        out.index_add_(0, self.buckets, self._scratch)


class _Columns:
    """The Jacobian columns kept: every trainable parameter whole, except the weights of ``nn.Embedding``
    modules, restricted to the rows the examples look up (``index[k]`` for parameter k)."""

    def __init__(self, model: torch.nn.Module, examples: Sequence[Batch]):
        self.params = trainable_parameters(model)
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        tables = {
            id(m.weight): m for m in model.modules()
            if isinstance(m, torch.nn.Embedding) and m.weight.requires_grad and owners[id(m.weight)] == 1
        }
        used: dict[int, list[torch.Tensor]] = {key: [] for key in tables}
        first: dict[int, torch.Tensor] = {}

        def recorder(key: int) -> Callable:
            def hook(module: torch.nn.Module, args: tuple) -> None:
                used[key].append(args[0].detach().reshape(-1))

            return hook

        handles = [m.register_forward_pre_hook(recorder(key)) for key, m in tables.items()]
        try:
            with torch.no_grad():
                for i, example in enumerate(examples):
                    model(**to_device(_trim_padding(example), model_device(model)))
                    if i == 0:
                        first = {key: torch.cat(ids).unique() for key, ids in used.items() if ids}
        finally:
            for handle in handles:
                handle.remove()
        self.index: dict[int, torch.Tensor] = {}
        self._first: dict[int, torch.Tensor] = {}
        for k, p in enumerate(self.params):
            if id(p) in first:
                self.index[k] = torch.cat(used[id(p)]).unique()
                self._first[k] = first[id(p)]
        self.sizes = [
            int(self.index[k].numel()) * p[0].numel() if k in self.index else p.numel() for k, p in enumerate(self.params)
        ]
        self.dim = sum(self.sizes)

    def keep_only_exact(self, grads: Sequence[torch.Tensor]) -> None:
        """Keep the restriction of a table only where the first example's gradient is zero outside the rows
        it looked up (a weight tied elsewhere has gradient there): exactness over memory."""
        for k in list(self.index):
            outside = torch.ones(grads[k].shape[0], dtype=torch.bool, device=grads[k].device)
            outside[self._first[k].to(outside.device)] = False
            if bool(grads[k][outside].any()):
                del self.index[k]
                self.sizes[k] = self.params[k].numel()
        self.dim = sum(self.sizes)

    def write(self, grads: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        offset = 0
        for k, (g, size) in enumerate(zip(grads, self.sizes)):
            target = out[offset : offset + size]
            if k in self.index:
                torch.index_select(g, 0, self.index[k].to(g.device), out=target.view(-1, *g.shape[1:]))
            else:
                target.copy_(g.reshape(-1))
            offset += size


class _Factors:
    """Rows of Phi_i for the examples, written into caller-owned buffers."""

    def __init__(self, model: torch.nn.Module, examples: Sequence[Batch], problem_type: str):
        self.model, self.examples, self.problem_type = model, examples, problem_type
        self.columns = _Columns(model, examples)
        logits = self._logits(0)
        self.rows = factor_rows(problem_type, logits.numel())
        self.columns.keep_only_exact(_grads(logits.sum(), self.columns.params))

    def _logits(self, i: int) -> torch.Tensor:
        outputs = self.model(**to_device(_trim_padding(self.examples[i]), model_device(self.model)))
        return output_field(outputs, "logits").reshape(-1)

    def write(self, i: int, out: torch.Tensor) -> None:
        """Phi_i into ``out`` (rows x dim): one forward pass, ``rows`` reverse passes."""
        logits = self._logits(i)
        weights = _cotangents(logits, self.problem_type, self.rows)
        for row in range(self.rows):
            grads = _grads(logits, self.columns.params, grad_outputs=weights[row], retain_graph=row + 1 < self.rows)
            self.columns.write(grads, out[row])


class WeightedNTK:
    """The Gram matrix K = Phi Phi^T of ``examples`` (one-example batches), with its setup (which columns
    to keep, r) done once on construction, so that a planner can time a row and plan before computing."""

    def __init__(self, model: torch.nn.Module, examples: Sequence[Batch], problem_type: str):
        if not examples:
            raise ValueError("coherence: no examples")
        with curvature_mode(model):
            self._factors = _Factors(model, examples, problem_type)
        self.model = model
        self.rows_per_example = self._factors.rows
        self.dim = self._factors.columns.dim

    def plan(self, num_examples: int, memory_gb: float, *, stream_examples: int = 8,
             sketch: str | int = "exact") -> GramPlan:
        return plan_gram(num_examples, self.rows_per_example, self.dim, memory_gb, stream_examples=stream_examples,
                         sketch=sketch)

    def time_sketch(self, plan: GramPlan, clock: Callable[[], float] = time.perf_counter) -> float:
        """Seconds to sketch the rows of one example (0 for an exact plan): one row timed, times r."""
        if not plan.sketch_dim:
            return 0.0
        device = model_device(self.model)
        sketch = CountSketch(self.dim, plan.sketch_dim, 0, device)
        row, out = torch.randn(self.dim, device=device), torch.zeros(plan.sketch_dim, device=device)
        start = clock()
        sketch.apply(row, out)
        return (clock() - start) * self.rows_per_example

    def time_example(self, clock: Callable[[], float] = time.perf_counter, repeats: int = 3) -> float:
        """Seconds to compute the rows of one example: the median over the first ``repeats`` examples (one
        timing on a shared machine can be off by a factor of two)."""
        with curvature_mode(self.model):
            out = torch.empty(self.rows_per_example, self.dim, device=model_device(self.model))
            times = []
            for i in range(min(repeats, len(self._factors.examples))):
                start = clock()
                self._factors.write(i, out)
                times.append(clock() - start)
        return float(statistics.median(times))

    def time_products(self, plan: GramPlan, clock: Callable[[], float] = time.perf_counter) -> float:
        """Seconds of ``plan.gram_flops``, from timing one product of the plan's shape on a slice of columns
        (exact: resident by stream; sketched: the sketches by themselves, at most 512 rows)."""
        device = model_device(self.model)
        if plan.sketch_dim:
            width = max(1, min(plan.sketch_dim, 2**16))
            a = torch.randn(min(512, plan.num_examples * self.rows_per_example), width, device=device)
            b = a
        else:
            width = max(1, min(self.dim, 2**20))
            a = torch.randn(plan.resident_examples * self.rows_per_example, width, device=device)
            b = torch.randn(plan.stream_examples * self.rows_per_example, width, device=device)
        start = clock()
        a @ b.T
        seconds = clock() - start
        return seconds * plan.gram_flops / (2.0 * a.shape[0] * b.shape[0] * width)

    def compute(self, plan: GramPlan, on_progress: Callable[[int, int], None] | None = None,
                *, seed: int = 0) -> torch.Tensor:
        """K (float64, n r x n r, the rows of example i at [i r, (i+1) r)) for the first ``plan.num_examples``
        examples, holding the two row buffers of ``plan`` (or, sketched, the sketches of CountSketch ``seed``).
        ``on_progress(done, total)`` counts the row evaluations of examples (``GramPlan.row_evaluations``)."""
        if plan.sketch_dim:
            return self._compute_sketched(plan, on_progress, seed)
        n, r, dim = plan.num_examples, self.rows_per_example, self.dim
        factors, done, total = self._factors, 0, plan.row_evaluations
        with curvature_mode(self.model):
            device = model_device(self.model)
            resident = torch.empty(plan.resident_examples * r, dim, device=device)
            stream = torch.empty(plan.stream_examples * r, dim, device=device)
            k = torch.zeros(n * r, n * r, dtype=torch.float64)

            def fill(buffer: torch.Tensor, start: int, stop: int) -> torch.Tensor:
                nonlocal done
                for j, i in enumerate(range(start, stop)):
                    factors.write(i, buffer[j * r : (j + 1) * r])
                    done += 1
                    if on_progress is not None:
                        on_progress(done, total)
                return buffer[: (stop - start) * r]

            for a in range(0, n, plan.resident_examples):
                a_stop = min(a + plan.resident_examples, n)
                phi_a = fill(resident, a, a_stop)
                k[a * r : a_stop * r, a * r : a_stop * r] = (phi_a @ phi_a.T).double().cpu()
                for b in range(a_stop, n, plan.stream_examples):
                    b_stop = min(b + plan.stream_examples, n)
                    block = (phi_a @ fill(stream, b, b_stop).T).double().cpu()
                    k[a * r : a_stop * r, b * r : b_stop * r] = block
                    k[b * r : b_stop * r, a * r : a_stop * r] = block.T
        return k

    def _compute_sketched(self, plan: GramPlan, on_progress: Callable[[int, int], None] | None,
                          seed: int) -> torch.Tensor:
        """K with exact diagonal blocks Phi_i Phi_i^T and the blocks between examples from the CountSketches of
        the rows."""
        n, r = plan.num_examples, self.rows_per_example
        with curvature_mode(self.model):
            device = model_device(self.model)
            sketch = CountSketch(self.dim, plan.sketch_dim, seed, device)
            sketched = torch.zeros(n * r, plan.sketch_dim, device=device)
            rows = torch.empty(r, self.dim, device=device)
            diagonal = []
            for i in range(n):
                self._factors.write(i, rows)
                diagonal.append((rows @ rows.T).double().cpu())
                for a in range(r):
                    sketch.apply(rows[a], sketched[i * r + a])
                if on_progress is not None:
                    on_progress(i + 1, n)
            del rows, sketch
            k = (sketched @ sketched.T).double().cpu()
        for i, block in enumerate(diagonal):
            k[i * r : (i + 1) * r, i * r : (i + 1) * r] = block
        return k


def sketch_error_bound(k: torch.Tensor, rows_per_example: int, sketch_dim: int) -> float:
    """Root-mean-square bound on |lambda_max(S~) - lambda_max(S)| for a CountSketched Gram ``k`` (exact diagonal
    blocks), S_ij = ||K_ij||_F.

    Weyl: |lambda_max(S~) - lambda_max(S)| <= ||S~ - S||_2 <= ||S~ - S||_F; reverse triangle inequality:
    |S~_ij - S_ij| <= ||K~_ij - K_ij||_F; the CountSketch variance (module docstring) then gives
    E ||S~ - S||_F^2 <= sum over entries a, b of different examples of (K_aa K_bb + K_ab^2) / k. K_aa are exact;
    K_ab^2 is taken from the sketch. Returns the square root of that sum."""
    diagonal = k.diagonal().clamp_min(0)
    example = torch.arange(k.shape[0]) // rows_per_example
    between = example[:, None] != example[None, :]
    variance = ((diagonal[:, None] * diagonal[None, :] + k**2) * between).sum() / sketch_dim
    return float(variance.sqrt())
