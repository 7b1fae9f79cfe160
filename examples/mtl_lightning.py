"""Multi-task learning with Lightning: MMOE with GradNorm on the embedded Census-shaped data.

    python examples/mtl_lightning.py
    EXAMPLE_ROWS=5000 EXAMPLE_EPOCHS=1 python examples/mtl_lightning.py    # a quick run
"""

import os

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from rechub_lightning import MTLModule
from rechub_lightning.data import MTLDataModule
from rechub_lightning.models.multi_task import MMOE

L.seed_everything(2022)
dm = MTLDataModule(synthetic_rows=int(os.environ.get("EXAMPLE_ROWS", 20_000)), batch_size=1024)
model = MMOE(schema=dm.schema, task_types=dm.task_types, n_expert=4,
             expert_params={"dims": [64]}, tower_params_list=[{"dims": [32]}] * len(dm.task_types))
module = MTLModule(model, adaptive_params={"method": "gradnorm", "alpha": 0.16})
trainer = L.Trainer(
    max_epochs=int(os.environ.get("EXAMPLE_EPOCHS", 5)),
    callbacks=[EarlyStopping(module.monitor, mode=module.monitor_mode, patience=2),
               ModelCheckpoint(monitor=module.monitor, mode=module.monitor_mode)],
    default_root_dir="runs/examples/mtl_lightning",
)
trainer.fit(module, dm)
print(trainer.test(module, dm, ckpt_path="best")[0])
