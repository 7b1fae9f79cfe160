"""Bad input fails before the first optimizer step, with an error naming the feature/argument.

Each case builds what a user would build and runs up to (not past) the first step; a spy on
``torch.optim.Optimizer.step`` proves no step ran.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from lightning import Callback, Trainer

from conftest import quiet_trainer_kwargs
from rechub_lightning import CTRModule, DenseFeature, SequenceFeature, SparseFeature
from rechub_lightning.data import CTRDataModule
from rechub_lightning.layers import EmbeddingLayer, SENETLayer
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
    ("unknown regularization key", lambda: CTRModule(torch.nn.Linear(1, 1), regularization_params={"l2": 1.0}), ValueError, "regularization_params"),
    ("bad scheduler_interval", lambda: CTRModule(torch.nn.Linear(1, 1), scheduler_interval="batch"), ValueError, "scheduler_interval"),
    ("unknown embedding_optimizer", lambda: CTRModule(torch.nn.Linear(1, 1), embedding_optimizer="adam"), ValueError, "embedding_optimizer"),
    ("unimportable optimizer_fn", lambda: CTRModule(torch.nn.Linear(1, 1), optimizer_fn="torch.optim.Adamm"), ValueError, "optimizer_fn"),
    ("unknown mlp_params key", lambda: DeepFM([DenseFeature("d")], [SparseFeature("s", 3, 4)], {"dimz": [4]}), ValueError, "mlp_params"),
    ("unknown model_structure", lambda: DCNv2([SparseFeature("s", 3, 4)], 2, MLP, model_structure="serial"), ValueError, "model_structure"),
    ("vocab_size 0", lambda: SparseFeature("city", 0), ValueError, "'city'"),
    ("unknown pooling", lambda: SequenceFeature("hist", 10, pooling="max"), ValueError, "pooling"),
    ("unknown SENET excitation", lambda: SENETLayer(3, excitation="tanh"), ValueError, "excitation"),
    ("DSSMSENet fields of two widths", lambda: __import__("rechub_lightning.models.matching", fromlist=["x"]).DSSMSENet(
        [SparseFeature("user_id", 9, 8), SparseFeature("city", 4, 4)], [SparseFeature("item_id", 9, 8)]), ValueError, "'city': 4"),
    ("shared_with unknown feature", lambda: EmbeddingLayer([SequenceFeature("hist", 10, 4, shared_with="item")]), ValueError, "'item'"),
    ("sparse + embedding penalty", lambda: CTRModule(torch.nn.Linear(1, 1), sparse_embeddings=True, regularization_params={"embedding_l2": 1e-4}),
     ValueError, "embedding_l2"),
]


# ---------------------------------------------------------------- the Torch-RecHub API path
# DataGenerator / Torch-RecHub-style datasets -> CTRTrainer / MTLTrainer / MatchTrainer: the
# trainers check the loaders' whole data against the model before fitting/evaluating.
TWO = [SparseFeature("a", 10, embed_dim=4), SparseFeature("b", 10, embed_dim=4)]  # one fused table


def columns(n=200, **over):
    rng = np.random.default_rng(1)
    x = {"a": rng.integers(0, 10, n), "b": rng.integers(0, 10, n), "d": rng.random(n).astype("float32")}
    x.update(over)
    return x


def with_value(column, row, value):
    column = np.array(column, dtype=np.float64 if isinstance(value, float) else None)
    column[row] = value
    return column


def labels(n=200, tasks=1):
    y = (np.arange(n * tasks).reshape(n, tasks) % 2).astype("float32")
    return y[:, 0] if tasks == 1 else y


def ctr_fit(x, y, val=None, tmp="ctr"):
    from rechub_lightning import CTRTrainer
    from rechub_lightning.data import DataGenerator

    dg = DataGenerator(x, y)
    tr, va, _ = dg.generate_dataloader(x_val=val[0] if val else x, y_val=val[1] if val else y, x_test=x, y_test=y, batch_size=50)
    model = DeepFM(TWO + [DenseFeature("d")], TWO, MLP)
    CTRTrainer(model, n_epoch=1, model_path=str(_tmp / tmp), trainer_kwargs=quiet_trainer_kwargs()).fit(tr, va)


def mtl_fit(x, y, task_types=("classification", "classification")):
    from rechub_lightning import MTLTrainer
    from rechub_lightning.data import DataGenerator
    from rechub_lightning.models.multi_task import SharedBottom

    tr, va, _ = DataGenerator(x, y).generate_dataloader(split_ratio=[0.8, 0.1], batch_size=50)
    model = SharedBottom(TWO + [DenseFeature("d")], ["classification"] * 2, {"dims": [8]}, [{"dims": [4]}] * 2)
    MTLTrainer(model, task_types, n_epoch=1, model_path=str(_tmp / "mtl"), trainer_kwargs=quiet_trainer_kwargs()).fit(tr, va)


def reference_style_evaluate(x, y):
    """Torch-RecHub's own TorchDataset + a per-row DataLoader, evaluated by our CTRTrainer."""
    from torch.utils.data import DataLoader

    from rechub_lightning import CTRTrainer
    from rechub_lightning.data import TorchDataset

    model = DeepFM(TWO + [DenseFeature("d")], TWO, MLP)
    trainer = CTRTrainer(model, model_path=str(_tmp / "ev"), trainer_kwargs=quiet_trainer_kwargs())
    trainer.evaluate(model, DataLoader(TorchDataset(x, y), batch_size=50))


def match_fit(item_ids):
    from rechub_lightning import MatchTrainer
    from rechub_lightning.data import MatchDataGenerator
    from rechub_lightning.models.matching import DSSM

    user, item = SparseFeature("user_id", 20, embed_dim=8), SparseFeature("item_id", 30, embed_dim=8)
    n = len(item_ids)
    x = {"user_id": np.arange(n) % 20, "item_id": np.asarray(item_ids)}
    tr, _, _ = MatchDataGenerator(x, labels(n)).generate_dataloader({"user_id": np.arange(5)}, {"item_id": np.arange(30)}, batch_size=20)
    model = DSSM([user], [item], {"dims": [8]}, {"dims": [8]})
    MatchTrainer(model, mode=0, n_epoch=1, model_path=str(_tmp / "match"), trainer_kwargs=quiet_trainer_kwargs()).fit(tr)


_tmp = __import__("pathlib").Path(__import__("tempfile").mkdtemp(prefix="rechub-bad-input-"))

def ratings_with_missing_item():
    from rechub_lightning.data import make_movielens_like

    r = make_movielens_like(n_users=30, n_items=40, interactions_per_user=(8, 12), seed=0).ratings
    r = r.astype({"movie_id": "float"})
    r.loc[3, "movie_id"] = np.nan  # would become a pseudo-item of the corpus
    return r


CASES += [
    ("MatchDataModule: missing item id", lambda: __import__("rechub_lightning.data", fromlist=["x"]).MatchDataModule(
        data=ratings_with_missing_item()), ValueError, "'movie_id'"),
    ("fractional id with preprocessing off", lambda: fit(CTRDataModule(data=frame(cid=[2.5] * 60), sparse_features=["cid"],
                                                                       dense_features=[], preprocess=False)), ValueError, "'cid'"),
    ("missing id with preprocessing off", lambda: fit(CTRDataModule(data=frame(cid=[1.0, np.nan] * 30), sparse_features=["cid"],
                                                                    dense_features=[], preprocess=False)), ValueError, "missing value"),
    # an id past its feature's block reads the next feature's rows of the fused table unless checked
    ("CTRTrainer: id past the vocab inside the fused table", lambda: ctr_fit(columns(a=with_value(np.arange(200) % 10, 5, 12)), labels()),
     ValueError, "'a' in training data has id 12"),
    ("CTRTrainer: negative id", lambda: ctr_fit(columns(b=with_value(np.arange(200) % 10, 9, -1)), labels()), ValueError, "'b'"),
    ("CTRTrainer: NaN label", lambda: ctr_fit(columns(), with_value(labels(), 3, np.nan)), ValueError, "NaN"),
    ("CTRTrainer: label 2", lambda: ctr_fit(columns(), with_value(labels(), 3, 2.0)), ValueError, "found 2.0"),
    ("CTRTrainer: soft validation label", lambda: ctr_fit(columns(), labels(), val=(columns(), with_value(labels(), 0, 0.5))),
     ValueError, "validation data must be 0 or 1"),
    ("CTRTrainer: fractional float ids (the reference truncates them)", lambda: ctr_fit(
        columns(a=np.linspace(0, 9, 200)), labels()), ValueError, "'a' in training data must hold integer ids"),
    ("CTRTrainer: NaN dense value", lambda: ctr_fit(columns(d=with_value(np.ones(200), 4, np.nan)), labels()), ValueError, "'d'"),
    ("CTRTrainer: missing column", lambda: ctr_fit({k: v for k, v in columns().items() if k != "b"}, labels()), KeyError, "'b'"),
    ("CTRTrainer.evaluate, reference-style TorchDataset", lambda: reference_style_evaluate(columns(a=with_value(np.arange(200) % 10, 0, 10)), labels()),
     ValueError, "'a' in evaluation data"),
    ("MTLTrainer: NaN in the second label", lambda: mtl_fit(columns(), with_value(labels(tasks=2), (7, 1), np.nan)), ValueError, "label column 1"),
    ("MTLTrainer: three label columns for two tasks", lambda: mtl_fit(columns(), labels(tasks=3)), ValueError, "3 column(s)"),
    ("MTLTrainer: task_types as a string", lambda: mtl_fit(columns(), labels(tasks=2), task_types="classification"), TypeError, "task_types"),
    ("MatchTrainer: item id past the vocab", lambda: match_fit(with_value(np.arange(100) % 30, 2, 31)), ValueError, "'item_id'"),
]


# ---------------------------------------------------------------- lightning.Trainer with raw loaders
# No DataModule and no trainer facade: the modules' on_*_start hooks check the loaders' data.
def loader(x, y=None, batch_size=50):
    from rechub_lightning.data import TensorDictDataset

    ds = TensorDictDataset({k: torch.as_tensor(v) for k, v in x.items()}, None if y is None else torch.as_tensor(y, dtype=torch.float32))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


def native(module, train=None, val=None, predict=None):
    trainer = Trainer(max_epochs=1, **quiet_trainer_kwargs(enable_checkpointing=False))
    if predict is not None:
        return trainer.predict(module, predict)
    trainer.fit(module, train, val)


def ctr_module():
    return CTRModule(DeepFM(TWO + [DenseFeature("d")], TWO, MLP))


def mtl_module():
    from rechub_lightning import MTLModule
    from rechub_lightning.models.multi_task import SharedBottom

    return MTLModule(SharedBottom(TWO + [DenseFeature("d")], ["classification"] * 2, {"dims": [8]}, [{"dims": [4]}] * 2))


def match_module():
    from rechub_lightning import MatchModule
    from rechub_lightning.models.matching import DSSM

    user, item = SparseFeature("user_id", 20, embed_dim=8), SparseFeature("item_id", 30, embed_dim=8)
    return MatchModule(DSSM([user], [item], {"dims": [8]}, {"dims": [8]}), mode=0)


def reference_dataset_loader(x, y):
    from rechub_lightning.data import TorchDataset

    return torch.utils.data.DataLoader(TorchDataset(x, y), batch_size=50)


CASES += [
    ("Trainer.fit(CTRModule, raw loader): id past the vocab inside the fused table", lambda: native(
        ctr_module(), loader(columns(a=with_value(np.arange(200) % 10, 5, 12)), labels())), ValueError, "'a' in training data has id 12"),
    ("Trainer.fit(CTRModule, reference TorchDataset loader): negative id", lambda: native(
        ctr_module(), reference_dataset_loader(columns(b=with_value(np.arange(200) % 10, 9, -1)), labels())), ValueError, "'b'"),
    ("Trainer.fit(CTRModule, raw loaders): soft validation label", lambda: native(
        ctr_module(), loader(columns(), labels()), loader(columns(), with_value(labels(), 0, 0.5))),
     ValueError, "validation data must be 0 or 1"),
    ("Trainer.fit(CTRModule, raw loader): NaN dense value", lambda: native(
        ctr_module(), loader(columns(d=with_value(np.ones(200), 4, np.nan)), labels())), ValueError, "'d'"),
    ("Trainer.fit(MTLModule, raw loader): three label columns for two tasks", lambda: native(
        mtl_module(), loader(columns(), labels(tasks=3))), ValueError, "3 column(s)"),
    ("Trainer.fit(MatchModule, raw loader): no item tower column", lambda: native(
        match_module(), loader({"user_id": np.arange(100) % 20}, labels(100))), KeyError, "'item_id'"),
    ("Trainer.predict(CTRModule, raw loader): id past the vocab", lambda: native(
        ctr_module(), predict=loader(columns(a=with_value(np.arange(200) % 10, 0, 10)))), ValueError, "'a' in prediction data"),
]


# ---------------------------------------------------------------- probed later (adversarial pass)
def ctr_fit_with(x=None, y=None, split=None, batch_size=50, features=None, **trainer_kw):
    """DataGenerator -> CTRTrainer.fit, with the knobs the cases below turn."""
    from rechub_lightning import CTRTrainer
    from rechub_lightning.data import DataGenerator

    x = columns() if x is None else x
    y = labels(len(next(iter(x.values())))) if y is None else y
    dg = DataGenerator(x, y)
    if split is not None:
        tr, va, _ = dg.generate_dataloader(split_ratio=split, batch_size=batch_size)
    else:
        tr, va, _ = dg.generate_dataloader(x_val=x, y_val=y, x_test=x, y_test=y, batch_size=batch_size)
    feats = features or TWO + [DenseFeature("d")]
    model = DeepFM(feats, [f for f in feats if not isinstance(f, DenseFeature)], MLP)
    kw = {"n_epoch": 1, "model_path": str(_tmp / "late"), "trainer_kwargs": quiet_trainer_kwargs(), **trainer_kw}
    CTRTrainer(model, **kw).fit(tr, va)


def overfit_batches_with_a_datamodule():
    dm = CTRDataModule(data=frame(n=200), batch_size=32)
    Trainer(max_epochs=1, overfit_batches=2, **quiet_trainer_kwargs(enable_checkpointing=False)).fit(
        CTRModule(DeepFM(schema=dm.schema, mlp_params=MLP)), dm)


def overfit_batches_with_ctr_trainer():
    from rechub_lightning import CTRTrainer
    from rechub_lightning.data import DataGenerator

    tr, va, _ = DataGenerator(columns(), labels()).generate_dataloader(split_ratio=[0.7, 0.2], batch_size=32)
    CTRTrainer(DeepFM(TWO + [DenseFeature("d")], TWO, MLP), n_epoch=1, model_path=str(_tmp / "overfit"),
               trainer_kwargs=quiet_trainer_kwargs(overfit_batches=2)).fit(tr, va)


def two_validation_loaders():
    tr, va = loader(columns(), labels()), loader(columns(), labels())
    trainer = Trainer(max_epochs=1, **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(ctr_module(), tr, [va, va])


def ctr_trainer_fit_loaders(train, val):
    from rechub_lightning import CTRTrainer

    model = DeepFM(TWO + [DenseFeature("d")], TWO, MLP)
    CTRTrainer(model, n_epoch=1, model_path=str(_tmp / "loaders"), trainer_kwargs=quiet_trainer_kwargs()).fit(train, val)


def in_batch_one_row():
    from rechub_lightning import MatchTrainer
    from rechub_lightning.data import MatchDataGenerator
    from rechub_lightning.models.matching import DSSM

    user, item = SparseFeature("user_id", 20, embed_dim=8), SparseFeature("item_id", 30, embed_dim=8)
    x = {"user_id": np.arange(40) % 20, "item_id": np.arange(40) % 30}
    tr, _, _ = MatchDataGenerator(x, np.ones(40, dtype="float32")).generate_dataloader({"user_id": np.arange(5)}, {"item_id": np.arange(30)}, batch_size=1)
    no_bn = {"dims": [8], "batch_norm": False}
    model = DSSM([user], [item], no_bn, no_bn)
    MatchTrainer(model, mode=0, in_batch_neg=True, n_epoch=1, model_path=str(_tmp / "inb"), trainer_kwargs=quiet_trainer_kwargs()).fit(tr)


def load_checkpoint_built_with_other_arguments():
    """A DeepFM checkpoint with a [4] MLP restored into a DeepFM with an [8, 4] MLP (another config's overrides)."""
    from rechub_lightning.models.base import model_spec

    trained = CTRModule(DeepFM(TWO + [DenseFeature("d")], TWO, {"dims": [4]}))
    ckpt = {"hyper_parameters": {"model": model_spec(trained.model)}, "state_dict": trained.state_dict()}
    CTRModule(DeepFM(TWO + [DenseFeature("d")], TWO, {"dims": [8, 4]})).on_load_checkpoint(ckpt)


def load_other_models_checkpoint():
    """A DeepFM checkpoint restored into a DCN module (``rechub predict --config dcn.yaml --ckpt_path deepfm.ckpt``)."""
    from rechub_lightning.models.base import model_spec
    from rechub_lightning.models.ranking import DCN

    deepfm = DeepFM(TWO + [DenseFeature("d")], TWO, MLP)
    ckpt = {"hyper_parameters": {"model": model_spec(deepfm)}, "state_dict": {}}
    CTRModule(DCN(TWO + [DenseFeature("d")], 2, MLP)).on_load_checkpoint(ckpt)


def unreadable_csv():
    path = _tmp / "empty.csv"
    path.write_text("")
    CTRDataModule(path=str(path))


def not_a_checkpoint():
    from rechub_lightning.checkpoint import read_checkpoint

    path = _tmp / "rows.csv"
    frame().to_csv(path, index=False)
    read_checkpoint(str(path))


CASES += [
    # Torch-RecHub API: DataGenerator / CTRTrainer / MatchTrainer arguments
    ("DataGenerator: split_ratio summing past 1", lambda: ctr_fit_with(split=[0.8, 0.5]), ValueError, "split_ratio=(0.8, 0.5)"),
    ("CTRTrainer: empty training split", lambda: ctr_fit_with(split=[0.0, 0.5]), ValueError, "training data is empty"),
    ("CTRTrainer: empty validation split", lambda: ctr_fit_with(split=[0.9, 0.0]), ValueError, "validation data is empty"),
    ("CTRTrainer: n_epoch=-1 (Lightning: no limit)", lambda: ctr_fit_with(n_epoch=-1), ValueError, "n_epoch=-1"),
    ("CTRTrainer.fit with n_epoch=0", lambda: ctr_fit_with(n_epoch=0), ValueError, "n_epoch=0"),
    ("CTRTrainer: negative earlystop_patience", lambda: ctr_fit_with(earlystop_patience=-1), ValueError, "earlystop_patience=-1"),
    ("CTRTrainer: device 'gpu'", lambda: ctr_fit_with(device="gpu"), ValueError, "device='gpu'"),
    ("CTRTrainer: dense column wider than its embed_dim", lambda: ctr_fit_with(columns(d=np.ones((200, 3), dtype="float32"))),
     ValueError, "dense feature 'd' in training data must have 1 value(s) per row"),
    ("CTRTrainer: two ids per row in a sparse column", lambda: ctr_fit_with(columns(a=np.ones((200, 2), dtype="int64"))),
     ValueError, "sparse feature 'a' in training data must hold one id per row"),
    ("CTRTrainer: a 1-D column for a sequence feature", lambda: ctr_fit_with(
        {**columns(), "hist": np.arange(200) % 10}, features=TWO + [SequenceFeature("hist", 10, embed_dim=4, shared_with="a")]),
     ValueError, "sequence feature 'hist' in training data must be a (rows, length) matrix"),
    ("CTRTrainer: shared history id past its owner's vocabulary", lambda: ctr_fit_with(
        {**columns(), "hist": with_value(np.arange(400).reshape(200, 2) % 10, (7, 1), 12)},
        features=TWO + [SequenceFeature("hist", 20, embed_dim=4, shared_with="a")]),
     ValueError, "'hist' in training data has id 12 outside [0, 10) (it shares the table of 'a'"),
    # our loaders merge a 1-row tail into the batch before it (test_legal_edge_inputs_still_train); a user's own cannot
    ("CTRTrainer, the user's DataLoader: last batch of one row with BatchNorm", lambda: ctr_trainer_fit_loaders(
        reference_dataset_loader(columns(201), labels(201)), reference_dataset_loader(columns(), labels())), ValueError, "batch_size=50"),
    ("Trainer.fit(CTRModule, raw loader): last batch of one row with BatchNorm", lambda: native(
        ctr_module(), loader(columns(201), labels(201))), ValueError, "201 rows, batch_size=50"),
    ("MatchTrainer: in_batch_neg with batch_size 1", in_batch_one_row, ValueError, "in_batch_neg=True"),
    ("Trainer(overfit_batches) with a datamodule (rebuilds its batched loaders row by row)", overfit_batches_with_a_datamodule,
     ValueError, "overfit_batches=2"),
    ("CTRTrainer with overfit_batches in trainer_kwargs", overfit_batches_with_ctr_trainer, ValueError, "overfit_batches=2"),
    ("Trainer.fit(CTRModule) with two validation loaders (one metric state)", two_validation_loaders, ValueError, "got 2"),
    ("SparseFeature: fractional embed_dim", lambda: SparseFeature("city", 10, embed_dim=2.5), TypeError, "'city': embed_dim must be an int, got 2.5"),
    ("SparseFeature: fractional padding_idx", lambda: SparseFeature("city", 10, padding_idx=2.5), TypeError, "'city': padding_idx"),
    ("DenseFeature: text embed_dim", lambda: DenseFeature("age", "x"), TypeError, "'age': embed_dim must be an int, got 'x'"),
    # datamodules (programmatic Lightning and the CLI's --data.*)
    ("label column also a feature", lambda: CTRDataModule(data=frame(), sparse_features=["city", "label"], dense_features=["age"]),
     ValueError, "sparse_features names the label column(s) ['label']"),
    ("sparse_features as a string", lambda: CTRDataModule(data=frame(), sparse_features="city", dense_features=["age"]),
     TypeError, "sparse_features must be a list of column names, got the string 'city'"),
    ("max_len 0 (empties every history)", lambda: CTRDataModule(data=frame(hist=["1|2"] * 60), sequence_features=["hist"], max_len=0),
     ValueError, "max_len=0"),
    ("eval_batch_size 0", lambda: CTRDataModule(data=frame(), eval_batch_size=0), ValueError, "eval_batch_size=0"),
    ("MatchDataModule: eval_batch_size 0", lambda: __import__("rechub_lightning.data", fromlist=["x"]).MatchDataModule(
        synthetic_users=30, eval_batch_size=0), ValueError, "eval_batch_size=0"),
    ("fractional batch_size", lambda: CTRDataModule(data=frame(), batch_size=2.5), ValueError, "batch_size=2.5"),
    ("NaN split_ratio", lambda: CTRDataModule(data=frame(), split_ratio=(float("nan"), 0.1)), ValueError, "split_ratio=(nan, 0.1)"),
    # (a column of whole numbers is a column of one-item histories: pandas reads "7" rows as 7)
    ("sequence column of fractional numbers", lambda: CTRDataModule(data=frame(hist=[i + 0.5 for i in range(60)]),
                                                                     sequence_features=["hist"]),
     TypeError, "sequence feature 'hist' must hold a list of ids"),
    # files and checkpoints (the CLI's --data.path / --ckpt_path)
    ("empty CSV file", unreadable_csv, ValueError, "empty.csv' is not a readable CSV table"),
    ("a CSV as --ckpt_path", not_a_checkpoint, ValueError, "rows.csv' is not a readable PyTorch checkpoint"),
    ("checkpoint of another model", load_other_models_checkpoint, ValueError, "holds a DeepFM model"),
    ("checkpoint of the same model built with other arguments", load_checkpoint_built_with_other_arguments, ValueError,
     "mlp_params: checkpoint {'dims': [4]}, here {'dims': [8, 4]}"),
]


def test_checked_data_is_read_once(monkeypatch):
    """The trainer facade checks its loaders, then the module's hooks see the same loaders under
    lightning.Trainer (every validation epoch): each dataset's columns are read once."""
    import rechub_lightning.data.base as base

    reads = []
    orig = base.loader_columns
    monkeypatch.setattr(base, "loader_columns", lambda loader, *a, **k: reads.append(id(loader.dataset)) or orig(loader, *a, **k))
    from rechub_lightning import CTRTrainer
    from rechub_lightning.data import DataGenerator

    x, y = columns(), labels()
    tr, va, _ = DataGenerator(x, y).generate_dataloader(x_val=x, y_val=y, x_test=x, y_test=y, batch_size=50)
    model = DeepFM(TWO + [DenseFeature("d")], TWO, MLP)
    CTRTrainer(model, n_epoch=3, earlystop_patience=5, model_path=str(_tmp / "once"), trainer_kwargs=quiet_trainer_kwargs()).fit(tr, va)
    assert sorted(reads) == sorted([id(tr.dataset), id(va.dataset)])
    # a dataset changed into a bad one is a new object and is checked again
    with pytest.raises(ValueError, match="'a' in training data has id 10"):
        bad = loader(columns(a=with_value(np.arange(200) % 10, 1, 10)), labels())
        CTRTrainer(model, n_epoch=1, model_path=str(_tmp / "once2"), trainer_kwargs=quiet_trainer_kwargs()).fit(bad, va)


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


class _RowsSeen(Callback):
    def __init__(self):
        self.sizes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(len(batch[1]))


def test_legal_edge_inputs_still_train():
    """What the checks above must not refuse: a (N, 1) label column, soft training labels in [0, 1],
    a training set smaller than one batch, a last batch of one row without BatchNorm, padding id 0
    in a shared history, a ragged history in a per-row dataset (checked padded with 0), and a
    1-row tail with BatchNorm in our own loaders (it joins the batch before it: every row trains)."""
    from rechub_lightning import CTRTrainer
    from rechub_lightning.data import DataGenerator, TorchDataset
    from rechub_lightning.data.base import validate_loader

    ctr_fit_with(y=labels().reshape(-1, 1))
    ctr_fit_with(columns(30), batch_size=50)
    hist = SequenceFeature("hist", 10, embed_dim=4, shared_with="a", padding_idx=0)
    history = np.zeros((200, 3), dtype="int64")
    history[:, 0] = np.arange(200) % 10
    x = {**columns(), "hist": history}
    soft = np.full(200, 0.25, dtype="float32")
    tr, va, _ = DataGenerator(x, soft).generate_dataloader(x_val=x, y_val=labels(), x_test=x, y_test=labels(), batch_size=50)
    model = DeepFM(TWO + [hist, DenseFeature("d")], TWO, MLP)
    CTRTrainer(model, n_epoch=1, model_path=str(_tmp / "legal"), trainer_kwargs=quiet_trainer_kwargs()).fit(tr, va)
    x, y = columns(201), labels(201)
    tr, va, _ = DataGenerator(x, y).generate_dataloader(x_val=x, y_val=y, x_test=x, y_test=y, batch_size=50)
    model = DeepFM(TWO + [DenseFeature("d")], TWO, {"dims": [8], "batch_norm": False})
    CTRTrainer(model, n_epoch=1, model_path=str(_tmp / "legal1"), trainer_kwargs=quiet_trainer_kwargs()).fit(tr, va)
    # 201 rows in batches of 50 (DataGenerator) and 79 rows in batches of 39 (a datamodule), BatchNorm models
    seen = _RowsSeen()
    x, y = columns(201), labels(201)
    tr, va, _ = DataGenerator(x, y).generate_dataloader(x_val=x, y_val=y, x_test=x, y_test=y, batch_size=50)
    CTRTrainer(DeepFM(TWO + [DenseFeature("d")], TWO, MLP), n_epoch=1, model_path=str(_tmp / "tail"),
               trainer_kwargs=quiet_trainer_kwargs(callbacks=[seen])).fit(tr, va)
    assert seen.sizes == [50, 50, 50, 51]
    seen = _RowsSeen()
    dm = CTRDataModule(data=frame(n=100), batch_size=39, split_ratio=(0.79, 0.2))
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params=MLP))
    Trainer(max_epochs=1, **quiet_trainer_kwargs(enable_checkpointing=False, callbacks=[seen])).fit(module, dm)
    assert seen.sizes == [39, 40]
    ragged = [list(range(1 + i % 3)) for i in range(200)]
    dl = torch.utils.data.DataLoader(TorchDataset({**columns(), "hist": ragged}, soft), batch_size=50, collate_fn=lambda b: b)
    assert validate_loader(dl, TWO + [hist], "training", task_types=["classification"], allow_empty=False)
