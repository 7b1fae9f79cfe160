"""``rechub report``: turn a run's logs (and predictions) into PNG plots.

* ``learning_curves.png``: training loss per epoch and every validation metric per epoch
  (one panel per metric family; per task for multi-task runs), plus ``loss_weight/*`` curves.
* ``roc.png`` and ``calibration.png``: from a predictions file with label columns
  (``rechub predict`` writes the labels next to the predictions when the data has them).
* ``recall_at_k.png``: Recall@K (and the other top-K metrics) against K at the best epoch, for
  matching runs that logged several K.

matplotlib is imported lazily (extra ``plot``).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["make_report", "find_metrics_csv", "main"]


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("rechub report needs matplotlib: pip install 'rechub-lightning[plot]'") from e
    return plt


def find_metrics_csv(path: str) -> str:
    """``path`` itself if it is a CSV, else the newest ``metrics.csv`` below it that holds training
    metrics (``train/...`` columns): a later ``validate``/``test`` run writes its own file, without
    learning curves. Without any training log, the newest ``metrics.csv``."""
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", "metrics.csv"), recursive=True), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {path!r} (train with a CSVLogger, Lightning's default)")
    for candidate in reversed(found):
        with open(candidate, encoding="utf-8") as f:
            header = f.readline().strip().split(",")
        if any(c.startswith("train/") for c in header):
            return candidate
    return found[-1]


def _epoch_table(metrics: pd.DataFrame) -> pd.DataFrame:
    if "epoch" not in metrics:
        raise ValueError("metrics.csv has no 'epoch' column")
    return metrics.groupby("epoch").last(numeric_only=True).sort_index()


def _learning_curves(metrics: pd.DataFrame, out: str) -> str:
    plt = _plt()
    per_epoch = _epoch_table(metrics)
    cols = [c for c in per_epoch.columns if c not in ("step",) and not c.endswith("_step")]
    train = [c for c in cols if c.startswith("train/")]
    val = [c for c in cols if c.startswith("val/")]
    weights = [c for c in cols if c.startswith("loss_weight/")]
    families: dict[str, list[str]] = {}
    for c in val:
        key = re.sub(r"task_\d+_", "", c.split("/", 1)[1])
        key = re.sub(r"@\d+", "@K", key)
        families.setdefault(key, []).append(c)
    panels = [("training loss", train)] + [(f"validation {k}", v) for k, v in families.items()]
    if weights:
        panels.append(("loss weights", weights))
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.8 * len(panels)), squeeze=False)
    for ax, (title, names) in zip(axes[:, 0], panels):
        for n in names:
            s = per_epoch[n].dropna()
            ax.plot(s.index, s.values, marker="o", label=n)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "learning_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _roc_and_calibration(pred: pd.DataFrame, out: str) -> list[str]:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    pairs = [(c, "label_" + c[len("pred_"):]) for c in pred.columns if c.startswith("pred_") and "label_" + c[len("pred_"):] in pred]
    if not pairs:
        return []
    fig1, ax1 = plt.subplots(figsize=(5, 5))
    fig2, ax2 = plt.subplots(figsize=(5, 5))
    for p, y in pairs:
        yt, ps = pred[y].to_numpy(), pred[p].to_numpy()
        if len(np.unique(yt)) < 2:
            continue
        fpr, tpr, _ = roc_curve(yt, ps)
        ax1.plot(fpr, tpr, label=f"{p[5:]} (AUC {roc_auc_score(yt, ps):.4f})")
        frac, mean_pred = calibration_curve(yt, ps, n_bins=10, strategy="quantile")
        ax2.plot(mean_pred, frac, marker="o", label=p[5:])
    for ax, title, xl, yl in ((ax1, "ROC", "false positive rate", "true positive rate"),
                              (ax2, "calibration", "mean predicted probability", "observed frequency")):
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    paths = [os.path.join(out, "roc.png"), os.path.join(out, "calibration.png")]
    for fig, path in zip((fig1, fig2), paths):
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return paths


def _recall_at_k(metrics: pd.DataFrame, out: str) -> str | None:
    per_epoch = _epoch_table(metrics)
    names = [c for c in per_epoch.columns if re.fullmatch(r"val/\w+@\d+", c)]
    ks = sorted({int(c.rsplit("@", 1)[1]) for c in names})
    if len(ks) < 2:
        return None
    plt = _plt()
    best = per_epoch[f"val/recall@{ks[0]}"].idxmax() if f"val/recall@{ks[0]}" in per_epoch else per_epoch.index[-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in sorted({c.split("/", 1)[1].split("@")[0] for c in names}):
        vals = [per_epoch.loc[best].get(f"val/{metric}@{k}", np.nan) for k in ks]
        ax.plot(ks, vals, marker="o", label=metric)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_title(f"top-K metrics at epoch {best}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "recall_at_k.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_report(log: str, output_dir: str, predictions: str | None = None) -> list[str]:
    """Write the PNG plots of a run; returns their paths.

    Args:
        log: a ``metrics.csv`` or a directory holding one (the newest is used).
        output_dir: where the PNG files go.
        predictions: optional predictions file with ``pred_<label>`` and ``label_<label>`` columns.
    """
    os.makedirs(output_dir, exist_ok=True)
    metrics = pd.read_csv(find_metrics_csv(log))
    paths = [_learning_curves(metrics, output_dir)]
    rk = _recall_at_k(metrics, output_dir)
    if rk:
        paths.append(rk)
    if predictions:
        pred = pd.read_parquet(predictions) if predictions.endswith(".parquet") else pd.read_csv(predictions)
        paths.extend(_roc_and_calibration(pred, output_dir))
    return paths


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="rechub report", description="Plot a run's learning curves, ROC, calibration, Recall@K.")
    p.add_argument("log", help="metrics.csv, or a run directory (e.g. runs/ctr/deepfm)")
    p.add_argument("--predictions", help="predictions file written by `rechub predict` (with label columns)")
    p.add_argument("--output_dir", default=None, help="default: <log dir>/report")
    args = p.parse_args(argv)
    out = args.output_dir or os.path.join(os.path.dirname(find_metrics_csv(args.log)), "report")
    paths = make_report(args.log, out, args.predictions)
    import logging

    logging.getLogger("rechub_lightning").info("\n".join(["Wrote:"] + [f"  {x}" for x in paths]))
    return paths
