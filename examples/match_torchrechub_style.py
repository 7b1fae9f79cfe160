"""Torch-RecHub-style matching: YoutubeDNN trained by the reference's ``MatchTrainer`` API
(``fit`` / ``inference_embedding`` / ``evaluate``) on MovieLens-shaped interactions.

    python examples/match_torchrechub_style.py [path/to/ratings.csv]
    EXAMPLE_ROWS=5000 EXAMPLE_EPOCHS=1 python examples/match_torchrechub_style.py    # a quick run
"""

import os
import sys

import pandas as pd
import torch

from rechub_lightning import MatchTrainer
from rechub_lightning.data import MatchDataModule, make_movielens_like
from rechub_lightning.models.matching import YoutubeDNN

torch.manual_seed(2022)
if len(sys.argv) > 1:
    data = pd.read_csv(sys.argv[1])
else:
    n_users = max(int(os.environ.get("EXAMPLE_ROWS", 60_000)) // 60, 60)
    data = make_movielens_like(n_users=n_users, n_items=max(n_users, 300)).ratings

# list-wise samples (1 positive + 10 sampled negatives), leave-last-out test users, item corpus
dm = MatchDataModule(data=data, mode=2, neg_ratio=10, sample_method=0, seq_max_len=50, batch_size=256)
train_dl, val_dl, test_dl, item_dl = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.item_dataloader()

model = YoutubeDNN(user_params={"dims": [128, 16]}, temperature=0.05, schema=dm.schema)
model_path = "runs/examples/match_torchrechub_style"
os.makedirs(model_path, exist_ok=True)
trainer = MatchTrainer(model, mode=2, optimizer_params={"lr": 3e-3, "weight_decay": 0.0},
                       n_epoch=int(os.environ.get("EXAMPLE_EPOCHS", 5)), earlystop_patience=2,
                       device="cpu", model_path=model_path)
trainer.fit(train_dl, val_dl, item_dataloader=item_dl)

user_embedding = trainer.inference_embedding(model, "user", test_dl, model_path=model_path)
item_embedding = trainer.inference_embedding(model, "item", item_dl, model_path=model_path)
print(f"user embeddings {tuple(user_embedding.shape)}, item embeddings {tuple(item_embedding.shape)}")
metrics = trainer.evaluate(model, test_dl, item_loader=item_dl, topk=[10, 50])
print({k: round(v, 4) for k, v in metrics.items()})
print(f"test recall@10: {metrics['recall@10']:.4f}")
