"""Fitted preprocessing: categories -> ids, dense NaN filling and scaling.

Fitted on the training split only, stored as plain Python (``state_dict``) so it
travels inside Lightning checkpoints and ``predict`` on raw rows encodes exactly as
training did. Id 0 is reserved for padding and unknown values; a value missing in
the data (NaN, empty string) gets its own id when the training data had any.
"""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..features import DenseFeature, FeatureSchema, SequenceFeature, SparseFeature
from .datasets import check_int

__all__ = ["CategoryEncoder", "DenseScaler", "Preprocessor", "DENSE_SCALINGS"]

DENSE_SCALINGS = ("standard", "minmax", "log", "none")


def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype)


def _missing_mask(s: pd.Series) -> np.ndarray:
    miss = s.isna().to_numpy()
    if not _is_numeric(s):
        as_str = s.astype("string")
        miss = miss | (as_str.str.strip() == "").fillna(True).to_numpy(dtype=bool)
    return miss


def _canonical(s: pd.Series, numeric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Keys of a column and its missing mask. Numeric keys are int64 (integer columns) or float64, others strings."""
    miss = _missing_mask(s)
    if numeric:
        if pd.api.types.is_integer_dtype(s.dtype):
            # exact int64 keys: float64 would merge distinct ids from 2**53 on (64-bit hashed ids)
            keys = s.to_numpy(dtype=np.int64, na_value=0) if miss.any() else s.to_numpy(dtype=np.int64)
        elif _is_numeric(s):
            keys = s.to_numpy(dtype=np.float64, na_value=np.nan)
        else:  # the training column was numeric: unparsable values become NaN keys (unknown)
            keys = pd.to_numeric(s.where(~miss), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        return keys, miss
    if _is_numeric(s):
        # Training saw strings: render integral floats without ".0" so 3 and 3.0 and "3" agree.
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        out = np.where(np.isfinite(v) & (v == np.round(v)), pd.Series(v).map(lambda z: "%d" % z if np.isfinite(z) else "").to_numpy(), v.astype(str))
        return out.astype(object), miss
    return s.astype("string").fillna("").to_numpy(dtype=object), miss


_WHOLE = re.compile(r"^-?\d+$")
_WHOLE_POINT = re.compile(r"^(-?\d+)\.0+$")


def _other_spelling(keys: np.ndarray) -> np.ndarray:
    """``"3"`` <-> ``"3.0"``: the other spelling of a whole number in a text key (else ``""``)."""
    out = np.full(len(keys), "", dtype=object)
    for i, k in enumerate(keys.tolist()):
        if isinstance(k, str):
            if _WHOLE.match(k):
                out[i] = k + ".0"
            elif (m := _WHOLE_POINT.match(k)) is not None:
                out[i] = m.group(1)
    return out


class CategoryEncoder:
    """Maps the values of one column to ids ``1..n`` by decreasing frequency; 0 = unknown/padding.

    Args:
        min_freq: values seen fewer times in the training data map to 0 (unknown).
    """

    def __init__(self, min_freq: int = 1) -> None:
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        self.min_freq = int(min_freq)
        self.categories: list[Any] = []
        self.numeric = False
        self.missing_id: int | None = None
        self._index: pd.Index | None = None

    @property
    def vocab_size(self) -> int:
        """Embedding rows needed: categories + missing token + the reserved 0."""
        return len(self.categories) + 1 + (1 if self.missing_id is not None else 0)

    def fit(self, values: pd.Series | Iterable[Any]) -> CategoryEncoder:
        """Fit on all training values at once (same result as ``partial_fit`` chunks + ``finish_fit``)."""
        self._counts = None
        return self.partial_fit(values).finish_fit()

    def partial_fit(self, values: pd.Series | Iterable[Any]) -> CategoryEncoder:
        """Count the values of one chunk; call :meth:`finish_fit` after the last chunk.

        The first chunk decides whether keys are numeric (its dtype); later chunks are
        canonicalised the same way, so any chunking of the same rows gives the same
        vocabulary, ordering and ``min_freq`` cut as one :meth:`fit` call.
        """
        s = values if isinstance(values, pd.Series) else pd.Series(list(values))
        if getattr(self, "_counts", None) is None:
            self.numeric = _is_numeric(s)
            self._counts: Counter | None = Counter()
            self._any_missing = False
        keys, miss = _canonical(s, self.numeric)
        present = pd.Series(keys[~miss])
        if len(present):
            vc = present.value_counts(sort=False)
            self._counts.update(dict(zip(vc.index.tolist(), vc.to_numpy().tolist())))  # type: ignore[union-attr]
        self._any_missing = self._any_missing or bool(miss.any())
        return self

    def finish_fit(self) -> CategoryEncoder:
        """Build the vocabulary from the counts: by decreasing frequency, ties by value."""
        counts = getattr(self, "_counts", None) or Counter()
        any_missing = bool(getattr(self, "_any_missing", False))
        order = sorted((-c, k) for k, c in counts.items() if c >= self.min_freq)
        self.categories = [k.item() if hasattr(k, "item") else k for _, k in order]
        self.missing_id = len(self.categories) + 1 if any_missing else None
        self._index = None
        self._counts = None
        self._any_missing = False
        return self

    def _idx(self) -> pd.Index:
        if self._index is None:
            if self.numeric and all(isinstance(c, int) for c in self.categories):
                dtype: Any = np.int64  # exact beyond 2**53
            else:
                dtype = np.float64 if self.numeric else object
            self._index = pd.Index(np.asarray(self.categories, dtype=dtype))
        return self._index

    def transform(self, values: pd.Series | Iterable[Any]) -> np.ndarray:
        s = values if isinstance(values, pd.Series) else pd.Series(list(values))
        keys, miss = _canonical(s, self.numeric)
        ids = self._idx().get_indexer(keys).astype(np.int64) + 1  # -1 (unknown) -> 0
        unknown = np.flatnonzero((ids == 0) & ~miss)
        if unknown.size and not self.numeric:
            # a whole number fitted as text in one spelling and met in the other: 2.0 in a float
            # column renders "2" but the fitted text was "2.0" (a mixed object column), or the reverse
            alt = _other_spelling(keys[unknown])
            found = self._idx().get_indexer(alt).astype(np.int64) + 1
            ids[unknown] = np.where(alt != "", found, 0)
        if self.missing_id is not None:
            ids[miss] = self.missing_id
        else:
            ids[miss] = 0
        return ids

    def state_dict(self) -> dict[str, Any]:
        return {"min_freq": self.min_freq, "categories": list(self.categories), "numeric": self.numeric, "missing_id": self.missing_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> CategoryEncoder:
        self.min_freq = int(state["min_freq"])
        self.categories = list(state["categories"])
        self.numeric = bool(state["numeric"])
        self.missing_id = state["missing_id"]
        self._index = None
        return self


class _ExactMoments:
    """Count, sum and sum of squares of float64 values, held exactly as integers.

    Each value is ``M * 2**E`` with an integer mantissa ``|M| < 2**53``; mantissas are split
    into 18-bit limbs whose (squared) sums per exponent fit in int64, then combined as Python
    integers scaled by a fixed power of two. The mean and the (population) standard deviation
    are rounded once at the end, so they do not depend on how the values were chunked.
    """

    _SHIFT = 1126  # -(smallest exponent of a subnormal float64 mantissa)
    _LIMB = 18
    _MASK = (1 << 18) - 1
    _MAX_CHUNK = 1 << 24  # keeps the int64 limb sums far from overflow

    def __init__(self) -> None:
        self.n = 0
        self.s = 0  # sum * 2**_SHIFT
        self.q = 0  # sum of squares * 2**(2 * _SHIFT)
        self.lo = math.inf
        self.hi = -math.inf

    def update(self, v: np.ndarray) -> None:
        for start in range(0, v.size, self._MAX_CHUNK):
            self._update(v[start : start + self._MAX_CHUNK])

    def _update(self, v: np.ndarray) -> None:
        if not v.size:
            return
        self.n += int(v.size)
        self.lo = min(self.lo, float(v.min()))
        self.hi = max(self.hi, float(v.max()))
        m, e = np.frexp(v)
        mant = (m * 2.0**53).astype(np.int64)
        exp = e.astype(np.int64) - 53
        order = np.argsort(exp, kind="stable")
        mant, exp = mant[order], exp[order]
        starts = np.flatnonzero(np.r_[True, exp[1:] != exp[:-1]])
        exps = exp[starts].tolist()
        sign = np.sign(mant)
        a = np.abs(mant)
        c = a & self._MASK
        b = (a >> self._LIMB) & self._MASK
        a = a >> (2 * self._LIMB)
        red = lambda x: np.add.reduceat(x, starts).tolist()  # noqa: E731
        sa, sb, sc = red(sign * a), red(sign * b), red(sign * c)
        qa, qab, qmid, qbc, qc = red(a * a), red(2 * a * b), red(2 * a * c + b * b), red(2 * b * c), red(c * c)
        L = self._LIMB
        for i, ex in enumerate(exps):
            total = (sa[i] << (2 * L)) + (sb[i] << L) + sc[i]
            self.s += total << (ex + self._SHIFT)
            sq = (qa[i] << (4 * L)) + (qab[i] << (3 * L)) + (qmid[i] << (2 * L)) + (qbc[i] << L) + qc[i]
            self.q += sq << (2 * (ex + self._SHIFT))

    def result(self) -> tuple[float, float, float, float]:
        """``(mean, std, min, max)``; ``(0, 1, 0, 1)`` without values."""
        if self.n == 0:
            return 0.0, 1.0, 0.0, 1.0
        n = self.n
        mean = self.s / (n << self._SHIFT)  # int / int: correctly rounded
        num, den = self.q * n - self.s * self.s, n * n << (2 * self._SHIFT)
        try:
            std = math.sqrt(max(num / den, 0.0))
        except OverflowError:  # values near the float64 limit: the variance is not a float, its root is
            std = math.exp((math.log(num) - math.log(den)) / 2)
        return float(mean), std, self.lo, self.hi


class DenseScaler:
    """NaN filling and scaling of one numeric column, fitted on training data.

    ``standard``: ``(x - mean) / std``; ``minmax``: to ``[0, 1]`` on the training range;
    ``log``: ``sign(x) log(1 + |x|)`` then standard; ``none``: unchanged. NaN becomes the
    training mean (i.e. 0 after standard scaling). Infinite values are an error.
    """

    def __init__(self, scaling: str = "standard") -> None:
        if scaling not in DENSE_SCALINGS:
            raise ValueError(f"dense_scaling={scaling!r} is not one of {DENSE_SCALINGS}")
        self.scaling = scaling
        self.stats: dict[str, float] = {}

    def _pre(self, v: np.ndarray) -> np.ndarray:
        return np.sign(v) * np.log1p(np.abs(v)) if self.scaling == "log" else v

    def fit(self, v: np.ndarray) -> DenseScaler:
        """Fit on all training values (same statistics as any chunking through ``partial_fit``)."""
        self._moments = None
        return self.partial_fit(v).finish_fit()

    def partial_fit(self, v: np.ndarray) -> DenseScaler:
        """Accumulate one chunk; the sums are exact, so chunking never changes the statistics."""
        v = self._pre(np.asarray(v, dtype=np.float64))
        if getattr(self, "_moments", None) is None:
            self._moments: _ExactMoments | None = _ExactMoments()
        self._moments.update(v[np.isfinite(v)])  # type: ignore[union-attr]
        return self

    def finish_fit(self) -> DenseScaler:
        m = getattr(self, "_moments", None) or _ExactMoments()
        self.n_fitted = m.n  # finite training values seen (0: the column is constant after NaN filling)
        mean, std, lo, hi = m.result()
        self.stats = {"mean": mean, "std": std if std > 0 else 1.0, "min": lo, "max": hi if hi > lo else lo + 1.0}
        self._moments = None
        return self

    def transform(self, v: np.ndarray, name: str = "") -> np.ndarray:
        v = self._pre(np.asarray(v, dtype=np.float64))
        v = np.where(np.isnan(v), self.stats["mean"], v)
        if self.scaling in ("standard", "log"):
            v = (v - self.stats["mean"]) / self.stats["std"]
        elif self.scaling == "minmax":
            v = (v - self.stats["min"]) / (self.stats["max"] - self.stats["min"])
        too_big = np.abs(v) > np.finfo(np.float32).max
        if too_big.any():
            raise ValueError(
                f"dense feature {name!r} has {int(too_big.sum())} value(s) beyond the float32 range after "
                f"dense_scaling={self.scaling!r} (e.g. {float(v[too_big][0]):.3g}); scale it ('standard' or 'log')"
            )
        return v.astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"scaling": self.scaling, "stats": dict(self.stats)}

    def load_state_dict(self, state: Mapping[str, Any]) -> DenseScaler:
        self.scaling = state["scaling"]
        self.stats = dict(state["stats"])
        return self


def _as_numeric_column(df: pd.DataFrame, col: str) -> np.ndarray:
    s = df[col]
    if not (_is_numeric(s) or pd.api.types.is_bool_dtype(s.dtype)):
        conv = pd.to_numeric(s.replace("", np.nan) if s.dtype == object else s, errors="coerce")
        bad = conv.isna() & s.notna() & (s.astype("string").str.strip() != "")
        if bad.any():
            example = s[bad].iloc[0]
            raise TypeError(
                f"dense feature {col!r} must be numeric, found non-numeric value {example!r} "
                f"in {int(bad.sum())} row(s)"
            )
        s = conv
    v = s.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isinf(v).any():
        raise ValueError(f"dense feature {col!r} contains infinite values ({int(np.isinf(v).sum())} row(s))")
    return v


def _as_id_column(df: pd.DataFrame, col: str) -> np.ndarray:
    """An already-encoded sparse column (``preprocess=False``) as int64 ids.

    Missing or fractional values raise: casting would turn NaN into a huge negative id and
    truncate 2.5 to 2, silently.
    """
    try:
        v = _as_numeric_column(df, col)
    except TypeError as e:
        raise TypeError(str(e).replace("dense feature", "sparse feature", 1) + " (preprocess=False expects integer ids)") from None
    if np.isnan(v).any():
        raise ValueError(
            f"sparse feature {col!r} has {int(np.isnan(v).sum())} missing value(s) and preprocessing is off "
            f"(preprocess=False); fill them with an id (e.g. 0) or turn preprocessing on"
        )
    frac = v != np.floor(v)
    if frac.any():
        raise ValueError(
            f"sparse feature {col!r} has non-integer id {v[frac][0]!r} ({int(frac.sum())} row(s)) and preprocessing "
            f"is off (preprocess=False)"
        )
    return v.astype(np.int64)


# ids joined by another separator: numbers joined by commas, semicolons or spaces, or tokens joined by commas
_JOINED = re.compile(r"^-?\d+(?:\s*[,;]\s*|\s+)-?\d+(?:(?:\s*[,;]\s*|\s+)-?\d+)*$|^[^\s,]+(?:,[^\s,]+)+$")
_INT_LIST = re.compile(r"^\s*(?:-?\d+\s*(?:,\s*-?\d+\s*)*,?)?\s*$")  # "3, 17, 5" (a written Python list)
_ARRAY_LIST = re.compile(r"^\s*(?:-?\d+(?:\s+-?\d+)*)?\s*$")  # "3 17  5" (a written NumPy array)


def _written_list(text: str) -> list[Any] | None:
    """``"[3, 17, 5]"`` (a list column written to CSV by pandas), ``"[ 3 17  5]"`` (a NumPy array
    column) or ``"['a', 'b']"`` -> the list; ``None`` when the text is not a written flat list."""
    inner = text[1:-1]
    if _INT_LIST.match(inner):
        return [int(t) for t in inner.split(",") if t.strip()]
    if _ARRAY_LIST.match(inner):
        return [int(t) for t in inner.split()]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if isinstance(value, (list, tuple)) and not any(isinstance(t, (list, tuple, dict, set)) for t in value):
        return list(value)
    return None


def _pad_forms(pad: Any) -> set[Any]:
    """``pad`` as it may be written: ``0``, ``"0"`` (text histories) alike."""
    forms = {pad, str(pad)}
    if isinstance(pad, str) and _WHOLE.match(pad.strip()):
        forms.add(int(pad))
    return forms


def _split_sequence(values: pd.Series, sep: str, pad: Any = None, warned: set[Any] | None = None) -> list[list[Any]]:
    """One list of items per row: lists/arrays as they are, strings split on ``sep`` (or parsed when
    they are written lists, ``"[3, 17, 5]"``; spaces around the items are dropped), missing values
    empty, scalars one item. Items equal to ``pad`` (as written: ``0`` and ``"0"`` alike) are dropped."""
    out = []
    pads = None if pad is None else _pad_forms(pad)
    unsplit: str | None = None  # a string that looks joined by another separator
    any_sep = False
    for v in values.tolist():
        if isinstance(v, str):
            text = v.strip()
            seq = _written_list(text) if len(text) >= 2 and text[0] == "[" and text[-1] == "]" else None
            if seq is None:
                if sep in text:
                    any_sep = True
                elif unsplit is None and _JOINED.match(text):
                    unsplit = text
                # "i1 | i2" and "i1, i2" mean items "i1" and "i2": the spaces around a separator
                # are layout, and a kept " i2" would be another item than the target column's "i2"
                seq = [t for t in (t.strip() for t in v.split(sep)) if t != ""]
        elif v is None or (isinstance(v, float) and np.isnan(v)):
            seq = []
        elif np.ndim(v) == 1:
            seq = list(v)
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            seq = [int(v)]  # a column whose every row holds one item is read as numbers: "7" -> 7
        elif isinstance(v, (float, np.floating)) and float(v).is_integer():
            seq = [int(v)]  # ... or as floats when some rows are empty
        else:
            raise TypeError(
                f"sequence feature {values.name!r} must hold a list of ids (or a string joined by {sep!r}) per row, "
                f"found {v!r}"
            )
        if pads is not None:
            seq = [t for t in seq if t not in pads]
        out.append(seq)
    warned = set() if warned is None else warned
    if unsplit is not None and not any_sep and values.name not in warned:
        # each such string becomes one item; a warning (not an error): an item may hold a comma
        warned.add(values.name)
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"sequence feature {values.name!r} holds strings such as {unsplit[:80]!r} and none is joined by the "
            f"sequence separator {sep!r}: each is read as ONE item; if they are lists, pass sequence_sep with the "
            f"separator the data uses (e.g. ',') or join the ids with {sep!r}"
        )
    return out


class Preprocessor:
    """Column-wise preprocessing of a data frame into model-ready arrays plus a feature schema.

    Args:
        sparse: categorical columns (encoded to ids).
        dense: numeric columns (filled and scaled).
        sequence: list-valued columns (lists, arrays, or strings joined by ``sequence_sep``)
            mapped to ``{column: shared_with or None}``; a sequence sharing another column's
            vocabulary (e.g. ``hist_item_id`` -> ``item_id``) uses that column's encoder.
        min_freq: minimum training frequency of a category (rarer values map to 0).
        dense_scaling: one of ``standard``, ``minmax``, ``log``, ``none``.
        encode: ``False`` when the categorical columns already hold ids (then vocabulary
            sizes must be given through ``vocab_sizes`` or are taken as ``max + 1``).
        max_len: padded length of sequences (post-padding, keeping the most recent items).
        sequence_sep: separator of sequences stored as strings (``"3|17|5"``).
        sequence_pad_value: a value that marks padding inside list-valued input (e.g. 0 in
            the output of :func:`generate_seq_feature`); it is dropped before encoding.
    """

    def __init__(
        self,
        sparse: Sequence[str] = (),
        dense: Sequence[str] = (),
        sequence: Mapping[str, str | None] | Sequence[str] = (),
        min_freq: int = 1,
        dense_scaling: str = "standard",
        encode: bool = True,
        vocab_sizes: Mapping[str, int] | None = None,
        max_len: int = 50,
        sequence_sep: str = "|",
        sequence_pad_value: Any = None,
    ) -> None:
        self.sparse = list(sparse)
        self.dense = list(dense)
        self.sequence = dict(sequence) if isinstance(sequence, Mapping) else {c: None for c in sequence}
        self.min_freq = min_freq
        self.dense_scaling = dense_scaling
        if dense_scaling not in DENSE_SCALINGS:
            raise ValueError(f"dense_scaling={dense_scaling!r} is not one of {DENSE_SCALINGS}")
        self.encode = encode
        self.vocab_sizes = dict(vocab_sizes or {})
        self.max_len = check_int(max_len, "max_len")  # the padded length of sequence features
        self.sequence_sep = sequence_sep
        self.sequence_pad_value = sequence_pad_value
        self.encoders: dict[str, CategoryEncoder] = {}
        self.scalers: dict[str, DenseScaler] = {}
        self.fitted = False

    @property
    def columns(self) -> list[str]:
        return self.sparse + self.dense + list(self.sequence)

    def check_columns(self, df: pd.DataFrame, what: str = "data") -> None:
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise KeyError(f"feature column(s) {missing} not found in {what}; available columns: {list(df.columns)}")

    def check_dtypes(self, df: pd.DataFrame, what: str = "data") -> None:
        """Fail early on dense columns holding text or infinities (all rows, not only training rows),
        and, with preprocessing off, on ids that are missing, fractional or outside the vocabulary."""
        self.check_columns(df, what)
        for col in self.dense:
            _as_numeric_column(df, col)  # raises on text and on infinite values
        if not self.encode and self.fitted:
            for col in self.sparse:
                ids = _as_id_column(df, col)  # raises on missing and fractional ids
                vocab = self.vocab_size(col)
                bad = ids[(ids < 0) | (ids >= vocab)]
                if bad.size:
                    raise ValueError(
                        f"sparse feature {col!r} in {what} has id {int(bad[0])} outside [0, {vocab}) (vocab_size={vocab}; "
                        f"preprocess=False uses the ids as they are)"
                    )

    def fit(self, df: pd.DataFrame) -> Preprocessor:
        """Fit on the whole training frame: :meth:`partial_fit` on one chunk + :meth:`finish_fit`."""
        self._partial = None
        return self.partial_fit(df).finish_fit()

    def partial_fit(self, df: pd.DataFrame) -> Preprocessor:
        """Accumulate the statistics of one chunk of training rows (streaming fit).

        Call it once per chunk (e.g. per Parquet row group), then :meth:`finish_fit`. Any
        chunking of the same rows gives exactly the vocabularies (``min_freq`` cut and id
        order included) and scaling statistics of :meth:`fit` on all rows.
        """
        self.check_columns(df, "training data")
        if getattr(self, "_partial", None) is None:
            self.scalers = {col: DenseScaler(self.dense_scaling) for col in self.dense}
            self.encoders = {}
            self._partial: dict[str, Any] | None = {"max": {}}
            self.fitted = False
            if self.encode:
                for col in self.sparse:
                    self.encoders[col] = CategoryEncoder(self.min_freq)
                for col, shared in self.sequence.items():
                    if shared is None:
                        self.encoders[col] = CategoryEncoder(self.min_freq)
                    elif shared not in self.sparse:
                        raise ValueError(
                            f"sequence feature {col!r} shares the vocabulary of {shared!r}, which is not a sparse feature"
                        )
        for col in self.dense:
            self.scalers[col].partial_fit(_as_numeric_column(df, col))
        if self.encode:
            for col in self.sparse:
                # A vocabulary shared with sequences (target item / item history) covers both.
                values = df[col]
                self.encoders[col].partial_fit(values)
                for c in [c for c, owner in self.sequence.items() if owner == col]:
                    flat = [t for seq in self._seqs(df[c]) for t in seq]
                    if not flat:
                        continue
                    try:
                        items = pd.Series(flat, dtype=values.dtype)
                    except (TypeError, ValueError) as e:
                        raise ValueError(
                            f"sequence feature {c!r} shares the vocabulary of {col!r} ({values.dtype} values) but holds "
                            f"items such as {flat[0]!r} that are not {values.dtype}: {e}"
                        ) from None
                    self.encoders[col].partial_fit(items)
                    self._count_padding_zeros(c, items, values)
            for col, shared in self.sequence.items():
                if shared is None:
                    flat = [t for seq in self._seqs(df[col]) for t in seq]
                    if flat:
                        self.encoders[col].partial_fit(pd.Series(flat))
        else:
            mx = self._partial["max"]  # type: ignore[index]
            for col in self.sparse:
                if col not in self.vocab_sizes and len(df):
                    m = pd.to_numeric(df[col]).max()
                    if pd.notna(m):
                        mx[col] = max(mx.get(col, -math.inf), float(m))
            for col, shared in self.sequence.items():
                if shared is None and col not in self.vocab_sizes:
                    flat = [t for seq in self._seqs(df[col]) for t in seq]
                    mx[col] = max(mx.get(col, 0.0), float(max(flat, default=0)))
        return self

    def _count_padding_zeros(self, seq_col: str, items: pd.Series, target: pd.Series) -> None:
        """Count history items equal to 0 and whether the target column ever is 0 (see finish_fit)."""
        if self.sequence_pad_value is not None or not _is_numeric(items):
            return
        zeros = self._partial.setdefault("zeros", {})  # type: ignore[union-attr]
        n_zero, n_items, target_zero = zeros.get(seq_col, (0, 0, False))
        zeros[seq_col] = (
            n_zero + int((items == 0).sum()), n_items + len(items), target_zero or bool((target == 0).any()),
        )

    def _warn_padding_zeros(self) -> None:
        for col, (n_zero, n_items, target_zero) in (self._partial or {}).get("zeros", {}).items():
            if n_zero and not target_zero:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"sequence feature {col!r} holds the item 0 ({n_zero} of {n_items} items) that {self.sequence[col]!r} "
                    f"never takes: it is encoded as an item; if 0 pads the histories (as in generate_seq_feature's "
                    f"output), pass sequence_pad_value=0"
                )

    def finish_fit(self) -> Preprocessor:
        """Turn the accumulated statistics into the fitted state."""
        partial = getattr(self, "_partial", None)
        if partial is None:
            raise RuntimeError("Preprocessor.finish_fit called before partial_fit")
        self._warn_padding_zeros()
        for scaler in self.scalers.values():
            scaler.finish_fit()
        empty = [col for col, scaler in self.scalers.items() if scaler.n_fitted == 0]
        if empty:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"dense feature(s) {empty} have no value in the training data (all missing): NaN filling makes "
                "them constant, so the model learns nothing from them; check the column or drop it (ignore_columns)"
            )
        for enc in self.encoders.values():
            enc.finish_fit()
        if not self.encode:
            for col in self.sparse:
                if col not in self.vocab_sizes:
                    if col not in partial["max"]:
                        raise ValueError(f"sparse feature {col!r} has no id in the training data (preprocess=False)")
                    self.vocab_sizes[col] = int(partial["max"][col]) + 1
            for col, shared in self.sequence.items():
                if shared is None and col not in self.vocab_sizes:
                    self.vocab_sizes[col] = int(partial["max"].get(col, 0)) + 1
        self._partial = None
        self.fitted = True
        return self

    def _seqs(self, values: pd.Series) -> list[list[Any]]:
        warned = self.__dict__.setdefault("_warned_joined", set())  # once per column and preprocessor
        return _split_sequence(values, self.sequence_sep, self.sequence_pad_value, warned)

    def vocab_size(self, col: str) -> int:
        owner = self.sequence.get(col) or col
        if self.encode:
            return self.encoders[owner].vocab_size
        return int(self.vocab_sizes[owner])

    def transform(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        if not self.fitted:
            raise RuntimeError("Preprocessor.transform called before fit/load_state_dict")
        self.check_columns(df)
        out: dict[str, np.ndarray] = {}
        for col in self.dense:
            values = _as_numeric_column(df, col)
            if not self.encode and np.isnan(values).any():
                raise ValueError(
                    f"dense feature {col!r} has {int(np.isnan(values).sum())} NaN value(s) and preprocessing is off "
                    f"(preprocess=False); fill them or turn preprocessing on (NaN -> training mean)"
                )
            out[col] = self.scalers[col].transform(values, col)
        for col in self.sparse:
            if self.encode:
                out[col] = self.encoders[col].transform(df[col])
            else:
                out[col] = _as_id_column(df, col)
        for col, shared in self.sequence.items():
            seqs = self._seqs(df[col])
            arr = np.zeros((len(seqs), self.max_len), dtype=np.int64)
            enc = self.encoders[shared or col] if self.encode else None
            lengths = np.array([min(len(s), self.max_len) for s in seqs])
            flat = [t for s in seqs for t in s[-self.max_len :]]
            ids = enc.transform(pd.Series(flat)) if enc is not None else np.asarray(flat, dtype=np.int64)
            pos = 0
            for r, n in enumerate(lengths):
                arr[r, :n] = ids[pos : pos + n]
                pos += n
            out[col] = arr
        return out

    def schema(self, labels: Sequence[str], embed_dim: int | None = 16, groups: dict[str, list[str]] | None = None) -> FeatureSchema:
        """The feature schema these columns produce (ids padded/unknown at 0)."""
        feats: list[Any] = []
        for col in self.dense:
            feats.append(DenseFeature(col))
        for col in self.sparse:
            feats.append(SparseFeature(col, self.vocab_size(col), embed_dim, padding_idx=0))
        for col, shared in self.sequence.items():
            feats.append(
                SequenceFeature(col, self.vocab_size(col), embed_dim, pooling="mean", shared_with=shared, padding_idx=0)
            )
        return FeatureSchema(feats, labels, groups)

    def state_dict(self) -> dict[str, Any]:
        return {
            "sparse": self.sparse,
            "dense": self.dense,
            "sequence": self.sequence,
            "min_freq": self.min_freq,
            "dense_scaling": self.dense_scaling,
            "encode": self.encode,
            "vocab_sizes": self.vocab_sizes,
            "max_len": self.max_len,
            "sequence_sep": self.sequence_sep,
            "sequence_pad_value": self.sequence_pad_value,
            "encoders": {k: v.state_dict() for k, v in self.encoders.items()},
            "scalers": {k: v.state_dict() for k, v in self.scalers.items()},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Preprocessor:
        p = cls(
            state["sparse"], state["dense"], state["sequence"], state["min_freq"], state["dense_scaling"],
            state["encode"], state["vocab_sizes"], state["max_len"], state["sequence_sep"],
            state.get("sequence_pad_value"),
        )
        p.encoders = {k: CategoryEncoder().load_state_dict(v) for k, v in state["encoders"].items()}
        p.scalers = {k: DenseScaler().load_state_dict(v) for k, v in state["scalers"].items()}
        p.fitted = True
        return p
