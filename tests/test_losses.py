"""Losses: BPR/hinge/list-wise, in-batch sampling and softmax, regularization."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rechub_lightning.losses import (
    BPRLoss,
    HingeLoss,
    RegularizationLoss,
    bpr_loss,
    hinge_loss,
    in_batch_negative_scores,
    list_wise_loss,
    masked_fill_value,
    sampled_softmax_loss,
)


# --------------------------------------------------------------------------- BPR
def test_bpr_is_finite_and_exact_at_huge_margins() -> None:
    pos = torch.tensor([1e4, -1e4, 0.0, 3.0], requires_grad=True)
    neg = torch.tensor([0.0, 0.0, 0.0, -2.0])
    loss = bpr_loss(pos, neg, reduction="none")
    assert torch.isfinite(loss).all()
    # -log(sigmoid(d)) = softplus(-d): 0 for d = 1e4, 1e4 for d = -1e4 (exact in float32).
    assert loss[0].item() == 0.0
    assert loss[1].item() == 1e4
    assert loss[2].item() == pytest.approx(math.log(2.0), rel=1e-7)
    assert loss[3].item() == pytest.approx(-math.log(1 / (1 + math.exp(-5.0))), rel=1e-6)
    bpr_loss(pos, neg).backward()
    assert torch.isfinite(pos.grad).all()
    assert pos.grad[1].item() == pytest.approx(-1 / 4)  # d loss / d pos = -sigmoid(-d) / B


_finite = st.floats(min_value=-60.0, max_value=60.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_finite, _finite), min_size=1, max_size=8))
def test_bpr_matches_float64_formula(pairs: list[tuple[float, float]]) -> None:
    pos = torch.tensor([p for p, _ in pairs], dtype=torch.float32)
    neg = torch.tensor([n for _, n in pairs], dtype=torch.float32)
    d64 = pos.double() - neg.double()
    expected = (-torch.log(torch.sigmoid(d64))).mean()
    assert torch.isclose(bpr_loss(pos, neg).double(), expected, rtol=1e-5, atol=1e-4)


def test_bpr_broadcasts_positive_over_negatives() -> None:
    pos, neg = torch.randn(5), torch.randn(5, 3)
    expected = -F.logsigmoid(pos[:, None] - neg).mean()
    torch.testing.assert_close(bpr_loss(pos, neg), expected)
    torch.testing.assert_close(bpr_loss(pos[:, None], neg), expected)
    torch.testing.assert_close(BPRLoss()(pos, neg), expected)


def test_bpr_matches_reference() -> None:
    ref = pytest.importorskip("torch_rechub.basic.loss_func")
    pos, neg = torch.randn(6), torch.randn(6, 4)
    torch.testing.assert_close(bpr_loss(pos, neg), ref.BPRLoss()(pos, neg))
    torch.testing.assert_close(bpr_loss(pos, neg[:, 0]), ref.BPRLoss()(pos, neg[:, 0]))


# --------------------------------------------------------------------------- hinge
def test_hinge_matches_formula() -> None:
    pos, neg = torch.randn(7), torch.randn(7, 3)
    expected = torch.clamp(2.0 - pos[:, None] + neg, min=0).mean()
    torch.testing.assert_close(hinge_loss(pos, neg), expected)
    torch.testing.assert_close(HingeLoss()(pos, neg), expected)
    one = torch.clamp(0.5 - pos + neg[:, 0], min=0).mean()
    torch.testing.assert_close(hinge_loss(pos, neg[:, 0], margin=0.5), one)
    hardest = torch.clamp(2.0 - pos + neg.max(dim=1).values, min=0).mean()
    torch.testing.assert_close(hinge_loss(pos, neg, hardest_negative=True), hardest)


def test_hinge_hardest_matches_reference() -> None:
    ref = pytest.importorskip("torch_rechub.basic.loss_func")
    pos, neg = torch.randn(6) * 3, torch.randn(6, 4) * 3
    torch.testing.assert_close(HingeLoss(hardest_negative=True)(pos, neg), ref.HingeLoss()(pos, neg))


def test_list_wise_loss_is_cross_entropy_at_zero() -> None:
    scores = torch.randn(5, 4)
    expected = -torch.log_softmax(scores, dim=1)[:, 0].mean()
    torch.testing.assert_close(list_wise_loss(scores), expected)
    with pytest.raises(ValueError):
        list_wise_loss(torch.randn(5))


# --------------------------------------------------------------------------- in-batch sampling
def _column_id_embeddings(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores[i, j] == j, so a negative score *is* the sampled column."""
    return torch.ones(batch, 1), torch.arange(batch, dtype=torch.float32)[:, None]


def test_uniform_in_batch_negatives_never_sample_self_and_are_uniform() -> None:
    batch, ratio = 8, 3
    user, item = _column_id_embeddings(batch)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(batch, batch)
    for _ in range(400):
        pos, neg = in_batch_negative_scores(user, item, ratio, generator=gen)
        cols = neg.long()
        assert neg.shape == (batch, ratio)
        torch.testing.assert_close(pos, torch.arange(batch, dtype=torch.float32))
        assert not (cols == torch.arange(batch)[:, None]).any()
        assert all(len(set(row.tolist())) == ratio for row in cols)  # without replacement
        counts.scatter_add_(1, cols, torch.ones_like(neg))
    off_diag = counts[~torch.eye(batch, dtype=torch.bool)]
    expected = 400 * ratio / (batch - 1)
    assert (counts.diagonal() == 0).all()
    assert ((off_diag - expected).abs() < 0.35 * expected).all()


def test_in_batch_negatives_are_reproducible_with_generator() -> None:
    user, item = torch.randn(10, 4), torch.randn(10, 4)
    a = in_batch_negative_scores(user, item, 4, generator=torch.Generator().manual_seed(3))[1]
    b = in_batch_negative_scores(user, item, 4, generator=torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, b)


def test_in_batch_negatives_respect_accidental_hits() -> None:
    batch = 8
    user, item = _column_id_embeddings(batch)
    item_ids = torch.tensor([5, 5, 7, 9, 5, 1, 2, 3])
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        _, neg = in_batch_negative_scores(user, item, 4, generator=gen, item_ids=item_ids)
        cols = neg.long()
        assert not (item_ids[cols] == item_ids[:, None]).any()
        assert not (cols == torch.arange(batch)[:, None]).any()


def test_in_batch_negatives_fill_rows_short_of_candidates() -> None:
    user, item = _column_id_embeddings(5)
    item_ids = torch.tensor([1, 1, 1, 1, 2])  # rows 0-3 have a single valid negative (column 4)
    for hard in (False, True):
        _, neg = in_batch_negative_scores(user, item, 2, hard_negative=hard, item_ids=item_ids)
        fill = masked_fill_value(torch.float32)
        for row in range(4):
            assert sorted(neg[row].tolist()) == [fill, 4.0]
        loss = bpr_loss(torch.full((5,), 0.0), neg, reduction="none")
        assert torch.isfinite(loss).all()


def test_hard_negatives_are_top_scoring_off_diagonal() -> None:
    user, item = torch.randn(9, 5), torch.randn(9, 5)
    item_ids = torch.tensor([0, 1, 2, 3, 0, 5, 6, 7, 8])
    scores = user @ item.T
    _, neg = in_batch_negative_scores(user, item, 3, hard_negative=True)
    masked = scores.masked_fill(torch.eye(9, dtype=torch.bool), -math.inf)
    torch.testing.assert_close(neg, masked.topk(3, dim=1).values)
    _, neg = in_batch_negative_scores(user, item, 3, hard_negative=True, item_ids=item_ids)
    masked[0, 4] = masked[4, 0] = -math.inf
    torch.testing.assert_close(neg, masked.topk(3, dim=1).values)


def test_hard_negatives_match_reference_sampler() -> None:
    ref = pytest.importorskip("torch_rechub.utils.match")
    user, item = torch.randn(7, 4), torch.randn(7, 4)
    scores = user @ item.T
    logits = ref.gather_inbatch_logits(scores, ref.inbatch_negative_sampling(scores, 3, hard_negative=True))
    pos, neg = in_batch_negative_scores(user, item, 3, hard_negative=True)
    torch.testing.assert_close(pos, logits[:, 0])
    torch.testing.assert_close(neg, logits[:, 1:])


def test_in_batch_negatives_carry_gradients() -> None:
    user, item = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    pos, neg = in_batch_negative_scores(user, item, 2, generator=torch.Generator().manual_seed(0))
    bpr_loss(pos, neg).backward()
    assert user.grad.abs().sum() > 0 and item.grad.abs().sum() > 0


@pytest.mark.parametrize("ratio", [0, 6, 7])
def test_in_batch_ratio_out_of_range_names_the_argument(ratio: int) -> None:
    with pytest.raises(ValueError, match="in_batch_neg_ratio"):
        in_batch_negative_scores(torch.randn(6, 2), torch.randn(6, 2), ratio)


# --------------------------------------------------------------------------- sampled softmax
def _manual_softmax_loss(scores: torch.Tensor, temperature: float, log_q: torch.Tensor | None, ids: torch.Tensor | None) -> torch.Tensor:
    s = scores.double()
    batch = s.shape[0]
    total = 0.0
    for i in range(batch):
        logits = []
        for j in range(batch):
            if ids is not None and j != i and ids[j] == ids[i]:
                continue
            logit = s[i, j] / temperature - (log_q[j].double() if log_q is not None else 0.0)
            logits.append(logit)
            if j == i:
                pos = logit
        total += -(pos - torch.logsumexp(torch.stack(logits), dim=0))
    return total / batch


def test_sampled_softmax_plain_equals_cross_entropy_on_diagonal() -> None:
    user, item = torch.randn(6, 4), torch.randn(6, 4)
    expected = F.cross_entropy(user @ item.T, torch.arange(6))
    torch.testing.assert_close(sampled_softmax_loss(user, item), expected)
    torch.testing.assert_close(sampled_softmax_loss(scores=user @ item.T), expected)


def test_sampled_softmax_logq_temperature_and_hits_match_manual_formula() -> None:
    user, item = torch.randn(8, 4), torch.randn(8, 4)
    log_q = torch.log(torch.rand(8) * 0.1 + 1e-3)
    ids = torch.tensor([3, 1, 3, 4, 5, 1, 6, 7])
    for kwargs in (
        dict(item_log_q=log_q),
        dict(temperature=0.2, item_log_q=log_q),
        dict(temperature=0.5, item_ids=ids),
        dict(temperature=0.1, item_log_q=log_q, item_ids=ids),
    ):
        got = sampled_softmax_loss(user, item, **kwargs)
        expected = _manual_softmax_loss(
            user @ item.T, kwargs.get("temperature", 1.0), kwargs.get("item_log_q"), kwargs.get("item_ids")
        )
        assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5), kwargs


def test_sampled_softmax_logq_is_subtracted_from_logits() -> None:
    user, item = torch.randn(5, 3), torch.randn(5, 3)
    log_q = torch.randn(5)
    expected = F.cross_entropy(user @ item.T / 0.3 - log_q[None, :], torch.arange(5), reduction="none")
    torch.testing.assert_close(sampled_softmax_loss(user, item, temperature=0.3, item_log_q=log_q, reduction="none"), expected)


def test_sampled_softmax_masking_stays_finite_in_bfloat16() -> None:
    user = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    item = torch.randn(4, 8, dtype=torch.bfloat16)
    ids = torch.zeros(4, dtype=torch.long)  # every other column is an accidental hit
    loss = sampled_softmax_loss(user, item, temperature=0.05, item_ids=ids)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(user.grad.float()).all()


def test_sampled_softmax_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        sampled_softmax_loss(torch.randn(3, 2))
    with pytest.raises(ValueError):
        sampled_softmax_loss(torch.randn(3, 2), torch.randn(3, 2), temperature=0.0)
    with pytest.raises(ValueError):
        sampled_softmax_loss(scores=torch.randn(3, 4))


# --------------------------------------------------------------------------- regularization
class _RegModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.bag = nn.EmbeddingBag(6, 4)
        self.fc = nn.Linear(8, 5)
        self.bn = nn.BatchNorm1d(5)
        self.ln = nn.LayerNorm(5)
        self.out = nn.Linear(5, 1, bias=False)


@pytest.mark.parametrize(
    "coef",
    [
        dict(embedding_l1=1e-2),
        dict(embedding_l2=3e-2),
        dict(dense_l1=2e-3),
        dict(dense_l2=5e-2),
        dict(embedding_l1=1e-3, embedding_l2=2e-3, dense_l1=3e-3, dense_l2=4e-3),
    ],
)
def test_regularization_matches_reference(coef: dict[str, float]) -> None:
    ref = pytest.importorskip("torch_rechub.basic.loss_func")
    model = _RegModel()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    ours = RegularizationLoss(**coef)(model)
    theirs = ref.RegularizationLoss(**coef)(model)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    assert model.bn.weight.grad is None and model.ln.weight.grad is None


def test_regularization_formula_and_cache() -> None:
    model = _RegModel()
    reg = RegularizationLoss(embedding_l2=0.5, dense_l1=0.25)
    emb = model.emb.weight.square().sum() + model.bag.weight.square().sum()
    dense = sum(p.abs().sum() for p in (model.fc.weight, model.fc.bias, model.out.weight))
    torch.testing.assert_close(reg(model), 0.5 * emb + 0.25 * dense)
    with torch.no_grad():
        model.fc.weight.add_(1.0)  # cached partition, fresh values
    dense = sum(p.abs().sum() for p in (model.fc.weight, model.fc.bias, model.out.weight))
    torch.testing.assert_close(reg(model), 0.5 * emb + 0.25 * dense)
    model.fc.weight.requires_grad_(False)  # frozen parameters are skipped
    dense = sum(p.abs().sum() for p in (model.fc.bias, model.out.weight))
    torch.testing.assert_close(reg(model), 0.5 * emb + 0.25 * dense)


def test_regularization_zero_is_cheap_zero_tensor() -> None:
    reg = RegularizationLoss()
    out = reg(_RegModel())
    assert isinstance(out, torch.Tensor) and out.item() == 0.0 and not out.requires_grad
    with pytest.raises(ValueError):
        RegularizationLoss(dense_l2=-1.0)


def test_nce_loss_matches_the_formula_and_the_reference() -> None:
    from rechub_lightning.losses import InBatchNCELoss, NCELoss, in_batch_nce_loss, nce_loss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64)
    targets = torch.tensor([3, 0, 8, 0, 1, 5])  # id 0 is padding
    logp = torch.log_softmax(logits / 0.5, dim=-1)
    per = -logp[torch.arange(6), targets]
    keep = targets != 0
    assert torch.allclose(nce_loss(logits, targets, 0.5), per[keep].mean())
    assert torch.allclose(nce_loss(logits, targets, 0.5, reduction="sum"), per[keep].sum())
    assert torch.allclose(nce_loss(logits, targets, 0.5, reduction="none"), per * keep)
    assert torch.allclose(nce_loss(logits, targets, 0.5, ignore_index=None), per.mean())
    # (B, L, V) sequences: the same as flattening the positions
    seq = logits.reshape(2, 3, 9)
    assert torch.allclose(nce_loss(seq, targets.reshape(2, 3), 0.5), per[keep].mean())
    emb, items = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    assert torch.allclose(in_batch_nce_loss(emb, items, targets), nce_loss(emb @ items.T, targets, 0.1))

    ref = pytest.importorskip("torch_rechub.basic.loss_func")
    assert torch.allclose(NCELoss(temperature=0.5)(logits, targets), ref.NCELoss(temperature=0.5)(logits, targets))
    assert torch.allclose(
        InBatchNCELoss(temperature=0.2)(emb, items, targets), ref.InBatchNCELoss(temperature=0.2)(emb, items, targets)
    )


def test_nce_loss_of_an_all_padding_batch_is_zero_without_gradient() -> None:
    from rechub_lightning.losses import nce_loss

    logits = torch.randn(4, 5, requires_grad=True)
    loss = nce_loss(logits, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"targets": torch.zeros(3, dtype=torch.long)}, "targets"),
        ({"targets": torch.zeros(4)}, "integer"),
        ({"reduction": "avg"}, "reduction"),
    ],
)
def test_nce_loss_rejects_bad_inputs(kwargs, match) -> None:
    from rechub_lightning.losses import nce_loss

    args = {"logits": torch.randn(4, 5), "targets": torch.ones(4, dtype=torch.long)} | kwargs
    with pytest.raises(ValueError, match=match):
        nce_loss(**args)
