"""Offline top-K and beyond-accuracy metrics, side by side with torch-rechub 0.9.0.

    python -m benchmarks.metrics                         # 20,000 users, top-50 of 10,000 items
    python -m benchmarks.metrics --users 2000 --ks 5 10

Every user gets a ranked list of ``max(ks)`` distinct items and 1-5 held-out items; items
have 64-d embeddings and Zipf popularities. Each variant runs in its own subprocess
(reported: seconds per metric, peak RSS, and its growth over the RSS just before the
metrics run, after imports and data):

* ``reference``  torch-rechub's ``basic.metric.topk_metrics``, ``diversity_score``,
  ``coverage_score``, ``novelty_score`` on ``{user: items}`` dicts (its input format);
* ``dicts``      ours on the same dicts (the Torch-RecHub call);
* ``tensors``    ours on ``(U, K)`` id tensors, a ``(U, M)`` padded held-out tensor, the
  embedding matrix and the popularity vector (what ``MatchModule``/``topk_search`` produce).

Values are compared with the reference's (which rounds to 4 decimals; its ``Hit`` is the
hits over the relevant items, ours ``hitrate`` the share of users with a hit, so that one
is not compared).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from ._common import child_result, machine, peak_rss_mb, run_child, write_json
from .retrieval import current_rss_mb

_COMPARED = {"Recall": "recall", "NDCG": "ndcg", "MRR": "mrr", "Precision": "precision",
             "Diversity": "diversity", "Coverage": "coverage", "Novelty": "novelty"}


def make_data(users: int, items: int, k: int, dim: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, items + 1) ** 1.1
    popularity /= popularity.sum()
    # k distinct items per user, 1,000 users at a time (the data should not dominate the peak RSS)
    ranked = np.concatenate([np.argpartition(rng.random((min(1000, users - s), items)), k, axis=1)[:, :k].copy()
                             for s in range(0, users, 1000)])
    n_true = rng.integers(1, 6, users)
    held_out = [rng.choice(items, size=int(n), replace=False, p=popularity) for n in n_true]
    return {
        "ranked": ranked.astype(np.int64),
        "held_out": held_out,
        "embeddings": rng.normal(size=(items, dim)),
        "popularity": popularity,
        "items": items,
    }


def run_variant(name: str, users: int, items: int, ks: list[int], dim: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    d = make_data(users, items, max(ks), dim)
    out: dict[str, Any] = {"variant": name, "seconds": {}, "values": {}}
    if name == "reference":
        from torch_rechub.basic import metric as m

        y_pred = {u: d["ranked"][u].tolist() for u in range(users)}
        y_true = {u: d["held_out"][u].tolist() for u in range(users)}
        pop = dict(enumerate(d["popularity"].tolist()))
        calls = {
            "topk": lambda: m.topk_metrics(y_true, y_pred, ks),
            "diversity": lambda: m.diversity_score(y_pred, d["embeddings"], ks),
            "coverage": lambda: m.coverage_score(y_pred, list(range(items)), ks),
            "novelty": lambda: m.novelty_score(y_pred, pop, ks),
        }
    else:
        from rechub_lightning import metrics as m

        if name == "dicts":
            y_pred = {u: d["ranked"][u].tolist() for u in range(users)}
            y_true = {u: d["held_out"][u].tolist() for u in range(users)}
            pop = dict(enumerate(d["popularity"].tolist()))
            calls = {
                "topk": lambda: m.topk_metrics(y_true, y_pred, ks),
                "diversity": lambda: m.diversity_score(y_pred, d["embeddings"], topKs=ks),
                "coverage": lambda: m.coverage_score(y_pred, list(range(items)), topKs=ks),
                "novelty": lambda: m.novelty_score(y_pred, pop, topKs=ks),
            }
        elif name == "tensors":
            ranked = torch.as_tensor(d["ranked"])
            held = torch.full((users, 5), -1)
            for u, h in enumerate(d["held_out"]):
                held[u, : len(h)] = torch.as_tensor(h)
            emb, pop = torch.as_tensor(d["embeddings"]), torch.as_tensor(d["popularity"])
            calls = {
                "topk": lambda: m.topk_metrics(ranked, held, ks),
                "diversity": lambda: m.diversity_score(ranked, emb, ks),
                "coverage": lambda: m.coverage_score(ranked, items, ks),
                "novelty": lambda: m.novelty_score(ranked, pop, ks),
            }
        else:
            raise ValueError(name)
    out["rss_before_mb"] = current_rss_mb()
    for metric, call in calls.items():
        t = time.perf_counter()
        res = call()
        out["seconds"][metric] = time.perf_counter() - t
        if name == "reference":  # {"Recall": ["Recall@10: 0.1234", ...]}
            for key, texts in res.items():
                for text in texts:
                    label, value = text.split(": ")
                    if key in _COMPARED:
                        out["values"][f"{_COMPARED[key]}@{label.split('@')[1]}"] = float(value)
        else:
            out["values"].update(res)
    out["peak_rss_mb"] = peak_rss_mb()
    out["growth_mb"] = out["peak_rss_mb"] - out["rss_before_mb"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 50])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=["reference", "dicts", "tensors"])
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        name, users, items, ks, dim = args._child
        child_result(run_variant(name, int(users), int(items), [int(k) for k in ks.split(",")], int(dim)))
        return
    print(f"# machine: {machine()}; {args.users:,} users, top-{max(args.ks)} of {args.items:,} items, "
          f"cut-offs {args.ks}, embeddings dim {args.dim}")
    results = {}
    for name in args.variants:
        r = run_child("benchmarks.metrics", name, args.users, args.items, ",".join(map(str, args.ks)), args.dim)
        if r is not None:
            results[name] = r
    metrics = ["topk", "diversity", "coverage", "novelty"]
    print(f"{'variant':<10} " + " ".join(f"{m + ' s':>12}" for m in metrics) + f" {'total s':>9} {'peak RSS MB':>12} {'growth MB':>10}")
    for name, r in results.items():
        secs = [r["seconds"][m] for m in metrics]
        print(f"{name:<10} " + " ".join(f"{s:12.3f}" for s in secs) + f" {sum(secs):9.3f} {r['peak_rss_mb']:12.0f} {r['growth_mb']:10.0f}")
    ref = results.get("reference")
    if ref is not None:
        for name, r in results.items():
            if name == "reference":
                continue
            ratios = " ".join(f"{m} x{ref['seconds'][m] / r['seconds'][m]:.0f}" for m in metrics)
            diff = max(abs(r["values"][k] - v) for k, v in ref["values"].items())
            print(f"speed-up of {name} over reference: {ratios}; largest difference from the reference's "
                  f"(4-decimal) values: {diff:.1e} over {len(ref['values'])} values")
    write_json(args.json, list(results.values()))


if __name__ == "__main__":
    main()
