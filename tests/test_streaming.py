"""Out-of-core Parquet streaming (data/streaming.py and the datamodules' ``streaming=True``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from rechub_lightning.data import CTRDataModule, MatchDataModule, MTLDataModule, Preprocessor, make_criteo_like  # noqa: E402
from rechub_lightning.data.preprocessing import CategoryEncoder, DenseScaler  # noqa: E402
from rechub_lightning.data.streaming import ParquetSource, ParquetStreamDataset, StreamDataLoader  # noqa: E402

from conftest import quiet_trainer_kwargs  # noqa: E402

SPARSE = [f"C{i}" for i in range(1, 27)]
DENSE = [f"I{i}" for i in range(1, 14)]
SCRIPTS = Path(__file__).parent / "scripts"


def write(df: pd.DataFrame, path: Path, row_group_size: int) -> str:
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), str(path), row_group_size=row_group_size)
    return str(path)


@pytest.fixture(scope="module")
def criteo(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    df = make_criteo_like(n_rows=4001, max_vocab=300, seed=5)
    df["rid"] = np.arange(len(df), dtype=np.float64)
    tr, va = df.iloc[:3001].reset_index(drop=True), df.iloc[3001:].reset_index(drop=True)
    return {
        "train_df": tr,
        "val_df": va,
        "train": write(tr, d / "train.parquet", 217),
        "val": write(va, d / "val.parquet", 97),
        "dir": d,
    }


def _rid_dm(criteo, **kw):
    return CTRDataModule(
        path=criteo["train"], val_path=criteo["val"], sparse_features=SPARSE[:4], dense_features=["rid"],
        dense_scaling="none", streaming=True, **kw,
    )


# ---------------------------------------------------------------------- statistics
@pytest.mark.parametrize("scaling", ["standard", "minmax", "log"])
def test_streaming_stats_equal_in_memory(criteo, scaling):
    kw = dict(sparse_features=SPARSE, dense_features=DENSE, min_freq=3, dense_scaling=scaling)
    mem = CTRDataModule(path=criteo["train"], val_path=criteo["val"], **kw)
    st = CTRDataModule(path=criteo["train"], val_path=criteo["val"], streaming=True, **kw)
    assert st.preprocessor.state_dict() == mem.preprocessor.state_dict()  # vocabularies, order, min_freq, stats
    assert st.schema.to_dict() == mem.schema.to_dict()
    # the row groups really were read in several chunks
    assert len(ParquetSource(criteo["train"]).row_groups) > 10


def test_partial_fit_any_chunking_equals_fit():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "cat": rng.choice(["a", "b", "c", "d", "", None], size=1000, p=[0.4, 0.3, 0.1, 0.1, 0.05, 0.05]),
        "num": np.where(rng.random(1000) < 0.1, np.nan, rng.lognormal(0, 3, 1000) * rng.choice([-1, 1], 1000)),
        "item": rng.integers(0, 50, 1000),
        "hist": [list(rng.integers(1, 50, rng.integers(0, 6))) for _ in range(1000)],
    })
    make = lambda: Preprocessor(["cat", "item"], ["num"], {"hist": "item"}, min_freq=2)  # noqa: E731
    whole = make().fit(df).state_dict()
    for size in (1, 7, 333, 1000):
        p = make()
        for s in range(0, len(df), size):
            p.partial_fit(df.iloc[s : s + size].reset_index(drop=True))
        assert p.finish_fit().state_dict() == whole, size
    # stats are exact: permuting the rows does not change a single bit either
    shuffled = df.sample(frac=1.0, random_state=1).reset_index(drop=True)
    assert make().fit(shuffled).state_dict()["scalers"] == whole["scalers"]
    v = df["num"].to_numpy()
    s = DenseScaler("standard").fit(v).stats
    assert s["mean"] == pytest.approx(np.nanmean(v), rel=1e-12) and s["std"] == pytest.approx(np.nanstd(v), rel=1e-12)
    enc = CategoryEncoder(min_freq=2).partial_fit(pd.Series([3, 3, 1])).partial_fit(pd.Series([1, 2, None], dtype="Int64"))
    assert enc.finish_fit().categories == [1.0, 3.0] and enc.missing_id == 3


def test_mtl_streaming_stats_and_task_types(tmp_path):
    from rechub_lightning.data import make_census_like

    df = make_census_like(n_rows=1500, seed=3, with_regression=True)
    tr = write(df.iloc[:1200], tmp_path / "tr.parquet", 100)
    va = write(df.iloc[1200:], tmp_path / "va.parquet", 100)
    labels = ["income", "marital status", "log income"]
    mem = MTLDataModule(path=tr, val_path=va, labels=labels)
    st = MTLDataModule(path=tr, val_path=va, labels=labels, streaming=True, batch_size=128)
    assert st.task_types == mem.task_types == ["classification", "classification", "regression"]
    assert st.preprocessor.state_dict() == mem.preprocessor.state_dict()
    st.setup("fit")
    x, y = next(iter(st.train_dataloader()))
    assert y.shape == (128, 3) and set(x) == set(st.preprocessor.columns)


# ---------------------------------------------------------------------- sharding
def _train_rows(ds, world, workers, epoch):
    per_rank, counts = [], []
    for r in range(world):
        ds.num_replicas, ds.rank = world, r
        ds.set_epoch(epoch)
        loader = StreamDataLoader(ds, num_workers=workers)
        batches = [x["rid"].long() for x, _ in loader]
        counts.append((len(batches), len(loader)))
        per_rank.append(torch.cat(batches))
    return per_rank, counts


def test_train_rows_once_per_epoch_across_ranks_and_workers(criteo):
    dm = _rid_dm(criteo, batch_size=100, shuffle_buffer=2, seed=7)
    ds = dm.dataset("train")
    n = len(criteo["train_df"])  # 3001: one surplus row per epoch with 2 ranks
    orders = []
    for epoch in (0, 1):
        per_rank, counts = _train_rows(ds, world=2, workers=2, epoch=epoch)
        assert counts[0] == counts[1] and counts[0][0] == counts[0][1]  # same steps on both ranks, = len(loader)
        allrows = torch.cat(per_rank)
        assert len(per_rank[0]) == len(per_rank[1]) == n // 2
        assert len(torch.unique(allrows)) == len(allrows) == n - n % 2  # disjoint, once each
        assert int(allrows.min()) >= 0 and int(allrows.max()) < n
        orders.append(allrows)
    assert not torch.equal(orders[0], orders[1])  # a new order every epoch
    again, _ = _train_rows(_rid_dm(criteo, batch_size=100, shuffle_buffer=2, seed=7).dataset("train"), 2, 2, 1)
    assert torch.equal(torch.cat(again), orders[1])  # reproducible from the seed
    other, _ = _train_rows(_rid_dm(criteo, batch_size=100, shuffle_buffer=2, seed=8).dataset("train"), 2, 2, 1)
    assert not torch.equal(torch.cat(other), orders[1])


def test_train_single_process_sees_every_row_and_no_one_row_batch(criteo):
    ds = _rid_dm(criteo, batch_size=1000).dataset("train")  # 3001 rows: the 1-row tail joins the last batch
    sizes, rows = [], []
    for x, y in StreamDataLoader(ds):
        sizes.append(len(y))
        rows.append(x["rid"].long())
    assert sorted(torch.cat(rows).tolist()) == list(range(3001))
    assert sizes == [1000, 1000, 1001] and len(ds) == 3


@pytest.mark.parametrize("workers,shuffle_buffer", [(0, 2), (0, 1), (2, 3), (3, 2)])
def test_resumed_pass_yields_the_uninterrupted_tail_without_reading_skipped_row_groups(criteo, workers, shuffle_buffer):
    ds = _rid_dm(criteo, batch_size=128, shuffle_buffer=shuffle_buffer, seed=3).dataset("train")
    ds.set_epoch(1)
    full = [x["rid"].long() for x, _ in StreamDataLoader(ds, num_workers=workers)]
    reads = []
    original = ds.source.read

    def counting(k, *a, **kw):
        reads.append(k)
        return original(k, *a, **kw)

    ds.source.read = counting
    try:
        for skip in sorted({1, 2, 5, 9, len(full) // 2, len(full) - 2, len(full) - 1}):
            loader = StreamDataLoader(ds, num_workers=workers)
            loader.load_state_dict({"epoch": 1, "batches_consumed": skip})
            reads.clear()
            got = [x["rid"].long() for x, _ in loader]
            assert len(got) == len(full) - skip
            assert all(torch.equal(a, b) for a, b in zip(got, full[skip:])), skip
            assert loader.state_dict() == {"epoch": 1, "batches_consumed": len(full), "epoch_done": 1}
            if workers == 0 and skip >= len(full) - 2:  # the skipped pass is not read again
                assert len(reads) < 0.75 * len(ds.source.row_groups), (skip, len(reads))
    finally:
        ds.source.read = original


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2)])
def test_eval_rows_once_in_order(criteo, world, workers):
    ds = _rid_dm(criteo, eval_batch_size=64).dataset("val")
    got = []
    for r in range(world):
        ds.num_replicas, ds.rank = world, r
        loader = StreamDataLoader(ds, num_workers=workers)
        batches = list(loader)
        assert len(batches) == len(loader)
        got.append(torch.cat([x["rid"] for x, _ in batches]))
    expected = torch.tensor(criteo["val_df"]["rid"].to_numpy(), dtype=torch.float32)
    assert torch.equal(torch.cat(got), expected)  # every row once, in file order, rank after rank
    labels = torch.cat([y for x, y in StreamDataLoader(ParquetStreamDataset(
        criteo["val"], ds.preprocessor, 64, labels=["label"], split="val"))])
    assert torch.equal(labels, torch.tensor(criteo["val_df"]["label"].to_numpy(), dtype=torch.float32))


def test_directory_of_files_is_one_source(criteo, tmp_path):
    df = criteo["train_df"]
    write(df.iloc[:1000], tmp_path / "a.parquet", 300)
    write(df.iloc[1000:], tmp_path / "b.parquet", 500)
    src = ParquetSource(tmp_path)
    assert src.num_rows == len(df) and len(src.files) == 2
    ds = ParquetStreamDataset(src, _rid_dm(criteo).preprocessor, 256, split="predict")
    rid = torch.cat([x["rid"] for x in StreamDataLoader(ds)])
    assert torch.equal(rid, torch.tensor(df["rid"].to_numpy(), dtype=torch.float32))


# ---------------------------------------------------------------------- bad input
def test_bad_input_fails_early_and_names_the_column(criteo, tmp_path):
    tr, va = criteo["train_df"], criteo["val_df"]
    kw = dict(sparse_features=SPARSE, dense_features=DENSE, streaming=True)
    bad = tr.copy()
    bad.loc[2900, "label"] = 2  # in the last row group: found by the statistics pass
    with pytest.raises(ValueError, match="label 'label'.*0 or 1.*2.0"):
        CTRDataModule(path=write(bad, tmp_path / "bad.parquet", 217), val_path=criteo["val"], **kw)
    with pytest.raises(KeyError, match="C3"):
        CTRDataModule(path=criteo["train"], val_path=write(va.drop(columns=["C3"]), tmp_path / "v.parquet", 97), **kw)
    with pytest.raises(KeyError, match="label"):
        CTRDataModule(path=write(tr.drop(columns=["label"]), tmp_path / "nl.parquet", 217), val_path=criteo["val"], **kw)
    lst = va.copy()
    lst["I2"] = [[1.0]] * len(lst)
    with pytest.raises(TypeError, match="dense feature 'I2'.*list"):
        CTRDataModule(path=criteo["train"], val_path=write(lst, tmp_path / "l.parquet", 97), **kw)
    txt = va.copy()
    txt["I5"] = txt["I5"].astype(str)
    txt.loc[len(txt) - 1, "I5"] = "oops"
    dm = CTRDataModule(path=criteo["train"], val_path=write(txt, tmp_path / "t.parquet", 97), **kw)
    with pytest.raises(TypeError, match="dense feature 'I5'.*'oops'"):
        list(dm.val_dataloader())
    nan = va.copy().astype({"label": "float64"})
    nan.loc[950, "label"] = np.nan
    dm = CTRDataModule(path=criteo["train"], val_path=write(nan, tmp_path / "n.parquet", 97), **kw)
    with pytest.raises(ValueError, match="label 'label'.*NaN"):
        list(dm.val_dataloader())
    ids = va.copy()
    ids.loc[5, "C1"] = 10**6
    dm = CTRDataModule(path=criteo["train"], val_path=write(ids, tmp_path / "i.parquet", 97), preprocess=False,
                       sparse_features=["C1"], dense_features=[], streaming=True)  # C1 has no missing value
    with pytest.raises(ValueError, match="'C1'.*1000000"):
        list(dm.val_dataloader())
    with pytest.raises(ValueError, match="val_path"):
        CTRDataModule(path=criteo["train"], **kw)
    with pytest.raises(ValueError, match="data="):
        CTRDataModule(data=tr, val_path=criteo["val"], **kw)


def test_match_streaming_is_refused_clearly():
    with pytest.raises(ValueError, match="MatchDataModule does not support streaming=True"):
        MatchDataModule(streaming=True, synthetic_users=50, synthetic_items=100, synthetic_interactions=(5, 8))


# ---------------------------------------------------------------------- with Lightning
def test_fit_checkpoint_and_predict_from_streamed_preprocessing(criteo, tmp_path):
    from lightning import Trainer

    from rechub_lightning import CTRModule
    from rechub_lightning.models.ranking import DeepFM

    dm = CTRDataModule(path=criteo["train"], val_path=criteo["val"], sparse_features=SPARSE, dense_features=DENSE,
                       streaming=True, batch_size=256, min_freq=2)
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [16]}))
    trainer = Trainer(max_epochs=2, default_root_dir=tmp_path, **quiet_trainer_kwargs(enable_checkpointing=True))
    trainer.fit(module, dm)
    assert trainer.global_step == 2 * len(dm.dataset("train"))
    assert dm.dataset("train").epoch == 1  # Lightning's set_epoch reached the dataset
    ckpt = trainer.checkpoint_callback.best_model_path
    pred_file = write(criteo["val_df"].drop(columns=["label"]), tmp_path / "p.parquet", 50)
    dm2 = CTRDataModule(predict_path=pred_file, preprocessing_from=ckpt, streaming=True, batch_size=100,
                        sparse_features=SPARSE, dense_features=DENSE)
    assert dm2.preprocessor.state_dict() == dm.preprocessor.state_dict()
    preds = torch.cat(Trainer(**quiet_trainer_kwargs()).predict(CTRModule.load_from_checkpoint(ckpt), dm2))
    assert preds.shape == (len(criteo["val_df"]),) and bool(((preds > 0) & (preds < 1)).all())


# ---------------------------------------------------------------------- memory cap
@pytest.mark.slow
def test_training_from_parquet_3x_larger_than_memory_cap(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    script = str(SCRIPTS / "stream_ctr.py")
    start = lambda step: subprocess.Popen(  # noqa: E731
        [sys.executable, script, step, str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    prepare = start("prepare")
    out, err = prepare.communicate(timeout=300)
    assert prepare.returncode == 0, f"prepare failed:\n{out[-3000:]}\n{err[-3000:]}"
    # one thread each: the two trainings run side by side (peak RSS is measured per process)
    steps = {"stream": start("stream"), "memory": start("memory")}
    for step, proc in steps.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{step} failed:\n{out[-3000:]}\n{err[-3000:]}"
    info = json.loads((tmp_path / "prepare.json").read_text())
    stream = json.loads((tmp_path / "stream.json").read_text())
    memory = json.loads((tmp_path / "memory.json").read_text())
    cap = info["cap_bytes"]
    assert info["decoded_bytes"] >= 3 * cap
    assert stream["rss_growth_bytes"] < cap, (stream, cap)
    assert stream["rows_trained"] == info["train_rows"]  # one process: no surplus row is skipped
    assert memory["rss_growth_bytes"] > cap  # the cap would not hold for in-memory training
    assert abs(stream["val_auc"] - memory["val_auc"]) < 0.005, (stream, memory)
    assert memory["val_auc"] > 0.7
