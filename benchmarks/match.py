"""Two-tower DSSM with in-batch negatives: torch-rechub 0.9.0 vs rechub-lightning, side by side.

    python -m benchmarks.match                     # ~400k training interactions
    python -m benchmarks.match --users 1000 --variants trainer module

Data: a MovieLens-shaped interaction log (``make_movielens_like``: users' tastes drive what
they watch, in time order); each user's last item is held out, the other interactions are the
training pairs (user_id, gender, age, occupation, zip | movie_id, first genre). The model is
DSSM with towers [256, 128, 64] and temperature 0.05, trained for one epoch with list-wise
in-batch negatives (``mode=2, in_batch_neg=True``; every other item of the batch is a
negative), Adam lr 1e-3, weight decay 1e-5, batch 2048. Each variant runs in its own subprocess
on identical arrays, so peak RSS is per variant:

* ``reference``  torch-rechub's ``MatchDataGenerator`` + ``MatchTrainer`` + its ``DSSM``
* ``trainer``    our ``MatchDataGenerator`` + ``MatchTrainer`` + our ``DSSM`` (defaults)
* ``module``     our ``MatchModule`` under a plain ``lightning.Trainer``

Reported: training rows/s (one epoch, first to last step), user and item embedding rows/s
through each trainer's ``inference_embedding``, Recall@10 and Recall@50 of the held-out item
over the full corpus (the same numpy scoring for every variant), peak RSS, and ratios.
Loaders use ``num_workers=0`` for every variant (the reference defaults to 8 worker processes,
whose memory ``ru_maxrss`` would not count).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from ._common import child_result, epoch_seconds, epoch_timer, machine, peak_rss_mb, run_child, write_json

USER_COLS = ["user_id", "gender", "age", "occupation", "zip"]
ITEM_COLS = ["movie_id", "genre"]
TOWER = {"dims": [256, 128, 64]}
TEMPERATURE = 0.05
EMBED_DIM = 16


def make_arrays(users: int, items: int, seed: int = 2022) -> dict[str, Any]:
    """Training pairs, the test users (one row per user) with their held-out item, the item corpus."""
    import pandas as pd

    from rechub_lightning.data import make_movielens_like

    ml = make_movielens_like(n_users=users, n_items=items, interactions_per_user=(20, 100), seed=seed)
    r = ml.ratings.copy()
    r["genre"] = r["genres"].str.split("|").str[0]
    vocab: dict[str, int] = {}
    for c in USER_COLS + ITEM_COLS:  # contiguous ids 1..n (0 is kept free, as the reference's examples do)
        codes, uniq = pd.factorize(r[c], sort=True)
        r[c] = codes + 1
        vocab[c] = len(uniq) + 1
    last = r.groupby("user_id").cumcount(ascending=False) == 0  # ratings are sorted by user then time
    train, test = r[~last], r[last]
    corpus = r.drop_duplicates("movie_id").sort_values("movie_id")
    return {
        "train": {c: train[c].to_numpy(np.int64) for c in USER_COLS + ITEM_COLS},
        "test_user": {c: test[c].to_numpy(np.int64) for c in USER_COLS},
        "test_item": test["movie_id"].to_numpy(np.int64),
        "corpus": {c: corpus[c].to_numpy(np.int64) for c in ITEM_COLS},
        "vocab": vocab,
    }


def recall_at(user_emb: np.ndarray, item_emb: np.ndarray, corpus_ids: np.ndarray, truth: np.ndarray, ks=(10, 50)) -> dict[str, float]:
    """Share of users whose held-out item is among the top-k inner products over the whole corpus."""
    import torch

    u, v = torch.as_tensor(user_emb, dtype=torch.float32), torch.as_tensor(item_emb, dtype=torch.float32)
    kmax = min(max(ks), v.shape[0])
    top = torch.cat([torch.topk(u[i:i + 4096] @ v.T, kmax, dim=1).indices for i in range(0, u.shape[0], 4096)])
    ids = torch.as_tensor(corpus_ids)[top]
    hit = ids == torch.as_tensor(truth)[:, None]
    return {f"recall@{k}": float(hit[:, :k].any(dim=1).float().mean()) for k in ks}


def run_variant(name: str, users: int, items: int, batch_size: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    d = make_arrays(users, items)
    train, vocab = d["train"], d["vocab"]
    n_train = len(train["user_id"])
    out: dict[str, Any] = {"variant": name, "train_rows": n_train, "users": len(d["test_item"]), "items": len(d["corpus"]["movie_id"])}
    labels = np.ones(n_train, dtype=np.float32)  # in-batch training ignores labels; the generators want some
    optimizer_params = {"lr": 1e-3, "weight_decay": 1e-5}

    if name == "reference":
        from torch_rechub.basic.features import SparseFeature
        from torch_rechub.models.matching import DSSM
        from torch_rechub.trainers import MatchTrainer
        from torch_rechub.utils.data import MatchDataGenerator

        uf = [SparseFeature(c, vocab[c], embed_dim=EMBED_DIM) for c in USER_COLS]
        itf = [SparseFeature(c, vocab[c], embed_dim=EMBED_DIM) for c in ITEM_COLS]
        train_dl, user_dl, item_dl = MatchDataGenerator(train, labels).generate_dataloader(
            d["test_user"], d["corpus"], batch_size=batch_size, num_workers=0)
        model = DSSM(uf, itf, user_params=TOWER, item_params=TOWER, temperature=TEMPERATURE)
        trainer = MatchTrainer(model, mode=2, in_batch_neg=True, optimizer_params=optimizer_params, n_epoch=1,
                               model_path="/tmp/bench_ref_match")
        os.makedirs("/tmp/bench_ref_match", exist_ok=True)
        t = time.perf_counter()
        trainer.train_one_epoch(train_dl, log_interval=10**9)
        out["train_s"] = time.perf_counter() - t
        out["step_ms"] = 1000 * out["train_s"] / len(train_dl)
        torch.save(model.state_dict(), "/tmp/bench_ref_match/model.pth")  # its inference_embedding reloads this
        model_path = "/tmp/bench_ref_match"
    else:
        import lightning as L

        from rechub_lightning import MatchModule, MatchTrainer, SparseFeature
        from rechub_lightning.data import MatchDataGenerator
        from rechub_lightning.models.matching import DSSM

        uf = [SparseFeature(c, vocab[c], embed_dim=EMBED_DIM) for c in USER_COLS]
        itf = [SparseFeature(c, vocab[c], embed_dim=EMBED_DIM) for c in ITEM_COLS]
        train_dl, user_dl, item_dl = MatchDataGenerator(train, labels, seed=0).generate_dataloader(
            d["test_user"], d["corpus"], batch_size=batch_size)
        model = DSSM(uf, itf, user_params=TOWER, item_params=TOWER, temperature=TEMPERATURE)

        timer = epoch_timer()
        quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)
        trainer = MatchTrainer(model, mode=2, in_batch_neg=True, optimizer_params=optimizer_params, n_epoch=1,
                               model_path="/tmp/bench_ours_match", trainer_kwargs={"callbacks": [timer], **quiet})
        if name == "trainer":
            trainer.fit(train_dl)
        elif name == "module":
            module = MatchModule(model, mode=2, in_batch_neg=True, optimizer_params=optimizer_params)
            L.Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[timer], **quiet).fit(module, train_dl)
        else:
            raise ValueError(name)
        out["train_s"], out["step_ms"] = epoch_seconds(timer.elapsed, timer.steps)
        model_path = None  # the weights are in the model already

    t = time.perf_counter()
    user_emb = trainer.inference_embedding(model, "user", user_dl, model_path)
    out["user_embed_s"] = time.perf_counter() - t
    t = time.perf_counter()
    item_emb = trainer.inference_embedding(model, "item", item_dl, model_path)
    out["item_embed_s"] = time.perf_counter() - t
    out.update(recall_at(user_emb.cpu().numpy(), item_emb.cpu().numpy(), d["corpus"]["movie_id"], d["test_item"]))
    out["train_rows_per_s"] = n_train / out["train_s"]
    out["embed_rows_per_s"] = (len(d["test_item"]) + out["items"]) / (out["user_embed_s"] + out["item_embed_s"])
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=7000, help="users (about 60 interactions each)")
    p.add_argument("--items", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--variants", nargs="+", default=["reference", "trainer", "module"])
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        name, users, items, bs = args._child
        child_result(run_variant(name, int(users), int(items), int(bs)))
        return

    print(f"# machine: {machine()}; DSSM in-batch; users: {args.users}; items: {args.items}; batch: {args.batch_size}")
    results = []
    for name in args.variants:
        r = run_child("benchmarks.match", name, args.users, args.items, args.batch_size)
        if r is None:
            continue
        results.append(r)
        print(f"{name:<10} train {r['train_rows_per_s']:>10,.0f} rows/s ({r['train_rows']} rows)  step {r['step_ms']:7.1f} ms  "
              f"embed {r['embed_rows_per_s']:>10,.0f} rows/s  R@10 {r['recall@10']:.4f}  R@50 {r['recall@50']:.4f}  "
              f"RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    ref = next((r for r in results if r["variant"] == "reference"), None)
    if ref is not None:
        print("\n# ratios against the reference")
        for r in results:
            if r is not ref:
                print(f"{r['variant']:<10} train x{r['train_rows_per_s'] / ref['train_rows_per_s']:6.1f}  "
                      f"embed x{r['embed_rows_per_s'] / ref['embed_rows_per_s']:6.1f}  RSS x{r['peak_rss_mb'] / ref['peak_rss_mb']:5.2f}  "
                      f"dR@10 {r['recall@10'] - ref['recall@10']:+.4f}  dR@50 {r['recall@50'] - ref['recall@50']:+.4f}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
