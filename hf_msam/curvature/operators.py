"""The Hessian-vector-product operator of the mean training loss on a fixed probe set.

``docs/design.md`` section 3.1: curvature is computed in float32, in eval mode, with autocast off (accelerate
patches ``model.forward`` and keeps ``model._original_forward``), and with attention that has a double
backward (eager attention, or the math SDPA backend; fused kernels have none, pytorch#116350). The
operator works on flat vectors over the trainable parameters, so that the estimators (Lanczos,
Hutchinson, the stability probe) stay independent of the model (the curvlinops split).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..update.loop import batch_size_of as batch_size  # noqa: F401 - imported from here by the curvature modules

Batch = Mapping[str, Any]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters curvature is taken over: those with ``requires_grad`` (adapters only under PEFT)."""
    return [p for p in model.parameters() if p.requires_grad]


def to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on ``device`` (floating tensors in float32)."""
    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.float()
        moved[key] = value
    return moved


def output_field(outputs: Any, name: str) -> Any:
    """``outputs.loss`` / ``outputs["loss"]`` of a ``ModelOutput``, dict or attribute object; None if absent."""
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def curvature_mode(model: torch.nn.Module, device: torch.device | str | None = None) -> Iterator[None]:
    """Put ``model`` in the state curvature is defined in, and restore it exactly afterwards.

    Eval mode (no dropout); the forward accelerate saved as ``_original_forward`` (no autocast, no fp32
    output conversion); float32 parameters and buffers (a bf16/fp16 model is cast up and back, which is
    exact); autocast off; the math SDPA backend; flash attention switched to SDPA; optionally ``device``.
    """
    was_training = model.training
    missing = object()
    saved_forward = model.__dict__.get("forward", missing)
    original_forward = getattr(model, "_original_forward", None)
    casts = [
        (t, t.dtype)
        for t in list(model.parameters()) + list(model.buffers())
        if t.is_floating_point() and t.dtype != torch.float32
    ]
    old_device = model_device(model)
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    switch_attn = isinstance(attn, str) and attn.startswith("flash") and hasattr(model, "set_attn_implementation")
    try:
        model.eval()
        if original_forward is not None:
            model.forward = original_forward
        for t, _ in casts:
            t.data = t.data.float()
        if device is not None:
            model.to(device)
        if switch_attn:
            model.set_attn_implementation("sdpa")
        with ExitStack() as stack:
            dev = model_device(model)
            stack.enter_context(torch.autocast(device_type=dev.type, enabled=False))
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield
    finally:
        if switch_attn:
            model.set_attn_implementation(attn)
        if device is not None:
            model.to(old_device)
        for t, dtype in casts:
            t.data = t.data.to(dtype)
        if saved_forward is missing:
            model.__dict__.pop("forward", None)
        else:
            model.forward = saved_forward
        model.train(was_training)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    parts, offset = [], 0
    for t in like:
        parts.append(vector[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return parts


def _grads(output: torch.Tensor, params: Sequence[torch.Tensor], **kwargs: Any) -> list[torch.Tensor]:
    """``autograd.grad`` with zeros for parameters the output does not depend on."""
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class HessianOperator:
    """v -> H v for H the Hessian of the mean loss L(w) = sum_b (|b| / N) L_b(w) over the probe batches.

    ``L_b`` is the loss the model returns for batch ``b`` (a mean over its examples for every
    ``transformers`` classification/regression head), so weighting by batch size gives the mean over all
    N examples however they are chunked. Products use double backward (Pearlmutter 1994:
    H v = grad(<grad L, v>)), over ``trainable_parameters(model)``, inside ``curvature_mode``.
    ``num_hvps`` counts products with the full operator.
    """

    def __init__(self, model: torch.nn.Module, batches: Sequence[Batch]):
        if not batches:
            raise ValueError("batches: the probe set is empty")
        self.model = model
        self.batches = list(batches)
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("model: no trainable parameters (requires_grad=True) to take curvature over")
        sizes = [batch_size(b) for b in self.batches]
        self.num_examples = sum(sizes)
        self.weights = [s / self.num_examples for s in sizes]
        self.dim = sum(p.numel() for p in self.params)
        self.num_hvps = 0

    def _loss(self, batch: Batch) -> torch.Tensor:
        loss = output_field(self.model(**to_device(batch, model_device(self.model))), "loss")
        if loss is None:
            raise ValueError("model returned no `loss`: pass `labels` in the batches")
        return loss

    def loss(self) -> float:
        """L(w), the mean loss over the probe set."""
        with curvature_mode(self.model), torch.no_grad():
            return float(sum(w * self._loss(b).double() for w, b in zip(self.weights, self.batches)))

    def gradient(self) -> torch.Tensor:
        """grad L(w) as a flat float32 vector."""
        with curvature_mode(self.model):
            total = torch.zeros(self.dim, device=model_device(self.model))
            for w, b in zip(self.weights, self.batches):
                total += w * flatten(_grads(self._loss(b), self.params))
            return total

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v of length ``dim``."""
        with curvature_mode(self.model):
            v = unflatten(vector.to(model_device(self.model), torch.float32), self.params)
            total = torch.zeros(self.dim, device=model_device(self.model))
            for w, b in zip(self.weights, self.batches):
                grads = torch.autograd.grad(self._loss(b), self.params, create_graph=True, allow_unused=True)
                pairs = [(g, vi) for g, vi in zip(grads, v) if g is not None and g.requires_grad]
                if not pairs:
                    continue
                dot = sum((g * vi).sum() for g, vi in pairs)
                total += w * flatten(_grads(dot, self.params))
            self.num_hvps += 1
            return total

    __matmul__ = matvec
