"""MMOE on Census-shaped data: torch-rechub 0.9.0 vs rechub-lightning, side by side.

    python -m benchmarks.mtl                       # 500k rows (400k training), two tasks
    python -m benchmarks.mtl --rows 50000 --variants trainer module

The model is the reference's Census example (every column an embedding of width 4 or a dense
value, 8 experts of [16], towers of [8], two classification tasks: income and marital status),
trained for one epoch with Adam (lr 1e-3, weight decay 1e-5) and equal task weights. Each
variant runs in its own subprocess on identical arrays, so peak RSS is per variant:

* ``reference``  torch-rechub's ``DataGenerator`` + ``MTLTrainer`` + its ``MMOE``
* ``trainer``    our ``DataGenerator`` + ``MTLTrainer`` + our ``MMOE`` (defaults)
* ``module``     our ``MTLModule`` under a plain ``lightning.Trainer``

Reported: training rows/s (one epoch, first to last step), test AUC per task after the
epoch, evaluate/predict rows/s over the test rows, peak RSS, and ratios against the reference.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from ._common import child_result, epoch_seconds, epoch_timer, machine, peak_rss_mb, run_child, split, write_json

TASKS = ["income", "marital status"]
EXPERT = {"dims": [16]}
TOWER = {"dims": [8]}


def make_arrays(rows: int, seed: int = 2022) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int]]:
    from rechub_lightning.data import make_census_like

    df = make_census_like(n_rows=rows, seed=seed)
    y = np.stack([df["income"].to_numpy(np.float32), (df["marital status"].to_numpy() == 1).astype(np.float32)], axis=1)
    x: dict[str, np.ndarray] = {}
    vocab: dict[str, int] = {}
    for c in df.columns:
        if c in TASKS:
            continue
        if df[c].dtype.kind == "f":
            x[c] = df[c].to_numpy(np.float32)
        else:
            x[c] = df[c].to_numpy(np.int64)
            vocab[c] = int(x[c].max()) + 1
    return x, y, vocab


def run_variant(name: str, rows: int, batch_size: int) -> dict[str, Any]:
    import torch
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    x, y, vocab = make_arrays(rows)
    tr, va, te = split(len(y))
    xt, xv, xs = ({k: v[idx] for k, v in x.items()} for idx in (tr, va, te))
    yt, yv, ys = y[tr], y[va], y[te]
    del x
    out: dict[str, Any] = {"variant": name, "train_rows": len(tr)}
    dense_cols = [c for c in xt if c not in vocab]
    sparse_cols = [c for c in xt if c in vocab]
    optimizer_params = {"lr": 1e-3, "weight_decay": 1e-5}

    if name == "reference":
        from torch_rechub.basic.features import DenseFeature, SparseFeature
        from torch_rechub.models.multi_task import MMOE
        from torch_rechub.trainers import MTLTrainer
        from torch_rechub.utils.data import DataGenerator

        feats = [SparseFeature(c, vocab[c], embed_dim=4) for c in sparse_cols] + [DenseFeature(c) for c in dense_cols]
        # dicts of numpy arrays, as its Census example builds them
        train_dl, val_dl, test_dl = DataGenerator(xt, yt).generate_dataloader(xv, yv, xs, ys, batch_size=batch_size)
        model = MMOE(feats, ["classification"] * 2, 8, expert_params=EXPERT, tower_params_list=[TOWER, TOWER])
        os.makedirs("/tmp/bench_ref_mtl", exist_ok=True)
        trainer = MTLTrainer(model, ["classification"] * 2, optimizer_params=optimizer_params, n_epoch=1,
                             model_path="/tmp/bench_ref_mtl")
        t = time.perf_counter()
        trainer.train_one_epoch(train_dl)
        out["train_s"] = time.perf_counter() - t
        out["step_ms"] = 1000 * out["train_s"] / len(train_dl)
        # its predict iterates feature dicts only (no labels): the reference's PredictDataset
        from torch.utils.data import DataLoader
        from torch_rechub.utils.data import PredictDataset

        predict_dl = DataLoader(PredictDataset(xs), batch_size=batch_size, shuffle=False)
        evaluate, predict = trainer.evaluate, trainer.predict
    else:
        import lightning as L

        from rechub_lightning import DenseFeature, MTLModule, MTLTrainer, SparseFeature
        from rechub_lightning.data import DataGenerator
        from rechub_lightning.models.multi_task import MMOE

        feats = [SparseFeature(c, vocab[c], embed_dim=4) for c in sparse_cols] + [DenseFeature(c) for c in dense_cols]
        train_dl, val_dl, test_dl = DataGenerator(xt, yt, seed=0).generate_dataloader(xv, yv, xs, ys, batch_size=batch_size)
        model = MMOE(feats, ["classification"] * 2, 8, expert_params=EXPERT, tower_params_list=[TOWER, TOWER])

        timer = epoch_timer()
        quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)
        facade = MTLTrainer(model, ["classification"] * 2, optimizer_params=optimizer_params, n_epoch=1,
                            model_path="/tmp/bench_ours_mtl", trainer_kwargs={"callbacks": [timer], **quiet})
        if name == "trainer":
            facade.fit(train_dl)
        elif name == "module":
            module = MTLModule(model, task_types=["classification"] * 2, optimizer_params=optimizer_params)
            L.Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[timer], **quiet).fit(module, train_dl)
        else:
            raise ValueError(name)
        out["train_s"], out["step_ms"] = epoch_seconds(timer.elapsed, timer.steps)
        evaluate, predict = facade.evaluate, facade.predict
        predict_dl = test_dl

    t = time.perf_counter()
    scores = evaluate(model, test_dl)
    out["eval_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pred = np.asarray(predict(model, predict_dl), dtype=np.float64)
    out["predict_s"] = time.perf_counter() - t
    out["test_auc_1ep"] = [float(s) for s in scores]
    # the same AUC from the predictions, by sklearn: both paths must agree with their evaluate
    out["test_auc_from_predict"] = [float(roc_auc_score(ys[:, i], pred[:, i])) for i in range(2)]
    out["train_rows_per_s"] = len(tr) / out["train_s"]
    out["eval_rows_per_s"] = len(te) / out["eval_s"]
    out["predict_rows_per_s"] = len(te) / out["predict_s"]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=500_000, help="total rows (80%% train)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--variants", nargs="+", default=["reference", "trainer", "module"])
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        name, rows, bs = args._child
        child_result(run_variant(name, int(rows), int(bs)))
        return

    print(f"# machine: {machine()}; MMOE; rows: {args.rows}; batch: {args.batch_size}")
    results = []
    for name in args.variants:
        r = run_child("benchmarks.mtl", name, args.rows, args.batch_size)
        if r is None:
            continue
        results.append(r)
        aucs = "/".join(f"{a:.4f}" for a in r["test_auc_1ep"])
        print(f"{name:<10} train {r['train_rows_per_s']:>10,.0f} rows/s  step {r['step_ms']:7.1f} ms  AUC(1ep) {aucs}  "
              f"eval {r['eval_rows_per_s']:>10,.0f} rows/s  predict {r['predict_rows_per_s']:>10,.0f} rows/s  "
              f"RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    ref = next((r for r in results if r["variant"] == "reference"), None)
    if ref is not None:
        print("\n# ratios against the reference")
        for r in results:
            if r is ref:
                continue
            d = "/".join(f"{a - b:+.4f}" for a, b in zip(r["test_auc_1ep"], ref["test_auc_1ep"]))
            print(f"{r['variant']:<10} train x{r['train_rows_per_s'] / ref['train_rows_per_s']:6.1f}  "
                  f"eval x{r['eval_rows_per_s'] / ref['eval_rows_per_s']:6.1f}  predict x{r['predict_rows_per_s'] / ref['predict_rows_per_s']:6.1f}  "
                  f"RSS x{r['peak_rss_mb'] / ref['peak_rss_mb']:5.2f}  dAUC(1ep) {d}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
