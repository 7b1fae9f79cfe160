"""A Torch-RecHub CTR script; only the imports changed.

    python examples/ctr_torchrechub_style.py [path/to/criteo.csv]
    EXAMPLE_ROWS=5000 EXAMPLE_EPOCHS=1 python examples/ctr_torchrechub_style.py    # a quick run
"""

import os
import sys

import numpy as np
import pandas as pd
import torch
from sklearn.preprocessing import LabelEncoder, MinMaxScaler

from rechub_lightning import CTRTrainer, DenseFeature, SparseFeature
from rechub_lightning.data import DataGenerator, make_criteo_like
from rechub_lightning.models.ranking import DeepFM

torch.manual_seed(2022)
if len(sys.argv) > 1:
    data = pd.read_csv(sys.argv[1])
else:
    data = make_criteo_like(n_rows=int(os.environ.get("EXAMPLE_ROWS", 50_000)), hex_ids=True)
dense_features = [f for f in data.columns if f.startswith("I")]
sparse_features = [f for f in data.columns if f.startswith("C")]
data[sparse_features] = data[sparse_features].fillna("-996")
data[dense_features] = data[dense_features].fillna(0)
for feat in dense_features:
    data[feat] = np.log1p(data[feat].clip(lower=0))
data[dense_features] = MinMaxScaler().fit_transform(data[dense_features])
for feat in sparse_features:
    data[feat] = LabelEncoder().fit_transform(data[feat].astype(str))

dense_feas = [DenseFeature(f) for f in dense_features]
sparse_feas = [SparseFeature(f, vocab_size=data[f].nunique(), embed_dim=16) for f in sparse_features]
y = data.pop("label")
dg = DataGenerator(data, y)
train_dl, val_dl, test_dl = dg.generate_dataloader(split_ratio=[0.7, 0.1], batch_size=2048)

model = DeepFM(deep_features=dense_feas + sparse_feas, fm_features=sparse_feas,
               mlp_params={"dims": [256, 128], "dropout": 0.2, "activation": "relu"})
os.makedirs("runs/examples/ctr_torchrechub_style", exist_ok=True)
trainer = CTRTrainer(model, optimizer_params={"lr": 1e-3, "weight_decay": 1e-5},
                     n_epoch=int(os.environ.get("EXAMPLE_EPOCHS", 5)), earlystop_patience=2,
                     device="cpu", model_path="runs/examples/ctr_torchrechub_style")
trainer.fit(train_dl, val_dl)
auc = trainer.evaluate(trainer.model, test_dl)
print(f"test auc: {auc:.4f}")
