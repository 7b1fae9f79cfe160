"""Shared machinery of the tabular datamodules (CTR and multi-task).

Sources -> raw frame -> split (by ratio or separate files) -> preprocessing fitted on
the training split in ``__init__`` (so the schema exists before ``setup`` and
LightningCLI can link it into the model) -> encoded column tensors, validated in
``setup`` -> batched loaders (DESIGN decision 4).
"""

from __future__ import annotations

import functools
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..checkpoint import read_checkpoint
from ..features import FeatureSchema, SequenceFeature, SparseFeature
from .datasets import RaggedColumnError, TensorDictDataset, check_int, make_dataloader, to_tensor
from .preprocessing import Preprocessor

__all__ = [
    "TabularDataModule", "read_table", "as_frame", "load_preprocessing_state", "validate_batch_tensors", "validate_loader",
    "validate_labels", "loader_columns", "encode_labels", "check_split_ratio",
]


def check_split_ratio(split_ratio: Any, arg: str = "split_ratio") -> tuple[float, float]:
    """``(train, val)`` fractions, each in [0, 1] and summing to at most 1 (the rest is test)."""
    try:
        ratio = tuple(float(r) for r in split_ratio)
    except (TypeError, ValueError):
        ratio = ()
    if len(ratio) != 2 or not all(np.isfinite(ratio)) or min(ratio) < 0 or sum(ratio) > 1:
        shown = tuple(split_ratio) if isinstance(split_ratio, (list, tuple)) else split_ratio
        raise ValueError(f"{arg}={shown!r} must be (train, val) fractions summing to <= 1")
    return ratio  # type: ignore[return-value]



def read_table(path: str, text_columns: Sequence[str] = (), **kwargs: Any) -> pd.DataFrame:
    """Read a CSV/TSV (optionally compressed) or Parquet file into a frame.

    ``text_columns`` of a CSV are read as text, not guessed per file: ``"02134"`` stays a zip code
    and ``"287130e0"`` a hash (a file of their own would read them as the numbers 2134 and 287130.0,
    which match no category fitted on the text). A CSV column of whole numbers with empty cells that
    reaches 2**53 (64-bit hashed ids), which pandas reads as float64, is read again exactly as
    nullable integers (unless pandas options other than ``dtype`` are given)."""
    p = str(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"data file {p!r} does not exist")
    lower = p.lower()
    if lower.endswith((".parquet", ".pq")) or os.path.isdir(p):
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading Parquet needs pyarrow: pip install 'rechub-lightning[parquet]'") from e
        return pd.read_parquet(p, **kwargs)
    sep = "\t" if lower.endswith((".tsv", ".tsv.gz", ".txt")) else ","
    if text_columns and "dtype" not in kwargs:
        kwargs["dtype"] = {c: str for c in text_columns}
    sep = kwargs.pop("sep", sep)
    try:
        frame = pd.read_csv(p, sep=sep, **kwargs)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"data file {p!r} is not a readable {'TSV' if sep == chr(9) else 'CSV'} table: {e}") from e
    # whole numbers with an empty cell are read as float64, which merges distinct ids from 2**53 on
    # (64-bit hashed ids): read such columns again as nullable integers, exactly
    if not isinstance(frame, pd.DataFrame) or set(kwargs) - {"dtype"}:
        return frame  # pandas options of the caller's (chunksize, index_col...): read as asked
    given = kwargs.get("dtype") if isinstance(kwargs.get("dtype"), Mapping) else {}
    wide = [c for c in frame.columns if c not in given and _wide_whole_floats(frame[c])]
    if wide:
        try:
            exact = pd.read_csv(p, sep=sep, **{**kwargs, "usecols": wide, "dtype": {c: "Int64" for c in wide}})
        except (ValueError, TypeError, OverflowError):
            return frame  # e.g. written as 1e+20: no exact digits to recover
        for c in wide:
            frame[c] = exact[c]
    return frame


def _wide_whole_floats(s: pd.Series) -> bool:
    """A float64 column of whole numbers (and missing values) reaching 2**53, where floats lose ids."""
    if s.dtype != np.float64:
        return False
    v = s.to_numpy()
    finite = v[np.isfinite(v)]
    return bool(finite.size) and bool(np.abs(finite).max() >= 2.0**53) and bool((finite == np.round(finite)).all())


def _text_columns(pre: Preprocessor) -> list[str]:
    """The columns a fitted preprocessor reads as text: categories fitted on text, and sequences."""
    return [c for c, enc in pre.encoders.items() if not enc.numeric and c in pre.sparse] + list(pre.sequence)


def as_frame(data: Any, what: str = "data") -> pd.DataFrame:
    """A DataFrame from a frame, a dict of arrays (2-D arrays become list columns) or a path."""
    if isinstance(data, pd.DataFrame):
        dup = data.columns[data.columns.duplicated()].unique().tolist()
        if dup:
            raise ValueError(f"{what} has duplicated column name(s) {dup}; rename or drop the copies")
        return data
    if isinstance(data, (str, os.PathLike)):
        return read_table(str(data))
    if isinstance(data, Mapping):
        cols = {}
        for k, v in data.items():
            arr = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            cols[k] = list(arr) if arr.ndim > 1 else arr
        return pd.DataFrame(cols)
    raise TypeError(f"{what} must be a path, a pandas DataFrame or a dict of arrays, got {type(data).__name__}")


def load_preprocessing_state(ckpt_path: str) -> dict[str, Any]:
    """The datamodule state (fitted preprocessing) stored in a Lightning checkpoint (read-only: the
    CLI and the datamodule ask for the same file, which is read once while it is unchanged)."""
    p = os.path.abspath(str(ckpt_path))
    stat = os.stat(p) if os.path.exists(p) else None
    return _preprocessing_state(p, stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)


@functools.lru_cache(maxsize=2)
def _preprocessing_state(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    ckpt = read_checkpoint(path)
    for value in ckpt.values():
        if isinstance(value, dict) and "preprocessor" in value:
            return value
    raise ValueError(f"checkpoint {path!r} holds no datamodule preprocessing state")


def _column_shape_error(f: Any, t: torch.Tensor) -> str | None:
    """What is wrong with the shape of feature ``f``'s column ``t`` (``None``: nothing)."""
    if isinstance(f, SequenceFeature):
        if t.dim() != 2:
            return f"must be a (rows, length) matrix of ids, got shape {tuple(t.shape)}"
    elif isinstance(f, SparseFeature):
        if not (t.dim() == 1 or (t.dim() == 2 and t.shape[1] == 1)):
            return f"must hold one id per row, got shape {tuple(t.shape)} (a list of ids per row is a SequenceFeature)"
    else:
        width = 1 if t.dim() == 1 else t.shape[1] if t.dim() == 2 else None
        if width != f.embed_dim:
            return f"must have {f.embed_dim} value(s) per row (its embed_dim), got shape {tuple(t.shape)}"
    return None


def validate_batch_tensors(
    x: Mapping[str, torch.Tensor], schema: FeatureSchema, where: str, owners: Sequence[Any] | None = None
) -> None:
    """Raise a clear error for ids outside ``[0, vocab_size)``, missing columns, columns of the wrong
    shape or NaN/inf dense values.

    A feature with ``shared_with`` reads its owner's rows, so its ids must also fit the owner's
    vocabulary; the owner is looked up in ``owners`` (default: the schema's features).
    """
    by_name = {f.name: f for f in (schema.features if owners is None else owners)}
    for f in schema.features:
        if f.name not in x:
            raise KeyError(f"feature {f.name!r} is missing from the {where} data (have {sorted(x)})")
        t = x[f.name]
        shape_error = _column_shape_error(f, t)
        if shape_error:
            raise ValueError(f"{f.kind} feature {f.name!r} in {where} data {shape_error}")
        if isinstance(f, SparseFeature):
            if t.is_floating_point():
                # Float ids are cast with .long() by the embedding (as in the reference), which
                # is exact only for whole numbers: anything else is an error, not a truncation.
                bad = ~torch.isfinite(t) | (t != torch.floor(t))
                if bool(bad.any()):
                    raise ValueError(
                        f"feature {f.name!r} in {where} data must hold integer ids, found {float(t[bad][0])!r} "
                        f"({int(bad.sum())} value(s), dtype {t.dtype}); Torch-RecHub truncated such values silently"
                    )
            if t.numel():
                lo, hi = int(t.min()), int(t.max())
                owner = by_name.get(f.shared_with) if f.shared_with else None
                limit = min(f.vocab_size, owner.vocab_size) if isinstance(owner, SparseFeature) else f.vocab_size
                if lo < 0 or hi >= limit:
                    bad = lo if lo < 0 else hi
                    kind = "sequence" if isinstance(f, SequenceFeature) else "sparse"
                    why = (
                        f"vocab_size={f.vocab_size}" if limit == f.vocab_size
                        else f"it shares the table of {owner.name!r}, vocab_size={owner.vocab_size}"
                    )
                    raise ValueError(f"{kind} feature {f.name!r} in {where} data has id {bad} outside [0, {limit}) ({why})")
        else:
            if not torch.isfinite(t).all():
                n = int((~torch.isfinite(t)).sum())
                raise ValueError(f"dense feature {f.name!r} in {where} data has {n} NaN/inf value(s)")


def loader_columns(
    loader: Any, names: Sequence[str] | None = None, labels: bool = True
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None] | None:
    """The whole columns behind ``loader``, when its dataset exposes them.

    Our :class:`TensorDictDataset` and any dataset holding a dict of arrays as ``x`` (and
    labels as ``y``), such as Torch-RecHub's ``TorchDataset``/``PredictDataset``, whose
    columns are converted (only ``names`` of them when given: other columns may hold
    anything the model does not read; labels only with ``labels``). ``None`` for anything
    else (an iterable, a streaming or per-row dataset of another shape). A column of
    sequences of different lengths (padded per batch by the loader's ``collate_fn``) comes
    back flattened: its values are checked, not its shape.
    """
    ds = getattr(loader, "dataset", None)
    if isinstance(ds, TensorDictDataset) and not getattr(ds, "ragged", ()):
        return ds.x, ds.y
    x = getattr(ds, "x", None)
    if not isinstance(x, Mapping):
        return None
    y = getattr(ds, "y", None)
    cols = {k: _checkable(v, k) for k, v in x.items() if names is None or k in names}
    return cols, (None if y is None or not labels else to_tensor(y, "label").float())


def _checkable(values: Any, name: str) -> torch.Tensor:
    """A column as a tensor; a ragged one (rows of different lengths) flattened."""
    if isinstance(values, torch.Tensor):
        return values
    try:
        return to_tensor(values, name)
    except RaggedColumnError:
        # padded with 0 (a legal id and a finite value), so the values and the width are checked
        rows = [np.asarray(v).reshape(-1) for v in values]
        lengths = np.array([len(r) for r in rows])
        flat = np.concatenate(rows)
        out = np.zeros((len(rows), int(lengths.max())), dtype=flat.dtype)
        out[np.arange(out.shape[1]) < lengths[:, None]] = flat
        return to_tensor(out, name)


def validate_labels(y: torch.Tensor, task_types: Sequence[str], where: str, binary: bool) -> None:
    """Raise a clear error for labels that do not fit ``task_types``.

    Checks the number of label columns, NaN/inf values and, for classification tasks,
    values outside ``{0, 1}`` (``binary``, what AUC needs) or ``[0, 1]`` (what BCE accepts).
    """
    cols = y.reshape(len(y), -1) if y.dim() != 1 else y.reshape(-1, 1)
    if cols.shape[1] != len(task_types):
        raise ValueError(
            f"{where} labels have {cols.shape[1]} column(s) (shape {tuple(y.shape)}) but the model has "
            f"{len(task_types)} task(s) {list(task_types)}"
        )
    for i, task in enumerate(task_types):
        col = cols[:, i]
        what = f"label column {i}" if len(task_types) > 1 else "label"
        bad = ~torch.isfinite(col)
        if bool(bad.any()):
            raise ValueError(f"{what} in {where} data has {int(bad.sum())} NaN/inf value(s) (first at row {int(bad.nonzero()[0])})")
        if task == "classification":
            wrong = (col != 0) & (col != 1) if binary else (col < 0) | (col > 1)
            if bool(wrong.any()):
                allowed = "0 or 1" if binary else "in [0, 1]"
                raise ValueError(
                    f"classification {what} in {where} data must be {allowed}, found {float(col[wrong][0])} "
                    f"(row {int(wrong.nonzero()[0])})"
                )


def validate_loader(
    loader: Any,
    features: Sequence[Any] | None,
    where: str,
    task_types: Sequence[str] | None = None,
    binary: bool = False,
    require_all: bool = True,
    required: Sequence[str] = (),
    allow_empty: bool = True,
) -> bool:
    """Check a loader's whole data against the model's features (and labels) before it runs.

    Args:
        loader: a DataLoader; only datasets whose columns :func:`loader_columns` can read
            are checked (others fail on their first bad batch instead).
        features: the model's features (``None``: nothing to check them against).
        where: the split's name in error messages.
        task_types: label check per task (``None``: labels are not checked).
        binary: classification labels must be exactly 0/1 (evaluation) rather than in [0, 1].
        require_all: every feature must be a column (``False``: check the ones present).
        required: features that must be columns even when ``require_all`` is off.
        allow_empty: ``False``: a dataset without rows is an error (training and evaluation
            data; an empty loader would train or score nothing).

    Returns:
        Whether the data could be checked.

    A dataset that passed the same checks before (the trainers check their loaders, then the
    module's hooks see the same loaders under ``lightning.Trainer``) is not read again.
    """
    ds = getattr(loader, "dataset", None)
    key = (
        None if features is None else tuple((f.name, type(f).__name__, getattr(f, "vocab_size", None)) for f in features),
        None if task_types is None else tuple(task_types),
        bool(binary),
        bool(require_all),
        tuple(required),
        bool(allow_empty),
    )
    if key in _checked(ds):
        return True
    cols = loader_columns(loader, [] if features is None else [f.name for f in features], labels=task_types is not None)
    if cols is None:
        return False
    x, y = cols
    if not allow_empty and _rows(ds) == 0:
        raise ValueError(f"the {where} data is empty (0 rows, in a {type(loader).__name__} over {type(ds).__name__})")
    if features is not None:
        feats = [f for f in features if require_all or f.name in x or f.name in required]
        validate_batch_tensors(x, FeatureSchema(feats), where, owners=features)
    if task_types is not None and y is not None:
        validate_labels(y, task_types, where, binary)
    _remember_checked(ds, key)
    return True


def _rows(ds: Any) -> int | None:
    try:
        return len(ds)
    except TypeError:
        return None


#: datasets that passed :func:`validate_loader`, with the checks they passed
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _checked(ds: Any) -> set:
    try:
        return _CHECKED.get(ds, set())
    except TypeError:  # not weak-referenceable or not hashable: always checked
        return set()


def _remember_checked(ds: Any, key: tuple) -> None:
    try:
        _CHECKED.setdefault(ds, set()).add(key)
    except TypeError:
        pass


def encode_labels(frame: pd.DataFrame, labels: Sequence[str], task_types: Sequence[str], split: str) -> np.ndarray:
    """Label columns -> float32 ``(N,)`` (one label) or ``(N, n_labels)``.

    Raises a ``TypeError``/``ValueError`` naming the label for non-numeric, NaN/inf or (for
    classification) non-0/1 values.
    """
    ys = []
    for col, task in zip(labels, task_types):
        s = pd.to_numeric(frame[col], errors="coerce")
        bad = s.isna() & frame[col].notna()
        if bad.any():
            raise TypeError(f"label {col!r} in {split} data has non-numeric value {frame[col][bad].iloc[0]!r}")
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        if not np.isfinite(v).all():
            raise ValueError(f"label {col!r} in {split} data has {int((~np.isfinite(v)).sum())} NaN/inf value(s)")
        if task == "classification":
            bad_vals = np.setdiff1d(np.unique(v), [0.0, 1.0])
            if bad_vals.size:
                raise ValueError(
                    f"classification label {col!r} in {split} data must be 0 or 1, found {bad_vals[:5].tolist()}"
                )
        ys.append(v.astype(np.float32))
    if not ys:
        return np.zeros(len(frame), dtype=np.float32)
    return ys[0] if len(ys) == 1 else np.stack(ys, axis=1)


def _first_value(s: pd.Series) -> Any:
    present = s.notna().to_numpy()
    first = int(present.argmax()) if len(present) else 0
    return s.iloc[first] if len(present) and present[first] else None


def _holds_lists(s: pd.Series) -> bool:
    """Whether an object column holds list-like rows (lists, tuples, arrays)."""
    return s.dtype == object and isinstance(_first_value(s), (list, tuple, np.ndarray))


def _warn_unlikely_features(df: pd.DataFrame, sparse: Sequence[str], dense: Sequence[str]) -> None:
    """Inferred columns that would make useless features: timestamps and values (nearly) unique
    per row (request ids, epoch seconds). As categories every validation/test value is unknown;
    as whole-number measures they are noise once scaled (prices and other measures are rarely
    unique whole numbers)."""
    n = len(df)
    for c in sparse:
        if pd.api.types.is_datetime64_any_dtype(df[c].dtype):
            rank_zero_warn(
                f"column {c!r} holds dates/times and was inferred as a sparse feature (one category per distinct "
                f"time); derive features from it (hour, weekday...) and pass ignore_columns=[{c!r}], or list the features"
            )
    if n < 1000:
        return
    suspects = [(c, "sparse", "an id unique per row gives unseen (unknown) categories at validation/prediction")
                for c in sparse if not pd.api.types.is_datetime64_any_dtype(df[c].dtype) and not _holds_lists(df[c])]
    suspects += [(c, "dense", "ids and timestamps are not measures") for c in dense if pd.api.types.is_integer_dtype(df[c].dtype)]
    for c, kind, why in suspects:
        distinct = df[c].nunique(dropna=True)
        if distinct > 0.5 * n:
            values = "distinct values" if kind == "sparse" else "distinct whole numbers"
            rank_zero_warn(
                f"column {c!r} was inferred as a {kind} feature with {distinct} {values} in {n} training rows: {why}; "
                f"pass ignore_columns=[{c!r}] unless it is meant as a feature"
            )


class TabularDataModule(L.LightningDataModule):
    """Base of :class:`CTRDataModule` and :class:`MTLDataModule`; see those for the arguments."""

    #: ``classification`` or ``regression`` per label, set by subclasses
    task_types: list[str]

    def __init__(
        self,
        path: str | None = None,
        data: Any = None,
        labels: Sequence[str] = ("label",),
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
        preprocessing_from: str | None = None,
        sequence_pad_value: Any = None,
        sequence_sep: str | None = None,
        groups: dict[str, list[str]] | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 4,
    ) -> None:
        super().__init__()
        self.labels = list(labels)
        self.batch_size = check_int(batch_size, "batch_size")
        self.eval_batch_size = self.batch_size if eval_batch_size is None else check_int(eval_batch_size, "eval_batch_size")
        split_ratio = check_split_ratio(split_ratio)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.embed_dim = embed_dim
        self._split_ratio = tuple(split_ratio)
        self._predict_path = predict_path
        self._split_paths = {"val": val_path, "test": test_path}  # files given for these splits
        self._datasets: dict[str, Any] = {}
        self.streaming = bool(streaming)
        self.shuffle_buffer = int(shuffle_buffer)
        self._groups = groups
        if sequence_sep is not None and not str(sequence_sep):
            raise ValueError("sequence_sep must be a non-empty string, got ''")
        self._sequence_sep = "|" if sequence_sep is None else str(sequence_sep)
        # how the rows are written (separator, padding) can differ from the files the restored
        # preprocessing was fitted on: given explicitly, they override the checkpoint's
        self._format_overrides = {k: v for k, v in (("sequence_sep", sequence_sep), ("sequence_pad_value", sequence_pad_value))
                                  if v is not None}

        restored = load_preprocessing_state(preprocessing_from) if preprocessing_from else None
        # CSV columns read as text in every file: sequences, and (restored) categories fitted on text
        self._text_columns = list(sequence_features or []) if not isinstance(sequence_features, str) else []
        if self.streaming:
            self._init_streaming(
                path, data, val_path, test_path, restored, preprocessing_from, sparse_features, dense_features,
                sequence_features, ignore_columns, min_freq, dense_scaling, preprocess, max_len, sequence_pad_value,
            )
            return
        if restored is not None:
            self.preprocessor = self._restored_preprocessor(restored["preprocessor"])
            self._text_columns = _text_columns(self.preprocessor)
        self._fitted_before_reading = restored is not None
        frames = self._load_frames(path, data, val_path, test_path)
        self._frames = frames
        self._whole_file_for_predict = restored is not None and (path is not None or data is not None)

        if restored is not None:
            rank_zero_info(f"Preprocessing restored from {preprocessing_from}")
        else:
            train = frames["train"]
            if train is None or len(train) == 0:
                raise ValueError("the training split is empty; give more rows or a larger split_ratio[0]")
            sparse, dense, seq = self._infer_columns(train, sparse_features, dense_features, sequence_features, ignore_columns)
            self.preprocessor = Preprocessor(
                sparse, dense, seq, min_freq=min_freq, dense_scaling=dense_scaling, encode=preprocess, max_len=max_len,
                sequence_pad_value=sequence_pad_value, sequence_sep=self._sequence_sep,
            ).fit(train)
            for name in ("val", "test", "all"):
                if frames.get(name) is not None:
                    self.preprocessor.check_dtypes(frames[name], f"{name} data")
        # NaN / non-binary labels fail here, before any step; rows restored for prediction
        # (``preprocessing_from`` + ``path``) need no labels (fitting still checks them, in setup)
        for name in () if self._whole_file_for_predict else ("train", "val", "test"):
            frame = frames.get(name)
            if frame is not None and len(frame) and all(c in frame.columns for c in self.labels):
                self._labels(frame, name)
        self.schema: FeatureSchema = self.preprocessor.schema(self.labels, embed_dim, groups)

    def _restored_preprocessor(self, state: Mapping[str, Any]) -> Preprocessor:
        pre = Preprocessor.from_state_dict(state)
        for key, value in getattr(self, "_format_overrides", {}).items():
            setattr(pre, key, value)
        return pre

    # ------------------------------------------------------------------ streaming (out-of-core Parquet)
    def _prepare_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Applied to every raw chunk before encoding (subclasses add derived columns)."""
        return frame

    def _frame_transform(self) -> Any:
        """A picklable callable for :class:`ParquetStreamDataset` (``None``: no transform)."""
        return None

    def _label_source_columns(self) -> list[str]:
        """Columns the labels are read from (``labels`` unless derived)."""
        return list(self.labels)

    def _init_streaming(
        self, path, data, val_path, test_path, restored, preprocessing_from, sparse_features, dense_features,
        sequence_features, ignore_columns, min_freq, dense_scaling, preprocess, max_len, sequence_pad_value,
    ) -> None:
        from .streaming import ParquetSource, check_parquet_schema

        if data is not None:
            raise ValueError("streaming=True reads Parquet files (path=...); data=... is already in memory, use streaming=False")
        if path is None and restored is None:
            raise ValueError("streaming=True needs path=<Parquet file, directory or list of files> with the training rows")
        if restored is None and val_path is None:
            raise ValueError(
                "streaming=True needs val_path (and optionally test_path): splitting path by split_ratio would need "
                "every row in memory; got val_path=None"
            )
        self._frames = {}
        self._whole_file_for_predict = restored is not None and path is not None
        self._sources = {
            "train": ParquetSource(path) if path is not None else None,
            "val": ParquetSource(val_path) if val_path is not None else None,
            "test": ParquetSource(test_path) if test_path is not None else None,
        }
        if restored is not None:
            self.preprocessor = self._restored_preprocessor(restored["preprocessor"])
            if self.task_types is None:  # type: ignore[comparison-overlap]
                self.task_types = list(restored.get("task_types") or ["classification"] * len(self.labels))
            rank_zero_info(f"Preprocessing restored from {preprocessing_from}")
        else:
            train = self._sources["train"]
            if train.num_rows == 0:
                raise ValueError(f"the training Parquet data {train.files} has no rows")
            probe = self._prepare_frame(train.empty_frame())
            sparse, dense, seq = self._infer_columns(probe, sparse_features, dense_features, sequence_features, ignore_columns)
            self.preprocessor = Preprocessor(
                sparse, dense, seq, min_freq=min_freq, dense_scaling=dense_scaling, encode=preprocess, max_len=max_len,
                sequence_pad_value=sequence_pad_value, sequence_sep=self._sequence_sep,
            )
            check_parquet_schema(train, self.preprocessor, [], "training", need_labels=False)
            self._check_label_columns(train, "training")
            self._fit_streaming(train)
        for name in ("val", "test"):
            src = self._sources[name]
            if src is not None:
                check_parquet_schema(src, self.preprocessor, [], name, need_labels=False)
                self._check_label_columns(src, name)
        self.schema = self.preprocessor.schema(self.labels, self.embed_dim, self._groups)

    def _check_label_columns(self, source: Any, what: str) -> None:
        import pyarrow.types as pt

        missing = [c for c in self._label_source_columns() if c not in source.columns]
        if missing:
            raise KeyError(f"label column(s) {missing} not found in the {what} Parquet data {source.files}; available: {source.columns}")
        for c in self._label_source_columns():
            t = source.schema.field(c).type
            if not (pt.is_integer(t) or pt.is_floating(t) or pt.is_boolean(t) or pt.is_decimal(t) or pt.is_string(t)
                    or pt.is_large_string(t) or pt.is_null(t)):
                raise TypeError(f"label {c!r} in the {what} Parquet data has type {t}; a numeric column is needed")

    def _fit_streaming(self, source: Any) -> None:
        """Preprocessing statistics (and label checks/task types) in one pass over the row groups."""
        columns = self._stream_columns(source)
        known = self.task_types is not None
        check_types = list(self.task_types) if known else ["regression"] * len(self.labels)
        binary = [True] * len(self.labels)
        rows = 0
        for k in range(len(source.row_groups)):
            frame = self._prepare_frame(source.read(k, columns))
            self.preprocessor.partial_fit(frame)
            y = encode_labels(frame, self.labels, check_types, "training Parquet")  # raises naming the label
            y2 = y.reshape(len(frame), -1)
            for j in range(len(self.labels)):
                binary[j] = binary[j] and bool(np.isin(y2[:, j], [0.0, 1.0]).all())
            rows += len(frame)
            del frame, y, y2
        self.preprocessor.finish_fit()
        if not known:
            self.task_types = ["classification" if b else "regression" for b in binary]
        rank_zero_info(
            f"Preprocessing fitted in one streaming pass over {rows} rows in {len(source.row_groups)} row group(s) of "
            f"{len(source.files)} Parquet file(s)"
        )

    def _stream_columns(self, source: Any) -> list[str]:
        have = set(source.columns)
        wanted = self.preprocessor.columns + self._label_source_columns()
        return [c for c in dict.fromkeys(wanted) if c in have]

    def _stream_source(self, split: str) -> Any:
        from .streaming import ParquetSource

        if split == "predict":
            if self._predict_path is not None:
                src = ParquetSource(self._predict_path)
            elif self._whole_file_for_predict:
                src = self._sources["train"]
            else:
                src = self._sources["test"]
            return src
        return self._sources.get(split)

    def _stream_dataset(self, split: str) -> Any:
        from .streaming import ParquetStreamDataset, check_parquet_schema

        if split in self._datasets:
            return self._datasets[split]
        src = self._stream_source(split)
        if src is None or src.num_rows == 0:
            return None
        # prediction reads no labels (a label column, complete or not, is left alone)
        has_labels = split != "predict" and all(c in src.columns for c in self._label_source_columns())
        if not has_labels and split != "predict":
            raise KeyError(f"label column(s) {self.labels} not found in the {split} Parquet data {src.files}")
        check_parquet_schema(src, self.preprocessor, [], split, need_labels=False)
        train = split == "train"
        ds = ParquetStreamDataset(
            src, self.preprocessor, self.batch_size if train else self.eval_batch_size,
            labels=self.labels if has_labels else (), task_types=self.task_types if has_labels else None,
            train=train, shuffle=train, shuffle_buffer=self.shuffle_buffer, seed=self.seed, schema=self.schema,
            frame_transform=self._frame_transform(), columns=self._stream_columns(src), split=split,
        )
        self._datasets[split] = ds
        return ds

    # ------------------------------------------------------------------ sources
    def default_frame(self) -> pd.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict_text_columns(self) -> list[str]:
        """Columns a prediction file must be read as text: text categories fitted at training time,
        and the columns that are neither features nor labels (see :meth:`_passthrough_columns`)."""
        return list(dict.fromkeys(list(self._text_columns) + _text_columns(self.preprocessor)
                                  + self._passthrough_columns(self._predict_path)))

    def _passthrough_columns(self, path: str | None) -> list[str]:
        """A CSV's columns that are neither fitted features nor labels, once preprocessing is fitted.

        They are only copied through (``--predict_id_columns``, ``raw_frame``), so they are read
        as text: an id ``"000123"`` stays ``"000123"`` and ``"0012"`` and ``"012"`` stay apart.
        """
        if path is None or str(path).lower().endswith((".parquet", ".pq")) or os.path.isdir(str(path)):
            return []  # Parquet keeps its types
        header = read_table(path, nrows=0).columns
        taken = set(self.preprocessor.columns) | self._label_columns_taken()
        return [c for c in header if c not in taken]

    def _load_frames(self, path: str | None, data: Any, val_path: str | None, test_path: str | None) -> dict[str, pd.DataFrame | None]:
        if path is not None and data is not None:
            raise ValueError("give either path or data, not both")
        text = list(self._text_columns)
        if getattr(self, "_fitted_before_reading", False):
            text += [c for c in self._passthrough_columns(path) if c not in text]
        whole = as_frame(data) if data is not None else read_table(path, text) if path is not None else self.default_frame()
        if isinstance(whole, dict):  # a default data set that comes split already
            return {**whole, "all": pd.concat([whole[k] for k in ("train", "val", "test") if whole.get(k) is not None], ignore_index=True)}
        if val_path is not None or test_path is not None:
            # the other files' columns that are text in the training rows are read as text
            text += [c for c in whole.columns if c not in text and not pd.api.types.is_numeric_dtype(whole[c].dtype)
                     and not pd.api.types.is_bool_dtype(whole[c].dtype)]
            self._text_columns = text
            train, val = whole, read_table(val_path, text) if val_path else None
            if val_path is None and self._split_ratio[1] > 0:
                # test_path alone: path holds train and validation rows, in split_ratio's proportion
                perm = np.random.default_rng(self.seed).permutation(len(whole))
                n_val = int(len(whole) * self._split_ratio[1] / (self._split_ratio[0] + self._split_ratio[1]))
                take = lambda idx: whole.iloc[np.sort(idx)].reset_index(drop=True)  # noqa: E731
                train, val = take(perm[n_val:]), take(perm[:n_val]) if n_val else None
            return {"train": train, "val": val, "test": read_table(test_path, text) if test_path else None, "all": whole}
        n = len(whole)
        perm = np.random.default_rng(self.seed).permutation(n)
        n_train = int(n * self._split_ratio[0])
        n_val = int(n * self._split_ratio[1])
        take = lambda idx: whole.iloc[np.sort(idx)].reset_index(drop=True)  # noqa: E731
        return {
            "train": take(perm[:n_train]),
            "val": take(perm[n_train : n_train + n_val]) if n_val else None,
            "test": take(perm[n_train + n_val :]) if n - n_train - n_val else None,
            "all": whole,
        }

    def _label_columns_taken(self) -> set[str]:
        """Columns that are never features: the labels (and, in subclasses, what labels derive from)."""
        return set(self.labels)

    def _inferred_dense(self, df: pd.DataFrame, col: str) -> bool:
        """Column inference: is this (non-label) column dense? Numeric columns are, others sparse."""
        return pd.api.types.is_numeric_dtype(df[col].dtype) and not pd.api.types.is_bool_dtype(df[col].dtype)

    def _infer_columns(
        self,
        df: pd.DataFrame,
        sparse: Sequence[str] | None,
        dense: Sequence[str] | None,
        sequence: Mapping[str, str | None] | Sequence[str] | None,
        ignore: Sequence[str],
    ) -> tuple[list[str], list[str], Any]:
        missing_labels = [c for c in self.labels if c not in df.columns]
        if missing_labels:
            raise KeyError(f"label column(s) {missing_labels} not found; available columns: {list(df.columns)}")
        for arg, value in (("sparse_features", sparse), ("dense_features", dense), ("sequence_features", sequence),
                           ("ignore_columns", ignore)):
            if isinstance(value, str):
                raise TypeError(f"{arg} must be a list of column names, got the string {value!r} (write [{value!r}])")
        unknown = [c for c in ignore if c not in df.columns]
        if unknown:
            raise KeyError(f"ignore_columns names column(s) {unknown} that the data does not have; available columns: {list(df.columns)}")
        for arg, value in (("sparse_features", sparse), ("dense_features", dense), ("sequence_features", sequence)):
            leaked = [c for c in (value or ()) if c in self.labels]
            if leaked:
                raise ValueError(
                    f"{arg} names the label column(s) {leaked}: a model would read its own target; "
                    f"remove them from {arg} (labels={self.labels})"
                )
        seq = sequence or {}
        taken = self._label_columns_taken() | set(ignore) | set(seq)
        if sparse is None and dense is None:
            rest = [c for c in df.columns if c not in taken]
            dense = [c for c in rest if self._inferred_dense(df, c)]
            sparse = [c for c in rest if c not in dense]
            rank_zero_info(f"Inferred {len(dense)} dense feature(s) {dense} and {len(sparse)} sparse feature(s) {sparse}")
            index_like = [c for c in rest if re.fullmatch(r"Unnamed: \d+", str(c))]
            if index_like:
                rank_zero_warn(
                    f"column(s) {index_like} look like a DataFrame index saved with the CSV and are used as features; "
                    f"pass ignore_columns={index_like} (or save with index=False) unless they are data"
                )
            _warn_unlikely_features(df, sparse, [c for c in dense if c not in index_like])
            if dense and not sparse and not seq and len(df):
                rank_zero_warn(
                    f"every feature column was inferred as dense ({dense[:10]}): categorical columns stored as numbers "
                    f"(ids, codes) are numeric, so name them in sparse_features; models that embed categories need some"
                )
        else:
            used = taken | set(sparse or []) | set(dense or [])
            unused = [c for c in df.columns if c not in used]
            if unused:  # the columns a user did not list are left out: say which
                rank_zero_info(f"Columns not used as features (not in sparse_features/dense_features/sequence_features): {unused}")
        for c in [*(sparse or []), *(dense or [])]:
            if c in df.columns and _holds_lists(df[c]):
                raise TypeError(
                    f"column {c!r} holds a list per row ({_first_value(df[c])!r}); a list-valued column is a sequence "
                    f"feature: name it in sequence_features (or in ignore_columns)"
                )
        return list(sparse or []), list(dense or []), seq

    # ------------------------------------------------------------------ encoding
    def _encode(self, split: str) -> Any:
        if self.streaming:
            return self._stream_dataset(split)
        if split in self._datasets:
            return self._datasets[split]
        if split == "predict":
            if self._predict_path is not None:
                frame = read_table(self._predict_path, self._predict_text_columns())
            elif self._whole_file_for_predict:
                frame = self._frames["all"]
            else:
                frame = self._frames["test"]
        else:
            frame = self._frames[split]
        if frame is None or len(frame) == 0:
            return None
        x = self.preprocessor.transform(frame)
        if split == "predict":
            y = None  # prediction reads no labels: a label column, complete or not, is left alone
        elif all(c in frame.columns for c in self.labels):
            y = self._labels(frame, split)
        else:
            raise KeyError(f"label column(s) {self.labels} not found in the {split} data")
        ds = TensorDictDataset(x, y)
        validate_batch_tensors(ds.x, self.schema, split)
        self._datasets[split] = ds
        return ds

    def _labels(self, frame: pd.DataFrame, split: str) -> np.ndarray:
        return encode_labels(frame, self.labels, self.task_types, split)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            if self._encode("train") is None:
                raise ValueError("the training split is empty")
            if self._encode("val") is None:
                raise ValueError("the validation split is empty; set split_ratio[1] > 0 or give val_path")
        if stage == "validate" and self._encode("val") is None:
            raise ValueError("the validation split is empty")
        if stage == "test" and self._encode("test") is None:
            raise ValueError("the test split is empty")

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, train: bool = False):
        ds = self._encode(split)
        if ds is None:
            return []
        if self.streaming:
            from .streaming import StreamDataLoader

            return StreamDataLoader(ds, num_workers=self.num_workers)
        if train:
            return make_dataloader(ds, self.batch_size, shuffle=True, seed=self.seed, num_workers=self.num_workers, train=True)
        return make_dataloader(ds, self.eval_batch_size, train=False, num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("predict")

    def dataset(self, split: str) -> Any:
        """The encoded dataset of a split (``train``, ``val``, ``test``, ``predict``); with
        ``streaming=True`` a :class:`~rechub_lightning.data.streaming.ParquetStreamDataset`."""
        return self._encode(split)

    def raw_frame(self, split: str) -> pd.DataFrame | None:
        """The raw (unencoded) rows of a split, in the order the loaders read them.

        With ``streaming=True`` only the columns that are neither features nor labels (ids,
        timestamps...) and the labels are read, so prediction writers can join ids cheaply.
        """
        if self.streaming:
            src = self._stream_source(split)
            if src is None:
                return None
            feats = set(self.preprocessor.columns)
            return src.read_columns([c for c in src.columns if c not in feats])
        if split == "predict":
            if self._predict_path is not None:
                return read_table(self._predict_path, self._predict_text_columns())
            return self._frames["all"] if self._whole_file_for_predict else self._frames["test"]
        return self._frames[split]

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "preprocessor": self.preprocessor.state_dict(),
            "schema": self.schema.to_dict(),
            "task_types": list(self.task_types or []),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pre = self._restored_preprocessor(state_dict["preprocessor"])
        if pre.state_dict() != self.preprocessor.state_dict():
            self.preprocessor = pre
            self.schema = pre.schema(self.labels, self.embed_dim, self._groups)
            self._datasets.clear()
