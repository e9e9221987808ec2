"""The loop engine: the mSAM update one micro-batch at a time, in plain torch (no Trainer, no accelerate).

Per micro-batch ``D_k`` of the mini-batch ``D`` (``docs/design.md`` section 2; Behdin et al., 2023)::

    g_k    = grad L_k(w)                                    ascent gradient, local to the micro-batch
    e_k    = rho * T^2 g_k / (||T g_k|| + EPS)               the rule of :mod:`.rule` (SAM: T = 1; ASAM: T = |w| + eta)
    d_k    = grad L_k(w + e_k)                              descent gradient at the perturbed point
    update = base_optimizer.step( sum_k (|D_k| / |D|) d_k )     weights restored to w first

``m = 1`` is SAM; ``rho = 0`` is the base optimizer. Only trainable tensors are perturbed and enter the norm.
The restore is exact (the parameters get their original tensors back), so the update does not drift with the
number of micro-batches; the extra memory is one parameter-sized buffer, the ascent gradient turned into
``w + e_k`` in place. Embedding tables can take sparse ascent gradients (:func:`sparse_embedding_gradients`): only
the looked-up rows are perturbed and restored, the norm is the same number. Dropout: the descent pass replays the
random state of the ascent pass (:class:`RandomState`), so both evaluate the same function.

Use it in any training loop::

    sam = MicroBatchSAM(model.parameters(), rho=0.05)
    embeddings = trainable_embeddings(model)
    for batch in loader:
        for micro_batch, weight in split_micro_batches(batch, 8):
            randomness = RandomState.capture()
            with sparse_embedding_gradients(embeddings):     # optional: ascent gradients of the used rows only
                loss = model(**micro_batch).loss
            sam.perturb(loss)                                # w -> w + e_k
            randomness.restore()                             # the descent pass draws the same dropout masks
            with sparse_embedding_gradients(embeddings, accumulating=True):
                loss = model(**micro_batch).loss
            (weight * loss).backward()                       # accumulates d_k into .grad
            sam.restore()                                    # w + e_k -> w, exactly
        optimizer.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._prims_common import is_non_overlapping_and_dense_or_false

from .rule import FollowsRule, SAMRule, global_norm


@dataclass(frozen=True)
class Perturbation:
    """What :meth:`MicroBatchSAM.perturb` did to the weights.

    Attributes:
        grad_norm: ``||g_k||`` of the ascent gradient (``||T g_k||`` for ASAM), divided by the loss scale
            that was passed in; ``nan`` or ``inf`` when the gradient was not finite.
        skipped: the gradient was not finite (fp16 overflow, a bad batch), so ``e_k = 0``.
    """

    grad_norm: float
    skipped: bool


class MicroBatchSAM(FollowsRule):
    """Per-micro-batch SAM perturbation and exact restore for a fixed list of trainable tensors.

    Args:
        params: the model's parameters; those with ``requires_grad=False`` (frozen base weights under
            PEFT/LoRA) are ignored.
        rho: radius of the perturbation, ``rho >= 0``.
        adaptive: ASAM (Kwon et al., 2021), ``T = |w| + adaptive_eta`` (:mod:`hf_msam.update.rule`).
        adaptive_eta: the ``eta`` of ASAM.
        rule: the rule itself, in place of ``rho``, ``adaptive`` and ``adaptive_eta``.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        rho: float = 0.05,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        *,
        rule: SAMRule | None = None,
    ) -> None:
        self.rule = rule if rule is not None else SAMRule(rho, adaptive, adaptive_eta)
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("MicroBatchSAM got no trainable parameters (none has requires_grad=True).")
        # Per parameter: the tensor it held at w (dense), or (rows, their values at w) for a sparse gradient.
        self._saved: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def is_perturbed(self) -> bool:
        """Whether the weights are at ``w + e_k`` (between :meth:`perturb` and :meth:`restore`)."""
        return self._saved is not None

    @torch.no_grad()
    def restore(self) -> None:
        """``w + e_k -> w``: the parameters get back the very tensors they held before :meth:`perturb`, and a
        table perturbed by rows gets the saved rows copied back.

        Bit for bit, never ``p -= e_k``; a no-op when the last perturbation was skipped.
        """
        if self._saved is None:
            return
        for p, saved in zip(self.params, self._saved):
            if isinstance(saved, tuple):
                rows, values = saved
                p.data.index_copy_(0, rows, values)
            else:
                p.data = saved
        self._saved = None

    def ascent_gradients(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """``g_k = grad L_k(w)`` by ``torch.autograd.grad``, so ``.grad`` (the accumulated descent) is untouched.

        A trainable tensor that the loss does not reach gets a zero gradient. Each returned dense tensor has
        storage of its own, so in-place arithmetic on one (an all-reduce, :meth:`perturb_with`) changes no other.
        A sparse gradient (an embedding table under :func:`sparse_embedding_gradients`) is returned coalesced:
        each row once, its values summed over the tokens that used it.
        """
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g.coalesce() if g.is_sparse else g for g, p in zip(grads, self.params)
        ]
        return _private_buffers(grads, [p.detach() for p in self.params])

    @torch.no_grad()
    def perturb_with(self, grads: list[torch.Tensor], grad_scale: float = 1.0) -> Perturbation:
        """Move the weights from ``w`` to ``w + e_k`` for the ascent gradient ``grads``.

        ``w + e_k`` is built in place in the buffers of ``grads``, which the parameters then hold while ``w``
        is kept aside for :meth:`restore`: one parameter-sized buffer in flight at any time, no copy of the
        weights. A gradient that shares storage with another or with a weight, or is not dense (expanded), is
        copied first. A sparse gradient (COO, rows along dimension 0) moves only its rows, in place, with the
        values of those rows at ``w`` kept for :meth:`restore`; its other rows have ``g_k = 0`` and stay. The
        norm runs over the dense gradients and the (coalesced) rows together: ``||g_k||`` over all trainable
        tensors. ``grad_scale`` is the factor the gradients carry (the fp16 loss scale); the direction of ``e_k``
        does not depend on it, only the reported norm does.
        """
        if self._saved is not None:
            raise RuntimeError("perturb() called twice without restore(): the weights are already at w + e_k.")
        tables = {i: g.coalesce() for i, g in enumerate(grads) if g.is_sparse}
        rows = {i: g.indices()[0] for i, g in tables.items()}
        # Dense tensors as they are; a table by its rows: the rows of w (kept for restore) and of g_k.
        weights = [p.detach().index_select(0, rows[i]) if i in rows else p.detach() for i, p in enumerate(self.params)]
        grads = [tables[i].values() if i in tables else g for i, g in enumerate(grads)]
        grads = _private_buffers(grads, weights)
        norm, finite = self.rule.perturb_(grads, lambda: weights, global_norm, grad_scale)
        if not finite:
            return Perturbation(norm / grad_scale, skipped=True)
        torch._foreach_add_(grads, weights)  # grads now hold w + e_k (of the rows, for a table)
        self._saved = [(rows[i], weights[i]) if i in rows else p.data for i, p in enumerate(self.params)]
        for i, (p, perturbed) in enumerate(zip(self.params, grads)):
            if i in rows:
                p.data.index_copy_(0, rows[i], perturbed)
            else:
                p.data = perturbed
        return Perturbation(norm / grad_scale, skipped=False)

    def perturb(self, loss: torch.Tensor, grad_scale: float = 1.0) -> Perturbation:
        """Compute ``g_k`` from ``loss`` (the micro-batch loss at ``w``, possibly multiplied by a loss scale)
        and move the weights to ``w + e_k``."""
        return self.perturb_with(self.ascent_gradients(loss), grad_scale=grad_scale)


@dataclass(frozen=True)
class RandomState:
    """The states of the CPU generator and of the current accelerator's generator (CUDA, XPU, MPS, ...).

    Both passes of a micro-batch must see the same function, dropout masks included, as in the reference SAM
    implementation (google-research/sam evaluates the ascent and the descent gradient under one random key).
    Capture before the ascent pass and restore before the descent pass: the descent pass then draws the
    masks of the ascent pass, and leaves the generators where a single pass would have left them.
    """

    cpu: torch.Tensor
    accelerator: torch.Tensor | None

    @classmethod
    def capture(cls) -> RandomState:
        """The current states (one small host copy per generator, no device sync)."""
        device_module = _accelerator_module()
        return cls(torch.get_rng_state(), device_module.get_rng_state() if device_module is not None else None)

    def restore(self) -> None:
        """Rewind the generators to the captured states."""
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            _accelerator_module().set_rng_state(self.accelerator)


def trainable_embeddings(module: nn.Module) -> list[nn.Embedding]:
    """The ``nn.Embedding`` modules of ``module`` whose table is trainable and can take a sparse gradient (not
    ``scale_grad_by_freq``, which the sparse backward of ``F.embedding`` refuses; not already ``sparse``)."""
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.Embedding) and m.weight.requires_grad and not m.scale_grad_by_freq and not m.sparse
    ]


@contextlib.contextmanager
def sparse_embedding_gradients(embeddings: Sequence[nn.Embedding], accumulating: bool = False):
    """Forward passes run inside get sparse gradients for the tables of ``embeddings`` (``sparse=True``).

    The backward of ``F.embedding(sparse=True)`` hands back the ``b * L`` looked-up rows of the output gradient
    (COO, without the ``padding_idx`` row) instead of filling a table-sized zero tensor. A table that the forward
    also uses elsewhere (tied to an LM head) receives the sum of both uses, a dense tensor: correct either way.

    ``accumulating=False`` (the ascent pass, gradients taken by ``torch.autograd.grad``): every table.
    ``accumulating=True`` (the descent pass, ``.backward()`` into ``.grad``): only the tables whose ``.grad``
    already holds a dense tensor, which the sparse rows are then added into in place; a table without one keeps
    the dense backward, so that ``.grad`` never becomes sparse (optimizers such as AdamW refuse sparse
    gradients) and a table the pass does not reach keeps ``.grad = None``.
    """
    switched = [
        m
        for m in embeddings
        if not accumulating or (m.weight.grad is not None and not m.weight.grad.is_sparse)
    ]
    for m in switched:
        m.sparse = True
    try:
        yield
    finally:
        for m in switched:
            m.sparse = False


def _accelerator_module():
    """``torch.cuda`` (or ``torch.xpu``, ``torch.mps``, ...) when an accelerator is available, else ``None``."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return None if accelerator is None else torch.get_device_module(accelerator)


def _private_buffers(grads: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` with every tensor that in-place arithmetic could not safely overwrite replaced by a private copy.

    Autograd may hand several parameters one gradient buffer (a Hugging Face ViT gives ``cls_token`` and
    ``position_embeddings`` the same storage when a pass holds one example), return an expanded tensor
    (stride 0: the gradient of ``p.sum()``), or a view of a weight. Such a gradient is copied, in the layout
    of its weight; every other one is used as it is (no copy in the common case).
    """
    seen = {w.untyped_storage().data_ptr() for w in weights}
    private = []
    for grad, weight in zip(grads, weights):
        if grad.is_sparse:  # coalesced by ascent_gradients: values of its own
            private.append(grad)
            continue
        storage = grad.untyped_storage().data_ptr()
        # is_contiguous() first: the common case, and far cheaper than the prims check (Python)
        if storage in seen or not (grad.is_contiguous() or is_non_overlapping_and_dense_or_false(grad)):
            grad = torch.empty_like(weight, dtype=grad.dtype).copy_(grad)
            storage = grad.untyped_storage().data_ptr()
        seen.add(storage)
        private.append(grad)
    return private


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Number of examples in a dict batch: the leading dimension of its ``labels``, else of its first tensor."""
    if isinstance(batch.get("labels"), torch.Tensor) and batch["labels"].dim() > 0:
        return batch["labels"].shape[0]
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("Cannot split a batch that holds no tensor with a batch dimension.")


def split_micro_batches(
    batch: Mapping[str, Any], micro_batch_size: int | None
) -> Iterator[tuple[dict[str, Any], float]]:
    """Cut a dict batch into consecutive micro-batches of ``micro_batch_size`` examples (the last may be smaller).

    Yields ``(micro_batch, |D_k| / |D|)``. Tensors whose leading dimension is the batch size are sliced
    (views, no copy); every other value is passed to each micro-batch as it is. ``None`` means one
    micro-batch holding the whole batch.
    """
    size = batch_size_of(batch)
    step = size if micro_batch_size is None else micro_batch_size
    if step < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
    for start in range(0, size, step):
        stop = min(start + step, size)
        micro_batch = {
            key: value[start:stop] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size
            else value
            for key, value in batch.items()
        }
        yield micro_batch, (stop - start) / size
