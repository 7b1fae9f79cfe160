"""Synthetic Amazon-, MovieLens- and Census-shaped data: shape, determinism, planted signal."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from rechub_lightning.data.sequence import generate_seq_feature
from rechub_lightning.data.synthetic_seq import (
    CENSUS_DENSE_COLS,
    CENSUS_LABEL_COLS,
    CENSUS_REGRESSION_COL,
    CENSUS_SPARSE_COLS,
    ML_GENRES,
    make_amazon_like,
    make_census_like,
    make_movielens_like,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "torch-rechub-samples"


def _sample_columns(rel: str) -> list[str]:
    path = SAMPLES / rel
    if not path.exists():
        pytest.skip(f"sample file {path} is absent")
    return list(pd.read_csv(path, nrows=1).columns)


# --------------------------------------------------------------------------- Amazon


@pytest.fixture(scope="module")
def amazon() -> pd.DataFrame:
    return make_amazon_like()


def test_amazon_shape(amazon):
    assert list(amazon.columns) == ["user_id", "item_id", "time", "cate_id"]
    sizes = amazon.groupby("user_id").size()
    assert len(sizes) == 2000 and sizes.min() >= 5 and sizes.max() <= 30
    assert amazon["item_id"].nunique() <= 1000 and amazon["cate_id"].nunique() <= 40
    assert (amazon.groupby("item_id")["cate_id"].nunique() == 1).all()
    assert not amazon.duplicated(["user_id", "item_id"]).any()
    assert (amazon.groupby("user_id")["time"].diff().dropna() > 0).all()
    assert (amazon["time"] % 86_400 == 0).all()
    assert all(amazon[c].dtype == np.int64 for c in amazon.columns)


def test_amazon_columns_match_sample():
    assert set(make_amazon_like(n_users=5).columns) == set(_sample_columns("amazon-electronics/amazon_electronics_sample.csv"))


def test_amazon_signal_needs_history(amazon):
    """Category match with the history predicts the click; item popularity much less."""
    train, _, test = generate_seq_feature(amazon, "user_id", "item_id", "time", ["cate_id"], seed=0)
    hist = np.array(test["hist_cate_id"].tolist())
    target = test["target_cate_id"].to_numpy()[:, None]
    n_hist = np.maximum((hist > 0).sum(axis=1), 1)
    cate_match = ((hist == target) & (hist > 0)).sum(axis=1) / n_hist
    auc_history = roc_auc_score(test["label"], cate_match)
    popularity = train.loc[train["label"] == 1, "target_item_id"].value_counts()
    auc_popularity = roc_auc_score(test["label"], test["target_item_id"].map(popularity).fillna(0))
    assert auc_history >= 0.75, auc_history
    assert auc_popularity <= auc_history - 0.15, (auc_popularity, auc_history)


def test_amazon_deterministic():
    a = make_amazon_like(n_users=300, seed=7)
    pd.testing.assert_frame_equal(a, make_amazon_like(n_users=300, seed=7))
    assert not a.equals(make_amazon_like(n_users=300, seed=8))
    with pytest.raises(ValueError):
        make_amazon_like(n_items=10, n_cates=20)


# --------------------------------------------------------------------------- MovieLens


@pytest.fixture(scope="module")
def movielens():
    return make_movielens_like()


def test_movielens_shape(movielens):
    ratings = movielens.ratings
    assert list(ratings.columns) == _sample_columns("ml-1m/ml-1m_sample.csv")
    sizes = ratings.groupby("user_id").size()
    assert len(sizes) == 1000 and sizes.min() >= 20 and sizes.max() <= 100
    assert not ratings.duplicated(["user_id", "movie_id"]).any()
    assert (ratings.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    assert set(ratings["rating"].unique()) == {1, 2, 3, 4, 5}
    assert set(ratings["gender"].unique()) == {"F", "M"}
    assert set(ratings["age"].unique()) <= {1, 18, 25, 35, 45, 50, 56}
    assert ratings["zip"].str.len().eq(5).all()
    assert ratings["genres"].str.len().gt(0).all() and (ratings.groupby("movie_id")["genres"].nunique() == 1).all()
    assert movielens.user_factors.shape == (1000, 8) and movielens.item_factors.shape == (2000, 8)
    assert list(movielens.users["user_id"]) == list(range(1, 1001))
    assert movielens.movies["movie_id"].is_unique and len(movielens.movies) == 2000


def test_movielens_next_item_predictable(movielens):
    """The true latent retriever finds the last item >= 5x as often as random."""
    ratings = movielens.ratings
    logits = movielens.user_factors @ movielens.item_factors.T + movielens.item_bias
    row_of_movie = pd.Series(np.arange(len(movielens.movies)), index=movielens.movies["movie_id"])
    items = row_of_movie[ratings["movie_id"]].to_numpy()
    users = ratings["user_id"].to_numpy() - 1
    last = np.r_[users[1:] != users[:-1], True]
    scores = logits.copy()
    scores[users[~last], items[~last]] = -np.inf  # exclude the history
    top10 = np.argpartition(-scores, 10, axis=1)[:, :10]
    hit = (top10[users[last]] == items[last][:, None]).any(axis=1)
    n_hist = np.bincount(users, minlength=len(logits)) - 1
    random_recall = np.mean(10 / (logits.shape[1] - n_hist))
    assert hit.mean() >= 5 * random_recall, (hit.mean(), random_recall)


def test_movielens_deterministic():
    a = make_movielens_like(n_users=100, n_items=300, seed=3)
    b = make_movielens_like(n_users=100, n_items=300, seed=3)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    np.testing.assert_array_equal(a.user_factors, b.user_factors)
    assert not a.ratings.equals(make_movielens_like(n_users=100, n_items=300, seed=4).ratings)
    r = make_movielens_like(n_users=20, n_items=100, n_genres=20, interactions_per_user=(5, 10)).ratings
    names = set(r["genres"].str.split("|").explode())
    assert names <= set(ML_GENRES) | {"Genre19", "Genre20"} and len(names) > 10


# --------------------------------------------------------------------------- Census


@pytest.fixture(scope="module")
def census() -> pd.DataFrame:
    return make_census_like(with_regression=True)


def test_census_shape(census):
    cols = _sample_columns("census-income/census_income_train_sample.csv")
    assert list(census.columns) == cols + [CENSUS_REGRESSION_COL]
    assert set(cols) == set(CENSUS_SPARSE_COLS) | set(CENSUS_DENSE_COLS) | set(CENSUS_LABEL_COLS)
    for c in CENSUS_DENSE_COLS:
        assert census[c].between(0, 1).all(), c
    for c in CENSUS_LABEL_COLS:
        assert set(census[c].unique()) == {0, 1}
    assert 0.03 < census["income"].mean() < 0.2 and 0.2 < census["marital status"].mean() < 0.6
    assert census[list(CENSUS_LABEL_COLS)].corr().iloc[0, 1] < -0.1  # correlated tasks
    assert census[CENSUS_REGRESSION_COL].corr(census["income"]) > 0.3
    assert CENSUS_REGRESSION_COL not in make_census_like(n_rows=10).columns


def test_census_labels_learnable(census):
    sparse = [c for c in CENSUS_SPARSE_COLS if c not in CENSUS_LABEL_COLS]
    enc = ColumnTransformer([("oh", OneHotEncoder(handle_unknown="ignore"), sparse)], remainder="passthrough")
    x = enc.fit_transform(census[sparse + list(CENSUS_DENSE_COLS)])
    n_train = 15_000
    for label in CENSUS_LABEL_COLS:
        y = census[label].to_numpy()
        model = LogisticRegression(max_iter=500).fit(x[:n_train], y[:n_train])
        auc = roc_auc_score(y[n_train:], model.predict_proba(x[n_train:])[:, 1])
        assert auc >= 0.75, (label, auc)


def test_census_deterministic():
    pd.testing.assert_frame_equal(make_census_like(500, seed=1), make_census_like(500, seed=1))
    assert not make_census_like(500, seed=1).equals(make_census_like(500, seed=2))


# --------------------------------------------------------------------------- speed


def test_generators_fast_for_100k_interactions():
    for make, kw, col in [
        (make_amazon_like, dict(n_users=5800), "user_id"),
        (make_movielens_like, dict(n_users=1700), None),
        (make_census_like, dict(n_rows=100_000), None),
    ]:
        t0 = time.perf_counter()
        out = make(**kw)
        elapsed = time.perf_counter() - t0
        frame = out if isinstance(out, pd.DataFrame) else out.ratings
        assert len(frame) >= 95_000, (make.__name__, len(frame))
        assert elapsed < 2.0, (make.__name__, elapsed)
