"""Ranking models: shapes, gradients to every parameter, and equality with Torch-RecHub 0.9.0
given identical weights (ours return logits, the reference returns sigmoid(logits))."""

import pytest
import torch

from rechub_lightning.features import FeatureSchema
from rechub_lightning.models.base import build_model, model_spec, returns_logits
from rechub_lightning.models.ranking import DCN, DCNv2, DeepFM, WideDeep

B = 16


def _features(mod=None):
    mod = mod or __import__("rechub_lightning.features", fromlist=["x"])
    dense = [mod.DenseFeature(f"d{i}") for i in range(3)]
    sparse = [mod.SparseFeature(f"c{i}", 7 + 3 * i, embed_dim=8) for i in range(4)]
    return dense, sparse


def _batch(dense, sparse):
    x = {f.name: torch.randn(B) for f in dense}
    x.update({f.name: torch.randint(0, f.vocab_size, (B,)) for f in sparse})
    return x


MLP = {"dims": [16, 8], "dropout": 0.1, "activation": "relu"}


def _ours():
    torch.manual_seed(0)  # the same weights whatever ran before (a dead ReLU unit depends on them)
    d, s = _features()
    return [
        ("WideDeep", WideDeep(d, s, MLP), {}),
        ("DeepFM", DeepFM(d + s, s, MLP), {}),
        ("DCN", DCN(d + s, 2, MLP), {}),
        ("DCNv2-mix", DCNv2(d + s, 2, MLP, low_rank=4, num_experts=3), {}),
        ("DCNv2-stacked", DCNv2(d + s, 2, MLP, model_structure="stacked", use_low_rank_mixture=False), {}),
        ("DCNv2-cross", DCNv2(d + s, 2, MLP, model_structure="crossnet_only"), {}),
    ]


@pytest.mark.parametrize("name,model,_", _ours(), ids=lambda v: v if isinstance(v, str) else "")
def test_shape_and_every_parameter_gets_gradient(name, model, _):
    d, s = _features()
    torch.manual_seed(1)
    x = _batch(d, s)
    out = model(x)
    assert out.shape == (B,)
    assert returns_logits(model)
    out.sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"{name}: parameters without gradient: {dead}"


@pytest.mark.parametrize("name,model,_", _ours(), ids=lambda v: v if isinstance(v, str) else "")
def test_spec_roundtrip_rebuilds_same_function(name, model, _):
    d, s = _features()
    x = _batch(d, s)
    clone = build_model(model_spec(model))
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    assert torch.equal(model(x), clone(x))


def test_schema_defaults_select_features():
    d, s = _features()
    schema = FeatureSchema(d + s, ["label"])
    m = DeepFM(schema=schema, mlp_params=MLP)
    assert [f.name for f in m.deep_features] == [f.name for f in d + s]
    assert [f.name for f in m.fm_features] == [f.name for f in s]
    m2 = DeepFM(deep_features="sparse", fm_features=["c0", "c1"], schema=schema, mlp_params=MLP)
    assert [f.name for f in m2.fm_features] == ["c0", "c1"]


def test_bad_mlp_params_named():
    d, s = _features()
    with pytest.raises(ValueError, match="mlp_params.*dimz"):
        DeepFM(d + s, s, {"dimz": [4]})
    with pytest.raises(ValueError, match="model_structure"):
        DCNv2(d + s, 2, MLP, model_structure="serial")


# ----------------------------------------------------------------------------- reference equality
trh = pytest.importorskip("torch_rechub")


def _copy_embeddings(ours, ref, sparse):
    with torch.no_grad():
        for f in sparse:
            ours.embedding.rows(f).copy_(ref.embedding.embed_dict[f.name].weight)


def _copy_by_name(ours, ref, rename=lambda n: n, skip=("embedding.",)):
    ref_state = ref.state_dict()
    own = ours.state_dict()
    for k, v in ref_state.items():
        if k.startswith(skip):
            continue
        own[rename(k)].copy_(v.reshape(own[rename(k)].shape))


def _pair(name):
    from torch_rechub.basic import features as F
    from torch_rechub.models import ranking as R

    rd, rs = _features(F)
    od, os_ = _features()
    if name == "WideDeep":
        return R.WideDeep(rd, rs, MLP), WideDeep(od, os_, MLP), os_, rd, rs, lambda n: n
    if name == "DeepFM":
        return R.DeepFM(rd + rs, rs, MLP), DeepFM(od + os_, os_, MLP), os_, rd, rs, lambda n: n
    if name == "DCN":
        return R.DCN(rd + rs, 2, MLP), DCN(od + os_, 2, MLP), os_, rd, rs, lambda n: n
    if name == "DCNv2":
        return (
            R.DCNv2(rd + rs, 2, MLP, use_low_rank_mixture=False),
            DCNv2(od + os_, 2, MLP, use_low_rank_mixture=False),
            os_, rd, rs, lambda n: n.replace("parallel_dnn", "dnn"),
        )
    raise KeyError(name)


@pytest.mark.parametrize("name", ["WideDeep", "DeepFM", "DCN", "DCNv2"])
def test_equals_reference_with_same_weights(name):
    ref, ours, sparse, rd, rs, rename = _pair(name)
    _copy_embeddings(ours, ref, sparse)
    _copy_by_name(ours, ref, rename)
    ref.eval(), ours.eval()
    x = _batch(rd, rs)
    torch.testing.assert_close(torch.sigmoid(ours(x)), ref(x), atol=1e-6, rtol=1e-5)


def test_crossnetmix_equals_reference():
    from torch_rechub.basic.layers import CrossNetMix as RefMix

    from rechub_lightning.layers import CrossNetMix

    ref, ours = RefMix(12, 2, low_rank=4, num_experts=3), CrossNetMix(12, 2, low_rank=4, num_experts=3)
    with torch.no_grad():
        for i in range(2):
            ours.u_list[i].copy_(ref.u_list[i])
            ours.v_list[i].copy_(ref.v_list[i])
            ours.c_list[i].copy_(ref.c_list[i])
            ours.bias[i].copy_(ref.bias[i].squeeze(1))
        ours.gating.weight.copy_(torch.cat([g.weight for g in ref.gating], dim=0))
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
