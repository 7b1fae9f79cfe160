import math

import pytest
import torch

from rechub_lightning.features import DenseFeature, FeatureSchema, SequenceFeature, SparseFeature
from rechub_lightning.features import RandomUniform, resolve_features
from rechub_lightning.layers import EmbeddingLayer, masked_pool


@pytest.mark.parametrize("vocab", [1, 2, 10, 81, 1000, 123457])
def test_auto_embed_dim_matches_formula(vocab):
    assert SparseFeature("f", vocab).embed_dim == int(math.floor(6 * vocab**0.25))
    assert SequenceFeature("s", vocab).embed_dim == int(math.floor(6 * vocab**0.25))


def test_auto_embed_dim_matches_reference():
    trh = pytest.importorskip("torch_rechub.basic.features")
    for vocab in (3, 50, 9999):
        assert SparseFeature("f", vocab).embed_dim == trh.SparseFeature("f", vocab).embed_dim


def test_bad_arguments_name_the_feature():
    with pytest.raises(ValueError, match="city"):
        SparseFeature("city", 0)
    with pytest.raises(ValueError, match="hist.*pooling"):
        SequenceFeature("hist", 10, pooling="max")
    with pytest.raises(ValueError, match="padding_idx"):
        SparseFeature("c", 5, padding_idx=5)


def test_shared_table_is_one_set_of_rows():
    item = SparseFeature("item", 50, 8)
    hist = SequenceFeature("hist", 50, 8, pooling="sum", shared_with="item", padding_idx=0)
    layer = EmbeddingLayer([item, hist])
    assert sum(p.numel() for p in layer.parameters()) == 50 * 8
    x = {"item": torch.tensor([3, 7]), "hist": torch.tensor([[3, 0, 0], [7, 7, 0]])}
    out = layer(x, [item, hist])
    assert torch.allclose(out[0, 1], out[0, 0])  # hist of row 0 = item 3 once
    assert torch.allclose(out[1, 1], 2 * out[1, 0])  # hist of row 1 = item 7 twice (sum)


def test_shared_with_unknown_owner_is_rejected():
    with pytest.raises(ValueError, match="shared_with='nope'"):
        EmbeddingLayer([SequenceFeature("h", 5, 4, shared_with="nope")])


def test_padding_masks_mean_pooling_and_gradient():
    seq = SequenceFeature("h", 10, 4, pooling="mean", padding_idx=0, initializer=RandomUniform(0.5, 1.0))
    layer = EmbeddingLayer([seq])
    ids = torch.tensor([[1, 2, 0, 0], [0, 0, 0, 0], [3, 3, 3, 0]])
    out = layer({"h": ids}, [seq], squeeze_dim=True)
    rows = layer.rows(seq)
    assert torch.allclose(out[0], (rows[1] + rows[2]) / 2)
    assert torch.allclose(out[1], torch.zeros(4))  # all padding pools to zero, not NaN
    assert torch.allclose(out[2], rows[3])
    assert torch.all(rows[0] == 0)
    out.sum().backward()
    grad = layer.table_for(seq).weight.grad
    assert torch.all(grad[0] == 0)  # the padding row receives no gradient
    assert torch.all(grad[1] != 0)


def test_masked_pool_against_loop():
    emb = torch.randn(5, 7, 3)
    mask = torch.rand(5, 7) > 0.4
    mean = masked_pool(emb, mask, "mean")
    for b in range(5):
        sel = emb[b][mask[b]]
        expect = sel.mean(0) if len(sel) else torch.zeros(3)
        assert torch.allclose(mean[b], expect, atol=1e-6)
    assert torch.allclose(masked_pool(emb, mask, "sum"), (emb * mask.unsqueeze(-1)).sum(1))


def test_sparse_padding_idx_zero_vector():
    f = SparseFeature("c", 6, 3, padding_idx=0, initializer=RandomUniform(1, 2))
    layer = EmbeddingLayer([f])
    out = layer({"c": torch.tensor([0, 4])}, [f])
    assert torch.all(out[0, 0] == 0) and torch.all(out[1, 0] >= 1)


def test_squeeze_dim_semantics_match_reference_layout():
    a, b = SparseFeature("a", 10, 4), SparseFeature("b", 10, 6)
    d = DenseFeature("d")
    layer = EmbeddingLayer([a, b, d])
    x = {"a": torch.tensor([1, 2]), "b": torch.tensor([3, 4]), "d": torch.tensor([0.5, -1.0])}
    flat = layer(x, [a, b, d], squeeze_dim=True)
    assert flat.shape == (2, 4 + 6 + 1)
    assert torch.allclose(flat[:, :4], layer.rows(a)[x["a"]])
    assert torch.allclose(flat[:, 4:10], layer.rows(b)[x["b"]])
    assert torch.allclose(flat[:, -1], x["d"])
    with pytest.raises(ValueError, match="squeeze_dim=True"):
        layer(x, [a, b])  # widths differ
    with pytest.raises(ValueError, match="dense"):
        layer(x, [a, d])


def test_fused_equals_per_feature_lookup():
    feats = [SparseFeature(f"c{i}", 5 + i, 8) for i in range(4)]
    layer = EmbeddingLayer(feats)
    assert len(layer.tables) == 1
    x = {f.name: torch.randint(0, f.vocab_size, (9,)) for f in feats}
    out = layer(x, feats)
    for j, f in enumerate(feats):
        assert torch.equal(out[:, j], layer.rows(f)[x[f.name]])


def test_schema_selectors_and_roundtrip():
    feats = [DenseFeature("d"), SparseFeature("s", 7, 4), SequenceFeature("q", 7, 4, shared_with="s")]
    schema = FeatureSchema(feats, ["label"], groups={"user": ["d", "s"]})
    assert [f.name for f in schema.select("dense+sparse")] == ["d", "s"]
    assert [f.name for f in schema.select("user")] == ["d", "s"]
    assert [f.name for f in schema.select(["q", "d"])] == ["q", "d"]
    assert FeatureSchema.from_dict(schema.to_dict()) == schema
    assert resolve_features(None, schema, "sequence", "x") == [feats[2]]
    with pytest.raises(ValueError, match="deep_features"):
        resolve_features("dense", None, "all", "deep_features")
    with pytest.raises(KeyError, match="nope"):
        schema.select("nope")
