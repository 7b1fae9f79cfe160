"""Early stopping on the CTR benchmark's data, over seeds: torch-rechub 0.9.0 vs rechub-lightning.

    python -m benchmarks.ctr_early_stopping                      # seeds 0 1 2, both frameworks
    python -m benchmarks.ctr_early_stopping --variants sparse dense --seeds 0
    python -m benchmarks.ctr_early_stopping --variants sparse --embedding-lr 3e-3

The data, model and hyperparameters are those of ``benchmarks.ctr`` at the 1e5 vocabulary
(400k training rows, DeepFM, Adam lr 1e-3, weight decay 1e-5, batch 2048). Each (variant,
seed) runs in its own subprocess:

* ``reference``: torch-rechub's ``CTRTrainer``, one ``train_one_epoch`` per epoch, validation
  and test AUC after every epoch; its early stopping (patience 2) would keep the epoch with
  the best validation AUC, whose test AUC is reported.
* ``sparse`` / ``dense``: our ``CTRTrainer(n_epoch=3, earlystop_patience=2)`` with sparse
  (default on CPU) or dense embedding gradients; the test AUC of the restored best weights.

One run's early-stopping AUC differs from another seed's by more than the frameworks differ;
this script measures that spread (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from ._common import child_result, machine, run_child, split, write_json
from .ctr import EMBED_DIM, MLP, _take, make_arrays

ROWS, VOCAB, EPOCHS, PATIENCE = 500_000, 100_000, 3, 2


def run_variant(name: str, seed: int, batch_size: int, embedding_lr: float) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 1)))
    x, y, vocab = make_arrays(ROWS, VOCAB)
    tr, va, te = split(len(y))
    xt, yt, xv, yv, xs, ys = _take(x, tr), y[tr], _take(x, va), y[va], _take(x, te), y[te]
    dense_cols = [c for c in xt if c.startswith("I")]
    sparse_cols = [c for c in xt if c.startswith("C")]
    out: dict[str, Any] = {"variant": name, "seed": seed}
    t0 = time.perf_counter()
    if name == "reference":
        import pandas as pd
        from torch_rechub.basic.features import DenseFeature, SparseFeature
        from torch_rechub.models.ranking import DeepFM
        from torch_rechub.trainers import CTRTrainer
        from torch_rechub.utils.data import DataGenerator

        d = [DenseFeature(c) for c in dense_cols]
        s = [SparseFeature(c, vocab[c], embed_dim=EMBED_DIM) for c in sparse_cols]
        torch.manual_seed(seed)
        train_dl, val_dl, test_dl = DataGenerator(pd.DataFrame(xt), pd.Series(yt)).generate_dataloader(
            pd.DataFrame(xv), pd.Series(yv), pd.DataFrame(xs), pd.Series(ys), batch_size=batch_size
        )
        model = DeepFM(d + s, s, MLP)
        trainer = CTRTrainer(model, n_epoch=1, model_path=f"/tmp/bench_es_ref{seed}")
        os.makedirs(f"/tmp/bench_es_ref{seed}", exist_ok=True)
        val, test = [], []
        for _ in range(EPOCHS):
            trainer.train_one_epoch(train_dl, log_interval=10**9)
            val.append(float(trainer.evaluate(model, val_dl)))
            test.append(float(trainer.evaluate(model, test_dl)))
        out.update(val_auc=val, test_auc=test, test_auc_es=test[int(np.argmax(val))])
    else:
        from rechub_lightning import CTRTrainer, DenseFeature, SparseFeature
        from rechub_lightning.data import DataGenerator
        from rechub_lightning.models.ranking import DeepFM

        d = [DenseFeature(c) for c in dense_cols]
        s = [SparseFeature(c, vocab[c], embed_dim=EMBED_DIM) for c in sparse_cols]
        train_dl, val_dl, test_dl = DataGenerator(xt, yt, seed=seed).generate_dataloader(xv, yv, xs, ys, batch_size=batch_size)
        torch.manual_seed(seed)
        model = DeepFM(d + s, s, MLP)
        extra = {"embedding_optimizer_params": {"lr": embedding_lr}} if embedding_lr > 0 else {}
        trainer = CTRTrainer(
            model, n_epoch=EPOCHS, earlystop_patience=PATIENCE, model_path=f"/tmp/bench_es_ours{seed}",
            sparse_embeddings=name == "sparse", trainer_kwargs={"enable_progress_bar": False, "enable_model_summary": False, "logger": False},
            **extra,
        )
        trainer.fit(train_dl, val_dl)
        out.update(test_auc_es=float(trainer.evaluate(model, test_dl)))
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["reference", "sparse", "dense"], choices=["reference", "sparse", "dense"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--embedding-lr", type=float, default=0.0, help="ours, sparse: the tables' lr (0: the default, the dense lr)")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        name, seed, bs, elr = args._child
        child_result(run_variant(name, int(seed), int(bs), float(elr)))
        return

    print(f"# machine: {machine()}; {ROWS} rows, largest vocab {VOCAB}, up to {EPOCHS} epochs, patience {PATIENCE}")
    results = []
    for name in args.variants:
        for seed in args.seeds:
            r = run_child("benchmarks.ctr_early_stopping", name, seed, args.batch_size, args.embedding_lr)
            if r is None:
                continue
            results.append(r)
            curve = ""
            if "val_auc" in r:
                curve = "  val " + " ".join(f"{v:.4f}" for v in r["val_auc"]) + "  test " + " ".join(f"{v:.4f}" for v in r["test_auc"])
            print(f"{name:<10} seed {seed}  test AUC (early stopping) {r['test_auc_es']:.4f}{curve}  ({r['seconds']:.0f} s)", flush=True)
    for name in args.variants:
        vals = [r["test_auc_es"] for r in results if r["variant"] == name]
        if vals:
            print(f"# {name:<10} mean {sum(vals) / len(vals):.4f}  min {min(vals):.4f}  max {max(vals):.4f}  (n={len(vals)})")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
