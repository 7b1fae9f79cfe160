"""Multi-task models: shapes, gradients, the shared/task parameter split, spec round trip and
equality with Torch-RecHub 0.9.0 given identical weights (ours return logits)."""

import pytest
import torch
import torch.nn.functional as F

from rechub_lightning.features import FeatureSchema
from rechub_lightning.models.base import build_model, model_spec, returns_logits
from rechub_lightning.models.multi_task import AITM, ESMM, MMOE, PLE, SharedBottom
from rechub_lightning.models.multi_task.esmm import ctcvr_logit

B = 16
EXPERT = {"dims": [8, 6], "dropout": 0.1}
TOWER = {"dims": [4], "dropout": 0.1}


def _features(mod=None):
    mod = mod or __import__("rechub_lightning.features", fromlist=["x"])
    dense = [mod.DenseFeature(f"d{i}") for i in range(2)]
    sparse = [mod.SparseFeature(f"c{i}", 5 + 3 * i, embed_dim=4) for i in range(4)]
    return dense, sparse


def _batch(dense, sparse, n=B):
    x = {f.name: torch.randn(n) for f in dense}
    x.update({f.name: torch.randint(0, f.vocab_size, (n,)) for f in sparse})
    return x


def _models():
    torch.manual_seed(0)  # the same weights whatever ran before (a dead ReLU unit depends on them)
    d, s = _features()
    return [
        ("SharedBottom", SharedBottom(d + s, ["classification", "regression"], EXPERT, [TOWER, TOWER])),
        ("MMOE", MMOE(d + s, ["classification", "classification", "regression"], 3, EXPERT, [TOWER] * 3)),
        ("PLE-1", PLE(d + s, ["classification", "classification"], 1, 2, 1, EXPERT, [TOWER] * 2)),
        ("PLE-3", PLE(d + s, ["classification"] * 3, 3, 1, 2, EXPERT, [TOWER] * 3)),
        ("AITM", AITM(d + s, 3, EXPERT, [TOWER] * 3)),
        ("ESMM", ESMM(s[:3], s[3:], EXPERT, TOWER)),
    ]


@pytest.mark.parametrize("name,model", _models(), ids=lambda v: v if isinstance(v, str) else "")
def test_shape_logits_and_every_parameter_gets_gradient(name, model):
    d, s = _features()
    torch.manual_seed(1)
    out = model(_batch(d, s, n=64))
    assert out.shape == (64, model.n_task)
    assert returns_logits(model)
    loss = out.sum()
    aux = model.auxiliary_loss(out)
    if aux is not None:
        loss = loss + aux
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"{name}: parameters without gradient: {dead}"


@pytest.mark.parametrize("name,model", _models(), ids=lambda v: v if isinstance(v, str) else "")
def test_parameter_split_matches_the_graph(name, model):
    """Task i's parameters are reached by task i's loss only; shared ones by two or more trained tasks."""
    d, s = _features()
    out = model(_batch(d, s))
    params = list(model.parameters())
    shared, per_task = model.shared_parameters(), model.task_parameters()
    ids = [id(p) for p in shared] + [id(p) for ps in per_task for p in ps]
    assert sorted(ids) == sorted(id(p) for p in params), "shared + task parameters must partition the model"
    assert len(per_task) == model.n_task
    trained = model.trained_tasks or tuple(range(model.n_task))
    reached = {id(p): set() for p in params}
    for t in trained:
        grads = torch.autograd.grad(out[:, t].sum(), params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None and torch.any(g != 0):
                reached[id(p)].add(t)
    for t, ps in enumerate(per_task):
        for p in ps:
            assert reached[id(p)] <= {t}, f"{name}: a parameter of task {t} is reached by tasks {reached[id(p)]}"
    for p in shared:
        assert len(reached[id(p)]) >= 2, f"{name}: a shared parameter is reached by tasks {reached[id(p)]} only"
    last = model.last_shared_layer()
    last_params = list(last.parameters()) if isinstance(last, torch.nn.Module) else list(last)
    shared_ids = {id(p) for p in shared}
    assert last_params and all(id(p) in shared_ids for p in last_params)
    assert all(reached[id(p)] == set(trained) for p in last_params), "GradNorm's layer must reach every trained task"


@pytest.mark.parametrize("name,model", _models(), ids=lambda v: v if isinstance(v, str) else "")
def test_spec_roundtrip_rebuilds_same_function(name, model):
    d, s = _features()
    x = _batch(d, s)
    clone = build_model(model_spec(model))
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    assert torch.equal(model(x), clone(x))


def test_schema_defaults():
    d, s = _features()
    schema = FeatureSchema(d + s, ["a", "b", "c"])
    m = MMOE(schema=schema, n_expert=2)
    assert m.task_types == ["classification"] * 3 and [f.name for f in m.features] == [f.name for f in d + s]
    e = ESMM(schema=schema)
    assert [f.name for f in e.user_features] == [f.name for f in s] and e.item_features == []
    assert e.esmm and e.trained_tasks == (1, 2) and e.conditional_tasks == {0: 1}


def test_bad_arguments_are_named():
    d, s = _features()
    with pytest.raises(ValueError, match=r"task_types\[1\]='classfication'"):
        MMOE(d + s, ["classification", "classfication"], 2, EXPERT, [TOWER] * 2)
    with pytest.raises(ValueError, match="tower_params_list has 1 entries for 2 tasks"):
        SharedBottom(d + s, ["classification"] * 2, EXPERT, [TOWER])
    with pytest.raises(ValueError, match="expert_params.*dimz"):
        PLE(d + s, ["classification"] * 2, 1, 1, 1, {"dimz": [3]}, [TOWER] * 2)


def test_ctcvr_logit_is_the_product_and_stable():
    a = torch.tensor([-30.0, -3.0, 0.0, 2.0, 40.0, 120.0], requires_grad=True)
    b = torch.tensor([25.0, 1.0, 0.0, -2.0, 40.0, 120.0], requires_grad=True)
    z = ctcvr_logit(a, b)
    p = torch.sigmoid(a.double()) * torch.sigmoid(b.double())
    torch.testing.assert_close(torch.sigmoid(z).double(), p, atol=1e-7, rtol=1e-6)
    F.binary_cross_entropy_with_logits(z, torch.tensor([1.0, 0, 1, 0, 1, 0])).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_exportable_logaddexp_equals_torch_logaddexp():
    from rechub_lightning.models.multi_task.esmm import _logaddexp

    a = torch.tensor([-80.0, -3.0, 0.0, 0.5, 2.0, 90.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-80.0, 1.0, 0.0, 0.5, -50.0, 89.0], dtype=torch.float64, requires_grad=True)
    ours = _logaddexp(a, b)
    ref = torch.logaddexp(a, b)
    torch.testing.assert_close(ours, ref)
    ga, gb = torch.autograd.grad(ours.sum(), (a, b))
    ra, rb = torch.autograd.grad(ref.sum(), (a, b))
    torch.testing.assert_close((ga, gb), (ra, rb))  # ties (a == b) included: 0.5 each


def test_aitm_calibrator_penalises_later_steps_above_earlier_ones():
    d, s = _features()
    m = AITM(d + s, 3, EXPERT, [TOWER] * 3, calibrator_weight=0.5)
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 1.0, 0.0]])
    p = torch.sigmoid(logits)
    expected = 0.5 * ((p[0, 1] - p[0, 0]) + 0.0) / 2
    torch.testing.assert_close(m.auxiliary_loss(logits), expected)
    assert AITM(d + s, 3, EXPERT, [TOWER] * 3, calibrator_weight=0.0).auxiliary_loss(logits) is None


# ----------------------------------------------------------------------------- reference equality
trh = pytest.importorskip("torch_rechub")


def _copy_weights(ours, ref, sparse):
    """Embeddings row block by row block, every other tensor in registration order."""
    with torch.no_grad():
        for f in sparse:
            ours.embedding.rows(f).copy_(ref.embedding.embed_dict[f.name].weight)
        mine = [(k, v) for k, v in ours.state_dict().items() if not k.startswith("embedding.")]
        theirs = [(k, v) for k, v in ref.state_dict().items() if not k.startswith("embedding.")]
        assert len(mine) == len(theirs), (len(mine), len(theirs))
        for (k1, v1), (k2, v2) in zip(mine, theirs):
            assert v1.shape == v2.shape, (k1, k2)
            v1.copy_(v2)


def _pair(name):
    from torch_rechub.basic import features as RF
    from torch_rechub.models import multi_task as R

    rd, rs = _features(RF)
    od, os_ = _features()
    cls2, reg = ["classification"] * 2, ["classification", "regression"]
    if name == "SharedBottom":
        return R.SharedBottom(rd + rs, reg, EXPERT, [TOWER] * 2), SharedBottom(od + os_, reg, EXPERT, [TOWER] * 2), rd, rs, os_, reg
    if name == "MMOE":
        return R.MMOE(rd + rs, reg, 3, EXPERT, [TOWER] * 2), MMOE(od + os_, reg, 3, EXPERT, [TOWER] * 2), rd, rs, os_, reg
    if name == "PLE":
        t = cls2 + ["regression"]
        return R.PLE(rd + rs, t, 2, 2, 1, EXPERT, [TOWER] * 3), PLE(od + os_, t, 2, 2, 1, EXPERT, [TOWER] * 3), rd, rs, os_, t
    if name == "AITM":
        return R.AITM(rd + rs, 3, EXPERT, [TOWER] * 3), AITM(od + os_, 3, EXPERT, [TOWER] * 3), rd, rs, os_, ["classification"] * 3
    if name == "ESMM":
        return R.ESMM(rs[:3], rs[3:], EXPERT, TOWER), ESMM(os_[:3], os_[3:], EXPERT, TOWER), rd, rs, os_, ["classification"] * 3
    raise KeyError(name)


@pytest.mark.parametrize("name", ["SharedBottom", "MMOE", "PLE", "AITM", "ESMM"])
def test_equals_reference_with_same_weights(name):
    ref, ours, rd, rs, sparse, task_types = _pair(name)
    _copy_weights(ours, ref, sparse)
    ref.eval(), ours.eval()
    x = _batch(rd, rs, n=64)
    got, want = ours(x), ref(x)
    for i, t in enumerate(task_types):
        mine = torch.sigmoid(got[:, i]) if t == "classification" else got[:, i]
        torch.testing.assert_close(mine, want[:, i], atol=1e-6, rtol=1e-5)
    if name == "AITM":  # the reference trains AITM on the task losses alone; so do ours by default
        assert ours.auxiliary_loss(got) is None
