"""Multi-task datamodule: several label columns, one task type per label."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..models.multi_task._base import check_task_types
from .base import TabularDataModule
from .synthetic_seq import CENSUS_DENSE_COLS, CENSUS_LABEL_COLS, CENSUS_REGRESSION_COL, CENSUS_SPARSE_COLS, make_census_like

__all__ = ["MTLDataModule"]


class DerivedLabels:
    """Adds label columns computed as the product of other columns (picklable, for streaming workers)."""

    def __init__(self, derived: Mapping[str, Sequence[str]], strict: bool = True) -> None:
        self.derived = {str(k): [str(c) for c in v] for k, v in derived.items()}
        self.strict = strict  # False: rows to predict, whose label columns may be missing

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        if not self.derived:
            return frame
        frame = frame.copy()
        for name, sources in self.derived.items():
            missing = [c for c in sources if c not in frame.columns]
            if missing and not self.strict:
                continue
            if missing:
                raise KeyError(f"derived label {name!r} needs column(s) {missing}; available: {list(frame.columns)}")
            value = frame[sources[0]].to_numpy(dtype=np.float64)
            for c in sources[1:]:
                value = value * frame[c].to_numpy(dtype=np.float64)
            frame[name] = value
        return frame


class MTLDataModule(TabularDataModule):
    """Multi-label tabular data for multi-task models; batches are ``(x, y)`` with ``y`` of
    shape ``(B, n_tasks)`` in the order of ``labels``.

    With no ``path`` and no ``data`` it uses the embedded Census-Income-shaped synthetic data
    set (:func:`~rechub_lightning.data.synthetic_seq.make_census_like`): labels ``income``
    and ``marital status`` (two negatively correlated binary tasks, as in the reference's
    census example), plus the regression target ``log income`` with
    ``synthetic_regression=True``. Real multi-label files work the same way, e.g. the
    Census-Income, Ali-CCP (``labels=["click", "purchase"]``) or AliExpress
    (``labels=["click", "conversion"]``) samples.

    Args:
        path: CSV/TSV/Parquet file with features and labels.
        data: a pandas DataFrame or a dict of arrays (instead of ``path``).
        labels: label columns, one per task, in the model's output order (required with
            ``path``/``data``).
        task_types: ``"classification"`` or ``"regression"`` per label (default: a label whose
            training values are all 0/1 is classification, any other regression).
        derived_labels: label columns computed as the product of other columns, e.g. ESMM's
            ``{"ctcvr": ["click", "purchase"]}``; their sources are left out of the features.
        val_path: separate validation file (then ``path`` is all training data).
        test_path: separate test file.
        predict_path: rows to predict (labels may be missing).
        sparse_features: categorical columns. With neither ``sparse_features`` nor
            ``dense_features`` given, integer, boolean and text columns are sparse and float
            columns dense (multi-task data sets store categories as integer codes).
        dense_features: numeric columns.
        sequence_features: list-valued columns (``{column: shared_with}`` or a list).
        ignore_columns: columns to leave out of inference (ids such as AliExpress' ``search_id``).
        embed_dim: embedding width of every categorical feature (``None``: automatic).
        min_freq: categories seen fewer times in training map to the unknown id 0.
        dense_scaling: ``standard``, ``minmax``, ``log`` or ``none``.
        preprocess: encode categories (``False``: columns already hold ids).
        max_len: padded length of sequence features.
        sequence_sep, sequence_pad_value: how histories are written (separator of text histories;
            a padding value to drop), as in :class:`~rechub_lightning.data.CTRDataModule`.
        split_ratio: ``(train, val)`` fractions of ``path``/``data``; the rest is test. With
            ``test_path`` alone, ``path`` is split into train and val in this proportion.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        seed: split and shuffling seed (and the synthetic data's seed).
        synthetic_rows: rows of the default synthetic data set.
        synthetic_regression: add the regression task ``log income`` to the default labels.
        preprocessing_from: a checkpoint whose fitted preprocessing to reuse.
        streaming: read ``path``/``val_path``/``test_path``/``predict_path`` as Parquet row group
            by row group instead of loading them (data larger than memory; needs ``val_path``);
            see :class:`~rechub_lightning.data.CTRDataModule` and ``docs/distributed.md``. Task
            types are then inferred in the same single pass as the preprocessing statistics.
        shuffle_buffer: with ``streaming``, row groups whose rows are shuffled together.

    Raises:
        ValueError: for an unknown task type (named), a ``task_types``/``labels`` length
            mismatch, missing labels for file input, or a derived label whose source is missing.

    Example:
        >>> dm = MTLDataModule(synthetic_rows=2000, batch_size=256)
        >>> dm.labels, dm.task_types
        (['income', 'marital status'], ['classification', 'classification'])
        >>> MTLDataModule(synthetic_rows=2000, synthetic_regression=True).task_types[-1]
        'regression'
    """

    def __init__(
        self,
        path: str | None = None,
        data: Any = None,
        labels: Sequence[str] | None = None,
        task_types: Sequence[str] | None = None,
        derived_labels: Mapping[str, Sequence[str]] | None = None,
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
        batch_size: int = 1024,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 2022,
        synthetic_rows: int = 20_000,
        synthetic_regression: bool = False,
        preprocessing_from: str | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 4,
        sequence_sep: str | None = None,
        sequence_pad_value: Any = None,
    ) -> None:
        synthetic = path is None and data is None
        self._synthetic = (int(synthetic_rows), bool(synthetic_regression))
        self.derived_labels = {str(k): [str(c) for c in v] for k, v in (derived_labels or {}).items()}
        for name, sources in self.derived_labels.items():
            if len(sources) < 1:
                raise ValueError(f"derived_labels[{name!r}] names no source column")
        if labels is None:
            if not synthetic:
                raise ValueError("labels is required with path/data: name one label column per task")
            labels = list(CENSUS_LABEL_COLS) + ([CENSUS_REGRESSION_COL] if synthetic_regression else [])
        labels = [str(c) for c in labels]
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels has duplicates: {labels}")
        if task_types is not None:
            task_types = check_task_types(task_types)
            if len(task_types) != len(labels):
                raise ValueError(f"task_types has {len(task_types)} entries for {len(labels)} labels {labels}")
        self._label_sources = set(labels) | {c for v in self.derived_labels.values() for c in v}
        # preprocessing restored + rows given: rows to predict (`rechub predict`), labels optional
        self._rows_to_predict = preprocessing_from is not None and (path is not None or data is not None)
        if synthetic and sparse_features is None and dense_features is None and sequence_features is None:
            sparse_features = [c for c in CENSUS_SPARSE_COLS if c not in self._label_sources]
            dense_features = [c for c in CENSUS_DENSE_COLS if c not in self._label_sources]
        self.save_hyperparameters(ignore=["data"])
        # None: inferred from the training labels as soon as the frames are loaded (the base
        # class validates labels against the task types before it returns).
        self.task_types = list(task_types) if task_types is not None else None  # type: ignore[assignment]
        super().__init__(
            path=path, data=data, labels=labels, val_path=val_path, test_path=test_path, predict_path=predict_path,
            sparse_features=sparse_features, dense_features=dense_features, sequence_features=sequence_features,
            ignore_columns=ignore_columns, embed_dim=embed_dim, min_freq=min_freq, dense_scaling=dense_scaling,
            preprocess=preprocess, max_len=max_len, split_ratio=split_ratio, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed, preprocessing_from=preprocessing_from,
            streaming=streaming, shuffle_buffer=shuffle_buffer, sequence_sep=sequence_sep,
            sequence_pad_value=sequence_pad_value,
        )

    # ------------------------------------------------------------------ sources
    def default_frame(self) -> pd.DataFrame:
        rows, regression = self._synthetic
        return make_census_like(n_rows=rows, seed=self.seed, with_regression=regression)

    def _add_derived(self, frame: pd.DataFrame | None) -> pd.DataFrame | None:
        if frame is None or not self.derived_labels:
            return frame
        return DerivedLabels(self.derived_labels, strict=not self._rows_to_predict)(frame)

    # streaming hooks (see TabularDataModule)
    def _prepare_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self._add_derived(frame)  # type: ignore[return-value]

    def _frame_transform(self) -> DerivedLabels | None:
        # the label columns of training/validation files are checked from their Parquet schema first;
        # prediction files may lack them
        return DerivedLabels(self.derived_labels, strict=False) if self.derived_labels else None

    def _label_source_columns(self) -> list[str]:
        plain = [c for c in self.labels if c not in self.derived_labels]
        return list(dict.fromkeys(plain + [c for v in self.derived_labels.values() for c in v]))

    def _load_frames(self, path: str | None, data: Any, val_path: str | None, test_path: str | None) -> dict[str, pd.DataFrame | None]:
        frames = {k: self._add_derived(v) for k, v in super()._load_frames(path, data, val_path, test_path).items()}
        if self.task_types is None:
            self.task_types = self._infer_task_types(frames.get("train"))
        return frames

    def state_dict(self) -> dict[str, Any]:
        # derived labels are part of what the labels mean: `rechub test --ckpt_path` restores them
        return {**super().state_dict(), "derived_labels": {k: list(v) for k, v in self.derived_labels.items()}}

    def _label_columns_taken(self) -> set[str]:
        return set(self._label_sources)  # the labels and the columns derived labels come from

    def _inferred_dense(self, df: pd.DataFrame, col: str) -> bool:
        """Float columns are dense; integer, boolean and text columns are category codes. An integer
        code column with a missing value (in any split) reads as floats: whole numbers with NaN stay sparse."""
        if not pd.api.types.is_float_dtype(df[col].dtype):
            return False
        if self.streaming and not len(df):
            # inferred from the Parquet schema: read this column's values (only it) to decide alike
            parts = [f[col] for f in self._sources["train"].iter_frames([col])]
            s = pd.concat(parts, ignore_index=True) if parts else df[col]
        else:
            whole = getattr(self, "_frames", {}).get("all")
            s = whole[col] if whole is not None and col in whole.columns and len(whole) >= len(df) else df[col]
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = v[np.isfinite(v)]
        return not (bool(np.isnan(v).any()) and finite.size > 0 and bool((finite == np.round(finite)).all()))

    def _infer_task_types(self, train: pd.DataFrame | None) -> list[str]:
        """A label whose training values are all 0/1 is classification, any other regression."""
        if train is None or not all(c in train.columns for c in self.labels):
            return ["classification"] * len(self.labels)
        types = []
        for c in self.labels:
            values = pd.to_numeric(train[c], errors="coerce").dropna().unique()
            types.append("classification" if np.isin(values, [0.0, 1.0]).all() else "regression")
        return types
