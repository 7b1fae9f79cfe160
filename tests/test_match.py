"""Matching: MatchModule losses and in-batch sampling, MatchDataModule, exact top-K
evaluation against a brute-force reference, MatchTrainer (reference API), the CLI, and the
acceptance figure (Recall@10 >= 5x random on the synthetic default)."""

from __future__ import annotations

import math
import os

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import quiet_trainer_kwargs
from rechub_lightning._match_trainer import MatchTrainer
from rechub_lightning.data.match import SEEN_ITEMS_KEY, MatchDataModule
from rechub_lightning.losses import masked_fill_value
from rechub_lightning.metrics import topk_metrics
from rechub_lightning.models.base import RecModel
from rechub_lightning.models.matching import DSSM, DSSMSENet, GRU4Rec, NARM, SASRec, STAMP, FaceBookDSSM, YoutubeDNN, YoutubeSBC
from rechub_lightning.modules.match import MatchModule, in_batch_logits

SMALL = dict(synthetic_users=80, synthetic_items=150, synthetic_interactions=(8, 16), seq_max_len=10, batch_size=64, embed_dim=8)
P = {"dims": [16, 8]}


class Towers(RecModel):
    """Fixed towers read from the batch (``u``, ``v``), scaled by one parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.mode = None

    def user_tower(self, x):
        return x["u"] * self.w

    def item_tower(self, x):
        return x["v"] * self.w

    def forward(self, x):
        return (self.user_tower(x) * self.item_tower(x)).sum(-1)


def _tower_batch(b=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"u": torch.randn(b, d, generator=g), "v": torch.randn(b, d, generator=g), "item": torch.arange(b) + 1}


# --------------------------------------------------------------------------- construction errors
def test_rejections_are_clear():
    with pytest.raises(ValueError, match="mode"):
        MatchModule(Towers(), mode=3)
    with pytest.raises(ValueError, match="user_tower.*item_tower.*Linear"):
        MatchModule(nn.Linear(2, 1), in_batch_neg=True)
    with pytest.raises(ValueError, match="in_batch_neg_ratio"):
        MatchModule(Towers(), in_batch_neg=True, in_batch_neg_ratio=0)
    with pytest.raises(ValueError, match="temperature"):
        MatchModule(Towers(), temperature=0.0)
    module = MatchModule(Towers(), in_batch_neg=True, in_batch_neg_ratio=6)
    with pytest.raises(ValueError, match="in_batch_neg_ratio=6 must be smaller than the batch size 6"):
        module.in_batch_loss(_tower_batch(b=6))
    # a smaller final batch after full ones is allowed (surplus slots are masked)
    module = MatchModule(Towers(), in_batch_neg=True, in_batch_neg_ratio=4)
    assert torch.isfinite(module.in_batch_loss(_tower_batch(b=8)))
    assert torch.isfinite(module.in_batch_loss(_tower_batch(b=3)))


def test_ratio_checked_against_datamodule_batch_size_at_fit_start():
    dm = MatchDataModule(mode=0, neg_ratio=0, **{**SMALL, "batch_size": 16})
    model = DSSM(user_params=P, item_params=P, schema=dm.schema)
    module = MatchModule(model, in_batch_neg=True, in_batch_neg_ratio=16)
    with pytest.raises(ValueError, match="batch size 16"):
        L.Trainer(max_epochs=1, **quiet_trainer_kwargs(enable_checkpointing=False)).fit(module, dm)


def test_module_and_datamodule_modes_must_agree():
    dm = MatchDataModule(mode=2, neg_ratio=2, **SMALL)
    module = MatchModule(YoutubeDNN(user_params=P, schema=dm.schema), mode=0)
    with pytest.raises(ValueError, match="mode=0.*mode=2"):
        L.Trainer(max_epochs=1, **quiet_trainer_kwargs(enable_checkpointing=False)).fit(module, dm)


# --------------------------------------------------------------------------- in-batch sampling
@pytest.mark.parametrize("hard", [False, True])
def test_in_batch_sampler_never_returns_the_positive(hard):
    b = 64
    scores = torch.randn(b, b)
    scores.fill_diagonal_(1e4)  # the positive is recognisable (and the hardest candidate)
    ids = torch.randint(0, 20, (b,))  # many accidental hits
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        logits = in_batch_logits(scores, 10, hard_negative=hard, generator=gen, item_ids=ids)
        assert logits.shape == (b, 11)
        assert torch.equal(logits[:, 0], torch.diagonal(scores))
        neg = logits[:, 1:]
        assert not bool((neg == 1e4).any())
        # an accidental hit (same item id) is never a negative: only masked slots or other items
        for i in range(b):
            valid = neg[i][neg[i] > masked_fill_value(neg.dtype)]
            allowed = scores[i][(ids != ids[i])]
            assert all(bool((allowed == v).any()) for v in valid)
            assert len(set(valid.tolist())) == len(valid)  # without replacement
    if hard:  # the hardest valid candidates, in order
        s = scores.masked_fill(torch.eye(b, dtype=torch.bool) | (ids[:, None] == ids[None, :]), float("-inf"))
        expect = s.topk(10, dim=1).values
        torch.testing.assert_close(logits[:, 1:].clamp_min(-1e30), expect.clamp_min(-1e30))


def test_uniform_sampler_is_uniform_and_seeded():
    b, ratio = 8, 3
    scores = torch.zeros(b, b)
    counts = torch.zeros(b)
    scores[0] = torch.arange(b, dtype=torch.float)  # row 0's candidates are identified by their score
    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):
        neg = in_batch_logits(scores, ratio, generator=gen)[0, 1:]
        counts[neg.long()] += 1
    assert counts[0] == 0
    freq = counts[1:] / counts[1:].sum()
    assert torch.allclose(freq, torch.full_like(freq, 1 / 7), atol=0.02)
    a = in_batch_logits(scores, ratio, generator=torch.Generator().manual_seed(5))
    c = in_batch_logits(scores, ratio, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, c)


def test_in_batch_loss_follows_temperature_and_logq_formula():
    x = _tower_batch(b=6)
    log_q = torch.log(torch.tensor([0.5, 0.05, 0.1, 0.15, 0.05, 0.1, 0.05]))
    x["item"] = torch.tensor([1, 2, 3, 2, 5, 6])  # rows 1 and 3 hold the same item
    s = x["u"] @ x["v"].T
    target = torch.arange(6)
    plain = MatchModule(Towers(), in_batch_neg=True)
    torch.testing.assert_close(plain.in_batch_loss(x), F.cross_entropy(s, target))
    tempered = MatchModule(Towers(), in_batch_neg=True, temperature=0.2)
    torch.testing.assert_close(tempered.in_batch_loss(x), F.cross_entropy(s / 0.2, target))
    logq = MatchModule(Towers(), in_batch_neg=True, temperature=0.2, logq_correction=True,
                       item_log_q=log_q.tolist(), item_id_feature="item")
    corrected = s / 0.2 - log_q[x["item"]].unsqueeze(0)
    torch.testing.assert_close(logq.in_batch_loss(x), F.cross_entropy(corrected, target))
    assert not torch.isclose(logq.in_batch_loss(x), tempered.in_batch_loss(x))
    masked = MatchModule(Towers(), in_batch_neg=True, temperature=0.2, logq_correction=True,
                         item_log_q=log_q.tolist(), mask_accidental_hits=True, item_id_feature="item")
    hits = (x["item"][:, None] == x["item"][None, :]) & ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(masked.in_batch_loss(x), F.cross_entropy(corrected.masked_fill(hits, -1e30), target))
    # pair-wise: BPR against the hardest in-batch negative
    bpr = MatchModule(Towers(), mode=1, in_batch_neg=True, in_batch_neg_ratio=1, hard_negative=True, temperature=0.5)
    hardest = (s / 0.5).masked_fill(torch.eye(6, dtype=torch.bool), -1e30).max(dim=1).values
    torch.testing.assert_close(bpr.in_batch_loss(x), F.softplus(hardest - torch.diagonal(s) / 0.5).mean())
    # point-wise batches keep their positive rows only
    y = torch.tensor([1.0, 0, 1, 1, 0, 1])
    keep = y > 0
    torch.testing.assert_close(
        plain.in_batch_loss(x, y), F.cross_entropy(s[keep][:, keep], torch.arange(int(keep.sum())))
    )


def test_temperature_defaults_to_the_models():
    model = DSSM([_feat("u")], [_feat("i")], P, P, temperature=0.07)
    assert MatchModule(model, in_batch_neg=True).temperature == 0.07
    assert MatchModule(model, in_batch_neg=True, temperature=0.5).temperature == 0.5


def _feat(name):
    from rechub_lightning.features import SparseFeature

    return SparseFeature(name, 10, 8)


def test_mode_losses():
    m0, m1, m2 = (MatchModule(Towers(), mode=k) for k in (0, 1, 2))
    logits = torch.randn(5)
    y = torch.tensor([1.0, 0, 1, 0, 0])
    torch.testing.assert_close(m0.mode_loss(logits, y), F.binary_cross_entropy_with_logits(logits, y))
    pos, neg = torch.randn(5), torch.randn(5, 3)
    torch.testing.assert_close(m1.mode_loss((pos, neg), None), F.softplus(neg - pos[:, None]).mean())
    lst = torch.cat([pos[:, None], neg], dim=1)
    torch.testing.assert_close(m1.mode_loss(lst, None), F.softplus(neg - pos[:, None]).mean())
    torch.testing.assert_close(m2.mode_loss(lst, torch.zeros(5)), F.cross_entropy(lst, torch.zeros(5, dtype=torch.long)))
    torch.testing.assert_close(m2.mode_loss((pos, neg), None), F.cross_entropy(lst, torch.zeros(5, dtype=torch.long)))
    full = torch.randn(5, 30)  # a full-softmax model: the label is the item id, as in the reference
    ids = torch.tensor([3.0, 7, 29, 0, 1])
    torch.testing.assert_close(m2.mode_loss(full, ids), F.cross_entropy(full, ids.long()))
    with pytest.raises(ValueError, match="index the 30 logits"):
        m2.mode_loss(full, torch.tensor([30.0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="point-wise"):
        m0.mode_loss(lst, y)
    with pytest.raises(ValueError, match="neg_items"):
        m2.mode_loss(logits, None)


# --------------------------------------------------------------------------- every model, every mode
@pytest.fixture(scope="module")
def dms():
    return {
        0: MatchDataModule(mode=0, neg_ratio=2, **SMALL),
        1: MatchDataModule(mode=1, **SMALL),
        2: MatchDataModule(mode=2, neg_ratio=3, **SMALL),
    }


BUILD = {
    "DSSM": lambda s: DSSM(user_params=P, item_params=P, temperature=0.1, schema=s),
    "DSSMSENet": lambda s: DSSMSENet(user_params=P, item_params=P, temperature=0.1, schema=s),
    "FaceBookDSSM": lambda s: FaceBookDSSM(user_params=P, item_params=P, temperature=0.1, schema=s),
    "YoutubeDNN": lambda s: YoutubeDNN(user_params=P, temperature=0.1, schema=s),
    "YoutubeSBC": lambda s: YoutubeSBC(user_params=P, item_params=P, n_neg=5, schema=s),
    "GRU4Rec": lambda s: GRU4Rec(user_params={**P, "num_layers": 1}, schema=s),
    "NARM": lambda s: NARM(hidden_dim=8, schema=s),
    "STAMP": lambda s: STAMP(schema=s),
    "SASRec": lambda s: SASRec(max_len=10, num_blocks=1, dropout_rate=0.1, schema=s),
}
# FaceBookDSSM is pair-wise by construction (no point-wise logits); YoutubeSBC draws its own
# in-batch negatives and returns list logits (no point-wise logits either).
NOT_POINT_WISE = {"FaceBookDSSM", "YoutubeSBC"}


@pytest.mark.parametrize("name", list(BUILD))
@pytest.mark.parametrize("mode", [0, 1, 2, "in-batch"])
def test_every_model_trains_in_every_mode(dms, name, mode):
    if mode == 0 and name in NOT_POINT_WISE:
        pytest.skip(f"{name} has no point-wise logits")
    dm = dms[1 if mode == "in-batch" else mode]
    torch.manual_seed(0)
    model = BUILD[name](dm.schema)
    module = (
        MatchModule(model, mode=1, in_batch_neg=True, in_batch_neg_ratio=4, mask_accidental_hits=True,
                    logq_correction=True, item_log_q=dm.item_log_q().tolist(), item_id_feature="movie_id")
        if mode == "in-batch"
        else MatchModule(model, mode=mode)
    )
    batch = next(iter(dm.train_dataloader()))
    loss = module.compute_loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


# --------------------------------------------------------------------------- data
def test_datamodule_schema_split_and_negatives():
    dm = MatchDataModule(mode=2, neg_ratio=3, **SMALL)
    groups = dm.schema.groups
    assert groups["user"] == ["user_id", "gender", "age", "occupation", "zip", "hist_movie_id"]
    assert groups["item"] == ["movie_id", "cate_id"]
    assert groups["neg_items"] == ["neg_items", "neg_cate_id"]
    assert dm.schema["hist_movie_id"].shared_with == "movie_id"
    dm.setup("fit")
    train, val, test = dm.dataset("train"), dm.dataset("val"), dm.dataset("test")
    x = train.x
    assert not bool((x["neg_items"] == x["movie_id"][:, None]).any())  # negatives never equal the positive
    assert x["neg_items"].shape[1] == 3 and bool((train.y == 0).all())
    # leave-last-out, in encoded ids: the test target is each user's last item, validation the one before
    frame = dm._frame
    enc = dm.encoders["movie_id"]
    last = frame[frame["_rank"] == 0]
    expect_test = enc.transform(last["movie_id"])
    expect_test = np.where(expect_test > 0, expect_test, -1)
    assert np.array_equal(test.y.long().numpy(), expect_test)
    seen = val.seen(torch.arange(len(val)))
    assert not bool((seen == val.y.long()[:, None]).any())  # the held-out item is not excluded
    # the validation history ends with the last training item; nothing after the target leaks in
    second = frame[frame["_rank"] == 2]
    users_with_train = val.x["hist_movie_id"][:, -1] > 0
    assert np.array_equal(val.x["hist_movie_id"][users_with_train, -1].numpy(),
                          enc.transform(second["movie_id"])[users_with_train.numpy()])
    # every training interaction at position >= 1 is a training target (the generator's own
    # "test" row is put back): rows = training interactions - users
    n_train_events = int((frame["_rank"] >= 2).sum())
    n_users_with_train = frame.loc[frame["_rank"] >= 2, "_user"].nunique()
    assert len(train) == n_train_events - n_users_with_train
    corpus = dm.item_corpus()
    assert corpus["movie_id"].tolist() == sorted(set(corpus["movie_id"].tolist())) and int(corpus["movie_id"].min()) == 1
    assert math.isclose(float(dm.item_log_q()[1:].exp().sum()), 1.0, rel_tol=1e-4)


def test_datamodule_point_wise_labels_and_state(tmp_path):
    dm = MatchDataModule(mode=0, neg_ratio=2, **SMALL)
    ds = dm.dataset("train")
    assert set(ds.y.unique().tolist()) == {0.0, 1.0}
    assert math.isclose(float(ds.y.mean()), 1 / 3, rel_tol=0.01)
    assert "neg_items" not in dm.schema.groups and dm.schema.labels == ["label"]
    state = dm.state_dict()
    other = MatchDataModule(mode=0, neg_ratio=2, **{**SMALL, "synthetic_users": 60})
    other.load_state_dict(state)
    assert other.schema == dm.schema


def test_datamodule_errors_name_the_problem():
    with pytest.raises(ValueError, match="mode"):
        MatchDataModule(mode=4)
    frame = pd.DataFrame({"user_id": [1, 1, 1], "movie_id": [1, 2, 3], "timestamp": [1, 2, 3]})
    with pytest.raises(KeyError, match="'when'"):
        MatchDataModule(data=frame, time_col="when")
    frame2 = frame.assign(timestamp=[1.0, np.nan, 3.0])
    with pytest.raises(ValueError, match="timestamp"):
        MatchDataModule(data=frame2)
    dm = MatchDataModule(data=frame, mode=0, neg_ratio=0)
    bad = dm.dataset("val")
    bad.x["hist_movie_id"][0, -1] = 99
    with pytest.raises(ValueError, match="hist_movie_id.*99"):
        dm._validate(bad, "val")


def test_datamodule_reads_ml1m_sample(samples):
    dm = MatchDataModule(path=str(samples / "ml-1m" / "ml-1m_sample.csv"), mode=2, neg_ratio=2, seq_max_len=20, batch_size=16)
    assert dm.schema.groups["item"] == ["movie_id", "cate_id"]  # cate_id = first genre, as the reference examples
    dm.setup("fit")
    assert len(dm.dataset("train")) > 0 and len(dm.dataset("val")) >= 1
    batch = next(iter(dm.val_dataloader()))
    assert SEEN_ITEMS_KEY in batch[0]


# --------------------------------------------------------------------------- evaluation
def _brute_force(module, dm, split, ks):
    """Top-K by a full numpy score matrix (ties: lower corpus row first), seen items excluded."""
    ds = dm.dataset(split)
    model = module.model.eval()
    with torch.no_grad():
        model.mode = "user"
        users = model({k: v for k, v in ds.x.items()}).numpy().astype(np.float64)
        corpus = dm.item_corpus()
        model.mode = "item"
        items = model(corpus).numpy().astype(np.float64)
        model.mode = None
    ids = corpus["movie_id"].numpy()
    scores = users @ items.T if users.ndim == 2 else np.einsum("ukd,nd->ukn", users, items).max(1)
    row_of = {int(i): r for r, i in enumerate(ids)}
    seen = ds.seen(torch.arange(len(ds))).numpy()
    for u in range(len(ds)):
        rows = [row_of[i] for i in seen[u] if i > 0 and i in row_of]
        scores[u, rows] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(len(ids)), scores.shape), -scores), axis=1)[:, : max(ks)]
    top = np.where(np.take_along_axis(scores, order, 1) == -np.inf, -1, ids[order])
    return topk_metrics(torch.as_tensor(top), ds.y.long().unsqueeze(1), ks=ks)


@pytest.mark.parametrize("name", ["YoutubeDNN", "GRU4Rec"])
def test_validation_metrics_equal_brute_force(name):
    dm = MatchDataModule(mode=2, neg_ratio=3, **{**SMALL, "batch_size": 32})
    torch.manual_seed(0)
    module = MatchModule(BUILD[name](dm.schema), mode=2, topk=(5, 10, 200), eval_chunk_size=7)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    expect = _brute_force(module, dm, "val", (5, 10, 200))  # 200 > corpus size
    assert len(dm.item_corpus()["movie_id"]) < 200
    for key, value in expect.items():
        assert logged[f"val/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    results = trainer.test(module, dm, verbose=False)[0]
    for key, value in _brute_force(module, dm, "test", (5, 10, 200)).items():
        assert results[f"test/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_predict_returns_user_and_item_embeddings():
    dm = MatchDataModule(mode=0, neg_ratio=0, **SMALL)
    module = MatchModule(DSSM(user_params=P, item_params=P, schema=dm.schema), in_batch_neg=True)
    out = L.Trainer(**quiet_trainer_kwargs()).predict(module, dm)
    users, items = torch.cat(out[0]), torch.cat(out[1])
    assert users.shape == (len(dm.dataset("predict")), 8)
    assert items.shape == (len(dm.item_corpus()["movie_id"]), 8)
    assert module.model.mode is None


# --------------------------------------------------------------------------- MatchTrainer (reference API)
def test_match_trainer_fit_inference_and_evaluate(tmp_path):
    dm = MatchDataModule(mode=2, neg_ratio=3, **SMALL)
    dm.setup("fit")
    torch.manual_seed(0)
    model = YoutubeDNN(user_params=P, temperature=0.1, schema=dm.schema)
    trainer = MatchTrainer(model, mode=2, n_epoch=2, earlystop_patience=1, model_path=str(tmp_path),
                           optimizer_params={"lr": 3e-3, "weight_decay": 0.0})
    trainer.fit(dm.train_dataloader(), dm.val_dataloader(), item_dataloader=dm.item_dataloader())
    assert os.path.exists(tmp_path / "model.pth")
    assert trainer.best_model_path and "val/recall@10" == trainer.module.monitor
    test_dl, item_dl = dm.test_dataloader(), dm.item_dataloader()
    users = trainer.inference_embedding(model, "user", test_dl, str(tmp_path))
    items = trainer.inference_embedding(model, "item", item_dl, str(tmp_path))
    model.eval()
    with torch.no_grad():
        x = {k: v for k, v in dm.dataset("test").x.items()}
        torch.testing.assert_close(users, model.user_tower(x))
        torch.testing.assert_close(items, model.item_tower(dm.item_corpus()))
    assert model.mode is None
    metrics = trainer.evaluate(model, test_dl, item_loader=item_dl, topk=[10, 50])
    assert set(metrics) == {f"{m}@{k}" for k in (10, 50) for m in ("recall", "hitrate", "precision", "ndcg", "mrr")}
    module = MatchModule(model, mode=2, topk=(10, 50))
    logged = L.Trainer(**quiet_trainer_kwargs()).test(module, dm, verbose=False)[0]
    for key, value in metrics.items():
        assert logged[f"test/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-7)
    # explicit ground truth and exclusions give the same numbers
    ds = dm.dataset("test")
    seen = ds.seen(torch.arange(len(ds)))
    gt = ds.y.long().tolist()
    again = trainer.evaluate(model, [{k: v for k, v in ds.x.items()}], item_loader=item_dl, ground_truth=gt,
                             topk=[10, 50], exclude=[[i for i in row if i > 0] for row in seen.tolist()])
    assert again == pytest.approx(metrics)
    with pytest.raises(ValueError, match="user.*item"):
        trainer.inference_embedding(model, "users", test_dl, str(tmp_path))


def test_match_trainer_point_wise_auc_path(tmp_path):
    dm = MatchDataModule(mode=0, neg_ratio=1, **SMALL)
    model = DSSM(user_params=P, item_params=P, schema=dm.schema)
    trainer = MatchTrainer(model, mode=0, n_epoch=1, model_path=str(tmp_path))
    train_dl = dm.train_dataloader()
    trainer.fit(train_dl, train_dl)  # the reference validates on labelled point-wise rows: val/auc
    assert trainer.module.monitor == "val/auc"
    auc = trainer.evaluate(model, train_dl)
    assert 0.0 <= auc <= 1.0
    assert len(trainer.predict(model, train_dl)) == len(dm.dataset("train"))
    loss = trainer.train_one_epoch(train_dl, log_interval=0)
    assert math.isfinite(loss)
    listwise = MatchDataModule(mode=2, neg_ratio=2, **SMALL)
    with pytest.raises(ValueError, match="undefined"):
        trainer.evaluate(model, [(b[0], b[1]) for b in listwise.train_dataloader()][:1])


# --------------------------------------------------------------------------- CLI
def test_cli_fits_dssm_config(tmp_path, monkeypatch):
    from rechub_lightning.cli import main

    monkeypatch.setattr("sys.argv", ["rechub"])
    main([
        "fit", "--config", "configs/match/dssm.yaml", "--trainer.max_epochs=1",
        "--data.synthetic_users=300", "--data.synthetic_items=120", "--data.synthetic_interactions=[20, 40]",
        "--data.batch_size=256", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ])
    ckpts = list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert ckpts
    ckpt = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    score = next(v["best_model_score"] for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    corpus = ckpt["MatchDataModule"]["schema"]["features"][[f["name"] for f in ckpt["MatchDataModule"]["schema"]["features"]].index("movie_id")]["vocab_size"] - 1
    assert math.isfinite(float(score)) and float(score) > 10 / corpus


# --------------------------------------------------------------------------- acceptance
@pytest.mark.slow
def test_recall_at_10_beats_random_five_times():
    """YoutubeDNN (list-wise), DSSM (in-batch, logQ) and SASRec on the default synthetic data, two
    epochs each (about 10 s on 2 CPUs); random ranking gives 10 / n_items = 0.005."""
    dm = MatchDataModule(mode=2, neg_ratio=10, sample_method=0, seq_max_len=20, batch_size=512, seed=2022)
    random_recall = 10 / len(dm.item_corpus()["movie_id"])
    opt = {"lr": 3e-3, "weight_decay": 0.0}
    runs = {
        "YoutubeDNN": MatchModule(YoutubeDNN(user_params={"dims": [128, 16]}, temperature=0.05, schema=dm.schema),
                                  mode=2, optimizer_params=opt, topk=(10,)),
        "DSSM": MatchModule(DSSM(user_params={"dims": [128, 64]}, item_params={"dims": [128, 64]}, temperature=0.05,
                                 schema=dm.schema),
                            mode=2, in_batch_neg=True, logq_correction=True, mask_accidental_hits=True,
                            optimizer_params=opt, topk=(10,)),
        "SASRec": MatchModule(SASRec(max_len=20, dropout_rate=0.2, num_blocks=1, schema=dm.schema),
                              mode=2, optimizer_params=opt, topk=(10,)),
    }
    figures = {}
    for name, module in runs.items():
        L.seed_everything(0)
        trainer = L.Trainer(max_epochs=2, **quiet_trainer_kwargs(enable_checkpointing=False))
        trainer.fit(module, dm)
        figures[name] = float(trainer.callback_metrics["val/recall@10"])
    print(f"Recall@10 (random {random_recall:.4f}):", {k: round(v, 4) for k, v in figures.items()})
    assert all(v >= 5 * random_recall for v in figures.values()), (figures, random_recall)


@pytest.mark.slow
def test_distributed_validation_equals_single_process(tmp_path):
    """Two gloo processes (unpadded eval sampler, summed metric states) give the single-process numbers.

    Runs in a subprocess through Lightning's ``ddp`` launcher: ``ddp_spawn`` inside a long pytest
    session can deadlock (a spawned child failing to rebuild a shared tensor leaves the parent
    blocked on the pipe)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "ddp_match.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.load(open(tmp_path / "match_ddp.json"))
    single, ddp = res["single"], res["ddp"]
    assert set(single) == set(ddp)
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    # predictions: every user (77, odd) and item once, in input order, the same top-K
    import pandas as pd

    for table in ("user_embeddings", "item_embeddings", "topk"):
        a = pd.read_csv(tmp_path / "single" / f"{table}.csv")
        b = pd.read_csv(tmp_path / "ddp" / f"{table}.csv")
        assert list(a.columns) == list(b.columns), table
        assert len(a) == len(b) > 0, table
        emb = [c for c in a.columns if c.startswith("emb_") or c == "score"]
        keys = [c for c in a.columns if c not in emb]
        pd.testing.assert_frame_equal(a[keys], b[keys], check_exact=True, obj=table)
        np.testing.assert_allclose(a[emb].to_numpy(), b[emb].to_numpy(), rtol=1e-5, atol=1e-6, err_msg=table)
    users = pd.read_csv(tmp_path / "single" / "user_embeddings.csv")
    assert users["row"].tolist() == list(range(len(users))) and users.iloc[:, 1].is_unique


def test_small_temperature_in_point_wise_training_warns():
    """Torch-RecHub's MovieLens DSSM example passes temperature=0.02 with mode=0; its DSSM ignored
    the temperature, ours divides the logits by it, which saturates BCE: a warning says so."""
    import warnings

    user, item = [_feat("u")], [_feat("i")]
    with pytest.warns(UserWarning, match=r"temperature=0.02\) trains point-wise"):
        MatchModule(DSSM(user, item, P, P, temperature=0.02), mode=0).on_fit_start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MatchModule(DSSM(user, item, P, P, temperature=1.0), mode=0).on_fit_start()
        MatchModule(DSSM(user, item, P, P, temperature=0.02), mode=0, in_batch_neg=True).on_fit_start()
        MatchModule(DSSM(user, item, P, P, temperature=0.02), mode=2).on_fit_start()


def test_label_checks_run_once_per_fit_not_per_step(monkeypatch):
    """Per-batch label checks are host-device syncs on a GPU: a fit looks at the whole training
    label column once; list-wise labels that are not all 0 are still checked batch by batch."""
    from lightning import Trainer

    from conftest import quiet_trainer_kwargs
    from rechub_lightning.data import TensorDictDataset

    from lightning.pytorch.callbacks import Callback

    dm = MatchDataModule(mode=2, neg_ratio=3, **SMALL)
    syncs, in_step = [], [False]
    orig = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: (in_step[0] and syncs.append(1)) or orig(t))

    class Steps(Callback):
        def on_train_batch_start(self, *args):
            in_step[0] = True

        def on_train_batch_end(self, *args):
            in_step[0] = False

    module = MatchModule(YoutubeDNN(user_params=P, schema=dm.schema), mode=2)
    Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, callbacks=[Steps()],
            **quiet_trainer_kwargs(enable_checkpointing=False)).fit(module, dm)
    assert module._train_labels is None and not syncs  # all-zero labels: no per-step min/max
    ds = dm.dataset("train")
    bad = TensorDictDataset(ds.x, torch.where(torch.arange(len(ds)) == 3, 9, 0).float())  # 9 >= 1 + 3 logits
    loader = torch.utils.data.DataLoader(bad, batch_size=64)
    with pytest.raises(ValueError, match="mode=2 targets must index the 4 logits"):
        Trainer(max_epochs=1, **quiet_trainer_kwargs(enable_checkpointing=False)).fit(
            MatchModule(YoutubeDNN(user_params=P, schema=dm.schema), mode=2), loader)
