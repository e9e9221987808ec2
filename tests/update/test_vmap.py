"""The vectorised mSAM path: vmap == loop == the plain-loop reference, and when "auto" falls back.

Every model here has 2 layers: with one, a last-token classifier sees every token whatever the attention mask."""

from __future__ import annotations

import logging
import os
from functools import partial

import pytest
import torch
from builders import (
    SequentialSAMTrainer,
    SequentialTrainer,
    lm_dataset,
    lm_dataset_without_labels_in,
    sam_args,
    tensor_batch,
    tiny_bert as one_layer_bert,
)
from references import max_abs_diff, reference_msam_gradient, reference_sgd_step, snapshot
from transformers import TrainingArguments

import hf_msam.training.path as path_module
import hf_msam.update.vmap as hf_msam_vectorized
from hf_msam.update.vmap import FlatLayout, VectorizedMicroBatchSAM, stack_micro_batches

# --- tiny models and data --------------------------------------------------------------------------------
def tiny_bert(seed: int = 0, **overrides):
    """conftest's tiny BERT classifier with 2 layers."""
    return one_layer_bert(seed=seed, **{"num_hidden_layers": 2, **overrides})


def tiny_bert_lora(seed: int = 0):
    """:func:`tiny_bert` under PEFT LoRA (rank 4 on query and value, adapters initialised non-zero)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    model = tiny_bert(seed=seed)
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def decoder_config(kind: str, **overrides):
    """A 2-layer Llama or Qwen2 config (hidden 16, vocab 64) whose padding token is 0, without dropout (a token
    classifier's head has 0.1 unless told)."""
    from transformers import LlamaConfig, Qwen2Config

    values = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, attn_implementation="eager",
                  classifier_dropout=0.0)
    values.update(overrides)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind](**values)


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer causal LM without a padding token, whose loss is normalised by ``num_items_in_batch`` when given."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(decoder_config("llama", **{"pad_token_id": None, **overrides}))


def decoder_classifier(head: str, seed: int = 0, **overrides):
    """``llama_sequence``, ``qwen2_sequence`` (the last non-padding token's logits) or ``llama_token``: a 2-layer
    decoder classifier, which attends causally with neither ``config.is_decoder`` nor ``can_generate()``."""
    import transformers

    kind, task = head.split("_")
    model_class = getattr(transformers, f"{kind.capitalize()}For{task.capitalize()}Classification")
    torch.manual_seed(seed)
    return model_class(decoder_config(kind, num_labels=3, **overrides))




def padded_dataset(n: int = 16, length: int = 8, seed: int = 0):
    """Token sequences of random lengths (3 .. length), right-padded with token 0 (BERT's padding_idx); token 0
    also occurs inside the attended part, where its embedding reaches the loss."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=g) * (torch.rand(n, length, generator=g) > 0.2)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.randint(0, 2, (n,), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def token_labels_dataset(n: int = 8, length: int = 8, seed: int = 0, left: bool = False):
    """:func:`padded_dataset` with a label per token (3 classes; -100 at padding), padded on the left if ``left``."""
    import datasets

    data = padded_dataset(n, length, seed)
    ids, mask = torch.tensor(data["input_ids"]), torch.tensor(data["attention_mask"])
    if left:
        ids, mask = ids.flip(1), mask.flip(1)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, 3, (n, length), generator=g).masked_fill(mask == 0, -100)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def image_dataset(n: int = 16, seed: int = 0):
    import datasets

    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict(
        {"pixel_values": torch.randn(n, 3, 8, 8, generator=g).tolist(), "labels": torch.randint(0, 3, (n,), generator=g).tolist()}
    )


def tiny_vit(seed: int = 0, **overrides):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(**{
        **dict(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        **overrides,
    })  # fmt: skip
    return ViTForImageClassification(config)


def _train(tmp_path, make_model, data, mode, **overrides):
    model = make_model()
    args = sam_args(tmp_path / mode, **{"sam_rho": 0.2, "sam_micro_batch_mode": mode, **overrides})
    trainer = SequentialSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer, snapshot(model)


def _reference(make_model, data, micro_batch_size, batch=8, steps=1, token_level=None, **kwargs):
    """The plain-loop reference; ``token_level``: micro-batches weighted by their supervised labels, ``"shifted"`` (a
    causal LM's, the first position of each sequence predicts nothing) or ``"tokens"`` (a token classifier's)."""
    reference = make_model()
    for step in range(steps):
        tensors = tensor_batch(data, batch * step, batch * step + batch)
        weights = None
        if token_level is not None:
            labels = tensors["labels"][:, 1:] if token_level == "shifted" else tensors["labels"]
            items = [int(labels[k : k + micro_batch_size].ne(-100).sum()) for k in range(0, batch, micro_batch_size)]
            weights = [i / sum(items) for i in items]
        gradient = reference_msam_gradient(reference, tensors, micro_batch_size, kwargs.pop("rho", 0.2), weights=weights, **kwargs)
        reference_sgd_step(reference, gradient, lr=0.5)
    return snapshot(reference)


# --- vmap == loop == reference ---------------------------------------------------------------------------
@pytest.mark.parametrize("micro_batch_size", [8, 4, 2, 1], ids=["m1", "m2", "m4", "m8"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_padded_bert_matches_loop_and_reference(tmp_path, micro_batch_size, attention):
    data = padded_dataset(8, seed=1)

    def make():
        return tiny_bert(seed=1, attn_implementation=attention)

    trainer, vmap_weights = _train(tmp_path, make, data, "vmap", sam_micro_batch_size=micro_batch_size)
    assert trainer._vmap_verified
    _, loop_weights = _train(tmp_path, make, data, "loop", sam_micro_batch_size=micro_batch_size)
    reference = _reference(make, data, micro_batch_size)
    assert max_abs_diff(vmap_weights, reference) < 1e-6
    assert max_abs_diff(loop_weights, reference) < 1e-6
    assert max_abs_diff(vmap_weights, snapshot(make())) > 1e-3  # it did train


@pytest.mark.parametrize("micro_batch_size", [2, 1])
def test_vit_matches_loop_and_reference(tmp_path, micro_batch_size):
    """Micro-batch 1: autograd hands cls_token and position_embeddings one gradient buffer."""
    data = image_dataset(8, seed=2)
    trainer, vmap_weights = _train(tmp_path, lambda: tiny_vit(seed=2), data, "vmap", sam_micro_batch_size=micro_batch_size)
    assert trainer._vmap_verified
    _, loop_weights = _train(tmp_path, lambda: tiny_vit(seed=2), data, "loop", sam_micro_batch_size=micro_batch_size)
    reference = _reference(lambda: tiny_vit(seed=2), data, micro_batch_size)
    assert max_abs_diff(vmap_weights, reference) < 1e-6
    assert max_abs_diff(loop_weights, reference) < 1e-6


DECODER_CLASSIFIER_CASES = {  # (head, attention, padding side)
    "llama_sequence_eager_right": ("llama_sequence", "eager", False),
    "llama_sequence_sdpa_right": ("llama_sequence", "sdpa", False),
    "llama_sequence_sdpa_left": ("llama_sequence", "sdpa", True),
    "qwen2_sequence_sdpa_right": ("qwen2_sequence", "sdpa", False),
    "llama_token_eager_right": ("llama_token", "eager", False),
    "llama_token_sdpa_left": ("llama_token", "sdpa", True),
}


@pytest.mark.parametrize("case", list(DECODER_CLASSIFIER_CASES))
def test_padded_decoder_classifiers_match_the_reference(tmp_path, auto_picks_vmap_on_cpu, case):
    """Causal attention with padding in classifiers that are neither ``is_decoder`` nor generative: with a
    bidirectional mask every token would also see the ones after it. vmap, "auto" (which picks vmap here) and the
    loop against the plain-loop reference, micro-batches of 4."""
    head, attention, left = DECODER_CLASSIFIER_CASES[case]
    data = token_labels_dataset(8, seed=21, left=left)
    if head.endswith("sequence"):
        data = data.map(lambda row: {"labels": row["labels"][0] % 3})
    assert 0 < sum(map(sum, data["attention_mask"])) < 64  # padded

    def make():
        return decoder_classifier(head, seed=21, attn_implementation=attention)

    reference = _reference(make, data, 4, token_level="tokens" if head.endswith("token") else None)
    assert max_abs_diff(reference, snapshot(make())) > 1e-3  # it did train
    for mode in ("vmap", "auto", "loop"):
        trainer, weights = _train(tmp_path, make, data, mode, sam_micro_batch_size=4)
        assert trainer._vmap_verified == (mode != "loop")
        assert max_abs_diff(weights, reference) < 1e-6, mode


def test_masks_the_path_cannot_hand_in_are_refused():
    """A Qwen2 whose second layer has a sliding window of 4: at length 4 both layers' masks are the full causal one
    and the step runs; at length 8 they differ and one 4D mask cannot serve both. A model without attention modules
    that uses the 2D mask itself gets it unchanged, and its step is the reference's."""
    model = decoder_classifier("qwen2_sequence", seed=22, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    sam = VectorizedMicroBatchSAM(model, rho=0.2)
    for length in (4, 8):
        batch = tensor_batch(token_labels_dataset(8, length=length, seed=22), 0, 8)
        batch["labels"] = batch["labels"][:, 0] % 3
        stacked = stack_micro_batches([{k: v[i : i + 4] for k, v in batch.items()} for i in (0, 4)])
        if length == 4:
            sam.step(stacked, torch.full((2,), 0.5))
            assert model.score.weight.grad is not None
        else:
            grad = model.score.weight.grad.clone()
            with pytest.raises(hf_msam_vectorized.AttentionMaskMismatch, match="receive different masks at sequence length 8"):
                sam.step(stacked, torch.full((2,), 0.5))
            assert torch.equal(model.score.weight.grad, grad)  # refused before any gradient
    batch = tensor_batch(padded_dataset(8, seed=22), 0, 8)
    model, reference = MaskedMeanClassifier(), MaskedMeanClassifier()
    VectorizedMicroBatchSAM(model, rho=0.2).step(stack_micro_batches([{k: v[i : i + 4] for k, v in batch.items()} for i in (0, 4)]),
                                                 torch.full((2,), 0.5))
    expected = reference_msam_gradient(reference, batch, 4, rho=0.2, loss_fn=lambda model, b: model(**b)["loss"])
    assert max((p.grad - e).abs().max().item() for p, e in zip(model.parameters(), expected)) < 1e-6


class _EmbeddingClassifier(torch.nn.Module):
    """An embedding and a linear head on a pooled embedding (``pool``), seeded."""

    seed = 0

    def __init__(self):
        super().__init__()
        torch.manual_seed(self.seed)
        self.embed = torch.nn.Embedding(64, 8)
        self.head = torch.nn.Linear(8, 2)

    def classify(self, hidden, labels):
        logits = self.head(hidden)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class MaskedMeanClassifier(_EmbeddingClassifier):
    """Averages its embeddings over the attended positions of a 2D ``attention_mask``: no attention module."""

    seed = 23

    def forward(self, input_ids, attention_mask, labels):
        weights = attention_mask.unsqueeze(-1).float()
        return self.classify((self.embed(input_ids) * weights).sum(1) / weights.sum(1), labels)


def test_causal_lm_with_label_holes_and_gradient_accumulation(tmp_path):
    """Token-level loss, micro-batches with unequal supervised-token counts, 2 accumulation chunks."""
    data = lm_dataset(32, seed=3)
    common = dict(sam_micro_batch_size=2, max_steps=2)
    trainer, with_ga = _train(tmp_path / "ga2", lambda: tiny_llama(seed=3), data, "vmap", per_device_train_batch_size=4,
                              gradient_accumulation_steps=2, **common)
    assert trainer._vmap_verified
    _, loop = _train(tmp_path / "loop", lambda: tiny_llama(seed=3), data, "loop", per_device_train_batch_size=8, **common)
    reference = _reference(lambda: tiny_llama(seed=3), data, 2, steps=2, token_level="shifted")
    assert max_abs_diff(with_ga, reference) < 1e-6
    assert max_abs_diff(loop, reference) < 1e-6


def test_causal_lm_with_tied_embeddings_matches_loop_and_reference(tmp_path):
    """The word embedding is the LM head's weight too: both uses must see the same ``w + e_k`` in the descent pass
    and both contribute to ``g_k``."""
    data = lm_dataset(16, seed=6)

    def make():
        return tiny_llama(seed=6, tie_word_embeddings=True)

    model = make()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trainer, vmap_weights = _train(tmp_path, make, data, "vmap", sam_micro_batch_size=2)
    assert trainer._vmap_verified
    _, loop_weights = _train(tmp_path, make, data, "loop", sam_micro_batch_size=2)
    reference = _reference(make, data, 2, token_level="shifted")
    assert max_abs_diff(vmap_weights, reference) < 1e-6
    assert max_abs_diff(loop_weights, reference) < 1e-6
    assert max_abs_diff(vmap_weights, snapshot(make())) > 1e-3  # it did train


def test_tied_embedding_with_a_padding_row_takes_the_loop(tmp_path, auto_picks_vmap_on_cpu):
    """A padding_idx on a table tied to the LM head: the head gives the padding row a gradient, which the vmap path
    (it zeroes that row, for the lookup's sake) would drop. "vmap" refuses with the reason, "auto" runs the loop."""
    data = lm_dataset(16, seed=26)

    def make():
        return tiny_llama(seed=26, tie_word_embeddings=True, pad_token_id=0)

    with pytest.raises(ValueError, match="padding_idx and its weight is tied"):
        _train(tmp_path, make, data, "vmap", sam_micro_batch_size=2)
    trainer, auto = _train(tmp_path, make, data, "auto", sam_micro_batch_size=2)
    assert not trainer._vmap_verified
    reference = _reference(make, data, 2, token_level="shifted")
    assert max_abs_diff(auto, reference) < 1e-6
    assert (auto["model.embed_tokens.weight"][0] - snapshot(make())["model.embed_tokens.weight"][0]).abs().max() > 1e-4


def test_asam_and_peft_lora_match_loop_and_reference(tmp_path):
    lora_model = partial(tiny_bert_lora, seed=4)
    data = padded_dataset(8, seed=4)
    asam = dict(sam_micro_batch_size=2, sam_adaptive=True, sam_adaptive_eta=0.05)
    trainer, vmap_weights = _train(tmp_path, lora_model, data, "vmap", **asam)
    assert trainer._vmap_verified
    _, loop_weights = _train(tmp_path, lora_model, data, "loop", **asam)
    reference = _reference(lora_model, data, 2, adaptive=True, eta=0.05)
    assert max_abs_diff(vmap_weights, reference) < 1e-6
    assert max_abs_diff(loop_weights, reference) < 1e-6
    frozen = {k: v for k, v in snapshot(lora_model()).items() if "lora_" not in k and "classifier" not in k}
    assert all(torch.equal(vmap_weights[k], v) for k, v in frozen.items())


def test_padding_row_of_the_embedding_gets_no_gradient(tmp_path):
    """With a batched embedding weight, every micro-batch but the first would give the padding row a gradient."""
    data = padded_dataset(8, seed=5)
    attended_zeros = (torch.tensor(data["input_ids"]) == 0) & (torch.tensor(data["attention_mask"]) == 1)
    assert attended_zeros.sum() > 4
    model_start = snapshot(tiny_bert(seed=5))
    _, weights = _train(tmp_path, lambda: tiny_bert(seed=5), data, "vmap", sam_micro_batch_size=2)
    name = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(weights[name][0], model_start[name][0])
    assert not torch.equal(weights[name][1:], model_start[name][1:])


def test_bf16_autocast_matches_loop(tmp_path):
    data = padded_dataset(8, seed=6)
    start = snapshot(tiny_bert(seed=6))
    _, vmap_weights = _train(tmp_path, lambda: tiny_bert(seed=6), data, "vmap", sam_micro_batch_size=2, bf16=True)
    _, loop_weights = _train(tmp_path, lambda: tiny_bert(seed=6), data, "loop", sam_micro_batch_size=2, bf16=True)
    update = torch.cat([(loop_weights[k] - start[k]).flatten() for k in start]).norm()
    difference = torch.cat([(loop_weights[k] - vmap_weights[k]).flatten() for k in start]).norm()
    assert update > 1e-2
    assert difference / update < 2e-2  # bf16 rounds to 8 bits of mantissa: a few 1e-3 relative per op


def test_dropout_masks_shared_between_the_passes(tmp_path):
    """rho = 1e-7 with dropout 0.3: the step equals the stock Trainer's only if both passes (and the stock
    forward) see the same dropout masks."""
    data = padded_dataset(8, seed=7)

    def make():
        return tiny_bert(seed=7, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)

    start = snapshot(make())
    _, vmap_weights = _train(tmp_path, make, data, "vmap", sam_micro_batch_size=2, sam_rho=1e-7)
    stock = make()
    stock_args = TrainingArguments(
        output_dir=str(tmp_path / "stock"), per_device_train_batch_size=8, max_steps=1, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to="none", save_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True,
    )
    SequentialTrainer(model=stock, args=stock_args, train_dataset=data).train()
    stock_weights = snapshot(stock)
    update = torch.cat([(stock_weights[k] - start[k]).flatten() for k in start]).norm()
    difference = torch.cat([(stock_weights[k] - vmap_weights[k]).flatten() for k in start]).norm()
    assert difference / update < 1e-5


# --- the input embedding table by rows (table_rows, sam_sparse_embeddings) -------------------------------------
TABLE_CASES = {  # a padded BERT (padding_idx 0 looked up inside the attended part) and an untied causal LM
    "bert": (lambda: tiny_bert(seed=16), lambda: tensor_batch(padded_dataset(8, seed=16), 0, 8)),
    "llama": (lambda: tiny_llama(seed=16), lambda: tensor_batch(lm_dataset(8, seed=16), 0, 8)),
}


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_table_by_rows_equals_the_batched_table(case, adaptive):
    """The same step with the word embedding treated by rows as with it batched like every other tensor: losses,
    ||g_k|| and .grad (the padding row's included) to 1e-6."""
    make_model, make_batch = TABLE_CASES[case]
    stacked = stack_micro_batches([{k: v[i : i + 2] for k, v in make_batch().items()} for i in range(0, 8, 2)])
    results = {}
    for rows in (True, False):
        model = make_model()
        sam = VectorizedMicroBatchSAM(model, rho=0.3, adaptive=adaptive, adaptive_eta=0.05, table_rows=rows)
        table = model.get_input_embeddings().weight
        assert (sam.table is not None) == rows and any(p is table for p in sam.batched_params) != rows
        results[rows] = (sam.step(stacked, torch.full((4,), 0.25)), [p.grad.clone() for p in model.parameters()])
    (by_rows, rows_grads), (batched, batched_grads) = results[True], results[False]
    for field in ("clean_losses", "perturbed_losses", "grad_norms"):
        torch.testing.assert_close(getattr(by_rows, field), getattr(batched, field), rtol=0, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(rows_grads, batched_grads)) < 1e-6
    assert (by_rows.perturbed_losses - by_rows.clean_losses).abs().max() > 1e-4  # the perturbation moved the losses


def test_coalesced_rows_are_each_micro_batchs_table_gradient():
    """Rows against a dense reference: the lookup gradient summed into a [m, V, d] table per micro-batch
    (``index_put`` with accumulation), the padding row left out; and each position reads its row back."""
    g = torch.Generator().manual_seed(17)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(12, 3, padding_idx=0)
    table = hf_msam_vectorized.InputTableRows(model, model.embed, "embed")
    ids = torch.randint(0, 6, (4, 2, 5), generator=g)  # few ids: many repeats within and across micro-batches
    lookup_grad = torch.randn(4, 2, 5, 3, generator=g, dtype=torch.float64)
    rows = table.coalesce(ids, lookup_grad)
    k = torch.arange(4).view(4, 1, 1).expand_as(ids)
    dense = torch.zeros(4, 12, 3, dtype=torch.float64).index_put_((k, ids), lookup_grad, accumulate=True)
    dense[:, 0] = 0  # padding_idx
    from_rows = torch.zeros_like(dense).index_put_((rows.micro_batches, rows.table_rows), rows.values, accumulate=True)
    torch.testing.assert_close(from_rows, dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(rows.norms(), dense.flatten(1).norm(dim=1).float())
    torch.testing.assert_close(rows.at_positions(), dense[k, ids], rtol=0, atol=1e-12)


def test_table_rows_enter_the_norm_and_are_skipped_with_their_micro_batch():
    """||g_k|| runs over the table's rows and the batched rows; a non-finite row of the table skips its micro-batch
    only, and every other micro-batch's rows become rho * g_k / ||g_k||."""
    model = tiny_bert(seed=18)
    sam = VectorizedMicroBatchSAM(model, rho=0.3)
    g = torch.Generator().manual_seed(18)
    ids = torch.randint(1, 64, (3, 2, 4), generator=g)
    rows = sam.table.coalesce(ids, torch.randn(3, 2, 4, 16, generator=g))
    rows.values[(rows.micro_batches == 1).nonzero()[0]] = float("inf")
    grads = sam.layout.rows([torch.randn(3, *p.shape, generator=g) for p in sam.batched_params])
    expected_rows, expected = rows.values.clone(), [r.clone() for r in grads]
    norms, finite = sam._perturbations(grads, 1.0, rows)
    assert finite.tolist() == [True, False, True]
    for k in (0, 2):
        mine = rows.micro_batches == k
        norm = torch.sqrt(sum((r[k].double() ** 2).sum() for r in expected) + (expected_rows[mine].double() ** 2).sum())
        torch.testing.assert_close(norms[k].double(), norm, rtol=1e-6, atol=0)
        torch.testing.assert_close(rows.values[mine].double(), 0.3 * expected_rows[mine].double() / norm, rtol=1e-5, atol=1e-9)
    assert torch.equal(rows.values[rows.micro_batches == 1], torch.zeros_like(rows.values[rows.micro_batches == 1]))
    assert all(torch.equal(r[1], torch.zeros_like(r[1])) for r in grads)


class LookupTwice(torch.nn.Module):
    """A model that looks its input table up with ids other than the batch's (shifted), or twice."""

    def __init__(self, twice: bool):
        super().__init__()
        torch.manual_seed(19)
        self.embed = torch.nn.Embedding(64, 8)
        self.head = torch.nn.Linear(8, 2)
        self.twice = twice

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, labels):
        hidden = self.embed(input_ids) + self.embed(input_ids) if self.twice else self.embed((input_ids + 1) % 64)
        logits = self.head(hidden.mean(1))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("twice", [True, False], ids=["twice", "other_ids"])
def test_a_table_not_looked_up_once_with_input_ids_is_refused(twice):
    """The lookup handed to the model stands for embed(input_ids) once; any other use of the table is an error that
    names the way out (sam_sparse_embeddings=False), which then runs."""
    g = torch.Generator().manual_seed(19)
    stacked = {"input_ids": torch.randint(0, 64, (2, 3, 5), generator=g), "labels": torch.randint(0, 2, (2, 3), generator=g)}
    with pytest.raises(ValueError, match="sam_sparse_embeddings=False"):
        VectorizedMicroBatchSAM(LookupTwice(twice), rho=0.3).step(stacked, torch.full((2,), 0.5))
    model = LookupTwice(twice)
    VectorizedMicroBatchSAM(model, rho=0.3, table_rows=False).step(stacked, torch.full((2,), 0.5))
    assert model.embed.weight.grad.abs().sum() > 0


def test_which_input_tables_are_treated_by_rows():
    """By rows: a trainable input table used by the lookup alone. Not: tied to the LM head, frozen, max_norm."""

    def table_of(model):
        return VectorizedMicroBatchSAM(model, rho=0.1).table

    bert = tiny_bert(seed=20)
    assert table_of(bert).weight is bert.get_input_embeddings().weight
    assert table_of(tiny_llama(seed=20)) is not None
    assert table_of(tiny_llama(seed=20, tie_word_embeddings=True)) is None
    frozen = tiny_bert(seed=20)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert table_of(frozen) is None
    renormed = tiny_bert(seed=20)
    renormed.get_input_embeddings().max_norm = 1.0
    assert table_of(renormed) is None
    assert table_of(tiny_bert_lora(seed=20)) is None  # LoRA freezes the base model's table


# --- skipped perturbations -------------------------------------------------------------------------------
def test_non_finite_ascent_gradient_skips_only_its_micro_batch():
    """A non-finite row of G gives e_k = 0 for that micro-batch only, and is reported as skipped."""
    model = tiny_bert(seed=8)
    sam = VectorizedMicroBatchSAM(model, rho=0.3)
    grads = sam.layout.rows([torch.randn(3, *p.shape) for p in sam.batched_params])
    grads[0][1, 0] = float("inf")
    expected = [g.clone() for g in grads]
    norms, finite = sam._perturbations(grads, grad_scale=1.0)
    assert finite.tolist() == [True, False, True]
    for k in (0, 2):
        norm = torch.sqrt(sum((g[k].double() ** 2).sum() for g in expected)).float()
        torch.testing.assert_close(norms[k], norm)
        for e, g in zip(grads, expected):
            torch.testing.assert_close(e[k], 0.3 * g[k] / (norm + 1e-12))
    assert all(torch.equal(e[1], torch.zeros_like(e[1])) for e in grads)


def test_perturbation_norm_runs_over_every_dtype_bucket():
    """Rows of two dtypes (a bf16 model with fp32 adapters): one ||g_k|| over both, and e_k in each row's dtype."""
    sam = VectorizedMicroBatchSAM(tiny_bert(seed=8), rho=0.5)
    grads = [torch.randn(2, 7), torch.randn(2, 5, dtype=torch.float64)]
    expected = [g.clone() for g in grads]
    norms, finite = sam._perturbations(grads, grad_scale=1.0)
    assert finite.all()
    for k in range(2):
        norm = torch.sqrt((expected[0][k].double() ** 2).sum() + (expected[1][k] ** 2).sum())
        torch.testing.assert_close(norms[k].double(), norm, rtol=1e-6, atol=0)
        for e, g in zip(grads, expected):
            torch.testing.assert_close(e[k], (0.5 * g[k].double() / norm).to(g.dtype), rtol=1e-6, atol=1e-9)


def test_ascent_points_are_broadcast_views_of_the_weights():
    """The ascent pass holds no copy of the weights: each point is w_i broadcast along m, a leaf of its own."""
    sam = VectorizedMicroBatchSAM(tiny_bert(seed=8), rho=0.5)
    points = sam._ascent_points(4)
    for point, weight in zip(points, sam.batched_params):
        assert point.shape == (4, *weight.shape) and point.stride(0) == 0 and point.is_leaf and point.requires_grad
        assert point.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()


def test_flat_layout_rows_and_views_round_trip():
    """rows() lays batched tensors end to end per dtype bucket; unflatten() gives every one back as a view."""
    batched = [torch.randn(2, 3, 4), torch.randn(2, 5, dtype=torch.float64), torch.randn(2), torch.randn(2, 2, 2, dtype=torch.float64)]
    layout = FlatLayout([t[0] for t in batched])
    rows = layout.rows(batched)
    assert [r.dtype for r in rows] == [torch.float32, torch.float64] and [tuple(r.shape) for r in rows] == [(2, 13), (2, 9)]
    assert torch.equal(rows[0][1], torch.cat([batched[0][1].flatten(), batched[2][1].reshape(1)]))
    views = layout.unflatten(rows)
    assert all(torch.equal(view, tensor) for view, tensor in zip(views, batched))
    assert all(view.untyped_storage().data_ptr() == rows[1].untyped_storage().data_ptr() for view in (views[1], views[3]))
    bucket, columns = layout.columns(3, 1)  # row 1 of the 2x2 float64 tensor: after the 5 numbers of tensor 1
    assert bucket == 1 and torch.equal(rows[1][:, columns], batched[3][:, 1])


def test_overflowing_ascent_is_skipped_and_the_step_is_the_plain_gradient():
    """An ascent loss scaled to overflow (what fp16 gives) skips every perturbation; the descent is at w."""
    data = padded_dataset(8, seed=9)
    model, reference = tiny_bert(seed=9), tiny_bert(seed=9)
    batch = tensor_batch(data, 0, 8)
    micro = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    result = VectorizedMicroBatchSAM(model, rho=0.3).step(stack_micro_batches(micro), torch.full((4,), 0.25), grad_scale=float("inf"))
    assert result.skipped.all()
    expected = reference_msam_gradient(reference, batch, 2, rho=0.0)
    got = [p.grad for p in model.parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) < 1e-6


# --- "auto" and "vmap": eligibility ----------------------------------------------------------------------
class BatchNormClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(10)
        self.embed = torch.nn.Embedding(64, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids, labels):
        logits = self.head(self.norm(self.embed(input_ids).mean(1)))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.fixture
def auto_picks_vmap_on_cpu(monkeypatch):
    monkeypatch.setattr(path_module, "AUTO_VMAP_DEVICE_TYPES", ("cpu",))


@pytest.mark.parametrize(
    "make_model, overrides, reason",
    [
        (BatchNormClassifier, dict(), "BatchNorm"),
        (lambda: tiny_bert(seed=11), dict(label_smoothing_factor=0.1), "label smoother"),
    ],
    ids=["batchnorm", "label-smoother"],
)
def test_auto_falls_back_with_its_reason(tmp_path, caplog, auto_picks_vmap_on_cpu, make_model, overrides, reason):
    data = padded_dataset(8, seed=11).remove_columns("attention_mask")
    with caplog.at_level(logging.WARNING, logger="hf_msam.training.trainer"):
        trainer, auto = _train(tmp_path, make_model, data, "auto", sam_micro_batch_size=2, max_steps=2, **overrides)
    assert not trainer._vmap_verified
    assert sum(reason in r.getMessage() for r in caplog.records) == 1  # once, not once per step
    _, loop = _train(tmp_path, make_model, data, "loop", sam_micro_batch_size=2, max_steps=2, **overrides)
    assert max_abs_diff(auto, loop) == 0
    with pytest.raises(ValueError, match=reason):
        _train(tmp_path, make_model, data, "vmap", sam_micro_batch_size=2, **overrides)


class DataDependentClassifier(_EmbeddingClassifier):
    """A forward with Python control flow on a tensor value, which vmap rejects."""

    seed = 19

    def forward(self, input_ids, labels):
        hidden = self.embed(input_ids).mean(1)
        if hidden.abs().max() > 100:  # data-dependent branch
            hidden = hidden / 100
        return self.classify(hidden, labels)


def test_auto_falls_back_when_vmap_rejects_the_forward(tmp_path, caplog, auto_picks_vmap_on_cpu):
    """Caught on the first try, logged once, the step (and every later one) runs with the loop, unchanged."""
    data = padded_dataset(8, seed=19).remove_columns("attention_mask")
    with caplog.at_level(logging.WARNING, logger="hf_msam.training.trainer"):
        trainer, auto = _train(tmp_path, DataDependentClassifier, data, "auto", sam_micro_batch_size=2, max_steps=2)
    assert not trainer._vmap_verified
    assert sum("failed under vmap" in r.getMessage() for r in caplog.records) == 1
    _, loop = _train(tmp_path, DataDependentClassifier, data, "loop", sam_micro_batch_size=2, max_steps=2)
    assert max_abs_diff(auto, loop) == 0
    with pytest.raises(RuntimeError, match="data-dependent control flow"):
        _train(tmp_path, DataDependentClassifier, data, "vmap", sam_micro_batch_size=2)


class FailsUnderVmapOnce(torch.nn.Module):
    """A classifier whose forward raises the ``fail_at``-th time it runs under vmap (what an operation vmap rejects
    on some batch gives), on the process of rank ``rank`` only if given."""

    def __init__(self, fail_at: int, rank: int | None = None):
        super().__init__()
        torch.manual_seed(24)
        self.embed = torch.nn.Embedding(64, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)
        self.fail_at, self.rank, self.vmapped_calls = fail_at, rank, 0

    def forward(self, input_ids, labels):
        if torch._C._functorch.is_batchedtensor(input_ids):
            self.vmapped_calls += 1
            if self.vmapped_calls == self.fail_at and (self.rank is None or self.rank == torch.distributed.get_rank()):
                raise RuntimeError("vmap: an operation without a batching rule")
        logits = self.head(torch.tanh(self.hidden(self.embed(input_ids).mean(1))))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("groups_per_chunk", [1, 2], ids=["second_step", "second_group_of_the_first_step"])
def test_auto_falls_back_when_vmap_fails_after_it_ran(tmp_path, caplog, auto_picks_vmap_on_cpu, groups_per_chunk):
    """The third vmapped forward fails: the ascent of the second step (one group per chunk), or of the second group
    of the first step, after the first group's descent wrote .grad. That group and the rest of the run take the loop,
    logged once, and the weights are the loop's: nothing was added to .grad twice or lost."""
    data = padded_dataset(16, seed=24).remove_columns("attention_mask")
    param_mb = sum(p.numel() * 4 for p in FailsUnderVmapOnce(3).parameters()) / 2**20  # no input table: all batched
    budget = dict(sam_vmap_memory_budget_mb=2.5 * path_module.VMAP_COPIES_PER_MICRO_BATCH * param_mb) if groups_per_chunk == 2 else {}
    common = dict(sam_micro_batch_size=2, max_steps=2, **budget)
    with caplog.at_level(logging.WARNING, logger="hf_msam.training.trainer"):
        trainer, auto = _train(tmp_path, lambda: FailsUnderVmapOnce(3), data, "auto", **common)
    assert trainer._vmap_verified and trainer._vmap_group_size == 4 // groups_per_chunk
    assert trainer.model.vmapped_calls == 3
    assert sum("an operation without a batching rule" in r.getMessage() for r in caplog.records) == 1
    _, loop = _train(tmp_path, lambda: FailsUnderVmapOnce(3), data, "loop", **common)
    assert max_abs_diff(auto, loop) < 1e-6
    assert max_abs_diff(auto, snapshot(FailsUnderVmapOnce(3))) > 1e-3  # it did train
    with pytest.raises(RuntimeError, match="an operation without a batching rule"):
        _train(tmp_path, lambda: FailsUnderVmapOnce(3), data, "vmap", **common)


def test_auto_runs_an_uneven_last_batch_with_the_loop(tmp_path, caplog, auto_picks_vmap_on_cpu):
    data = padded_dataset(14, seed=12)  # steps of 8 (4 + 4: vmap) and 6 (4 + 2: the loop)
    with caplog.at_level(logging.WARNING, logger="hf_msam.training.trainer"):
        trainer, auto = _train(tmp_path, lambda: tiny_bert(seed=12), data, "auto", sam_micro_batch_size=4, max_steps=2)
    assert trainer._vmap_verified
    assert sum("unequal sizes [2, 4]" in r.getMessage() for r in caplog.records) == 1
    reference = tiny_bert(seed=12)
    for start, stop in ((0, 8), (8, 14)):
        tensors = tensor_batch(data, start, stop)
        reference_sgd_step(reference, reference_msam_gradient(reference, tensors, 4, 0.2), lr=0.5)
    assert max_abs_diff(auto, snapshot(reference)) < 1e-6


def test_auto_keeps_the_loop_on_cpu(tmp_path, caplog):
    data = padded_dataset(8, seed=13)
    with caplog.at_level(logging.INFO, logger="hf_msam.training.trainer"):
        trainer, _ = _train(tmp_path, lambda: tiny_bert(seed=13), data, "auto", sam_micro_batch_size=2)
    assert trainer._vmap is None
    assert any("runs the loop on cpu" in r.getMessage() for r in caplog.records)


def test_auto_runs_sam_with_the_loop_where_vmap_is_picked(tmp_path, auto_picks_vmap_on_cpu):
    """m = 1 (SAM) keeps the loop under "auto" even where vmap is picked for m >= 2; "vmap" still vectorises it."""
    data = padded_dataset(8, seed=13)
    sam, _ = _train(tmp_path, lambda: tiny_bert(seed=13), data, "auto", max_steps=1)
    assert sam._vmap is None and not sam._vmap_verified
    msam, _ = _train(tmp_path, lambda: tiny_bert(seed=13), data, "auto", sam_micro_batch_size=4, max_steps=1)
    assert msam._vmap_verified
    forced, _ = _train(tmp_path, lambda: tiny_bert(seed=13), data, "vmap", max_steps=1)
    assert forced._vmap_verified


def test_memory_budget_sets_the_group_size(tmp_path):
    """A budget of 2.5 groups' worth of copies of the batched parameters (all but the word embedding, treated by
    rows) vectorises 2 micro-batches at a time; same step."""
    data = padded_dataset(8, seed=14)
    model = tiny_bert(seed=14)
    word_embedding = model.get_input_embeddings().weight
    param_mb = sum(p.numel() * 4 for p in model.parameters() if p is not word_embedding) / 2**20
    budget = 2.5 * path_module.VMAP_COPIES_PER_MICRO_BATCH * param_mb
    trainer, grouped = _train(tmp_path, lambda: tiny_bert(seed=14), data, "vmap", sam_micro_batch_size=1,
                              sam_vmap_memory_budget_mb=budget)
    assert trainer._vmap_group_size == 2
    assert max_abs_diff(grouped, _reference(lambda: tiny_bert(seed=14), data, 1)) < 1e-6


def test_vmap_mode_needs_equal_micro_batches(tmp_path):
    with pytest.raises(ValueError, match="sam_micro_batch_size=3 does not divide per_device_train_batch_size=8"):
        sam_args(tmp_path, sam_micro_batch_size=3, sam_micro_batch_mode="vmap")
    with pytest.raises(ValueError, match="sam_micro_batch_mode must be"):
        sam_args(tmp_path, sam_micro_batch_mode="fast")
    with pytest.raises(ValueError, match="sam_vmap_compile=True compiles the vmap path"):
        sam_args(tmp_path, sam_micro_batch_mode="loop", sam_vmap_compile=True)


# --- compiled passes (sam_vmap_compile) --------------------------------------------------------------------
def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


COMPILED_CASES = {  # a model with dropout on, and a batch of 8 examples
    "bert_sdpa": (lambda: tiny_bert(seed=15, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, attn_implementation="sdpa"),
                  lambda: tensor_batch(padded_dataset(8, seed=15), 0, 8)),
    "vit": (lambda: tiny_vit(seed=15, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2), lambda: tensor_batch(image_dataset(8, seed=15), 0, 8)),
    "llama": (lambda: tiny_llama(seed=15, attention_dropout=0.2), lambda: tensor_batch(lm_dataset(8, seed=15), 0, 8)),
}  # fmt: skip


def _assert_compiled_passes_equal_eager(case: str, device: str, atol: float) -> None:
    """Both vectorised passes of ``COMPILED_CASES[case]`` on ``device``, compiled and eager from the same seed: the
    same losses and ``.grad`` to ``atol``, the same generator state after them, and graphs were compiled."""
    make_model, make_batch = COMPILED_CASES[case]
    batch = {k: v.to(device) for k, v in make_batch().items()}
    stacked = stack_micro_batches([{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)])
    results = {}
    torch._dynamo.reset()
    graphs_before, breaks_before = _compiled_graphs(), _graph_breaks()
    for compiled in (False, True):
        model = make_model().to(device).train()
        torch.manual_seed(0)
        result = VectorizedMicroBatchSAM(model, rho=0.3, compile=compiled).step(stacked, torch.full((4,), 0.25, device=device))
        results[compiled] = (result, [p.grad for p in model.parameters()], torch.rand(1, device=device))
    assert _compiled_graphs() >= graphs_before + 2  # the ascent and the descent pass
    assert _graph_breaks() == breaks_before  # whole passes in the graphs (a break leaves the model's forward eager)
    (eager, eager_grads, eager_next), (compiled, compiled_grads, compiled_next) = results[False], results[True]
    torch.testing.assert_close(compiled.clean_losses, eager.clean_losses, rtol=0, atol=atol)
    torch.testing.assert_close(compiled.perturbed_losses, eager.perturbed_losses, rtol=0, atol=atol)
    assert max((a - b).abs().max().item() for a, b in zip(compiled_grads, eager_grads)) < atol
    assert torch.equal(compiled_next, eager_next)  # the generator ends where the eager passes leave it
    assert (compiled.perturbed_losses - compiled.clean_losses).abs().max() > 1e-4  # the perturbation moved the losses


@pytest.mark.parametrize("case", list(COMPILED_CASES))
def test_compiled_passes_equal_eager_passes_with_dropout(case):
    """torch.compile of both vectorised passes: the same losses and .grad as eager with dropout on (for BERT also in
    SDPA's attention, where fused inductor code gave NaN), so the masks are eager's; and graphs were compiled."""
    _assert_compiled_passes_equal_eager(case, "cpu", atol=1e-6)


def test_each_compiled_pass_keeps_its_own_graphs(caplog):
    """Two sequence lengths: each pass compiles per length (the ascent once more, after BERT's first forward sets
    config.problem_type); sharing one cache, the passes would exceed a recompile limit that each alone stays within."""
    model = tiny_bert(seed=17, attn_implementation="sdpa").train()
    sam = VectorizedMicroBatchSAM(model, rho=0.3, compile=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=3), caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for length in (8, 12):
            batch = tensor_batch(padded_dataset(8, length=length, seed=length), 0, 8)
            sam.step(stack_micro_batches([{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]), torch.full((4,), 0.25))
    assert _compiled_graphs() >= 4
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]


def test_compiled_vmap_training_matches_loop_and_reference(tmp_path):
    data = padded_dataset(16, seed=16)

    def make():
        return tiny_bert(seed=16, attn_implementation="sdpa")

    torch._dynamo.reset()
    trainer, compiled_weights = _train(tmp_path, make, data, "vmap", sam_micro_batch_size=2, sam_vmap_compile=True, max_steps=2)
    assert trainer._vmap_verified and _compiled_graphs() > 0
    _, loop_weights = _train(tmp_path, make, data, "loop", sam_micro_batch_size=2, max_steps=2)
    reference = _reference(make, data, 2, steps=2)
    assert max_abs_diff(compiled_weights, reference) < 1e-6
    assert max_abs_diff(loop_weights, reference) < 1e-6


# --- DDP ---------------------------------------------------------------------------------------------------
class LengthBranchClassifier(torch.nn.Module):
    """Uses ``extra`` only for sequences longer than 8 tokens: under 2 processes whose batches differ in length,
    one process has a gradient for ``extra`` and the other none. ``temperature`` is a buffer the logits are
    divided by (what DDP's broadcast_buffers keeps equal across processes)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(25)
        self.embed = torch.nn.Embedding(64, 8)
        self.extra = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, input_ids, labels):
        hidden = self.embed(input_ids).mean(1)
        if input_ids.shape[-1] > 8:
            hidden = torch.tanh(self.extra(hidden))
        logits = self.head(hidden) / self.temperature
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def two_length_dataset(n: int = 32, seed: int = 25):
    """Blocks of 8 examples, of 8 tokens and of 10 in turn: under 2 processes (8 examples each per step), process 0
    always has the short ones."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, 64, (8 if (i // 8) % 2 == 0 else 10,), generator=g).tolist() for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": torch.randint(0, 2, (n,), generator=g).tolist()})


def _two_process_reference(reference, data, steps: int = 2) -> None:
    """Two plain-loop processes of 8 examples each (micro-batches of 4, rho 0.2), their gradients averaged as DDP
    does, then an SGD step at 0.5: the update of the 2-process run, applied to ``reference`` in place."""
    for step in range(steps):
        chunks = [tensor_batch(data, 16 * step + 8 * rank, 16 * step + 8 * rank + 8) for rank in (0, 1)]
        gradients = [reference_msam_gradient(reference, chunk, 4, 0.2, loss_fn=lambda m, b: m(**b)["loss"])
                     for chunk in chunks]
        reference_sgd_step(reference, [(a + b) / 2 for a, b in zip(*gradients)], lr=0.5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one_process_with_doubled_batch(tmp_path):
    """2 gloo processes on the vmap path (per-device batch 8) equal one process with batch 16."""
    from processes import MSAM_DDP as SCRIPT, launch_two_processes
    from safetensors.torch import load_file

    launch_two_processes(SCRIPT, "vmap", str(tmp_path))
    bert_data = padded_dataset(32, seed=15)
    _, bert = _train(tmp_path / "bert", lambda: tiny_bert(seed=15), bert_data, "loop", per_device_train_batch_size=16,
                     sam_micro_batch_size=4, max_steps=2)
    lm_data = lm_dataset(32, seed=15)
    _, llama = _train(tmp_path / "llama", lambda: tiny_llama(seed=15), lm_data, "loop", per_device_train_batch_size=16,
                      sam_micro_batch_size=4, max_steps=2)
    for name, single in (("bert", bert), ("llama", llama)):
        two = load_file(os.path.join(tmp_path, f"{name}.safetensors"))
        assert max((two[k] - v).abs().max().item() for k, v in single.items()) < 1e-6, name
        assert (tmp_path / f"{name}.skipped").read_text() == "0", name

    # A parameter only process 1 uses: reduced with a zero gradient from process 0, as DDP's reducer would.
    data, reference = two_length_dataset(), LengthBranchClassifier()
    _two_process_reference(reference, data)
    unused = load_file(os.path.join(tmp_path, "unused.safetensors"))
    assert max((unused[k] - v).abs().max().item() for k, v in snapshot(reference).items()) < 1e-6
    assert (unused["extra.weight"] - snapshot(LengthBranchClassifier())["extra.weight"]).abs().max() > 1e-3
    # Process 1 sets its buffer to 3 before the second step: DDP broadcasts process 0's, as the wrapper's forward does.
    buffers = load_file(os.path.join(tmp_path, "buffer_changed.safetensors"))
    assert max((buffers[k] - v).abs().max().item() for k, v in unused.items()) < 1e-7
    # Step 1: process 1 has nothing supervised (the loop) while process 0 vmaps; both reduce by hand.
    _, empty = _train(tmp_path / "empty", lambda: tiny_llama(seed=19), lm_dataset_without_labels_in(8, 16),
                      "loop", per_device_train_batch_size=16, sam_micro_batch_size=4, max_steps=2)
    two = load_file(os.path.join(tmp_path, "empty.safetensors"))
    assert max((two[k] - v).abs().max().item() for k, v in empty.items()) < 1e-6
    # "auto": process 1's first vmap group fails; it runs the loop, and from step 2 both do (told by the all-reduce).
    data, reference = padded_dataset(32, seed=24).remove_columns("attention_mask"), FailsUnderVmapOnce(0)
    _two_process_reference(reference, data)
    fails = load_file(os.path.join(tmp_path, "fails_on_one.safetensors"))
    assert max((fails[k] - v).abs().max().item() for k, v in snapshot(reference).items()) < 1e-6
    assert (tmp_path / "fails_on_one.vmapped_calls").read_text() == "2"  # process 0: one step on vmap, then the loop


# --- fp16 overflow through the Trainer; the CUDA checks (SDPA batching rule, GradScaler, bf16) -------------
class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (what an fp16 overflow of the ascent pass gives). Works
    under vmap (``generate_vmap_rule``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _train_on(device, tmp_path, make_model, data, mode, **overrides):
    return _train(tmp_path / device, make_model, data, mode, use_cpu=device == "cpu", **overrides)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_non_finite_ascent_is_skipped_and_counted(tmp_path, device):
    """Every ascent overflows: each perturbation is skipped and counted, and the step is the plain gradient step
    (on CPU accelerate runs an fp16 request without autocast or GradScaler; on CUDA with both)."""
    data = padded_dataset(16, seed=16)

    def make():
        model = tiny_bert(seed=16)
        calls = {"n": 0}

        def overflow_on_ascent(module, inputs, output):  # forward passes alternate: ascent, descent
            calls["n"] += 1
            return _InfiniteGradient.apply(output) if calls["n"] % 2 == 1 else output

        model.classifier.register_forward_hook(overflow_on_ascent)
        return model

    results = {}
    for mode in ("vmap", "loop"):
        trainer, results[mode] = _train_on(device, tmp_path / mode, make, data, mode, sam_micro_batch_size=2, fp16=True)
        assert trainer.state.log_history[0]["sam_skipped"] == 4
        assert all(torch.isfinite(v).all() for v in results[mode].values())
    _, plain = _train_on(device, tmp_path / "rho0", lambda: tiny_bert(seed=16), data, "loop", sam_micro_batch_size=2,
                         fp16=True, sam_rho=1e-30)
    tolerance = 1e-6 if device == "cpu" else 2e-3  # fp16 autocast on CUDA
    assert max_abs_diff(results["vmap"], plain) < tolerance
    assert max_abs_diff(results["vmap"], results["loop"]) < tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_cuda_padded_bert_and_vit_match_loop(tmp_path, attention, monkeypatch):
    """On CUDA the SDPA batching rule (efficient attention with an attention bias) is exercised."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    data = padded_dataset(16, length=16, seed=17)
    make = lambda: tiny_bert(seed=17, attn_implementation=attention, max_position_embeddings=16)  # noqa: E731
    _, vmap_weights = _train_on("cuda", tmp_path / "bert", make, data, "vmap", sam_micro_batch_size=2, per_device_train_batch_size=16)
    _, loop_weights = _train_on("cuda", tmp_path / "bert", make, data, "loop", sam_micro_batch_size=2, per_device_train_batch_size=16)
    assert max_abs_diff(vmap_weights, loop_weights) < 1e-5
    images = image_dataset(8, seed=17)
    _, vmap_weights = _train_on("cuda", tmp_path / "vit", lambda: tiny_vit(seed=17), images, "vmap", sam_micro_batch_size=2)
    _, loop_weights = _train_on("cuda", tmp_path / "vit", lambda: tiny_vit(seed=17), images, "loop", sam_micro_batch_size=2)
    assert max_abs_diff(vmap_weights, loop_weights) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_picks_vmap_and_bf16_matches_loop(tmp_path):
    data = padded_dataset(8, seed=18)
    start = snapshot(tiny_bert(seed=18))
    trainer, auto = _train_on("cuda", tmp_path, lambda: tiny_bert(seed=18), data, "auto", sam_micro_batch_size=2, bf16=True)
    assert trainer._vmap_verified
    _, loop = _train_on("cuda", tmp_path, lambda: tiny_bert(seed=18), data, "loop", sam_micro_batch_size=2, bf16=True)
    update = torch.cat([(loop[k].cpu() - start[k]).flatten() for k in start]).norm()
    difference = torch.cat([(loop[k] - auto[k]).flatten() for k in start]).norm()
    assert difference / update < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_passes_equal_eager_passes_with_dropout(monkeypatch):
    """sam_vmap_compile on CUDA (Triton code, COMPILE_OPTIONS as on the CPU) with dropout in BERT's SDPA attention,
    the case whose fused CPU code gave NaN. Last in the file: its compilation is the slowest CUDA test here."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _assert_compiled_passes_equal_eager("bert_sdpa", "cuda", atol=1e-5)
