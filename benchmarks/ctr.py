"""DeepFM on Criteo-shaped data: torch-rechub 0.9.0 vs rechub-lightning, side by side.

    python -m benchmarks.ctr                      # 500k rows, largest vocab 1e5 and 1e6
    python -m benchmarks.ctr --rows 50000 --vocabs 10000      # a quick look

Every variant runs in its own subprocess on identical arrays (same generator, same seed, same
split), so peak RSS is per variant. Variants:

* ``reference``      torch-rechub's ``DataGenerator`` + ``CTRTrainer`` + its ``DeepFM``
* ``trainer``        our ``DataGenerator`` + ``CTRTrainer`` + our ``DeepFM`` (sparse embeddings)
* ``trainer_dense``  the same with dense Adam + weight decay (the reference's semantics)
* ``module``         our ``CTRModule`` under a plain ``lightning.Trainer``
* ``bare``           a bare PyTorch loop over our model, optimizer and batches

Reported: training rows/s (one epoch, timed from the first to the last step), test AUC after
one epoch, evaluate/predict rows/s, peak RSS, and ratios against the reference. With
``--early-stopping N`` the reference and our trainer also train up to N epochs with patience 2
and report the best-checkpoint test AUC.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from ._common import child_result, epoch_seconds, epoch_timer, machine, peak_rss_mb, run_child, split, write_json

MLP = {"dims": [256, 128], "dropout": 0.2, "activation": "relu"}
EMBED_DIM = 16


def make_arrays(rows: int, max_vocab: int, seed: int = 2022) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int]]:
    from rechub_lightning.data import make_criteo_like

    df = make_criteo_like(n_rows=rows, max_vocab=max_vocab, missing_rate=0.0, seed=seed)
    x: dict[str, np.ndarray] = {}
    vocab: dict[str, int] = {}
    for c in df.columns:
        if c.startswith("I"):
            v = np.log1p(df[c].to_numpy(dtype=np.float64))
            x[c] = ((v - v.mean()) / (v.std() + 1e-9)).astype(np.float32)
        elif c.startswith("C"):
            x[c] = df[c].to_numpy(dtype=np.int64)
            vocab[c] = int(df[c].max()) + 1
    return x, df["label"].to_numpy(dtype=np.float32), vocab


def _take(x: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in x.items()}


# ----------------------------------------------------------------------------- variants
def run_variant(name: str, rows: int, max_vocab: int, batch_size: int, es_epochs: int, device: str = "cpu") -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    x, y, vocab = make_arrays(rows, max_vocab)
    tr, va, te = split(len(y))
    xt, yt, xv, yv, xs, ys = _take(x, tr), y[tr], _take(x, va), y[va], _take(x, te), y[te]
    del x
    out: dict[str, Any] = {"variant": name, "train_rows": len(tr), "max_vocab": max_vocab}
    dense_cols = [c for c in xt if c.startswith("I")]
    sparse_cols = [c for c in xt if c.startswith("C")]

    if name == "reference":
        import pandas as pd
        from torch_rechub.basic.features import DenseFeature, SparseFeature
        from torch_rechub.models.ranking import DeepFM
        from torch_rechub.trainers import CTRTrainer
        from torch_rechub.utils.data import DataGenerator

        d = [DenseFeature(c) for c in dense_cols]
        s = [SparseFeature(c, vocab[c], embed_dim=EMBED_DIM) for c in sparse_cols]
        dg = DataGenerator(pd.DataFrame(xt), pd.Series(yt))
        train_dl, val_dl, test_dl = dg.generate_dataloader(pd.DataFrame(xv), pd.Series(yv), pd.DataFrame(xs), pd.Series(ys), batch_size=batch_size)
        model = DeepFM(d + s, s, MLP)
        trainer = CTRTrainer(model, n_epoch=1, earlystop_patience=2, model_path="/tmp/bench_ref", device=device)
        os.makedirs("/tmp/bench_ref", exist_ok=True)
        t = time.perf_counter()
        trainer.train_one_epoch(train_dl, log_interval=10**9)
        out["train_s"] = time.perf_counter() - t
        t = time.perf_counter()
        out["test_auc_1ep"] = float(trainer.evaluate(model, test_dl))
        out["eval_s"] = time.perf_counter() - t
        t = time.perf_counter()
        trainer.predict(model, test_dl)
        out["predict_s"] = time.perf_counter() - t
        if es_epochs:
            torch.manual_seed(0)
            model = DeepFM(d + s, s, MLP)
            trainer = CTRTrainer(model, n_epoch=es_epochs, earlystop_patience=2, model_path="/tmp/bench_ref", device=device)
            trainer.fit(train_dl, val_dl)
            out["test_auc_es"] = float(trainer.evaluate(model, test_dl))
        out["step_ms"] = 1000 * out["train_s"] / len(train_dl)
    else:
        import lightning as L

        from rechub_lightning import CTRModule, CTRTrainer, DenseFeature, SparseFeature
        from rechub_lightning.data import DataGenerator
        from rechub_lightning.models.ranking import DeepFM

        sparse = name != "trainer_dense"
        d = [DenseFeature(c) for c in dense_cols]
        s = [SparseFeature(c, vocab[c], embed_dim=EMBED_DIM) for c in sparse_cols]
        train_dl, val_dl, test_dl = DataGenerator(xt, yt, seed=0).generate_dataloader(xv, yv, xs, ys, batch_size=batch_size)
        model = DeepFM(d + s, s, MLP)

        timer = epoch_timer()
        quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)
        accel = "gpu" if device.startswith("cuda") else "cpu"
        if name in ("trainer", "trainer_dense"):
            trainer = CTRTrainer(model, n_epoch=1, model_path="/tmp/bench_ours", sparse_embeddings=sparse, device=device,
                                 trainer_kwargs={"callbacks": [timer], **quiet})
            trainer.fit(train_dl)
            evaluate, predict = trainer.evaluate, trainer.predict
        elif name == "module":
            module = CTRModule(model, sparse_embeddings=True)
            L.Trainer(max_epochs=1, accelerator=accel, devices=1, callbacks=[timer], **quiet).fit(module, train_dl)
            helper = CTRTrainer(model, model_path="/tmp/bench_ours", device=device)
            evaluate, predict = helper.evaluate, helper.predict
        elif name == "bare":
            module = CTRModule(model, sparse_embeddings=True).to(device)
            opt = module.configure_optimizers()
            model.train()
            n = 0
            for i, (xb, yb) in enumerate(train_dl):
                if i == 0:
                    t0 = time.perf_counter()
                xb = {k: v.to(device, non_blocking=True) for k, v in xb.items()}
                yb = yb.to(device, non_blocking=True)
                logits = model(xb)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n += 1
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            timer.elapsed, timer.steps = time.perf_counter() - t0, n
            helper = CTRTrainer(model, model_path="/tmp/bench_ours", device=device)
            evaluate, predict = helper.evaluate, helper.predict
        else:
            raise ValueError(name)
        # the clock starts at the first step; scale to the whole epoch
        out["train_s"], out["step_ms"] = epoch_seconds(timer.elapsed, timer.steps)
        t = time.perf_counter()
        out["test_auc_1ep"] = float(evaluate(model, test_dl))
        out["eval_s"] = time.perf_counter() - t
        t = time.perf_counter()
        predict(model, test_dl)
        out["predict_s"] = time.perf_counter() - t
        if es_epochs and name == "trainer":
            torch.manual_seed(0)
            model = DeepFM(d + s, s, MLP)
            trainer = CTRTrainer(model, n_epoch=es_epochs, earlystop_patience=2, model_path="/tmp/bench_ours_es",
                                 sparse_embeddings=True, device=device, trainer_kwargs={k: v for k, v in quiet.items() if k != "enable_checkpointing"})
            trainer.fit(train_dl, val_dl)
            out["test_auc_es"] = float(trainer.evaluate(model, test_dl))
    out["train_rows_per_s"] = len(tr) / out["train_s"]
    out["eval_rows_per_s"] = len(te) / out["eval_s"]
    out["predict_rows_per_s"] = len(te) / out["predict_s"]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ----------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=500_000, help="total rows (80%% train)")
    p.add_argument("--vocabs", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--variants", nargs="+", default=["reference", "trainer", "trainer_dense", "module", "bare"])
    p.add_argument("--early-stopping", type=int, default=0, help="max epochs of an early-stopping run (0: skip)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:0 (the same device for every variant)")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--_child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        name, rows, vocab, bs, es, device = args._child
        child_result(run_variant(name, int(rows), int(vocab), int(bs), int(es), device))
        return

    print(f"# machine: {machine()}; device: {args.device}; rows: {args.rows}; batch: {args.batch_size}")
    results = []
    for vocab in args.vocabs:
        for name in args.variants:
            es = args.early_stopping if vocab == args.vocabs[0] else 0
            r = run_child("benchmarks.ctr", name, args.rows, vocab, args.batch_size, es, args.device)
            if r is None:
                continue
            results.append(r)
            print(f"{vocab:>9} {name:<14} train {r['train_rows_per_s']:>10,.0f} rows/s  step {r['step_ms']:7.1f} ms  "
                  f"AUC(1ep) {r['test_auc_1ep']:.4f}  eval {r['eval_rows_per_s']:>10,.0f} rows/s  "
                  f"predict {r['predict_rows_per_s']:>10,.0f} rows/s  RSS {r['peak_rss_mb']:7.0f} MB"
                  + (f"  AUC(es) {r['test_auc_es']:.4f}" if "test_auc_es" in r else ""), flush=True)
    print("\n# ratios against the reference (same vocabulary)")
    for vocab in args.vocabs:
        ref = next((r for r in results if r["variant"] == "reference" and r["max_vocab"] == vocab), None)
        for r in results:
            if r["max_vocab"] != vocab or r["variant"] == "reference" or ref is None:
                continue
            print(f"{vocab:>9} {r['variant']:<14} train x{r['train_rows_per_s'] / ref['train_rows_per_s']:6.1f}  "
                  f"eval x{r['eval_rows_per_s'] / ref['eval_rows_per_s']:6.1f}  predict x{r['predict_rows_per_s'] / ref['predict_rows_per_s']:6.1f}  "
                  f"RSS x{r['peak_rss_mb'] / ref['peak_rss_mb']:5.2f}  dAUC(1ep) {r['test_auc_1ep'] - ref['test_auc_1ep']:+.4f}")
    ours = {r["max_vocab"]: r for r in results if r["variant"] == "trainer"}
    if len(ours) >= 2:
        lo, hi = min(ours), max(ours)
        print(f"\n# our step time at vocab {hi} / at {lo}: {ours[hi]['step_ms'] / ours[lo]['step_ms']:.2f}")
    for vocab in args.vocabs:
        bare = next((r for r in results if r["variant"] == "bare" and r["max_vocab"] == vocab), None)
        mod = next((r for r in results if r["variant"] == "module" and r["max_vocab"] == vocab), None)
        if bare and mod:
            print(f"# Lightning overhead at vocab {vocab}: CTRModule step / bare step = {mod['step_ms'] / bare['step_ms']:.3f}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
