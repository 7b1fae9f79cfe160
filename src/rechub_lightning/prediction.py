"""Predictions to files: one row per input row, in input order, also under DDP.

Prediction loaders use :class:`~rechub_lightning.data.UnrepeatedBatchSampler`, so rank ``r``
predicts a contiguous slice of the rows; :class:`PredictionWriter` gathers the slices in
rank order and rank 0 writes them once. :class:`MatchPredictionWriter` does the same for
matching models and writes user embeddings, item embeddings and each user's top-K items.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["PredictionWriter", "MatchPredictionWriter", "gather_predictions", "match_output_paths", "write_frame"]

# Lightning records batch indices only for a plain DataLoader and warns for every other loader;
# ours need none (each rank predicts a contiguous slice, in order).
warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices fetched from your dataloader: `BatchDataLoader`")


def _flatten(predictions: Any) -> list[torch.Tensor]:
    if isinstance(predictions, torch.Tensor):
        return [predictions]
    out: list[torch.Tensor] = []
    for p in predictions or []:
        out.extend(_flatten(p))
    return out


def _row_keys(batch_indices: Any, n: int) -> torch.Tensor | None:
    """Sort keys ``(dataloader, dataset row)`` of this rank's ``n`` predictions, from Lightning's
    ``batch_indices`` (one list per dataloader, of one list of row indices per batch).

    Lightning records them for a plain ``DataLoader`` (its batch sampler is wrapped); under DDP
    such a loader is re-sampled so that rank ``r`` reads rows ``r, r + world, ...``. Our loaders
    give none (``[]``): they already hand each rank a contiguous slice in order.
    """
    if not isinstance(batch_indices, (list, tuple)):
        return None
    keys: list[torch.Tensor] = []
    for loader, batches in enumerate(batch_indices):
        for batch in batches or ():
            if not isinstance(batch, (list, tuple)):
                return None
            keys.append(torch.as_tensor(batch, dtype=torch.long) + (loader << 40))
    out = torch.cat(keys) if keys else None
    return out if out is not None and len(out) == n else None


def gather_predictions(predictions: Any, batch_indices: Any = None) -> torch.Tensor | None:
    """This rank's prediction batches concatenated, then all ranks' in row order (on every rank).

    Without ``batch_indices`` (or with our loaders, which record none) the ranks' slices are
    joined in rank order. With the indices Lightning records for a plain ``DataLoader`` (one list
    per dataloader), the rows are put back in dataset order, dataloader after dataloader,
    whichever rank predicted them.
    """
    parts = _flatten(predictions)
    local = torch.cat([p.detach().cpu() for p in parts]) if parts else None
    rows = _row_keys(batch_indices, len(local)) if local is not None and batch_indices is not None else None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local if rows is None else local[torch.argsort(rows, stable=True)]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (local, rows))
    pieces = [(g, r) for g, r in gathered if g is not None and len(g)]
    if not pieces:
        return local
    out = torch.cat([g for g, _ in pieces])
    if all(r is not None for _, r in pieces):
        out = out[torch.argsort(torch.cat([r for _, r in pieces]), stable=True)]
    return out


_TABLE_EXTENSIONS = (".csv.gz", ".csv", ".parquet", ".pq")


def write_frame(frame: pd.DataFrame, path: str) -> None:
    """Write ``frame`` to ``path``: Parquet for ``.parquet``/``.pq``, else CSV (``.csv.gz`` compressed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith((".parquet", ".pq")):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


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
        preds = gather_predictions(predictions, batch_indices)
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
        write_frame(frame, self.output)
        self.frame = frame
        rank_zero_info(f"Wrote {len(frame)} predictions to {self.output}")


#: The three tables :class:`MatchPredictionWriter` writes.
MATCH_OUTPUTS = ("user_embeddings", "item_embeddings", "topk")


def match_output_paths(output: str) -> dict[str, str]:
    """Where the matching outputs go, by the naming convention of ``--predict_output``.

    * a table file (``.csv``, ``.csv.gz``, ``.parquet``, ``.pq``) is a **prefix**:
      ``out/preds.parquet`` -> ``out/preds_user_embeddings.parquet``,
      ``out/preds_item_embeddings.parquet``, ``out/preds_topk.parquet``;
    * anything else is a **directory**: ``out/`` -> ``out/user_embeddings.csv``,
      ``out/item_embeddings.csv``, ``out/topk.csv``.

    Returns:
        ``{"user_embeddings": path, "item_embeddings": path, "topk": path}``.
    """
    if not output:
        raise ValueError(f"predict output must be a file prefix or a directory, got {output!r}")
    for ext in _TABLE_EXTENSIONS:
        if output.endswith(ext) and len(output) > len(ext):
            stem = output[: -len(ext)]
            return {name: f"{stem}_{name}{ext}" for name in MATCH_OUTPUTS}
    return {name: os.path.join(output, f"{name}.csv") for name in MATCH_OUTPUTS}


def _embedding_columns(emb: np.ndarray) -> dict[str, np.ndarray]:
    """``emb_<d>`` columns of ``(N, D)`` embeddings; ``emb_<i>_<d>`` (interest ``i``) of ``(N, I, D)``."""
    if emb.ndim == 2:
        return {f"emb_{d}": emb[:, d] for d in range(emb.shape[1])}
    if emb.ndim == 3:
        return {f"emb_{i}_{d}": emb[:, i, d] for i in range(emb.shape[1]) for d in range(emb.shape[2])}
    raise ValueError(f"embeddings must be (N, D) or (N, interests, D), got shape {emb.shape}")


class MatchPredictionWriter(BasePredictionWriter):
    """Writes a matching model's predictions: user embeddings, item embeddings, top-K items per user.

    Expects :class:`~rechub_lightning.modules.match.MatchModule`'s predict contract: dataloader
    0 yields user embeddings ``(B, D)`` (or ``(B, I, D)`` for multi-interest models), dataloader
    1 item embeddings ``(B, D)`` of the item corpus (what
    :meth:`~rechub_lightning.data.MatchDataModule.predict_dataloader` gives). Batches are kept
    as they come (so ``return_predictions=False`` is fine), gathered across ranks in rank order
    (every user and item once, in input order) and written by rank 0. File names follow
    :func:`match_output_paths`; CSV or Parquet by the extension.

    Tables (ids are **raw** ids when the datamodule can map them back, as
    :class:`~rechub_lightning.data.MatchDataModule` does with ``decode``; else the encoded ids):

    * ``user_embeddings``: ``row``, the user id column (the datamodule's ``user_col``, else
      ``user_id``), ``id_columns``, then ``emb_0..emb_{D-1}`` (``emb_<i>_<d>`` per interest);
    * ``item_embeddings``: ``row``, the item id column (``item_id_feature``), ``emb_*``;
    * ``topk``: ``row`` (the user's row), user id, ``rank`` (1 = best), item id, ``score``
      (inner product; multi-interest users: the best interest), ``top_k`` rows per user,
      fewer when exclusion leaves fewer items.

    The items a user has already interacted with (the predict batches' seen items) are
    excluded from his top-K when the module's ``exclude_seen`` is true (the validation
    metrics' convention), unless ``exclude_seen`` is given here.

    Args:
        output: file prefix or directory (see :func:`match_output_paths`).
        top_k: items per user in the ``topk`` table.
        id_columns: raw user columns (from the datamodule's ``raw_frame("predict")``) copied into
            the user and top-K tables.
        exclude_seen: override the module's ``exclude_seen``.
        chunk_size: users scored at once by :func:`~rechub_lightning.retrieval.topk_search`.

    Raises:
        ValueError: ``top_k < 1``; predictions that are not ``[users, items]``.
    """

    def __init__(
        self,
        output: str,
        top_k: int = 10,
        id_columns: Sequence[str] = (),
        exclude_seen: bool | None = None,
        chunk_size: int = 1024,
    ) -> None:
        super().__init__(write_interval="batch_and_epoch")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or int(top_k) < 1:
            raise ValueError(f"top_k must be an integer >= 1, got top_k={top_k!r}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got chunk_size={chunk_size}")
        self.paths = match_output_paths(output)
        self.output = output
        self.top_k = int(top_k)
        self.id_columns = list(id_columns)
        self.exclude_seen = exclude_seen
        self.chunk_size = int(chunk_size)
        self.frames: dict[str, pd.DataFrame] = {}
        self._parts: dict[int, list[torch.Tensor]] = {}
        self._indices: dict[int, list[Any]] = {}  # a plain DataLoader's batch indices (ours have none)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts, self._indices = {}, {}

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, torch.Tensor):
            raise ValueError(
                f"MatchPredictionWriter expects one embedding tensor per batch, got {type(prediction).__name__} "
                f"(dataloader {dataloader_idx})"
            )
        self._parts.setdefault(int(dataloader_idx), []).append(prediction.detach().cpu())
        if batch_indices:
            self._indices.setdefault(int(dataloader_idx), []).append(list(batch_indices))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _ids(dm: Any, column: str | None, encoded: np.ndarray) -> np.ndarray:
        decode = getattr(dm, "decode", None)
        if column is not None and callable(decode):
            try:
                return np.asarray(decode(column, encoded))
            except KeyError:
                pass
        return encoded

    def _exclusion(self, dm: Any, n_users: int, corpus_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """CSR (indptr, corpus rows) of each predict user's seen items found in the corpus."""
        ds = dm.dataset("predict") if dm is not None and callable(getattr(dm, "dataset", None)) else None
        indptr, seen = getattr(ds, "seen_indptr", None), getattr(ds, "seen_items", None)
        if indptr is None or seen is None:
            return None
        if indptr.numel() != n_users + 1:
            raise ValueError(f"the datamodule's predict data has {indptr.numel() - 1} users but {n_users} user embeddings were predicted")
        seen = seen.long().numpy()
        size = max(int(corpus_ids.max(initial=0)), int(seen.max(initial=0))) + 1
        lookup = np.full(size, -1, dtype=np.int64)
        lookup[corpus_ids] = np.arange(len(corpus_ids))
        rows = np.where(seen >= 0, lookup[np.clip(seen, 0, None)], -1)
        owner = np.repeat(np.arange(n_users), np.diff(indptr.numpy()))
        keep = (seen > 0) & (rows >= 0)
        counts = np.bincount(owner[keep], minlength=n_users)
        new_indptr = np.concatenate([[0], np.cumsum(counts)])
        return torch.as_tensor(new_indptr, dtype=torch.long), torch.as_tensor(rows[keep], dtype=torch.long)

    # ------------------------------------------------------------------ writing
    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any) -> None:
        users = gather_predictions(self._parts.get(0, []), [self._indices.get(0, [])])
        items = gather_predictions(self._parts.get(1, []), [self._indices.get(1, [])])
        self._parts, self._indices = {}, {}
        if not trainer.is_global_zero:
            return
        if users is None or items is None:
            raise ValueError(
                "MatchPredictionWriter needs two predict dataloaders, [users, items] (MatchDataModule's "
                f"predict_dataloader), got embeddings for dataloader(s) {sorted(k for k, v in ((0, users), (1, items)) if v is not None)}"
            )
        from .retrieval import topk_search

        dm = trainer.datamodule
        user_col = getattr(dm, "user_col", None)
        item_col = getattr(dm, "item_id_feature", None)
        resolve = getattr(pl_module, "resolve_item_id_feature", None)
        if item_col is None and callable(resolve):
            item_col = resolve()
        n_users, n_items = users.shape[0], items.shape[0]

        # user ids
        ds = dm.dataset("predict") if dm is not None and callable(getattr(dm, "dataset", None)) else None
        x = getattr(ds, "x", None) or {}
        raw = dm.raw_frame("predict") if callable(getattr(dm, "raw_frame", None)) else None
        if user_col is not None and raw is not None and user_col in raw.columns and len(raw) == n_users:
            # the raw ids, also of users the encoder does not know (too few training interactions,
            # new users), which decode to the unknown id
            user_ids = raw[user_col].to_numpy()
        elif user_col is not None and user_col in x:
            user_enc = x[user_col].reshape(-1).long().numpy()[:n_users]
            user_ids = self._ids(dm, user_col, user_enc)
        else:
            user_col, user_ids = "user_id", np.arange(n_users)
        extra: dict[str, np.ndarray] = {}
        if self.id_columns:
            if raw is None:
                raise ValueError(f"id_columns={self.id_columns} need a datamodule with raw_frame('predict')")
            missing = [c for c in self.id_columns if c not in raw.columns]
            if missing:
                raise KeyError(f"id_columns {missing} not found in the prediction users (columns: {list(raw.columns)})")
            extra = {c: raw[c].to_numpy()[:n_users] for c in self.id_columns if c != user_col}

        # item ids (the corpus, in the order the item loader reads it)
        corpus = dm.item_corpus() if dm is not None and callable(getattr(dm, "item_corpus", None)) else None
        if corpus is not None and item_col in corpus and len(corpus[item_col]) == n_items:
            corpus_ids = torch.as_tensor(corpus[item_col]).reshape(-1).long().numpy()
            item_ids = self._ids(dm, item_col, corpus_ids)
        else:
            item_col = item_col or "item_id"
            corpus_ids = np.arange(n_items)
            item_ids = corpus_ids

        exclude_seen = self.exclude_seen if self.exclude_seen is not None else bool(getattr(pl_module, "exclude_seen", True))
        exclude = self._exclusion(dm, n_users, corpus_ids) if exclude_seen and corpus is not None else None
        device = pl_module.device if isinstance(pl_module.device, torch.device) else torch.device("cpu")
        item_emb = items.to(device)
        scores, rows = topk_search(
            users.to(device=device, dtype=item_emb.dtype), item_emb, min(self.top_k, n_items),
            chunk_size=self.chunk_size,
            exclude=None if exclude is None else (exclude[0].to(device), exclude[1].to(device)),
        )
        scores, rows = scores.cpu().numpy(), rows.cpu().numpy()
        k = rows.shape[1]
        valid = (rows >= 0).reshape(-1)
        user_row = np.repeat(np.arange(n_users), k)[valid]

        user_frame = pd.DataFrame({"row": np.arange(n_users), user_col: user_ids, **extra, **_embedding_columns(users.float().numpy())})
        item_frame = pd.DataFrame({"row": np.arange(n_items), item_col: item_ids, **_embedding_columns(items.float().numpy())})
        topk_cols: dict[str, Any] = {"row": user_row, user_col: np.asarray(user_ids)[user_row]}
        topk_cols.update({c: v[user_row] for c, v in extra.items()})
        topk_cols["rank"] = np.tile(np.arange(1, k + 1), n_users)[valid]
        topk_cols[item_col] = np.asarray(item_ids)[rows.reshape(-1)[valid]]
        topk_cols["score"] = scores.reshape(-1)[valid]
        topk_frame = pd.DataFrame(topk_cols)
        self.frames = {"user_embeddings": user_frame, "item_embeddings": item_frame, "topk": topk_frame}
        for name, frame in self.frames.items():
            write_frame(frame, self.paths[name])
        rank_zero_info(
            f"Wrote {n_users} user embeddings to {self.paths['user_embeddings']}, {n_items} item embeddings to "
            f"{self.paths['item_embeddings']} and the top-{self.top_k} items per user to {self.paths['topk']}"
        )
