"""Property-based tests (hypothesis): algebraic identities and numerical stability of layers and losses."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rechub_lightning import SequenceFeature
from rechub_lightning.layers.embedding import EmbeddingLayer, masked_pool
from rechub_lightning.layers.interaction import FM
from rechub_lightning.losses import bpr_loss

_SETTINGS = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------- FM
@_SETTINGS
@given(
    batch=st.integers(1, 4),
    fields=st.integers(1, 9),
    dim=st.integers(1, 8),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fm_identity_equals_sum_over_pairs(batch: int, fields: int, dim: int, scale: float, seed: int) -> None:
    """0.5 * ((sum_i v_i)^2 - sum_i v_i^2) == sum_{i<j} <v_i, v_j> (float64)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(batch, fields, dim)) * scale
    pairs_vec = np.zeros((batch, dim))
    for i in range(fields):
        for j in range(i + 1, fields):
            pairs_vec += v[:, i] * v[:, j]
    x = torch.from_numpy(v)  # float64
    kept = FM(reduce_sum=False)(x)
    summed = FM(reduce_sum=True)(x)
    assert kept.dtype == torch.float64 and kept.shape == (batch, dim)
    assert summed.shape == (batch, 1)
    tol = 1e-9 * max(1.0, scale * scale * fields * fields)
    np.testing.assert_allclose(kept.numpy(), pairs_vec, rtol=1e-9, atol=tol)
    np.testing.assert_allclose(summed.numpy()[:, 0], pairs_vec.sum(axis=1), rtol=1e-9, atol=tol * dim)


@_SETTINGS
@given(fields=st.integers(1, 6), dim=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_fm_single_field_or_orthogonal_fields_give_zero(fields: int, dim: int, seed: int) -> None:
    """No pair, no interaction: a lone field (or fields on disjoint axes) contributes exactly 0."""
    rng = np.random.default_rng(seed)
    v = np.zeros((1, fields, max(dim, fields)))
    for i in range(fields):  # field i lives on axis i only: all pairwise dot products are 0
        v[0, i, i] = rng.normal()
    out = FM()(torch.from_numpy(v))
    assert out.item() == 0.0


# --------------------------------------------------------------------------- masked pooling
_PAD = 0


@st.composite
def _padded_sequences(draw):
    batch = draw(st.integers(1, 5))
    length = draw(st.integers(1, 7))
    vocab = draw(st.integers(2, 12))
    lengths = draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    ids = np.zeros((batch, length), dtype=np.int64)
    for r, n in enumerate(lengths):
        # valid ids in [1, vocab), then padding; padding may also sit at the front (left-padded rows)
        valid = draw(st.lists(st.integers(1, vocab - 1), min_size=n, max_size=n))
        left = draw(st.booleans())
        row = [_PAD] * (length - n) + valid if left else valid + [_PAD] * (length - n)
        ids[r] = row
    if draw(st.booleans()):
        ids[0] = _PAD  # always exercise an all-padding row in some examples
    return ids, vocab


def _numpy_pool(table: np.ndarray, ids: np.ndarray, pooling: str) -> np.ndarray:
    out = np.zeros((ids.shape[0], table.shape[1]))
    for r, row in enumerate(ids):
        valid = [i for i in row if i != _PAD]
        if valid:
            vecs = table[valid]
            out[r] = vecs.mean(axis=0) if pooling == "mean" else vecs.sum(axis=0)
    return out


@_SETTINGS
@given(data=_padded_sequences(), pooling=st.sampled_from(["mean", "sum"]), dim=st.integers(1, 6))
def test_sequence_pooling_matches_numpy_over_non_padded_positions(data, pooling: str, dim: int) -> None:
    ids, vocab = data
    feature = SequenceFeature("hist", vocab_size=vocab, embed_dim=dim, pooling=pooling, padding_idx=_PAD)
    layer = EmbeddingLayer([feature]).double()
    with torch.no_grad():
        table = layer.table_for(feature).weight
        table.normal_()  # the padding row too: pooling must ignore it, not rely on it being zero
    pooled = layer({"hist": torch.from_numpy(ids)}, [feature], squeeze_dim=True)
    assert pooled.shape == (ids.shape[0], dim)
    assert torch.isfinite(pooled).all()
    expected = _numpy_pool(layer.rows(feature).detach().numpy(), ids, pooling)
    np.testing.assert_allclose(pooled.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    all_pad = (ids == _PAD).all(axis=1)
    assert (pooled.detach().numpy()[all_pad] == 0.0).all()


@_SETTINGS
@given(data=_padded_sequences(), pooling=st.sampled_from(["mean", "sum"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_masked_pool_all_padding_rows_are_zero_with_finite_gradients(data, pooling: str, dtype: torch.dtype) -> None:
    ids, _ = data
    mask = torch.from_numpy(ids != _PAD)
    emb = torch.randn(*ids.shape, 3, dtype=dtype, requires_grad=True)
    out = masked_pool(emb, mask, pooling)
    assert not torch.isnan(out).any()
    empty = ~mask.any(dim=1)
    assert (out[empty] == 0).all()
    out.float().sum().backward()
    assert torch.isfinite(emb.grad).all()
    assert (emb.grad[~mask] == 0).all()  # padding positions get no gradient


# --------------------------------------------------------------------------- BPR at large margins
_huge = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(_huge, _huge), min_size=1, max_size=8),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_bpr_never_inf_or_nan_at_large_margins(pairs: list[tuple[float, float]], dtype: torch.dtype) -> None:
    pos = torch.tensor([p for p, _ in pairs], dtype=dtype, requires_grad=True)
    neg = torch.tensor([n for _, n in pairs], dtype=dtype, requires_grad=True)
    per_pair = bpr_loss(pos, neg, reduction="none")
    assert torch.isfinite(per_pair).all()
    assert (per_pair >= 0).all()
    loss = bpr_loss(pos, neg)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(pos.grad).all() and torch.isfinite(neg.grad).all()
    # d loss / d pos = -sigmoid(neg - pos) / B in [-1/B, 0]
    assert (pos.grad <= 0).all() and (pos.grad >= -1.0 / len(pairs) - 1e-6).all()
    # agrees with the float64 softplus formula where that is representable in the loss dtype
    d = pos.detach().double() - neg.detach().double()
    expected = torch.nn.functional.softplus(-d)
    if dtype == torch.float64:
        assert torch.allclose(per_pair.detach().double(), expected, rtol=1e-12, atol=0)
