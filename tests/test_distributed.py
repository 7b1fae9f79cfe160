"""Distributed exactness on CPU (gloo): validation metrics and predictions under 2-process DDP
equal single-process ones; bf16 mixed precision trains."""

import pandas as pd
import pytest
import torch
from lightning import Trainer

from conftest import quiet_trainer_kwargs
from rechub_lightning import CTRModule
from rechub_lightning.data import CTRDataModule
from rechub_lightning.models.ranking import DCNv2, DeepFM
from rechub_lightning.prediction import PredictionWriter

MLP = {"dims": [32], "dropout": 0.0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # 3001 rows -> 300 validation rows... make it odd: split (0.8, 0.1) of 3011 gives 301
    dm = CTRDataModule(synthetic_rows=3011, synthetic_max_vocab=300, batch_size=256, eval_batch_size=64)
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params=MLP))
    trainer = Trainer(max_epochs=1, default_root_dir=root, **quiet_trainer_kwargs())
    trainer.fit(module, dm)
    return dm, trainer.checkpoint_callback.best_model_path, root


@pytest.mark.slow
def test_ddp_validation_equals_single_process(trained):
    dm, ckpt, root = trained
    assert len(dm.dataset("val")) % 2 == 1  # not divisible by the world size
    single = Trainer(**quiet_trainer_kwargs()).validate(CTRModule.load_from_checkpoint(ckpt), dm, ckpt_path=ckpt, verbose=False)[0]
    ddp = Trainer(**quiet_trainer_kwargs(devices=2, strategy="ddp_spawn")).validate(
        CTRModule.load_from_checkpoint(ckpt), dm, ckpt_path=ckpt, verbose=False
    )[0]
    assert ddp["val/auc"] == pytest.approx(single["val/auc"], abs=1e-6)
    assert ddp["val/logloss"] == pytest.approx(single["val/logloss"], abs=1e-6)


@pytest.mark.slow
def test_ddp_predictions_written_once_per_row_in_order(trained, tmp_path):
    dm, ckpt, _ = trained
    single_out, ddp_out = tmp_path / "single.csv", tmp_path / "ddp.csv"
    Trainer(callbacks=[PredictionWriter(str(single_out))], **quiet_trainer_kwargs()).predict(
        CTRModule.load_from_checkpoint(ckpt), dm, return_predictions=False
    )
    Trainer(callbacks=[PredictionWriter(str(ddp_out))], **quiet_trainer_kwargs(devices=2, strategy="ddp_spawn")).predict(
        CTRModule.load_from_checkpoint(ckpt), dm, return_predictions=False
    )
    a, b = pd.read_csv(single_out), pd.read_csv(ddp_out)
    assert len(b) == len(dm.dataset("predict")) == len(a)
    assert list(b["row"]) == list(range(len(b)))
    assert (a["pred"] - b["pred"]).abs().max() < 1e-6


@pytest.mark.slow
def test_ddp_training_batches_disjoint(tmp_path):
    """Each rank sees different training rows in a step (the batched sampler shards by rank)."""
    import numpy as np

    from rechub_lightning.data import make_criteo_like

    df = make_criteo_like(n_rows=2000, max_vocab=200, seed=3)
    df["rid"] = np.arange(len(df), dtype=np.float64)  # unscaled dense column = row identity
    dm = CTRDataModule(data=df, sparse_features=[f"C{i}" for i in range(1, 27)], dense_features=["rid"],
                       dense_scaling="none", batch_size=100)
    module = _RecordingModule(DeepFM(schema=dm.schema, mlp_params=MLP), str(tmp_path))
    Trainer(max_epochs=1, limit_val_batches=0, **quiet_trainer_kwargs(devices=2, strategy="ddp_spawn",
            enable_checkpointing=False)).fit(module, dm)
    seen = [torch.load(tmp_path / f"rows{r}.pt") for r in range(2)]
    assert len(set(seen[0]) & set(seen[1])) == 0
    assert len(seen[0]) + len(seen[1]) == len(dm.dataset("train"))


class _RecordingModule(CTRModule):
    def __init__(self, model, out_dir):
        super().__init__(model)
        self.out_dir = out_dir
        self.rows: list[int] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.rows.extend(x["rid"].long().tolist())
        return super().training_step(batch, batch_idx)

    def on_train_end(self):
        torch.save(self.rows, f"{self.out_dir}/rows{self.global_rank}.pt")


def test_bf16_mixed_trains_without_nan():
    dm = CTRDataModule(synthetic_rows=4000, synthetic_max_vocab=300, batch_size=256)
    module = CTRModule(DCNv2(schema=dm.schema, mlp_params=MLP, n_cross_layers=2, low_rank=8))
    trainer = Trainer(max_epochs=2, precision="bf16-mixed", **quiet_trainer_kwargs(enable_checkpointing=False))
    trainer.fit(module, dm)
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"]) and m["val/auc"] > 0.6
