"""In-batch negatives gathered across 2 gloo ranks (Lightning's ddp launcher) vs one process.

For each configuration, one training step under DDP records every rank's batch, loss and the
(DDP-averaged) gradients of the item tower. Rank 0 then rebuilds the same initial model and, in
one process, computes the loss of each rank's rows against the concatenated global batch and the
gradient of the mean loss over all rows. Writes OUT_DIR/gather_neg.json.

    python ddp_gather_neg.py OUT_DIR
"""

import json
import os
import sys

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from rechub_lightning import MatchModule
from rechub_lightning.data import MatchDataModule
from rechub_lightning.losses import bpr_loss, sampled_softmax_loss
from rechub_lightning.models.matching import DSSM
from rechub_lightning.modules.match import in_batch_logits, score_matrix

out = sys.argv[1]
torch.set_num_threads(1)
dm = MatchDataModule(mode=2, neg_ratio=3, synthetic_users=77, synthetic_items=60, synthetic_interactions=(8, 16),
                     seq_max_len=10, batch_size=16, embed_dim=8)
CONFIGS = {
    "softmax_logq_hits": dict(mode=2, logq_correction=True, mask_accidental_hits=True),
    "bpr_hard": dict(mode=1, in_batch_neg_ratio=5, hard_negative=True, mask_accidental_hits=True),
}


def build(config: dict, gather: bool) -> MatchModule:
    torch.manual_seed(0)  # the same initial weights every time
    # no BatchNorm: its batch statistics are per rank, so the towers themselves would differ from one
    # process embedding the concatenated batch (independent of how negatives are gathered)
    tower = {"dims": [16, 8], "batch_norm": False}
    model = DSSM(user_params=tower, item_params=tower, temperature=0.1, schema=dm.schema)
    return MatchModule(model, in_batch_neg=True, item_id_feature="movie_id", gather_negatives=gather,
                       sparse_embeddings=False, **config)


def item_grads(module: MatchModule) -> dict:
    """Gradients of every parameter: the item tower (item_mlp) and the shared embedding tables, user tower too."""
    return {n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.grad is not None}


class Record(Callback):
    def __init__(self):
        self.batch, self.loss, self.grads = None, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.batch = {k: v.detach().clone() for k, v in batch[0].items()}
            self.loss = float(outputs["loss"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:  # after DDP's gradient all-reduce (mean over ranks)
            self.grads = item_grads(pl_module)


def reference(config: dict, batches: list) -> tuple:
    """Single process, concatenated batch: per-rank mean losses and the item-tower gradient of the global mean."""
    module = build(config, gather=False)
    x = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    model = module.model
    scores = score_matrix(model.user_tower(x), model.item_tower(x)).float() / module.temperature
    ids = x["movie_id"].reshape(-1)
    if config.get("logq_correction"):
        scores = scores - dm.item_log_q().float()[ids].unsqueeze(0)
    hit_ids = ids if config.get("mask_accidental_hits") else None
    if config["mode"] == 2:
        per_row = sampled_softmax_loss(scores=scores, item_ids=hit_ids, reduction="none")
    else:
        logits = in_batch_logits(scores, config["in_batch_neg_ratio"], True, None, hit_ids)
        per_row = bpr_loss(logits[:, :1], logits[:, 1:], reduction="none").mean(dim=1)
    sizes = [len(b["movie_id"]) for b in batches]
    losses = [float(part.detach().mean()) for part in per_row.split(sizes)]
    # DDP averages the per-rank mean losses' gradients: reference = mean over ranks of the rank means
    torch.stack([part.mean() for part in per_row.split(sizes)]).mean().backward()
    return losses, item_grads(module)


results = {}
for name, config in CONFIGS.items():
    for gather in (True, False):
        rec = Record()
        trainer = L.Trainer(devices=2, strategy="ddp", accelerator="cpu", max_steps=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            limit_val_batches=0, callbacks=[rec])
        module = build(config, gather)
        trainer.fit(module, dm)
        world = dist.get_world_size()
        batches, losses, grads = [None] * world, [None] * world, [None] * world
        dist.all_gather_object(batches, rec.batch)
        dist.all_gather_object(losses, rec.loss)
        dist.all_gather_object(grads, rec.grads)
        if trainer.is_global_zero:
            if gather:
                ref_losses, ref_grads = reference(config, batches)
            else:  # without gathering each rank sees its own batch only
                ref_losses = [reference(config, [b])[0][0] for b in batches]
                ref_grads = None
            entry = {
                "losses": losses,
                "ref_losses": ref_losses,
                "ranks_agree_on_grads": all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0]),
                "grad_keys": sorted(grads[0]),
            }
            if ref_grads is not None:
                entry["ref_grad_keys"] = sorted(ref_grads)
                entry["max_grad_diff"] = max(float((grads[0][k] - ref_grads[k]).abs().max()) for k in ref_grads)
                entry["max_item_mlp_grad_diff"] = max(
                    float((grads[0][k] - ref_grads[k]).abs().max()) for k in ref_grads if k.startswith("item_mlp"))
                entry["max_grad_abs"] = max(float(ref_grads[k].abs().max()) for k in ref_grads)
            results[f"{name}/{'gather' if gather else 'local'}"] = entry
if dist.get_rank() == 0:
    with open(os.path.join(out, "gather_neg.json"), "w") as f:
        json.dump(results, f, indent=1)
