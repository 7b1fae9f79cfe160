"""Bad input fails before the first optimizer step, with an error naming the feature/argument.

Each case builds what a user would build and runs up to (not past) the first step; a spy on
``torch.optim.Optimizer.step`` proves no step ran.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from lightning import Trainer

from conftest import quiet_trainer_kwargs
from rechub_lightning import CTRModule, DenseFeature, SequenceFeature, SparseFeature
from rechub_lightning.data import CTRDataModule
from rechub_lightning.layers import EmbeddingLayer
from rechub_lightning.models.ranking import DCNv2, DeepFM

MLP = {"dims": [8]}


def frame(n=60, **over):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "label": rng.integers(0, 2, n),
        "city": rng.choice(["a", "b", "c"], n),
        "age": rng.normal(40, 10, n),
        "cid": rng.integers(0, 5, n),
    })
    for k, v in over.items():
        df[k] = v
    return df


def fit(dm, **module_kw):
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params=MLP), **module_kw)
    Trainer(max_epochs=1, **quiet_trainer_kwargs(enable_checkpointing=False)).fit(module, dm)


def ids_with(bad):
    v = np.arange(60) % 5
    v[7] = bad
    return v


CASES = [
    # (id, callable, exception, text that must be in the message)
    ("sparse id >= vocab", lambda: fit(CTRDataModule(data=frame(cid=ids_with(99)), sparse_features=["cid"], dense_features=[],
                                                      preprocess=False, split_ratio=(0.5, 0.5), seed=3)), ValueError, "'cid'"),
    ("sparse id < 0", lambda: fit(CTRDataModule(data=frame(cid=ids_with(-1)), sparse_features=["cid"], dense_features=[],
                                                 preprocess=False, split_ratio=(0.9, 0.1))), ValueError, "'cid'"),
    ("sequence id out of range", lambda: fit(CTRDataModule(
        data=frame(hist=["1|2|3"] * 59 + ["1|2|77"]), sparse_features=["cid"], dense_features=[],
        sequence_features=["hist"], preprocess=False, split_ratio=(0.5, 0.5), seed=0)), ValueError, "'hist'"),
    ("missing feature column", lambda: CTRDataModule(data=frame(), sparse_features=["city", "zip"], dense_features=["age"]),
     KeyError, "'zip'"),
    ("text in a dense column", lambda: CTRDataModule(data=frame(age=["x"] + [1.0] * 59), sparse_features=["city"], dense_features=["age"]),
     TypeError, "'age'"),
    ("NaN label", lambda: fit(CTRDataModule(data=frame(label=[np.nan] + [0, 1] * 29 + [1]))), ValueError, "'label'"),
    ("label outside {0,1}", lambda: fit(CTRDataModule(data=frame(label=[2] * 60))), ValueError, "'label'"),
    ("missing label column", lambda: CTRDataModule(data=frame(), label="click"), KeyError, "'click'"),
    ("inf in a dense column", lambda: CTRDataModule(data=frame(age=[np.inf] + [1.0] * 59)), ValueError, "'age'"),
    ("NaN dense with preprocessing off", lambda: fit(CTRDataModule(data=frame(age=[np.nan] * 60), sparse_features=["cid"],
                                                                    dense_features=["age"], preprocess=False)), ValueError, "'age'"),
    ("empty training split", lambda: CTRDataModule(data=frame(), split_ratio=(0.0, 0.5)), ValueError, "training split"),
    ("empty validation split", lambda: fit(CTRDataModule(data=frame(), split_ratio=(0.9, 0.0))), ValueError, "validation split"),
    ("unknown dense_scaling", lambda: CTRDataModule(data=frame(), dense_scaling="zscore"), ValueError, "dense_scaling"),
    ("bad split_ratio", lambda: CTRDataModule(data=frame(), split_ratio=(0.9, 0.5)), ValueError, "split_ratio"),
    ("batch_size 0", lambda: CTRDataModule(data=frame(), batch_size=0), ValueError, "batch_size"),
    ("unknown synthetic data set", lambda: CTRDataModule(synthetic="movielens"), ValueError, "synthetic"),
    ("min_freq 0", lambda: CTRDataModule(data=frame(), min_freq=0), ValueError, "min_freq"),
    ("one-row batch with BatchNorm", lambda: fit(CTRDataModule(data=frame(n=100), batch_size=39, split_ratio=(0.79, 0.2))),
     ValueError, "batch_size"),
    ("unknown regularization key", lambda: CTRModule(torch.nn.Linear(1, 1), regularization_params={"l2": 1.0}), ValueError, "regularization_params"),
    ("bad scheduler_interval", lambda: CTRModule(torch.nn.Linear(1, 1), scheduler_interval="batch"), ValueError, "scheduler_interval"),
    ("unknown embedding_optimizer", lambda: CTRModule(torch.nn.Linear(1, 1), embedding_optimizer="adam"), ValueError, "embedding_optimizer"),
    ("unimportable optimizer_fn", lambda: CTRModule(torch.nn.Linear(1, 1), optimizer_fn="torch.optim.Adamm"), ValueError, "optimizer_fn"),
    ("unknown mlp_params key", lambda: DeepFM([DenseFeature("d")], [SparseFeature("s", 3, 4)], {"dimz": [4]}), ValueError, "mlp_params"),
    ("unknown model_structure", lambda: DCNv2([SparseFeature("s", 3, 4)], 2, MLP, model_structure="serial"), ValueError, "model_structure"),
    ("vocab_size 0", lambda: SparseFeature("city", 0), ValueError, "'city'"),
    ("unknown pooling", lambda: SequenceFeature("hist", 10, pooling="max"), ValueError, "pooling"),
    ("shared_with unknown feature", lambda: EmbeddingLayer([SequenceFeature("hist", 10, 4, shared_with="item")]), ValueError, "'item'"),
    ("sparse + embedding penalty", lambda: CTRModule(torch.nn.Linear(1, 1), sparse_embeddings=True, regularization_params={"embedding_l2": 1e-4}),
     ValueError, "embedding_l2"),
]


@pytest.fixture
def step_spy(monkeypatch):
    calls = []
    for cls in (torch.optim.Adam, torch.optim.SparseAdam):
        orig = cls.step

        def spy(self, *a, _orig=orig, **k):
            calls.append(type(self).__name__)
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, "step", spy)
    return calls


@pytest.mark.parametrize("case,build,exc,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, build, exc, text, step_spy):
    with pytest.raises(exc) as info:
        build()
    assert text in str(info.value), f"{case}: message does not name {text!r}: {info.value}"
    assert not step_spy, f"{case}: an optimizer step ran before the error"


def test_at_least_twenty_cases():
    assert len(CASES) >= 20
