"""Matching under 2 gloo processes (Lightning's ddp launcher) vs one process: validation
metrics, and the prediction tables (user / item embeddings, top-K) written by
``MatchPredictionWriter`` to OUT_DIR/single and OUT_DIR/ddp.

    python ddp_match.py OUT_DIR
"""

import json
import os
import sys

import lightning as L
import torch

from rechub_lightning import MatchModule
from rechub_lightning.data import MatchDataModule
from rechub_lightning.models.matching import YoutubeDNN
from rechub_lightning.prediction import MatchPredictionWriter

out = sys.argv[1]
torch.set_num_threads(1)
quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
dm = MatchDataModule(mode=2, neg_ratio=3, synthetic_users=77, synthetic_items=150, synthetic_interactions=(8, 16),
                     seq_max_len=10, batch_size=16, embed_dim=8)


def build() -> MatchModule:
    torch.manual_seed(0)  # the same weights every time
    return MatchModule(YoutubeDNN(user_params={"dims": [16, 8]}, temperature=0.1, schema=dm.schema), mode=2, topk=(5, 10))


def writer(name: str) -> MatchPredictionWriter:
    return MatchPredictionWriter(os.path.join(out, name), top_k=5)


# one process first (no process group yet; the ddp launcher re-runs this script for rank 1)
one = L.Trainer(devices=1, callbacks=[writer("single")], **quiet)
single = one.validate(build(), dm, verbose=False)[0]
one.predict(build(), dm, return_predictions=False)
ddp = L.Trainer(devices=2, strategy="ddp", callbacks=[writer("ddp")], **quiet)
res = ddp.validate(build(), dm, verbose=False)[0]
ddp.predict(build(), dm, return_predictions=False)
if ddp.is_global_zero:
    json.dump({"single": single, "ddp": res}, open(os.path.join(out, "match_ddp.json"), "w"))
