"""Which engine runs a chunk (the loop or vmap, ``sam_micro_batch_mode``) and how many micro-batches a vmap group
holds within its memory budget. The measurements behind the constants are in ``docs/speed.md``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..update.loop import batch_size_of

AUTO_VMAP_DEVICE_TYPES = ("cuda",)
"""Device types on which ``sam_micro_batch_mode="auto"`` picks the vmap path (when the model is eligible): on a CPU
the loop was as fast or faster and holds far less memory (``docs/speed.md``). "auto" does not compile: compiling
pays back only over many steps of few sequence lengths."""

AUTO_VMAP_MIN_MICRO_BATCHES = 2
"""Fewest micro-batches in a chunk for which ``sam_micro_batch_mode="auto"`` picks the vmap path: SAM (m = 1) keeps
the loop on every device, where it was faster (``docs/speed.md``)."""

VMAP_COPIES_PER_MICRO_BATCH = 5
"""Copies of the batched parameters the vmap path holds per micro-batch at its peak (the ascent gradient, the
perturbed point and its gradient, the batched embedding gradient), used to size the groups to
``sam_vmap_memory_budget_mb``. An upper bound with margin for models whose per-micro-batch share differs from the
one measured (``docs/speed.md``)."""


def auto_declines(mode: str, device_type: str, num_micro_batches: int) -> tuple[bool, str | None]:
    """Whether ``mode`` keeps the loop before the model is looked at, and the reason to log (or None)."""
    if mode == "loop":
        return True, None
    if mode == "auto" and device_type not in AUTO_VMAP_DEVICE_TYPES:
        return True, (
            f"sam_micro_batch_mode='auto' runs the loop on {device_type}: the vmap path was measured "
            f"slower there (it is picked on {', '.join(AUTO_VMAP_DEVICE_TYPES)})."
        )
    if mode == "auto" and num_micro_batches < AUTO_VMAP_MIN_MICRO_BATCHES:
        return True, None
    return False, None


def chunk_declines(micro_batches: Sequence[dict[str, Any]], counts: Sequence[int]) -> str | None:
    """Why this chunk cannot be stacked for vmap (unequal sizes, a micro-batch with nothing supervised), or None."""
    sizes = {batch_size_of(mb) for mb in micro_batches}
    if len(sizes) > 1:
        return f"micro-batches of unequal sizes {sorted(sizes)} (an uneven last batch) run with the loop, not vmap."
    if min(counts) == 0:
        return "a micro-batch with no supervised item (all labels -100) runs with the loop, not vmap."
    return None


def group_size_for_budget(
    batched_params: Sequence[torch.Tensor], num_micro_batches: int, budget_mb: float | None, device: torch.device
) -> int:
    """Micro-batches per vectorised group: as many as ``budget_mb`` holds ``VMAP_COPIES_PER_MICRO_BATCH`` copies of
    the batched parameters each (every trainable tensor but an input table treated by rows, whose rows take what one
    activation takes); ``None``: half the free device memory. Activations need no budget: a group of g micro-batches
    of size b holds those of one g*b batch, at most the per-device batch that the stock step holds."""
    if budget_mb is None:
        budget_mb = free_memory_mb(device) / 2
    param_mb = sum(p.numel() * p.element_size() for p in batched_params) / 2**20
    return max(1, min(num_micro_batches, int(budget_mb // (VMAP_COPIES_PER_MICRO_BATCH * param_mb))))


def free_memory_mb(device: torch.device) -> float:
    """Free memory of the device in MiB (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable``)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20

