"""The batched data path, preprocessing and the CTR datamodule."""

import numpy as np
import pandas as pd
import pytest
import torch

from rechub_lightning.data import (
    CategoryEncoder,
    CTRDataModule,
    DataGenerator,
    DenseScaler,
    ShuffledBatchSampler,
    TensorDictDataset,
    UnrepeatedBatchSampler,
    make_criteo_like,
    make_dataloader,
)


# ----------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("n,bs,world", [(103, 10, 2), (100, 7, 3), (5, 10, 2), (64, 8, 1), (101, 10, 2), (22, 7, 3)])
def test_training_batches_are_disjoint_across_ranks(n, bs, world):
    per_rank = [list(ShuffledBatchSampler(n, bs, seed=3, num_replicas=world, rank=r)) for r in range(world)]
    lengths = {len(b) for b in per_rank}
    assert len(lengths) == 1  # every rank runs the same number of steps
    nb = n // bs if n > bs and n % bs == 1 else -(-n // bs)  # a 1-row tail joins the batch before it
    assert len(per_rank[0]) == -(-nb // world)
    seen = [tuple(b.tolist()) for r in per_rank for b in r]
    distinct = set(seen)
    assert len(distinct) == nb  # all batches dealt; repeats only to even out the ranks
    rows = sorted(i for b in distinct for i in b)
    assert rows == list(range(n))
    if nb % world == 0:
        assert len(seen) == len(distinct)


@pytest.mark.parametrize("n,bs,drop_last,sizes", [
    (21, 5, False, [5, 5, 5, 6]),  # the 1-row tail joins the last full batch
    (22, 5, False, [5, 5, 5, 5, 2]),
    (21, 5, True, [5, 5, 5, 5]),
    (1, 5, False, [1]),  # nothing to merge with
    (6, 5, False, [6]),
])
def test_a_one_row_tail_joins_the_batch_before_it(n, bs, drop_last, sizes):
    from rechub_lightning.data.datasets import batch_sizes

    for shuffle in (False, True):
        s = ShuffledBatchSampler(n, bs, shuffle=shuffle, drop_last=drop_last, seed=1)
        batches = list(s)
        assert [len(b) for b in batches] == sizes and len(s) == len(sizes)
        rows = torch.cat(batches).tolist()
        assert len(rows) == len(set(rows)) and set(rows) <= set(range(n))
        assert len(rows) == (n // bs * bs if drop_last else n)  # no row dropped or repeated
    loader = make_dataloader(TensorDictDataset({"a": np.arange(n)}, np.zeros(n)), bs, shuffle=True, drop_last=drop_last)
    assert batch_sizes(loader) == (bs, min(sizes), n)


def test_training_order_reshuffles_per_epoch_and_is_reproducible():
    s = ShuffledBatchSampler(50, 10, seed=7)
    e0 = torch.cat(list(s))
    s.set_epoch(1)
    e1 = torch.cat(list(s))
    assert not torch.equal(e0, e1)
    s2 = ShuffledBatchSampler(50, 10, seed=7)
    s2.set_epoch(1)
    assert torch.equal(torch.cat(list(s2)), e1)


@pytest.mark.parametrize("n,world", [(101, 2), (10, 3), (8, 8)])
def test_eval_batches_never_pad_or_repeat(n, world):
    parts = [torch.cat(list(UnrepeatedBatchSampler(n, 4, num_replicas=world, rank=r))) for r in range(world)]
    assert all(len(p) for p in parts)  # every rank has rows: Lightning skips a rank without batches
    assert torch.equal(torch.cat(parts), torch.arange(n))  # contiguous slices, input order


def test_eval_batches_fewer_rows_than_processes_refused_on_every_rank():
    """7 rows for 8 processes: rank 7 had no batch, Lightning refused its loader there alone
    (or, allowed, skipped its epoch hooks and left the others waiting in the metric sync). Every
    rank now raises the same error, naming the rows, the processes and the way out."""
    for rank in range(8):
        with pytest.raises(ValueError, match=r"7 row\(s\) for 8 processes.*--trainer.devices"):
            len(UnrepeatedBatchSampler(7, 4, num_replicas=8, rank=rank))
    assert len(UnrepeatedBatchSampler(0, 4, num_replicas=8, rank=3)) == 0  # no rows at all: Lightning's own warning


def test_dataloader_yields_gathered_batches():
    x = {"a": np.arange(10), "b": np.arange(10, dtype=np.float64) / 10, "s": np.arange(30).reshape(10, 3)}
    ds = TensorDictDataset(x, np.arange(10) % 2)
    batches = list(make_dataloader(ds, 4, shuffle=True, seed=1))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    xb, yb = batches[0]
    assert xb["a"].dtype == torch.int64 and xb["b"].dtype == torch.float32 and xb["s"].shape == (4, 3)
    assert torch.equal(xb["s"][:, 0], xb["a"] * 3)  # rows stay aligned across columns
    assert torch.equal(yb, (xb["a"] % 2).float())


def test_string_column_is_rejected_with_its_name():
    with pytest.raises(TypeError, match="'city'"):
        TensorDictDataset({"city": np.array(["a", "b"])})


# ----------------------------------------------------------------------------- DataGenerator
def test_datagenerator_batches_match_reference_format():
    trh_data = pytest.importorskip("torch_rechub.utils.data")
    rng = np.random.default_rng(0)
    x = {"c": rng.integers(0, 5, 40), "d": rng.random(40).astype(np.float32), "h": rng.integers(0, 5, (40, 6))}
    y = rng.integers(0, 2, 40)
    ours = DataGenerator(x, y, seed=0).generate_dataloader(split_ratio=[0.5, 0.25], batch_size=8)
    ref = trh_data.DataGenerator(x, y).generate_dataloader(split_ratio=[0.5, 0.25], batch_size=8)
    for dl_o, dl_r in zip(ours, ref):
        bo, br = next(iter(dl_o)), next(iter(dl_r))
        assert isinstance(bo, (tuple, list)) and len(bo) == 2
        assert set(bo[0]) == set(br[0])
        for k in br[0]:
            assert bo[0][k].shape == br[0][k].shape
            assert bo[0][k].dtype.is_floating_point == br[0][k].dtype.is_floating_point
        assert bo[1].shape == br[1].shape
        assert len(dl_o.dataset) == len(dl_r.dataset)
    # each batch row is a row of the input
    xb, yb = next(iter(ours[0]))
    for i in range(len(yb)):
        row = int(np.nonzero((x["h"] == xb["h"][i].numpy()).all(1) & (x["c"] == int(xb["c"][i])))[0][0])
        assert y[row] == yb[i]


def test_datagenerator_explicit_splits():
    x = {"c": np.arange(10)}
    dls = DataGenerator(x, np.zeros(10)).generate_dataloader(x, np.ones(10), x, np.ones(10), batch_size=3)
    assert [len(d.dataset) for d in dls] == [10, 10, 10]
    assert torch.all(next(iter(dls[1]))[1] == 1)


# ----------------------------------------------------------------------------- preprocessing
def test_category_encoder_frequency_order_unknown_and_missing():
    enc = CategoryEncoder().fit(pd.Series(["b", "a", "b", None, "c", "b", "a", ""]))
    assert enc.categories == ["b", "a", "c"]
    assert enc.missing_id == 4 and enc.vocab_size == 5
    ids = enc.transform(pd.Series(["a", "zzz", None, "b", ""]))
    assert ids.tolist() == [2, 0, 4, 1, 4]


def test_category_encoder_min_freq_and_numeric_string_agreement():
    enc = CategoryEncoder(min_freq=2).fit(pd.Series([3, 3, 5, 7, 7, 7]))
    assert enc.categories == [7.0, 3.0]
    assert enc.transform(pd.Series([5, 7, 3])).tolist() == [0, 1, 2]
    assert enc.transform(pd.Series(["7", "3", "x"])).tolist() == [1, 2, 0]  # same ids from a text column
    enc2 = CategoryEncoder().fit(pd.Series(["1", "2"]))
    assert enc2.transform(pd.Series([1.0, 2, np.nan])).tolist() == [1, 2, 0]
    restored = CategoryEncoder().load_state_dict(enc.state_dict())
    assert restored.transform(pd.Series([7, 3])).tolist() == [1, 2]


def test_dense_scaler_fill_and_scaling():
    v = np.array([1.0, 2.0, np.nan, 5.0])
    s = DenseScaler("standard").fit(v)
    out = s.transform(v)
    finite = v[~np.isnan(v)]
    np.testing.assert_allclose(out[[0, 1, 3]], (finite - finite.mean()) / finite.std(), rtol=1e-6)
    assert out[2] == 0.0
    mm = DenseScaler("minmax").fit(v).transform(np.array([1.0, 5.0, 3.0]))
    np.testing.assert_allclose(mm, [0, 1, 0.5])
    with pytest.raises(ValueError, match="dense_scaling"):
        DenseScaler("zscore")


# ----------------------------------------------------------------------------- CTRDataModule
def test_default_data_schema_before_setup_and_deterministic():
    a = CTRDataModule(synthetic_rows=3000, synthetic_max_vocab=500)
    b = CTRDataModule(synthetic_rows=3000, synthetic_max_vocab=500)
    assert len(a.schema.sparse) == 26 and len(a.schema.dense) == 13
    assert a.schema == b.schema
    a.setup("fit"), b.setup("fit")
    assert torch.equal(a.dataset("train").y, b.dataset("train").y)
    xa, _ = next(iter(a.train_dataloader()))
    xb, _ = next(iter(b.train_dataloader()))
    assert all(torch.equal(xa[k], xb[k]) for k in xa)


def test_preprocessing_fitted_on_train_only():
    df = pd.DataFrame({"label": [0, 1] * 50, "cat": ["a"] * 80 + ["only_in_eval"] * 20, "num": np.arange(100.0)})
    dm = CTRDataModule(data=df, val_path=None, split_ratio=(0.8, 0.1), seed=0)
    train_rows = dm.raw_frame("train")
    assert dm.preprocessor.encoders["cat"].categories == sorted(set(train_rows["cat"]), key=lambda c: -list(train_rows["cat"]).count(c))
    assert dm.preprocessor.scalers["num"].stats["mean"] == pytest.approx(train_rows["num"].mean())


def test_inferred_features_and_bad_labels(tmp_path):
    df = pd.DataFrame({"label": [0, 1, 1, 0] * 10, "city": list("abcd") * 10, "age": np.arange(40.0)})
    dm = CTRDataModule(data=df)
    assert [f.name for f in dm.schema.sparse] == ["city"] and [f.name for f in dm.schema.dense] == ["age"]
    bad = df.assign(label=[0, 2] * 20)
    with pytest.raises(ValueError, match="'label'.*0 or 1"):
        CTRDataModule(data=bad).setup("fit")
    with pytest.raises(KeyError, match="'click'"):
        CTRDataModule(data=df, label="click")
    with pytest.raises(KeyError, match="'zip'"):
        CTRDataModule(data=df, sparse_features=["city", "zip"], dense_features=["age"])
    text = df.assign(age=["x"] + [1.0] * 39)
    with pytest.raises(TypeError, match="'age'"):
        CTRDataModule(data=text, sparse_features=["city"], dense_features=["age"])


def test_preencoded_ids_out_of_range_fail_at_setup():
    df = pd.DataFrame({"label": [0, 1] * 20, "c": list(range(40))})
    dm = CTRDataModule(data=df, sparse_features=["c"], dense_features=[], preprocess=False, split_ratio=(0.5, 0.25), seed=1)
    train_max = int(dm.raw_frame("train")["c"].max())
    assert dm.schema["c"].vocab_size == train_max + 1
    if int(dm.raw_frame("val")["c"].max()) > train_max:
        with pytest.raises(ValueError, match=r"sparse feature 'c'.*outside \[0, "):
            dm.setup("fit")


def test_criteo_sample_csv(samples):
    path = samples / "criteo" / "criteo_sample.csv"
    dm = CTRDataModule(path=str(path), label="label", batch_size=16)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    for f in dm.schema.sparse:
        assert int(x[f.name].max()) < f.vocab_size
    for f in dm.schema.dense:
        assert torch.isfinite(x[f.name]).all()


def test_synthetic_generator_shape_and_signal():
    df = make_criteo_like(n_rows=20000, max_vocab=2000, seed=1)
    assert list(df.columns[:2]) == ["label", "I1"] and df.shape[1] == 1 + 13 + 26
    assert df.equals(make_criteo_like(n_rows=20000, max_vocab=2000, seed=1))
    assert 0.2 < df["label"].mean() < 0.8
    assert df["I1"].isna().any()
    # planted signal: the per-id click rate of a signal field separates classes
    from sklearn.metrics import roc_auc_score

    rate = df.groupby("C1")["label"].transform("mean")
    assert roc_auc_score(df["label"], rate) > 0.6


def test_a_dense_column_without_training_values_is_reported_by_name():
    """An all-missing dense column becomes a constant after NaN filling: said, not silent."""
    import warnings

    from rechub_lightning.data import Preprocessor

    frame = pd.DataFrame({"a": ["x", "y", "x", "z"], "d": [np.nan] * 4, "e": [1.0, np.nan, 3.0, 4.0]})
    with pytest.warns(UserWarning, match=r"dense feature\(s\) \['d'\] have no value in the training data"):
        p = Preprocessor(sparse=["a"], dense=["d", "e"]).fit(frame)
    assert (p.transform(frame)["d"] == 0).all()  # what the warning says: a constant
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a column with some values does not warn
        Preprocessor(sparse=["a"], dense=["e"]).fit(frame)


# ----------------------------------------------------------------------------- files read like the training rows
def _ids(dm, split, col):
    dm.setup("fit")
    dm.setup("test")
    ds = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]().dataset
    return ds.x[col].reshape(len(ds), -1)[:, 0].tolist()


def test_text_categories_in_a_separate_file_keep_their_training_ids(tmp_path):
    """A val/test file is not re-guessed column by column: "02134" (a zip code) and "287130e0" (a hash)
    read as the numbers 2134 and 287130.0 from a file of their own and became the unknown id 0."""
    train = pd.DataFrame({"zip": ["02134", "10001", "98107-4311", "287130e0"] * 5, "label": [0, 1] * 10})
    val = pd.DataFrame({"zip": ["02134", "287130e0", "10001"], "label": [0, 1, 0]})
    train.to_csv(tmp_path / "train.csv", index=False)
    val.to_csv(tmp_path / "val.csv", index=False)
    val.to_csv(tmp_path / "test.csv", index=False)
    dm = CTRDataModule(path=str(tmp_path / "train.csv"), val_path=str(tmp_path / "val.csv"), test_path=str(tmp_path / "test.csv"),
                       sparse_features=["zip"], dense_features=[], batch_size=4)
    enc = dm.preprocessor.encoders["zip"]
    expect = enc.transform(pd.Series(["02134", "287130e0", "10001"])).tolist()
    assert 0 not in expect
    assert _ids(dm, "val", "zip") == expect and _ids(dm, "test", "zip") == expect


def test_int64_ids_beyond_float_precision_stay_distinct():
    """Ids of 2**53 and more (64-bit hashes) are keys of their own (float64 keys merged them)."""
    base = 2**60
    uid = np.array([base + 1, base + 2, base + 3, base + 4] * 3, dtype=np.int64)
    enc = CategoryEncoder().fit(pd.Series(uid))
    assert enc.vocab_size == 5
    ids = enc.transform(pd.Series(uid[:4]))
    assert sorted(ids.tolist()) == [1, 2, 3, 4]
    restored = CategoryEncoder().load_state_dict(enc.state_dict())
    assert restored.transform(pd.Series(uid[:4])).tolist() == ids.tolist()
    assert restored.transform(pd.Series(np.array([base + 5], dtype=np.int64))).tolist() == [0]  # unseen


def test_sequence_column_of_single_items_and_test_path_alone(tmp_path):
    """A "1|2|3" column whose rows all hold one item is read as numbers: each is a one-item history
    (it was refused). With test_path and no val_path, path is split into train and val."""
    rng = np.random.default_rng(0)
    n = 100
    frame = pd.DataFrame({"item": rng.integers(1, 9, n).astype(str), "label": rng.integers(0, 2, n)})
    frame["hist"] = rng.integers(1, 9, n)  # one item per row
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[:10].to_csv(tmp_path / "test.csv", index=False)
    dm = CTRDataModule(path=str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"), sparse_features=["item"],
                       dense_features=[], sequence_features={"hist": "item"}, max_len=3, split_ratio=(0.8, 0.2), batch_size=8)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_dataloader().dataset) == 80 and len(dm.val_dataloader().dataset) == 20
    hist = dm.test_dataloader().dataset.x["hist"]
    item_ids = dm.preprocessor.encoders["item"].transform(frame["hist"].iloc[:10].astype(str)).tolist()
    assert hist[:, 0].tolist() == item_ids and (hist[:, 1:] == 0).all()


def test_saved_index_columns_are_flagged_and_unlisted_columns_named(tmp_path, caplog):
    """A CSV written with its index gets an ``Unnamed: 0`` column: it would be a dense feature, so a
    warning names it; columns left out of explicit feature lists are named in the log."""
    import logging

    frame = pd.DataFrame({"city": list("abcab") * 8, "age": np.arange(40.0), "label": [0, 1] * 20})
    frame.to_csv(tmp_path / "with_index.csv")  # index=True: "Unnamed: 0"
    with pytest.warns(UserWarning, match=r"\['Unnamed: 0'\] look like a DataFrame index"):
        dm = CTRDataModule(path=str(tmp_path / "with_index.csv"), batch_size=8)
    assert "Unnamed: 0" in dm.preprocessor.dense  # still a feature: it may be data
    with caplog.at_level(logging.INFO):
        dm = CTRDataModule(data=frame, sparse_features=["city"], batch_size=8)
    assert dm.preprocessor.dense == [] and "Columns not used as features" in caplog.text and "'age'" in caplog.text
