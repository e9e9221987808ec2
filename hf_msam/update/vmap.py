"""The mSAM step for a group of equal-sized micro-batches in two vectorised passes (``torch.func.vmap``).

The same mathematics as :mod:`hf_msam.update.loop` (``docs/design.md`` section 2), for ``m`` micro-batches at once.
With ``W_i = w_i + 0`` broadcast to ``[m, ...]`` for every trainable tensor ``w_i``::

    L_k     = loss of functional_call(model, {W_i[k]}) on D_k      one vmap forward for all k
    G       = [d (sum_k L_k) / d W_i[k]  for all i]                one backward, outside vmap; rows [m, n]
    e_k     = the rule of :mod:`.rule` on each row G[k]            on the device, no host sync
    loss    = sum_k weight_k * L_k(w + e_k)                        one vmap forward at w + e_k
    .grad  += d loss / d w                                         one ordinary backward

``G`` lays the ascent gradients of
all ``n`` trainable numbers end to end (one ``[m, n]`` buffer per dtype and device, :class:`FlatLayout`), so the
norms, the scale and the perturbation are a handful of operations whatever the number of tensors (tensor by
tensor they would be several per tensor, and on a GPU each is a launch the host pays for). The points stay one ``[m, *shape]`` tensor per parameter, the layout
the batched matrix products want; those of the ascent are ``w_i`` broadcast (stride 0 along ``m``), so they cost
no memory. The backward of both passes runs outside ``vmap`` (no batching rules for backward are needed), and the
weights ``w`` are never modified: the perturbed point is a separate tensor, so there is nothing to restore. The
price is memory: ``G``, the descent points ``w + e_k`` and their gradients are ``m`` copies of the trainable
parameters each (the trainer's ``sam_vmap_memory_budget_mb`` bounds ``m`` per group).

Traps handled here (transformers 5.x):

* Hugging Face mask helpers inspect the padding mask on the host (``mask.all()``), which ``vmap``
  rejects: the 4D attention mask is built outside ``vmap`` and passed in. It is the mask the model's own forward
  builds (causal or bidirectional is the model's choice, :class:`AttentionMasks`), checked per sequence length.
* Dropout: ``vmap(randomness="different")`` draws independent masks per micro-batch; the random state of
  the CPU and of the model's accelerator is saved before the ascent pass and restored before the descent
  pass, so both passes of each micro-batch see the same masks, and the generator ends where one pass
  would leave it.
* ``scaled_dot_product_attention`` runs its math backend inside ``vmap``: the fused kernels have no batching
  rule on a CPU (``vmap`` runs them slice by slice), and on CUDA the memory-efficient
  kernel's backward fails on the batched layout ("LSE is not correctly aligned (strideH)"). The math
  backend is the same composite computation as eager attention.
* An embedding's ``padding_idx`` row gets no gradient in the stock layer, but its batched backward gives
  one to every micro-batch but the first: those columns of ``G`` (and of the descent gradient) are zeroed.

The input embedding table by its rows (``table_rows=True``, :class:`InputTableRows`): a group of ``m`` micro-batches
of ``b`` sequences of length ``L`` looks up at most ``m * b * L`` rows of the word embedding, half of the parameters
of a small BERT, so it gets no batched point. Its lookup ``E = W[ids]`` (``[m, b, L, d]``) is taken outside vmap and
handed to the model in place of the table's output (a stand-in module takes the table's place during the passes)::

    ascent:   E = W[ids] (a leaf)             dE = d (sum_k L_k) / dE           g_k rows = sum of dE_k over equal ids
    descent:  E = W[ids] + e_k[ids]           (differentiable in W: the stock lookup's backward into .grad)

with the rows of ``g_k`` coalesced per micro-batch on the device (a sort of the ``(k, id)`` keys, static shapes, no
host sync), the ``padding_idx`` positions left out as the stock backward leaves them, and ``||g_k||`` over the rows
and every other tensor. Only the model's input table (``get_input_embeddings()``) is treated so, when it is
trainable, not tied to another use (an LM head), not ``max_norm`` or ``scale_grad_by_freq``, and not in an
encoder-decoder; the lookup must be of the batch's ``input_ids`` exactly once per forward, which is checked.

``compile=True`` runs the vmapped loss of each pass through ``torch.compile`` (:data:`COMPILE_OPTIONS`); the random
state is handled as above, because inductor then calls eager's random operations in eager's order. Each pass
compiles once per sequence length (the length stays a static size under vmap, even with ``dynamic=True``), and
once more for the second call of a Hugging Face classifier, whose first forward sets ``config.problem_type``;
past ``torch._dynamo.config.recompile_limit`` (8) graphs a pass runs eagerly, with dynamo's warning. Padding to a
fixed length, or to a multiple (``pad_to_multiple_of``), keeps the lengths few.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .loop import RandomState, trainable_embeddings
from .rule import FollowsRule, SAMRule, row_norms


COMPILE_OPTIONS = {"fallback_random": True, "max_fusion_size": 1}
"""Inductor settings of ``VectorizedMicroBatchSAM(compile=True)``. ``fallback_random``: eager's random operations,
so that the dropout masks are those of the eager passes and of the loop. ``max_fusion_size=1``: no fusion; with
dropout inside SDPA (BERT's default attention) the fused CPU code returns NaN losses under vmap, while the
unfused code is exact (``docs/speed.md``)."""


@dataclass
class VectorizedResult:
    """What one vectorised group did; all tensors stay on the device (no host sync).

    Attributes:
        clean_losses: ``L_k(w)``, shape ``[m]``.
        perturbed_losses: ``L_k(w + e_k)``, shape ``[m]``.
        grad_norms: ``||g_k||`` (``||T g_k||`` for ASAM) divided by ``grad_scale``, shape ``[m]``.
        skipped: boolean ``[m]``, the ascent gradient was not finite so ``e_k = 0``.
    """

    clean_losses: torch.Tensor
    perturbed_losses: torch.Tensor
    grad_norms: torch.Tensor
    skipped: torch.Tensor


@dataclass(frozen=True)
class _Bucket:
    """The trainable tensors of one dtype and device, laid end to end in one flat vector.

    Attributes:
        indices: positions of the tensors in the list of trainable parameters, in storage order.
        shapes: their shapes.
        sizes: their numbers of elements (the widths of their slices).
    """

    indices: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]


class FlatLayout:
    """Rows ``[m, n]`` (one per dtype and device) that hold batched tensors ``[m, *shape]`` end to end, and their
    per-tensor views."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.dtype, t.device), []).append(i)
        self.buckets = [
            _Bucket(tuple(ix), tuple(tensors[i].shape for i in ix), tuple(tensors[i].numel() for i in ix))
            for ix in groups.values()
        ]
        self.count = len(tensors)

    def rows(self, batched: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[m, n]`` per bucket: the tensors ``batched[i]`` (``[m, *shape_i]``) end to end (``torch.cat``, a copy)."""
        return [torch.cat([batched[i].reshape(batched[i].shape[0], -1) for i in b.indices], dim=1) for b in self.buckets]

    def unflatten(self, rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The views ``[m, *shape]`` of every tensor in ``rows`` (one ``[m, n]`` per bucket), in the tensors' order."""
        views: list[torch.Tensor | None] = [None] * self.count
        for bucket, flat in zip(self.buckets, rows):
            m = flat.shape[0]
            for i, shape, piece in zip(bucket.indices, bucket.shapes, flat.split(bucket.sizes, dim=1)):
                views[i] = piece.view(m, *shape)
        return views

    def columns(self, index: int, row: int) -> tuple[int, slice]:
        """``(bucket, columns)`` of row ``row`` (along dimension 0) of tensor ``index`` in the rows."""
        for b, bucket in enumerate(self.buckets):
            if index in bucket.indices:
                position = bucket.indices.index(index)
                width = bucket.sizes[position] // bucket.shapes[position][0]
                start = sum(bucket.sizes[:position]) + row * width
                return b, slice(start, start + width)
        raise IndexError(index)


class VectorizedMicroBatchSAM(FollowsRule):
    """Both passes of mSAM for ``m`` stacked micro-batches of equal size, for one model.

    Args:
        module: the (unwrapped) model; its forward must return the loss (``labels`` in the batch).
        rho, adaptive, adaptive_eta, rule: as in :class:`hf_msam.update.loop.MicroBatchSAM` (``rule`` in place of the
            other three; one of ``rho`` and ``rule`` is needed).
        compile: run the vmapped loss of both passes through ``torch.compile`` (:data:`COMPILE_OPTIONS`).
        table_rows: treat the model's input embedding table by the rows looked up (:class:`InputTableRows`) where
            it can be; False: it gets a batched point like every other tensor.

    Attributes:
        params: every trainable tensor (the descent accumulates into their ``.grad``).
        batched_params: those with a batched point ``[m, *shape]`` per pass (all but the table treated by rows),
            laid out by ``layout``.
        table: the input table treated by rows, or None.
    """

    def __init__(
        self,
        module: nn.Module,
        rho: float | None = None,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        compile: bool = False,
        table_rows: bool = True,
        *,
        rule: SAMRule | None = None,
    ) -> None:
        if rule is None and rho is None:
            raise TypeError("VectorizedMicroBatchSAM needs rho (or rule).")
        self.module = module
        self.rule = rule if rule is not None else SAMRule(rho, adaptive, adaptive_eta)
        self.params = tuple(p for p in module.parameters() if p.requires_grad)
        # Every name of each trainable tensor (a tied LM head is the word embedding under a second name), so that
        # functional_call need not search the module for tied weights on every call (tie_weights=False).
        names_of: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(p), []).append(name)
        self.table = InputTableRows.of(module, names_of) if table_rows else None
        self.batched_params = tuple(p for p in self.params if self.table is None or p is not self.table.weight)
        self._aliases = tuple(tuple(names_of[id(p)]) for p in self.batched_params)
        self.layout = FlatLayout(self.batched_params)
        self._padding_rows = _padding_rows(module, self.batched_params)
        self._padding_columns = [self.layout.columns(index, row) for index, row in self._padding_rows.items()]
        self.masks = AttentionMasks(module)
        self._pass_losses = [self._ascent_losses, self._descent_losses]
        if compile:  # one compiled function per pass: each keeps its own cache of graphs (and its recompile limit)
            self._pass_losses = [torch.compile(f, options=COMPILE_OPTIONS) for f in self._pass_losses]

    # --------------------------------------------------------------------------------------------------
    def step(
        self,
        stacked: Mapping[str, Any],
        weights: torch.Tensor,
        grad_scale: float = 1.0,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    ) -> VectorizedResult:
        """Ascent, perturbation and descent of all micro-batches in ``stacked`` (tensors ``[m, b, ...]``).

        Accumulates ``sum_k weights[k] * grad L_k(w + e_k)`` into ``.grad`` of the trainable parameters, through
        ``backward`` (``accelerator.backward`` applies the fp16 loss scale). ``grad_scale`` multiplies the ascent
        loss (the fp16 loss scale; the direction is scale-invariant). ``autocast`` wraps both forwards.
        """
        m = weights.shape[0]
        batch = self.masks.of(stacked, autocast)
        randomness = RandomState.capture()

        clean, grads, rows = self._ascent(batch, m, grad_scale, autocast)
        grads = self.layout.rows(grads)  # G: one copy, then the per-tensor gradients are freed
        self._zero_padding_columns(grads)
        with torch.no_grad():
            norms, finite = self._perturbations(grads, grad_scale, rows)

        # Descent: one vmap forward at w + e_k (differentiable in w), one ordinary backward into .grad.
        randomness.restore()
        points = self._descent_points(grads)
        del grads
        ids = batch.get("input_ids")
        lookup = None if rows is None else self.table.lookup(ids) + rows.at_positions()
        hooks = [points[i].register_hook(_zero_rows_hook(row)) for i, row in self._padding_rows.items()]
        with autocast():
            perturbed = self._losses(points, batch, ascent=False, lookup=lookup)
        backward((perturbed.float() * weights).sum())
        for hook in hooks:
            hook.remove()
        return VectorizedResult(clean.detach().float(), perturbed.detach().float(), norms / grad_scale, ~finite)

    # --------------------------------------------------------------------------------------------------
    def _ascent(
        self,
        batch: Mapping[str, Any],
        m: int,
        grad_scale: float = 1.0,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> tuple[torch.Tensor, list[torch.Tensor], TableGradient | None]:
        """One vmap forward at ``w`` for all ``k`` and one backward (to the broadcast points and the table's lookup):
        ``[L_k(w)]``, the gradients ``[m, *shape]`` of the batched parameters, and the table's rows (or None)."""
        points = self._ascent_points(m)
        ids = batch.get("input_ids") if self.table is not None else None
        lookup = None if ids is None else self.table.lookup(ids).detach().requires_grad_(True)
        with autocast():
            clean = self._losses(points, batch, ascent=True, lookup=lookup)
        inputs = points if lookup is None else [*points, lookup]
        grads = torch.autograd.grad((clean.float() * grad_scale).sum(), inputs, allow_unused=True)
        rows = None if lookup is None else self.table.coalesce(ids, grads[-1])
        return clean, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, points)], rows

    def _ascent_points(self, m: int) -> list[torch.Tensor]:
        """``W_i = [w_i, ..., w_i]``, the ``[m, *shape]`` leaves of the ascent pass: views of ``w_i`` (stride 0 along
        ``m``, no copy); their gradients are ordinary ``[m, *shape]`` tensors."""
        return [p.detach().unsqueeze(0).expand(m, *p.shape).requires_grad_(True) for p in self.batched_params]

    def _descent_points(self, perturbations: list[torch.Tensor]) -> list[torch.Tensor]:
        """``w_i + e_k`` per tensor (``[m, *shape]``, differentiable in the parameters) from the rows of ``e``."""
        return [p.unsqueeze(0) + e for p, e in zip(self.batched_params, self.layout.unflatten(perturbations))]

    def _losses(
        self, points: list[torch.Tensor], batch: Mapping[str, Any], ascent: bool, lookup: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[L_k]`` of the model at the per-micro-batch parameters ``points[i][k]``, one vmap forward; ``lookup``
        (``[m, b, L, d]``) stands for the output of the table treated by rows."""
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        constants = {k: v for k, v in batch.items() if k not in tensors}
        if self.table is None:
            return self._pass_losses[0 if ascent else 1](list(points), tensors, constants)
        if lookup is not None:
            tensors[LOOKUP_KEY] = lookup
        with self.table.standing_in():  # outside the compiled function: the model's structure is the same every call
            losses = self._pass_losses[0 if ascent else 1](list(points), tensors, constants)
        self.table.check(looked_up=lookup is not None)
        return losses

    def _ascent_losses(self, points: list[torch.Tensor], tensors: dict[str, torch.Tensor], constants: dict[str, Any]):
        """:meth:`_vmapped_losses` at the broadcast points (a function of its own for ``torch.compile``'s cache)."""
        return self._vmapped_losses(points, tensors, constants)

    def _descent_losses(self, points: list[torch.Tensor], tensors: dict[str, torch.Tensor], constants: dict[str, Any]):
        """:meth:`_vmapped_losses` at ``w + e_k`` (a function of its own for ``torch.compile``'s cache)."""
        return self._vmapped_losses(points, tensors, constants)

    def _vmapped_losses(self, points: list[torch.Tensor], tensors: dict[str, torch.Tensor], constants: dict[str, Any]):
        """``vmap`` of ``functional_call`` over the leading dimension of ``points`` and ``tensors`` (compiled or not)."""
        aliases = self._aliases
        table = self.table

        def loss_of_one(params_k, tensors_k):
            named = {name: p_k for names, p_k in zip(aliases, params_k) for name in names}
            kwargs = {**constants, **tensors_k}
            lookup = kwargs.pop(LOOKUP_KEY, None)
            if lookup is not None:  # the stand-in's buffers: this micro-batch's input_ids and their lookup
                named.update(table.stand_in_tensors(kwargs["input_ids"], lookup))
            outputs = functional_call(self.module, named, args=(), kwargs=kwargs, tie_weights=False)
            return outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]

        with sdpa_kernel(SDPBackend.MATH):  # the fused kernels' batching rules: see the module docstring
            return vmap(loss_of_one, randomness="different")(points, tensors)

    def _perturbations(self, grads: list[torch.Tensor], grad_scale: float, rows: TableGradient | None = None):
        """``G -> e`` in place by the rule (rows ``[m, n]`` per bucket, and the table's rows), with ``||g_k||`` and its
        finiteness, all on the device."""
        tensors = list(grads) if rows is None else [*grads, rows.values]

        def weights() -> list[torch.Tensor]:  # w in the layout of tensors: rows [1, n], and the table's looked-up rows
            flat = self.layout.rows([p.detach().unsqueeze(0) for p in self.batched_params])
            return flat if rows is None else [*flat, self.table.weight.detach()[rows.table_rows]]

        def norm(tensors: list[torch.Tensor]) -> torch.Tensor:
            return row_norms(tensors[: len(grads)], () if rows is None else (rows.norms(),))

        def spread(values: torch.Tensor) -> list[torch.Tensor]:  # [m] -> per row of each tensor
            per_row = [values.unsqueeze(1)] * len(grads)
            return per_row if rows is None else [*per_row, values[rows.micro_batches].unsqueeze(1)]

        return self.rule.perturb_(tensors, weights, norm, grad_scale, spread)

    def _zero_padding_columns(self, grads: list[torch.Tensor]) -> None:
        for bucket, columns in self._padding_columns:
            grads[bucket][:, columns] = 0


LOOKUP_KEY = "__hf_msam_table_lookup__"
"""The key under which the table's lookup ``[m, b, L, d]`` travels into the vmapped function with the batch."""


@dataclass
class TableGradient:
    """The ascent gradients (then the perturbations) of the input table for ``m`` micro-batches, by rows.

    Slot ``s`` of ``N = m * b * L`` holds row ``table_rows[s]`` of micro-batch ``micro_batches[s]``: the sum of the
    lookup's gradient over that micro-batch's positions with that id. Slots past the number of distinct
    ``(k, id)`` pairs (and the ``padding_idx`` row) hold zeros, so they add nothing to a norm or a perturbation.

    Attributes:
        values: ``[N, d]`` the rows.
        micro_batches: ``[N]`` their micro-batch ``k``.
        table_rows: ``[N]`` their row of the table.
        slots: ``[m, b, L]`` the slot of every looked-up position.
    """

    values: torch.Tensor
    micro_batches: torch.Tensor
    table_rows: torch.Tensor
    slots: torch.Tensor

    def norms(self) -> torch.Tensor:
        """``||g_k||`` over the table, ``[m]`` (float32 or wider)."""
        m = self.slots.shape[0]
        dtype = torch.promote_types(self.values.dtype, torch.float32)
        squares = self.values.to(dtype).square().sum(dim=1)
        return torch.zeros(m, dtype=dtype, device=squares.device).index_add_(0, self.micro_batches, squares).sqrt().float()

    def at_positions(self) -> torch.Tensor:
        """``e_k[ids_k]`` for every looked-up position, ``[m, b, L, d]``."""
        return self.values[self.slots.reshape(-1)].view(*self.slots.shape, self.values.shape[1])


class InputTableRows:
    """A model's input embedding table treated by the rows a group of micro-batches looks up (module docstring).

    During a vectorised pass (:meth:`standing_in`) a :class:`LookupStandIn` takes the table's place in the model, and
    ``functional_call`` hands it each micro-batch's ``input_ids`` and lookup as its buffers: no hook and no state
    that a compiled pass would have to carry out of its graph.

    Args:
        embedding: the table's module.
        path: its name in the model (``bert.embeddings.word_embeddings``).
    """

    def __init__(self, module: nn.Module, embedding: nn.Embedding, path: str) -> None:
        self.embedding = embedding
        self.weight = embedding.weight
        self.path = path
        parent_path, _, self._attribute = path.rpartition(".")
        self._parent = module.get_submodule(parent_path)
        self.stand_in = LookupStandIn()

    @classmethod
    def of(cls, module: nn.Module, names_of: Mapping[int, Sequence[str]]) -> InputTableRows | None:
        """The input table of ``module`` if it can be treated by rows (module docstring), else None."""
        try:
            table = module.get_input_embeddings()
        except (AttributeError, NotImplementedError):  # not a transformers model, or one without an input table
            return None
        config = getattr(module, "config", None)
        paths = [name for name, m in module.named_modules(remove_duplicate=False) if m is table]
        if (
            not any(table is t for t in trainable_embeddings(module))  # trainable, rows-capable, as on the loop path
            or len(paths) != 1  # one place in the model (not shared between an encoder and a decoder)
            or len(names_of.get(id(table.weight), ())) != 1  # tied: also an LM head
            or table.max_norm is not None
            or getattr(config, "is_encoder_decoder", False)
        ):
            return None
        return cls(module, table, paths[0])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """``W[ids]``, the stock lookup (its backward leaves the ``padding_idx`` row out)."""
        return torch.nn.functional.embedding(ids, self.weight, padding_idx=self.embedding.padding_idx)

    def coalesce(self, ids: torch.Tensor, lookup_grad: torch.Tensor | None) -> TableGradient:
        """The rows of ``g_k`` from the gradient of the lookup ``[m, b, L, d]``, per micro-batch, on the device."""
        m, d = ids.shape[0], self.weight.shape[1]
        if lookup_grad is None:  # the loss does not depend on the lookup
            lookup_grad = torch.zeros(*ids.shape, d, dtype=self.weight.dtype, device=ids.device)
        if self.embedding.padding_idx is not None:
            lookup_grad = lookup_grad.masked_fill((ids == self.embedding.padding_idx).unsqueeze(-1), 0.0)
        vocabulary = self.weight.shape[0]
        keys = (torch.arange(m, device=ids.device).view(m, *[1] * (ids.dim() - 1)) * vocabulary + ids).reshape(-1)
        sorted_keys, order = keys.sort()
        first = torch.ones_like(sorted_keys, dtype=torch.bool)
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
        slots = torch.empty_like(keys).scatter_(0, order, first.cumsum(0) - 1)
        values = lookup_grad.new_zeros(keys.numel(), d).index_add_(0, slots, lookup_grad.reshape(-1, d))
        slot_keys = torch.zeros_like(keys).scatter_(0, slots, keys)
        return TableGradient(values, slot_keys // vocabulary, slot_keys % vocabulary, slots.view(ids.shape))

    @contextlib.contextmanager
    def standing_in(self):
        """Inside, the stand-in takes the table's place in the model (the table is put back on the way out)."""
        self.stand_in.calls = 0
        setattr(self._parent, self._attribute, self.stand_in)
        try:
            yield
        finally:
            setattr(self._parent, self._attribute, self.embedding)

    def stand_in_tensors(self, ids: torch.Tensor, lookup: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stand-in's buffers for ``functional_call``: the micro-batch's ``input_ids`` and their lookup."""
        return {f"{self.path}.ids": ids, f"{self.path}.lookup": lookup}

    def check(self, looked_up: bool) -> None:
        """Raise unless the forward called the table once with the batch's ``input_ids`` (``looked_up``), or, for a
        batch without them, not at all."""
        if self.stand_in.calls != int(looked_up):
            raise ValueError(_NOT_BY_ROWS)


class LookupStandIn(nn.Module):
    """The input table's stand-in during a vectorised pass: returns its buffer ``lookup`` for the ids in its buffer
    ``ids`` (the same tensor object as the batch's ``input_ids``), and refuses any other call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ids", torch.empty(0), persistent=False)
        self.register_buffer("lookup", torch.empty(0), persistent=False)
        self.calls = 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if input is not self.ids:
            raise ValueError(_NOT_BY_ROWS)
        return self.lookup


_NOT_BY_ROWS = (
    "the input embedding was not looked up exactly once per forward with the batch's input_ids, so the vmap path "
    "cannot treat it by rows: set sam_sparse_embeddings=False"
)


def _zero_rows_hook(row: int):
    """A gradient hook that zeroes row ``row`` of every micro-batch's gradient ``[m, rows, ...]``."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:, row] = 0
        return grad

    return hook


def unsupported_reason(module: nn.Module) -> str | None:
    """Why the vmap path cannot reproduce the model's gradient, or None.

    A trainable ``nn.Embedding`` with a ``padding_idx`` whose weight is used elsewhere too (an LM head tied to it):
    the path zeroes the padding row of the batched weight's gradient (the stock lookup gives it none, the batched
    backward does), which would also zero what the other use gives that row.
    """
    uses: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for name, m in module.named_modules():
        if isinstance(m, nn.Embedding) and m.padding_idx is not None and m.weight.requires_grad and uses[id(m.weight)] > 1:
            return f"the embedding {name} has a padding_idx and its weight is tied to another use (an LM head)"
    return None


def _padding_rows(module: nn.Module, params: tuple[nn.Parameter, ...]) -> dict[int, int]:
    """``{index in params: padding_idx}`` for every trainable ``nn.Embedding`` weight with a ``padding_idx``."""
    index_of = {id(p): i for i, p in enumerate(params)}
    return {
        index_of[id(m.weight)]: m.padding_idx
        for m in module.modules()
        if isinstance(m, nn.Embedding) and m.padding_idx is not None and id(m.weight) in index_of
    }


class AttentionMasks:
    """The 4D attention masks of the vmap path, taken from the model's own forward (module docstring).

    ``transformers.masking_utils`` reads the padding mask on the host (``mask.all()``), which ``vmap`` rejects, so the
    4D mask is built outside ``vmap`` and handed in; the model passes a 4D mask through to its attention unchanged.
    Which mask a model builds (causal, bidirectional, sliding-window, per layer) is the model's choice, made in its
    base model's forward, and no configuration flag tells it for every model (``LlamaForSequenceClassification`` is
    causal with neither ``config.is_decoder`` nor ``can_generate()``). So the mask is not chosen here: each group's is
    the one the model's own forward gives its first attention module, on the group's micro-batches laid end to end,
    caught by a pre-hook that ends that forward there (only the embeddings run). For each new sequence length the
    premise is checked on two forwards to the last attention module: in the model's own forward every attention
    module receives that same mask, and with it passed in they receive what they receive in the model's own forward.
    Anything else (a sliding window that differs from the full mask at this length, a model that rebuilds a mask it
    is given, masks that are not tensors) raises :class:`AttentionMaskMismatch`: ``"auto"`` then runs the loop.

    The attention modules are the innermost modules whose ``forward`` takes an ``attention_mask``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        signatures = {m: inspect.signature(m.forward) for m in module.modules()}
        taking = {m: signature for m, signature in signatures.items() if "attention_mask" in signature.parameters}
        self.attention = {  # innermost: no submodule takes one too
            m: signature for m, signature in taking.items() if not any(c in taking for c in m.modules() if c is not m)
        }
        self.checked_lengths: set[int] = set()

    def of(
        self, stacked: Mapping[str, Any], autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    ) -> dict[str, Any]:
        """``stacked`` with its 2D padding mask ``[m, b, L]`` replaced by the model's 4D mask ``[m, b, 1, Q, K]``, or
        dropped where the model's forward gives its attention no mask (``None``: no padding; SDPA's ``is_causal``)."""
        batch = dict(stacked)
        mask = batch.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 3:
            return batch
        m, b, length = mask.shape
        flat = {k: v.flatten(0, 1) if isinstance(v, torch.Tensor) and v.dim() > 1 else v for k, v in batch.items()}
        mask_4d = self._received(flat, autocast, first_only=True)[0]
        if length not in self.checked_lengths:
            self._check(flat, mask_4d, autocast)
            self.checked_lengths.add(length)
        if mask_4d is None:
            del batch["attention_mask"]
        elif mask_4d.shape[0] == m * b:
            batch["attention_mask"] = mask_4d.view(m, b, *mask_4d.shape[1:])
        else:  # one mask for every sequence (batch dimension 1)
            batch["attention_mask"] = mask_4d.unsqueeze(0).expand(m, *mask_4d.shape)
        return batch

    def _check(self, flat: dict[str, Any], mask_4d: torch.Tensor | None, autocast) -> None:
        """Raise unless every attention module receives ``mask_4d`` in the model's own forward, and receives what it
        receives there when ``mask_4d`` is passed in (the vmap path's batch)."""
        own = self._received(flat, autocast)
        handed = {k: v for k, v in flat.items() if k != "attention_mask"}
        if mask_4d is not None:
            handed["attention_mask"] = mask_4d
        passed = self._received(handed, autocast)
        if not all(_same_mask(received, mask_4d) for received in own):
            raise AttentionMaskMismatch(
                f"the model's attention modules receive different masks at sequence length {flat['attention_mask'].shape[-1]} "
                "(sliding-window or chunked attention), and the vmap path hands every module one mask"
            )
        if len(passed) != len(own) or not all(_same_mask(a, b) for a, b in zip(passed, own)):
            raise AttentionMaskMismatch(
                "the model's attention modules do not receive the 4D mask its own forward builds when it is passed in"
            )

    def _received(self, batch: Mapping[str, Any], autocast, first_only: bool = False) -> list[torch.Tensor | None]:
        """The ``attention_mask`` each attention module receives, in call order, in the model's forward of ``batch``
        (no gradient, the random state left as found); the forward ends at the first (``first_only``) or last one."""
        received: list[torch.Tensor | None] = []
        wanted = 1 if first_only else len(self.attention)

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            mask = self.attention[module].bind_partial(*args, **kwargs).arguments.get("attention_mask")
            if mask is not None and not isinstance(mask, torch.Tensor):
                raise AttentionMaskMismatch(f"the model's attention receives a {type(mask).__name__}, not a tensor")
            received.append(mask)
            if len(received) == wanted:
                raise _Captured

        hooks = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in self.attention]
        randomness = RandomState.capture()
        try:
            with torch.no_grad(), autocast():
                self.module(**batch)
        except _Captured:
            pass
        finally:
            randomness.restore()
            for hook in hooks:
                hook.remove()
        if not received:
            raise AttentionMaskMismatch("no module of the model that takes an attention_mask was called by its forward")
        return received


class AttentionMaskMismatch(ValueError):
    """The vmap path cannot hand the model the attention masks its own forward builds (:class:`AttentionMasks`)."""


class _Captured(Exception):
    """Ends a forward once the attention masks it was run for are captured."""


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """The same mask for the same attention module: both absent, or equal tensors of one shape and dtype."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def stack_micro_batches(micro_batches: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``[m, b, ...]`` tensors from ``m`` micro-batches of equal size; other values are taken from the first."""
    first = micro_batches[0]
    return {
        key: torch.stack([mb[key] for mb in micro_batches]) if isinstance(value, torch.Tensor) and value.dim() > 0 else value
        for key, value in first.items()
    }
