"""The Trainer's contracts that SAMTrainer keeps: the arguments object, the callbacks, the loss arguments, the
token count of causal LMs, packed batches, compiled models. Each compares with the stock Trainer or a reference."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from conftest import tiny_bert, token_dataset
from trainer_utils import SequentialSAMTrainer, SequentialTrainer, max_abs_diff, sam_args, snapshot
from transformers import TrainingArguments

from hf_msam import SAMTrainer


def _plain_args(output_dir, cls=TrainingArguments, **overrides) -> TrainingArguments:
    """The fields of ``sam_args`` that a ``TrainingArguments`` has, as an instance of ``cls``."""
    values = {k: v for k, v in sam_args(output_dir).to_dict().items() if k in TrainingArguments.__dataclass_fields__}
    values.pop("hub_token")
    values.update(overrides)
    return cls(**values)


@dataclass
class UserArguments(TrainingArguments):
    """A user's own arguments: a field of theirs, and one mSAM field among the others left out."""

    my_field: int = field(default=7)
    sam_rho: float = field(default=0.2)


# --- the arguments object is the user's ----------------------------------------------------------------
def test_trainer_keeps_the_users_arguments_object_and_subclass(tmp_path):
    args = _plain_args(tmp_path, UserArguments, my_field=11)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8))
    assert trainer.args is args
    assert trainer.args.my_field == 11
    assert trainer.sam_options.sam_rho == 0.2  # the user's field
    assert trainer.sam_options.sam_micro_batch_size is None and trainer.sam_options.sam_sparse_embeddings  # defaults


def test_mSAM_settings_come_from_the_users_fields_and_the_defaults(tmp_path):
    """A user's subclass with ``sam_rho=0.2`` trains as SAMTrainingArguments(sam_rho=0.2); a plain TrainingArguments
    trains with the default rho 0.05; both differ from the stock step."""
    data = token_dataset(8, seed=31)
    trained = {}
    for name, args in {
        "user": _plain_args(tmp_path / "user", UserArguments),
        "sam_0.2": sam_args(tmp_path / "a", sam_rho=0.2),
        "plain": _plain_args(tmp_path / "plain"),
        "sam_0.05": sam_args(tmp_path / "b", sam_rho=0.05),
    }.items():
        model = tiny_bert(seed=31)
        SequentialSAMTrainer(model=model, args=args, train_dataset=data).train()
        trained[name] = snapshot(model)
    stock = tiny_bert(seed=31)
    SequentialTrainer(model=stock, args=_plain_args(tmp_path / "stock"), train_dataset=data).train()
    assert max_abs_diff(trained["user"], trained["sam_0.2"]) == 0
    assert max_abs_diff(trained["plain"], trained["sam_0.05"]) == 0
    assert max_abs_diff(trained["plain"], snapshot(stock)) > 1e-5
    assert max_abs_diff(trained["plain"], trained["user"]) > 1e-5


@pytest.mark.parametrize("rho", [0.0, 0.2])
def test_arguments_changed_after_init_take_effect(tmp_path, rho):
    args = _plain_args(tmp_path, UserArguments, max_steps=2, sam_rho=rho)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(32))
    args.max_steps = 1
    trainer.train()
    assert trainer.state.global_step == 1


def test_plain_arguments_with_bad_mSAM_fields_are_refused_at_init(tmp_path):
    args = _plain_args(tmp_path, per_device_train_batch_size=4)
    args.sam_micro_batch_size = 8  # set on a plain TrainingArguments: checked when the trainer is built
    with pytest.raises(ValueError, match="sam_micro_batch_size=8 is larger than per_device_train_batch_size=4"):
        SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8))


# --- no callback of its own ------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_callbacks_are_the_stock_trainers(tmp_path, rho):
    sam = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path / "sam", sam_rho=rho), train_dataset=token_dataset(8))
    stock = SequentialTrainer(model=tiny_bert(), args=_plain_args(tmp_path / "stock"), train_dataset=token_dataset(8))
    assert [type(c) for c in sam.callback_handler.callbacks] == [type(c) for c in stock.callback_handler.callbacks]
