"""Full-corpus top-K evaluation memory: 10,000 users x 100,000 items.

    python -m benchmarks.retrieval                 # 10k users, 100k items, dim 64
    python -m benchmarks.retrieval --users 1000 --items 20000

Each variant runs in its own subprocess; reported: wall time, peak RSS, and the peak RSS
growth over the process's RSS just before the evaluation starts (imports, model, inputs):

* ``module``  ``MatchModule`` validation under ``lightning.Trainer.validate`` (DSSM, random
  weights): the corpus is embedded ``eval_chunk_size`` items at a time, each batch of users is
  searched exactly by ``topk_search`` in chunks, Recall/HitRate/NDCG@10/50/100 accumulate as
  top-K ids only (never a users x items matrix).
* ``topk``    ``rechub_lightning.retrieval.topk_search`` alone on the same-sized embeddings.
* ``dense``   the unchunked way: ``user_emb @ item_emb.T`` (4 GB of float32 scores at the
  default size) followed by ``torch.topk``, for contrast.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from ._common import child_result, machine, peak_rss_mb, run_child, write_json


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024.0


def run_variant(name: str, users: int, items: int, dim: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    out: dict[str, Any] = {"variant": name, "users": users, "items": items, "dim": dim}
    if name == "module":
        import lightning as L

        from rechub_lightning import MatchModule, SparseFeature
        from rechub_lightning.data import TensorDictDataset, make_dataloader
        from rechub_lightning.models.matching import DSSM

        model = DSSM([SparseFeature("user_id", users + 1, embed_dim=dim)], [SparseFeature("item_id", items + 1, embed_dim=dim)],
                     user_params={"dims": [dim]}, item_params={"dims": [dim]})
        module = MatchModule(model, mode=2, in_batch_neg=True, topk=(10, 50, 100), eval_chunk_size=1024)
        module.set_item_corpus({"item_id": torch.arange(1, items + 1)})
        held_out = torch.randint(1, items + 1, (users,))
        users_dl = make_dataloader(TensorDictDataset({"user_id": torch.arange(1, users + 1)}, held_out), 1024, train=False)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
        out["rss_before_mb"] = current_rss_mb()
        t = time.perf_counter()
        res = trainer.validate(module, dataloaders=users_dl, verbose=False)[0]
        out["seconds"] = time.perf_counter() - t
        out["recall@100"] = float(res["val/recall@100"])
    else:
        from rechub_lightning.retrieval import topk_search

        u, v = torch.randn(users, dim), torch.randn(items, dim)
        out["rss_before_mb"] = current_rss_mb()
        t = time.perf_counter()
        if name == "topk":
            _, top = topk_search(u, v, 100, chunk_size=1024)
        elif name == "dense":
            _, top = torch.topk(u @ v.T, 100, dim=1)
        else:
            raise ValueError(name)
        out["seconds"] = time.perf_counter() - t
        out["top_shape"] = list(top.shape)
    out["peak_rss_mb"] = peak_rss_mb()
    out["growth_mb"] = out["peak_rss_mb"] - out["rss_before_mb"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=["module", "topk", "dense"])
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        name, users, items, dim = args._child
        child_result(run_variant(name, int(users), int(items), int(dim)))
        return
    score_mb = args.users * args.items * 4 / 2**20
    print(f"# machine: {machine()}; {args.users} users x {args.items} items, dim {args.dim} "
          f"(a full float32 score matrix would be {score_mb:,.0f} MB)")
    results = []
    for name in args.variants:
        r = run_child("benchmarks.retrieval", name, args.users, args.items, args.dim)
        if r is None:
            continue
        results.append(r)
        print(f"{name:<7} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  growth during evaluation "
              f"{r['growth_mb']:7.0f} MB", flush=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
