"""Train a small model; optionally SIGKILL itself after N steps; optionally resume from last.ckpt.

    python resume.py ctr|stream|mtl|dwa OUT_DIR KILL_AFTER_STEP(-1: never) RESUME(0/1) [CKPT_EVERY_N_STEPS=4]

``ctr``: DeepFM with sparse embeddings, early stopping and dropout. ``stream``: the same model
streaming its training data from Parquet row groups (shuffle buffer of 2 groups). ``mtl``: MMOE with GradNorm
weighting (manual optimization), a per-step StepLR and gradient clipping. ``dwa``: the same
MMOE with Dynamic Weight Average (epoch-mean task losses set the next epoch's weights). Saves the final
module state dict (model, and for ``mtl`` GradNorm's task weights / moments / initial losses)
as ``final.pt`` and the optimizer state, learning rates and step as ``final_opt.pt``.
"""

import os
import signal
import sys

import torch
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from rechub_lightning import CTRModule, MTLModule
from rechub_lightning.checkpoint import AtomicCheckpointIO
from rechub_lightning.data import CTRDataModule, MTLDataModule
from rechub_lightning.models.multi_task import MMOE
from rechub_lightning.models.ranking import DeepFM

family, out, kill_after, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
ckpt_every = int(sys.argv[5]) if len(sys.argv) > 5 else 4
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
seed_everything(7)


class Kill(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


callbacks = [Kill(), ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_train_steps=ckpt_every, save_last=True)]
if family == "ctr":
    dm = CTRDataModule(synthetic_rows=3000, synthetic_max_vocab=300, batch_size=256, seed=5)
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [16], "dropout": 0.3}), sparse_embeddings=True)
    callbacks.append(EarlyStopping("val/auc", mode="max", patience=5))
elif family == "stream":
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rechub_lightning.data import make_criteo_like

    train_path, val_path = os.path.join(out, "train.parquet"), os.path.join(out, "val.parquet")
    if not os.path.exists(train_path):  # the same files for every run in OUT_DIR
        os.makedirs(out, exist_ok=True)
        df = make_criteo_like(n_rows=3500, max_vocab=300, seed=5)
        pq.write_table(pa.Table.from_pandas(df.iloc[:3000], preserve_index=False), train_path, row_group_size=250)
        pq.write_table(pa.Table.from_pandas(df.iloc[3000:], preserve_index=False), val_path, row_group_size=250)
    dm = CTRDataModule(
        path=train_path, val_path=val_path, sparse_features=[f"C{i}" for i in range(1, 27)],
        dense_features=[f"I{i}" for i in range(1, 14)], batch_size=256, streaming=True, shuffle_buffer=2, seed=5,
    )
    module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [16], "dropout": 0.3}), sparse_embeddings=True)
elif family in ("mtl", "dwa"):
    dm = MTLDataModule(synthetic_rows=2000, batch_size=256, embed_dim=8, seed=5)
    model = MMOE(
        schema=dm.schema,
        n_expert=2,
        expert_params={"dims": [16], "dropout": 0.2},
        tower_params_list=[{"dims": [8], "dropout": 0.2}] * len(dm.task_types),
    )
    weighting = {"method": "gradnorm", "alpha": 0.16} if family == "mtl" else {"method": "dwa", "temperature": 0.5}
    module = MTLModule(
        model,
        adaptive_params=weighting,
        scheduler_fn="torch.optim.lr_scheduler.StepLR",
        scheduler_params={"step_size": 5, "gamma": 0.9},
        scheduler_interval="step",
        gradient_clip_val=5.0,
    )
else:
    raise SystemExit(f"family must be ctr, stream, mtl or dwa, got {family!r}")

trainer = Trainer(
    max_epochs=3,
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    plugins=[AtomicCheckpointIO()],
    callbacks=callbacks,
)
trainer.fit(module, dm, ckpt_path=os.path.join(out, "ckpt", "last.ckpt") if resume else None)
torch.save(module.state_dict(), os.path.join(out, "final.pt"))
opt = trainer.optimizers[0]
torch.save(
    {"global_step": trainer.global_step, "lr": [g["lr"] for g in opt.param_groups], "optimizer": opt.state_dict()},
    os.path.join(out, "final_opt.pt"),
)
