"""Matching predictions to files: user/item embeddings and top-K items per user (also via `rechub predict`)."""

import glob

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from rechub_lightning import MatchModule
from rechub_lightning.cli import main
from rechub_lightning.data import MatchDataModule
from rechub_lightning.models.matching import DSSM, MIND
from rechub_lightning.prediction import MatchPredictionWriter, match_output_paths

from conftest import quiet_trainer_kwargs

SMALL = dict(synthetic_users=60, synthetic_items=120, synthetic_interactions=(8, 16), seq_max_len=10, batch_size=64,
             eval_batch_size=16, embed_dim=8)
P = {"dims": [16, 8]}


def _read(path):
    return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)


def _emb(frame):
    return frame[[c for c in frame.columns if c.startswith("emb_")]].to_numpy(dtype=np.float64)


def _seen_raw(dm):
    """Each predict user's raw interacted items, from the raw interactions (independent of the writer)."""
    frame = dm.default_frame()
    return frame.groupby(dm.user_col)[dm.item_col].apply(set).to_dict()


def _predict(dm, module, output, **kw):
    writer = MatchPredictionWriter(str(output), **kw)
    L.Trainer(callbacks=[writer], **quiet_trainer_kwargs()).predict(module, dm, return_predictions=False)
    return writer


def test_match_output_paths_convention(tmp_path):
    assert match_output_paths("out/p.parquet") == {
        "user_embeddings": "out/p_user_embeddings.parquet",
        "item_embeddings": "out/p_item_embeddings.parquet",
        "topk": "out/p_topk.parquet",
    }
    assert match_output_paths("out/p.csv.gz")["topk"] == "out/p_topk.csv.gz"
    assert match_output_paths("out")["user_embeddings"].replace("\\", "/") == "out/user_embeddings.csv"
    with pytest.raises(ValueError, match="top_k"):
        MatchPredictionWriter(str(tmp_path), top_k=0)


@pytest.mark.parametrize("ext", [".csv", ".parquet"])
def test_written_topk_equals_brute_force_on_written_embeddings(tmp_path, ext):
    dm = MatchDataModule(mode=0, neg_ratio=0, **SMALL)
    torch.manual_seed(0)
    module = MatchModule(DSSM(user_params=P, item_params=P, schema=dm.schema), in_batch_neg=True)
    k = 7
    writer = _predict(dm, module, tmp_path / f"preds{ext}", top_k=k)
    users, items, topk = (_read(writer.paths[n]) for n in ("user_embeddings", "item_embeddings", "topk"))

    # one row per user / corpus item, raw ids, the module's tower outputs
    pred_ds, corpus = dm.dataset("predict"), dm.item_corpus()
    assert len(users) == len(pred_ds) and list(users["row"]) == list(range(len(pred_ds)))
    assert len(items) == len(corpus["movie_id"])
    assert users["user_id"].tolist() == dm.raw_frame("predict")["user_id"].tolist()
    assert items["movie_id"].tolist() == dm.decode("movie_id", corpus["movie_id"].numpy()).tolist()
    raw_movies = set(dm.default_frame()["movie_id"])
    assert set(items["movie_id"]) <= raw_movies
    module.eval()
    with torch.no_grad():
        x = {k_: v for k_, v in pred_ds.x.items()}
        expect_u = module.embed(x, "user").numpy()
        expect_i = module.embed(dict(corpus), "item").numpy()
    np.testing.assert_allclose(_emb(users), expect_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_emb(items), expect_i, rtol=1e-5, atol=1e-6)

    # top-K = brute force over the written embeddings, without each user's seen items
    scores = _emb(users) @ _emb(items).T
    seen = _seen_raw(dm)
    item_ids = items["movie_id"].to_numpy()
    assert set(topk.columns) == {"row", "user_id", "rank", "movie_id", "score"}
    for row, (uid, group) in enumerate(topk.groupby("row", sort=True)[["user_id", "rank", "movie_id", "score"]]):
        group = group.sort_values("rank")
        assert group["user_id"].nunique() == 1 and group["user_id"].iloc[0] == users["user_id"].iloc[row]
        s = scores[row].copy()
        s[np.isin(item_ids, list(seen[users["user_id"].iloc[row]]))] = -np.inf
        n_left = int(np.isfinite(s).sum())
        assert len(group) == min(k, n_left)
        assert group["rank"].tolist() == list(range(1, len(group) + 1))
        best = np.sort(s)[::-1][: len(group)]
        np.testing.assert_allclose(group["score"].to_numpy(), best, rtol=1e-4, atol=1e-5)
        # the written items really have the written scores and none was seen
        idx = pd.Index(item_ids).get_indexer(group["movie_id"].to_numpy())
        assert (idx >= 0).all()
        np.testing.assert_allclose(s[idx], group["score"].to_numpy(), rtol=1e-4, atol=1e-5)
        assert not set(group["movie_id"]) & seen[users["user_id"].iloc[row]]
    assert topk["row"].nunique() == len(users)


def test_exclude_seen_off_and_multi_interest_users(tmp_path):
    dm = MatchDataModule(mode=2, neg_ratio=3, **SMALL)
    torch.manual_seed(0)
    model = MIND(max_length=SMALL["seq_max_len"], interest_num=3, schema=dm.schema)
    module = MatchModule(model, mode=2, exclude_seen=True)
    writer = _predict(dm, module, tmp_path / "out", top_k=5, exclude_seen=False)
    users, items, topk = (_read(writer.paths[n]) for n in ("user_embeddings", "item_embeddings", "topk"))
    u = _emb(users).reshape(len(users), 3, -1)
    scores = np.einsum("uid,nd->uin", u, _emb(items)).max(axis=1)
    assert len(topk) == 5 * len(users)
    expect = np.sort(scores, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(topk.sort_values(["row", "rank"])["score"].to_numpy().reshape(-1, 5), expect, rtol=1e-4, atol=1e-5)
    assert "emb_2_0" in users.columns


CLI_TINY = [
    "--data.init_args.synthetic_users=60",
    "--data.init_args.synthetic_items=120",
    "--data.init_args.synthetic_interactions=[8, 16]",
    "--data.init_args.seq_max_len=10",
    "--data.init_args.batch_size=64",
    "--data.init_args.embed_dim=8",
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_cli_predict_writes_matching_tables(tmp_path):
    main(["fit", "--config", "configs/match/dssm.yaml", *CLI_TINY, f"--trainer.default_root_dir={tmp_path}"])
    best = glob.glob(str(tmp_path / "**" / "best-*.ckpt"), recursive=True)
    assert len(best) == 1
    out = tmp_path / "preds" / "match.parquet"
    main(["predict", "--config", "configs/match/dssm.yaml", *CLI_TINY, f"--trainer.default_root_dir={tmp_path}",
          f"--ckpt_path={best[0]}", f"--predict_output={out}", "--predict_top_k=4", "--predict_id_columns=[gender]"])
    paths = match_output_paths(str(out))
    users, items, topk = (pd.read_parquet(paths[n]) for n in ("user_embeddings", "item_embeddings", "topk"))
    raw = MatchDataModule(**{k: v for k, v in SMALL.items() if k != "eval_batch_size"}).default_frame()
    assert sorted(users["user_id"]) == sorted(raw["user_id"].unique())
    assert "gender" in users.columns and "gender" in topk.columns
    assert set(items["movie_id"]) <= set(raw["movie_id"])
    assert len(topk) == 4 * len(users) and topk.groupby("user_id").size().eq(4).all()
    scores = _emb(users) @ _emb(items).T
    got = topk.sort_values(["row", "rank"])["score"].to_numpy().reshape(-1, 4)
    assert (got[:, :-1] >= got[:, 1:]).all()
    # every written score is the written user's score against the written item
    col = pd.Index(items["movie_id"]).get_indexer(topk["movie_id"])
    np.testing.assert_allclose(scores[topk["row"].to_numpy(), col], topk["score"].to_numpy(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- new interactions, trained corpus
CORPUS_KW = dict(mode=0, neg_ratio=0, seq_max_len=5, batch_size=32, eval_batch_size=16, embed_dim=8,
                 user_feature_cols=["gender"], item_feature_cols=["cate_id"], genres_col=None)


def _training_frame():
    rs = np.random.RandomState(0)
    return pd.DataFrame([{"user_id": u, "movie_id": 100 + int(rs.randint(0, 60)), "timestamp": 10 * t + u,
                          "gender": "MF"[u % 2]} for u in range(40) for t in range(8)]).assign(
        cate_id=lambda f: "c" + (f["movie_id"] % 5).astype(str))


def _new_frame():
    # 3 users (one never seen in training) on 10 of the items, which were re-tagged since training;
    # user 0's gender changes on his last interaction
    rows = [{"user_id": u, "movie_id": 100 + (3 * t + u) % 10, "timestamp": 1000 + 10 * t + u, "cate_id": "c_new",
             "gender": ("F" if t == 5 else "M") if u == 0 else "F"} for u in (0, 1, 777) for t in range(6)]
    return pd.DataFrame(rows)


def _trained_dssm(tmp_path):
    dm = MatchDataModule(data=_training_frame(), **CORPUS_KW)
    torch.manual_seed(0)
    module = MatchModule(DSSM(user_params=P, item_params=P, schema=dm.schema), in_batch_neg=True)
    trainer = L.Trainer(**quiet_trainer_kwargs(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                                               enable_checkpointing=False, default_root_dir=str(tmp_path)))
    trainer.fit(module, dm)
    ckpt = str(tmp_path / "dssm.ckpt")
    trainer.save_checkpoint(ckpt)
    return dm, module, ckpt


@pytest.mark.parametrize("restore", ["preprocessing_from", "load_state_dict"])
def test_predict_on_new_interactions_covers_the_training_corpus(tmp_path, restore):
    train_dm, module, ckpt = _trained_dssm(tmp_path)
    trained = train_dm.item_corpus()
    train_items = train_dm.decode("movie_id", trained["movie_id"].numpy()).tolist()
    assert len(train_items) > 40 and set(_new_frame()["movie_id"]) < set(train_items)

    if restore == "preprocessing_from":  # what `rechub predict --ckpt_path` does
        dm = MatchDataModule(data=_new_frame(), preprocessing_from=ckpt, **CORPUS_KW)
    else:  # encoders fitted on the new file, replaced when Lightning restores the checkpoint
        dm = MatchDataModule(data=_new_frame(), **CORPUS_KW)
    writer = MatchPredictionWriter(str(tmp_path / "preds.csv"), top_k=5)
    L.Trainer(callbacks=[writer], **quiet_trainer_kwargs(default_root_dir=str(tmp_path))).predict(
        module, dm, ckpt_path=ckpt, return_predictions=False)
    users, items, topk = (_read(writer.paths[n]) for n in ("user_embeddings", "item_embeddings", "topk"))

    # the corpus is the training one: every training item, with the attributes it was trained with
    corpus = dm.item_corpus()
    for col in ("movie_id", "cate_id"):
        assert torch.equal(corpus[col], trained[col]), col
    assert items["movie_id"].tolist() == train_items
    module.eval()
    with torch.no_grad():
        expect = module.embed(dict(trained), "item").numpy()
    np.testing.assert_allclose(_emb(items), expect, rtol=1e-5, atol=1e-6)

    # top-K over the whole training corpus (brute force), without the items each user saw in the new file
    assert users["user_id"].tolist() == [0, 1, 777]
    seen = _new_frame().groupby("user_id")["movie_id"].apply(set)
    scores = _emb(users) @ _emb(items).T
    for row, uid in enumerate(users["user_id"]):
        s = scores[row].copy()
        s[items["movie_id"].isin(seen[uid]).to_numpy()] = -np.inf
        best = items["movie_id"].to_numpy()[np.argsort(-s, kind="stable")[:5]]
        got = topk[topk["row"] == row].sort_values("rank")
        assert got["movie_id"].tolist() == best.tolist()
        np.testing.assert_allclose(got["score"].to_numpy(), np.sort(s)[::-1][:5], rtol=1e-4, atol=1e-5)
    assert not set(topk["movie_id"]) <= set(_new_frame()["movie_id"])  # candidates beyond the new file's items

    # users are served as they are now: attributes of their most recent interaction in the new file
    pred = dm.dataset("predict")
    gender = dm.encoders["gender"].transform(pd.Series(["F", "F", "F"]))
    assert pred.x["gender"].tolist() == list(gender)


def test_restoring_a_checkpoint_of_the_same_interactions_changes_nothing():
    frame = _training_frame()
    frame.loc[frame.groupby("user_id")["timestamp"].idxmax(), "gender"] = "X"  # the held-out interaction: a new value
    dm = MatchDataModule(data=frame, **CORPUS_KW)
    before = {k: v.clone() for k, v in dm.dataset("predict").x.items()}
    corpus = dm.item_corpus()
    dm.load_state_dict(MatchDataModule(data=frame, **CORPUS_KW).state_dict())  # e.g. resuming a fit
    # users keep the attributes training read (not the held-out 'X'), the corpus its items
    assert set(before["gender"].tolist()) == set(dm.encoders["gender"].transform(pd.Series(["M", "F"])).tolist())
    for k, v in dm.dataset("predict").x.items():
        assert torch.equal(v, before[k]), k
    for col, v in corpus.items():
        assert torch.equal(dm.item_corpus()[col], v), col


def test_checkpoint_without_saved_corpus_falls_back_to_the_given_interactions(tmp_path, caplog):
    import logging

    _, _, ckpt = _trained_dssm(tmp_path)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    del state["MatchDataModule"]["item_profile"]  # as written before the corpus was saved
    old = str(tmp_path / "old.ckpt")
    torch.save(state, old)
    with caplog.at_level(logging.INFO):
        dm = MatchDataModule(data=_new_frame(), preprocessing_from=old, **CORPUS_KW)
    assert "holds no training item corpus" in caplog.text
    corpus = dm.decode("movie_id", dm.item_corpus()["movie_id"].numpy())
    assert set(corpus) <= set(_new_frame()["movie_id"])


def test_saved_corpus_missing_an_item_attribute_is_refused(tmp_path):
    _, _, ckpt = _trained_dssm(tmp_path)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    del state["MatchDataModule"]["item_profile"]["cate_id"]
    bad = str(tmp_path / "bad.ckpt")
    torch.save(state, bad)
    with pytest.raises(KeyError, match=r"has no column\(s\) \['cate_id'\]"):
        MatchDataModule(data=_new_frame(), preprocessing_from=bad, **CORPUS_KW)


def test_cli_predict_on_a_new_csv_covers_the_training_corpus(tmp_path):
    _training_frame().to_csv(tmp_path / "inter.csv", index=False)
    _new_frame().to_csv(tmp_path / "inter_new.csv", index=False)
    common = ["--config", "configs/match/dssm.yaml", "--data.init_args.seq_max_len=5", "--data.init_args.batch_size=64",
              "--data.init_args.embed_dim=8", "--data.init_args.user_feature_cols=[gender]",
              "--data.init_args.item_feature_cols=[cate_id]", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}"]
    main(["fit", *common, f"--data.path={tmp_path / 'inter.csv'}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"])
    best = glob.glob(str(tmp_path / "**" / "best-*.ckpt"), recursive=True)
    assert len(best) == 1
    out = tmp_path / "out" / "preds.csv"
    main(["predict", *common, f"--data.path={tmp_path / 'inter_new.csv'}", f"--ckpt_path={best[0]}",
          f"--predict_output={out}", "--predict_top_k=5"])
    items = pd.read_csv(match_output_paths(str(out))["item_embeddings"], dtype={"movie_id": str})
    # ids of a CSV are text; the training items are those before each user's last two interactions
    train = pd.read_csv(tmp_path / "inter.csv", dtype={"movie_id": str}).sort_values(["user_id", "timestamp"])
    train_items = set(train.groupby("user_id").head(-2)["movie_id"])
    assert set(items["movie_id"]) == train_items and len(items) == len(train_items)
