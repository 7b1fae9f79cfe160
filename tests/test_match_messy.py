"""Matching and multi-task data as it comes: text times, unknown users, text ids, attributes that
change over time, label-less prediction rows."""

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from rechub_lightning import MatchModule, MTLModule
from rechub_lightning.data import MatchDataModule, MTLDataModule, gen_model_input, generate_seq_feature_match


def _quiet_trainer(tmp_path, **kw):
    return L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


@pytest.mark.parametrize("times", [
    ["12/30/2021 10:00", "12/31/2021 10:00", "01/01/2022 10:00", "01/15/2022 10:00", "02/01/2022 10:00"],
    ["998", "999", "1000", "1001", "1002"],
    ["2021-01-01T09:00:00", "2021-01-01 10:00:00", "2021-01-01T11:00:00", "2021-01-01 12:00:00", "2021-01-02T08:00:00"],
])
def test_text_times_sort_as_times(times):
    rng = np.random.default_rng(0)
    perm = rng.permutation(5)
    df = pd.DataFrame({"user_id": [1] * 5, "movie_id": list("ABCDE"), "timestamp": times}).iloc[perm]
    dm = MatchDataModule(data=df, mode=2, neg_ratio=1, seq_max_len=5)
    assert dm._frame["movie_id"].tolist() == list("ABCDE")  # leave-last-out: E test, D validation
    assert sorted(dm.decode("movie_id", dm.item_corpus()["movie_id"].numpy())) == ["A", "B", "C"]
    _, test = generate_seq_feature_match(df, "user_id", "movie_id", "timestamp", mode=0, neg_ratio=0, seed=0)
    assert test["movie_id"].tolist() == ["E"] and list(test["hist_movie_id"][0]) == list("ABCD")


def test_text_times_that_are_not_times_are_refused():
    df = pd.DataFrame({"user_id": [1] * 3, "movie_id": list("ABC"), "timestamp": ["early", "late", "later"]})
    with pytest.raises(ValueError, match=r"time column 'timestamp' holds text that is neither numbers nor dates"):
        MatchDataModule(data=df)


def test_prediction_tables_keep_the_raw_id_of_users_the_encoder_does_not_know(tmp_path):
    from rechub_lightning.models.matching import YoutubeDNN
    from rechub_lightning.prediction import MatchPredictionWriter

    rs = np.random.RandomState(0)
    rows = [{"user_id": f"user_{u}", "movie_id": int(rs.randint(0, 30)), "timestamp": t}
            for u in range(40) for t in range(2 if u % 4 == 0 else 6)]  # every 4th user: no training interaction
    dm = MatchDataModule(data=pd.DataFrame(rows), mode=2, neg_ratio=2, seq_max_len=5, batch_size=32)
    module = MatchModule(YoutubeDNN(schema=dm.schema, user_params={"dims": [16]}), mode=2)
    writer = MatchPredictionWriter(str(tmp_path / "out"), top_k=5)
    trainer = _quiet_trainer(tmp_path, callbacks=[writer])
    trainer.fit(module, dm)
    trainer.predict(module, datamodule=dm, return_predictions=False)
    users = writer.frames["user_embeddings"]
    assert users["user_id"].tolist() == dm.raw_frame("predict")["user_id"].tolist()
    assert users["user_id"].notna().all() and writer.frames["topk"]["user_id"].notna().all()
    assert set(users["user_id"]) == {f"user_{u}" for u in range(40)}


def test_text_ids_of_a_csv_stay_text(tmp_path):
    rows = [{"user_id": f"00{u}", "movie_id": f"0{10 + (u * 3 + t) % 6:02d}", "timestamp": t} for u in range(1, 4) for t in range(6)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    dm = MatchDataModule(path=str(tmp_path / "m.csv"), mode=2, neg_ratio=1, seq_max_len=5)
    corpus = dm.decode("movie_id", dm.item_corpus()["movie_id"].numpy())
    assert set(corpus) <= {r["movie_id"] for r in rows} and all(isinstance(v, str) and v.startswith("0") for v in corpus)
    assert dm.raw_frame("test")["user_id"].tolist() == ["001", "002", "003"]


def test_attributes_come_from_the_most_recent_training_interaction():
    # item m1 was re-tagged 'new' over time; user 1's age changed; both must be read the same way
    # in training and evaluation, whichever user comes first
    rows = []
    for u, first_tag in ((0, "old"), (1, "new"), (2, "new")):
        for t in range(6):
            rows.append({"user_id": u, "movie_id": f"m{t % 3}", "timestamp": 10 * t + u,
                         "cate_id": ("old" if (u == 0 and t == 0) else "new") if t % 3 == 1 else "x",
                         "age": 20 if t < 3 else 30})
    df = pd.DataFrame(rows)
    df.loc[(df.movie_id == "m1") & (df.user_id == 0) & (df.timestamp == 10), "cate_id"] = "old"
    dm = MatchDataModule(data=df, mode=2, neg_ratio=1, seq_max_len=3, user_feature_cols=["age"], item_feature_cols=["cate_id"])
    corpus = dm.item_corpus()
    tag = dict(zip(dm.decode("movie_id", corpus["movie_id"].numpy()), dm.decode("cate_id", corpus["cate_id"].numpy())))
    assert tag["m1"] == "new"  # the latest training event's tag, although user 0 (first by id) saw 'old' first
    train = dm.dataset("train")
    for split in ("val", "test", "predict"):
        ds = dm.dataset(split)
        for u in range(3):
            enc_u = dm.encoders["user_id"].transform(pd.Series([u]))[0]
            ages_train = set(train.x["age"][train.x["user_id"] == enc_u].tolist())
            ages_eval = set(ds.x["age"][ds.x["user_id"] == enc_u].tolist())
            assert ages_eval == ages_train and len(ages_train) == 1


def test_integer_arguments_are_not_truncated():
    dm_kw = dict(synthetic_users=60, synthetic_items=50)
    with pytest.raises(ValueError, match=r"neg_ratio must be an int >= 0, got neg_ratio=2.9"):
        MatchDataModule(neg_ratio=2.9, **dm_kw)
    with pytest.raises(ValueError, match=r"neg_ratio must be an int >= 0, got neg_ratio=True"):
        MatchDataModule(mode=2, neg_ratio=True, **dm_kw)
    with pytest.raises(ValueError, match=r"seq_max_len must be an int >= 1, got seq_max_len=3.7"):
        MatchDataModule(seq_max_len=3.7, **dm_kw)
    from rechub_lightning.models.multi_task import MMOE

    mdm = MTLDataModule(synthetic_rows=300)
    with pytest.raises(ValueError, match=r"earlystop_taskid must be an int >= 0, got earlystop_taskid=1.7"):
        MTLModule(MMOE(schema=mdm.schema, n_expert=2, expert_params={"dims": [8]}, tower_params_list=[{"dims": [4]}] * 2),
                  earlystop_taskid=1.7)


def test_gen_model_input_refuses_repeated_profiles_and_names_the_history_column():
    df = pd.DataFrame({"user_id": [1, 2], "movie_id": [10, 11], "hist_cate": [[1.0, np.nan], [2.0]]})
    users = pd.DataFrame({"user_id": [1, 1, 2], "age": [3, 4, 5]})
    with pytest.raises(ValueError, match=r"user_profile lists 1 'user_id' value\(s\) more than once"):
        gen_model_input(df, users, "user_id", df[["movie_id"]], "movie_id", 3)
    with pytest.raises(ValueError, match=r"column 'hist_cate': .*non-integer value nan"):
        gen_model_input(df, users.drop_duplicates("user_id"), "user_id", df[["movie_id"]], "movie_id", 3)
    with pytest.raises(ValueError, match=r"seq_max_len must be an int >= 1"):
        gen_model_input(df, users.drop_duplicates("user_id"), "user_id", df[["movie_id"]], "movie_id", 0)


def test_esmm_rows_to_predict_need_no_label_columns(tmp_path):
    from rechub_lightning.models.multi_task import ESMM

    rs = np.random.RandomState(0)
    n = 1200
    df = pd.DataFrame({"a": rs.randint(0, 20, n), "b": rs.choice(list("xyz"), n), "c": rs.randn(n)})
    df["click"] = (rs.rand(n) < 0.4).astype(int)
    df["purchase"] = df["click"] * (rs.rand(n) < 0.3)
    kw = dict(labels=["purchase", "click", "ctcvr"], derived_labels={"ctcvr": ["click", "purchase"]},
              sparse_features=["a", "b"], dense_features=["c"], batch_size=256)
    dm = MTLDataModule(data=df, **kw)
    module = MTLModule(ESMM(schema=dm.schema, cvr_params={"dims": [8]}, ctr_params={"dims": [8]}))
    trainer = _quiet_trainer(tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    ckpt = str(tmp_path / "esmm.ckpt")
    trainer.save_checkpoint(ckpt)
    rows = df.drop(columns=["click", "purchase"]).head(30)
    with_labels = np.concatenate([p.numpy() for p in trainer.predict(module, MTLDataModule(data=df.head(30), preprocessing_from=ckpt, **kw))])
    without = np.concatenate([p.numpy() for p in trainer.predict(module, MTLDataModule(data=rows, preprocessing_from=ckpt, **kw))])
    assert without.shape == (30, 3) and np.array_equal(without, with_labels)
    assert torch.isfinite(torch.as_tensor(without)).all()


def test_users_left_out_of_the_topk_metrics_are_counted(tmp_path, caplog):
    import logging

    from rechub_lightning.models.matching import DSSM

    rows = [{"user_id": u, "movie_id": (u * 7 + t) % 25, "timestamp": t} for u in range(30) for t in range(5)]
    rows += [{"user_id": u, "movie_id": 100 + u, "timestamp": 9} for u in range(4)]  # 4 users' test item: never trained on
    dm = MatchDataModule(data=pd.DataFrame(rows), mode=0, neg_ratio=1, seq_max_len=4, batch_size=32, user_feature_cols=[],
                         item_feature_cols=[])
    expected = int((dm.dataset("test").y < 0).sum())
    assert expected >= 4
    module = MatchModule(DSSM(schema=dm.schema, user_params={"dims": [8]}, item_params={"dims": [8]}), mode=0)
    trainer = _quiet_trainer(tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    with caplog.at_level(logging.INFO):
        trainer.test(module, dm, verbose=False)
    assert f"test: {expected} of 30 users are not in the top-K metrics" in caplog.text


def test_held_out_item_ids_stay_exact_integers():
    from rechub_lightning.data.match import SEEN_ITEMS_KEY, SeenItemsDataset

    # float32 labels would turn 2**24 + 1 into 2**24: another item scored as the held-out one
    ids = np.array([2**24 + 1, 2**40 + 3, -1, 7], dtype=np.int64)
    ds = SeenItemsDataset({"user_id": np.arange(1, 5)}, ids, np.array([0, 1, 1, 2, 2]), np.array([5, 6]))
    assert ds.y.dtype == torch.long and ds.y.tolist() == ids.tolist()
    x, y = ds[[1, 0, 2]]
    assert y.tolist() == [2**40 + 3, 2**24 + 1, -1] and x[SEEN_ITEMS_KEY].tolist() == [[0], [5], [6]]
    assert ds[0][1].item() == 2**24 + 1
    with pytest.raises(ValueError, match="whole numbers"):
        SeenItemsDataset({"user_id": np.arange(1, 3)}, np.array([1.5, 2.0]), np.array([0, 0, 0]), np.array([], dtype=np.int64))

    # the datamodule's validation/test labels: int64 held-out ids equal to the encoded items
    rows = [{"user_id": u, "movie_id": (u * 3 + t) % 11, "timestamp": t} for u in range(6) for t in range(5)]
    dm = MatchDataModule(data=pd.DataFrame(rows), mode=2, neg_ratio=1, seq_max_len=3, user_feature_cols=[], item_feature_cols=[])
    for split, rank in (("val", 1), ("test", 0)):
        y = dm.dataset(split).y
        held = dm._encoded()[dm._encoded()["_rank"] == rank][dm.item_col].to_numpy()
        assert y.dtype == torch.long and y.tolist() == np.where(held > 0, held, -1).tolist()
