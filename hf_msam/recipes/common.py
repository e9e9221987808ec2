"""What both recipes share: argument parsing with recipe defaults, the LoRA arguments, the start banner, the Hub
preflight, the end of a run (save, card, push) and the clean shutdown of a distributed run. The recipes
themselves stay flat."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import HfArgumentParser

from ..data import DataError
from ..publish import hub

logger = logging.getLogger("hf_msam.recipes")

@dataclasses.dataclass
class HubModelArguments:
    """Where both recipes' models come from: the Hub options they share (each recipe adds its own fields)."""

    cache_dir: str | None = dataclasses.field(default=None, metadata={"help": "Where downloads from the Hub are stored."})
    model_revision: str = dataclasses.field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: str | None = dataclasses.field(
        default=None, metadata={"help": "Hub token for private models/data (default: HF_TOKEN or `hf auth login`)."}
    )
    trust_remote_code: bool = dataclasses.field(
        default=False,
        metadata={"help": "Allow custom model code from the Hub to run on this machine. Off unless you have read it."},
    )
    ignore_mismatched_sizes: bool = dataclasses.field(
        default=False, metadata={"help": "Replace a checkpoint's classification head of another size."}
    )

    def hub_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``from_pretrained`` these options stand for."""
        return dict(cache_dir=self.cache_dir, revision=self.model_revision, token=self.token,
                    trust_remote_code=self.trust_remote_code)



class UsageError(ValueError):
    """The user's arguments cannot run; the message names the flag and the fix. ``run_recipe`` prints it."""


def run_recipe(run: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """``run(argv)``; a ``UsageError`` or ``DataError`` (a problem with the arguments or the data, raised before
    training starts) is printed as ``error: ...`` with exit status 2; then every process of a distributed run
    leaves together (``shutdown_distributed``)."""
    try:
        status = run(argv)
    except (UsageError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    shutdown_distributed()
    return status

@dataclasses.dataclass
class PeftArguments:
    """LoRA adapters (PEFT, Hu et al. 2022), with the flag names of TRL's ``ModelConfig``.

    With ``--use_peft`` only the adapters train: the base weights are frozen, so mSAM perturbs (and the
    curvature report differentiates) the adapters and the classification head alone. The head stays
    trainable as a PEFT ``modules_to_save`` copy: PEFT adds it itself for ``--lora_task_type SEQ_CLS`` (the
    text recipe's default); the image recipe, for which PEFT has no task type, names it (``classifier``).
    ``save_model`` then writes ``adapter_model.safetensors`` and ``adapter_config.json``, and those are pushed.
    """

    use_peft: bool = dataclasses.field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = dataclasses.field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = dataclasses.field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = dataclasses.field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "Modules to adapt, e.g. query value, or all-linear (default: PEFT's choice for the "
                  "model type)."},
    )
    lora_modules_to_save: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Modules trained in full beside the adapters (the head; text: added by PEFT "
                                "for SEQ_CLS; images: classifier)."}
    )
    lora_task_type: str | None = dataclasses.field(
        default=None, metadata={"help": "PEFT task type: " + ", ".join(t.value for t in TaskType) + "."}
    )

    def __post_init__(self) -> None:
        if self.lora_task_type is not None and self.lora_task_type not in {t.value for t in TaskType}:
            raise ValueError(f"--lora_task_type {self.lora_task_type!r} is not a PEFT task type; use one of "
                             f"{', '.join(t.value for t in TaskType)} (text classification: SEQ_CLS).")
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be a positive rank, got {self.lora_r}.")

    def lora_config(self) -> LoraConfig:
        """The ``LoraConfig`` these flags stand for (as TRL's ``get_peft_config``)."""
        targets = self.lora_target_modules
        return LoraConfig(
            task_type=self.lora_task_type, r=self.lora_r, lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout, bias="none",
            target_modules=targets[0] if targets and len(targets) == 1 and targets[0] == "all-linear" else targets,
            modules_to_save=self.lora_modules_to_save,
        )

    def wrap(self, model):
        """``model`` as a ``PeftModel`` with LoRA adapters (when ``--use_peft``), else ``model`` itself."""
        if not self.use_peft:
            return model
        try:
            return get_peft_model(model, self.lora_config())
        except ValueError as exc:
            raise UsageError(f"LoRA could not be set up on {type(model).__name__}: {exc} Name the layers to "
                             "adapt with --lora_target_modules (e.g. query value, or all-linear).") from exc


def banner(recipe: str, model, model_name: str, data_line: str, training_args) -> str:
    """The few lines a recipe prints when it starts: model, data, mSAM settings and where the output goes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    kind = "LoRA adapters" if isinstance(model, PeftModel) else "all weights"
    micro = training_args.sam_micro_batch_size or training_args.per_device_train_batch_size
    m = -(-training_args.per_device_train_batch_size // micro)
    sam = (f"rho={training_args.sam_rho}, micro-batch {micro} (m={m} per device), adaptive={training_args.sam_adaptive}"
           + (", global" if training_args.sam_global else "") if training_args.sam_rho > 0 else "off (rho=0: the base optimizer)")
    return "\n".join([
        f"hf-msam {recipe}",
        f"  model : {model_name} ({kind}: {trainable:,} of {total:,} parameters train)",
        f"  data  : {data_line}",
        f"  mSAM  : {sam}; {training_args.num_train_epochs:g} epoch(s), batch {training_args.per_device_train_batch_size}"
        f" x {training_args.world_size} process(es) x {training_args.gradient_accumulation_steps} accumulation",
        f"  output: {training_args.output_dir}",
    ])


def save_full_model(trainer) -> None:
    """``trainer.save_model()``, the full weights in safetensors also under FSDP with a sharded state dict type,
    for which ``Trainer.save_model`` writes no weights at all: the final model is gathered in full for it (the card,
    the push and ``hf-msam sharpness`` need it), while the checkpoints keep the sharded type."""
    plugin = trainer.accelerator.state.fsdp_plugin if trainer.is_fsdp_enabled else None
    sharded = plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type)
    if not sharded:
        trainer.save_model()
        return
    state_dict_type = plugin.state_dict_type
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        trainer.save_model()
    finally:
        plugin.set_state_dict_type(state_dict_type)


def train_and_save(trainer, training_args, train_dataset) -> None:
    """Train (resuming if asked), save the model (safetensors, with its processor), the metrics and the state."""
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_full_model(trainer)
    metrics = dict(result.metrics, train_samples=len(train_dataset))
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()


# Defaults of both recipes that differ from TrainingArguments' own (every one can be overridden by a flag).
RECIPE_DEFAULTS: dict[str, Any] = {
    "do_train": True,
    "do_eval": True,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "logging_steps": 10,
    "report_to": "none",
    "sharpness_report": True,
}


def parse_args(
    argv: list[str] | None,
    dataclass_types: tuple,
    defaults: dict[str, Any],
    default_run: Callable[[tuple], dict[str, Any]],
) -> tuple[tuple, set[str]]:
    """Parse ``argv`` (flags, or one ``.json`` file) into the dataclasses, with the recipe ``defaults`` and,
    when ``default_run(parsed)`` returns settings (the embedded offline default run), those too -- each
    only where the user did not give that argument. Returns the dataclasses and the names given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = dict(defaults)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_gpu():
        # `accelerate launch --multi_gpu` on a machine without GPUs: without use_cpu the Trainer would run each
        # process as an independent single-process job (same output_dir, no gradient all-reduce).
        defaults["use_cpu"] = True
    parser = HfArgumentParser(dataclass_types)
    known = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    unknown = sorted(k for k in defaults if k not in known)
    if unknown:  # a recipe default that this transformers version does not have
        logger.debug("Ignoring recipe defaults unknown to this version: %s", unknown)
        defaults = {k: v for k, v in defaults.items() if k in known}
    if len(argv) == 1 and argv[0].endswith(".json"):
        raw = json.loads(Path(argv[0]).read_text())
        given = set(raw)

        def parse(extra: dict[str, Any]) -> tuple:
            return parser.parse_dict({**defaults, **extra, **raw})

    else:
        given = {re.sub(r"^no_", "", a[2:].split("=")[0]) for a in argv if a.startswith("--")}
        given |= {a[2:].split("=")[0] for a in argv if a.startswith("--")}

        def parse(extra: dict[str, Any]) -> tuple:
            parser.set_defaults(**{**defaults, **extra})
            return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)

    try:
        parsed = parse({})
        extra = {k: v for k, v in default_run(parsed).items() if k not in given and k in known}
        if extra:
            parsed = parse(extra)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    return parsed, given


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def setup_logging(training_args) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def take_hub_settings(training_args, model_token: str | None = None) -> tuple[bool, str | None]:
    """Take ``push_to_hub`` and the token out of the TrainingArguments, so that the Trainer never pushes on its
    own (the recipe pushes once, at the end, after a preflight) and the token never reaches
    ``training_args.bin``. Returns (push requested, token)."""
    push = bool(training_args.push_to_hub)
    token = training_args.hub_token or model_token
    training_args.push_to_hub = False
    training_args.hub_token = None
    return push, (hub.resolve_token(token) if push else token)


def finish(trainer, training_args, card_kwargs: dict[str, Any], push: bool, token: str | None, repo_id: str | None) -> int:
    """Write the model card, push if asked (main process only) and say how to push later if that fails."""
    card_kwargs = {**card_kwargs, "hub_model_id": repo_id}
    trainer.create_model_card(**card_kwargs)  # hf_msam.publish.card, through SAMTrainer.create_model_card
    status = 0
    if push and trainer.is_world_process_zero():
        try:
            url = hub.push_output_dir(training_args.output_dir, repo_id, token,
                                      private=training_args.hub_private_repo,
                                      revision=getattr(training_args, "hub_revision", None))
            logger.info("Pushed %s to %s: %s", training_args.output_dir, repo_id, url)
        except Exception as exc:
            text = str(exc).splitlines()[0] if str(exc) else ""
            if token:
                text = text.replace(token, "***")
            print(
                f"\nThe push to the Hub ({repo_id}) failed after training: {type(exc).__name__}: {text}\n"
                f"{hub.push_later_message(training_args.output_dir, repo_id)}",
                file=sys.stderr,
            )
            status = 3
    return status


def preflight_or_exit(push: bool, training_args, token: str | None, given: set[str]) -> tuple[int, str | None]:
    """Check the push settings and run the Hub preflight when pushing; returns (exit status, repo id).

    The recipes push once, at the end, after this preflight (the Trainer's own pushes are off, so the token
    never reaches ``training_args.bin``): a ``--hub_strategy`` asking for pushes during training is refused
    here, before anything is loaded."""
    if not push:
        return 0, training_args.hub_model_id
    strategy = str(getattr(training_args.hub_strategy, "value", training_args.hub_strategy))
    if "hub_strategy" in given and strategy != "end":
        print(f"error: --hub_strategy {strategy} is not supported by the recipes: they push once, when training "
              "has finished (the model, card and results, no checkpoints). Use --hub_strategy end or leave it out; "
              "to keep checkpoints on the Hub, push the output folder yourself (`hf-msam push OUTPUT_DIR`).\n"
              "Nothing was trained.", file=sys.stderr)
        return 2, None
    try:
        return 0, hub.preflight(training_args.hub_model_id, token, default_name=Path(training_args.output_dir).name)
    except hub.HubError as exc:
        print(f"error: {exc}\nNothing was trained.", file=sys.stderr)
        return 2, None


def shutdown_distributed() -> None:
    """End a multi-process run with every process leaving together; call it after the run's trainer is gone.

    The cause of a two-process CPU run that wrote every output and then kept one process alive (about once in
    15 runs): the surviving process hung at interpreter exit, after ``destroy_process_group`` had returned, while
    ``main``'s locals were released. Its stack: the main thread, holding the GIL, was freeing the trainer's
    ``DistributedDataParallel`` reducer, the last owner of the gloo process group, whose destructor joins the
    group's worker thread; that worker was itself waiting for the GIL to release a tensor of a finished
    ``all_gather``. So the recipes run inside ``_run`` (the trainer is released while the group is still
    registered, so freeing it destroys nothing), reference cycles are collected here, and a barrier drains the
    group's queue and lines the processes up before the group is destroyed, as the distributed test scripts do.
    Only for a normal return: after an exception a barrier could meet an unrelated collective of another
    process, so a failing process just raises (the launcher stops the others)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def record_run(output_dir: str, name: str, values: dict[str, Any]) -> None:
    """Merge ``values`` into ``output_dir/NAME`` (JSON), e.g. the recipe settings and wall time."""
    path = Path(output_dir) / name
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(values)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
