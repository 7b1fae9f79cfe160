"""Messy real-world input: encoded exactly, or refused before training with the column named."""

import warnings

import numpy as np
import pandas as pd
import pytest

from rechub_lightning.data import (
    CTRDataModule,
    MatchDataModule,
    MTLDataModule,
    gen_model_input,
    generate_seq_feature,
    generate_seq_feature_match,
    pad_sequences,
)


def _events(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": rng.integers(0, 100, n), "item_id": rng.integers(0, 200, n),
        "cate_id": rng.integers(0, 10, n), "time": rng.integers(0, 10**6, n),
    })


def _sequence_dm(frames, **kw):
    train, val, test = frames
    return CTRDataModule(
        data=pd.concat([train, val, test], ignore_index=True), label="label",
        sparse_features=["user_id", "target_item_id", "target_cate_id"],
        sequence_features={"hist_item_id": "target_item_id", "hist_cate_id": "target_cate_id"},
        max_len=10, batch_size=256, **kw,
    )


def test_items_that_merely_look_like_lists_or_hold_commas_stay_items():
    df = pd.DataFrame({"hist": ["[old]|b", "1,000", "Godfather,The|x", "[a]"] * 50, "label": [0, 1] * 100})
    dm = CTRDataModule(data=df, label="label", sparse_features=[], sequence_features=["hist"], split_ratio=(1.0, 0.0))
    assert set(dm.preprocessor.encoders["hist"].categories) == {"[old]", "b", "1,000", "Godfather,The", "x", "[a]"}


def test_zero_padded_text_histories_and_sequence_pad_value():
    df = pd.DataFrame({"item": [3, 17, 5, 9] * 50, "hist": ["3|17|0|0", "5|0|0|0", "[9, 3, 0]", "17|5|9|3"] * 50,
                       "label": [0, 1] * 100})
    kw = dict(label="label", sparse_features=["item"], sequence_features={"hist": "item"}, max_len=4, split_ratio=(1.0, 0.0))
    with pytest.warns(UserWarning, match="sequence_pad_value=0"):
        CTRDataModule(data=df, **kw)
    for pad in (0, "0"):
        dm = CTRDataModule(data=df, sequence_pad_value=pad, **kw)
        assert sorted(dm.preprocessor.encoders["item"].categories) == [3, 5, 9, 17]
        x = dm.dataset("train").x["hist"][:4]
        assert (x != 0).sum(1).tolist() == [2, 1, 2, 4]


def test_zero_padded_histories_warn_and_sequence_pad_value_drops_the_padding():
    frames = generate_seq_feature(_events(), "user_id", "item_id", "time", item_attribute_cols=["cate_id"],
                                  max_len=10, seed=0, inplace=False)
    with pytest.warns(UserWarning, match=r"'hist_item_id' holds the item 0 .*sequence_pad_value=0"):
        plain = _sequence_dm(frames)
    assert 0 in plain.preprocessor.encoders["target_item_id"].categories  # the padding became an item
    dm = _sequence_dm(frames, sequence_pad_value=0)
    assert 0 not in dm.preprocessor.encoders["target_item_id"].categories
    raw = dm.raw_frame("train")["hist_item_id"]
    x = dm.dataset("train").x["hist_item_id"]
    # every real item is kept (the most recent max_len), every padding cell is the pad id 0
    assert (x != 0).sum(1).tolist() == [int((np.asarray(h) != 0).sum()) for h in raw]


def _hist_frame(n=300, seed=1):
    rng = np.random.default_rng(seed)
    hists = [rng.integers(1, 30, rng.integers(1, 6)).tolist() for _ in range(n)]
    return pd.DataFrame({"user": rng.integers(0, 20, n), "hist": hists, "label": rng.integers(0, 2, n)})


def _hist_ids(dm):
    enc = dm.preprocessor.encoders["hist"]
    x = dm.dataset("train").x["hist"].numpy()
    return [[enc.categories[i - 1] for i in row if i] for row in x], enc.vocab_size


@pytest.mark.parametrize("written", ["list repr csv", "array repr csv", "comma joined", "space joined"])
def test_histories_written_as_text_encode_like_lists(tmp_path, written):
    df = _hist_frame()
    kw = dict(label="label", sparse_features=["user"], sequence_features=["hist"], max_len=5, batch_size=64, seed=3)
    expected, vocab = _hist_ids(CTRDataModule(data=df, **kw))
    text = df.copy()
    if written.endswith("repr csv"):  # what DataFrame.to_csv writes for a list / a NumPy array column
        out = df if written == "list repr csv" else df.assign(hist=[np.asarray(h) for h in df["hist"]])
        out.to_csv(tmp_path / "h.csv", index=False)
        dm = CTRDataModule(path=str(tmp_path / "h.csv"), **kw)
        with_sep = CTRDataModule(path=str(tmp_path / "h.csv"), sequence_sep=",", **kw)  # written lists parse whatever the sep
        assert _hist_ids(with_sep)[0] == _hist_ids(dm)[0]
    else:
        sep = "," if written == "comma joined" else " "
        text["hist"] = [sep.join(map(str, h)) for h in df["hist"]]
        with pytest.warns(UserWarning, match=r"sequence feature 'hist' holds strings such as .*read as ONE item.*sequence_sep"):
            CTRDataModule(data=text, **kw)
        dm = CTRDataModule(data=text, sequence_sep=sep, **kw)
    got, got_vocab = _hist_ids(dm)
    assert got_vocab == vocab
    assert [[int(t) for t in row] for row in got] == [[int(t) for t in row] for row in expected]


def test_list_column_not_declared_as_a_sequence_is_refused():
    df = _hist_frame()
    with pytest.raises(TypeError, match=r"column 'hist' holds a list per row.*sequence_features"):
        CTRDataModule(data=df, label="label")
    with pytest.raises(TypeError, match=r"column 'hist' holds a list per row"):
        CTRDataModule(data=df, label="label", sparse_features=["user", "hist"])


def test_64_bit_ids_with_an_empty_cell_stay_distinct(tmp_path):
    rng = np.random.default_rng(0)
    ids = (2**60 + rng.integers(0, 8, 400)).astype(object)
    ids[0] = None
    df = pd.DataFrame({"h": ids, "d": rng.normal(size=400), "label": rng.integers(0, 2, 400)})
    df.to_csv(tmp_path / "h.csv", index=False)
    dm = CTRDataModule(path=str(tmp_path / "h.csv"), label="label", sparse_features=["h"], dense_features=["d"], batch_size=64)
    assert sorted(dm.preprocessor.encoders["h"].categories) == sorted(set(df["h"].dropna().tolist()))


def test_whole_numbers_in_a_text_vocabulary_match_in_either_spelling(tmp_path):
    col = pd.Series([1, 1.0, 2.0, "A7", 3] * 40, dtype=object)
    df = pd.DataFrame({"c": col, "label": [0, 1] * 100})
    dm = CTRDataModule(data=df, label="label", sparse_features=["c"], dense_features=[], split_ratio=(1.0, 0.0))
    enc = dm.preprocessor.encoders["c"]
    fitted = enc.transform(col)
    assert (fitted > 0).all()
    # the same rows read back from a CSV as text ("1.0", "2.0"), and as numbers (a float column)
    df.to_csv(tmp_path / "c.csv", index=False)
    assert np.array_equal(enc.transform(pd.read_csv(tmp_path / "c.csv", dtype={"c": str})["c"]), fitted)
    assert enc.transform(pd.Series([2.0, 3.0]))[0] == fitted[2] and enc.transform(pd.Series([2.0, 3.0]))[1] == fitted[4]
    assert enc.transform(pd.Series(["2", "3.0", "4"])).tolist() == [fitted[2], fitted[4], 0]


def test_mtl_integer_codes_with_a_missing_value_stay_sparse():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"education": rng.integers(0, 12, 500).astype(float), "hours": rng.normal(40, 5, 500),
                       "a": rng.integers(0, 2, 500), "b": rng.integers(0, 2, 500)})
    df.loc[3, "education"] = np.nan
    dm = MTLDataModule(data=df, labels=["a", "b"])
    assert dm.preprocessor.sparse == ["education"] and dm.preprocessor.dense == ["hours"]


def test_time_column_mixing_numbers_and_text_is_refused():
    ev = _events(600).rename(columns={"time": "timestamp"})
    ev["timestamp"] = ev["timestamp"].astype(object)
    ev.loc[5, "timestamp"] = "50"
    with pytest.raises(TypeError, match=r"time column 'timestamp' mixes \['number', 'text'\]"):
        MatchDataModule(data=ev, item_col="item_id")
    with pytest.raises(TypeError, match=r"time column 'timestamp' mixes"):
        generate_seq_feature(ev, "user_id", "item_id", "timestamp", seed=0, inplace=False)


def test_sequence_generators_refuse_a_missing_item():
    ev = _events(600)
    ev["item_id"] = ev["item_id"].astype(float)
    ev.loc[3, "item_id"] = np.nan
    for fn in (generate_seq_feature, generate_seq_feature_match):
        with pytest.raises(ValueError, match=r"item column 'item_id' has 1 missing value"):
            fn(ev, "user_id", "item_id", "time", seed=0)


def test_pad_sequences_never_wraps_or_truncates_ids():
    ids = [[2**31 + 5, 7], [3, 2**40]]
    for seqs in (np.array(ids, dtype=np.int64), ids, [np.array(r) for r in ids]):
        with pytest.raises(ValueError, match=r"id 2147483653 outside the range of dtype=int32"):
            pad_sequences(seqs, maxlen=3)
    with pytest.raises(ValueError, match=r"non-integer value 1.7"):
        pad_sequences([[1.7, 2.0]], maxlen=3)
    assert pad_sequences(ids, maxlen=3, dtype="int64").tolist() == [[0, 2**31 + 5, 7], [0, 3, 2**40]]
    assert pad_sequences([[1.0, 2.0], [3]], maxlen=3).tolist() == [[0, 1, 2], [0, 0, 3]]
    df = pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "hist_item_id": [np.array([2**31 + 5, 7]), np.array([2**32])]})
    x = gen_model_input(df, df[["user_id"]], "user_id", df[["item_id"]], "item_id", seq_max_len=3)
    assert x["hist_item_id"].tolist() == [[0, 2**31 + 5, 7], [0, 0, 2**32]]


def test_duplicated_columns_are_named():
    df = pd.DataFrame(np.zeros((10, 3)), columns=["c1", "c1", "label"])
    with pytest.raises(ValueError, match=r"duplicated column name\(s\) \['c1'\]"):
        CTRDataModule(data=df, label="label")


def test_dense_values_near_the_float64_limit():
    rng = np.random.default_rng(0)
    v = rng.normal(size=400) * 1e200
    df = pd.DataFrame({"d": v, "label": rng.integers(0, 2, 400)})
    dm = CTRDataModule(data=df, label="label", dense_features=["d"], sparse_features=[], split_ratio=(1.0, 0.0))
    stats = dm.preprocessor.scalers["d"].stats
    assert stats["mean"] == pytest.approx(np.mean(v / 1e200) * 1e200, rel=1e-12)
    assert stats["std"] == pytest.approx(np.std(v / 1e200) * 1e200, rel=1e-9)
    x = dm.dataset("train").x["d"].numpy().reshape(-1)
    assert np.allclose(x, (v - stats["mean"]) / stats["std"], rtol=1e-6)
    df["d"] = v / 1e200 * 1e39  # finite in float64, beyond float32
    with pytest.raises(ValueError, match=r"dense feature 'd' has \d+ value\(s\) beyond the float32 range"):
        CTRDataModule(data=df, label="label", dense_features=["d"], sparse_features=[], dense_scaling="none",
                      split_ratio=(1.0, 0.0)).dataset("train")


def test_ignore_columns_naming_a_missing_column_is_refused():
    df = pd.DataFrame({"request_id": range(100), "c": ["a", "b"] * 50, "label": [0, 1] * 50})
    with pytest.raises(KeyError, match=r"ignore_columns names column\(s\) \['requestid'\]"):
        CTRDataModule(data=df, label="label", ignore_columns=["requestid"])


def test_inferred_columns_that_make_useless_categories_are_named():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"request": [f"r{i}" for i in range(2000)], "c": rng.choice(list("abc"), 2000),
                       "ts": pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(2000) % 7, "D"),
                       "label": rng.integers(0, 2, 2000)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CTRDataModule(data=df, label="label")
    text = " ".join(str(w.message) for w in caught)
    assert "column 'request' was inferred as a sparse feature with" in text
    assert "column 'ts' holds dates/times" in text
    assert "'c'" not in text


def test_prediction_rows_with_a_partly_empty_label_column(tmp_path):
    import lightning as L

    from rechub_lightning import CTRModule
    from rechub_lightning.models.ranking import WideDeep

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"c": rng.choice(list("abcd"), 400), "d": rng.normal(size=400), "label": rng.integers(0, 2, 400)})
    dm = CTRDataModule(data=df, label="label", batch_size=64)
    module = CTRModule(WideDeep(schema=dm.schema, mlp_params={"dims": [8]}))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    trainer.fit(module, dm)
    ckpt = str(tmp_path / "m.ckpt")
    trainer.save_checkpoint(ckpt)
    new = df.head(20).copy()
    new.loc[::2, "label"] = np.nan  # known for some rows only
    new.to_csv(tmp_path / "new.csv", index=False)
    new.drop(columns="label").to_csv(tmp_path / "nolabel.csv", index=False)
    preds = {}
    for name, kw in (("predict_path", dict(predict_path=str(tmp_path / "new.csv"))), ("path", dict(path=str(tmp_path / "new.csv"))),
                     ("no label", dict(path=str(tmp_path / "nolabel.csv")))):
        pdm = CTRDataModule(label="label", preprocessing_from=ckpt, batch_size=64, **kw)
        preds[name] = np.concatenate([p.numpy() for p in trainer.predict(module, pdm)])
    assert len(preds["path"]) == 20
    assert np.array_equal(preds["path"], preds["no label"]) and np.array_equal(preds["predict_path"], preds["no label"])


def test_integer_coded_categories_inferred_dense_are_named_before_the_model_fails():
    from rechub_lightning.models.ranking import DeepFM

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"user_id": rng.integers(0, 50, 300), "price": rng.normal(size=300), "click": rng.integers(0, 2, 300)})
    with pytest.warns(UserWarning, match=r"every feature column was inferred as dense .*sparse_features"):
        dm = CTRDataModule(data=df, label="click")
    with pytest.raises(ValueError, match=r"fm_features='sparse\+sequence' selects no feature.*sparse_features"):
        DeepFM(schema=dm.schema)
    dm = CTRDataModule(data=df, label="click", sparse_features=["user_id"], dense_features=["price"])
    assert [f.name for f in DeepFM(schema=dm.schema).fm_features] == ["user_id"]


def test_row_format_given_with_restored_preprocessing_overrides_the_checkpoints(tmp_path):
    import torch

    df = _hist_frame()
    kw = dict(label="label", sparse_features=["user"], sequence_features=["hist"], max_len=5)
    piped = df.assign(hist=["|".join(map(str, h)) + "|0" for h in df["hist"]])
    dm = CTRDataModule(data=piped, sequence_pad_value=0, split_ratio=(1.0, 0.0), **kw)
    ckpt = str(tmp_path / "dm.ckpt")
    torch.save({"CTRDataModule": dm.state_dict()}, ckpt)
    commas = df.assign(hist=[";".join(map(str, h)) for h in df["hist"]])  # no padding, another separator
    commas.to_csv(tmp_path / "new.csv", index=False)
    new = CTRDataModule(path=str(tmp_path / "new.csv"), preprocessing_from=ckpt, sequence_sep=";", **kw)
    expected = dm.dataset("train").x["hist"]
    assert torch.equal(new.dataset("predict").x["hist"], expected)
    new.load_state_dict(dm.state_dict())  # what a Trainer restoring the checkpoint does
    assert new.preprocessor.sequence_sep == ";" and new.preprocessor.sequence_pad_value == 0


def test_read_table_keeps_pandas_options_and_reads_wide_ids_exactly(tmp_path):
    from rechub_lightning.data.base import read_table

    ids = [2**60 + i for i in range(5)]
    pd.DataFrame({"idx": range(5), "uid": ids, "x": [0.5] * 5}).assign(uid=lambda d: d.uid.astype(object).where(d.idx != 2)).to_csv(
        tmp_path / "w.csv", index=False)
    exact = read_table(str(tmp_path / "w.csv"))
    assert exact["uid"].dropna().tolist() == [ids[i] for i in (0, 1, 3, 4)]
    assert read_table(str(tmp_path / "w.csv"), index_col=0).index.tolist() == list(range(5))
    assert sum(len(c) for c in read_table(str(tmp_path / "w.csv"), chunksize=2)) == 5


def test_mtl_streaming_infers_the_columns_in_memory_inference_does(tmp_path):
    pytest.importorskip("pyarrow")
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"code": rng.integers(0, 9, 2000).astype(float), "x": rng.normal(size=2000),
                       "a": rng.integers(0, 2, 2000), "b": rng.integers(0, 2, 2000)})
    df.loc[1500, "code"] = np.nan  # in the last row group only
    df.iloc[:1600].to_parquet(tmp_path / "train.parquet", row_group_size=500)
    df.iloc[1600:].to_parquet(tmp_path / "val.parquet")
    mem = MTLDataModule(path=str(tmp_path / "train.parquet"), val_path=str(tmp_path / "val.parquet"), labels=["a", "b"])
    stream = MTLDataModule(path=str(tmp_path / "train.parquet"), val_path=str(tmp_path / "val.parquet"), labels=["a", "b"], streaming=True)
    assert (mem.preprocessor.sparse, mem.preprocessor.dense) == (["code"], ["x"])
    assert (stream.preprocessor.sparse, stream.preprocessor.dense) == (["code"], ["x"])


def test_preprocess_false_ids_outside_the_vocabulary_fail_before_training(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"c": rng.integers(0, 50, 500), "d": rng.normal(size=500), "label": rng.integers(0, 2, 500)})
    df.iloc[:400].to_csv(tmp_path / "train.csv", index=False)
    test = df.iloc[400:].copy()
    test.iloc[7, 0] = 50  # past the training ids' vocabulary (max + 1 = 50)
    test.to_csv(tmp_path / "test.csv", index=False)
    kw = dict(label="label", preprocess=False, sparse_features=["c"], dense_features=["d"])
    with pytest.raises(ValueError, match=r"sparse feature 'c' in test data has id 50 outside \[0, 50\)"):
        CTRDataModule(path=str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"), **kw)


@pytest.mark.parametrize("sep,joiner", [(None, " | "), (None, "| "), (",", ", ")])
def test_spaces_around_the_history_separator_are_not_part_of_the_items(sep, joiner):
    """"i1 | i2" kept " i2" as an item of its own, apart from the target column's "i2": the shared
    vocabulary split in two and DIN's attention compared unrelated embeddings."""
    rng = np.random.default_rng(0)
    n = 400
    items = [f"i{k}" for k in range(30)]
    df = pd.DataFrame({
        "item": rng.choice(items, n),
        "hist": [joiner.join(rng.choice(items, 3)) for _ in range(n)],
        "label": rng.integers(0, 2, n),
    })
    dm = CTRDataModule(data=df, label="label", sparse_features=["item"], sequence_features={"hist": "item"},
                       sequence_sep=sep, split_ratio=(1.0, 0.0))
    x = dm.dataset("train").x
    assert dm.schema["item"].vocab_size == 31  # 30 items + the unknown/padding id, shared by both columns
    first = [h.split(joiner.strip() or joiner)[0].strip() for h in df["hist"]]
    target_id = dict(zip(df["item"], x["item"].tolist()))
    known = [i for i, f in enumerate(first) if f in target_id]
    assert known and all(int(x["hist"][i][x["hist"][i] > 0][0]) == target_id[first[i]] for i in known)


def test_an_epoch_timestamp_inferred_as_dense_is_named():
    """A column of whole numbers unique per row (epoch seconds, a request id) was silently used as a
    scaled dense feature; README promised a warning for columns unique per row."""
    rng = np.random.default_rng(0)
    n = 2000
    df = pd.DataFrame({"item": [f"i{k}" for k in rng.integers(0, 50, n)], "price": rng.random(n) * 10,
                       "qty": rng.integers(1, 5, n), "timestamp": 1_600_000_000 + rng.permutation(n) * 37,
                       "label": rng.integers(0, 2, n)})
    with pytest.warns(UserWarning, match=r"'timestamp' was inferred as a dense feature with \d+ distinct whole numbers") as got:
        CTRDataModule(data=df, label="label")
    assert not [w for w in got if "'qty'" in str(w.message) or "'price'" in str(w.message)]
