"""The ranking zoo beyond the first four models: shapes, a gradient for every parameter,
spec round trips, feature defaults from a schema, and equality with Torch-RecHub 0.9.0 given
identical weights wherever the reference's math is correct (ours return logits, the
reference returns sigmoid(logits))."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rechub_lightning.features import DenseFeature, FeatureSchema, RandomNormal, SequenceFeature, SparseFeature
from rechub_lightning.layers import Dice
from rechub_lightning.layers.sequence import left_align
from rechub_lightning.models.base import build_model, model_spec, returns_logits
from rechub_lightning.models.ranking import (
    AFM,
    BST,
    DIEN,
    DIN,
    EDCN,
    AutoInt,
    DeepFFM,
    FatDeepFFM,
    FiBiNet,
    FinalMLP,
    xDeepFM,
)

B, L, D = 16, 6, 8
MLP = {"dims": [16, 8], "dropout": 0.1, "activation": "relu"}
EDCN_MLP = {"dropout": 0.1, "activation": "relu"}  # EDCN's blocks are as wide as its input
WIDE = RandomNormal(0.0, 0.5)  # embeddings large enough for every branch to be active


# ----------------------------------------------------------------------------- inputs
def tabular_features(mod=None, init=None):
    """3 dense + 4 sparse features of width D (``mod``: our features module or the reference's)."""
    mod = mod or __import__("rechub_lightning.features", fromlist=["x"])
    kw = {} if init is None else {"initializer": init}
    dense = [mod.DenseFeature(f"d{i}") for i in range(3)]
    sparse = [mod.SparseFeature(f"c{i}", 7 + 3 * i, embed_dim=D, **kw) for i in range(4)]
    return dense, sparse


def tabular_batch(dense, sparse, generator=None):
    x = {f.name: torch.randn(B, generator=generator) for f in dense}
    x.update({f.name: torch.randint(0, f.vocab_size, (B,), generator=generator) for f in sparse})
    return x


def sequence_features(mod=None, init=None):
    """Amazon-shaped features: context (age, user_id), targets (item_id, cate_id) and their
    post-padded histories sharing the targets' tables."""
    mod = mod or __import__("rechub_lightning.features", fromlist=["x"])
    kw = {} if init is None else {"initializer": init}
    context = [mod.DenseFeature("age"), mod.SparseFeature("user_id", 20, embed_dim=D, **kw)]
    targets = [
        mod.SparseFeature("item_id", 30, embed_dim=D, padding_idx=0, **kw),
        mod.SparseFeature("cate_id", 10, embed_dim=D, padding_idx=0, **kw),
    ]
    history = [
        mod.SequenceFeature("hist_item_id", 30, embed_dim=D, pooling="concat", shared_with="item_id", padding_idx=0),
        mod.SequenceFeature("hist_cate_id", 10, embed_dim=D, pooling="concat", shared_with="cate_id", padding_idx=0),
    ]
    return context, history, targets


def _history(vocab, lengths, pre=False, generator=None):
    seq = torch.zeros(len(lengths), L, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids = torch.randint(1, vocab, (n,), generator=generator)
        if n:
            if pre:
                seq[r, L - n :] = ids
            else:
                seq[r, :n] = ids
    return seq


def sequence_batch(lengths=None, pre=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths if lengths is not None else torch.randint(2, L + 1, (B,), generator=g).tolist()
    x = {
        "age": torch.randn(len(lengths), generator=g),
        "user_id": torch.randint(0, 20, (len(lengths),), generator=g),
        "item_id": torch.randint(1, 30, (len(lengths),), generator=g),
        "cate_id": torch.randint(1, 10, (len(lengths),), generator=g),
    }
    x["hist_item_id"] = _history(30, lengths, pre, g)
    x["hist_cate_id"] = _history(10, lengths, pre, g)
    x["neg_hist_item_id"] = _history(30, lengths, pre, g)
    x["neg_hist_cate_id"] = _history(10, lengths, pre, g)
    return x


def negative_features(mod=None):
    mod = mod or __import__("rechub_lightning.features", fromlist=["x"])
    return [
        mod.SequenceFeature("neg_hist_item_id", 30, embed_dim=D, pooling="concat", shared_with="item_id", padding_idx=0),
        mod.SequenceFeature("neg_hist_cate_id", 10, embed_dim=D, pooling="concat", shared_with="cate_id", padding_idx=0),
    ]


# ----------------------------------------------------------------------------- the zoo
def _tabular_models():
    d, s = tabular_features(init=WIDE)
    ffm_cross = [SparseFeature(f.name, f.vocab_size * len(s), embed_dim=4, initializer=WIDE) for f in s]
    ffm_linear = [SparseFeature(f.name, f.vocab_size, embed_dim=1, initializer=WIDE) for f in s] + d
    return [
        ("EDCN-hadamard", lambda: EDCN(d + s, 2, EDCN_MLP)),
        ("EDCN-concat", lambda: EDCN(d + s, 2, EDCN_MLP, bridge_type="concatenation")),
        ("EDCN-attention", lambda: EDCN(d + s, 2, EDCN_MLP, bridge_type="attention_pooling", temperature=0.5)),
        ("EDCN-addition-noreg", lambda: EDCN(d + s, 1, EDCN_MLP, bridge_type="pointwise_addition", use_regulation_module=False)),
        ("AFM", lambda: AFM(s, D, t=6)),
        ("FiBiNet-interaction", lambda: FiBiNet(d + s, MLP)),
        ("FiBiNet-each", lambda: FiBiNet(d + s, MLP, bilinear_type="field_each")),
        ("FiBiNet-all", lambda: FiBiNet(s, MLP, reduction_ratio=2, bilinear_type="field_all")),
        ("DeepFFM", lambda: DeepFFM(ffm_linear, ffm_cross, 4, MLP)),
        ("FatDeepFFM", lambda: FatDeepFFM(ffm_linear, ffm_cross, 4, 2, MLP)),
        ("AutoInt", lambda: AutoInt(s, d, num_layers=2, num_heads=2, mlp_params=MLP)),
        ("AutoInt-nomlp", lambda: AutoInt(s, None, num_layers=1, num_heads=4, dropout=0.1)),
        ("xDeepFM", lambda: xDeepFM(d + s, s, [8, 6], MLP)),
        ("xDeepFM-nosplit", lambda: xDeepFM(d + s, s, [5, 3], MLP, split_half=False)),
        ("FinalMLP", lambda: FinalMLP(d + s, MLP, {"dims": [12], "dropout": 0.0}, num_heads=2)),
        ("FinalMLP-context", lambda: FinalMLP(d + s, MLP, MLP, fs_hidden_units=[8], fs1_context=s[:1], fs2_context=s[1:3])),
        ("FinalMLP-nofs", lambda: FinalMLP(d + s, MLP, MLP, use_fs=False)),
    ]


def _sequence_models():
    c, h, t = sequence_features(init=WIDE)
    negs = negative_features()
    att = {"dims": [12], "activation": "dice"}
    return [
        ("DIN", lambda: DIN(c, h, t, MLP, att)),
        ("DIN-softmax", lambda: DIN(c, h, t, MLP, {"dims": [12], "use_softmax": True, "activation": "prelu"})),
        ("DIEN-inbatch", lambda: DIEN(c, h, None, t, MLP)),
        ("DIEN-negatives", lambda: DIEN(c, h, negs, t, MLP, alpha=0.5)),
        ("BST", lambda: BST(c, h, t, MLP, nhead=2, dropout=0.1, num_layers=2, max_seq_len=L + 1, dim_feedforward=32)),
        ("BST-reference-math", lambda: BST(c, h, t, MLP, nhead=2, max_seq_len=L + 1, input_norm=False)),
    ]


ZOO = _tabular_models() + _sequence_models()
IDS = [name for name, _ in ZOO]


def _batch_for(name):
    if name.split("-")[0] in ("DIN", "DIEN", "BST"):
        return sequence_batch()
    return tabular_batch(*tabular_features())


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name,factory", ZOO, ids=IDS)
def test_shape_and_every_parameter_gets_gradient(name, factory):
    torch.manual_seed(0)  # the same weights whatever ran before (a dead ReLU unit depends on them)
    model = factory()
    x = _batch_for(name)
    out = model(x)
    logits = _logits(out)
    assert logits.shape == (B,)
    assert logits.dtype == torch.float32
    assert returns_logits(model)
    loss = logits.sum()
    if isinstance(out, tuple):
        assert out[1].shape == () and out[1].item() > 0  # DIEN's auxiliary loss is live in training
        loss = loss + out[1]
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"{name}: parameters without gradient: {dead}"


@pytest.mark.parametrize("name,factory", ZOO, ids=IDS)
def test_spec_roundtrip_rebuilds_same_function(name, factory):
    model = factory()
    x = _batch_for(name)
    clone = build_model(model_spec(model))
    assert type(clone) is type(model)
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    out, again = model(x), clone(x)
    if isinstance(out, tuple):
        assert out[1].item() == 0.0  # no auxiliary loss in eval mode
        out, again = out[0], again[0]
    assert torch.equal(out, again)


# ----------------------------------------------------------------------------- defaults from a schema
def test_tabular_schema_defaults():
    d, s = tabular_features()
    schema = FeatureSchema(d + s, ["label"])
    names = lambda fs: [f.name for f in fs]  # noqa: E731
    assert names(EDCN(schema=schema, mlp_params=EDCN_MLP).features) == names(d + s)
    afm = AFM(schema=schema)
    assert names(afm.fm_features) == names(s) and afm.embed_dim == D
    fibi = FiBiNet(schema=schema, mlp_params=MLP)
    assert names(fibi.dense_features) == names(d) and names(fibi.field_features) == names(s)
    auto = AutoInt(schema=schema)
    assert names(auto.sparse_features) == names(s) and names(auto.dense_features) == names(d)
    xd = xDeepFM(schema=schema)
    assert names(xd.deep_features) == names(d + s) and names(xd.cin_features) == names(s)
    assert names(FinalMLP(schema=schema).features) == names(d + s)
    # selectors and names resolve too
    assert names(AFM(["c1", "c3"], schema=schema).fm_features) == ["c1", "c3"]
    assert names(FiBiNet("sparse", MLP, schema=schema).dense_features) == []


def test_ffm_schema_defaults_expand_the_vocabulary():
    d, s = tabular_features()
    schema = FeatureSchema(d + s, ["label"])
    model = DeepFFM(schema=schema, embed_dim=4, mlp_params=MLP)
    assert [f.vocab_size for f in model.cross_features] == [f.vocab_size * 4 for f in s]
    assert {f.embed_dim for f in model.cross_features} == {4}
    assert [f.name for f in model.linear_features] == [f.name for f in d + s]
    assert all(f.embed_dim == 1 for f in model.linear_features)
    fat = FatDeepFFM(schema=schema, reduction_ratio=2)
    assert fat.embed_dim == D and fat.num_field_cross == 6
    x = tabular_batch(d, s)
    assert model(x).shape == fat(x).shape == (B,)
    with pytest.raises(ValueError, match="embed_dim=4 but"):
        DeepFFM(d, s, 4, MLP)


def test_sequence_schema_defaults():
    c, h, t = sequence_features()
    negs = negative_features()
    schema = FeatureSchema(c + t + h, ["label"])
    names = lambda fs: [f.name for f in fs]  # noqa: E731
    for model in (DIN(schema=schema), BST(schema=schema, nhead=2), DIEN(schema=schema)):
        assert names(model.history_features) == ["hist_item_id", "hist_cate_id"]
        assert names(model.target_features) == ["item_id", "cate_id"]
        assert names(model.features) == ["age", "user_id"]
    # DIEN: negatives from the schema's "neg_history" group, kept out of the histories
    with_negs = FeatureSchema(c + t + h + negs, ["label"], groups={"neg_history": names(negs)})
    dien = DIEN(schema=with_negs)
    assert names(dien.history_features) == ["hist_item_id", "hist_cate_id"]
    assert names(dien.neg_history_features) == names(negs)
    assert DIEN(schema=schema).neg_history_features == []
    # explicit names
    din = DIN(["user_id"], ["hist_item_id"], ["item_id"], schema=schema)
    assert names(din.features) == ["user_id"] and names(din.target_features) == ["item_id"]
    x = sequence_batch()
    for model in (DIN(schema=schema), BST(schema=schema, nhead=2, max_seq_len=L + 1), din):
        assert model(x).shape == (B,)


def test_sequence_defaults_fail_clearly():
    c, _, t = sequence_features()
    lone = SequenceFeature("hist_tag", 9, embed_dim=D, padding_idx=0)
    with pytest.raises(ValueError, match="target_features"):
        DIN(schema=FeatureSchema(c + t + [lone], ["label"]))
    with pytest.raises(ValueError, match="no sequence features"):
        BST(schema=FeatureSchema(c + t, ["label"]))
    with pytest.raises(ValueError, match="pair up"):
        DIN(c, sequence_features()[1], t[:1])
    with pytest.raises(ValueError, match="pair up"):  # BST attends over (history, target) pairs only
        BST(c, sequence_features()[1], t + c[1:], MLP, nhead=2, max_seq_len=L + 1)


def test_din_takes_extra_targets_into_the_mlp_as_the_reference_does():
    """Torch-RecHub's Amazon example passes target_features=[item, cate, user_id] for two
    histories: history i attends with target i, the user id is one more MLP input."""
    c, h, t = sequence_features()
    user = c[1]
    model = DIN([c[0]], h, t + [user], {"dims": [8]}, {"dims": [4]}).eval()
    assert model.mlp.mlp[0].in_features == 2 * D + 3 * D + 1  # pooled histories, 3 targets, age
    x = sequence_batch()
    other_user = dict(x, user_id=(x["user_id"] + 1) % 20)
    assert not torch.allclose(model(x), model(other_user))


# ----------------------------------------------------------------------------- behaviour
def test_afm_attention_follows_the_interactions_that_carry_signal():
    """The reference's softmax over a single logit is always 1; here the weights depend on
    which pairs interact strongly, and move when the signal moves."""
    feats = [SparseFeature(f"f{i}", 3, embed_dim=4) for i in range(4)]
    model = AFM(feats, 4, t=4).eval()
    with torch.no_grad():
        model.attention.attention.weight.copy_(torch.eye(4))
        model.attention.attention.bias.zero_()
        model.attention.h.weight.fill_(1.0)
    x = {f.name: torch.tensor([1]) for f in feats}
    pairs = list(zip(*[t.tolist() for t in torch.triu_indices(4, 4, offset=1)]))

    def weights_for(scales):
        with torch.no_grad():
            for f, s in zip(feats, scales):
                model.embedding.rows(f).fill_(s)
        model(x)
        return model.last_attention[0]

    strong_01 = weights_for([1.0, 1.0, 0.2, 0.2])
    strong_23 = weights_for([0.2, 0.2, 1.0, 1.0])
    for w in (strong_01, strong_23):
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))
        assert w.max() - w.min() > 0.1  # not uniform
    assert pairs[int(strong_01.argmax())] == (0, 1)
    assert pairs[int(strong_23.argmax())] == (2, 3)
    assert not torch.allclose(strong_01, strong_23)
    torch.testing.assert_close(model.attention_weights(x)[0], strong_23)


def test_edcn_regulation_gates_are_a_softmax_over_fields():
    d, s = tabular_features()
    model = EDCN(d + s, 1, EDCN_MLP, temperature=2.0)
    reg = model.regulation_modules[0]
    with torch.no_grad():
        reg.g1.copy_(torch.arange(7, dtype=torch.float))
    gate = reg._gate(reg.g1)
    assert gate.shape == (3 + 4 * D,)
    # the paper's softmax across the 7 fields, scaled by the number of fields
    field_gates = 7 * torch.softmax(torch.arange(7, dtype=torch.float) / 2.0, dim=0)
    torch.testing.assert_close(gate[:3], field_gates[:3])
    torch.testing.assert_close(gate[3 : 3 + D], field_gates[3].expand(D))
    # untrained gates are 1: the regulation leaves the embeddings' scale alone (a bare softmax
    # would shrink them 7-fold, into BatchNorm's eps-dominated range)
    fresh = EDCN(d + s, 1, EDCN_MLP).regulation_modules[0]
    x = torch.randn(4, 3 + 4 * D)
    for out in fresh(x):
        torch.testing.assert_close(out, x)


def test_fibinet_uses_dense_features():
    d, s = tabular_features()
    model = FiBiNet(d + s, MLP).eval()
    x = tabular_batch(d, s)
    shifted = dict(x, d0=x["d0"] + 3.0)
    assert not torch.allclose(model(x), model(shifted))


def test_dien_reads_pre_and_post_padded_histories_alike():
    c, h, t = sequence_features()
    model = DIEN(c, h, None, t, MLP).eval()
    lengths = [2, 6, 3, 1, 0, 4, 5, 2]
    post = sequence_batch(lengths, pre=False, seed=3)
    pre = sequence_batch(lengths, pre=True, seed=3)
    assert not torch.equal(post["hist_item_id"], pre["hist_item_id"])
    torch.testing.assert_close(model(post)[0], model(pre)[0])


def test_dien_auxiliary_loss_ignores_padding_steps():
    c, h, t = sequence_features()
    negs = negative_features()
    model = DIEN(c, h, negs, t, MLP, alpha=1.0)
    x = sequence_batch([1] * B)  # one behaviour per row: no (t, t+1) step is valid
    assert model(x)[1].item() == 0.0
    x = sequence_batch([3] * B)
    x2 = dict(x)
    for k in ("neg_hist_item_id", "neg_hist_cate_id"):
        x2[k] = x[k].clone()
        x2[k][:, 3:] = torch.randint(1, 10, (B, L - 3))  # junk after the end of each history
    torch.manual_seed(0)
    a = model(x)[1]
    torch.manual_seed(0)
    b = model(x2)[1]
    torch.testing.assert_close(a, b)


def test_din_softmax_attention_excludes_padding():
    from rechub_lightning.layers import ActivationUnit

    unit = ActivationUnit(4, dims=[5], activation="relu", use_softmax=True).eval()
    history, target = torch.randn(3, 5, 4), torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    w = unit.scores(history, target, mask)
    assert torch.all(w[~mask] == 0)
    torch.testing.assert_close(w.sum(dim=1), torch.tensor([1.0, 1.0, 0.0]))


def test_bst_positions_start_at_the_item_embedding_scale():
    # The reference's N(0, 1) positions drown items initialised at N(0, 1e-4).
    c, h, t = sequence_features()
    model = BST(c, h, t, MLP, nhead=2, max_seq_len=L + 1)
    assert model.pos_embedding.weight.std() < 1e-3
    wide = BST(*sequence_features(init=WIDE), MLP, nhead=2, max_seq_len=L + 1)
    assert 0.3 < wide.pos_embedding.weight.std() < 0.7
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        BST(c, h, t, MLP, nhead=2, max_seq_len=L)(sequence_batch())


def test_transformer_block_last_only_is_the_last_row():
    from rechub_lightning.layers import TransformerBlock

    block = TransformerBlock(8, 2, 16, dropout=0.1).eval()
    x = torch.randn(4, 5, 8)
    pad = torch.tensor([[False] * 5, [True, True, False, False, False], [False] * 5, [True] * 4 + [False]])
    torch.testing.assert_close(block(x, pad, last_only=True), block(x, pad)[:, -1:])


def test_left_align_keeps_order():
    seq = torch.tensor([[0, 5, 0, 7], [1, 2, 0, 0], [0, 0, 0, 0]])
    aligned, mask, _ = left_align(seq.unsqueeze(-1).float(), seq != 0)
    assert aligned.squeeze(-1).tolist() == [[5, 7, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True, True, False, False], [False] * 4]


# ----------------------------------------------------------------------------- reference equality
# Compared: EDCN (regulation off), FiBiNet (sparse only), DeepFFM, FatDeepFFM, AutoInt, DIN and
# DIEN (Dice swapped for ReLU on both sides), BST (input_norm=False), and the CIN/FFM/SENET/
# interacting layers.
# Not compared, because a documented fix changes the math: AFM (the reference's attention is a
# softmax over one logit, always 1), EDCN's regulation gates (softmax of a scalar, always 1),
# FiBiNet with dense features (the reference drops them). xDeepFM and FinalMLP have no reference.
trh = pytest.importorskip("torch_rechub")


def _ref_modules():
    from torch_rechub.basic import features as F
    from torch_rechub.basic.initializers import RandomNormal as RefNormal
    from torch_rechub.models import ranking as R

    return F, RefNormal(0.0, 0.5), R


def _copy_tables(ours_embedding, ref_embedding, features):
    """Reference per-feature tables -> our fused tables."""
    with torch.no_grad():
        for f in features:
            if getattr(f, "shared_with", None) is None and not isinstance(f, DenseFeature) and hasattr(f, "vocab_size"):
                ours_embedding.rows(f.name).copy_(ref_embedding.embed_dict[f.name].weight)


def _copy_params(ours, ref, rename=lambda n: n, skip=("embedding.",)):
    own = ours.state_dict()
    with torch.no_grad():
        for k, v in ref.state_dict().items():
            if k.startswith(skip):
                continue
            own[rename(k)].copy_(v.reshape(own[rename(k)].shape))


def _copy_mlp(ours: nn.Module, ref: nn.Module) -> None:
    """Pair the Linear/BatchNorm layers of two MLPs in order (ours has no Dropout(p=0) layers)."""
    kinds = (nn.Linear, nn.BatchNorm1d)
    mine = [m for m in ours.modules() if isinstance(m, kinds)]
    theirs = [m for m in ref.modules() if isinstance(m, kinds)]
    assert [type(m) for m in mine] == [type(m) for m in theirs]
    for a, b in zip(mine, theirs):
        a.load_state_dict(b.state_dict())


def _dice_to_relu(model: nn.Module) -> None:
    """Our Dice follows the paper (batch-standardised units) and the reference's per-row
    standardisation differs by design; compare the architectures with ReLU on both sides."""
    from torch_rechub.basic.activation import Dice as RefDice

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (Dice, RefDice)):
                setattr(parent, name, nn.ReLU())


def _assert_same(ours_out, ref_out):
    assert ref_out.std() > 1e-4, "degenerate comparison: the reference's output is constant"
    torch.testing.assert_close(torch.sigmoid(ours_out), ref_out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bridge", ["hadamard_product", "pointwise_addition", "concatenation", "attention_pooling"])
def test_edcn_equals_reference(bridge):
    # use_regulation_module=False: the reference's gates are softmax(scalar) == 1 (fixed here).
    F, init, R = _ref_modules()
    rd, rs = tabular_features(F, init)
    od, os_ = tabular_features()
    ref = R.EDCN(rd + rs, 2, dict(EDCN_MLP), bridge_type=bridge, use_regulation_module=False)
    ours = EDCN(od + os_, 2, EDCN_MLP, bridge_type=bridge, use_regulation_module=False)
    _copy_tables(ours.embedding, ref.embedding, rs)
    _copy_params(ours, ref)
    ref.eval(), ours.eval()
    x = tabular_batch(rd, rs)
    _assert_same(ours(x), ref(x))


@pytest.mark.parametrize("bilinear_type", ["field_all", "field_each", "field_interaction"])
def test_fibinet_equals_reference(bilinear_type):
    # Sparse features only: the reference drops dense features (fixed here).
    F, init, R = _ref_modules()
    _, rs = tabular_features(F, init)
    _, os_ = tabular_features()
    ref = R.FiBiNet(rs, dict(MLP), reduction_ratio=2, bilinear_type=bilinear_type)
    ours = FiBiNet(os_, MLP, reduction_ratio=2, bilinear_type=bilinear_type)
    _copy_tables(ours.embedding, ref.embedding, rs)
    layers = ref.bilinear_interaction.bilinear_layer
    stacked = layers.weight.unsqueeze(0) if isinstance(layers, nn.Linear) else torch.stack([m.weight for m in layers])
    _copy_params(ours, ref, skip=("embedding.", "bilinear_interaction."))
    with torch.no_grad():
        ours.bilinear_interaction.weight.copy_(stacked)
    ref.eval(), ours.eval()
    x = tabular_batch([], rs)
    _assert_same(ours(x), ref(x))


@pytest.mark.parametrize("fat", [False, True], ids=["DeepFFM", "FatDeepFFM"])
def test_deepffm_equals_reference(fat):
    F, init, R = _ref_modules()
    n = 4

    def feats(mod, **kw):
        _, sparse = tabular_features(mod)
        linear = [mod.SparseFeature(f.name, f.vocab_size, embed_dim=1, **kw) for f in sparse] + [mod.DenseFeature("d0")]
        cross = [mod.SparseFeature(f.name, f.vocab_size * n, embed_dim=4, **kw) for f in sparse]
        return sparse, linear, cross

    rs, rlin, rcross = feats(F, initializer=init)
    _, olin, ocross = feats(__import__("rechub_lightning.features", fromlist=["x"]))
    mlp = dict(MLP)
    if fat:
        ref, ours = R.FatDeepFFM(rlin, rcross, 4, 2, mlp), FatDeepFFM(olin, ocross, 4, 2, MLP)
    else:
        ref, ours = R.DeepFFM(rlin, rcross, 4, mlp), DeepFFM(olin, ocross, 4, MLP)
    _copy_tables(ours.linear_embedding, ref.linear_embedding, rlin)
    _copy_tables(ours.ffm_embedding, ref.ffm_embedding, rcross)
    skip = ("linear_embedding.", "ffm_embedding.", "fields_offset", "cen.mlp_att.")
    _copy_params(ours, ref, skip=skip)
    if fat:
        _copy_mlp(ours.cen.mlp_att, ref.cen.mlp_att)
    with torch.no_grad():
        ours.dense_linear.weight.fill_(1.0)  # the reference's fixed weight on raw dense values
    ref.eval(), ours.eval()
    x = tabular_batch([DenseFeature("d0")], rs)
    _assert_same(ours(x), ref(x))


def test_autoint_equals_reference():
    F, init, R = _ref_modules()
    rd, rs = tabular_features(F, init)
    od, os_ = tabular_features()
    ref = R.AutoInt(rs, rd, num_layers=2, num_heads=2, mlp_params=dict(MLP))
    ours = AutoInt(os_, od, num_layers=2, num_heads=2, mlp_params=MLP)
    _copy_tables(ours.sparse_embedding, ref.sparse_embedding, rs)
    _copy_params(ours, ref, skip=("sparse_embedding.",))
    ref.eval(), ours.eval()
    x = tabular_batch(rd, rs)
    _assert_same(ours(x), ref(x))


def _sequence_pair(init):
    F, _, _ = _ref_modules()
    rc, rh, rt = sequence_features(F, init)
    oc, oh, ot = sequence_features()
    return rc, rh, rt, oc, oh, ot


def test_din_equals_reference():
    F, init, R = _ref_modules()
    rc, rh, rt, oc, oh, ot = _sequence_pair(init)
    rc, oc = rc[1:], oc[1:]  # the reference's DIN cannot take dense context features
    att = {"dims": [12], "activation": "dice"}
    mlp = {"dims": [16, 8], "dropout": 0.1}  # the reference fixes the activation to Dice
    ref, ours = R.DIN(rc, rh, rt, dict(mlp), dict(att)), DIN(oc, oh, ot, mlp, att)
    _dice_to_relu(ref), _dice_to_relu(ours)
    _copy_tables(ours.embedding, ref.embedding, rc + rt)
    _copy_params(ours, ref, skip=("embedding.", "attention_layers."))
    for a, b in zip(ours.attention_layers, ref.attention_layers):
        _copy_mlp(a, b)
    ref.eval(), ours.eval()
    x = sequence_batch([1, 6, 3, 2, 5, 4, 6, 1])
    _assert_same(ours(x), ref(x))


def test_dien_equals_reference_in_training_mode():
    """Same logits and same auxiliary loss, with the reference's explicit negatives, on
    post-padded histories (including an empty one)."""
    F, init, R = _ref_modules()
    rc, rh, rt, oc, oh, ot = _sequence_pair(init)
    rneg, oneg = negative_features(F), negative_features()
    mlp = {"dims": [16, 8], "dropout": 0.0}
    ref, ours = R.DIEN(rc, rh, rneg, rt, dict(mlp), alpha=0.3), DIEN(oc, oh, oneg, ot, mlp, alpha=0.3)
    _dice_to_relu(ref), _dice_to_relu(ours)
    _copy_tables(ours.embedding, ref.embedding, rc + rt)
    _copy_mlp(ours.mlp, ref.mlp)
    with torch.no_grad():
        for i in range(len(rh)):
            ours.interest_extractor_layers[i].gru.load_state_dict(ref.interest_extractor_layers[i].state_dict())
            evo, ref_evo = ours.interest_evolving_layers[i], ref.interest_evolving_layers[i]
            evo.attention_weight.copy_(ref_evo.Wa)
            c = ref_evo.augru_cell
            evo.augru.cell.weight_ih.copy_(torch.cat([c.Wu, c.Wr, c.Wh], dim=1))
            evo.augru.cell.weight_hh.copy_(torch.cat([c.Uu, c.Ur, c.Uh], dim=1))
            evo.augru.cell.bias.copy_(torch.cat([c.bu, c.br, c.bh], dim=1).squeeze(0))
    x = sequence_batch([2, 6, 3, 0, 5, 4, 6, 1])
    ref_p, ref_aux = ref(x)
    our_logits, our_aux = ours(x)
    _assert_same(our_logits, ref_p)
    torch.testing.assert_close(our_aux, ref_aux, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # raised inside the reference
def test_bst_equals_reference():
    F, init, R = _ref_modules()
    rc, rh, rt, oc, oh, ot = _sequence_pair(init)
    kw = dict(nhead=2, dropout=0.1, num_layers=2, max_seq_len=L + 1)
    # input_norm=False: our default adds a LayerNorm on the input tokens (documented deviation)
    ref, ours = R.BST(rc, rh, rt, dict(MLP), **kw), BST(oc, oh, ot, MLP, **kw, input_norm=False)
    _copy_tables(ours.embedding, ref.embedding, rc + rt)
    _copy_params(ours, ref, rename=lambda k: k.replace("transformer_layers.layers.", "transformer_layers."))
    ref.eval(), ours.eval()
    x = sequence_batch([2, 6, 3, 1, 5, 4, 6, 1])
    _assert_same(ours(x), ref(x))


def test_layers_equal_reference():
    from torch_rechub.basic import layers as RL

    from rechub_lightning.layers import CIN, FFM, InteractingLayer, SENETLayer

    x = torch.randn(5, 4, 6)
    ref_cin, cin = RL.CIN(4, [6, 4], split_half=True), CIN(4, [6, 4], split_half=True)
    cin.load_state_dict(ref_cin.state_dict())
    torch.testing.assert_close(cin(x), ref_cin(x))
    xf = torch.randn(5, 4, 4, 6)
    torch.testing.assert_close(FFM(4, reduce_sum=False)(xf), RL.FFM(4, reduce_sum=False)(xf))
    torch.testing.assert_close(FFM(4)(xf), RL.FFM(4)(xf))
    ref_se, se = RL.SENETLayer(4, 2), SENETLayer(4, 2)
    se.load_state_dict(ref_se.state_dict())
    torch.testing.assert_close(se(x), ref_se(x))
    ref_il, il = RL.InteractingLayer(6, 3).eval(), InteractingLayer(6, 3).eval()
    il.load_state_dict(ref_il.state_dict())
    torch.testing.assert_close(il(x), ref_il(x))


def test_dice_inference_equals_its_batchnorm_inference():
    """Eval-mode Dice writes BatchNorm's inference formula out (exportable to ONNX): same values."""
    torch.manual_seed(0)
    dice = Dice(6)
    with torch.no_grad():
        dice.alpha.fill_(0.3)
    for _ in range(3):  # training batches move the running statistics
        dice(torch.randn(32, 6) * 3 + 1)
    dice.eval()
    x = torch.randn(10, 4, 6)
    z = dice.bn.eval()(x.reshape(-1, 6)).reshape(x.shape)
    p = torch.sigmoid(z)
    torch.testing.assert_close(dice(x), p * x + (1 - p) * 0.3 * x)
    assert not torch.allclose(dice.bn.running_mean, torch.zeros(6))  # the statistics are not the init's
