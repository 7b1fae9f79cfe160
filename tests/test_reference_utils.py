"""Torch-RecHub 0.9.0 helpers ported by changing imports: multi-task utilities (shared_task_layers,
gradnorm, MetaBalanceOptimizer), in-batch negative sampling, default loss/metric per task type
and create_seq_features, each compared with the reference's own function."""

import copy
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from rechub_lightning.data import create_seq_features
from rechub_lightning.losses import gather_inbatch_logits, get_loss_func, inbatch_negative_sampling
from rechub_lightning.metrics import get_metric_func
from rechub_lightning.models.multi_task import AITM, MMOE, PLE, SharedBottom
from rechub_lightning.weighting import MetaBalanceOptimizer, gradnorm, shared_task_layers

trh = pytest.importorskip("torch_rechub")
from torch_rechub.utils import data as ref_data  # noqa: E402
from torch_rechub.utils import match as ref_match  # noqa: E402
from torch_rechub.utils import mtl as ref_mtl  # noqa: E402

EXPERT = {"dims": [8, 6]}
TOWER = {"dims": [4]}


# ----------------------------------------------------------------------------- shared_task_layers
def _features(mod):
    dense = [mod.DenseFeature(f"d{i}") for i in range(2)]
    sparse = [mod.SparseFeature(f"c{i}", 5 + 3 * i, embed_dim=4) for i in range(4)]
    return dense, sparse


def _model_pair(name):
    """Our model and the reference's of the same class and arguments."""
    from rechub_lightning import features as OF
    from torch_rechub.basic import features as RF
    from torch_rechub.models import multi_task as R

    (od, os_), (rd, rs) = _features(OF), _features(RF)
    types = ["classification", "classification", "regression"]
    if name == "SharedBottom":
        return SharedBottom(od + os_, types, EXPERT, [TOWER] * 3), R.SharedBottom(rd + rs, types, EXPERT, [TOWER] * 3)
    if name == "MMOE":
        return MMOE(od + os_, types, 3, EXPERT, [TOWER] * 3), R.MMOE(rd + rs, types, 3, EXPERT, [TOWER] * 3)
    if name == "PLE":
        return PLE(od + os_, types, 2, 2, 2, EXPERT, [TOWER] * 3), R.PLE(rd + rs, types, 2, 2, 2, EXPERT, [TOWER] * 3)
    return AITM(od + os_, 3, EXPERT, [TOWER] * 3), R.AITM(rd + rs, 3, EXPERT, [TOWER] * 3)


def _role(name):
    """The submodule a parameter belongs to: ``towers.0.mlp.3.bias`` -> ``towers.0``."""
    return name.split(".mlp.")[0] if ".mlp." in name else name.rsplit(".", 1)[0]


def _reach(model, n_task):
    """Parameter id -> the tasks whose output reaches it (non-zero gradient)."""
    from rechub_lightning import features as OF

    dense, sparse = _features(OF)
    x = {f.name: torch.randn(64) for f in dense}
    x.update({f.name: torch.randint(0, f.vocab_size, (64,)) for f in sparse})
    out, params = model(x), list(model.parameters())
    reach = {id(p): set() for p in params}
    for t in range(n_task):
        grads = torch.autograd.grad(out[:, t].sum(), params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None and bool(torch.any(g != 0)):
                reach[id(p)].add(t)
    return reach


@pytest.mark.parametrize("name", ["SharedBottom", "MMOE", "PLE", "AITM"])
def test_shared_task_layers_partition_and_roles_match_the_reference(name):
    torch.manual_seed(0)
    ours, ref = _model_pair(name)
    shared, task = shared_task_layers(ours)
    ids_s, ids_t = [id(p) for p in shared], [id(p) for p in task]
    assert not set(ids_s) & set(ids_t) and len(set(ids_s)) == len(ids_s) and len(set(ids_t)) == len(ids_t)
    assert sorted(ids_s + ids_t) == sorted(id(p) for p in ours.parameters())
    assert {id(p) for p in ours.embedding.parameters()} <= set(ids_s)
    assert {id(p) for p in ours.towers.parameters()} <= set(ids_t)

    ref_shared, ref_task = ref_mtl.shared_task_layers(ref)
    ref_side = {id(p): "shared" for p in ref_shared} | {id(p): "task" for p in ref_task}
    assert all(ref_side[id(p)] == "shared" for p in ref.embedding.parameters())
    ours_named = [(k, p) for k, p in ours.named_parameters() if not k.startswith("embedding.")]
    ref_named = [(k, p) for k, p in ref.named_parameters() if not k.startswith("embedding.")]
    # paired in registration order, as test_models_multi_task copies weights: same submodule, same shape
    assert [_role(k) for k, _ in ours_named] == [_role(k) for k, _ in ref_named]
    assert [p.shape for _, p in ours_named] == [p.shape for _, p in ref_named]
    side = {i: "shared" for i in ids_s} | {i: "task" for i in ids_t}
    differ = [(k, p) for (k, p), (_, q) in zip(ours_named, ref_named) if side[id(p)] != ref_side[id(q)]]
    if name in ("SharedBottom", "MMOE"):
        assert differ == []
        return
    # PLE / AITM: the reference's fixed module lists disagree with the graph; ours follow it.
    expected = {"PLE": ("cgc_layers.0.gates_specific.", "cgc_layers.1.experts_specific.", "cgc_layers.1.gates_specific."),
                "AITM": ("bottoms.2.", "info_gates.0.", "aits.0.")}[name]
    assert differ and all(k.startswith(expected) for k, _ in differ)
    reach = _reach(ours, 3)
    for k, p in differ:
        assert (side[id(p)] == "task") == (len(reach[id(p)]) == 1), (k, reach[id(p)])


def test_shared_task_layers_unwraps_and_rejects_other_models():
    torch.manual_seed(0)
    ours, ref = _model_pair("MMOE")
    want = shared_task_layers(ours)
    for wrapped in (nn.DataParallel(ours), torch.compile(ours)):
        got = shared_task_layers(wrapped)
        assert [id(p) for p in got[0]] == [id(p) for p in want[0]] and [id(p) for p in got[1]] == [id(p) for p in want[1]]
    with pytest.raises(ValueError, match=r"MMOE has no shared_parameters\(\) and no task_parameters\(\)"):
        shared_task_layers(ref)  # a Torch-RecHub model object
    with pytest.raises(ValueError, match="Linear has no shared_parameters"):
        shared_task_layers(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- toy multi-task network
class _Toy(nn.Module):
    """MMOE-like: embedding and experts shared, one gate and tower per task."""

    def __init__(self, n_task=3):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.experts = nn.ModuleList(nn.Linear(6, 5) for _ in range(2))
        self.gates = nn.ModuleList(nn.Linear(6, 2) for _ in range(n_task))
        self.towers = nn.ModuleList(nn.Linear(5, 1) for _ in range(n_task))

    def shared(self):
        return list(self.emb.parameters()) + list(self.experts.parameters())

    def forward(self, x):
        e = self.emb(x).mean(1)
        ex = torch.stack([torch.tanh(m(e)) for m in self.experts], 1)
        mix = [(torch.softmax(g(e), -1).unsqueeze(-1) * ex).sum(1) for g in self.gates]
        return torch.cat([t(h) for t, h in zip(self.towers, mix)], 1)


def _toy_losses(model, x, y, scale):
    out = model(x)
    return [((out[:, i] - y[:, i]) ** 2).mean() * scale[i] for i in range(len(scale))]


# ----------------------------------------------------------------------------- gradnorm
def _gradnorm_run(fn, model, weights, x, y, init_factor, alpha, share):
    losses = _toy_losses(model, x, y, [1.0, 3.0, 0.5])
    init = [loss.item() * f for loss, f in zip(losses, init_factor)]
    fn(losses, weights, share(model), init, alpha)
    return losses, init


def _pair_gradnorm(init_factor, alpha):
    torch.manual_seed(1)
    a = _Toy()
    b = copy.deepcopy(a)
    wa = nn.ParameterList(nn.Parameter(torch.full((1,), v)) for v in (0.6, 1.5, 0.9))
    wb = copy.deepcopy(wa)
    x, y = torch.randint(0, 20, (32, 4)), torch.rand(32, 3)
    losses, init = _gradnorm_run(gradnorm, a, wa, x, y, init_factor, alpha, lambda m: m.experts[1].weight)
    _gradnorm_run(ref_mtl.gradnorm, b, wb, x, y, init_factor, alpha, lambda m: m.experts[1].weight)
    return a, b, wa, wb, losses, init


@pytest.mark.parametrize("init_factor,alpha", [((1.0, 1.0, 1.0), 0.16), ((2.0, 0.5, 1.3), 0.0), ((1.0, 1.0, 1.0), 1.5)])
def test_gradnorm_equals_reference_where_the_targets_agree(init_factor, alpha):
    """Loss ratios all 1 (the first step) or alpha = 0: the reference's target is the paper's."""
    a, b, wa, wb, _, _ = _pair_gradnorm(init_factor, alpha)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for p, q in zip(wa, wb):
        torch.testing.assert_close(p.grad, q.grad)
        assert p.grad.abs().item() > 0


def test_gradnorm_uses_the_papers_per_task_targets():
    init_factor, alpha = (4.0, 0.25, 1.0), 1.0
    a, b, wa, wb, losses, init = _pair_gradnorm(init_factor, alpha)
    for p, q in zip(a.parameters(), b.parameters()):  # model gradients: sum_i w_i L_i, as the reference
        torch.testing.assert_close(p.grad, q.grad)
    # The paper (Chen et al. 2018, eq. 1-2) by hand, on fresh losses of the same weights.
    w_layer = a.experts[1].weight
    g = torch.stack([torch.autograd.grad(loss, w_layer, retain_graph=True)[0].norm() for loss in losses])
    w = torch.tensor([p.item() for p in wa])
    G = w.abs() * g
    ratio = torch.tensor([loss.item() / i0 for loss, i0 in zip(losses, init)])
    target = G.mean() * (ratio / ratio.mean()) ** alpha
    want = torch.sign(G - target) * torch.sign(w) * g
    got = torch.cat([p.grad for p in wa])
    torch.testing.assert_close(got, want)
    ref_target = G.mean() * ratio.mean() ** alpha  # what the reference computes instead: one target for all
    torch.testing.assert_close(torch.cat([p.grad for p in wb]), torch.sign(G - ref_target) * torch.sign(w) * g)
    assert not torch.equal(got, torch.cat([p.grad for p in wb]))


def test_gradnorm_norm_over_every_given_tensor_and_validation():
    torch.manual_seed(2)
    model = _Toy()
    x, y = torch.randint(0, 20, (32, 4)), torch.rand(32, 3)
    weights = nn.ParameterList(nn.Parameter(torch.ones(1)) for _ in range(3))
    results = []
    for share in (model.experts[0].weight, [model.experts[0].weight], model.experts[0], model.experts):
        model.zero_grad()
        losses = _toy_losses(model, x, y, [1.0, 2.0, 3.0])
        results.append(gradnorm(losses, weights, share, [2.0, 1.0, 5.0], 0.5))
    assert torch.equal(results[0], results[1])
    params = list(model.experts.parameters())
    losses = _toy_losses(model, x, y, [1.0, 2.0, 3.0])
    g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, retain_graph=True)]).norm() for loss in losses])
    ratio = torch.tensor([loss.item() for loss in losses]) / torch.tensor([2.0, 1.0, 5.0])
    torch.testing.assert_close(results[3], (g - g.mean() * (ratio / ratio.mean()) ** 0.5).abs().sum())
    assert not torch.allclose(results[2], results[3])

    losses = _toy_losses(model, x, y, [1.0, 2.0, 3.0])
    share = model.experts[0].weight
    with pytest.raises(ValueError, match="same non-zero length"):
        gradnorm(losses, weights[:2], share, [1.0] * 3, 0.1)
    with pytest.raises(ValueError, match="alpha=-0.5"):
        gradnorm(losses, weights, share, [1.0] * 3, -0.5)
    with pytest.raises(ValueError, match=r"initial_task_loss\[1\]=0.0"):
        gradnorm(losses, weights, share, [1.0, 0.0, 1.0], 0.1)
    with pytest.raises(ValueError, match=r"loss_weight\[0\]"):
        gradnorm(losses, [torch.ones(1), *weights[1:]], share, [1.0] * 3, 0.1)
    with pytest.raises(ValueError, match="share_layer"):
        gradnorm(losses, weights, [], [1.0] * 3, 0.1)


# ----------------------------------------------------------------------------- MetaBalanceOptimizer
def test_metabalance_optimizer_writes_the_reference_gradients():
    torch.manual_seed(3)
    a = _Toy()
    b = copy.deepcopy(a)
    meta_a, meta_b = MetaBalanceOptimizer(a.shared(), relax_factor=0.6, beta=0.8), ref_mtl.MetaBalance(b.shared(), 0.6, 0.8)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=1e-4), torch.optim.SGD(b.parameters(), lr=1e-4)
    scale = [100.0, 1000.0, 10.0]  # gradient norms far above the reference's 1e-5 epsilon
    for _ in range(4):
        x, y = torch.randint(0, 20, (32, 4)), torch.rand(32, 3)
        for model, meta, opt in ((a, meta_a, opt_a), (b, meta_b, opt_b)):
            opt.zero_grad()
            before = [p.detach().clone() for p in model.parameters()]
            meta.step(_toy_losses(model, x, y, scale))
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # step only writes .grad
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3 * q.grad.abs().max().item(), msg=name)
        opt_a.step(), opt_b.step()
    # the auxiliary tasks were really rescaled: the shared gradient is not the plain sum
    x, y = torch.randint(0, 20, (32, 4)), torch.rand(32, 3)
    plain = torch.autograd.grad(sum(_toy_losses(a, x, y, scale)), a.emb.weight)[0]
    meta_a.step(_toy_losses(a, x, y, scale))
    assert not torch.allclose(a.emb.weight.grad, plain, rtol=0.05)
    assert all(meta_a.state[p]["norm_ema"].shape == (3,) for p in a.shared())


def test_metabalance_optimizer_skips_a_task_that_misses_a_parameter():
    torch.manual_seed(4)
    model = _Toy()
    extra = nn.Parameter(torch.randn(5))  # shared parameter that only task 2 reaches
    meta = MetaBalanceOptimizer(model.shared() + [extra])
    x, y = torch.randint(0, 20, (16, 4)), torch.rand(16, 3)
    losses = _toy_losses(model, x, y, [1.0, 2.0, 3.0])
    losses[2] = losses[2] + (extra**2).sum()
    meta.step(losses)  # the reference 'break's out of the group here
    torch.testing.assert_close(extra.grad, 2 * extra.detach())  # unscaled: task 0 has no magnitude there
    assert all(p.grad is not None for p in model.parameters())


def test_metabalance_optimizer_validates_like_the_reference():
    p = [nn.Parameter(torch.ones(2))]
    for kwargs, match in (({"relax_factor": 1.0}, "relax_factor=1.0"), ({"relax_factor": -0.1}, "relax_factor=-0.1"),
                          ({"beta": 1.0}, "beta=1.0"), ({"beta": -1}, "beta=-1")):
        with pytest.raises(ValueError, match=match):
            MetaBalanceOptimizer(p, **kwargs)
        with pytest.raises(ValueError):
            ref_mtl.MetaBalance(p, **kwargs)
    with pytest.raises(ValueError, match="losses is empty"):
        MetaBalanceOptimizer(p).step([])


# ----------------------------------------------------------------------------- in-batch negatives
@pytest.mark.parametrize("neg_ratio", [None, 0, -2, 1, 3, 7, 8, 20])
def test_inbatch_hard_negatives_and_logits_equal_reference(neg_ratio):
    torch.manual_seed(5)
    scores = torch.randn(8, 8, requires_grad=True)
    got = inbatch_negative_sampling(scores, neg_ratio, hard_negative=True)
    want = ref_match.inbatch_negative_sampling(scores, neg_ratio, hard_negative=True)
    assert got.shape == want.shape and got.dtype == want.dtype == torch.long
    assert torch.equal(got.sort(1).values, want.sort(1).values)
    logits = gather_inbatch_logits(scores, got)
    assert torch.equal(logits, ref_match.gather_inbatch_logits(scores, got))
    logits.sum().backward()
    assert scores.grad.diagonal().eq(1).all()
    uniform = inbatch_negative_sampling(scores, neg_ratio)
    assert uniform.shape == want.shape


def test_inbatch_uniform_sampling_is_uniform_distinct_and_reproducible():
    b, k, draws = 6, 2, 3000
    scores = torch.randn(b, b)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(b, b)
    for _ in range(draws):
        idx = inbatch_negative_sampling(scores, k, generator=gen)
        assert not (idx == torch.arange(b).unsqueeze(1)).any()
        assert (idx.sort(1).values.diff(dim=1) > 0).all()  # distinct per row
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float))
    assert counts.diagonal().eq(0).all()
    expected = draws * k / (b - 1)  # 1200, std ~ sqrt(3000 * 0.4 * 0.6) ~ 27
    off = counts[~torch.eye(b, dtype=torch.bool)]
    assert (off - expected).abs().max() < 5 * (draws * 0.4 * 0.6) ** 0.5
    chi2 = ((off - expected) ** 2 / expected).sum()
    assert chi2 < 60  # 30 cells (6 row constraints): mean ~ 19, P(chi2 > 60) < 1e-5
    a = inbatch_negative_sampling(scores, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, inbatch_negative_sampling(scores, 3, generator=torch.Generator().manual_seed(7)))
    others = [inbatch_negative_sampling(scores, 3, generator=torch.Generator().manual_seed(s)) for s in range(8, 12)]
    assert any(not torch.equal(a, o) for o in others)


def test_inbatch_hard_negatives_never_return_the_positive_for_inf_scores():
    scores = torch.full((4, 4), float("-inf"))
    scores.fill_diagonal_(0.0)
    idx = inbatch_negative_sampling(scores, 3, hard_negative=True)
    assert not (idx == torch.arange(4).unsqueeze(1)).any()


def test_inbatch_functions_reject_bad_shapes():
    for bad in (torch.randn(4), torch.randn(3, 4), torch.randn(1, 1), torch.randn(2, 2, 2)):
        with pytest.raises(ValueError, match=str(tuple(bad.shape)).replace("(", r"\(").replace(")", r"\)")):
            inbatch_negative_sampling(bad)
    with pytest.raises(ValueError, match=r"\(4, K\)"):
        gather_inbatch_logits(torch.randn(4, 4), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        gather_inbatch_logits(torch.randn(4, 4), torch.zeros(4, 2))


# ----------------------------------------------------------------------------- default loss / metric
def test_get_loss_func_and_get_metric_func():
    from sklearn.metrics import mean_squared_error, roc_auc_score

    assert isinstance(get_loss_func(), nn.BCEWithLogitsLoss) and isinstance(get_loss_func("regression"), nn.MSELoss)
    logits, y = torch.randn(50), torch.randint(0, 2, (50,)).float()
    ref_bce = ref_data.get_loss_func("classification")  # the reference's, on probabilities
    torch.testing.assert_close(get_loss_func("classification")(logits, y), ref_bce(torch.sigmoid(logits), y))
    assert type(get_loss_func("regression")) is type(ref_data.get_loss_func("regression"))

    assert get_metric_func() is roc_auc_score is ref_data.get_metric_func("classification")
    assert get_metric_func("regression") is mean_squared_error is ref_data.get_metric_func("regression")
    yt, ys = np.array([0, 1, 1, 0, 1, 0]), np.array([0.1, 0.8, 0.3, 0.4, 0.9, 0.2])
    assert get_metric_func()(yt, ys) == pytest.approx(8 / 9)
    assert get_metric_func("regression")(yt, ys) == pytest.approx(np.mean((yt - ys) ** 2))
    for fn in (get_loss_func, get_metric_func):
        with pytest.raises(ValueError, match="task_type='ranking'"):
            fn("ranking")


# ----------------------------------------------------------------------------- create_seq_features
def _interactions(seed, n_users=30):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for _ in range(rng.integers(2, 21)):  # some users below drop_short, some above max_len
            rows.append((f"u{u:02d}", int(rng.integers(100, 160)), f"c{rng.integers(0, 6)}", int(rng.integers(0, 50))))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "cate_id", "time"]).sample(frac=1, random_state=seed)


def _keys(frame):
    return frame.apply(lambda r: (r.user_id, tuple(r.history_item), r.target_item, r.label), axis=1)


@pytest.mark.parametrize("shuffle", [False, True])
def test_create_seq_features_equals_reference_without_the_leaked_rows(shuffle):
    raw = _interactions(3)
    d_ref, d_ours = raw.copy(), raw.copy()
    random.seed(11)
    ref = ref_data.create_seq_features(d_ref, max_len=8, drop_short=3, shuffle=shuffle)
    ref_next = random.random()
    random.seed(11)
    ours = create_seq_features(d_ours, max_len=8, drop_short=3, shuffle=shuffle)
    assert random.random() == ref_next  # the global stream consumed exactly as the reference
    pd.testing.assert_frame_equal(d_ours, d_ref)  # label-encoded in place, as the reference
    assert list(ours[0].columns) == list(ref[0].columns)
    pd.testing.assert_frame_equal(ours[1], ref[1])
    pd.testing.assert_frame_equal(ours[2], ref[2])
    test_keys = set(_keys(ref[2]))
    leaked = _keys(ref[0]).isin(test_keys)
    assert leaked.sum() == len(ref[2]) > 0  # the reference's train holds every test row once more
    pd.testing.assert_frame_equal(ours[0], ref[0][~leaked.to_numpy()].reset_index(drop=True))
    assert not _keys(ours[0]).isin(test_keys).any()
    assert not _keys(ours[1]).isin(test_keys).any()

    again = create_seq_features(raw.copy(), max_len=8, drop_short=3, shuffle=shuffle, seed=11)
    for x, y in zip(again, ours):
        pd.testing.assert_frame_equal(x, y)


def test_create_seq_features_inplace_false_and_validation():
    raw = _interactions(4, n_users=8)
    kept = raw.copy()
    train, val, test = create_seq_features(raw, max_len=5, drop_short=0, inplace=False, seed=0)
    pd.testing.assert_frame_equal(raw, kept)
    assert len(test) == 2 * 8 and all(len(h) == 5 for h in train.history_item)
    with pytest.raises(ValueError, match=r"\['cate_id', 'price'\]"):
        create_seq_features(raw.drop(columns="cate_id"), seq_feature_col=["item_id", "price"])
    with pytest.raises(ValueError, match="max_len=0"):
        create_seq_features(raw, max_len=0)
    with pytest.raises(ValueError, match="drop_short=-1"):
        create_seq_features(raw, drop_short=-1)
    few = pd.DataFrame({"user_id": [1, 1, 1, 2], "item_id": [1, 2, 3, 1], "cate_id": 1, "time": [1, 2, 3, 4]})
    with pytest.raises(ValueError, match="all 3 items"):
        create_seq_features(few, drop_short=0, seed=0)


# ----------------------------------------------------------------------------- import weight
def test_new_helpers_import_without_lightning_or_sklearn():
    code = (
        "import sys; import rechub_lightning.losses, rechub_lightning.metrics, rechub_lightning.weighting; "
        "print(sorted(m for m in ('lightning', 'torchmetrics', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
