"""CTR with plain Lightning: datamodule + CTRModule + lightning.Trainer.

    python examples/ctr_lightning.py            # embedded Criteo-shaped data
    EXAMPLE_ROWS=5000 EXAMPLE_EPOCHS=1 python examples/ctr_lightning.py    # a quick run
"""

import os

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from rechub_lightning import CTRModule
from rechub_lightning.data import CTRDataModule
from rechub_lightning.models.ranking import DCNv2

rows = int(os.environ.get("EXAMPLE_ROWS", 100_000))
L.seed_everything(2022)
dm = CTRDataModule(synthetic_rows=rows, batch_size=2048)
model = DCNv2(schema=dm.schema, n_cross_layers=3, mlp_params={"dims": [256, 128], "dropout": 0.2})
module = CTRModule(model, optimizer_params={"lr": 1e-3, "weight_decay": 1e-5})
trainer = L.Trainer(
    max_epochs=int(os.environ.get("EXAMPLE_EPOCHS", 5)),
    callbacks=[EarlyStopping("val/auc", mode="max", patience=2), ModelCheckpoint(monitor="val/auc", mode="max")],
    default_root_dir="runs/examples/ctr_lightning",
)
trainer.fit(module, dm)
result = trainer.test(module, dm, ckpt_path="best")[0]
print(f"test AUC {result['test/auc']:.4f}, best checkpoint {trainer.checkpoint_callback.best_model_path}")
