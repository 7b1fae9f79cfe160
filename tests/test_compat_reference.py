"""A Torch-RecHub 0.9.0 CTR script runs after changing only its imports, and reaches the same
test AUC (within 0.005) on the same data and seed."""

import textwrap

import pytest

pytest.importorskip("torch_rechub")

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import torch
    from sklearn.preprocessing import LabelEncoder, MinMaxScaler
    {imports}

    torch.manual_seed(2022)
    data = FRAME.copy()
    dense_features = [f for f in data.columns if f.startswith("I")]
    sparse_features = [f for f in data.columns if f.startswith("C")]
    data[sparse_features] = data[sparse_features].astype("float64").fillna(-1)
    data[dense_features] = data[dense_features].fillna(0)
    for feat in dense_features:
        data[feat] = np.log1p(data[feat])
    data[dense_features] = MinMaxScaler().fit_transform(data[dense_features])
    for feat in sparse_features:
        data[feat] = LabelEncoder().fit_transform(data[feat])
    dense_feas = [DenseFeature(f) for f in dense_features]
    sparse_feas = [SparseFeature(f, vocab_size=data[f].nunique(), embed_dim=16) for f in sparse_features]
    y = data["label"]
    del data["label"]
    x = data
    dg = DataGenerator(x, y)
    train_dl, val_dl, test_dl = dg.generate_dataloader(split_ratio=[0.7, 0.1], batch_size=1024)
    model = MODEL_FACTORY(dense_feas, sparse_feas)
    trainer = CTRTrainer(model, optimizer_params={{"lr": 1e-3, "weight_decay": 1e-5}}, n_epoch=3,
                         earlystop_patience=2, device="cpu", model_path=MODEL_PATH)
    trainer.fit(train_dl, val_dl)
    AUC = trainer.evaluate(trainer.model, test_dl)
    """
)

REFERENCE_IMPORTS = """
from torch_rechub.basic.features import DenseFeature, SparseFeature
from torch_rechub.trainers import CTRTrainer
from torch_rechub.utils.data import DataGenerator
"""
OUR_IMPORTS = """
from rechub_lightning import DenseFeature, SparseFeature, CTRTrainer
from rechub_lightning.data import DataGenerator
"""


def _run(imports, model_factory, frame, path):
    path.mkdir(parents=True, exist_ok=True)
    ns = {"FRAME": frame, "MODEL_FACTORY": model_factory, "MODEL_PATH": str(path)}
    exec(SCRIPT.format(imports=imports), ns)
    return ns["AUC"]


def _reference_deepfm(dense, sparse):
    """A Torch-RecHub DeepFM built from whatever feature objects the script made."""
    from torch_rechub.basic.features import DenseFeature as RD, SparseFeature as RS
    from torch_rechub.models.ranking import DeepFM as RefDeepFM

    rd = [RD(f.name) for f in dense]
    rs = [RS(f.name, f.vocab_size, embed_dim=f.embed_dim) for f in sparse]
    return RefDeepFM(rd + rs, rs, {"dims": [128, 64], "dropout": 0.2, "activation": "relu"})


def _our_deepfm(dense, sparse):
    from rechub_lightning.models.ranking import DeepFM

    return DeepFM(dense + sparse, sparse, {"dims": [128, 64], "dropout": 0.2, "activation": "relu"})


@pytest.fixture(scope="module")
def frame():
    from rechub_lightning.data import make_criteo_like

    return make_criteo_like(n_rows=15000, max_vocab=2000, seed=11)


@pytest.fixture(scope="module")
def reference_auc(frame, tmp_path_factory):
    return _run(REFERENCE_IMPORTS, _reference_deepfm, frame, tmp_path_factory.mktemp("ref"))


@pytest.mark.slow
def test_reference_model_object_same_auc(frame, reference_auc, tmp_path):
    # our trainer and DataGenerator, the reference's model object
    our_auc = _run(OUR_IMPORTS, _reference_deepfm, frame, tmp_path)
    assert reference_auc > 0.7
    assert our_auc == pytest.approx(reference_auc, abs=0.005)


@pytest.mark.slow
def test_our_model_same_auc(frame, reference_auc, tmp_path):
    our_auc = _run(OUR_IMPORTS, _our_deepfm, frame, tmp_path)
    assert our_auc == pytest.approx(reference_auc, abs=0.005)
