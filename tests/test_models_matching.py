"""Two-tower and sequential retrieval models (DSSM, FaceBookDSSM, YoutubeDNN, YoutubeSBC,
GRU4Rec, NARM, STAMP, SASRec): shapes in every mode, gradients to every parameter, spec
round trips, and equality with Torch-RecHub 0.9.0 given identical weights where the
reference is correct (and where it is not, that the defect is gone)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rechub_lightning.features import DenseFeature, FeatureSchema, SequenceFeature, SparseFeature
from rechub_lightning.models.base import build_model, model_spec, returns_logits
from rechub_lightning.models.matching import (
    DSSM,
    DSSMSENet,
    GRU4Rec,
    NARM,
    SASRec,
    STAMP,
    FaceBookDSSM,
    YoutubeDNN,
    YoutubeSBC,
)

B, L, N, V, D = 6, 7, 3, 30, 8


def _schema(with_negatives: bool = True) -> FeatureSchema:
    feats = [
        SparseFeature("user_id", 20, D, padding_idx=0),
        SparseFeature("gender", 3, D, padding_idx=0),
        SequenceFeature("hist_movie_id", V, D, pooling="mean", shared_with="movie_id", padding_idx=0),
        SparseFeature("movie_id", V, D, padding_idx=0),
        SparseFeature("cate_id", 5, D, padding_idx=0),
        DenseFeature("sample_weight"),
    ]
    groups = {
        "user": ["user_id", "gender", "hist_movie_id"],
        "item": ["movie_id", "cate_id"],
        "sample_weight": ["sample_weight"],
    }
    if with_negatives:
        feats += [
            SequenceFeature("neg_items", V, D, pooling="concat", shared_with="movie_id", padding_idx=0),
            SequenceFeature("neg_cate_id", 5, D, pooling="concat", shared_with="cate_id", padding_idx=0),
        ]
        groups["neg_items"] = ["neg_items", "neg_cate_id"]
    return FeatureSchema(feats, [], groups)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {
        "user_id": torch.randint(1, 20, (B,), generator=g),
        "gender": torch.randint(1, 3, (B,), generator=g),
        "hist_movie_id": torch.randint(1, V, (B, L), generator=g),
        "movie_id": torch.randint(1, V, (B,), generator=g),
        "cate_id": torch.randint(1, 5, (B,), generator=g),
        "neg_items": torch.randint(1, V, (B, N), generator=g),
        "neg_cate_id": torch.randint(1, 5, (B, N), generator=g),
        "sample_weight": torch.rand(B, generator=g) + 0.01,
    }
    x["hist_movie_id"][0] = 0  # empty history
    x["hist_movie_id"][1, :3] = 0  # pre-padded
    x["hist_movie_id"][2, -2:] = 0  # post-padded
    return x


P = {"dims": [16, D]}


BUILDERS = {
    "DSSM": lambda s: DSSM(user_params=P, item_params=P, temperature=0.1, schema=s),
    "DSSMSENet": lambda s: DSSMSENet(user_params=P, item_params=P, temperature=0.1, reduction_ratio=1, schema=s),
    "FaceBookDSSM": lambda s: FaceBookDSSM(user_params=P, item_params=P, schema=s),
    "YoutubeDNN": lambda s: YoutubeDNN(user_params=P, schema=s),
    "YoutubeSBC": lambda s: YoutubeSBC(user_params=P, item_params=P, n_neg=3, schema=s),
    "GRU4Rec": lambda s: GRU4Rec(user_params={**P, "num_layers": 1}, schema=s),
    "NARM": lambda s: NARM(hidden_dim=12, schema=s),
    "STAMP": lambda s: STAMP(schema=s),
    "SASRec": lambda s: SASRec(max_len=10, num_heads=2, schema=s),
}
NAMES = list(BUILDERS)


def _model(name: str, schema: FeatureSchema | None = None) -> nn.Module:
    return BUILDERS[name](schema if schema is not None else _schema())


def _out_tensors(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("name", NAMES)
def test_towers_and_logit_shapes(name):
    model = _model(name)
    x = _batch()
    assert returns_logits(model)
    out = model(x)
    if name == "FaceBookDSSM":
        assert out[0].shape == (B,) and out[1].shape == (B, N)
    else:
        assert out.shape == (B, 1 + N)  # list-wise: positive first (YoutubeSBC: 1 + n_neg in-batch)
    for mode in ("user", "item"):
        model.mode = mode
        assert model(x).shape == (B, D)
    model.mode = None
    model.eval()
    assert torch.equal(model.user_tower(x), model.user_tower(x))
    with pytest.raises(ValueError, match="mode"):
        model.mode = "items"


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("FaceBookDSSM", "YoutubeSBC")])
def test_point_wise_logits_without_negatives(name):
    model = _model(name, _schema(with_negatives=False))
    x = {k: v for k, v in _batch().items() if not k.startswith("neg_")}
    assert model(x).shape == (B,)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)  # the same weights whatever ran before
    model = _model(name)
    x = _batch()
    loss = sum(o.float().pow(2).sum() for o in _out_tensors(model(x)))
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"{name}: parameters without gradient: {dead}"


@pytest.mark.parametrize("name", NAMES)
def test_spec_roundtrip_rebuilds_same_function(name):
    model = _model(name)
    x = _batch()
    clone = build_model(model_spec(model))
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    for a, b in zip(_out_tensors(model(x)), _out_tensors(clone(x))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["DSSM", "DSSMSENet", "YoutubeDNN", "GRU4Rec", "NARM", "STAMP", "SASRec"])
def test_negatives_go_through_the_item_tower(name):
    """Column j of the list-wise logits equals the positive logit of a batch whose target is negative j."""
    model = _model(name).eval()
    x = _batch()
    logits = model(x)
    for j in range(N):
        swapped = {**x, "movie_id": x["neg_items"][:, j], "cate_id": x["neg_cate_id"][:, j]}
        torch.testing.assert_close(logits[:, 1 + j], model(swapped)[:, 0])


def test_temperature_divides_dssm_logits():
    schema = _schema(with_negatives=False)
    torch.manual_seed(0)
    a = DSSM(user_params=P, item_params=P, temperature=1.0, schema=schema).eval()
    b = DSSM(user_params=P, item_params=P, temperature=0.05, schema=schema).eval()
    b.load_state_dict(a.state_dict())
    x = _batch()
    torch.testing.assert_close(b(x), a(x) / 0.05)
    with pytest.raises(ValueError, match="temperature"):
        DSSM(user_params=P, item_params=P, temperature=0.0, schema=schema)


def test_youtube_sbc_logq_and_accidental_hits():
    model = YoutubeSBC(user_params=P, item_params=P, n_neg=2, temperature=0.5, schema=_schema()).eval()
    x = _batch()
    x["movie_id"][1] = x["movie_id"][0]  # row 0's next row holds the same item: an accidental hit
    logits = model(x)
    u, v = model.user_tower(x), model.item_tower(x)
    s = u @ v.T / 0.5 - torch.log(x["sample_weight"]).unsqueeze(0)
    torch.testing.assert_close(logits[:, 0], torch.diagonal(s))
    torch.testing.assert_close(logits[2, 1:], s[2, [3, 4]])
    assert logits[0, 1] < -1e30  # masked
    small = {k: v[:2] for k, v in x.items()}
    assert model(small).shape == (2, 2)  # fewer rows than n_neg + 1


def test_schema_defaults_and_errors():
    schema = _schema()
    m = YoutubeDNN(user_params=P, schema=schema)
    assert [f.name for f in m.item_features] == ["movie_id"]
    assert [(a.name, b.name) for a, b in m.neg_pairs] == [("movie_id", "neg_items")]
    d = DSSM(user_params=P, item_params=P, schema=schema)
    assert [(a.name, b.name) for a, b in d.neg_pairs] == [("movie_id", "neg_items"), ("cate_id", "neg_cate_id")]
    g = GRU4Rec(user_params=P, schema=schema)
    assert [f.name for f in g.user_features] == ["user_id", "gender"]
    assert [f.name for f in g.history_features] == ["hist_movie_id"]
    with pytest.raises(ValueError, match="item embedding width 8"):
        YoutubeDNN(user_params={"dims": [16, 4]}, schema=schema)
    with pytest.raises(ValueError, match="same width"):
        DSSM(user_params={"dims": [4]}, item_params={"dims": [8]}, schema=schema)
    with pytest.raises(ValueError, match="user_params.*dimz"):
        DSSM(user_params={"dimz": [4]}, schema=schema)
    with pytest.raises(ValueError, match="neg_cate_id|cate_id"):
        DSSM(user_params=P, item_params=P, neg_item_features=["neg_items"], schema=schema)
    with pytest.raises(ValueError, match="neg_item_features"):
        FaceBookDSSM(user_params=P, item_params=P, schema=_schema(with_negatives=False))
    with pytest.raises(ValueError, match="max_len"):
        SASRec(max_len=4, schema=schema)(_batch())


def test_history_padding_side_does_not_matter():
    """GRU4Rec, NARM, STAMP and SASRec read the same user from a pre- or post-padded history."""
    schema = _schema(with_negatives=False)
    x = _batch()
    hist = torch.tensor([[3, 5, 7, 0, 0, 0, 0]] * B)
    pre = {**x, "hist_movie_id": hist.roll(4, dims=1)}
    post = {**x, "hist_movie_id": hist}
    for name in ("GRU4Rec", "NARM", "STAMP"):
        model = _model(name, schema).eval()
        torch.testing.assert_close(model.user_tower(pre), model.user_tower(post), msg=name)
    sas = _model("SASRec", schema).eval()
    sas.position_emb.weight.data.zero_()  # positions differ between the two paddings by design
    torch.testing.assert_close(sas.user_tower(pre), sas.user_tower(post))


def test_sasrec_sequence_to_sequence_mode():
    seq = SequenceFeature("seq", V, D, pooling="concat", padding_idx=0)
    pos = SequenceFeature("pos", V, D, pooling="concat", shared_with="seq", padding_idx=0)
    neg = SequenceFeature("neg", V, D, pooling="concat", shared_with="seq", padding_idx=0)
    model = SASRec([seq, pos, neg], max_len=L, dropout_rate=0.0)
    s = torch.randint(1, V, (B, L))
    p = torch.cat([s[:, 1:], torch.zeros(B, 1, dtype=torch.long)], dim=1)  # last position has no target
    out = model({"seq": s, "pos": p, "neg": torch.randint(1, V, (B, L))})
    assert out[0].shape == out[1].shape == (B * (L - 1),)


# --------------------------------------------------------------------------- reference equality
try:
    from torch_rechub.basic import features as rf
    from torch_rechub.models import matching as rm
except ImportError:  # the reference is a dev/bench extra
    rf = rm = None
needs_reference = pytest.mark.skipif(rm is None, reason="torch-rechub 0.9.0 is not installed")


def _ref_features():
    user = [rf.SparseFeature("user_id", 20, D), rf.SparseFeature("gender", 3, D)]
    hist = rf.SequenceFeature("hist_movie_id", V, D, pooling="mean", shared_with="movie_id")
    item = [rf.SparseFeature("movie_id", V, D), rf.SparseFeature("cate_id", 5, D)]
    return user, hist, item


def _ours_features():
    user = [SparseFeature("user_id", 20, D), SparseFeature("gender", 3, D)]
    hist = SequenceFeature("hist_movie_id", V, D, pooling="mean", shared_with="movie_id", padding_idx=0)
    item = [SparseFeature("movie_id", V, D), SparseFeature("cate_id", 5, D)]
    return user, hist, item


def _copy_tables(ours, ref_embedding, names):
    with torch.no_grad():
        for name in names:
            ours.embedding.rows(name).copy_(ref_embedding.embed_dict[name].weight)


def _copy_in_order(ours: nn.Module, ref: nn.Module):
    """Copy parameters and buffers pairwise in registration order (same layer structure)."""
    with torch.no_grad():
        a, b = list(ours.state_dict().values()), list(ref.state_dict().values())
        assert len(a) == len(b)
        for t, s in zip(a, b):
            t.copy_(s.reshape(t.shape))


def _full_batch(seed=0):
    x = _batch(seed)
    x["hist_movie_id"] = torch.randint(1, V, (B, L), generator=torch.Generator().manual_seed(seed + 1))
    return x


@needs_reference
def test_dssm_equals_reference_with_its_temperature_fixed():
    ru, rh, ri = _ref_features()
    ou, oh, oi = _ours_features()
    params = {"dims": [16, D], "activation": "prelu"}
    for temperature in (1.0, 0.2):
        ref = rm.DSSM(ru + [rh], ri, params, params, temperature=temperature).eval()
        ours = DSSM(ou + [oh], oi, params, params, temperature=temperature).eval()
        _copy_tables(ours, ref.embedding, ["user_id", "gender", "movie_id", "cate_id"])
        _copy_in_order(ours.user_mlp, ref.user_mlp)
        _copy_in_order(ours.item_mlp, ref.item_mlp)
        x = _full_batch()
        # the reference ignores its temperature: sigmoid(cosine); ours are logits cosine / T
        torch.testing.assert_close(torch.sigmoid(ours(x) * temperature), ref(x))
        for mode in ("user", "item"):
            ref.mode, ours.mode = mode, mode
            torch.testing.assert_close(ours(x), ref(x))
        ref.mode = ours.mode = None


@needs_reference
def test_youtube_dnn_equals_reference():
    ru, rh, ri = _ref_features()
    ou, oh, oi = _ours_features()
    rneg = [rf.SequenceFeature("neg_items", V, D, pooling="concat", shared_with="movie_id")]
    oneg = [SequenceFeature("neg_items", V, D, pooling="concat", shared_with="movie_id", padding_idx=0)]
    ref = rm.YoutubeDNN(ru + [rh], ri[:1], rneg, {"dims": [16, D]}, temperature=0.1).eval()
    ours = YoutubeDNN(ou + [oh], oi[:1], oneg, {"dims": [16, D]}, temperature=0.1).eval()
    _copy_tables(ours, ref.embedding, ["user_id", "gender", "movie_id"])
    _copy_in_order(ours.user_mlp, ref.user_mlp)
    x = _full_batch()
    torch.testing.assert_close(ours(x), ref(x))
    for mode in ("user", "item"):
        ref.mode, ours.mode = mode, mode
        torch.testing.assert_close(ours(x), ref(x))


@needs_reference
def test_gru4rec_fixes_the_reference_output_shape():
    ru, _, ri = _ref_features()
    ou, _, oi = _ours_features()
    rh = [rf.SequenceFeature("hist_movie_id", V, D, pooling="concat", shared_with="movie_id")]
    oh = [SequenceFeature("hist_movie_id", V, D, pooling="concat", shared_with="movie_id", padding_idx=0)]
    rneg = [rf.SequenceFeature("neg_items", V, D, pooling="concat", shared_with="movie_id")]
    oneg = [SequenceFeature("neg_items", V, D, pooling="concat", shared_with="movie_id", padding_idx=0)]
    ref = rm.GRU4Rec(ru, rh, ri[:1], rneg, {"dims": [16, D]}).eval()
    ours = GRU4Rec(ou, oh, oi[:1], oneg, {"dims": [16, D], "num_layers": 2}).eval()
    _copy_tables(ours, ref.embedding, ["user_id", "gender", "movie_id"])
    _copy_in_order(ours.gru, ref.gru)
    _copy_in_order(ours.user_mlp, ref.user_mlp)
    x = _full_batch()
    assert ref(x).shape == (B, D)  # the reference's defect: summed over the items
    user, items = ref.user_tower(x), ref.item_tower(x)  # (B, 1, D), (B, 1 + N, D)
    torch.testing.assert_close(ours(x), (user * items).sum(-1))
    ref.mode = ours.mode = "user"
    torch.testing.assert_close(ours(x), ref(x))


@needs_reference
def test_narm_and_stamp_equal_reference_on_unpadded_sessions():
    rhist = rf.SequenceFeature("hist_movie_id", V, D, pooling="concat")
    ohist = SequenceFeature("hist_movie_id", V, D, pooling="concat", padding_idx=0)
    item_r, item_o = rf.SparseFeature("movie_id", V, D), SparseFeature("movie_id", V, D)
    x = _full_batch()
    torch.manual_seed(0)
    ref = rm.NARM(rhist, 12, 0.0, 0.0, item_feature=item_r).eval()
    ours = NARM(ohist, 12, 0.0, 0.0, item_feature=item_o).eval()
    with torch.no_grad():
        ours.embedding.rows(ohist).copy_(ref.item_emb.weight)
        for name in ("a_1", "a_2", "v", "b"):
            getattr(ours, name).copy_(getattr(ref, name))
    _copy_in_order(ours.gru, ref.gru)
    torch.testing.assert_close(ours(x), ref(x))
    ref.mode = ours.mode = "user"
    torch.testing.assert_close(ours(x), ref(x))

    ref = rm.STAMP(rhist, 0.05, 0.05, item_feature=item_r).eval()
    ours = STAMP(ohist, 0.05, 0.05, item_feature=item_o).eval()
    with torch.no_grad():
        ours.embedding.rows(ohist).copy_(ref.item_emb.weight)
        for name in ("w_0", "w_1_t", "w_2_t", "w_3_t", "b_a"):
            getattr(ours, name).copy_(getattr(ref, name))
    _copy_in_order(ours.f_s, ref.f_s)
    _copy_in_order(ours.f_t, ref.f_t)
    torch.testing.assert_close(ours(x), ref(x))
    no_item = STAMP(ohist, 0.05, 0.05).eval()
    no_item.load_state_dict(ours.state_dict())
    assert no_item(x).shape == (B, V)  # the reference's full softmax without an item feature


@needs_reference
def test_dssm_senet_equals_reference():
    from torch_rechub.models.matching.dssm_senet import DSSM as RefDSSMSENet

    user = [rf.SparseFeature("user_id", 20, D), rf.SparseFeature("gender", 3, D), rf.SparseFeature("age", 7, D)]
    item = [rf.SparseFeature("movie_id", V, D), rf.SparseFeature("cate_id", 5, D)]
    ou = [SparseFeature("user_id", 20, D), SparseFeature("gender", 3, D), SparseFeature("age", 7, D)]
    oi = [SparseFeature("movie_id", V, D), SparseFeature("cate_id", 5, D)]
    params = {"dims": [16, D], "activation": "relu"}
    torch.manual_seed(0)
    ref = RefDSSMSENet(user, item, params, params, temperature=0.2).eval()
    ours = DSSMSENet(ou, oi, params, params, temperature=0.2, excitation="relu").eval()
    _copy_tables(ours, ref.embedding, ["user_id", "gender", "age", "movie_id", "cate_id"])
    for a, b in (("user_mlp", "user_mlp"), ("item_mlp", "item_mlp"), ("user_senet", "user_senet"), ("item_senet", "item_senet")):
        _copy_in_order(getattr(ours, a), getattr(ref, b))
    x = _full_batch()
    x["age"] = torch.randint(0, 7, (B,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(torch.sigmoid(ours(x)), ref(x))  # the reference applies its temperature here
    for mode in ("user", "item"):
        ref.mode, ours.mode = mode, mode
        torch.testing.assert_close(ours(x), ref(x))


def test_dssm_senet_weights_every_field_and_takes_dense_features():
    """A history sharing the item table is a field of its own (the reference left it out of
    the field count and regrouped the flat embeddings into fields of the wrong width), and
    dense features join the tower MLP (the reference's reshape failed on them)."""
    schema = _schema(with_negatives=False)
    model = DSSMSENet(user_params=P, item_params=P, schema=schema)
    assert [f.name for f in model.user_fields] == ["user_id", "gender", "hist_movie_id"]
    assert model.user_senet.mlp[0].in_features == 3
    x = _batch()
    relu = DSSMSENet(user_params=P, item_params=P, excitation="relu", schema=schema).eval()
    with torch.no_grad():  # negative excitation weights: ReLU gates switch every user field off
        relu.user_senet.mlp[2].weight.copy_(-relu.user_senet.mlp[2].weight.abs())
        model.user_senet.mlp[2].weight.copy_(relu.user_senet.mlp[2].weight)
    u = relu.user_tower(x)
    assert torch.allclose(u, u[:1].expand_as(u))  # every user looks alike
    u = model.eval().user_tower(x)
    assert not torch.allclose(u, u[:1].expand_as(u))  # sigmoid gates (the default) stay open
    dense = DSSMSENet([SparseFeature("user_id", 20, D), DenseFeature("score")], [SparseFeature("movie_id", V, D)], P, P)
    dense.eval()
    xd = {"user_id": x["user_id"], "score": torch.zeros(B), "movie_id": x["movie_id"]}
    moved = dense.user_tower({**xd, "score": torch.full((B,), 3.0)})
    assert dense(xd).shape == (B,) and not torch.allclose(dense.user_tower(xd), moved)  # the dense value is an input
    with pytest.raises(ValueError, match="share one embed_dim"):
        DSSMSENet([SparseFeature("user_id", 20, 8), SparseFeature("city", 4, 4)], [SparseFeature("movie_id", V, D)], P, P)
    with pytest.raises(ValueError, match="reduction_ratio"):
        DSSMSENet(user_params=P, item_params=P, reduction_ratio=0, schema=schema)
