"""Predictions to files: one row per input row, in input order, also under DDP.

Prediction loaders use :class:`~rechub_lightning.data.UnrepeatedBatchSampler`, so rank ``r``
predicts a contiguous slice of the rows; :class:`PredictionWriter` gathers the slices in
rank order and rank 0 writes them once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["PredictionWriter", "gather_predictions"]


def _flatten(predictions: Any) -> list[torch.Tensor]:
    if isinstance(predictions, torch.Tensor):
        return [predictions]
    out: list[torch.Tensor] = []
    for p in predictions or []:
        out.extend(_flatten(p))
    return out


def gather_predictions(predictions: Any) -> torch.Tensor | None:
    """This rank's prediction batches concatenated, then all ranks' in rank order (on every rank)."""
    parts = _flatten(predictions)
    local = torch.cat([p.detach().cpu() for p in parts]) if parts else None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    pieces = [g for g in gathered if g is not None and len(g)]
    return torch.cat(pieces) if pieces else local


class PredictionWriter(BasePredictionWriter):
    """Writes ``Trainer.predict`` outputs to CSV or Parquet (by the file extension).

    Args:
        output: file to write (``.csv``, ``.csv.gz`` or ``.parquet``).
        columns: names of the prediction columns (one per task); default ``pred`` or
            ``pred_0..``; the CLI uses ``pred_<label>``.
        id_columns: raw columns copied next to the predictions (e.g. ``user_id``), read from
            the datamodule's ``raw_frame("predict")``.
        label_columns: label columns copied as ``label_<name>`` when the prediction data has
            them (what ``rechub report`` needs for ROC and calibration plots).

    The written frame has a ``row`` column (the input row index) first.
    """

    def __init__(
        self,
        output: str,
        columns: Sequence[str] | None = None,
        id_columns: Sequence[str] = (),
        label_columns: Sequence[str] = (),
    ) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.columns = list(columns) if columns else None
        self.id_columns = list(id_columns)
        self.label_columns = list(label_columns)
        self.frame: pd.DataFrame | None = None

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any) -> None:
        preds = gather_predictions(predictions)
        if not trainer.is_global_zero or preds is None:
            return
        arr = preds.float().numpy()
        if arr.ndim == 1:
            arr = arr[:, None]
        names = self.columns or (["pred"] if arr.shape[1] == 1 else [f"pred_{i}" for i in range(arr.shape[1])])
        if len(names) != arr.shape[1]:
            names = [f"pred_{i}" for i in range(arr.shape[1])]
        frame = pd.DataFrame({"row": np.arange(len(arr))})
        dm = trainer.datamodule
        raw = dm.raw_frame("predict") if dm is not None and hasattr(dm, "raw_frame") else None
        if self.id_columns:
            if raw is None:
                raise ValueError("id_columns need a datamodule with raw_frame('predict')")
            missing = [c for c in self.id_columns if c not in raw.columns]
            if missing:
                raise KeyError(f"id_columns {missing} not found in the prediction data (columns: {list(raw.columns)})")
            for c in self.id_columns:
                frame[c] = raw[c].to_numpy()[: len(arr)]
        for i, n in enumerate(names):
            frame[n] = arr[:, i]
        if raw is not None and len(raw) == len(arr):
            for c in self.label_columns:
                if c in raw.columns:
                    frame[f"label_{c}"] = raw[c].to_numpy()
        os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
        if self.output.endswith((".parquet", ".pq")):
            frame.to_parquet(self.output, index=False)
        else:
            frame.to_csv(self.output, index=False)
        self.frame = frame
        rank_zero_info(f"Wrote {len(frame)} predictions to {self.output}")
