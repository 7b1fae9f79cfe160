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
