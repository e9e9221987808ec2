"""``hf-msam sharpness MODEL_DIR --data FILE_OR_DATASET --output REPORT.json``: the curvature report of a saved
classification or regression model (text or image), as a table on stdout, a JSON file and a PNG next to it.

The data is read by ``hf_msam.data`` (a local CSV/TSV/JSON-lines file or folder, a GLUE task or a Hub dataset).
A local file (or a folder without a ``train/`` sub-folder) is used whole; a Hub dataset gives its ``train``
split. Labels are matched to the model's own ``label2id`` when they are class names. The model is loaded
from safetensors only, in float32, with eager attention; remote code only with ``--trust_remote_code``.
A checkpoint's Adam/AdamW ``optimizer.pt`` (``--optimizer_state``, or found in the model folder) adds the
preconditioned sharpness; it is read with ``torch.load(weights_only=True)``, which loads tensors only. Without
``--learning_rate`` the verdicts judge the rate in force in that state (its parameter groups' ``lr``).
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from .arguments import PREFIX, SharpnessArguments, learning_rates, option_names, report_options
from .summary import summarise

IMAGE_CONFIG_KEYS = ("num_channels", "image_size")


class CliError(Exception):
    """A problem the user can fix; the message names the file, column or flag and the fix."""


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-msam sharpness`` flags: data and model flags, the verdict inputs, and every report option of
    :class:`SharpnessArguments` without its ``sharpness_`` prefix."""
    parser = argparse.ArgumentParser(
        prog="hf-msam sharpness",
        description="Curvature report (top Hessian eigenvalues, trace, m-sharpness, coherence, SGD stability "
        "verdict) of a saved classification/regression model on its training data.",
    )
    parser.add_argument("model_dir", help="folder of a saved model (config.json, model.safetensors, tokenizer or "
                        "image processor), e.g. a training run's output_dir")
    parser.add_argument("--data", required=True, help="training data: a local CSV/TSV/JSON-lines file, a folder, a "
                        "GLUE task name or a Hub dataset name")
    parser.add_argument("--output", required=True, help="REPORT.json to write; the plot goes next to it (.png)")
    parser.add_argument("--dataset_config_name", default=None, help="configuration of a Hub dataset")
    parser.add_argument("--text_column", default=None, help="text column (guessed when omitted)")
    parser.add_argument("--text_pair_column", default=None, help="second text column of sentence pairs")
    parser.add_argument("--label_column", default=None, help="label column (guessed: label, labels, target, score)")
    parser.add_argument("--image_column", default=None, help="image column; makes the data images")
    parser.add_argument("--max_length", type=int, default=128, help="maximum tokens per text example")
    parser.add_argument("--learning_rate", type=float, default=None, help="learning rate eta of the verdicts "
                        "(default: the rate in force in the optimizer state, when one is read)")
    parser.add_argument("--train_batch_size", type=int, default=None, help="SGD batch size B of the verdict")
    parser.add_argument("--num_train_examples", type=int, default=None,
                        help="training-set size n of the verdict (default: the examples in --data)")
    parser.add_argument("--optimizer", default=None, help="the optimizer the model was trained with (for the note "
                        "that the theory is about plain SGD)")
    parser.add_argument("--optimizer_state", default=None,
                        help="a checkpoint's optimizer.pt (Adam/AdamW) for the preconditioned sharpness (default: "
                        "MODEL_DIR/optimizer.pt when present)")
    parser.add_argument("--device", default=None, help="device of the computation (default: cuda if available)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model folder's own code")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("report options (default: the report's own)")
    hints = typing.get_type_hints(SharpnessArguments)
    for f in fields(SharpnessArguments):
        name = f.name[len(PREFIX) :]
        if name not in option_names():
            continue
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind)
        help_ = f.metadata.get("help", "")
        if typing.get_origin(base) is list:
            group.add_argument(f"--{name}", nargs="+", default=f.default, help=help_)
        else:
            group.add_argument(f"--{name}", type=base, default=f.default, help=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 done, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or argparse's own message for a malformed command line
        return int(exit_.code or 0)
    try:
        report = run(args)
    except CliError as error:
        print(f"hf-msam sharpness: error: {error}", file=sys.stderr)
        return 2
    print(format_table(report.to_dict()))
    output = Path(args.output)
    print(f"\nwrote {output} and {output.with_suffix('.png')}")
    return 0


def run(args: argparse.Namespace):
    """Load the model and data, compute the report, write the JSON and the PNG; return the report."""
    from ..data import DataError
    from .plot import plot_report
    from .report import sharpness_report

    try:  # validated on construction
        options = SharpnessArguments(**{PREFIX + name: getattr(args, name) for name in option_names()})
    except ValueError as error:
        raise CliError(str(error).replace(PREFIX, "--")) from error
    output = Path(args.output)
    if output.suffix.lower() != ".json":
        raise CliError(f"--output {output}: give a .json file name (the plot is written next to it as .png).")
    model, processor, is_image = _load_model(args)
    try:
        dataset, collator = _load_data(args, model, processor, is_image)
    except DataError as error:
        raise CliError(str(error)) from error
    kwargs = report_options(options)
    for name in ("train_batch_size", "num_train_examples", "optimizer"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    kwargs.update(_load_adam_state(args, model))
    kwargs.update(_judged_learning_rate(args, kwargs.get("adam_state")))
    try:
        report = sharpness_report(model, dataset, data_collator=collator, progress=not args.quiet,
                                  device=args.device, **kwargs)
    except ValueError as error:
        raise CliError(f"{args.model_dir} on {args.data}: {error}") from error
    output.parent.mkdir(parents=True, exist_ok=True)
    report.to_json(str(output))
    plot_report(report.to_dict(), output.with_suffix(".png"))
    return report


def _load_model(args: argparse.Namespace):
    """The model in float32 with eager attention, its tokenizer or image processor, and whether it is an
    image model."""
    import torch
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    folder = Path(args.model_dir)
    if not (folder / "config.json").is_file():
        raise CliError(f"{folder}: no config.json. Pass a folder written by save_pretrained / Trainer.save_model "
                       "(a training run's output_dir).")
    if not any(folder.glob("*.safetensors")):
        raise CliError(f"{folder}: no .safetensors weights; only safetensors are loaded. Re-save the model with "
                       "save_pretrained(..., safe_serialization=True).")
    remote = args.trust_remote_code
    config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
    is_image = args.image_column is not None or (
        config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
        and all(hasattr(config, key) for key in IMAGE_CONFIG_KEYS)
    )
    auto_model = AutoModelForImageClassification if is_image else AutoModelForSequenceClassification
    auto_processor = AutoImageProcessor if is_image else AutoTokenizer
    kind = "image processor" if is_image else "tokenizer"
    try:
        model = auto_model.from_pretrained(folder, attn_implementation="eager", use_safetensors=True,
                                           trust_remote_code=remote, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise CliError(f"{folder}: could not load it as an {'image' if is_image else 'sequence'} classification "
                       f"model: {error}") from error
    try:
        processor = auto_processor.from_pretrained(folder, trust_remote_code=remote)
    except (OSError, ValueError, TypeError) as error:
        raise CliError(f"{folder}: no {kind} files. Save the {kind} with the model (Trainer(processing_class=...) "
                       f"or {kind}.save_pretrained(MODEL_DIR)).") from error
    return model, processor, is_image


def _load_adam_state(args: argparse.Namespace, model) -> dict[str, Any]:
    """``adam_state`` from ``--optimizer_state`` (an error when it is not Adam/AdamW), or from MODEL_DIR/optimizer.pt
    when present (``adam_unavailable`` with the reason when it is another optimizer's); empty when there is none."""
    import torch

    from .adam import adam_state_from_state_dict, state_dict_refusal

    explicit = args.optimizer_state is not None
    path = _optimizer_state_path(args)
    if not path.is_file():
        if explicit:
            raise CliError(f"--optimizer_state {path}: no such file; pass a checkpoint's optimizer.pt")
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only unpickling refuses anything but tensors and plain containers
        raise CliError(f"--optimizer_state {path}: not a readable optimizer state ({type(error).__name__}: "
                       f"{error})") from error
    if not isinstance(state, dict):
        raise CliError(f"--optimizer_state {path}: not an optimizer state_dict (a {type(state).__name__})")
    reason = state_dict_refusal(state)
    if reason is not None and not explicit:
        return {"adam_unavailable": f"{path}: {reason}"}
    try:
        return {"adam_state": adam_state_from_state_dict(state, model)}
    except ValueError as error:
        raise CliError(f"--optimizer_state {path}: {error}") from error


def _optimizer_state_path(args: argparse.Namespace) -> Path:
    return Path(args.optimizer_state) if args.optimizer_state is not None else Path(args.model_dir) / "optimizer.pt"


def _judged_learning_rate(args: argparse.Namespace, adam_state) -> dict[str, Any]:
    """The rate the verdicts judge (``arguments.learning_rates``): ``--learning_rate``, else the lr of the optimizer
    state's parameter groups, the rate of the checkpoint's next step (a Trainer checkpoint is saved after the
    scheduler's step); with the state's peak (``initial_lr``) and rate recorded beside it. A state without one
    usable rate and no ``--learning_rate`` is an error."""
    path = _optimizer_state_path(args)
    rate = adam_state.learning_rate if adam_state is not None else None
    if args.learning_rate is None and adam_state is not None and (rate is None or not rate > 0):
        why = "its parameter groups have different rates" if rate is None else (
            f"its rate is {rate} (the end of a schedule that decays to zero)")
        raise CliError(f"{path}: no learning rate to judge: {why}; pass --learning_rate (e.g. the rate of the last "
                       "step, the last learning_rate in the checkpoint's trainer_state.json)")
    return learning_rates(adam_state.learning_rate_peak if adam_state is not None else None,
                          [rate] if rate is not None else [],
                          step_source=f"{path}: its parameter groups' lr, the rate of the checkpoint's next step",
                          given=args.learning_rate, given_source="--learning_rate")


def _load_data(args: argparse.Namespace, model, processor, is_image: bool):
    """The model-ready dataset (labels matched to the model's) and its data collator."""
    from ..data import image_transform, load_image_dataset, load_text_dataset, tokenize

    common = dict(dataset_config_name=args.dataset_config_name, label_column=args.label_column)
    if is_image:
        data = load_image_dataset(args.data, image_column=args.image_column, **common)
    else:
        data = load_text_dataset(args.data, text_column=args.text_column, text_pair_column=args.text_pair_column,
                                 **common)
    table = _whole_if_local(args.data, data.train, data.validation)
    table = _match_labels(table, data.label_names, model.config, args)
    if is_image:
        from transformers import default_data_collator

        table.set_transform(image_transform(processor))
        return table, default_data_collator
    from transformers import DataCollatorWithPadding

    tokens = tokenize(table, processor, text_column=data.text_column, text_pair_column=data.text_pair_column,
                      max_length=args.max_length)
    return tokens, DataCollatorWithPadding(processor)


def _whole_if_local(source: str, train, validation):
    """A local file (or a folder without ``train/``) is used whole: the loader's held-out part goes back in."""
    import datasets

    path = Path(source)
    local = path.is_file() or (path.is_dir() and not (path / "train").is_dir())
    if local and validation is not None:
        return datasets.concatenate_datasets([train, validation])
    return train


def _match_labels(table, label_names: list[str] | None, config, args: argparse.Namespace):
    """Labels as the model's head expects them: float targets for a regression head; class ids of the model's
    own ``label2id`` for a classifier (class names), checked against its ``num_labels``."""
    import datasets

    column = args.label_column or "label"
    where = f"{args.data} (column {column!r})"
    regression = config.problem_type == "regression" or (config.num_labels == 1 and config.problem_type is None)
    if regression:
        if label_names is not None and not all(name == str(i) for i, name in enumerate(label_names)):
            raise CliError(f"{where}: class labels {label_names[:5]} but {args.model_dir} is a regression model "
                           "(num_labels=1); give numeric targets, or use a classification model.")
        return table.cast_column("label", datasets.Value("float32"))
    if label_names is None:
        raise CliError(f"{where}: real-valued targets but {args.model_dir} is a classifier with "
                       f"{config.num_labels} labels; give class labels (ids or names), or use a regression model.")
    label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
    if all(name in label2id for name in label_names) and not all(name == str(i) for i, name in enumerate(label_names)):
        ids = [label2id[name] for name in label_names]
        table = table.cast_column("label", datasets.Value("int64")).map(
            lambda label: {"label": ids[label]}, input_columns="label")
    elif not all(name == str(i) for i, name in enumerate(label_names)):
        raise CliError(f"{where}: labels {label_names[:5]} are not among the classes of {args.model_dir} "
                       f"({list(label2id)[:5]}); use the model's class names or class ids 0..{config.num_labels - 1}.")
    elif len(label_names) > config.num_labels:
        raise CliError(f"{where}: class ids up to {len(label_names) - 1} but {args.model_dir} has "
                       f"{config.num_labels} labels; check the label column and the model.")
    return table


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _interval(values: list[float] | None) -> str:
    return "" if not values else f" [{_number(values[0])}, {_number(values[1])}]"


def format_table(report: dict[str, Any]) -> str:
    """A readable two-column table of a report (``SharpnessReport.to_dict()``), then the verdict's reason, its
    warnings and errors."""
    summary = summarise(report)
    drift = "none" if report.get("drift_steps") is None else _number(report.get("drift_steps"))
    eigen = report.get("top_eigenvalues")
    level = report.get("coherence_train_confidence")
    rows = [
        ("probe examples / parameters", f"{report.get('num_examples')} / {report.get('num_parameters')}"),
        ("loss / accuracy on the probe set", f"{_number(report.get('loss'))} / {_number(report.get('probe_accuracy'))}"),
        ("lambda_max (Lanczos) [residual]", f"{_number(report.get('lambda_max'))} [{_number(report.get('lambda_max_residual'), 2)}]"),
        ("smallest Ritz value (lambda_min <=)", _number(report.get("lambda_min_ritz"))),
        ("top eigenvalues", "-" if not eigen else ", ".join(_number(v) for v in eigen)),
        ("trace +- stderr", f"{_number(report.get('trace'))} +- {_number(report.get('trace_stderr'), 2)}"),
        (f"m-sharpness (rho={_number(report.get('m_sharpness_rho'))}, m={_number(report.get('m_sharpness_m'))})",
         _number(report.get("m_sharpness"))),
        (f"coherence sigma ({_number(report.get('coherence_examples'))} examples)", _number(report.get("coherence"))),
        ("coherence of the training set" + (f" [{level:.0%} interval]" if level else ""),
         _number(report.get("coherence_train_estimate")) + _interval(report.get("coherence_train_interval"))),
        ("lambda_max (Gauss-Newton)", _number(report.get("lambda_max_ggn"))),
        ("SGD: eta / B / n", f"{_number(report.get('learning_rate'))} / {_number(report.get('train_batch_size'))} / "
                             f"{_number(report.get('num_train_examples'))}"),
        ("critical eta: Theorem 1 / GD (2/lambda_max)",
         f"{_number(report.get('eta_critical_theorem1'))} / {_number(report.get('eta_critical_gd'))}"),
        ("Gauss-Newton mean-square verdict (headline)", summary.headline_label),
        ("eta / eta_crit (Gauss-Newton) [eta_crit: B-subsets / with replacement]",
         f"{_number(report.get('eta_ratio_ggn'))} [{_number(report.get('eta_critical_ggn'))} / "
         f"{_number(report.get('eta_critical_ggn_with_replacement'))}]"),
        ("mean-square log growth per step", _number(report.get("mean_square_rate"))),
        ("lambda_max: Hessian - Gauss-Newton", _number(report.get("lambda_max_gap"))),
        ("drift steps 1/(eta |lambda_min|) / steps trained", f"{drift} / {_number(report.get('steps_trained'))}"),
        ("gradient ratio / at a minimum",
         f"{_number(report.get('gradient_ratio'))} / {_number(report.get('at_minimum'))}"),
        ("linear-stability probe growth rate", _number(report.get("probe_growth_rate"))),
        ("SGD stability verdict for the training set", summary.verdict_label),
        ("Adam: lambda_max(P^-1 H) / threshold / ratio",
         f"{_number(report.get('adam_preconditioned_lambda_max'))} / {_number(report.get('adam_stability_threshold'))} / "
         f"{_number(report.get('adam_edge_ratio'))}"),
        ("Hessian-vector products", _number(report.get("hvp_count"))),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["Curvature report", "=" * (width + 20)] + [f"{name:<{width}}  {value}" for name, value in rows]
    if report.get("learning_rate_source"):
        lines.append(f"eta: {report['learning_rate_source']} (schedule peak {_number(report.get('learning_rate_peak'))})")
    if report.get("ggn_reason"):
        lines.append(f"headline: {report['ggn_reason']}")
    if report.get("stability_reason"):
        lines.append(f"verdict: {report['stability_reason']}")
    lines += [f"warning: {w}" for w in report.get("warnings") or []]
    lines += [f"error: {e}" for e in report.get("errors") or []]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
