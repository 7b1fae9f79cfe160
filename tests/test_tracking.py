"""Torch-RecHub's tracking loggers (``rechub_lightning.tracking``): the same backend calls as the
reference's loggers (fake wandb / swanlab modules record them; tensorboardX writes real event
files, read back here), and the trainers feed them per-epoch metrics."""

import struct
import sys
import types

import numpy as np
import pytest
import torch

from rechub_lightning import CTRTrainer, DenseFeature, SparseFeature
from rechub_lightning.data import DataGenerator
from rechub_lightning.models.ranking import DeepFM
from rechub_lightning.tracking import SwanLabLogger, TensorBoardXLogger, WandbLogger

ref_tracking = pytest.importorskip("torch_rechub.basic.tracking")


def _fake_backend(name, calls):
    """A module recording init / log / finish calls (wandb's and swanlab's surface)."""
    mod = types.ModuleType(name)

    class Config(dict):
        def update(self, params):
            calls.append(("config.update", dict(params)))

    class Run:
        config = Config()

        def finish(self):
            calls.append(("run.finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    mod.init = init
    mod.log = lambda metrics, **kw: calls.append(("log", dict(metrics), kw))
    mod.finish = lambda: calls.append(("finish",))
    return mod


def _drive(logger):
    logger.log_hyperparams({"lr": 0.001, "n_epoch": 2})
    logger.log_metrics({"train/loss": 0.5, "val/auc": 0.7}, step=0)
    logger.log_metrics({"train/loss": 0.4})
    logger.finish()


@pytest.mark.parametrize(
    "backend, ours, theirs, kwargs",
    [
        ("wandb", WandbLogger, ref_tracking.WandbLogger, {"project": "p", "name": "run", "tags": ["a"], "mode": "offline"}),
        ("swanlab", SwanLabLogger, ref_tracking.SwanLabLogger, {"project": "p", "experiment_name": "e", "logdir": "l"}),
    ],
)
def test_run_loggers_make_the_references_calls(monkeypatch, backend, ours, theirs, kwargs):
    got, want = [], []
    monkeypatch.setitem(sys.modules, backend, _fake_backend(backend, got))
    _drive(ours(**kwargs))
    monkeypatch.setitem(sys.modules, backend, _fake_backend(backend, want))
    _drive(theirs(**kwargs))
    assert got == want
    assert got[0][0] == "init" and got[-1][0] in ("run.finish", "finish")


def _events(log_dir):
    """(tag, step, value) of every scalar and the text tags in the event files under log_dir."""
    from tensorboardX.proto import event_pb2

    scalars, texts = [], []
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            record = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    scalars.append((v.tag, event.step, round(v.simple_value, 6)))
                else:
                    texts.append(v.tag)
    return sorted(scalars), texts


def test_tensorboardx_logger_writes_what_the_reference_writes(tmp_path):
    pytest.importorskip("tensorboardX")
    for cls, sub in ((TensorBoardXLogger, "ours"), (ref_tracking.TensorBoardXLogger, "ref")):
        _drive(cls(log_dir=str(tmp_path / sub)))
    ours, ref = _events(tmp_path / "ours"), _events(tmp_path / "ref")
    assert ours == ref
    # the step-less call counts its own calls from 0, as in the reference
    assert ours[0] == [("train/loss", 0, 0.4), ("train/loss", 0, 0.5), ("val/auc", 0, 0.7)]
    assert ours[1] == ["hyperparameters/text_summary"]


def test_tensorboardx_logger_keeps_numpy_and_torch_scalars_and_refuses_non_numbers(tmp_path):
    pytest.importorskip("tensorboardX")
    metrics = {"a": np.float32(0.25), "b": torch.tensor(0.75), "c": None}
    for cls, sub in ((TensorBoardXLogger, "ours"), (ref_tracking.TensorBoardXLogger, "ref")):
        logger = cls(log_dir=str(tmp_path / sub))
        logger.log_metrics(metrics, step=3)
        logger.finish()
    assert _events(tmp_path / "ours")[0] == [("a", 3, 0.25), ("b", 3, 0.75)]
    assert _events(tmp_path / "ref")[0] == []  # the reference silently dropped both

    logger = TensorBoardXLogger(log_dir=str(tmp_path / "bad"))
    with pytest.raises(TypeError, match=r"metric 'name': .*str 'deepfm'"):
        logger.log_metrics({"auc": 0.5, "name": "deepfm"}, step=0)
    logger.finish()
    assert _events(tmp_path / "bad")[0] == []  # nothing written when one value is refused


def test_trainer_feeds_a_tensorboardx_logger_per_epoch(tmp_path):
    pytest.importorskip("tensorboardX")
    rng = np.random.default_rng(0)
    n = 400
    x = {"a": rng.integers(0, 20, n), "b": rng.integers(0, 7, n), "d": rng.random(n).astype("float32")}
    y = ((x["a"] % 2) ^ (x["d"] > 0.5)).astype("float32")
    train, val, _ = DataGenerator(x, y, seed=0).generate_dataloader(split_ratio=[0.8, 0.1], batch_size=32)
    feats = [SparseFeature("a", 20, 4), SparseFeature("b", 7, 4)]
    model = DeepFM(feats + [DenseFeature("d")], feats, {"dims": [8]})
    logger = TensorBoardXLogger(log_dir=str(tmp_path / "tb"))
    trainer = CTRTrainer(model, n_epoch=2, earlystop_patience=5, model_path=str(tmp_path), model_logger=logger,
                         trainer_kwargs={"enable_progress_bar": False, "enable_model_summary": False})
    trainer.fit(train, val)
    scalars, texts = _events(tmp_path / "tb")
    by_tag = {}
    for tag, step, _ in scalars:
        by_tag.setdefault(tag, []).append(step)
    assert by_tag["val/auc"] == [0, 1] and by_tag["train/loss"] == [0, 1]
    assert texts == ["hyperparameters/text_summary"]


def test_missing_backend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbLogger(project="p")
