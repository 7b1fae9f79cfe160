"""CTRModule, CTRTrainer and the reference-API facade."""

import os

import numpy as np
import pytest
import torch
from lightning import Trainer
from sklearn.metrics import log_loss, roc_auc_score

from conftest import quiet_trainer_kwargs
from rechub_lightning import CTRModule, CTRTrainer, DenseFeature, SparseFeature
from rechub_lightning.data import CTRDataModule, DataGenerator, make_criteo_like
from rechub_lightning.models.ranking import DeepFM, WideDeep
from rechub_lightning.trainers import device_config

MLP = {"dims": [32], "dropout": 0.0}


@pytest.fixture(scope="module")
def dm():
    return CTRDataModule(synthetic_rows=6000, synthetic_max_vocab=800, batch_size=512)


def test_logged_auc_and_logloss_equal_sklearn(dm):
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params=MLP))
    trainer = Trainer(max_epochs=1, **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    logged = trainer.validate(module, dm, verbose=False)[0]
    module.eval()
    preds, ys = [], []
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            preds.append(torch.sigmoid(module(x)))
            ys.append(y)
    p, y = torch.cat(preds).double().numpy(), torch.cat(ys).numpy()
    assert logged["val/auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert logged["val/logloss"] == pytest.approx(log_loss(y, p), abs=1e-5)
    assert logged["val/auc"] > 0.6  # it learned something in one epoch


def test_reduce_lr_on_plateau_reduces(dm):
    module = CTRModule(
        WideDeep(schema=dm.schema, mlp_params=MLP),
        optimizer_params={"lr": 1e-2},
        scheduler_fn="ReduceLROnPlateau",
        # threshold 10 (relative): after the first epoch sets the best value, no epoch counts
        # as an improvement, so epochs 2 and 3 each halve the LR.
        scheduler_params={"mode": "max", "factor": 0.5, "patience": 0, "threshold": 10.0},
    )
    trainer = Trainer(max_epochs=3, **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-2 * 0.5**2)


def test_cosine_scheduler_by_step(dm):
    module = CTRModule(
        WideDeep(schema=dm.schema, mlp_params=MLP),
        optimizer_params={"lr": 1e-2},
        scheduler_fn=torch.optim.lr_scheduler.CosineAnnealingLR,
        scheduler_params={"T_max": 1000},
        scheduler_interval="step",
    )
    trainer = Trainer(max_epochs=1, **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    steps = trainer.global_step
    expect = 0.5 * 1e-2 * (1 + np.cos(np.pi * steps / 1000))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expect, rel=1e-6)


def test_checkpoint_loads_without_model_argument(dm, tmp_path):
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params=MLP), optimizer_fn=torch.optim.AdamW)
    trainer = Trainer(max_epochs=1, default_root_dir=tmp_path, **quiet_trainer_kwargs())
    trainer.fit(module, dm)
    path = trainer.checkpoint_callback.best_model_path
    loaded = CTRModule.load_from_checkpoint(path)  # weights_only loading, no model passed
    assert loaded.hparams.optimizer_fn == "torch.optim.adamw.AdamW"
    x, _ = next(iter(dm.val_dataloader()))
    module.eval(), loaded.eval()
    assert torch.equal(module(x), loaded(x))


def test_sparse_embeddings_train_and_only_touch_batch_rows(dm):
    model = DeepFM(schema=dm.schema, mlp_params=MLP)
    module = CTRModule(model, sparse_embeddings=True)
    opt = module.configure_optimizers()
    table = model.embedding.tables["dim16"].weight
    before = table.detach().clone()
    x, y = next(iter(dm.train_dataloader()))
    loss = module.compute_loss((x, y))
    opt.zero_grad()
    loss.backward()
    assert table.grad.is_sparse
    opt.step()
    changed = (table.detach() != before).any(dim=1)
    touched = torch.zeros(table.shape[0], dtype=torch.bool)
    for f in dm.schema.sparse:
        touched[x[f.name] + model.embedding._offset[f.name]] = True
    assert torch.equal(changed & ~touched, torch.zeros_like(changed))  # untouched rows unchanged
    assert changed.any()


# ----------------------------------------------------------------------------- facade
def _features_and_loaders(n=6000, seed=0):
    df = make_criteo_like(n_rows=n, max_vocab=400, seed=seed, missing_rate=0.0)
    dense = [f"I{i}" for i in range(1, 14)]
    sparse = [f"C{i}" for i in range(1, 27)]
    x = {c: np.log1p(df[c].to_numpy(dtype=np.float32)) for c in dense}
    x.update({c: df[c].to_numpy(dtype=np.int64) for c in sparse})
    dense_feas = [DenseFeature(c) for c in dense]
    sparse_feas = [SparseFeature(c, vocab_size=int(df[c].max()) + 1, embed_dim=8) for c in sparse]
    return x, df["label"].to_numpy(), dense_feas, sparse_feas


def test_facade_restores_best_weights_and_saves_them(tmp_path):
    x, y, dense_feas, sparse_feas = _features_and_loaders()
    torch.manual_seed(0)
    train_dl, val_dl, test_dl = DataGenerator(x, y).generate_dataloader(split_ratio=[0.7, 0.15], batch_size=256)
    model = DeepFM(dense_feas + sparse_feas, sparse_feas, {"dims": [64], "dropout": 0.0})
    # a large learning rate overfits fast, so the best epoch is not the last one
    trainer = CTRTrainer(model, optimizer_params={"lr": 2e-2, "weight_decay": 0.0}, n_epoch=5,
                         earlystop_patience=10, model_path=str(tmp_path))
    trainer.fit(train_dl, val_dl)
    best_path = trainer.best_model_path
    assert best_path and os.path.exists(best_path)
    best_score = float(trainer.trainer.checkpoint_callback.best_model_score)
    # the user's model object holds the best epoch's weights, and model.pth holds the same
    assert trainer.evaluate(model, val_dl) == pytest.approx(best_score, abs=1e-6)
    saved = torch.load(tmp_path / "model.pth", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # the last checkpoint differs from the best one when the best epoch was not the last
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    if last["epoch"] != torch.load(best_path, weights_only=True)["epoch"]:
        assert trainer.evaluate(model, val_dl) >= max(
            float(v) for k, v in last["callbacks"].items() if "ModelCheckpoint" in k for v in [v["best_model_score"]]
        ) - 1e-6
    preds = trainer.predict(model, test_dl)
    assert isinstance(preds, list) and len(preds) == len(test_dl.dataset)
    assert all(0.0 <= p <= 1.0 for p in preds)


def test_facade_train_one_epoch_returns_mean_loss(tmp_path):
    x, y, dense_feas, sparse_feas = _features_and_loaders(n=2000)
    train_dl, _, _ = DataGenerator(x, y, seed=1).generate_dataloader(split_ratio=[0.8, 0.1], batch_size=256)
    model = WideDeep(dense_feas, sparse_feas, {"dims": [16]})
    trainer = CTRTrainer(model, model_path=str(tmp_path))
    first = trainer.train_one_epoch(train_dl)
    second = trainer.train_one_epoch(train_dl)
    assert np.isfinite(first) and second < first  # the optimizer state persists across calls


def test_gpus_map_to_ddp_never_dataparallel():
    assert device_config("cpu", [0, 1]) == {"accelerator": "gpu", "devices": [0, 1], "strategy": "ddp"}
    assert device_config("cuda:1") == {"accelerator": "gpu", "devices": [1], "strategy": "auto"}
    assert device_config("cpu")["accelerator"] == "cpu"
    # the reference ignores a one-id gpus list (its examples pass gpus=[0] with device="cpu")
    assert device_config("cpu", [0]) == {"accelerator": "cpu", "devices": 1, "strategy": "auto"}
    assert device_config("cuda:1", [0]) == {"accelerator": "gpu", "devices": [1], "strategy": "auto"}
    import rechub_lightning

    src = os.path.dirname(rechub_lightning.__file__)
    for root, _, files in os.walk(src):
        for f in files:
            if f.endswith(".py"):
                assert "DataParallel(" not in open(os.path.join(root, f)).read(), f


def test_reference_model_object_trains_with_probabilities(tmp_path):
    pytest.importorskip("torch_rechub")
    from torch_rechub.basic.features import DenseFeature as RD, SparseFeature as RS
    from torch_rechub.models.ranking import DeepFM as RefDeepFM

    x, y, dense_feas, sparse_feas = _features_and_loaders(n=3000)
    rd = [RD(f.name) for f in dense_feas]
    rs = [RS(f.name, f.vocab_size, embed_dim=8) for f in sparse_feas]
    model = RefDeepFM(rd + rs, rs, {"dims": [32], "dropout": 0.0})
    train_dl, val_dl, test_dl = DataGenerator(x, y, seed=0).generate_dataloader(split_ratio=[0.7, 0.15], batch_size=256)
    trainer = CTRTrainer(model, n_epoch=2, model_path=str(tmp_path))
    assert not trainer.module.logits_out
    trainer.fit(train_dl, val_dl)
    assert trainer.evaluate(model, test_dl) > 0.6


def test_sparse_auto_default_and_clipping(dm):
    # default (None): sparse on one process, and gradient clipping works with sparse gradients
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params=MLP))
    trainer = Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, gradient_clip_val=0.5,
                      **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    assert module.sparse_embeddings
    assert module.model.embedding.tables["dim16"].sparse
    # embedding regularization keeps the reference's dense semantics, and refuses explicit sparse
    reg = {"embedding_l2": 1e-6}
    dense = CTRModule(DeepFM(schema=dm.schema, mlp_params=MLP), regularization_params=reg)
    Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, **quiet_trainer_kwargs(enable_checkpointing=False)).fit(dense, dm)
    assert not dense.sparse_embeddings
    with pytest.raises(ValueError, match="embedding_l2"):
        CTRModule(DeepFM(schema=dm.schema, mlp_params=MLP), regularization_params=reg, sparse_embeddings=True)


def test_sparse_aware_clip_norm_matches_dense():
    from rechub_lightning.modules.base import clip_sparse_aware_

    torch.manual_seed(0)
    e1 = torch.nn.Embedding(20, 4, sparse=True)
    e2 = torch.nn.Embedding(20, 4)
    e2.weight.data.copy_(e1.weight.data)
    idx = torch.tensor([1, 3, 3, 7])
    (e1(idx) ** 2).sum().backward()
    (e2(idx) ** 2).sum().backward()
    n1 = clip_sparse_aware_([e1.weight], 0.1)
    n2 = torch.nn.utils.clip_grad_norm_([e2.weight], 0.1)
    assert float(n1) == pytest.approx(float(n2), rel=1e-5)
    assert torch.allclose(e1.weight.grad.to_dense(), e2.weight.grad, atol=1e-6)


def test_step_loss_reaches_the_progress_bar_only_when_there_is_one(dm, monkeypatch):
    """Progress-bar values become Python floats after every step (a host-device sync on a GPU):
    without a bar, no step value is converted; with one, the loss is shown."""
    import lightning.pytorch.trainer.connectors.logger_connector.result as result

    conversions = []
    orig = result.convert_tensors_to_scalars
    monkeypatch.setattr(result, "convert_tensors_to_scalars", lambda v: conversions.append(1) or orig(v))
    for bar in (False, True):
        conversions.clear()
        trainer = Trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0,
                          **quiet_trainer_kwargs(enable_progress_bar=bar, enable_checkpointing=False))
        trainer.fit(CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [8]})), dm)
        assert ("train/loss_step" in trainer.progress_bar_metrics) is bar
        assert "train/loss_step" in trainer.callback_metrics or "train/loss" in trainer.callback_metrics
        assert (len(conversions) >= 5) is bar  # one conversion per step with a bar, none without


def test_reduce_lr_on_plateau_follows_the_monitored_metrics_direction():
    """ReduceLROnPlateau's own default is mode="min": watching val/auc it cut the rate each time the
    AUC rose. Its mode now defaults to the watched metric's direction; an explicit mode is kept."""
    feats = [SparseFeature("a", 10, embed_dim=4)]
    plateau = "torch.optim.lr_scheduler.ReduceLROnPlateau"

    def mode(**kw):
        module = CTRModule(DeepFM(feats, feats, {"dims": [4]}), scheduler_fn=plateau, **kw)
        return module.configure_optimizers()["lr_scheduler"]["scheduler"].mode

    assert mode() == "max"  # val/auc
    assert mode(scheduler_monitor="val/logloss") == "min"
    assert mode(scheduler_params={"mode": "min"}) == "min"
    with pytest.raises(ValueError, match="val/something"):
        mode(scheduler_monitor="val/something")
