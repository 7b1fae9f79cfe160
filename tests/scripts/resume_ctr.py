"""Train a small CTR model; optionally SIGKILL itself after N steps; optionally resume from last.ckpt.

    python resume_ctr.py OUT_DIR KILL_AFTER_STEP(-1: never) RESUME(0/1)
"""

import os
import signal
import sys

import torch
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from rechub_lightning import CTRModule
from rechub_lightning.checkpoint import AtomicCheckpointIO
from rechub_lightning.data import CTRDataModule
from rechub_lightning.models.ranking import DeepFM

out, kill_after, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
seed_everything(7)


class Kill(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


dm = CTRDataModule(synthetic_rows=3000, synthetic_max_vocab=300, batch_size=256, seed=5)
module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [16], "dropout": 0.3}), sparse_embeddings=True)
trainer = Trainer(
    max_epochs=3,
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    plugins=[AtomicCheckpointIO()],
    callbacks=[
        Kill(),
        EarlyStopping("val/auc", mode="max", patience=5),
        ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_train_steps=4, save_last=True),
    ],
)
trainer.fit(module, dm, ckpt_path=os.path.join(out, "ckpt", "last.ckpt") if resume else None)
torch.save(module.state_dict(), os.path.join(out, "final.pt"))
