"""CTR (ranking) datamodule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .base import TabularDataModule
from .sequence import generate_seq_feature
from .synthetic import make_criteo_like
from .synthetic_seq import make_amazon_like

_SYNTHETIC = ("criteo", "amazon")

__all__ = ["CTRDataModule"]


class CTRDataModule(TabularDataModule):
    """Click-through-rate data: one binary label, sparse/dense/sequence features.

    With no ``path`` and no ``data`` it uses an embedded synthetic data set, so it works offline:
    ``synthetic="criteo"`` (default; :func:`~rechub_lightning.data.synthetic.make_criteo_like`:
    13 dense + 26 sparse fields) or ``synthetic="amazon"`` (behaviour sequences for DIN/DIEN/BST:
    :func:`~rechub_lightning.data.synthetic_seq.make_amazon_like` turned into samples by
    :func:`~rechub_lightning.data.sequence.generate_seq_feature`; features ``user_id``,
    ``target_item_id``, ``target_cate_id`` and the histories ``hist_item_id``/``hist_cate_id``
    sharing the target tables; schema groups ``user``, ``target``, ``history``).

    Args:
        path: CSV/TSV/Parquet file with features and the label.
        data: a pandas DataFrame or a dict of arrays (instead of ``path``).
        label: label column (values 0/1).
        val_path: separate validation file (then ``path`` is all training data).
        test_path: separate test file.
        predict_path: rows to predict (may lack the label). Without it, ``predict`` reads the
            test split, or every row of ``path`` when the preprocessing was restored from a
            checkpoint (``rechub predict --ckpt_path ... --data.path new.csv``).
        sparse_features: categorical columns. With neither ``sparse_features`` nor
            ``dense_features`` given, numeric columns are dense and the others sparse.
        dense_features: numeric columns.
        sequence_features: list-valued columns (``{column: shared_with}`` or a list).
        ignore_columns: columns to leave out of inference (ids, timestamps...).
        embed_dim: embedding width of every categorical feature (``None``: automatic).
        min_freq: categories seen fewer times in training map to the unknown id 0.
        dense_scaling: ``standard``, ``minmax``, ``log`` (signed log1p then standard) or ``none``.
        preprocess: encode categories (``False``: columns already hold ids).
        max_len: padded length of sequence features.
        sequence_sep: separator of histories stored as text (default ``"|"``: ``"3|17|5"``; with
            ``preprocessing_from``, the checkpoint's unless given); written lists (``"[3, 17, 5]"``,
            as ``DataFrame.to_csv`` writes a list column, or a NumPy array's ``"[ 3 17  5]"``) are parsed too.
        sequence_pad_value: a value that pads the list-valued histories of the input (e.g. 0 in
            :func:`~rechub_lightning.data.generate_seq_feature`'s output); it is dropped, not
            encoded as an item. Histories keep their most recent ``max_len`` items, padded at the end.
        split_ratio: ``(train, val)`` fractions of ``path``/``data``; the rest is test. With
            ``test_path`` alone, ``path`` is split into train and val in this proportion.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size (default: ``batch_size``).
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
        seed: split and shuffling seed.
        synthetic: which embedded data set to use without ``path``/``data``: ``criteo`` or ``amazon``.
        synthetic_rows: rows of the default Criteo-shaped data set (``amazon``: number of users / 10).
        synthetic_max_vocab: largest field's vocabulary in the default data set.
        preprocessing_from: a checkpoint whose fitted preprocessing to reuse instead of fitting.
        streaming: out-of-core Parquet. ``path`` (a file, a directory of files or a list),
            ``val_path`` (required for training), ``test_path`` and ``predict_path`` are read
            row group by row group (:class:`~rechub_lightning.data.streaming.ParquetStreamDataset`)
            and never loaded whole. The preprocessing statistics (vocabularies with ``min_freq``,
            dense scaling) come from one streaming pass over ``path`` in ``__init__`` (exactly
            what the in-memory fit gives) and are saved with the checkpoint as usual. Missing
            columns and impossible column types fail from the Parquet schema before training;
            values (labels outside {0, 1}, NaN labels, text in dense columns, ids out of range)
            fail per chunk with the column named. Training rows: each epoch every rank gets
            ``N // world_size`` rows, the ``N % world_size`` surplus rows are skipped that
            epoch; evaluation reads every row exactly once. ``split_ratio`` is not used.
        shuffle_buffer: with ``streaming``, number of row groups whose rows are shuffled
            together in training (memory grows with it).

    Example:
        >>> dm = CTRDataModule(synthetic_rows=2000, batch_size=256)
        >>> len(dm.schema.sparse), len(dm.schema.dense)
        (26, 13)
    """

    def __init__(
        self,
        path: str | None = None,
        data: Any = None,
        label: str = "label",
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        sparse_features: Sequence[str] | None = None,
        dense_features: Sequence[str] | None = None,
        sequence_features: Mapping[str, str | None] | Sequence[str] | None = None,
        ignore_columns: Sequence[str] = (),
        embed_dim: int | None = 16,
        min_freq: int = 1,
        dense_scaling: str = "standard",
        preprocess: bool = True,
        max_len: int = 50,
        split_ratio: Sequence[float] = (0.8, 0.1),
        batch_size: int = 2048,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 2022,
        synthetic: str = "criteo",
        synthetic_rows: int = 100_000,
        synthetic_max_vocab: int = 10_000,
        preprocessing_from: str | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 4,
        sequence_sep: str | None = None,
        sequence_pad_value: Any = None,
    ) -> None:
        if synthetic not in _SYNTHETIC:
            raise ValueError(f"synthetic={synthetic!r} is not one of {_SYNTHETIC}")
        self.task_types = ["classification"]
        self._synthetic = (synthetic, synthetic_rows, synthetic_max_vocab, max_len)
        pad_value, groups = None, None
        if path is None and data is None and sparse_features is None and dense_features is None:
            if synthetic == "criteo":
                sparse_features = [f"C{i}" for i in range(1, 27)]
                dense_features = [f"I{i}" for i in range(1, 14)]
                if dense_scaling == "standard":
                    dense_scaling = "log"  # counts are heavy-tailed
            else:
                sparse_features = ["user_id", "target_item_id", "target_cate_id"]
                dense_features = []
                sequence_features = {"hist_item_id": "target_item_id", "hist_cate_id": "target_cate_id"}
                pad_value = 0
                groups = {
                    "user": ["user_id"],
                    "target": ["target_item_id", "target_cate_id"],
                    "history": ["hist_item_id", "hist_cate_id"],
                }
        self.save_hyperparameters(ignore=["data"])
        super().__init__(
            path=path, data=data, labels=[label], val_path=val_path, test_path=test_path, predict_path=predict_path,
            sparse_features=sparse_features, dense_features=dense_features, sequence_features=sequence_features,
            ignore_columns=ignore_columns, embed_dim=embed_dim, min_freq=min_freq, dense_scaling=dense_scaling,
            preprocess=preprocess, max_len=max_len, split_ratio=split_ratio, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed, preprocessing_from=preprocessing_from,
            sequence_pad_value=pad_value if sequence_pad_value is None else sequence_pad_value, sequence_sep=sequence_sep,
            groups=groups, streaming=streaming, shuffle_buffer=shuffle_buffer,
        )

    def default_frame(self) -> pd.DataFrame | dict[str, pd.DataFrame]:
        kind, rows, vocab, max_len = self._synthetic
        if kind == "criteo":
            return make_criteo_like(n_rows=rows, max_vocab=vocab, seed=self.seed)
        events = make_amazon_like(n_users=max(rows // 10, 50), seed=self.seed)
        train, val, test = generate_seq_feature(
            events, "user_id", "item_id", "time", item_attribute_cols=["cate_id"], max_len=max_len, seed=self.seed,
            inplace=False,
        )
        return {"train": train, "val": val, "test": test}
