"""Deterministic synthetic interaction and multi-task data with planted signal.

Three generators in the shapes of the public data sets Torch-RecHub's examples use
(DESIGN decision 8), each a pure function of its seed and vectorised with numpy:

* :func:`make_amazon_like` - an Amazon-Electronics click log (``user_id, item_id,
  time, cate_id``) for the sequence ranking models (DIN, DIEN, BST) through
  :func:`~rechub_lightning.data.sequence.generate_seq_feature`.
* :func:`make_movielens_like` - a MovieLens-1M ratings table with user and movie
  profiles for the matching models, plus the true latent factors.
* :func:`make_census_like` - a Census-Income table with two correlated binary labels
  (``income``, ``marital status``) and optionally a regression target for the
  multi-task models.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

__all__ = [
    "make_amazon_like",
    "make_movielens_like",
    "MovieLensLike",
    "make_census_like",
    "ML_GENRES",
    "CENSUS_LABEL_COLS",
    "CENSUS_DENSE_COLS",
    "CENSUS_SPARSE_COLS",
    "CENSUS_REGRESSION_COL",
]


def _zipf_weights(n: int, a: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -a
    return w / w.sum()


def _gumbel_argmax(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``logits`` (``(n, K)``)."""
    return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- Amazon


def make_amazon_like(
    n_users: int = 2000,
    n_items: int = 1000,
    n_cates: int = 40,
    min_len: int = 5,
    max_len: int = 30,
    seed: int = 2022,
) -> pd.DataFrame:
    """An Amazon-Electronics-shaped click log whose next click follows the history.

    Every item belongs to one category (category sizes are skewed); within a
    category, item popularity is Zipf-like. Each user has one to four favourite
    categories with Dirichlet weights. A user's clicks follow a category chain: with
    probability 0.45 the next click stays in the previous click's category, with
    probability 0.1 it goes to a random category, otherwise to a favourite; the item is
    then drawn by popularity within the category, never twice by the same user. Times
    are whole days (like the real data), strictly increasing within a user.

    Through ``generate_seq_feature(..., item_attribute_cols=["cate_id"])`` the
    positive (the actual next item) mostly shares its category with many history
    items (especially the recent ones), while the sampled negative is a uniformly
    random item: a history-aware model separates them far better than a
    history-free one (the tests measure both).

    Args:
        n_users: number of users (ids ``0..n_users-1``).
        n_items: number of items.
        n_cates: number of categories (``<= n_items``).
        min_len: fewest clicks per user.
        max_len: most clicks per user (lengths are uniform in ``[min_len, max_len]``).
        seed: everything is a deterministic function of the seed.

    Returns:
        Frame with int64 columns ``user_id, item_id, time, cate_id`` (raw, non-contiguous
        item and category ids), sorted by user then time.

    Raises:
        ValueError: inconsistent sizes.
    """
    if n_users < 1 or n_items < 2 or not 1 <= n_cates <= n_items:
        raise ValueError(f"need n_users >= 1, n_items >= 2 and 1 <= n_cates <= n_items, got "
                         f"n_users={n_users}, n_items={n_items}, n_cates={n_cates}")
    if not 1 <= min_len <= max_len or max_len >= n_items:
        raise ValueError(f"need 1 <= min_len <= max_len < n_items, got min_len={min_len}, max_len={max_len}")
    rng = np.random.default_rng(seed)

    # Categories: every category has an item, sizes skewed.
    cat_w = rng.permutation(_zipf_weights(n_cates, 0.7))
    item_cate = np.concatenate([np.arange(n_cates), rng.choice(n_cates, n_items - n_cates, p=cat_w)])
    item_cate = rng.permutation(item_cate)
    # Popularity within a category: Zipf over a random rank.
    order = np.lexsort((rng.random(n_items), item_cate))  # items grouped by category
    cat_sorted = item_cate[order]
    cat_size = np.bincount(item_cate, minlength=n_cates)
    cat_start = np.concatenate([[0], np.cumsum(cat_size)[:-1]])
    rank = np.arange(n_items) - cat_start[cat_sorted]
    w = (rank + 1.0) ** -0.8
    cs = np.cumsum(w)
    cat_end_cs = cs[cat_start + cat_size - 1]
    cat_prev_cs = np.concatenate([[0.0], cat_end_cs[:-1]])
    frac = (cs - cat_prev_cs[cat_sorted]) / (cat_end_cs - cat_prev_cs)[cat_sorted]
    frac[cat_start + cat_size - 1] = 1.0
    key = cat_sorted + frac  # item of category c, uniform u: first key > c + u

    # Users: 1..4 favourite categories with Dirichlet weights.
    n_fav_max = min(4, n_cates)
    fav = np.argsort(rng.random((n_users, n_cates)), axis=1)[:, :n_fav_max]
    n_fav = rng.integers(1, n_fav_max + 1, n_users)
    fav_w = rng.dirichlet(np.ones(n_fav_max), n_users) * (np.arange(n_fav_max)[None, :] < n_fav[:, None])
    fav_cum = np.cumsum(fav_w / fav_w.sum(axis=1, keepdims=True), axis=1)
    lens = rng.integers(min_len, max_len + 1, n_users)

    # Category chain over T steps (extra steps absorb repeated items).
    T = 3 * max_len
    pick = (rng.random((n_users, T, 1)) > fav_cum[:, None, :]).sum(axis=2).clip(max=n_fav_max - 1)
    fresh = np.take_along_axis(fav, pick, axis=1)
    explore = rng.random((n_users, T)) < 0.1
    fresh = np.where(explore, rng.choice(n_cates, (n_users, T), p=cat_w), fresh)
    stay = rng.random((n_users, T)) < 0.45
    stay[:, 0] = False
    src = np.maximum.accumulate(np.where(stay, 0, np.arange(T)[None, :]), axis=1)
    cats = np.take_along_axis(fresh, src, axis=1)
    items = order[np.searchsorted(key, cats + rng.random((n_users, T)), side="right")]

    # Keep each user's first click on an item, then his first lens[u] clicks.
    user = np.repeat(np.arange(n_users), T)
    flat = items.reshape(-1)
    _, first = np.unique(user * n_items + flat, return_index=True)
    keep = np.zeros(len(flat), dtype=bool)
    keep[first] = True
    user, flat = user[keep], flat[keep]
    counts = np.bincount(user, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    nth = np.arange(len(user)) - starts[user]
    sel = nth < lens[user]
    user, flat = user[sel], flat[sel]
    short = np.flatnonzero(np.bincount(user, minlength=n_users) < min_len)
    if len(short):  # rare: top up with random unseen items
        extra_u, extra_i = [], []
        for u in short:
            seen = flat[user == u]
            pool = np.setdiff1d(np.arange(n_items), seen)
            add = rng.choice(pool, min_len - len(seen), replace=False)
            extra_u.append(np.full(len(add), u))
            extra_i.append(add)
        user = np.concatenate([user, *extra_u])
        flat = np.concatenate([flat, *extra_i])
        o = np.argsort(user, kind="stable")
        user, flat = user[o], flat[o]

    # Times: whole days, strictly increasing per user.
    counts = np.bincount(user, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    day0 = rng.integers(0, 1500, n_users)
    gaps = rng.geometric(1 / 15, len(user))
    cum = np.cumsum(gaps)
    day = day0[user] + cum - (cum[starts] - gaps[starts])[user]
    time = 1_262_304_000 + day.astype(np.int64) * 86_400

    item_ids = np.sort(rng.choice(n_items * 60, n_items, replace=False))[rng.permutation(n_items)]
    cate_ids = rng.choice(n_cates * 20, n_cates, replace=False)
    return pd.DataFrame({
        "user_id": user.astype(np.int64),
        "item_id": item_ids[flat].astype(np.int64),
        "time": time,
        "cate_id": cate_ids[item_cate[flat]].astype(np.int64),
    })


# --------------------------------------------------------------------------- MovieLens

ML_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_ML_AGES = np.array([1, 18, 25, 35, 45, 50, 56])
_ML_AGE_P = np.array([0.037, 0.183, 0.347, 0.197, 0.091, 0.082, 0.063])
_ML_RATING_CDF = np.array([0.056, 0.164, 0.425, 0.774])  # ml-1m's rating shares 1..4, cumulated


class MovieLensLike(NamedTuple):
    """What :func:`make_movielens_like` returns.

    Attributes:
        ratings: ``user_id, movie_id, rating, timestamp, title, genres, gender, age,
            occupation, zip`` (ml-1m's columns), sorted by user then time.
        users: ``user_id, gender, age, occupation, zip``, one row per user.
        movies: ``movie_id, title, genres``, one row per movie.
        user_factors: ``(n_users, dim)`` true tastes, rows in ``users`` order.
        item_factors: ``(n_items, dim)`` true topics, rows in ``movies`` order.
        item_bias: ``(n_items,)`` log popularity prior. A user's clicks are drawn one
            after the other, without replacement, from
            ``softmax(user_factors @ item_factors.T + item_bias)``.
    """

    ratings: pd.DataFrame
    users: pd.DataFrame
    movies: pd.DataFrame
    user_factors: np.ndarray
    item_factors: np.ndarray
    item_bias: np.ndarray


def make_movielens_like(
    n_users: int = 1000,
    n_items: int = 2000,
    n_genres: int = 18,
    interactions_per_user: tuple[int, int] = (20, 100),
    dim: int = 8,
    seed: int = 2022,
) -> MovieLensLike:
    """A MovieLens-1M-shaped ratings table generated from low-rank tastes.

    Users have latent tastes (partly explained by gender, age and occupation), movies
    latent topics (their genres are the topics' closest genre directions) and a Zipf
    popularity prior. Each user's interactions are drawn sequentially without
    replacement from ``softmax(taste . topic + log popularity)`` (Gumbel top-k), and
    the draw order is the time order: the next item is a softmax draw over the
    movies not yet seen, so it is predictable from the user (and from his history,
    which reveals his taste). Ratings grow with ``taste . topic`` and follow ml-1m's
    rating shares.

    Args:
        n_users: number of users (ids ``1..n_users``).
        n_items: number of movies (ids scattered in ``1..2 * n_items``).
        n_genres: number of genres (ml-1m's 18 names first).
        interactions_per_user: inclusive range of the number of ratings per user.
        dim: latent dimension.
        seed: everything is a deterministic function of the seed.

    Returns:
        A :class:`MovieLensLike` (a named tuple whose first field is the ratings frame).

    Raises:
        ValueError: inconsistent sizes.
    """
    lo, hi = (int(v) for v in interactions_per_user)
    if n_users < 1 or n_genres < 1 or dim < 1 or not 1 <= lo <= hi <= n_items - 1:
        raise ValueError(f"need n_users, n_genres, dim >= 1 and 1 <= min <= max < n_items, got n_users={n_users}, "
                         f"n_items={n_items}, n_genres={n_genres}, dim={dim}, interactions_per_user={interactions_per_user}")
    rng = np.random.default_rng(seed)
    genre_names = list(ML_GENRES[:n_genres]) + [f"Genre{j + 1}" for j in range(len(ML_GENRES), n_genres)]

    # Movies: topics, popularity prior, genres from the topics.
    V = rng.normal(size=(n_items, dim)) / np.sqrt(dim)
    item_bias = -0.8 * np.log1p(rng.permutation(n_items).astype(np.float64))
    item_bias -= item_bias.mean()
    G = rng.normal(size=(n_genres, dim))
    aff = V @ G.T
    primary = np.argmax(aff, axis=1)
    extra = aff > np.quantile(aff, 0.9)
    extra[np.arange(n_items), primary] = True
    top3 = np.argsort(-aff, axis=1)[:, : min(3, n_genres)]
    in_top3 = np.zeros_like(extra)
    np.put_along_axis(in_top3, top3, True, axis=1)
    has = extra & in_top3
    names = np.array(genre_names, dtype=object)
    genres = np.array(["|".join(sorted(names[row])) for row in has], dtype=object)
    movie_ids = np.sort(rng.choice(np.arange(1, 2 * n_items + 1), n_items, replace=False))
    years = rng.integers(1919, 2001, n_items)
    titles = np.array([f"Movie {m} ({y})" for m, y in zip(movie_ids.tolist(), years.tolist())], dtype=object)

    # Users: demographics and tastes partly explained by them.
    gender = np.where(rng.random(n_users) < 0.28, "F", "M").astype(object)
    age_idx = rng.choice(len(_ML_AGES), n_users, p=_ML_AGE_P / _ML_AGE_P.sum())
    occupation = rng.integers(0, 21, n_users)
    zips = np.char.zfill(rng.integers(0, 100_000, n_users).astype(str), 5).astype(object)
    demo = (rng.normal(size=(2, dim))[(gender == "F").astype(int)]
            + rng.normal(size=(len(_ML_AGES), dim))[age_idx]
            + rng.normal(size=(21, dim))[occupation])
    U = 2.2 * (0.6 * demo / np.sqrt(3) + 0.8 * rng.normal(size=(n_users, dim)))

    # Sequential softmax sampling without replacement = order by logit + Gumbel (Plackett-Luce).
    n_per = rng.integers(lo, hi + 1, n_users)
    seqs = np.empty((n_users, hi), dtype=np.int64)
    chunk = max(1, 4_000_000 // n_items)
    for a in range(0, n_users, chunk):
        b = min(n_users, a + chunk)
        z = U[a:b] @ V.T + item_bias + rng.gumbel(size=(b - a, n_items))
        top = np.argpartition(-z, hi - 1, axis=1)[:, :hi]
        seqs[a:b] = np.take_along_axis(top, np.argsort(-np.take_along_axis(z, top, axis=1), axis=1), axis=1)
    mask = np.arange(hi)[None, :] < n_per[:, None]
    user = np.repeat(np.arange(n_users), n_per)
    item = seqs[mask]

    # Ratings: affinity + noise, cut at ml-1m's rating shares.
    score = np.einsum("nd,nd->n", U[user], V[item]) + rng.normal(0.0, 0.6, len(user))
    rating = 1 + np.searchsorted(np.quantile(score, _ML_RATING_CDF), score, side="right")
    # Timestamps: strictly increasing per user, within ml-1m's period.
    starts = np.concatenate([[0], np.cumsum(n_per)[:-1]])
    gaps = 1 + rng.geometric(1 / 90, len(user))
    cum = np.cumsum(gaps)
    t0 = 956_703_932 + rng.integers(0, 60_000_000, n_users)
    ts = t0[user] + cum - (cum[starts] - gaps[starts])[user]

    user_ids = np.arange(1, n_users + 1)
    ages = _ML_AGES[age_idx]
    ratings = pd.DataFrame({
        "user_id": user_ids[user],
        "movie_id": movie_ids[item],
        "rating": rating.astype(np.int64),
        "timestamp": ts.astype(np.int64),
        "title": titles[item],
        "genres": genres[item],
        "gender": gender[user],
        "age": ages[user],
        "occupation": occupation[user],
        "zip": zips[user],
    })
    users = pd.DataFrame({"user_id": user_ids, "gender": gender, "age": ages, "occupation": occupation, "zip": zips})
    movies = pd.DataFrame({"movie_id": movie_ids, "title": titles, "genres": genres})
    return MovieLensLike(ratings, users, movies, U, V, item_bias)


# --------------------------------------------------------------------------- Census

CENSUS_SPARSE_COLS = (
    "class of worker", "industry code", "occupation code", "education", "enrolled in edu inst last wk",
    "marital status", "major industry code", "major occupation code", "race", "hispanic origin", "sex",
    "member of a labor union", "reason for unemployment", "full or part time employment stat", "tax filer status",
    "region of previous residence", "state of previous residence", "detailed household and family stat",
    "detailed household summary in household", "migration code-change in msa", "migration code-change in reg",
    "migration code-move within reg", "live in this house 1 year ago", "migration prev res in sunbelt",
    "family members under 18", "country of birth father", "country of birth mother", "country of birth self",
    "citizenship", "own business or self employed", "fill inc questionnaire for veterans admin", "veterans benefits",
    "year",
)
"""Categorical columns of the census sample (``marital status`` is also the second label)."""
CENSUS_DENSE_COLS = (
    "age", "wage per hour", "capital gains", "capital losses", "divdends from stocks",
    "num persons worked for employer", "weeks worked in year",
)
"""The seven dense columns, scaled to ``[0, 1]`` as in the sample."""
CENSUS_LABEL_COLS = ("income", "marital status")
"""The reference's census tasks: ``income`` (> 50k, the CVR-like main task), ``marital status`` (never married)."""
CENSUS_REGRESSION_COL = "log income"
"""The optional regression target of :func:`make_census_like`."""

_CENSUS_ORDER = (
    "age", "class of worker", "industry code", "occupation code", "education", "wage per hour",
    "enrolled in edu inst last wk", "marital status", "major industry code", "major occupation code", "race",
    "hispanic origin", "sex", "member of a labor union", "reason for unemployment",
    "full or part time employment stat", "capital gains", "capital losses", "divdends from stocks",
    "tax filer status", "region of previous residence", "state of previous residence",
    "detailed household and family stat", "detailed household summary in household",
    "migration code-change in msa", "migration code-change in reg", "migration code-move within reg",
    "live in this house 1 year ago", "migration prev res in sunbelt", "num persons worked for employer",
    "family members under 18", "country of birth father", "country of birth mother", "country of birth self",
    "citizenship", "own business or self employed", "fill inc questionnaire for veterans admin",
    "veterans benefits", "weeks worked in year", "year", "income",
)
# Vocabulary sizes of the real data set's categorical columns.
_CENSUS_CARD = {
    "class of worker": 9, "industry code": 52, "occupation code": 47, "education": 17,
    "enrolled in edu inst last wk": 3, "major industry code": 24, "major occupation code": 15, "race": 5,
    "hispanic origin": 10, "member of a labor union": 3, "reason for unemployment": 6,
    "full or part time employment stat": 8, "tax filer status": 6, "region of previous residence": 6,
    "state of previous residence": 51, "detailed household and family stat": 38,
    "detailed household summary in household": 8, "migration code-change in msa": 10,
    "migration code-change in reg": 9, "migration code-move within reg": 10, "live in this house 1 year ago": 3,
    "migration prev res in sunbelt": 4, "family members under 18": 5, "country of birth father": 43,
    "country of birth mother": 43, "country of birth self": 43, "citizenship": 5,
    "own business or self employed": 3, "fill inc questionnaire for veterans admin": 3, "veterans benefits": 3,
}


def make_census_like(n_rows: int = 20000, seed: int = 2022, with_regression: bool = False) -> pd.DataFrame:
    """A Census-Income-shaped table with two correlated labels for multi-task models.

    Rows are people with a latent age, skill and employment. Education, occupation,
    class of worker, weeks worked, capital gains, household and tax-filer columns
    follow those latents; the other columns are Zipf-distributed noise with the real
    data set's vocabulary sizes. ``income`` (> 50k, about 8 % positive) grows with
    skill, employment, prime age, sex and being married; ``marital status`` (1 =
    never married, about 40 %) falls with age and shows in the household and tax
    columns, so the labels are negatively correlated like the real ones. A logistic
    regression on one-hot features reaches an AUC well above 0.75 on each.

    Args:
        n_rows: number of rows.
        seed: everything is a deterministic function of the seed.
        with_regression: add ``"log income"``, a continuous target sharing the
            income label's linear predictor (for regression tasks).

    Returns:
        Frame with the sample's 41 columns in its order (categorical codes int64,
        the seven dense columns float64 in ``[0, 1]``, ``income`` last), plus
        ``"log income"`` when asked.
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got n_rows={n_rows}")
    rng = np.random.default_rng(seed)
    n = n_rows
    out: dict[str, np.ndarray] = {}

    # Latents.
    child = rng.random(n) < 0.2
    age = np.where(child, rng.uniform(0, 18, n), np.clip(rng.normal(42, 16, n), 18, 90))
    skill = rng.normal(size=n)
    employed = ~child & (rng.random(n) < _sigmoid(2.2 + 0.6 * skill - 0.004 * (age - 40) ** 2))
    sex = (rng.random(n) < 0.48).astype(np.int64)
    never_married = child | (rng.random(n) < _sigmoid(0.8 - 0.09 * (age - 18) - 0.3 * skill))
    married = ~never_married & (rng.random(n) < 0.8)  # the rest are divorced/widowed

    def noise(col: str, a: float = 1.2) -> np.ndarray:
        k = _CENSUS_CARD[col]
        return rng.permutation(k)[rng.choice(k, n, p=_zipf_weights(k, a))]

    for col in _CENSUS_CARD:
        out[col] = noise(col)

    # Education: ordinal level from age and skill, codes are a fixed permutation.
    level = np.clip(np.round(np.where(child, age / 2.5, 8 + 2.2 * skill + rng.normal(0, 1.2, n))), 0, 16)
    out["education"] = rng.permutation(17)[level.astype(int)]
    out["enrolled in edu inst last wk"] = np.where(child | (age < 24) & (rng.random(n) < 0.5), 2, 0)
    # Work: class of worker, occupations, industries, weeks, employment stat.
    cls_logits = rng.normal(0, 1, (1, 9)) + np.outer(skill, rng.normal(0, 0.6, 9))
    out["class of worker"] = np.where(employed, _gumbel_argmax(rng, cls_logits), 3)
    maj_occ = _gumbel_argmax(rng, np.outer(skill, np.linspace(-1.5, 1.5, 15)) + rng.normal(0, 0.5, (1, 15)))
    out["major occupation code"] = np.where(employed, maj_occ, 6)
    out["occupation code"] = np.where(employed, (maj_occ * 3 + rng.integers(0, 3, n)) % 47 + 1, 0)
    maj_ind = rng.choice(24, n, p=_zipf_weights(24, 0.8))
    out["major industry code"] = np.where(employed, maj_ind, 14)
    out["industry code"] = np.where(employed, (maj_ind * 2 + rng.integers(0, 2, n)) % 52 + 1, 0)
    weeks = np.where(employed, np.round(52 * rng.beta(6, 1, n)), np.where(child, 0, np.round(52 * rng.beta(0.3, 3, n))))
    out["full or part time employment stat"] = np.where(employed, np.where(weeks > 40, 1, 2), 0)
    out["own business or self employed"] = np.where(employed, rng.choice(3, n, p=[0.85, 0.1, 0.05]), 0)
    # Household, tax filing, children: track marital status and age.
    hh = np.where(child, rng.choice([0, 1, 2], n),
                  np.where(married, rng.choice([20, 22], n), np.where(never_married, rng.choice([8, 10, 26], n),
                                                                      rng.choice([35, 37], n))))
    out["detailed household and family stat"] = np.where(rng.random(n) < 0.5, out["detailed household and family stat"], hh)
    hs = np.where(child, 0, np.where(married, 4, np.where(never_married, 2, 7)))
    out["detailed household summary in household"] = np.where(rng.random(n) < 0.5, out["detailed household summary in household"], hs)
    tax = np.where(child, 4, np.where(married, 2, np.where(employed, 5, 4)))
    out["tax filer status"] = np.where(rng.random(n) < 0.5, out["tax filer status"], tax)
    fam = np.where(child, rng.choice([0, 1, 2], n, p=[0.7, 0.2, 0.1]), 4)
    out["family members under 18"] = np.where(rng.random(n) < 0.3, out["family members under 18"], fam)
    out["sex"] = sex
    out["year"] = rng.integers(0, 2, n)
    out["fill inc questionnaire for veterans admin"] = np.where(rng.random(n) < 0.99, 1, rng.integers(0, 3, n))

    # Dense columns, in [0, 1] like the sample.
    cap_gain = np.where(rng.random(n) < 0.03 + 0.05 * _sigmoid(2 * skill - 2), rng.beta(1, 12, n), 0.0)
    dense = {
        "age": np.round(age) / 90,
        "wage per hour": np.where(employed & (rng.random(n) < 0.15), rng.beta(2, 25, n), 0.0),
        "capital gains": cap_gain,
        "capital losses": np.where(rng.random(n) < 0.02, rng.beta(8, 12, n), 0.0),
        "divdends from stocks": np.where(rng.random(n) < 0.1 + 0.1 * (skill > 1), rng.beta(1, 200, n), 0.0),
        "num persons worked for employer": np.where(employed, rng.integers(1, 7, n), 0) / 6,
        "weeks worked in year": weeks / 52,
    }
    for col, v in dense.items():
        out[col] = np.round(v, 4)

    # Labels.
    prime = -((age - 48) / 14) ** 2
    eta = (-6.2 + 1.3 * skill + 1.4 * employed + 0.9 * prime + 0.8 * sex + 0.7 * married
           + 2.5 * weeks / 52 + 15 * cap_gain - 2.0 * child)
    income = (rng.random(n) < _sigmoid(eta)).astype(np.int64)
    out["income"] = income
    out["marital status"] = never_married.astype(np.int64)

    frame = pd.DataFrame({c: out[c] for c in _CENSUS_ORDER})
    for c in _CENSUS_ORDER:
        if c not in dense:
            frame[c] = frame[c].astype(np.int64)
    if with_regression:
        frame[CENSUS_REGRESSION_COL] = np.round(10.3 + 0.45 * eta + rng.normal(0, 0.4, n), 4)
    return frame
