"""Arguments: ``SAMTrainingArguments`` adds the mSAM settings and the curvature-report options to
``transformers.TrainingArguments``, as dataclass fields that ``HfArgumentParser`` turns into flags and that
are saved with the other arguments (``training_args.bin``, ``trainer_state.json``, the model card)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from ..curvature.arguments import SharpnessArguments
from ..update.rule import SAMRule
from .distributed import check_backend


@dataclass
class SAMArguments:
    """The mSAM settings (``docs/design.md`` section 2), as dataclass fields: part of :class:`SAMTrainingArguments`;
    :func:`sam_options_of` reads them from any ``TrainingArguments`` (the defaults where it lacks them).

    Parameters:
        sam_rho (`float`, *optional*, defaults to 0.01):
            The SAM radius rho: the length of each micro-batch's perturbation ``e_k``. 0 trains with the plain
            base optimizer, bit for bit as the stock ``Trainer``.
        sam_micro_batch_size (`int`, *optional*):
            Examples per perturbation (the mSAM micro-batch). None: each per-device batch is one micro-batch,
            so m is the number of processes times ``gradient_accumulation_steps``. It need not divide the batch:
            the last micro-batch of a batch may be smaller, and is weighted by its size. At most
            ``per_device_train_batch_size``.
        sam_micro_batch_mode (`str`, *optional*, defaults to `"auto"`):
            How the micro-batches of a step are run: ``"loop"``, one ascent and one descent pass per micro-batch;
            ``"vmap"``, all micro-batches of equal size in one vectorised ascent and one vectorised descent pass
            (``torch.func.vmap``; costs a copy of the trainable parameters per micro-batch, bounded by
            ``sam_vmap_memory_budget_mb``; refused with the reason when the model cannot take it); ``"auto"``,
            vmap where the model is eligible and it was measured faster (on CUDA, for two or more micro-batches),
            else the loop. Without dropout the update is the same in every mode, to float rounding. With dropout,
            the ascent and descent pass of a micro-batch share their masks in every mode, but the loop and vmap
            draw different masks (the loop draws micro-batch by micro-batch, vmap for the whole group at once, as
            one forward of the chunk would), so their updates agree in distribution only.
        sam_vmap_compile (`bool`, *optional*, defaults to `False`):
            Compile the two vectorised passes of the vmap path with ``torch.compile`` (inductor with eager's random
            operations, so the dropout masks are those of the uncompiled vmap path, and no kernel fusion; ``hf_msam.update.vmap``). The same
            update with less host work per step (``docs/speed.md``). The first two steps pay the compilation, and each
            new sequence length compiles again (up to 8 per pass, then eager): pad to a fixed
            length or a multiple (``pad_to_multiple_of``; the glue recipe pads to a multiple of 8 then,
            ``--pad_to_max_length`` to one). Needs ``sam_micro_batch_mode`` ``"vmap"`` or ``"auto"``.
        sam_adaptive (`bool`, *optional*, defaults to `False`):
            ASAM (Kwon et al., 2021): the perturbation ``e_k = rho * T^2 g_k / ||T g_k||`` with the elementwise
            scale ``T = |w| + sam_adaptive_eta``, applied to every trainable tensor (biases and LayerNorm
            included, as davda54/sam and pytorch-optimizer do).
        sam_adaptive_eta (`float`, *optional*, defaults to 0.01):
            The eta of ASAM's ``T = |w| + eta``; used only with ``sam_adaptive``.
        sam_global (`bool`, *optional*, defaults to `False`):
            Classic (global) SAM: one perturbation from the ascent gradient averaged over the whole mini-batch on
            all processes, at the cost of one extra all-reduce per step. Excludes ``sam_micro_batch_size`` and
            needs ``gradient_accumulation_steps=1``.
        sam_sparse_embeddings (`bool`, *optional*, defaults to `True`):
            Treat embedding tables by the rows the micro-batches look up; the update is the same (``||g_k||``
            still runs over every trainable tensor). On the loop path, every trainable ``nn.Embedding``: the ascent
            gradient of those rows only (``F.embedding(sparse=True)``), the perturbation of those rows in place and
            their exact restore, and the descent rows added into ``.grad`` in place (one process). On the vmap
            path, the model's input table (``get_input_embeddings()``): its lookup is taken outside vmap and
            perturbed by rows, so the table gets no copy per micro-batch (``hf_msam.update.vmap.InputTableRows``;
            a model that looks it up other than once with ``input_ids`` gets an error that names this flag). A
            table used elsewhere too (tied to an LM head) and ``sam_global`` keep the dense treatment, and so does the
            loop path with ``torch_compile=True`` (inductor cannot compile a sparse gradient; logged once). False:
            every trainable tensor is treated whole.
    """

    sam_rho: float = field(
        default=0.01,
        metadata={"help": "SAM radius rho of each micro-batch's perturbation; 0 trains with the plain base optimizer. "
                  "Each micro-batch is perturbed by the full rho along its own, noisier gradient, so mSAM perturbs "
                  "harder than SAM at the same rho: sweep rho (0.005 to 0.02) before comparing m (docs/results.md)."},
    )
    sam_micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Examples per SAM perturbation (the mSAM micro-batch). None: each per-device batch is one "
            "micro-batch. Must divide nothing; the last micro-batch of a batch may be smaller."
        },
    )
    sam_adaptive: bool = field(
        default=False,
        metadata={"help": "ASAM: scale the perturbation elementwise by T = |w| + sam_adaptive_eta (Kwon et al., 2021)."},
    )
    sam_adaptive_eta: float = field(default=0.01, metadata={"help": "The eta of ASAM's T = |w| + eta."})
    sam_global: bool = field(
        default=False,
        metadata={
            "help": "Classic (global) SAM: one perturbation from the ascent gradient averaged over the whole "
            "mini-batch on all processes (one extra all-reduce per step). Excludes sam_micro_batch_size."
        },
    )

    sam_micro_batch_mode: str = field(
        default="auto",
        metadata={
            "help": "How the micro-batches of a step are run. 'loop': one ascent and one descent pass per "
            "micro-batch. 'vmap': all micro-batches of equal size in one vectorised ascent and one vectorised "
            "descent pass (torch.func.vmap; memory: copies of the trainable parameters per micro-batch, bounded "
            "by sam_vmap_memory_budget_mb); an error names the reason when the model cannot take it. 'auto': "
            "vmap where the model is eligible and vmap was measured faster (on CUDA, for two or more "
            "micro-batches), else the loop, with the reason logged once. Without dropout every mode gives the same "
            "update; with dropout each shares its masks between a micro-batch's two passes, but the loop and vmap "
            "draw different masks, so their updates agree in distribution only.",
            "choices": ["loop", "vmap", "auto"],
        },
    )
    sam_sparse_embeddings: bool = field(
        default=True,
        metadata={
            "help": "Treat embedding tables by the rows the micro-batches look up (the same update, less work and "
            "memory per micro-batch). Loop path: every nn.Embedding's ascent gradient, perturbation and restore by "
            "rows, descent rows added into .grad in place. vmap path: the input table's lookup perturbed by rows, "
            "no copy of the table per micro-batch. A table used elsewhere too (tied to the LM head) and "
            "sam_global=True keep the dense treatment. False: every trainable tensor is treated whole."
        },
    )
    sam_vmap_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the two vectorised passes of the vmap path with torch.compile (inductor, eager's random "
            "ops, no fusion): the same update with less host work per step (docs/speed.md); the "
            "first steps pay the compilation, again per new sequence length. Needs sam_micro_batch_mode 'vmap' or 'auto'."
        },
    )
    sam_vmap_memory_budget_mb: float | None = field(
        default=None,
        metadata={
            "help": "Memory (MiB) the vmap path may spend on the per-micro-batch copies of the trainable "
            "parameters; micro-batches are vectorised in groups that fit it. None: half of the device memory "
            "free at the first vmap step (CUDA: torch.cuda.mem_get_info; CPU: MemAvailable)."
        },
    )


@dataclass
class SAMTrainingArguments(SAMArguments, SharpnessArguments, TrainingArguments):
    """``TrainingArguments`` plus micro-batch sharpness-aware minimization (``docs/design.md`` section 2) and the
    curvature report (the ``sharpness_*`` fields of :class:`~hf_msam.SharpnessArguments`).

    Each optimizer step's effective mini-batch D (all processes, all gradient-accumulation chunks) is cut into
    micro-batches D_k of ``sam_micro_batch_size`` examples; each gets its own perturbation
    ``e_k = rho * g_k / ||g_k||``, ``g_k = grad L_k(w)``, and the descent gradients ``grad L_k(w + e_k)`` are averaged
    with weights ``|D_k| / |D|`` before the base optimizer (``optim``) steps (Foret et al., 2021, section 4.1;
    Behdin et al., 2023). ``m = |D| / sam_micro_batch_size``; m = 1 is SAM and ``sam_rho = 0`` is the plain base
    optimizer. Every field is also a command-line flag (``HfArgumentParser``) and is saved with the other
    arguments (``training_args.bin``, the model card).

    The mSAM fields are those of :class:`SAMArguments`; ``SAMTrainer`` also takes a plain (or the user's own)
    ``TrainingArguments``, with the defaults of the fields it lacks.
    """

    def __post_init__(self) -> None:
        validate_sam_arguments(self, self)
        super().__post_init__()

    @property
    def sam_num_micro_batches(self) -> int:
        """m: micro-batches per per-device batch (1 for SAM)."""
        return micro_batches_per_device(self, self.per_device_train_batch_size)


def sam_options_of(args: Any) -> SAMArguments:
    """The mSAM settings of a run (a plain copy, read now): the ``sam_*`` fields of ``args`` where it has them (a
    :class:`SAMTrainingArguments`, or a user's ``TrainingArguments`` subclass with some of them), the defaults
    of :class:`SAMArguments` otherwise."""
    defaults = SAMArguments()
    return SAMArguments(**{f.name: getattr(args, f.name, getattr(defaults, f.name)) for f in fields(SAMArguments)})


def sam_rule_of(sam: SAMArguments) -> SAMRule:
    """The perturbation rule of the settings, the one both engines are built with (:mod:`hf_msam.update.rule`)."""
    return SAMRule(sam.sam_rho, sam.sam_adaptive, sam.sam_adaptive_eta)


def micro_batches_per_device(sam: SAMArguments, per_device_train_batch_size: int) -> int:
    """m per per-device batch: ``ceil(per_device_train_batch_size / sam_micro_batch_size)`` (1 for SAM)."""
    if sam.sam_micro_batch_size is None:
        return 1
    return math.ceil(per_device_train_batch_size / sam.sam_micro_batch_size)


def validate_sam_arguments(sam: SAMArguments, args: TrainingArguments) -> None:
    """Refuse settings that mSAM cannot honour, naming the field and the fix, before any work starts: the
    ``sam_*`` fields of ``sam`` together with the batch, accumulation and parallelism fields of ``args``."""
    rho = sam.sam_rho
    if not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"sam_rho must be a finite number >= 0 (0 disables SAM), got {rho!r}.")
    if not isinstance(sam.sam_adaptive_eta, (int, float)) or not math.isfinite(sam.sam_adaptive_eta) or (
        sam.sam_adaptive_eta < 0
    ):
        raise ValueError(f"sam_adaptive_eta must be a finite number >= 0, got {sam.sam_adaptive_eta!r}.")
    if sam.sam_micro_batch_mode not in ("loop", "vmap", "auto"):
        raise ValueError(
            f"sam_micro_batch_mode must be 'loop', 'vmap' or 'auto', got {sam.sam_micro_batch_mode!r}."
        )
    budget = sam.sam_vmap_memory_budget_mb
    if budget is not None and (not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0):
        raise ValueError(f"sam_vmap_memory_budget_mb must be a number > 0 (MiB) or None, got {budget!r}.")
    if sam.sam_vmap_compile and sam.sam_micro_batch_mode == "loop":
        raise ValueError(
            "sam_vmap_compile=True compiles the vmap path, which sam_micro_batch_mode='loop' never runs: use "
            "sam_micro_batch_mode='vmap' or 'auto', or drop sam_vmap_compile."
        )
    size = sam.sam_micro_batch_size
    if sam.sam_micro_batch_mode == "vmap" and sam.sam_global:
        raise ValueError(
            "sam_micro_batch_mode='vmap' cannot run sam_global=True (its ascent gradient is all-reduced between "
            "the two passes): use sam_micro_batch_mode='loop' or 'auto'."
        )
    if sam.sam_micro_batch_mode == "vmap" and size is not None and args.per_device_train_batch_size % size:
        raise ValueError(
            f"sam_micro_batch_mode='vmap' needs micro-batches of equal size, but sam_micro_batch_size={size} does "
            f"not divide per_device_train_batch_size={args.per_device_train_batch_size}: choose a divisor, or "
            "use sam_micro_batch_mode='auto' (which runs uneven batches with the loop)."
        )
    if size is not None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"sam_micro_batch_size must be an integer >= 1 (or None), got {size!r}.")
        if size > args.per_device_train_batch_size:
            raise ValueError(
                f"sam_micro_batch_size={size} is larger than per_device_train_batch_size="
                f"{args.per_device_train_batch_size}: lower sam_micro_batch_size to at most the per-device "
                "batch, or raise per_device_train_batch_size."
            )
        if sam.sam_global:
            raise ValueError(
                "sam_global=True (one perturbation for the whole mini-batch) cannot be combined with "
                f"sam_micro_batch_size={size}: unset one of them."
            )
    if sam.sam_global and args.gradient_accumulation_steps > 1:
        raise ValueError(
            "sam_global=True needs the whole mini-batch in one pass: set gradient_accumulation_steps=1, "
            "or drop sam_global to use per-micro-batch perturbations (mSAM)."
        )
    check_backend(args, sam)
