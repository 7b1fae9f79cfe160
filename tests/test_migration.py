"""A Torch-RecHub script moves over by changing its imports: the pieces its examples use.

Each test runs what the reference's example scripts call and compares with the reference
(torch-rechub 0.9.0, skipped when absent) or with the formula it implements.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import quiet_trainer_kwargs
from rechub_lightning import CTRTrainer, DenseFeature, MatchTrainer, MTLTrainer, SparseFeature
from rechub_lightning.data import DataGenerator, MatchDataGenerator, PredictDataset, TorchDataset, array_replace_with_dict
from rechub_lightning.metrics import BinaryAUC, auc_score, gauc_score, topk_metrics
from rechub_lightning.models.matching import DSSM
from rechub_lightning.models.multi_task import MMOE
from rechub_lightning.models.ranking import DeepFM

FEATS = [SparseFeature("a", 10, embed_dim=4), SparseFeature("b", 12, embed_dim=4)]


def ctr_columns(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = {"a": rng.integers(0, 10, n), "b": rng.integers(0, 12, n), "d": rng.random(n).astype("float32")}
    y = ((x["a"] > 4) ^ (rng.random(n) < 0.2)).astype("float32")
    return x, y


# ----------------------------------------------------------------------------- metrics
def test_topk_metrics_takes_the_reference_call():
    """topk_metrics(y_true, y_pred, topKs) with {user: items} dicts: the reference's numbers
    (except Hit, documented: any hit here, hits / relevant there)."""
    gt = {10: [1, 2], 20: [3], 30: [9]}
    pred = {30: np.array([4, 5, 6]), 10: np.array([1, 5, 6]), 20: np.array([7, 8, 3])}
    ours = topk_metrics(gt, pred, [3])
    assert ours == topk_metrics(y_true=gt, y_pred=pred, topKs=[3])
    # by hand: recall (1/2 + 1 + 0) / 3; mrr (1 + 1/3 + 0) / 3; hitrate 2 of 3 users
    assert ours["recall@3"] == pytest.approx(0.5)
    assert ours["mrr@3"] == pytest.approx(4 / 9)
    assert ours["hitrate@3"] == pytest.approx(2 / 3)
    # the tensor form, users in y_true's order
    tensor_form = topk_metrics([[1, 5, 6], [7, 8, 3], [4, 5, 6]], [[1, 2], [3], [9]], ks=[3])
    assert ours == tensor_form
    ref = pytest.importorskip("torch_rechub.basic.metric")
    expected = ref.topk_metrics(gt, pred, [3])
    for ours_key, ref_key in (("recall@3", "Recall"), ("ndcg@3", "NDCG"), ("mrr@3", "MRR"), ("precision@3", "Precision")):
        assert ours[ours_key] == pytest.approx(float(expected[ref_key][0].split(": ")[1]), abs=1e-4)
    with pytest.raises(KeyError, match="user 10"):
        topk_metrics(gt, {20: [1], 30: [2]}, [1])


def test_auc_of_nan_scores_is_nan_not_a_number_from_the_order():
    target = torch.tensor([0, 1, 0, 1, 1, 0])
    nan = torch.full((6,), float("nan"))
    assert torch.isnan(auc_score(nan, target))
    assert torch.isnan(gauc_score(nan, target, torch.tensor([0, 0, 0, 1, 1, 1])))
    for metric in (BinaryAUC(), BinaryAUC(thresholds=10)):
        metric.update(torch.tensor([0.1, 0.9, 0.2]), torch.tensor([0, 1, 0]))
        metric.update(torch.tensor([float("nan"), 0.3]), torch.tensor([1, 0]))
        with pytest.warns(UserWarning, match="NaN"):
            assert torch.isnan(metric.compute())


# ----------------------------------------------------------------------------- data helpers
def test_reference_datasets_and_helpers():
    x, y = ctr_columns(7)
    row_loader = DataLoader(TorchDataset(x, y), batch_size=4)
    xb, yb = next(iter(row_loader))
    torch.testing.assert_close(xb["a"], torch.as_tensor(x["a"][:4]))
    torch.testing.assert_close(yb, torch.as_tensor(y[:4]))
    only_x = next(iter(DataLoader(PredictDataset(x), batch_size=5)))
    assert set(only_x) == {"a", "b", "d"} and only_x["b"].shape == (5,)

    values = np.array([[3, 1], [2, 3]])
    mapping = {1: 10, 2: 20, 3: 30}
    np.testing.assert_array_equal(array_replace_with_dict(values, mapping), [[30, 10], [20, 30]])
    with pytest.raises(KeyError, match="4"):  # the reference maps a missing key to another key's value
        array_replace_with_dict(np.array([4]), mapping)
    ref = pytest.importorskip("torch_rechub.utils.data")
    np.testing.assert_array_equal(array_replace_with_dict(values, mapping), ref.array_replace_with_dict(values, mapping))


# ----------------------------------------------------------------------------- trainers
def test_trainers_export_onnx_like_the_reference(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    x, y = ctr_columns()
    model = DeepFM(FEATS + [DenseFeature("d")], FEATS, {"dims": [8]})
    trainer = CTRTrainer(model, n_epoch=1, model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs())
    assert trainer.export_onnx(str(tmp_path / "deepfm.onnx")) is True
    sess = ort.InferenceSession(str(tmp_path / "deepfm.onnx"))
    feed = {"a": x["a"][:5].astype(np.int64), "b": x["b"][:5].astype(np.int64), "d": x["d"][:5]}
    got = sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})[0].reshape(-1)
    expected = trainer.predict(model, DataLoader(PredictDataset({k: v[:5] for k, v in x.items()}), batch_size=5))
    np.testing.assert_allclose(got, expected, atol=1e-5)

    mtl = MMOE(FEATS, ["classification", "classification"], 2, {"dims": [8]}, [{"dims": [4]}] * 2)
    assert MTLTrainer(mtl, ["classification"] * 2, model_path=str(tmp_path)).export_onnx(str(tmp_path / "mmoe.onnx"))

    user, item = SparseFeature("user_id", 5, embed_dim=8), SparseFeature("item_id", 7, embed_dim=8)
    dssm = DSSM([user], [item], {"dims": [8]}, {"dims": [8]})
    match = MatchTrainer(dssm, mode=0, model_path=str(tmp_path))
    assert match.export_onnx(str(tmp_path / "user.onnx"), "user")  # the reference's order: mode second
    sess = ort.InferenceSession(str(tmp_path / "user.onnx"))
    assert [i.name for i in sess.get_inputs()] == ["user_id"]
    dssm.eval()
    dssm.mode = "user"
    expected = dssm({"user_id": torch.arange(5)}).detach().numpy()
    dssm.mode = None
    np.testing.assert_allclose(sess.run(None, {"user_id": np.arange(5)})[0], expected, atol=1e-5)


def test_reference_esmm_object_trains_ctr_and_ctcvr_only(tmp_path):
    """The reference's trainer recognises its ESMM by class; so does ours (it has no task attributes)."""
    mt = pytest.importorskip("torch_rechub.models.multi_task")
    feats = pytest.importorskip("torch_rechub.basic.features")
    user = [feats.SparseFeature("u", 6, embed_dim=4)]
    item = [feats.SparseFeature("i", 6, embed_dim=4)]
    model = mt.ESMM(user, item, {"dims": [8]}, {"dims": [8]})
    trainer = MTLTrainer(model, ["classification"] * 3, model_path=str(tmp_path))
    assert trainer.module.trained_tasks == (1, 2)
    assert trainer.module.conditional_tasks == {0: 1}  # CVR scored on clicked rows


def test_reference_session_models_train_with_dense_embeddings_by_default(tmp_path):
    """Torch-RecHub's NARM reads its item table's .weight directly: SparseAdam could not
    update it, so foreign models keep dense gradients unless sparse ones are asked for."""
    matching = pytest.importorskip("torch_rechub.models.matching")
    feats = pytest.importorskip("torch_rechub.basic.features")
    seq = feats.SequenceFeature("hist", vocab_size=20, embed_dim=8, pooling="concat")
    model = matching.NARM(seq, 8, 0.25, 0.5)
    rng = np.random.default_rng(0)
    x = {"hist": rng.integers(1, 20, (64, 5)), "target": rng.integers(1, 20, 64)}
    loader, _, _ = MatchDataGenerator(x, np.zeros(64, dtype="float32")).generate_dataloader(
        {"hist": x["hist"][:4]}, {"target": np.arange(20)}, batch_size=16)
    trainer = MatchTrainer(model, mode=2, n_epoch=1, model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs())
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(loader)
    assert not trainer.module.sparse_embeddings
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()) if p.requires_grad)


def test_one_gpu_id_with_a_cpu_device_trains_on_the_cpu(tmp_path):
    """The reference's examples pass gpus=[0] with device="cpu"; the reference ignores the list."""
    x, y = ctr_columns()
    train, val, _ = DataGenerator(x, y, seed=0).generate_dataloader(split_ratio=[0.8, 0.1], batch_size=64)
    model = DeepFM(FEATS + [DenseFeature("d")], FEATS, {"dims": [8]})
    trainer = CTRTrainer(model, n_epoch=1, device="cpu", gpus=[0], model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs())
    trainer.fit(train, val)
    assert trainer.trainer.strategy.root_device.type == "cpu"


def test_model_logger_gets_per_epoch_metrics_at_the_epoch(tmp_path):
    """The reference's trainers call log_metrics({"train/loss": ...}, step=epoch) once per epoch."""

    class Recorder:
        def __init__(self):
            self.calls, self.hparams, self.finished = [], None, False

        def log_hyperparams(self, params):
            self.hparams = params

        def log_metrics(self, metrics, step):
            self.calls.append((step, dict(metrics)))

        def finish(self):
            self.finished = True

    x, y = ctr_columns(600)
    train, val, _ = DataGenerator(x, y, seed=0).generate_dataloader(split_ratio=[0.8, 0.1], batch_size=32)
    rec = Recorder()
    model = DeepFM(FEATS + [DenseFeature("d")], FEATS, {"dims": [8]})
    CTRTrainer(model, n_epoch=2, model_path=str(tmp_path), model_logger=rec,
               trainer_kwargs={k: v for k, v in quiet_trainer_kwargs().items() if k != "logger"}).fit(train, val)
    steps = sorted({step for step, _ in rec.calls})
    assert steps == [0, 1]
    for epoch in steps:
        keys = set().union(*(m for s, m in rec.calls if s == epoch))
        assert {"train/loss", "val/auc", "learning_rate"} <= keys
        assert not any(k.endswith(("_step", "_epoch")) for k in keys)
    assert rec.hparams is not None and rec.finished


def test_reference_vector_engines_return_the_exact_neighbours():
    """movielens_utils.match_evaluation's Annoy(n_trees=10).fit(items).query(user, k) and the
    Faiss engine: same call and result format, exact neighbours (brute force in numpy)."""
    from rechub_lightning.retrieval import Annoy, Faiss

    rng = np.random.default_rng(0)
    items = rng.normal(size=(60, 8)).astype("float32")
    users = rng.normal(size=(3, 8)).astype("float32")
    cos = (items @ users.T) / np.linalg.norm(items, axis=1)[:, None] / np.linalg.norm(users, axis=1)
    sq = ((items[:, None, :] - users[None]) ** 2).sum(-1)
    annoy = Annoy(n_trees=10)
    annoy.fit(items)
    annoy.set_query_arguments(search_k=100)
    for u in range(3):
        rows, dist = annoy.query(users[u], 7)
        assert rows == np.argsort(-cos[:, u], kind="stable")[:7].tolist()
        np.testing.assert_allclose(dist, np.sqrt(2 - 2 * cos[rows, u]), atol=1e-5)
    euclid = Annoy(metric="euclidean")
    euclid.fit(items)
    rows, dist = euclid.query(users[0], 4)
    assert rows == np.argsort(sq[:, 0], kind="stable")[:4].tolist()
    np.testing.assert_allclose(dist, np.sqrt(sq[rows, 0]), rtol=1e-4)
    flat = Faiss(dim=8, index_type="flat", metric="l2")
    flat.fit(items)
    rows, dist = flat.query(torch.as_tensor(users), 5)  # tensors too, one row per query
    assert rows == [np.argsort(sq[:, u], kind="stable")[:5].tolist() for u in range(3)]
    np.testing.assert_allclose(dist, [sq[r, u] for u, r in enumerate(rows)], rtol=1e-4)
    ip = Faiss(dim=8, metric="ip")
    ip.fit(items)
    assert ip.query(users[1], 3)[0] == [np.argsort(-(items @ users[1]), kind="stable")[:3].tolist()]
    with pytest.raises(ValueError, match="metric"):
        Annoy(metric="hamming")
    with pytest.raises(ValueError, match="dim"):
        flat.query(users[:, :4], 2)


def test_whole_float_ids_train_like_integers_and_stay_exact(tmp_path):
    """pandas turns an id column float64 after fillna; the reference casts with .long(). Whole
    float ids are ids here too, exact beyond float32's 2**24."""
    from rechub_lightning.data import TensorDictDataset

    big = np.array([2.0**31 + 1, 3.0, 0.0])
    ds = TensorDictDataset({"id": big, "d": np.array([0.5, 1.0, 2.0]), "count": np.array([1.0, 0.0, 7.0])})
    assert ds.x["id"].dtype == torch.int64 and ds.x["id"][0].item() == 2**31 + 1
    assert ds.x["d"].dtype == torch.float32  # fractional: a dense column
    x, y = ctr_columns()
    as_float = {k: (v.astype("float64") if k in ("a", "b") else v) for k, v in x.items()}
    results = []
    for columns in (x, as_float):
        torch.manual_seed(0)
        train, val, _ = DataGenerator(columns, y, seed=0).generate_dataloader(split_ratio=[0.8, 0.1], batch_size=64)
        model = DeepFM(FEATS + [DenseFeature("d")], FEATS, {"dims": [8]})
        trainer = CTRTrainer(model, n_epoch=1, model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs())
        trainer.fit(train, val)
        results.append(trainer.evaluate(model, val))
    assert results[0] == results[1]


def test_a_monitored_score_that_is_never_finite_is_reported(tmp_path):
    """Torch-RecHub's census example early-stops ESMM on task 0 (CVR), whose AUC over clicked
    rows is undefined when they hold one class: the restored weights were not chosen by it."""
    from rechub_lightning.models.multi_task import ESMM

    rng = np.random.default_rng(0)
    n = 400
    x = {"a": rng.integers(0, 10, n), "b": rng.integers(0, 12, n)}
    click = (rng.random(n) < 0.5).astype("float32")
    buy = np.zeros(n, dtype="float32")  # no conversion at all: CVR AUC is undefined
    y = np.stack([buy, click, click * buy], axis=1)
    train, val, _ = DataGenerator(x, y, seed=0).generate_dataloader(split_ratio=[0.8, 0.1], batch_size=64)
    model = ESMM([FEATS[0]], [FEATS[1]], {"dims": [8]}, {"dims": [8]})
    trainer = MTLTrainer(model, ["classification"] * 3, n_epoch=2, model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs())
    with pytest.warns(UserWarning, match="never a finite number"):
        trainer.fit(train, val)


def test_evaluate_returns_the_auc_in_double_precision(tmp_path):
    """The reference returns sklearn's float64 AUC (0.45, not 0.44999998807907104)."""
    from sklearn.metrics import roc_auc_score

    x, y = ctr_columns(77, seed=3)
    model = DeepFM(FEATS + [DenseFeature("d")], FEATS, {"dims": [8]})
    trainer = CTRTrainer(model, model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs())
    loader = DataLoader(TorchDataset(x, y), batch_size=16)
    preds = np.asarray(trainer.predict(model, DataLoader(PredictDataset(x), batch_size=16)))
    assert trainer.evaluate(model, loader) == pytest.approx(roc_auc_score(y, preds), abs=1e-12)


def test_prediction_data_needs_only_what_the_model_reads_outside_training(tmp_path):
    """DIEN's negative histories feed its auxiliary training loss only: prediction rows may
    come without them, while a training loader without them is an error before any step."""
    from rechub_lightning import SequenceFeature
    from rechub_lightning.models.ranking import DIEN

    item = SparseFeature("item_id", 20, embed_dim=4, padding_idx=0)
    hist = SequenceFeature("hist_item_id", 20, embed_dim=4, pooling="concat", shared_with="item_id", padding_idx=0)
    neg = SequenceFeature("neg_hist_item_id", 20, embed_dim=4, pooling="concat", shared_with="item_id", padding_idx=0)
    rng = np.random.default_rng(0)
    n = 128
    x = {"item_id": rng.integers(1, 20, n), "hist_item_id": rng.integers(1, 20, (n, 5)), "neg_hist_item_id": rng.integers(1, 20, (n, 5))}
    y = (rng.random(n) < 0.5).astype("float32")
    model = DIEN([], [hist], [neg], [item], {"dims": [8]})
    trainer = CTRTrainer(model, n_epoch=1, loss_mode=False, model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs())
    without_neg = {k: v for k, v in x.items() if k != "neg_hist_item_id"}
    with pytest.raises(KeyError, match="neg_hist_item_id"):
        trainer.fit(DataGenerator(without_neg, y, seed=0).generate_dataloader(split_ratio=[0.8, 0.1], batch_size=32)[0])
    trainer.fit(DataGenerator(x, y, seed=0).generate_dataloader(split_ratio=[0.8, 0.1], batch_size=32)[0])
    preds = trainer.predict(model, DataLoader(PredictDataset(without_neg), batch_size=32))
    assert len(preds) == n and all(0.0 < p < 1.0 for p in preds)


def test_gauc_score_takes_the_reference_keywords():
    """gauc_score(y_true=, y_pred=, users=, weights=None): the reference's value (groups with
    both classes; here every user has both) as a float, string user ids included."""
    rng = np.random.default_rng(0)
    n = 300
    users = rng.choice(["ann", "bob", "cy", "dee"], n)
    y = rng.integers(0, 2, n)
    p = rng.random(n)
    weights = {"ann": 1.0, "bob": 2.0, "cy": 0.5, "dee": 3.0}
    got = gauc_score(y_true=y, y_pred=p, users=users)
    got_w = gauc_score(y_true=y, y_pred=p, users=users, weights=weights)
    assert isinstance(got, float)
    from sklearn.metrics import roc_auc_score

    per_user = {u: roc_auc_score(y[users == u], p[users == u]) for u in weights}
    counts = {u: int((users == u).sum()) for u in weights}
    assert got == pytest.approx(sum(per_user[u] * counts[u] for u in weights) / n, abs=1e-12)
    assert got_w == pytest.approx(sum(per_user[u] * weights[u] for u in weights) / sum(weights.values()), abs=1e-12)
    ref = pytest.importorskip("torch_rechub.basic.metric")
    assert got == pytest.approx(ref.gauc_score(y, p, users), abs=1e-12)
    assert got_w == pytest.approx(ref.gauc_score(y, p, users, weights), abs=1e-12)


def test_columns_the_model_does_not_read_may_hold_anything(tmp_path):
    """A reference-style dataset can carry extra columns (raw strings, say) next to the features;
    the up-front check converts only what the model reads."""

    class RowDataset(torch.utils.data.Dataset):  # the reference's TorchDataset, verbatim in shape
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.x.items() if k != "title"}, self.y[i]

        def __len__(self):
            return len(self.y)

    x, y = ctr_columns(64)
    x["title"] = np.array(["some text"] * 64)
    model = DeepFM(FEATS + [DenseFeature("d")], FEATS, {"dims": [8]})
    trainer = CTRTrainer(model, model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs())
    assert 0.0 <= trainer.evaluate(model, DataLoader(RowDataset(x, y), batch_size=16)) <= 1.0
    bad = dict(x, a=np.where(np.arange(64) == 5, 10, x["a"]))
    with pytest.raises(ValueError, match="'a' in evaluation data has id 10"):
        trainer.evaluate(model, DataLoader(RowDataset(bad, y), batch_size=16))


# ----------------------------------------------------------------------------- hand-written loops
def test_early_stopper_decides_as_torch_rechub_and_keeps_the_best_weights():
    from rechub_lightning.callbacks import EarlyStopper

    scores = [0.61, 0.65, 0.64, 0.66, 0.66, 0.63, 0.62, 0.67]
    model = torch.nn.Linear(3, 1)
    ours, decisions = EarlyStopper(patience=2), []
    for s in scores:
        with torch.no_grad():
            model.weight.fill_(s)  # weights that record the score they were measured with
        decisions.append(ours.stop_training(s, model.state_dict()))
        if decisions[-1]:
            break
    # by hand: best 0.61, 0.65, (0.64: 1), 0.66, (0.66 equal: 1), (0.63: stop)
    assert decisions == [False, False, False, False, False, True]
    assert ours.best_auc == 0.66 and float(ours.best_weights["weight"][0, 0]) == pytest.approx(0.66)
    with torch.no_grad():
        model.weight.zero_()
    assert float(ours.best_weights["weight"][0, 0]) == pytest.approx(0.66)  # a copy, not a view
    low = EarlyStopper(patience=1, mode="min")
    assert [low.stop_training(v, {}) for v in (0.5, 0.4, float("nan"))] == [False, False, True]  # NaN never improves
    with pytest.raises(ValueError, match="mode"):
        EarlyStopper(2, mode="auc")
    ref = pytest.importorskip("torch_rechub.basic.callback")
    theirs = ref.EarlyStopper(patience=2)
    assert [theirs.stop_training(s, {}) for s in scores[:6]] == decisions


def test_prediction_reads_no_labels_of_a_reference_style_dataset(tmp_path):
    """Prediction checks features only: labels it never reads (here raw strings) are not converted."""
    x, _ = ctr_columns(40)
    feats = [SparseFeature("a", 10, embed_dim=4), SparseFeature("b", 12, embed_dim=4)]
    model = DeepFM(feats + [DenseFeature("d")], feats, {"dims": [8]})
    trainer = CTRTrainer(model, model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs())

    class RowDataset(torch.utils.data.Dataset):  # Torch-RecHub's TorchDataset: arrays kept as given
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.x.items()}, self.y[i]

        def __len__(self):
            return len(self.y)

    raw = np.array(["click", "no click"] * 20, dtype=object)
    preds = trainer.predict(model, DataLoader(RowDataset(x, raw), batch_size=16))
    assert len(preds) == 40
    bad = dict(x, a=np.where(np.arange(40) == 3, 10, x["a"]))  # the features are still checked
    with pytest.raises(ValueError, match="'a' in prediction data has id 10"):
        trainer.predict(model, DataLoader(RowDataset(bad, raw), batch_size=16))


def test_topk_metrics_takes_raw_string_ids_like_the_reference():
    y_true = {"u1": ["tt01", "tt02"], "u2": ["tt03"], "u3": ["tt09"]}
    y_pred = {"u1": ["tt01", "tt05", "tt06"], "u2": ["tt07", "tt08", "tt03"], "u3": ["tt04", "tt05", "tt06"]}
    coded = {"tt01": 1, "tt02": 2, "tt03": 3, "tt04": 4, "tt05": 5, "tt06": 6, "tt07": 7, "tt08": 8, "tt09": 9}
    as_ints = topk_metrics({u: [coded[i] for i in v] for u, v in y_true.items()},
                           {u: [coded[i] for i in v] for u, v in y_pred.items()}, [1, 3])
    assert topk_metrics(y_true, y_pred, [1, 3]) == as_ints
    with pytest.raises(ValueError, match="integer item ids"):
        topk_metrics([["a", "b"]], [["a"]], ks=[1])
    ref = pytest.importorskip("torch_rechub.basic.metric")
    expected = ref.topk_metrics(y_true, y_pred, [3])
    assert as_ints["recall@3"] == pytest.approx(float(expected["Recall"][0].split(": ")[1]), abs=1e-4)


def _pad_collate(batch):
    hist = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(b[0]["hist_item_id"]) for b in batch], batch_first=True)
    return {"hist_item_id": hist}, torch.stack([torch.as_tensor(b[1]) for b in batch]).long()


SESSIONS = {"hist_item_id": [[1], [1, 2], [1, 2, 3], [2, 3], [4, 1, 2, 3], [3]] * 4}
NEXT_ITEM = np.array([2, 3, 4, 4, 1, 2] * 4)


def test_histories_of_different_lengths_stay_rows_for_a_padding_collate_fn_like_the_reference():
    """Torch-RecHub's session-based example (run_sbr.py) keeps raw histories in TorchDataset and
    pads them per batch in its collate_fn; ours does the same, and the batched path says why not."""
    from rechub_lightning.data import make_dataloader
    from rechub_lightning.data.datasets import RaggedColumnError, to_tensor

    ours = [b for b in DataLoader(TorchDataset(SESSIONS, NEXT_ITEM), batch_size=5, collate_fn=_pad_collate)]
    assert [tuple(b[0]["hist_item_id"].shape) for b in ours[:2]] == [(5, 4), (5, 3)]
    assert ours[0][0]["hist_item_id"][2].tolist() == [1, 2, 3, 0] and ours[0][1].tolist() == [2, 3, 4, 4, 1]
    ref = pytest.importorskip("torch_rechub.utils.data")
    theirs = list(DataLoader(ref.TorchDataset(SESSIONS, NEXT_ITEM), batch_size=5, collate_fn=_pad_collate))
    assert all(torch.equal(a[0]["hist_item_id"], b[0]["hist_item_id"]) and torch.equal(a[1], b[1]) for a, b in zip(ours, theirs))
    with pytest.raises(RaggedColumnError, match=r"'hist_item_id'.*different lengths \(1 to 4\)"):
        make_dataloader(TorchDataset(SESSIONS, NEXT_ITEM), batch_size=5)
    copy = __import__("pickle").loads(__import__("pickle").dumps(TorchDataset(SESSIONS, NEXT_ITEM)))  # worker copies
    with pytest.raises(RaggedColumnError, match=r"'hist_item_id'.*\(1 to 4\)"):
        copy.check_batched()
    with pytest.raises(RaggedColumnError, match="'h'"):
        to_tensor(__import__("pandas").Series([[1, 2], [3]]), "h")


def test_session_model_trains_on_ragged_histories_and_their_ids_are_checked(tmp_path):
    from rechub_lightning import SequenceFeature
    from rechub_lightning.models.matching import NARM

    def trainer_and_model():
        torch.manual_seed(0)
        model = NARM(SequenceFeature("hist_item_id", vocab_size=5, embed_dim=8, pooling="concat"), 8, 0.0, 0.0)
        return MatchTrainer(model, mode=2, n_epoch=2, model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs()), model

    trainer, model = trainer_and_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(DataLoader(TorchDataset(SESSIONS, NEXT_ITEM), batch_size=6, shuffle=True, collate_fn=_pad_collate))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    bad = {"hist_item_id": SESSIONS["hist_item_id"][:-1] + [[2, 5]]}  # id 5 in a vocabulary of 5
    trainer, model = trainer_and_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sequence feature 'hist_item_id' in training data has id 5"):
        trainer.fit(DataLoader(TorchDataset(bad, NEXT_ITEM), batch_size=6, collate_fn=_pad_collate))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any step


def test_callbacks_in_trainer_kwargs_join_early_stopping_and_best_weights(tmp_path):
    """``trainer_kwargs={"callbacks": [...]}`` adds the user's callbacks: early stopping and the
    best-weight restore keep working (they replaced them, and fit then failed on the missing
    score); a user's own ModelCheckpoint takes the place of the trainer's."""
    from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

    class Steps(Callback):
        def __init__(self):
            self.n = 0

        def on_train_batch_end(self, *args):
            self.n += 1

    x, y = ctr_columns(600)
    train, val, _ = DataGenerator(x, y, seed=0).generate_dataloader(split_ratio=[0.7, 0.3], batch_size=64)

    def run(callbacks, path):
        torch.manual_seed(0)
        model = DeepFM(FEATS + [DenseFeature("d")], FEATS, {"dims": [8]})
        kw = quiet_trainer_kwargs(callbacks=callbacks)
        trainer = CTRTrainer(model, n_epoch=6, earlystop_patience=1, model_path=str(path), trainer_kwargs=kw)
        trainer.fit(train, val)
        return trainer, model

    steps = Steps()
    trainer, model = run([steps], tmp_path / "a")
    kinds = [type(c) for c in trainer.trainer.callbacks]
    assert Steps in kinds and EarlyStopping in kinds and kinds.count(ModelCheckpoint) == 1
    ckpt = trainer.trainer.checkpoint_callback
    assert ckpt.monitor == "val/auc" and steps.n == trainer.trainer.global_step
    best = torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]
    assert all(torch.equal(v, best[f"model.{k}"]) for k, v in model.state_dict().items())  # best weights restored
    # the same fit without the user's callback: identical steps and weights
    plain, plain_model = run([], tmp_path / "b")
    assert plain.trainer.global_step == trainer.trainer.global_step
    assert all(torch.equal(v, plain_model.state_dict()[k]) for k, v in model.state_dict().items())

    # a user's ModelCheckpoint replaces the trainer's: monitoring the validation loss, or nothing
    own = ModelCheckpoint(dirpath=str(tmp_path / "own"), monitor="val/logloss", mode="min")
    trainer, _ = run([own], tmp_path / "c")
    assert [c for c in trainer.trainer.callbacks if isinstance(c, ModelCheckpoint)] == [own]
    assert trainer.trainer.checkpoint_callback.best_model_score is not None
    last = ModelCheckpoint(dirpath=str(tmp_path / "last"))
    trainer, model = run([last], tmp_path / "d")  # no monitor: the model keeps its last weights
    saved = torch.load(last.best_model_path, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[f"model.{k}"]) for k, v in model.state_dict().items())


def test_list_wise_test_rows_with_a_scalar_neg_items_column_embed_and_evaluate(tmp_path):
    """The reference's list-wise flow (``generate_seq_feature_match(mode=2)`` -> ``gen_model_input``)
    leaves one id under ``neg_items`` in the test rows; the user tower never reads it, so
    ``inference_embedding`` and ``evaluate`` check only the towers' features (they refused the
    column as a malformed sequence). A bad id in a tower feature is still refused."""
    from sklearn.preprocessing import LabelEncoder

    from rechub_lightning import SequenceFeature
    from rechub_lightning.data import df_to_dict, gen_model_input, generate_seq_feature_match, make_movielens_like
    from rechub_lightning.models.matching import YoutubeDNN

    df = make_movielens_like(n_users=40, n_items=80, interactions_per_user=(8, 12)).ratings
    vocab = {}
    for f in ("user_id", "movie_id", "gender"):
        df[f] = LabelEncoder().fit_transform(df[f]) + 1
        vocab[f] = int(df[f].max()) + 1
    users, items = df[["user_id", "gender"]].drop_duplicates("user_id"), df[["movie_id"]].drop_duplicates("movie_id")
    train, test = generate_seq_feature_match(df, "user_id", "movie_id", time_col="timestamp", item_attribute_cols=[],
                                             sample_method=1, mode=2, neg_ratio=3, min_item=0)
    x_train = gen_model_input(train, users, "user_id", items, "movie_id", seq_max_len=20)
    x_test = gen_model_input(test, users, "user_id", items, "movie_id", seq_max_len=20)
    assert np.ndim(x_test["neg_items"]) == 1  # the reference's shape: one id per test row
    user_feats = [SparseFeature("user_id", vocab["user_id"], 8), SparseFeature("gender", vocab["gender"], 8),
                  SequenceFeature("hist_movie_id", vocab["movie_id"], 8, pooling="mean", shared_with="movie_id")]
    item_feats = [SparseFeature("movie_id", vocab["movie_id"], 8)]
    neg = [SequenceFeature("neg_items", vocab["movie_id"], 8, pooling="concat", shared_with="movie_id")]
    corpus = df_to_dict(items)
    train_dl, test_dl, item_dl = MatchDataGenerator(x_train, np.zeros(len(train))).generate_dataloader(x_test, corpus, batch_size=32)
    model = YoutubeDNN(user_feats, item_feats, neg, user_params={"dims": [8]}, temperature=0.2)
    trainer = MatchTrainer(model, mode=2, n_epoch=1, model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs())
    trainer.fit(train_dl)
    user_emb = trainer.inference_embedding(model, "user", test_dl, str(tmp_path))
    item_emb = trainer.inference_embedding(model, "item", item_dl, str(tmp_path))
    assert user_emb.shape == (len(test), 8) and item_emb.shape == (len(corpus["movie_id"]), 8)
    truth = torch.as_tensor(x_test["movie_id"])
    metrics = trainer.evaluate(model, test_dl, item_loader=item_dl, ground_truth=list(x_test["movie_id"]), topk=[10])
    top = torch.as_tensor(corpus["movie_id"])[(user_emb @ item_emb.T).topk(10, dim=1).indices]
    assert metrics["recall@10"] == pytest.approx(float((top == truth[:, None]).any(1).float().mean()))
    bad = {**x_test, "gender": np.full(len(test), vocab["gender"] + 3)}
    _, bad_dl, _ = MatchDataGenerator(x_train, np.zeros(len(train))).generate_dataloader(bad, corpus, batch_size=32)
    with pytest.raises(ValueError, match="'gender'"):
        trainer.inference_embedding(model, "user", bad_dl, str(tmp_path))


def test_max_steps_shorter_than_an_epoch_with_the_trainers_early_stopping(tmp_path):
    """``trainer_kwargs={"max_steps": 3}`` ends inside the first epoch, before any validation: the
    trainer's own EarlyStopping checks after validation runs only (it failed at the epoch end on the
    missing val/auc); test_early_stopper_decides_as_torch_rechub_and_keeps_the_best_weights covers the stops."""
    from lightning.pytorch.callbacks import EarlyStopping

    x, y = ctr_columns(600)
    train, val, _ = DataGenerator(x, y, seed=0).generate_dataloader(split_ratio=[0.7, 0.3], batch_size=32)
    model = DeepFM(FEATS + [DenseFeature("d")], FEATS, {"dims": [8]})
    trainer = CTRTrainer(model, n_epoch=3, model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs(max_steps=3))
    trainer.fit(train, val)
    assert trainer.trainer.global_step == 3 and len(train) > 3
    stopper = next(c for c in trainer.trainer.callbacks if isinstance(c, EarlyStopping))
    assert stopper.monitor == "val/auc" and stopper.wait_count == 0


def test_reference_trainer_attributes_read_what_the_run_uses(tmp_path):
    """Scripts read `trainer.optimizer.param_groups[0]["lr"]` (the reference's fit prints it),
    `trainer.scheduler`, `trainer.loss_weight`; they raised AttributeError. Attributes that have no
    counterpart (`criterion`, `evaluate_fn`...) were silently ignored when assigned: now refused."""
    x, y = ctr_columns()
    model = DeepFM(FEATS + [DenseFeature("d")], FEATS, {"dims": [8]})
    trainer = CTRTrainer(model, optimizer_params={"lr": 0.02}, scheduler_fn=torch.optim.lr_scheduler.StepLR,
                         scheduler_params={"step_size": 1, "gamma": 0.5}, n_epoch=2, earlystop_patience=5,
                         model_path=str(tmp_path), trainer_kwargs=quiet_trainer_kwargs())
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    assert trainer.scheduler is None and trainer.early_stopper is None  # nothing run yet
    dl = DataLoader(TorchDataset(x, y), batch_size=64)
    trainer.fit(dl, dl)
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.StepLR)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5**2)  # stepped after each epoch
    assert trainer.early_stopper.wait_count in (0, 1)
    for name in ("criterion", "evaluate_fn", "reg_loss_fn"):
        with pytest.raises(AttributeError, match=name):
            getattr(trainer, name)
        with pytest.raises(AttributeError, match="no effect"):
            setattr(trainer, name, None)
    with pytest.raises(AttributeError, match="optimizer_fn"):
        trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    mtl = MMOE(FEATS, ["classification", "classification"], 2, {"dims": [8]}, [{"dims": [4]}] * 2)
    uwl = MTLTrainer(mtl, ["classification"] * 2, adaptive_params={"method": "uwl"}, model_path=str(tmp_path))
    assert uwl.adaptive_method == "uwl"
    assert uwl.loss_weight is uwl.module.weighting.log_vars and uwl.loss_weight.shape == (2,)
    plain = MTLTrainer(mtl, ["classification"] * 2, model_path=str(tmp_path))
    assert plain.adaptive_method is None and plain.loss_weight is None
    user, item = SparseFeature("user_id", 5, embed_dim=8), SparseFeature("item_id", 7, embed_dim=8)
    match = MatchTrainer(DSSM([user], [item], {"dims": [8]}, {"dims": [8]}), mode=0, in_batch_neg=True, model_path=str(tmp_path))
    assert match.in_batch_neg is True and match.hard_negative is False and match.in_batch_neg_ratio is None


def test_learning_rate_set_on_the_trainers_optimizer_before_fit_is_used(tmp_path):
    """The reference builds its optimizer in __init__, so `trainer.optimizer.param_groups[0]["lr"] = x`
    before fit takes effect there; fit built a fresh optimizer and ignored it."""
    x, y = ctr_columns()
    model = DeepFM(FEATS + [DenseFeature("d")], FEATS, {"dims": [8]})
    trainer = CTRTrainer(model, optimizer_params={"lr": 0.02}, n_epoch=1, model_path=str(tmp_path),
                         trainer_kwargs=quiet_trainer_kwargs())
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.5
    dl = DataLoader(TorchDataset(x, y), batch_size=64)
    trainer.fit(dl, dl)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.5] * len(trainer.optimizer.param_groups))
