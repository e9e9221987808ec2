"""Embedding tables treated by rows in the loop path: the same update as the dense treatment.

Each case runs the loop of ``hf_msam.update.loop`` twice, dense and with ``sparse_embedding_gradients``, from the same
random state with dropout on, and compares both with the plain-loop reference (which replays the random state for
the descent pass). Tables used by the lookup alone must come back sparse; a table tied to an LM head must fall back
to the dense treatment (its gradient holds the head's part too).
"""

from __future__ import annotations

import math

import pytest
import torch
from builders import SequentialSAMTrainer, sam_args, tiny_bert, tiny_llama, tiny_vit
from references import max_abs_diff, reference_msam_gradient, snapshot

from hf_msam import MicroBatchSAM, RandomState, sparse_embedding_gradients, split_micro_batches, trainable_embeddings

DROPOUT = dict(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)


def _tokens(n=8, length=6, seed=0, lm=False):
    """Token ids with padding (id 0, BERT's padding_idx) at the end of some rows and inside others."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=g) * (torch.rand(n, length, generator=g) > 0.2)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    if lm:
        labels = ids.masked_fill(torch.rand(n, length, generator=g) < 0.3, -100)
    else:
        labels = torch.randint(0, 2, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 1, 8, 8, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def _bert_mlm(tied: bool):
    from builders import tiny_bert_config
    from transformers import BertForMaskedLM

    torch.manual_seed(3)
    return BertForMaskedLM(tiny_bert_config(pad_token_id=0, tie_word_embeddings=tied, **DROPOUT))


CASES = {
    # model factory, batch, names of the tables whose ascent gradient must come back sparse
    "bert-padding": (
        lambda: tiny_bert(seed=1, pad_token_id=0, **DROPOUT),
        lambda: _tokens(seed=1),
        {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
         "bert.embeddings.token_type_embeddings.weight"},
    ),
    "bert-mlm-untied": (
        lambda: _bert_mlm(tied=False),
        lambda: _tokens(seed=2, lm=True),
        {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
         "bert.embeddings.token_type_embeddings.weight"},
    ),
    "bert-mlm-tied": (  # the word embedding is the decoder's weight too: dense; the other tables: rows
        lambda: _bert_mlm(tied=True),
        lambda: _tokens(seed=3, lm=True),
        {"bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"},
    ),
    "llama-tied": (
        lambda: tiny_llama(seed=4, tie_word_embeddings=True, attention_dropout=0.2),
        lambda: _tokens(seed=4, lm=True),
        set(),
    ),
    "llama-untied": (
        lambda: tiny_llama(seed=5, tie_word_embeddings=False, attention_dropout=0.2),
        lambda: _tokens(seed=5, lm=True),
        {"model.embed_tokens.weight"},
    ),
    "vit": (lambda: tiny_vit(seed=6, **DROPOUT), lambda: _images(seed=6), set()),
}


def _loop_gradient(model, batch, micro_batch_size, sparse, sparse_tables=None, **sam_kwargs):
    """The loop of the ``hf_msam.update.loop`` docstring (dense, or with the tables treated by rows); returns ``.grad``.

    ``sparse_tables`` collects the names of the parameters whose ascent gradient came back sparse."""
    names = {id(p): n for n, p in model.named_parameters()}
    sam = MicroBatchSAM(model.parameters(), **sam_kwargs)
    embeddings = trainable_embeddings(model) if sparse else []
    model.zero_grad(set_to_none=True)
    for micro, share in split_micro_batches(batch, micro_batch_size):
        randomness = RandomState.capture()
        with sparse_embedding_gradients(embeddings):
            loss = model(**micro).loss
        grads = sam.ascent_gradients(loss)
        if sparse_tables is not None:
            sparse_tables.update(names[id(p)] for p, g in zip(sam.params, grads) if g.is_sparse)
        sam.perturb_with(grads)
        randomness.restore()
        with sparse_embedding_gradients(embeddings, accumulating=True):
            loss = model(**micro).loss
        (share * loss).backward()
        sam.restore()
    # a tensor the loss does not reach (the pooler of an MLM) has no .grad; the reference gives it zeros
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in sam.params]


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("case", list(CASES))
def test_rows_equal_dense_and_reference_with_dropout(case, adaptive):
    make_model, make_batch, expected_sparse = CASES[case]
    model, batch = make_model(), make_batch()
    model.train()
    sam_kwargs = dict(rho=0.3, adaptive=adaptive, adaptive_eta=0.05)
    start = torch.get_rng_state()
    reference = reference_msam_gradient(model, batch, 3, rho=0.3, adaptive=adaptive, eta=0.05, cpu_rng_state=start)
    torch.set_rng_state(start)
    dense = _loop_gradient(model, batch, 3, sparse=False, **sam_kwargs)
    torch.set_rng_state(start)
    sparse_tables: set[str] = set()
    rows = _loop_gradient(model, batch, 3, sparse=True, sparse_tables=sparse_tables, **sam_kwargs)

    assert sparse_tables == expected_sparse  # the tables the lookup alone uses, and no other
    for r, d, ref in zip(rows, dense, reference):
        assert not r.is_sparse  # .grad stays dense for the optimizer
        torch.testing.assert_close(r, d, rtol=0, atol=1e-6)
        torch.testing.assert_close(r, ref, rtol=0, atol=1e-6)
    torch.set_rng_state(start)
    plain = reference_msam_gradient(model, batch, 3, rho=0.0, cpu_rng_state=start)
    assert max((a - b).abs().max().item() for a, b in zip(rows, plain)) > 1e-4  # the comparison has teeth


def test_rows_are_perturbed_in_place_and_restored_bit_for_bit():
    model = tiny_bert(seed=7, pad_token_id=0)
    batch = _tokens(seed=7)
    table = model.bert.embeddings.word_embeddings.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    storage = [p.data_ptr() for p in model.parameters()]
    sam = MicroBatchSAM(model.parameters(), rho=0.25)
    names = [n for n, _ in model.named_parameters()]
    dense_grads = dict(zip(names, torch.autograd.grad(model(**batch).loss, sam.params)))
    norm = math.sqrt(sum(float((g**2).sum()) for g in dense_grads.values()))

    with sparse_embedding_gradients(trainable_embeddings(model)):
        loss = model(**batch).loss
    result = sam.perturb(loss)
    assert result.grad_norm == pytest.approx(norm, rel=1e-6)  # ||g_k|| over every trainable tensor
    for n, p in model.named_parameters():  # e_k = rho g_k / ||g_k||, rows and dense tensors alike
        torch.testing.assert_close(p.detach() - before[n], 0.25 * dense_grads[n] / norm, rtol=0, atol=1e-7)
    used = torch.unique(batch["input_ids"][batch["attention_mask"].bool()])
    unused = torch.ones(table.shape[0], dtype=torch.bool)
    unused[used] = False
    unused[0] = True  # the padding row gets no gradient
    assert torch.equal(table.detach()[unused], before["bert.embeddings.word_embeddings.weight"][unused])  # untouched
    assert [p.data_ptr() for p in model.parameters()][:3] == storage[:3]  # the tables were perturbed in place
    sam.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [p.data_ptr() for p in model.parameters()] == storage


def test_descent_rows_go_into_a_dense_grad_and_an_unreached_table_keeps_none():
    class TwoTables(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(8)
            self.used = torch.nn.Embedding(50, 4, padding_idx=0)
            self.unused = torch.nn.Embedding(50, 4)
            self.head = torch.nn.Linear(4, 1)

        def forward(self, input_ids):
            return self.head(self.used(input_ids)).pow(2).mean()

    model = TwoTables()
    embeddings = trainable_embeddings(model)
    assert embeddings == [model.used, model.unused]
    ids = torch.tensor([[1, 2, 2, 0], [3, 1, 0, 0]])
    expected = torch.autograd.grad(2 * model(ids), model.used.weight)[0]
    for _ in range(2):  # the first backward leaves a dense .grad, the second adds its rows into it
        with sparse_embedding_gradients(embeddings, accumulating=True):
            loss = model(ids)
        loss.backward()
    assert not model.used.weight.grad.is_sparse
    torch.testing.assert_close(model.used.weight.grad, expected, rtol=0, atol=1e-7)
    assert model.unused.weight.grad is None
    assert not model.used.sparse and not model.unused.sparse  # switched back


def test_tables_that_cannot_take_sparse_gradients_are_left_out():
    model = torch.nn.ModuleDict({"freq": torch.nn.Embedding(5, 2, scale_grad_by_freq=True),
                                 "frozen": torch.nn.Embedding(5, 2).requires_grad_(False),
                                 "plain": torch.nn.Embedding(5, 2)})
    assert trainable_embeddings(model) == [model["plain"]]


@pytest.mark.parametrize(
    "make_model, data_kind",
    [(lambda: tiny_bert(seed=9, pad_token_id=0, **DROPOUT), "padded"),
     (lambda: tiny_llama(seed=9, tie_word_embeddings=True, attention_dropout=0.2), "lm"),
     (lambda: tiny_llama(seed=9, tie_word_embeddings=False, attention_dropout=0.2), "lm")],
    ids=["bert-padding", "llama-tied", "llama-untied"],
)
def test_trainer_steps_equal_with_and_without_rows(tmp_path, make_model, data_kind):
    """Two optimizer steps with gradient accumulation 2 and dropout on: the same weights either way."""
    import datasets

    batch = _tokens(n=16, seed=9, lm=data_kind == "lm")
    data = datasets.Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    trained = {}
    for sparse in (True, False):
        model = make_model()
        args = sam_args(tmp_path / str(sparse), sam_rho=0.2, sam_micro_batch_size=2, per_device_train_batch_size=4,
                        gradient_accumulation_steps=2, max_steps=2, sam_sparse_embeddings=sparse, optim="adamw_torch",
                        learning_rate=1e-2, sam_micro_batch_mode="loop")
        SequentialSAMTrainer(model=model, args=args, train_dataset=data).train()
        trained[sparse] = snapshot(model)
    assert max_abs_diff(trained[True], trained[False]) < 1e-6
    assert max_abs_diff(trained[True], snapshot(make_model())) > 1e-3  # it did train
