"""A matching pipeline from interactions to top-K recommendations, with Lightning.

Raw interaction log -> MatchDataModule (leave-last-out split, encoders, in-batch training
samples) -> a DSSM two-tower model trained by ``lightning.Trainer`` -> user and item
embeddings -> exact top-K search (``rechub_lightning.retrieval``) -> recommendations with
raw ids, and Recall@10 on each user's held-out last item.

    python examples/match_pipeline.py [path/to/ratings.csv]
    EXAMPLE_ROWS=5000 EXAMPLE_EPOCHS=1 python examples/match_pipeline.py    # a quick run

The CSV needs ml-1m's columns (``user_id, movie_id, timestamp``; ``gender, age, occupation,
zip, genres`` are used when present). Without it, a MovieLens-shaped synthetic log is used.
"""

import os
import sys

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from rechub_lightning import MatchModule
from rechub_lightning.data import MatchDataModule, make_movielens_like
from rechub_lightning.models.matching import DSSM
from rechub_lightning.retrieval import topk_search

L.seed_everything(2022)

# 1. the raw interaction log: one row per (user, movie, timestamp), raw ids
if len(sys.argv) > 1:
    ratings = pd.read_csv(sys.argv[1])
else:
    rows = int(os.environ.get("EXAMPLE_ROWS", 60_000))
    n_users = max(rows // 60, 60)
    ratings = make_movielens_like(n_users=n_users, n_items=max(n_users, 300), interactions_per_user=(20, 100)).ratings
print(f"{len(ratings)} interactions, {ratings.user_id.nunique()} users, {ratings.movie_id.nunique()} movies")

# 2. datamodule: per user, the last interaction is the test target and the one before the
#    validation target; encoders are fitted on the rest. mode=0 + neg_ratio=0: positives only,
#    the negatives are the other items of the batch (in-batch softmax).
dm = MatchDataModule(data=ratings, mode=0, neg_ratio=0, seq_max_len=30, batch_size=512)

# 3. a two-tower model trained with in-batch negatives, logQ correction and accidental-hit masking
model = DSSM(user_params={"dims": [128, 64]}, item_params={"dims": [128, 64]}, temperature=0.05, schema=dm.schema)
module = MatchModule(model, mode=0, in_batch_neg=True, logq_correction=True, mask_accidental_hits=True,
                     optimizer_params={"lr": 3e-3, "weight_decay": 0.0})
trainer = L.Trainer(
    max_epochs=int(os.environ.get("EXAMPLE_EPOCHS", 5)),
    callbacks=[EarlyStopping(module.monitor, mode=module.monitor_mode, patience=2),
               ModelCheckpoint(monitor=module.monitor, mode=module.monitor_mode)],
    default_root_dir="runs/examples/match_pipeline",
    enable_progress_bar=False,
)
trainer.fit(module, dm)

# 4. embeddings with the best weights: the datamodule's predict loaders are [users (whole
#    history), item corpus]; MatchModule returns user embeddings for the first, item embeddings
#    for the second.
user_batches, item_batches = trainer.predict(module, dm, ckpt_path="best")
user_emb, item_emb = torch.cat(user_batches), torch.cat(item_batches)
corpus_ids = dm.item_corpus()[dm.item_id_feature]  # encoded item id of each corpus row
row_of = {int(i): r for r, i in enumerate(corpus_ids.tolist())}


def seen_rows(ds):
    """Corpus rows of each user's already-seen items (excluded from his recommendations)."""
    seen = ds.seen(torch.arange(len(ds))).tolist()
    return [[row_of[i] for i in items if i in row_of] for items in seen]


# 5. top-10 new items for every user, shown with raw ids
pred_ds = dm.dataset("predict")
scores, top = topk_search(user_emb, item_emb, k=10, exclude=seen_rows(pred_ds), item_ids=corpus_ids)
raw_users = dm.raw_frame("predict")[dm.user_col].to_numpy()
titles = ratings.drop_duplicates("movie_id").set_index("movie_id")["title"] if "title" in ratings else None
for u in range(min(3, len(top))):
    movies = dm.decode(dm.item_id_feature, top[u].numpy())
    shown = [f"{m} ({titles[m]})" if titles is not None else str(m) for m in movies[:5]]
    print(f"user {raw_users[u]}: " + ", ".join(shown) + ", ...")

# 6. Recall@10 on the held-out last item: embed the test users (history before that item)
test_ds = dm.dataset("test")
test_users = torch.cat(trainer.predict(module, dataloaders=dm.test_dataloader()))
_, test_top = topk_search(test_users, item_emb, k=10, exclude=seen_rows(test_ds), item_ids=corpus_ids)
held_out = test_ds.y.long()
recall = (test_top == held_out.unsqueeze(1)).any(dim=1).float().mean().item()
print(f"random ranking would give recall@10 = {10 / len(corpus_ids):.4f}")
print(f"test recall@10: {recall:.4f}")
