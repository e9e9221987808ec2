"""The Gram builder of the coherence (``hf_msam.curvature.gram``) against a dense reference: per-example
A_i^{1/2} J_i from ``torch.func.jacrev`` of the logits and ``torch.func.hessian`` of the loss in the logits,
on tiny BERT (every parameter trainable, so the embedding tables are restricted to their used rows), ViT and
Llama models built from configs, a model whose embedding table is also used outside the lookup (it must keep
every column), and buffers so small that every example is recomputed (many passes).

K is compared through the quantities coherence takes from it, which the per-example change of basis of
``gram`` leaves unchanged: the Frobenius norm of each block, the eigenvalues of each diagonal block and the
eigenvalues of K."""

from __future__ import annotations

import pytest
import torch
from builders import image_examples, tiny_bert, tiny_llama_config, tiny_vit
from ntk_helpers import dense_jacobian_and_loss_hessian, ntk_gram
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_msam.curvature.gram import GramPlan, WeightedNTK, plan_gram
from hf_msam.curvature.heads import per_example_loss

SMALL_VIT = dict(hidden_size=8, intermediate_size=16, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
"""The ViT of these tests: hidden 8, with dropout (the dense reference runs in eval mode, where it does nothing)."""


def _dense_factors(model, examples, problem_type) -> list[torch.Tensor]:
    """A_i^{1/2} J_i (C x d, float64) with J_i over every trainable parameter."""
    out = []
    for ex in examples:
        j, a = dense_jacobian_and_loss_hessian(
            model, ex, lambda z, y: per_example_loss(z[None], y.reshape(1, -1), problem_type)[0])
        values, vectors = torch.linalg.eigh(a)
        out.append((vectors * values.clamp_min(0).sqrt()) @ vectors.T @ j)
    return out


def _invariants(k: torch.Tensor, n: int, count: int):
    """Block Frobenius norms, top eigenvalue of each diagonal block, top ``count`` eigenvalues of K."""
    c = k.shape[0] // n
    blocks = k.reshape(n, c, n, c).permute(0, 2, 1, 3)
    norms = blocks.pow(2).sum(dim=(2, 3)).sqrt()
    diag_top = torch.linalg.eigvalsh(blocks[torch.arange(n), torch.arange(n)])[:, -1]
    spectrum = torch.linalg.eigvalsh((k + k.T) / 2).flip(0)[:count]
    return norms, diag_top, spectrum


def _assert_matches_dense(model, examples, problem_type, **kwargs):
    dense = torch.cat(_dense_factors(model, examples, problem_type))
    k = ntk_gram(model, examples, problem_type, **kwargs)
    expected = _invariants(dense @ dense.T, len(examples), k.shape[0])
    got = _invariants(k, len(examples), k.shape[0])
    scale = float(expected[2][0])
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * scale)


def _bert_examples(n: int, num_labels: int, length: int = 6):
    g = torch.Generator().manual_seed(7)
    examples = []
    for i in range(n):
        used = 2 + i % (length - 1)
        ids = torch.zeros(1, length, dtype=torch.long)
        ids[0, :used] = torch.randint(1, 20, (used,), generator=g)  # few of the 64 rows of the table
        mask = (ids != 0).long()
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([i % num_labels])})
    return examples


@pytest.mark.parametrize("resident", [None, 2])
def test_bert_all_parameters_padded_examples(resident):
    model = tiny_bert(3, seed=11, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)  # eval mode: no effect
    _assert_matches_dense(model, _bert_examples(5, 3), "single_label_classification", resident_examples=resident,
                          stream_examples=1)


def test_bert_embedding_table_keeps_only_used_rows():
    model = tiny_bert(2, seed=12)
    examples = _bert_examples(4, 2)
    ntk = WeightedNTK(model, examples, "single_label_classification")
    ids = torch.cat([e["input_ids"].reshape(-1) for e in examples])
    used = ids[ids != 0].unique().numel()  # padding is trimmed away: id 0 is never looked up
    length = max(int(e["attention_mask"].sum()) for e in examples)
    table = model.bert.embeddings.word_embeddings.weight
    positions = model.bert.embeddings.position_embeddings.weight
    full = sum(p.numel() for p in model.parameters())
    assert ntk.rows_per_example == 1  # binary cross-entropy: one non-null row of A_i
    assert ntk.dim == full - (table.shape[0] - used) * table.shape[1] - (positions.shape[0] - length) * positions.shape[1] \
        - 1 * model.bert.embeddings.token_type_embeddings.weight.shape[1]


def test_vit():
    _assert_matches_dense(tiny_vit(3, seed=13, **SMALL_VIT), image_examples(4, 3, seed=0), "single_label_classification", resident_examples=3, stream_examples=2)


def test_llama_sequence_classification():
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(14)
    config = tiny_llama_config(vocab_size=32, hidden_size=8, intermediate_size=16, num_key_value_heads=1,
                               max_position_embeddings=16, num_labels=2, pad_token_id=0, attention_dropout=0.1)
    model = LlamaForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(1, 32, (1, 3 + i), generator=g), "labels": torch.tensor([i % 2])}
                for i in range(4)]
    _assert_matches_dense(model, examples, "single_label_classification", resident_examples=1, stream_examples=1)


class TiedTable(torch.nn.Module):
    """Bag of embeddings whose table is also the output layer's weight (rows 0..C-1): its gradient has
    rows outside the looked-up ones, which must be kept."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(15)
        self.table = torch.nn.Embedding(10, 4)

    def forward(self, input_ids, labels=None):
        h = torch.tanh(self.table(input_ids).mean(dim=1))
        logits = h @ self.table.weight[:3].T
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels.reshape(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def test_table_used_outside_the_lookup_keeps_every_column():
    model = TiedTable()
    examples = [{"input_ids": torch.tensor([[5 + i % 3, 6 + i % 4]]), "labels": torch.tensor([i % 3])} for i in range(4)]
    ntk = WeightedNTK(model, examples, "single_label_classification")
    assert ntk.dim == 40
    _assert_matches_dense(model, examples, "single_label_classification", resident_examples=2, stream_examples=1)


def test_regression_head_keeps_every_row():
    model = tiny_bert(1, seed=16)
    examples = [{**e, "labels": torch.tensor([0.3 * i])} for i, e in enumerate(_bert_examples(4, 1))]
    assert WeightedNTK(model, examples, "regression").rows_per_example == 1
    _assert_matches_dense(model, examples, "regression", resident_examples=2, stream_examples=2)


def test_plan_counts_row_evaluations_and_fits_memory():
    """``GramPlan.row_evaluations`` is what ``compute`` does; the buffers fit the budget."""
    model = tiny_bert(2, seed=17)
    examples = _bert_examples(7, 2)
    ntk = WeightedNTK(model, examples, "single_label_classification")
    for resident, stream in ((1, 1), (2, 3), (3, 2), (7, 8)):
        plan = GramPlan(7, ntk.rows_per_example, ntk.dim, resident, min(stream, 7))
        calls = []
        ntk.compute(plan, on_progress=lambda done, total: calls.append((done, total)))
        brute = 7 + sum(7 - min(7, end) for end in range(resident, 7 + resident, resident))
        assert calls[-1] == (plan.row_evaluations, plan.row_evaluations) == (brute, brute)
    per_example = 1 * 22_700_000 * 4
    plan = plan_gram(256, 1, 22_700_000, 2.0)
    assert plan.buffer_bytes <= 2.0 * 2**30 < plan.buffer_bytes + per_example
    assert plan.resident_examples + plan.stream_examples == int(2.0 * 2**30 // per_example)


# --- the CountSketch mode ---------------------------------------------------------------------------------------

from hf_msam.curvature.gram import DEFAULT_SKETCH_DIM, CountSketch, parse_sketch  # noqa: E402


def test_count_sketch_is_the_sparse_matrix_of_its_hash_and_unbiased():
    """S u equals the explicit k x d matrix S_{h(l), l} = s(l) times u; over independent seeds <Su, Sv> averages to
    <u, v> with the variance of the module docstring."""
    g = torch.Generator().manual_seed(0)
    d, k = 300, 16
    u, v = torch.randn(d, generator=g), torch.randn(d, generator=g)
    v = v + 0.7 * u  # correlated: <u, v> far from 0
    sketch = CountSketch(d, k, seed=3)
    dense = torch.zeros(k, d)
    dense[sketch.buckets.long(), torch.arange(d)] = sketch.signs.float()
    out = torch.zeros(k)
    sketch.apply(u, out)
    torch.testing.assert_close(out, dense @ u)
    products = []
    for seed in range(2000):
        s = CountSketch(d, k, seed)
        su, sv = torch.zeros(k), torch.zeros(k)
        s.apply(u, su)
        s.apply(v, sv)
        products.append(float(su @ sv))
    products = torch.tensor(products, dtype=torch.float64)
    u64, v64 = u.double(), v.double()
    exact = float(u64 @ v64)
    variance = float((u64 @ u64) * (v64 @ v64) + exact**2 - 2 * (u64**2 * v64**2).sum()) / k
    assert abs(float(products.mean()) - exact) < 4 * (variance / len(products)) ** 0.5
    assert float(products.var()) == pytest.approx(variance, rel=0.15)


def test_parse_sketch():
    assert parse_sketch("auto") == "auto" and parse_sketch("exact") == "exact"
    assert parse_sketch("4096") == 4096 and parse_sketch(64) == 64
    for bad in ("fast", 0, -5, True, "1e5"):
        with pytest.raises(ValueError, match="coherence_sketch"):
            parse_sketch(bad)


def test_auto_plan_is_exact_when_every_example_stays_resident_else_a_sketch_that_fits():
    exact = plan_gram(64, 1, 11_000_000, 4.0, sketch="auto")  # 97 examples fit
    assert exact.sketch_dim == 0 and exact.resident_examples == 64 and exact.row_evaluations == 64
    # the default text run: 5 classes (4 rows), ~13M columns, 2 GB: 8 resident examples
    brief = plan_gram(151, 4, 13_000_000, 2.0)
    assert (brief.resident_examples, brief.stream_examples, brief.row_evaluations) == (8, 2, 1501)
    sketched = plan_gram(256, 4, 13_000_000, 2.0, sketch="auto")
    assert sketched.sketch_dim == DEFAULT_SKETCH_DIM and sketched.row_evaluations == 256
    assert sketched.buffer_bytes == (256 * DEFAULT_SKETCH_DIM + 13_000_000) * 4 * 4 <= 2.0 * 2**30
    small = plan_gram(256, 4, 13_000_000, 0.5, sketch="auto")  # halved until the sketches fit
    assert small.buffer_bytes <= 0.5 * 2**30 < plan_gram(256, 4, 13_000_000, 0.5, sketch=2 * small.sketch_dim).buffer_bytes
    assert plan_gram(256, 4, 13_000_000, 0.5, sketch=1000).sketch_dim == 1000


def _sketch_matches_exact(model, examples, sketch_dim, seeds=range(6)):
    """The sketched K against the exact one: diagonal blocks equal, the other entries within the variance bound
    (mean squared standardised error about 1, at most 1.6), and sigma within the report's rms error bound."""
    from hf_msam.curvature.coherence import coherence_from_blocks
    from hf_msam.curvature.measures import sketch_sigma_error

    n = len(examples)
    exact = ntk_gram(model, examples, "single_label_classification", sketch="exact")
    rows = exact.shape[0] // n
    same = torch.arange(n * rows)[:, None] // rows == torch.arange(n * rows)[None, :] // rows
    bound = (exact.diagonal()[:, None] * exact.diagonal()[None, :] + exact**2) / sketch_dim
    sigma = coherence_from_blocks(exact, n).sigma
    standardised, covered = [], 0
    errors = []
    for seed in seeds:
        k = ntk_gram(model, examples, "single_label_classification", sketch=sketch_dim, seed=seed)
        torch.testing.assert_close(k[same], exact[same], rtol=1e-5, atol=1e-6 * float(exact.diagonal().max()))
        standardised.append(((k - exact)[~same] ** 2 / bound[~same]))
        error = sketch_sigma_error(k, n, sketch_dim)
        errors.append(error)
        covered += abs(coherence_from_blocks(k, n).sigma - sigma) / sigma <= error
    mean_square = float(torch.cat(standardised).mean())
    assert 0.2 < mean_square < 1.6  # > 0.2: the sketch is not secretly exact (the test can fail both ways)
    assert covered == len(seeds)  # an rms bound: Chebyshev allows a miss now and then, these seeds have none
    assert max(errors) < 0.5  # and it is not vacuous here


def test_sketch_against_exact_gram_on_bert():
    model = tiny_bert(3, seed=21)  # 2 rows per example
    _sketch_matches_exact(model, _bert_examples(8, 3), sketch_dim=512)


def test_sketch_against_exact_gram_on_vit():
    _sketch_matches_exact(tiny_vit(4, seed=22, **SMALL_VIT), image_examples(8, 4, seed=2), sketch_dim=256)


def test_sketched_compute_evaluates_each_example_once():
    model = tiny_bert(5, seed=23)
    examples = _bert_examples(9, 5)
    ntk = WeightedNTK(model, examples, "single_label_classification")
    plan = ntk.plan(9, 1e-6, sketch="auto")  # nothing stays resident: auto sketches
    assert plan.sketch_dim and plan.row_evaluations == 9
    calls = []
    ntk.compute(plan, on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 9) for i in range(1, 10)]
