"""The Trainer's contracts that SAMTrainer keeps: the arguments object, the callbacks, the loss arguments, the
token count of causal LMs, packed batches, compiled models. Each compares with the stock Trainer or a reference."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from builders import (
    SequentialSAMTrainer,
    SequentialTrainer,
    lm_dataset,
    padded_lm_dataset,
    sam_args,
    summed_token_loss,
    tensor_batch,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_dataset,
    token_loss_func,
)
from references import max_abs_diff, reference_msam_gradient, reference_sgd_step, snapshot
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
    trains with the default rho 0.01; both differ from the stock step."""
    data = token_dataset(8, seed=31)
    trained = {}
    for name, args in {
        "user": _plain_args(tmp_path / "user", UserArguments),
        "sam_0.2": sam_args(tmp_path / "a", sam_rho=0.2),
        "plain": _plain_args(tmp_path / "plain"),
        "sam_0.01": sam_args(tmp_path / "b", sam_rho=0.01),
    }.items():
        model = tiny_bert(seed=31)
        SequentialSAMTrainer(model=model, args=args, train_dataset=data).train()
        trained[name] = snapshot(model)
    stock = tiny_bert(seed=31)
    SequentialTrainer(model=stock, args=_plain_args(tmp_path / "stock"), train_dataset=data).train()
    assert max_abs_diff(trained["user"], trained["sam_0.2"]) == 0
    assert max_abs_diff(trained["plain"], trained["sam_0.01"]) == 0
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


# --- custom losses get each micro-batch's count -----------------------------------------------------------
def _token_reference(seed, data, steps, batch, micro):
    """The plain-loop mSAM steps of a causal LM, each micro-batch weighted by its share of the step's shifted tokens."""
    reference = tiny_llama(seed=seed)
    for step in range(steps):
        rows = tensor_batch(data, batch * step, batch * step + batch)
        items = [int(rows["labels"][k : k + micro, 1:].ne(-100).sum()) for k in range(0, batch, micro)]
        assert len(set(items)) > 1  # unequal counts: a wrong count changes the update
        weights = [i / sum(items) for i in items]
        reference_sgd_step(reference, reference_msam_gradient(reference, rows, micro, 0.1, weights=weights), lr=0.5)
    return snapshot(reference)


class _CountDividingTrainer(SequentialSAMTrainer):
    """A ``compute_loss`` override that divides a summed loss by the ``num_items_in_batch`` it is given."""

    seen_counts: list[int]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen_counts.append(int(num_items_in_batch))
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = summed_token_loss(outputs.logits, labels) / num_items_in_batch
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("how", ["compute_loss_func", "override"])
def test_custom_loss_normalised_by_num_items_matches_reference(tmp_path, how):
    """A loss summed over tokens and divided by ``num_items_in_batch`` gives the update of the model's own loss: the
    plain-loop reference with token weights (micro-batches of 4, gradient accumulation 2, -100 holes)."""
    data = lm_dataset(32, seed=33)
    model = tiny_llama(seed=33)
    args = sam_args(tmp_path, sam_rho=0.1, sam_micro_batch_size=4, per_device_train_batch_size=8,
                    gradient_accumulation_steps=2, max_steps=2)
    if how == "compute_loss_func":
        trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=data, compute_loss_func=token_loss_func)
    else:
        trainer = _CountDividingTrainer(model=model, args=args, train_dataset=data)
        trainer.seen_counts = []
    trainer.train()
    assert max_abs_diff(snapshot(model), _token_reference(33, data, steps=2, batch=16, micro=4)) < 1e-6
    if how == "override":  # two passes per micro-batch, each with the micro-batch's shifted token count
        labels = torch.tensor(data["labels"])[:, 1:]
        expected = [int(labels[k : k + 4].ne(-100).sum()) for k in range(0, 32, 4)]
        assert trainer.seen_counts == [c for c in expected for _ in range(2)]


# --- every causal LM's items are its shifted labels ------------------------------------------------------
def test_gpt2_micro_batches_are_weighted_by_shifted_tokens(tmp_path):
    """GPT-2 has no ``loss_type``; its loss averages the shifted labels, so each micro-batch weighs its shifted count:
    the plain-loop reference with those weights (micro-batches of 4, gradient accumulation 2, padded lengths 3..8)."""
    data = padded_lm_dataset(32, seed=34)
    model, reference = tiny_gpt2(34), tiny_gpt2(34)
    args = sam_args(tmp_path, sam_rho=0.1, sam_micro_batch_size=4, per_device_train_batch_size=8,
                    gradient_accumulation_steps=2, max_steps=2)
    SequentialSAMTrainer(model=model, args=args, train_dataset=data).train()
    for step in range(2):
        rows = tensor_batch(data, 16 * step, 16 * step + 16)
        shifted = [int(rows["labels"][k : k + 4, 1:].ne(-100).sum()) for k in range(0, 16, 4)]
        unshifted = [int(rows["labels"][k : k + 4].ne(-100).sum()) for k in range(0, 16, 4)]
        assert [u / sum(unshifted) for u in unshifted] != [s / sum(shifted) for s in shifted]  # the count matters
        weights = [s / sum(shifted) for s in shifted]
        reference_sgd_step(reference, reference_msam_gradient(reference, rows, 4, 0.1, weights=weights), lr=0.5)
    assert max_abs_diff(snapshot(model), snapshot(reference)) < 1e-6


# --- packed (padding-free) batches ----------------------------------------------------------------------
def _packed_data():
    import datasets

    g = torch.Generator().manual_seed(35)
    rows = [torch.randint(1, 64, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (8,), generator=g)]
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})


def test_micro_batches_of_packed_batches_are_refused(tmp_path):
    from transformers import DataCollatorWithFlattening

    args = sam_args(tmp_path, sam_rho=0.1, sam_micro_batch_size=2, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match="sam_micro_batch_size=2 cannot split padding-free.*DataCollatorWithFlattening"):
        SAMTrainer(model=tiny_llama(), args=args, train_dataset=_packed_data(), data_collator=DataCollatorWithFlattening())
    packing = DataCollatorWithFlattening()  # the same batches from a collator of the user's, found at the first step
    trainer = SAMTrainer(model=tiny_llama(), args=args, train_dataset=_packed_data(), data_collator=lambda f: packing(f))
    with pytest.raises(ValueError, match="sam_micro_batch_size=2 cannot split padding-free"):
        trainer.train()



# --- a compiled model trains, with the eager update ---------------------------------------------------------
def test_compiled_model_trains_with_the_eager_update(tmp_path):
    """``torch_compile=True`` with the default ``sam_sparse_embeddings``: inductor cannot take sparse gradients, so the
    tables are treated whole, with the same update as eager (micro-batches of 4, -100 holes)."""
    data = lm_dataset(16, seed=36)
    trained = {}
    for compiled in (False, True):
        model = tiny_llama(seed=36)
        args = sam_args(tmp_path / str(compiled), sam_rho=0.1, sam_micro_batch_size=4, torch_compile=compiled)
        SequentialSAMTrainer(model=model, args=args, train_dataset=data).train()
        trained[compiled] = snapshot(model)
    assert max_abs_diff(trained[True], trained[False]) < 1e-5
    assert max_abs_diff(trained[False], snapshot(tiny_llama(seed=36))) > 1e-3
