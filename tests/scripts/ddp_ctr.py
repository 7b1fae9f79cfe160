"""DDP exactness on CPU: `python ddp_ctr.py prepare OUT [mtl]` then `python ddp_ctr.py ddp OUT [mtl]`.

prepare: train one epoch in one process, keep the checkpoint, write single-process validation
metrics and predictions. ddp: the same validation and prediction with 2 gloo processes
(Lightning's `ddp` launcher re-runs this script for rank 1), plus (CTR) a 1-epoch training run
that records which rows each rank trained on. With `mtl`: MMOE on the multi-task datamodule
(per-task metrics and probabilities) instead of DeepFM on the CTR one.
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
from lightning import Trainer

from rechub_lightning import CTRModule, MTLModule
from rechub_lightning.data import CTRDataModule, MTLDataModule, make_criteo_like
from rechub_lightning.models.multi_task import MMOE
from rechub_lightning.models.ranking import DeepFM
from rechub_lightning.prediction import PredictionWriter

mode, out = sys.argv[1], sys.argv[2]
family = sys.argv[3] if len(sys.argv) > 3 else "ctr"
torch.set_num_threads(1)
quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
# 3011 rows -> 301 validation rows: not divisible by the world size
if family == "mtl":
    Module = MTLModule
    dm = MTLDataModule(synthetic_rows=3011, batch_size=256, eval_batch_size=64, embed_dim=8)
    columns = [f"pred_{label}" for label in dm.labels]
else:
    Module = CTRModule
    dm = CTRDataModule(synthetic_rows=3011, synthetic_max_vocab=300, batch_size=256, eval_batch_size=64)
    columns = None
ckpt = os.path.join(out, "model.ckpt")


def writer(name):
    return PredictionWriter(os.path.join(out, name), columns)


def plain_loader():
    """A Torch-RecHub-style loader (per-row dataset + collate) over the 301 validation rows:
    under DDP Lightning deals its rows to the ranks in turn (rank r: rows r, r + 2, ...)."""
    from torch.utils.data import DataLoader

    from rechub_lightning.data import PredictDataset

    x = {k: v.numpy() for k, v in dm.dataset("val").x.items()}
    return DataLoader(PredictDataset(x), batch_size=37)


if mode == "prepare":
    if family == "mtl":
        model = MMOE(schema=dm.schema, n_expert=3, expert_params={"dims": [16]}, tower_params_list=[{"dims": [8]}] * 2)
        module = MTLModule(model)
    else:
        module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [32]}))
    t = Trainer(max_epochs=1, devices=1, default_root_dir=out, **quiet)
    t.fit(module, dm)
    shutil.copy(t.checkpoint_callback.best_model_path, ckpt)
    res = Trainer(devices=1, default_root_dir=out, **quiet).validate(Module.load_from_checkpoint(ckpt), dm, ckpt_path=ckpt, verbose=False)[0]
    json.dump({**res, "n_val": len(dm.dataset("val"))}, open(os.path.join(out, "single.json"), "w"))
    Trainer(devices=1, callbacks=[writer("single.csv")], **quiet).predict(
        Module.load_from_checkpoint(ckpt), dm, return_predictions=False)
    Trainer(devices=1, callbacks=[writer("single_plain.csv")], **quiet).predict(
        Module.load_from_checkpoint(ckpt), plain_loader(), return_predictions=False)
else:
    t = Trainer(devices=2, strategy="ddp", default_root_dir=out, **quiet)
    res = t.validate(Module.load_from_checkpoint(ckpt), dm, ckpt_path=ckpt, verbose=False)[0]
    if t.is_global_zero:
        json.dump(res, open(os.path.join(out, "ddp.json"), "w"))
    Trainer(devices=2, strategy="ddp", default_root_dir=out, callbacks=[writer("ddp.csv")], **quiet).predict(
        Module.load_from_checkpoint(ckpt), dm, return_predictions=False)
    Trainer(devices=2, strategy="ddp", default_root_dir=out, callbacks=[writer("ddp_plain.csv")], **quiet).predict(
        Module.load_from_checkpoint(ckpt), plain_loader(), return_predictions=False)
    if family != "ctr":
        sys.exit(0)

    # which rows does each rank train on? an unscaled dense column carries the row id
    df = make_criteo_like(n_rows=2000, max_vocab=200, seed=3)
    df["rid"] = np.arange(len(df), dtype=np.float64)
    dm2 = CTRDataModule(data=df, sparse_features=[f"C{i}" for i in range(1, 27)], dense_features=["rid"],
                        dense_scaling="none", batch_size=100)

    class Recording(CTRModule):
        rows: list = []

        def training_step(self, batch, batch_idx):
            self.rows.extend(batch[0]["rid"].long().tolist())
            return super().training_step(batch, batch_idx)

    module = Recording(DeepFM(schema=dm2.schema, mlp_params={"dims": [8]}))
    t = Trainer(max_epochs=1, devices=2, strategy="ddp", limit_val_batches=0, enable_checkpointing=False, **quiet)
    t.fit(module, dm2)
    torch.save({"rows": module.rows, "n_train": len(dm2.dataset("train"))}, os.path.join(out, f"rows{t.global_rank}.pt"))
