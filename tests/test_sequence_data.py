"""Sequence features, padding and negative sampling against torch-rechub 0.9.0."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rechub_lightning.data.sequence import (
    df_to_dict,
    gen_model_input,
    generate_seq_feature,
    generate_seq_feature_match,
    neg_sample,
    negative_sample,
    pad_sequences,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "torch-rechub-samples"
AMAZON = SAMPLES / "amazon-electronics" / "amazon_electronics_sample.csv"
ML1M = SAMPLES / "ml-1m" / "ml-1m_sample.csv"


def _ref(module: str):
    pytest.importorskip("torch_rechub")
    import importlib

    return importlib.import_module(f"torch_rechub.utils.{module}")


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        pytest.skip(f"sample file {path} is absent")
    return pd.read_csv(path)


def _cells_equal(x, y) -> bool:
    if isinstance(x, (list, np.ndarray)) or isinstance(y, (list, np.ndarray)):
        return list(np.asarray(x).tolist()) == list(np.asarray(y).tolist())
    return x == y


def _reference_time_order(data: pd.DataFrame, time_col: str, encode: bool) -> pd.Index:
    """The row order the reference's (unstable) quicksort by time produces."""
    frame = data.copy()
    if encode:  # generate_seq_feature sorts the label-encoded int32 frame
        from sklearn.preprocessing import LabelEncoder

        for col in frame:
            frame[col] = LabelEncoder().fit_transform(frame[col]) + 1
        frame = frame.astype("int32")
    return frame.sort_values(time_col).index


def _random_log(n_users=50, n_items=30, max_len=25, seed=0) -> pd.DataFrame:
    """Interactions without time ties and with dense histories (many rejected negatives)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_len, n_users)
    user = np.repeat(np.arange(n_users), lens)
    item = rng.integers(0, n_items, len(user)) * 7 + 3
    return pd.DataFrame({"user_id": user, "item_id": item, "time": rng.permutation(len(user)), "cate_id": item % 5})


# --------------------------------------------------------------------------- pad_sequences


def test_pad_sequences_hand_example():
    seqs = [[1, 2, 3, 4], [5], [], [6, 7]]
    np.testing.assert_array_equal(
        pad_sequences(seqs, maxlen=3),
        [[2, 3, 4], [0, 0, 5], [0, 0, 0], [0, 6, 7]],
    )
    np.testing.assert_array_equal(
        pad_sequences(seqs, maxlen=3, padding="post", truncating="post", value=-1),
        [[1, 2, 3], [5, -1, -1], [-1, -1, -1], [6, 7, -1]],
    )
    out = pad_sequences(seqs)
    assert out.shape == (4, 4) and out.dtype == np.int32
    np.testing.assert_array_equal(out[0], [1, 2, 3, 4])
    assert pad_sequences(seqs, maxlen=0).shape == (4, 0)
    assert pad_sequences([], maxlen=None).shape == (0, 0)


def test_pad_sequences_rejects_bad_arguments():
    with pytest.raises(ValueError, match="padding"):
        pad_sequences([[1]], padding="middle")
    with pytest.raises(ValueError, match="truncating"):
        pad_sequences([[1]], truncating="both")
    with pytest.raises(ValueError, match="maxlen"):
        pad_sequences([[1]], maxlen=-1)


@settings(max_examples=60, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(-1000, 1000), max_size=12), min_size=1, max_size=20),
    maxlen=st.one_of(st.none(), st.integers(1, 15)),
    padding=st.sampled_from(["pre", "post"]),
    truncating=st.sampled_from(["pre", "post"]),
    value=st.integers(-5, 5),
)
def test_pad_sequences_equals_reference(seqs, maxlen, padding, truncating, value):
    ref = _ref("data")
    expected = ref.pad_sequences(seqs, maxlen=maxlen, padding=padding, truncating=truncating, value=value)
    got = pad_sequences(seqs, maxlen=maxlen, padding=padding, truncating=truncating, value=value)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    # numpy inputs: arrays as rows, and a 2-D array
    got_arrays = pad_sequences([np.asarray(s, dtype=np.int64) for s in seqs], maxlen=maxlen, padding=padding,
                               truncating=truncating, value=value)
    np.testing.assert_array_equal(got_arrays, expected)
    width = max(len(s) for s in seqs)
    dense = np.array([s + [0] * (width - len(s)) for s in seqs])
    np.testing.assert_array_equal(
        pad_sequences(dense, maxlen=maxlen, padding=padding, truncating=truncating, value=value),
        ref.pad_sequences(dense, maxlen=maxlen, padding=padding, truncating=truncating, value=value),
    )


def test_pad_sequences_float_dtype_and_series():
    ref = _ref("data")
    seqs = pd.Series([[0.5, 1.5], [2.5], [3.5, 4.5, 5.5]])
    np.testing.assert_array_equal(pad_sequences(seqs, maxlen=2, dtype="float32"), ref.pad_sequences(seqs, maxlen=2, dtype="float32"))
    for dtype in ("int32", "int64"):
        # the reference truncates 0.5 to the id 0 (padding) silently; here that is an error
        with pytest.raises(ValueError, match=f"non-integer value 0.5; dtype={dtype} would truncate it"):
            pad_sequences(seqs, maxlen=2, dtype=dtype)
        whole = seqs.map(lambda s: [v + 0.5 for v in s])
        np.testing.assert_array_equal(pad_sequences(whole, maxlen=2, dtype=dtype), ref.pad_sequences(whole, maxlen=2, dtype=dtype))


# --------------------------------------------------------------------------- generate_seq_feature


@pytest.mark.parametrize("seed", [0, 1, 2022])
def test_generate_seq_feature_equals_reference_on_amazon_sample(seed):
    ref = _ref("data")
    data = _read(AMAZON)
    original = data.copy()
    random.seed(seed)
    encoded_by_reference = data.copy()
    with _quiet():
        expected = ref.generate_seq_feature(encoded_by_reference, "user_id", "item_id", "time", item_attribute_cols=["cate_id"])
    # Documented difference: we sort stably, the reference with an unstable quicksort. Fed
    # the reference's sorted order, the rows are identical.
    ordered = data.loc[_reference_time_order(data, "time", encode=True)]
    got = generate_seq_feature(ordered, "user_id", "item_id", "time", item_attribute_cols=["cate_id"], seed=seed)
    for e, g in zip(expected, got):
        pd.testing.assert_frame_equal(g, e)
    # Like the reference, the frame passed in is label-encoded in place (its examples read the
    # vocabulary sizes from it) ...
    pd.testing.assert_frame_equal(ordered.sort_index(), encoded_by_reference.sort_index(), check_dtype=False)
    # ... unless asked not to
    untouched = original.copy()
    generate_seq_feature(untouched, "user_id", "item_id", "time", item_attribute_cols=["cate_id"], seed=seed, inplace=False)
    pd.testing.assert_frame_equal(untouched, original)


def test_generate_seq_feature_global_random_state_matches_reference():
    ref = _ref("data")
    data = _random_log(seed=1)
    random.seed(11)
    with _quiet():
        expected = ref.generate_seq_feature(data.copy(), "user_id", "item_id", "time", ["cate_id"], max_len=30)
    ref_state = random.getstate()
    random.seed(11)
    got = generate_seq_feature(data, "user_id", "item_id", "time", ["cate_id"], max_len=30)  # seed=None
    assert random.getstate() == ref_state  # consumed the global stream exactly like the reference
    for e, g in zip(expected, got):
        pd.testing.assert_frame_equal(g, e)


@pytest.mark.parametrize("shuffle", [True, False])
def test_generate_seq_feature_equals_reference_with_many_rejections(shuffle):
    ref = _ref("data")
    data = _random_log(n_users=60, n_items=25, max_len=24, seed=2)  # histories cover most items
    random.seed(5)
    with _quiet():
        expected = ref.generate_seq_feature(data.copy(), "user_id", "item_id", "time", ["cate_id"],
                                            min_item=3, shuffle=shuffle, max_len=30)
    got = generate_seq_feature(data, "user_id", "item_id", "time", ["cate_id"], min_item=3, shuffle=shuffle,
                               max_len=30, seed=5)
    for e, g in zip(expected, got):
        pd.testing.assert_frame_equal(g, e)


def test_generate_seq_feature_max_len_keeps_long_users():
    """Documented difference: users longer than max_len keep val/test rows and recent history."""
    ref = _ref("data")
    data = _read(AMAZON)
    data = data.loc[_reference_time_order(data, "time", encode=True)]
    max_len = 4
    random.seed(0)
    with _quiet():
        expected = ref.generate_seq_feature(data.copy(), "user_id", "item_id", "time", shuffle=False, max_len=max_len)
    got = generate_seq_feature(data, "user_id", "item_id", "time", shuffle=False, max_len=max_len, seed=0)

    def rows(frames):
        return {(r.label, r.target_item_id, r.user_id, tuple(r.hist_item_id)) for f in frames for r in f.itertuples()}

    ref_rows, our_rows = rows(expected), rows(got)
    # Every reference row exists here; the extra rows are positions >= max_len, with full histories.
    assert ref_rows <= our_rows
    extra = our_rows - ref_rows
    assert extra and all(all(h > 0 for h in row[3]) for row in extra)
    assert all(len(row[3]) == max_len for row in our_rows)
    # Every user with >= 2 events has a test row (the reference drops users longer than max_len).
    n_users = (data.groupby("user_id").size() >= 2).sum()
    assert got[2]["user_id"].nunique() == n_users > expected[2]["user_id"].nunique()
    # The history is the most recent max_len items: test target = last item, history = the 4 before it.
    enc = {v: i + 1 for i, v in enumerate(np.sort(data["item_id"].unique()))}
    seqs = data.assign(item=data["item_id"].map(enc)).groupby("user_id", sort=True)["item"].apply(list)
    test_pos = got[2][got[2]["label"] == 1].sort_values("user_id")
    for row, seq in zip(test_pos.itertuples(), [s for s in seqs if len(s) >= 2]):
        assert row.target_item_id == seq[-1]
        assert [h for h in row.hist_item_id if h] == seq[-1 - min(max_len, len(seq) - 1):-1]


def test_generate_seq_feature_negatives_outside_history():
    data = _random_log(n_users=80, n_items=40, max_len=30, seed=3)
    train, val, test = generate_seq_feature(data, "user_id", "item_id", "time", ["cate_id"], seed=0)
    items = {v: i + 1 for i, v in enumerate(np.sort(data["item_id"].unique()))}
    users = {v: i + 1 for i, v in enumerate(np.sort(data["user_id"].unique()))}
    clicked = data.assign(u=data["user_id"].map(users), i=data["item_id"].map(items)).groupby("u")["i"].apply(set)
    for frame in (train, val, test):
        neg = frame[frame["label"] == 0]
        pos = frame[frame["label"] == 1]
        assert len(neg) == len(pos) > 0
        assert all(t not in clicked[u] for u, t in zip(neg["user_id"], neg["target_item_id"]))
        assert neg["target_item_id"].between(1, len(items)).all()
        # target attribute is the item's attribute
        cate = dict(zip(data["item_id"].map(items), data["cate_id"].rank(method="dense").astype(int)))
        assert all(cate[t] == c for t, c in zip(frame["target_item_id"], frame["target_cate_id"]))


def test_generate_seq_feature_rejects_user_with_every_item():
    data = pd.DataFrame({"u": [1, 1, 1, 2], "i": [1, 2, 3, 1], "t": [1, 2, 3, 4]})
    with pytest.raises(ValueError, match="user 1 interacted with all 3 items"):
        generate_seq_feature(data, "u", "i", "t", seed=0)
    with pytest.raises(ValueError, match="no column"):
        generate_seq_feature(data, "u", "i", "time", seed=0)


def test_generate_seq_feature_stable_for_time_ties():
    """Ties keep the input order: a log already sorted by time comes out in that order."""
    data = pd.DataFrame({"u": [1, 1, 1, 1], "i": [10, 20, 30, 40], "t": [5, 5, 5, 6], "c": [1, 1, 2, 2]})
    pool = pd.DataFrame({"u": [9] * 6, "i": [50, 60, 70, 80, 90, 100], "t": range(6), "c": [3] * 6})
    data = pd.concat([data, pool], ignore_index=True)
    _, _, test = generate_seq_feature(data, "u", "i", "t", ["c"], shuffle=False, seed=0)
    row = test.iloc[0]
    assert row["label"] == 1 and row["target_item_id"] == 4 and row["hist_item_id"][:3] == [1, 2, 3]


def test_neg_sample_equals_reference():
    ref = _ref("data")
    hist = [1, 3, 4, 7, 9]
    random.seed(3)
    expected = [ref.neg_sample(hist, 10) for _ in range(50)]
    rng = random.Random(3)
    assert [neg_sample(hist, 10, rng) for _ in range(50)] == expected
    with pytest.raises(ValueError):
        neg_sample([1, 2], 2)


# --------------------------------------------------------------------------- df_to_dict


def test_df_to_dict_equals_reference():
    ref = _ref("data")
    df = pd.DataFrame({
        "a": np.arange(4, dtype=np.int32),
        "b": np.linspace(0, 1, 4, dtype=np.float32),
        "c": [True, False, True, True],
        "s": ["x", "y", "z", "w"],
        "h": [[1, 2], [3, 4], [5, 6], [7, 8]],
        "u": np.arange(4, dtype=np.uint8),
    })
    expected = ref.df_to_dict(df)
    got = df_to_dict(df)
    assert list(got) == list(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        np.testing.assert_array_equal(got[k], expected[k])


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize("method_id", [0, 1, 2])
def test_negative_sample_equals_reference(method_id):
    ref = _ref("match")
    counts = {f"i{k}": c for k, c in enumerate([9, 7, 7, 4, 2, 2, 1, 1, 1])}
    np.random.seed(4)
    expected = ref.negative_sample(counts, ratio=200, method_id=method_id)
    np.testing.assert_array_equal(negative_sample(counts, 200, method_id, random_state=4), expected)
    np.random.seed(4)
    np.testing.assert_array_equal(negative_sample(counts, 200, method_id), expected)  # global state


def test_negative_sample_ralm_is_log_uniform_over_rank():
    counts = {k: 100 - k for k in range(50)}  # item k has rank k
    draws = negative_sample(counts, 200_000, method_id=3, random_state=0)
    freq = np.bincount(draws, minlength=50) / len(draws)
    p = np.log((np.arange(50) + 2) / (np.arange(50) + 1)) / np.log(51)
    np.testing.assert_allclose(freq, p, atol=4e-3)
    with pytest.raises(ValueError, match="method_id"):
        negative_sample(counts, 3, method_id=4)


def _match_equal_but_collisions(expected: pd.DataFrame, got: pd.DataFrame, mode: int, item_col: str) -> int:
    """Rows equal the reference's except negatives that equal the positive; returns how many were redrawn."""
    assert list(got.columns) == list(expected.columns)
    assert got.shape == expected.shape
    assert (got.dtypes == expected.dtypes).all(), (got.dtypes, expected.dtypes)
    for col in expected.columns:
        if col in (item_col, expected.columns[-1]):
            continue
        assert all(_cells_equal(x, y) for x, y in zip(expected[col], got[col])), col
    redrawn = 0
    if mode == 0:
        # a sample (user, history length) has one positive row (label 1) and its negatives
        keys = list(zip(expected.iloc[:, 0], expected["histlen_" + item_col]))
        pos_of = {k: it for k, it, lab in zip(keys, expected[item_col], expected["label"]) if lab == 1}
        assert (got["label"] == expected["label"]).all()
        for k, e, g, lab in zip(keys, expected[item_col], got[item_col], expected["label"]):
            pos = pos_of[k]
            if lab == 0:
                assert g != pos
                if e == pos:
                    redrawn += 1
                else:
                    assert g == e
            else:
                assert g == e
    else:
        assert (got[item_col] == expected[item_col]).all()
        for pos, e, g in zip(expected[item_col], expected["neg_items"], got["neg_items"]):
            e, g = np.atleast_1d(e), np.atleast_1d(g)
            assert len(e) == len(g) and not (g == pos).any()
            same = e != pos
            np.testing.assert_array_equal(g[same], e[same])
            redrawn += int((~same).sum())
    return redrawn


@pytest.mark.parametrize("mode,neg_ratio", [(0, 3), (1, 0), (2, 4)])
@pytest.mark.parametrize("method", [0, 1, 2])
def test_generate_seq_feature_match_equals_reference_on_ml1m_sample(mode, neg_ratio, method):
    ref = _ref("match")
    data = _read(ML1M)
    original = data.copy()
    np.random.seed(1)
    random.seed(1)
    with _quiet():
        exp_train, exp_test = ref.generate_seq_feature_match(
            data.copy(), "user_id", "movie_id", "timestamp", item_attribute_cols=["genres"],
            sample_method=method, mode=mode, neg_ratio=neg_ratio)
    ordered = data.loc[_reference_time_order(data, "timestamp", encode=False)]
    train, test = generate_seq_feature_match(
        ordered, "user_id", "movie_id", "timestamp", item_attribute_cols=["genres"],
        sample_method=method, mode=mode, neg_ratio=neg_ratio, seed=1)
    pd.testing.assert_frame_equal(test, exp_test)
    _match_equal_but_collisions(exp_train, train, mode, "movie_id")
    pd.testing.assert_frame_equal(data, original)  # not sorted in place


def test_generate_seq_feature_match_redraws_collisions():
    """Reference defect 8: with a skewed catalogue the reference's negatives hit the positive."""
    ref = _ref("match")
    rng = np.random.default_rng(0)
    n = 3000
    data = pd.DataFrame({
        "user_id": rng.integers(0, 100, n),
        "item_id": np.minimum(rng.zipf(1.6, n), 30),
        "time": rng.permutation(n),
    })
    np.random.seed(2)
    random.seed(2)
    with _quiet():
        exp_train, _ = ref.generate_seq_feature_match(data.copy(), "user_id", "item_id", "time",
                                                      sample_method=1, mode=2, neg_ratio=5)
    train, _ = generate_seq_feature_match(data, "user_id", "item_id", "time", sample_method=1, mode=2,
                                          neg_ratio=5, seed=2)
    assert _match_equal_but_collisions(exp_train, train, 2, "item_id") > 0


@pytest.mark.parametrize("method", [0, 1, 2, 3])
@pytest.mark.parametrize("mode,neg_ratio", [(0, 2), (1, 0), (2, 3)])
def test_match_negatives_never_equal_positive(method, mode, neg_ratio):
    rng = np.random.default_rng(method)
    n = 2000
    data = pd.DataFrame({
        "user_id": rng.integers(0, 50, n),
        "item_id": np.minimum(rng.zipf(1.4, n), 20),
        "time": rng.integers(0, 500, n),  # with ties
        "cate": rng.integers(0, 3, n),
    })
    train, test = generate_seq_feature_match(data, "user_id", "item_id", "time", ["cate"], sample_method=method,
                                             mode=mode, neg_ratio=neg_ratio, min_item=5, seed=0)
    assert (data.groupby("user_id").size() >= 5).sum() == len(test)
    if mode == 0:
        assert len(train) == (1 + neg_ratio) * (train["label"] == 1).sum()
        key = pd.Series(list(zip(train["user_id"], train["histlen_item_id"])))
        is_pos = (train["label"] == 1).to_numpy()
        pos = dict(zip(key[is_pos], train["item_id"][is_pos]))
        assert len(pos) == is_pos.sum()
        assert all(it != pos[k] for k, it in zip(key[~is_pos], train["item_id"][~is_pos]))
    else:
        negs = np.stack([np.atleast_1d(x) for x in train["neg_items"]])
        assert negs.shape[1] == max(1, neg_ratio)
        assert not (negs == train["item_id"].to_numpy()[:, None]).any()
    assert (train["histlen_item_id"] == train["hist_item_id"].map(len)).all()
    assert (train["hist_cate"].map(len) == train["histlen_item_id"]).all()


def test_generate_seq_feature_match_validates_arguments():
    data = pd.DataFrame({"u": [1, 1, 1], "i": [1, 2, 3], "t": [1, 2, 3]})
    with pytest.raises(ValueError, match="mode"):
        generate_seq_feature_match(data, "u", "i", "t", mode=3)
    with pytest.raises(ValueError, match="neg_ratio"):
        generate_seq_feature_match(data, "u", "i", "t", mode=2, neg_ratio=0)
    with pytest.raises(ValueError, match="sample_method"):
        generate_seq_feature_match(data, "u", "i", "t", sample_method=7)
    # no training rows: the reference fails with UnboundLocalError, here an empty train frame
    train, test = generate_seq_feature_match(data.iloc[:2], "u", "i", "t", mode=0, neg_ratio=1, seed=0)
    assert len(train) == 0 and len(test) == 1 and list(train.columns)[-1] == "label"


def test_gen_model_input_equals_reference():
    ref = _ref("match")
    data = _read(ML1M)
    train, test = generate_seq_feature_match(data, "user_id", "movie_id", "timestamp", ["genres"], mode=0,
                                             neg_ratio=2, seed=0)
    # hist_genres holds strings: give the model an encoded copy, as the reference's examples do
    codes = {g: k + 1 for k, g in enumerate(sorted(data["genres"].unique()))}
    train = train.assign(hist_genres=train["hist_genres"].map(lambda h: [codes[g] for g in h]))
    user_profile = data[["user_id", "gender", "age", "occupation", "zip"]].drop_duplicates("user_id")
    item_profile = data[["movie_id", "genres"]].drop_duplicates("movie_id")
    for padding, truncating in [("pre", "pre"), ("post", "post"), ("pre", "post")]:
        expected = ref.gen_model_input(train, user_profile, "user_id", item_profile, "movie_id", 20,
                                       padding=padding, truncating=truncating)
        got = gen_model_input(train, user_profile, "user_id", item_profile, "movie_id", 20, padding=padding,
                              truncating=truncating)
        assert list(got) == list(expected)
        for k in expected:
            assert got[k].dtype == expected[k].dtype, k
            np.testing.assert_array_equal(got[k], expected[k])
