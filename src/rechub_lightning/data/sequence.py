"""Sequence features, padding and negative sampling: Torch-RecHub's data helpers, vectorised.

The functions keep the names, arguments, output columns and dtypes of
``torch_rechub.utils.data`` / ``torch_rechub.utils.match`` (0.9.0), so code written
for the reference runs unchanged, and they add an optional ``seed``:

* ``generate_seq_feature`` draws its negatives and shuffles exactly as the reference
  does with Python's :mod:`random`. With ``seed=s`` it uses ``random.Random(s)``,
  which is the same stream as ``random.seed(s)`` before the reference call; with
  ``seed=None`` it consumes the global :mod:`random` state like the reference. The
  rejection sampling is reproduced word for word from the Mersenne Twister stream
  (``getrandbits``), but decided with numpy over whole blocks of users.
* ``generate_seq_feature_match`` draws its negatives with numpy's legacy
  ``RandomState`` (``np.random.seed(s)`` for the reference, ``RandomState(s)`` here)
  and shuffles with :mod:`random`, as the reference does.

Deliberate differences from the reference (each one fixes a defect of it):

1. **The caller's frame is not sorted.** The reference sorts ``data`` in place in
   ``generate_seq_feature_match``; here it is left alone. ``generate_seq_feature``
   label-encodes its columns in place as the reference does (its examples read the
   vocabulary sizes from the encoded frame); ``inplace=False`` turns that off.
2. **Stable time sort.** The reference sorts by time with pandas' default
   quicksort, which is not stable: events of one user with equal timestamps land in
   an order that depends on the sort implementation (numpy's SIMD sorts differ by
   CPU). Here ties keep their input order, the same on every machine. Given input
   already in the reference's sorted order, both produce identical rows.
3. **``max_len`` truncates the history, not the user.** The reference only ever
   looks at a user's *first* ``max_len`` events (``range(1, min(len, max_len))``):
   a user with more than ``max_len`` events gets no validation or test row and his
   recent behaviour is dropped, and histories never exceed ``max_len - 1`` items.
   Here every position ``i >= 1`` makes a row whose history is the last
   ``min(i, max_len)`` items (left-aligned, zero-padded on the right as in the
   reference), the last position goes to test and the one before to validation.
   For users with at most ``max_len`` events the rows are identical.
4. **No infinite loop.** A user who clicked every item has no valid negative; the
   reference loops forever, here a ``ValueError`` names the user.
5. **Match negatives never equal the row's positive** (REFERENCE.md defect 8). The
   reference's popularity draws can hit the positive item; those draws are redrawn
   here from the same distribution (with the same ``RandomState``) until they
   differ. All other negatives are exactly the reference's.
6. **``sample_method=3`` (RALM / log-uniform)** uses the popularity *rank* ``k``
   (0 = most frequent) in ``p(k) = log((k+2)/(k+1)) / log(N+1)``, as in RALM and
   TensorFlow's log-uniform candidate sampler, and samples with replacement. The
   reference plugs the item *count* into the formula, which favours rare items, and
   samples without replacement, which raises whenever more negatives than items
   are requested (always, inside ``generate_seq_feature_match``).
7. ``generate_seq_feature_match`` no longer fails with ``UnboundLocalError`` when no
   user yields a training row, validates ``mode``/``sample_method`` up front and
   raises ``ValueError`` instead of ``assert``.
8. ``create_seq_features`` keeps the reference's rows (only a user's first ``max_len``
   events, the stable (user, time) sort) but not its leak: the reference appends every test
   row to train as well. Its random draws are the reference's, so after the same seed the
   validation and test frames are equal and train lacks exactly those rows.

Negative sampling ``randint(1, n_items)`` over the 1-based encoded ids is correct in
the reference (ids are exactly ``1..n_items``) and is kept.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .datasets import check_int

__all__ = [
    "pad_sequences",
    "generate_seq_feature",
    "create_seq_features",
    "df_to_dict",
    "array_replace_with_dict",
    "neg_sample",
    "negative_sample",
    "generate_seq_feature_match",
    "gen_model_input",
]

_SAMPLE_METHODS = (0, 1, 2, 3)
_MODES = (0, 1, 2)


# --------------------------------------------------------------------------- helpers


def _py_rng(seed: int | random.Random | None) -> Any:
    """The Python RNG to consume: ``random.Random(seed)``, a given instance, or the global one."""
    if seed is None:
        return random  # the module-level functions share the global instance
    if isinstance(seed, random.Random):
        return seed
    return random.Random(seed)


def _np_rng(seed: int | np.random.RandomState | np.random.Generator | None) -> Any:
    """The numpy RNG: ``RandomState(seed)``, a given generator, or the global legacy state."""
    if seed is None:
        return np.random  # module-level functions use the global RandomState, like the reference
    if isinstance(seed, (np.random.RandomState, np.random.Generator)):
        return seed
    return np.random.RandomState(seed)


def _shuffle_perm(rng: Any, n: int) -> np.ndarray:
    """The permutation ``rng.shuffle`` applies to any list of length ``n``.

    ``random.shuffle`` consumes the generator the same way whatever the contents, so
    shuffling ``range(n)`` and indexing the rows with it equals shuffling the rows.
    """
    idx = list(range(n))
    rng.shuffle(idx)
    return np.asarray(idx, dtype=np.int64)


def _require_columns(data: pd.DataFrame, cols: Iterable[str]) -> None:
    missing = [c for c in cols if c not in data.columns]
    if missing:
        raise ValueError(f"data has no column(s) {missing}; columns are {list(data.columns)}")


def _time_kind(v: Any) -> str:
    if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        return "number"
    return "text" if isinstance(v, str) else type(v).__name__


def time_order_key(s: pd.Series, name: str | None = None) -> pd.Series:
    """Values that sort as the times of column ``s``: numbers and datetimes as they are, text
    parsed as numbers (``"998"`` before ``"1000"``) or else as dates (``"12/30/2021"`` before
    ``"01/02/2022"``; month first when ambiguous). Missing times, text that is neither, and a mix
    of numbers and text (a text ``"50"`` would sort after the number 100) are errors."""
    name = s.name if name is None else name
    if s.isna().any():
        raise ValueError(f"time column {name!r} has {int(s.isna().sum())} missing value(s)")
    if s.dtype == object and len(s):
        examples: dict[str, Any] = {}
        for v in s.tolist():
            examples.setdefault(_time_kind(v), v)
        if len(examples) > 1:
            raise TypeError(
                f"time column {name!r} mixes {sorted(examples)} values (e.g. {examples}), which do not sort as times; "
                f"convert it to one type (e.g. pd.to_numeric or pd.to_datetime)"
            )
    if not (s.dtype == object or pd.api.types.is_string_dtype(s.dtype)) or len(s) == 0:
        return s
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().all():
        return num
    try:
        try:
            return pd.to_datetime(s)  # one format, inferred from the first value (vectorised)
        except (ValueError, TypeError):
            return pd.to_datetime(s, format="mixed")  # e.g. "2022-01-01T10:00" and "2022-01-01 09:00"
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(
            f"time column {name!r} holds text that is neither numbers nor dates (e.g. {s.iloc[0]!r}: {e}); text "
            f"would sort alphabetically, not in time order: convert it (pd.to_numeric / pd.to_datetime with a format)"
        ) from None


def _check_items(data: pd.DataFrame, item_col: str) -> None:
    """Refuse interactions whose item is missing: it would become a pseudo-item, trained on and
    sampled as a negative (the times are checked where they are sorted, :func:`time_order_key`)."""
    n_missing = int(data[item_col].isna().sum())
    if n_missing:
        raise ValueError(f"item column {item_col!r} has {n_missing} missing value(s); drop those rows or fill them")


def _codes(s: pd.Series) -> np.ndarray:
    """1-based ids in sorted value order (= sklearn ``LabelEncoder`` + 1, as the reference)."""
    return pd.factorize(s, sort=True, use_na_sentinel=False)[0].astype(np.int64) + 1


def _stable_time_order(s: pd.Series) -> np.ndarray:
    """Row order sorted by time, ties kept in input order (text parsed as numbers or dates)."""
    s = time_order_key(s)
    if pd.api.types.is_numeric_dtype(s.dtype):
        return np.argsort(s.to_numpy(), kind="stable")
    return np.argsort(_codes(s), kind="stable")


def _infer_like_lists(arr: np.ndarray) -> np.ndarray:
    """The dtype pandas infers from the Python scalars the reference puts in its row lists."""
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind == "i" or (arr.dtype.kind == "u" and arr.dtype.itemsize < 8):
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        return arr.astype(np.float64, copy=False)
    return arr


def _isin_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    pos = np.searchsorted(sorted_keys, keys)
    pos[pos == len(sorted_keys)] = 0
    return sorted_keys[pos] == keys


def _draw_words(rng: Any, m: int) -> np.ndarray:
    """The next ``m`` 32-bit outputs of a Python Mersenne Twister, in generation order."""
    if m <= 0:
        return np.empty(0, dtype=np.uint32)
    # getrandbits(32 m) fills its result with m words, the first generated least significant.
    return np.frombuffer(rng.getrandbits(32 * m).to_bytes(4 * m, "little"), dtype="<u4")


def _skip_words(rng: Any, m: int) -> None:
    chunk = 1 << 20
    while m > 0:
        step = min(m, chunk)
        rng.getrandbits(32 * step)
        m -= step


class _WordStream:
    """Lazily drawn Mersenne Twister words with a consumption pointer.

    Words are drawn ahead in bulk; ``close`` rewinds the generator and advances it by
    exactly the number of words consumed, leaving it where the reference's sequence of
    ``randint`` calls would have left it.
    """

    def __init__(self, rng: Any) -> None:
        self.rng = rng
        self.state = rng.getstate()
        self.buf = np.empty(0, dtype=np.uint32)
        self.base = 0  # global index of buf[0]
        self.pos = 0  # next unconsumed word (global index)

    def window(self, m: int) -> np.ndarray:
        """At least ``m`` words starting at the consumption pointer (not consumed)."""
        end = self.pos + m
        have = self.base + len(self.buf)
        if have < end:
            keep = self.buf[self.pos - self.base:]
            extra = max(end - have, len(keep), 4096)
            self.buf = np.concatenate([keep, _draw_words(self.rng, extra)])
            self.base = self.pos
        start = self.pos - self.base
        return self.buf[start:start + m]

    def close(self) -> None:
        self.rng.setstate(self.state)
        _skip_words(self.rng, self.pos)


def _draw_history_negatives(
    rng: Any,
    need: np.ndarray,
    hist_keys: np.ndarray,
    n_distinct: np.ndarray,
    n_items: int,
    user_labels: np.ndarray,
) -> np.ndarray:
    """Negatives exactly as the reference's ``neg_sample`` loop draws them.

    User ``u`` (in order) draws ``need[u]`` items with ``randint(1, n_items)``, redrawing
    while the item is in his history. ``randint(1, n)`` is ``1 + getrandbits(k)`` with
    ``k = n.bit_length()``, redrawn while ``>= n``; ``getrandbits(k)`` is the next 32-bit
    word shifted right by ``32 - k``. So every word either yields the next negative of
    the current user or is rejected, and the decision only depends on the word and the
    user. Blocks of users are decided at once assuming no history hit, and repaired
    from the first user that has one.

    Args:
        rng: a ``random.Random`` or the :mod:`random` module.
        need: negatives per user, in sampling order.
        hist_keys: sorted ``user_index * (n_items + 1) + item`` of every (user, item) clicked.
        n_distinct: number of distinct items per user.
        n_items: ids are ``1..n_items``.
        user_labels: user ids for error messages.

    Returns:
        int64 array of ``need.sum()`` negatives, user after user.
    """
    n_users = len(need)
    total = int(need.sum())
    out = np.empty(total, dtype=np.int64)
    if total == 0:
        return out
    full = (n_distinct >= n_items) & (need > 0)
    if full.any():
        u = int(np.flatnonzero(full)[0])
        raise ValueError(
            f"user {user_labels[u]!r} interacted with all {n_items} items: no negative item can be sampled"
        )
    k = int(n_items).bit_length()
    if k > 32:
        raise ValueError(f"n_items={n_items} exceeds the 2**32 ids randint sampling supports here")
    shift = np.uint32(32 - k)
    accept = n_items / float(1 << k)
    stride = n_items + 1
    offs = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(need, out=offs[1:])
    words = _WordStream(rng)
    u, block = 0, 64
    while u < n_users:
        ub = min(n_users, u + block)
        lo, hi = int(offs[u]), int(offs[ub])
        want = hi - lo
        est = int(want / accept * 1.1) + 64
        while True:
            r = words.window(est) >> shift
            vpos = np.flatnonzero(r < n_items)
            if len(vpos) >= want:
                break
            est *= 2
        vpos = vpos[:want]
        cand = r[vpos].astype(np.int64) + 1
        owner = np.repeat(np.arange(u, ub, dtype=np.int64), need[u:ub])
        bad = _isin_sorted(owner * stride + cand, hist_keys)
        if not bad.any():
            out[lo:hi] = cand
            words.pos += int(vpos[-1]) + 1
            u = ub
            block = min(block * 2, 1 << 16)
            continue
        # Users before the first one with a history hit are decided correctly.
        bu = int(owner[int(np.argmax(bad))])
        m = int(offs[bu]) - lo
        if m:
            out[lo:lo + m] = cand[:m]
            words.pos += int(vpos[m - 1]) + 1
        # That user, exactly: a word is good when in range and not in his history.
        c = int(need[bu])
        free = 1.0 - n_distinct[bu] / n_items
        est = int(c / (accept * free) * 1.2) + 64
        while True:
            r = words.window(est) >> shift
            cand = r.astype(np.int64) + 1
            good = (r < n_items) & ~_isin_sorted(bu * stride + cand, hist_keys)
            gpos = np.flatnonzero(good)
            if len(gpos) >= c:
                break
            est *= 2
        gpos = gpos[:c]
        out[int(offs[bu]):int(offs[bu + 1])] = cand[gpos]
        words.pos += int(gpos[-1]) + 1
        block = max(16, 2 * (bu - u + 1))
        u = bu + 1
    words.close()
    return out


# --------------------------------------------------------------------------- padding


def _checked_cast(values: np.ndarray, dtype: Any, what: str = "sequences") -> np.ndarray:
    """``values`` as ``dtype``; an integer ``dtype`` refuses values it would change (wrapped ids
    from 2**31 on under int32, truncated fractions) instead of casting them silently."""
    target = np.dtype(dtype)
    if target.kind not in "iu" or values.dtype == target or values.size == 0:
        return values.astype(target, copy=False)
    if values.dtype == object:
        values = np.asarray(values.tolist())  # its values' own type (ints, floats)
    if values.dtype.kind not in "iubf":
        raise ValueError(f"{what} hold values that are not integer ids (e.g. {values.reshape(-1)[0]!r}) for dtype={target.name}")
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.floor(values))
        if bad.any():
            raise ValueError(f"{what} hold non-integer value {values[bad][0].item()!r}; dtype={target.name} would truncate it")
    info = np.iinfo(target)
    bad = (values < info.min) | (values > info.max)
    if bad.any():
        raise ValueError(
            f"{what} hold id {values[bad][0].item()!r} outside the range of dtype={target.name} [{info.min}, {info.max}]; "
            f"pass dtype='int64'"
        )
    return values.astype(target)


def pad_sequences(
    sequences: Iterable[Sequence[Any]] | np.ndarray,
    maxlen: int | None = None,
    dtype: Any = "int32",
    padding: str = "pre",
    truncating: str = "pre",
    value: Any = 0.0,
) -> np.ndarray:
    """Pads (and truncates) sequences to one length, like Keras' ``pad_sequences``.

    Args:
        sequences: an iterable of sequences (lists, tuples, 1-D arrays, a pandas
            Series of lists) or a 2-D array.
        maxlen: output length; the longest sequence's length when ``None``.
        dtype: output dtype.
        padding: ``"pre"`` pads on the left (values right-aligned), ``"post"`` on the right.
        truncating: ``"pre"`` keeps the last ``maxlen`` values, ``"post"`` the first.
        value: the padding value.

    Returns:
        Array of shape ``(len(sequences), maxlen)``.

    Raises:
        ValueError: ``padding`` or ``truncating`` is not ``"pre"``/``"post"``, ``maxlen``
            is negative, or an element is not a sequence.
    """
    if padding not in ("pre", "post"):
        raise ValueError(f"padding must be 'pre' or 'post', got padding={padding!r}")
    if truncating not in ("pre", "post"):
        raise ValueError(f"truncating must be 'pre' or 'post', got truncating={truncating!r}")
    if maxlen is not None:
        maxlen = int(maxlen)
        if maxlen < 0:
            raise ValueError(f"maxlen must be >= 0, got maxlen={maxlen}")

    if isinstance(sequences, np.ndarray) and sequences.ndim == 2 and sequences.dtype != object:
        n, width = sequences.shape
        maxlen = width if maxlen is None else maxlen
        keep = min(width, maxlen)
        arr = np.full((n, maxlen), value, dtype=dtype)
        if keep:
            src = sequences[:, width - keep:] if truncating == "pre" else sequences[:, :keep]
            src = _checked_cast(src, arr.dtype)
            if padding == "pre":
                arr[:, maxlen - keep:] = src
            else:
                arr[:, :keep] = src
        return arr

    seqs = list(sequences.tolist() if isinstance(sequences, np.ndarray) and sequences.ndim == 1 and
                sequences.dtype != object else sequences)
    n = len(seqs)
    try:
        lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=n)
    except TypeError:
        bad = next(i for i, x in enumerate(seqs) if not hasattr(x, "__len__"))
        raise ValueError(f"sequences[{bad}] is not a sequence: {seqs[bad]!r}") from None
    if maxlen is None:
        maxlen = int(lengths.max()) if n else 0
    arr = np.full((n, maxlen), value, dtype=dtype)
    if n == 0 or maxlen == 0:
        return arr
    kept = lengths.clip(max=maxlen)
    if (lengths > maxlen).any():
        if truncating == "pre":
            seqs = [x[-maxlen:] if len(x) > maxlen else x for x in seqs]
        else:
            seqs = [x[:maxlen] if len(x) > maxlen else x for x in seqs]
    total = int(kept.sum())
    if total == 0:
        return arr
    if all(isinstance(x, np.ndarray) for x in seqs):
        flat = np.concatenate([x.reshape(-1) for x in seqs])
    else:
        flat = np.asarray(list(chain.from_iterable(seqs)))
    flat = _checked_cast(flat, arr.dtype) if flat.dtype.kind in "iufbO" else flat.astype(arr.dtype, copy=False)
    if flat.shape != (total,):
        raise ValueError("sequences must be flat sequences of scalars")
    rows = np.repeat(np.arange(n), kept)
    within = np.arange(total) - np.repeat(np.cumsum(kept) - kept, kept)
    cols = within + np.repeat(maxlen - kept, kept) if padding == "pre" else within
    arr[rows, cols] = flat
    return arr


# --------------------------------------------------------------------------- ranking sequences


def neg_sample(click_hist: Iterable[Any], item_size: int, rng: random.Random | None = None) -> int:
    """One random item id in ``1..item_size`` that is not in ``click_hist``.

    Consumes the generator exactly like the reference's ``neg_sample`` (``randint``
    until the draw is not in the history), but tests membership in a set.

    Args:
        click_hist: the user's clicked item ids.
        item_size: ids are ``1..item_size``.
        rng: a ``random.Random``; the global :mod:`random` state when ``None``.

    Returns:
        The sampled item id.

    Raises:
        ValueError: every id ``1..item_size`` is in ``click_hist``.
    """
    hist = set(click_hist)
    if sum(1 for x in hist if isinstance(x, (int, np.integer)) and 1 <= x <= item_size) >= item_size:
        raise ValueError(f"all {item_size} items are in the click history: no negative item can be sampled")
    gen = _py_rng(rng)
    neg = gen.randint(1, item_size)
    while neg in hist:
        neg = gen.randint(1, item_size)
    return neg


class _Events(NamedTuple):
    """A frame's events as 1-based codes, grouped by user (in id order) and sorted by time."""

    uids: np.ndarray  # code of each kept user
    lens: np.ndarray  # events per kept user
    uidx: np.ndarray  # per event: index of its user in ``uids``
    pos: np.ndarray  # per event: position within its user
    items: np.ndarray  # per event: item code
    attrs: dict[str, np.ndarray]  # per event: attribute codes
    negs: np.ndarray  # per event: one sampled negative item
    item2attr: dict[str, np.ndarray]  # item code -> attribute code of the item's last input row


def _check_max_len(max_len: int) -> int:
    max_len = int(max_len)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got max_len={max_len}")
    return max_len


def _encode_in_place(data: pd.DataFrame) -> None:
    """Replace every column by its 1-based codes (the reference's ``LabelEncoder`` + 1, in place)."""
    for c in list(data.columns):
        data[c] = _codes(data[c])


def _user_events(
    data: pd.DataFrame,
    user_col: str,
    item_col: str,
    time_col: str,
    attrs: Sequence[str],
    min_len: int,
    rng: Any,
    first_n: int | None = None,
) -> _Events:
    """Encode, sort by (user, time), drop users with fewer than ``min_len`` events, keep each
    user's first ``first_n`` events (all when ``None``) and draw one negative per kept event as
    the reference's ``neg_sample`` loop does (user after user, outside his kept events)."""
    user_raw, user_uniques = pd.factorize(data[user_col], sort=True, use_na_sentinel=False)
    user = user_raw.astype(np.int64) + 1
    item = _codes(data[item_col])
    n_items = int(item.max()) if len(item) else 0
    attr_codes = {c: _codes(data[c]) for c in attrs}
    # item -> attribute of its last row in input order (the reference's dict built before sorting)
    item2attr = {}
    if len(item):
        uniq, first_rev = np.unique(item[::-1], return_index=True)
        last = len(item) - 1 - first_rev
        for c in attrs:
            m = np.zeros(n_items + 1, dtype=np.int64)
            m[uniq] = attr_codes[c][last]
            item2attr[c] = m

    # Stable sort by time, then by user: groups in user order, events in time order.
    order = _stable_time_order(data[time_col])
    order = order[np.argsort(user[order], kind="stable")]
    uids, starts, lens = np.unique(user[order], return_index=True, return_counts=True)
    keep_user = lens >= min_len
    ev_keep = np.repeat(keep_user, lens)
    if first_n is not None:
        ev_keep &= np.arange(len(order)) - np.repeat(starts, lens) < first_n
        lens = np.minimum(lens, first_n)
    order = order[ev_keep]
    uids, lens = uids[keep_user], lens[keep_user]
    n_users = len(uids)
    starts = np.zeros(n_users, dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    uidx = np.repeat(np.arange(n_users, dtype=np.int64), lens)
    item_k = item[order]

    # One negative per event (the reference draws len(pos_list) per user, using 1..len-1).
    hist_keys = np.unique(uidx * (n_items + 1) + item_k)
    n_distinct = np.bincount(hist_keys // (n_items + 1), minlength=n_users) if len(hist_keys) else np.zeros(n_users, np.int64)
    negs = _draw_history_negatives(rng, lens, hist_keys, n_distinct, n_items, np.asarray(user_uniques)[uids - 1].tolist())
    pos = np.arange(len(item_k), dtype=np.int64) - np.repeat(starts, lens)
    attrs_k = {c: attr_codes[c][order] for c in attrs}
    return _Events(uids, lens, uidx, pos, item_k, attrs_k, negs, item2attr)


def _split_positions(ev: _Events, shuffle: bool, rng: Any, leaky_train: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per split (train, validation, test): the target events ``g`` and the row order.

    Row ``r`` of a split is ``g[r // 2]``'s positive (``r`` even) or negative (odd); the
    returned order is the shuffled one. A user's last position is the test row, the one
    before the validation row, the others (``>= 1``) train rows. With ``leaky_train`` the
    shuffle of train is drawn over ``create_seq_features``' reference list, which also holds
    every user's last position, and those rows are then left out: the random stream is
    consumed as the reference consumes it.
    """
    user_len = np.repeat(ev.lens, ev.lens)
    split = np.where(ev.pos == user_len - 1, 2, np.where(ev.pos == user_len - 2, 1, 0))
    split[ev.pos < 1] = -1
    out = []
    for s in (0, 1, 2):
        listed = split == s
        if s == 0 and leaky_train:
            listed |= split == 2  # the reference's train list also holds each user's last position
        g = np.flatnonzero(listed)  # in the reference's order: user after user, by position
        rows = _shuffle_perm(rng, 2 * len(g)) if shuffle else np.arange(2 * len(g))
        out.append((g, rows[split[g[rows // 2]] == s]))
    return out


class _Rows(NamedTuple):
    label: np.ndarray
    target: np.ndarray
    user: np.ndarray
    hist: dict[str | None, list[list[int]]]  # None: the item history; else an attribute's
    target_attrs: dict[str, np.ndarray]


def _window_rows(ev: _Events, g: np.ndarray, rows: np.ndarray, max_len: int, own_attrs: bool = False) -> _Rows:
    """The columns of the rows ``rows`` over target events ``g`` (see :func:`_split_positions`).

    A row's history is the last ``min(pos, max_len)`` items before its target, left-aligned and
    zero-padded to ``max_len``; its negative row has the sampled item. A target's attributes
    are its item's in ``item2attr``, or with ``own_attrs`` the event's own for a positive.
    """
    h = np.minimum(ev.pos[g], max_len)
    pad_mask = np.arange(max_len)[None, :] >= h[:, None]
    pos_idx = rows // 2
    is_neg = (rows % 2).astype(bool)
    gi = g[pos_idx]
    target = np.where(is_neg, ev.negs[gi], ev.items[gi])
    pos_list = pos_idx.tolist()

    def hist(seq: np.ndarray) -> list[list[int]]:
        win = np.lib.stride_tricks.sliding_window_view(np.concatenate([seq, np.zeros(max_len, dtype=seq.dtype)]), max_len)
        w = win[g - h]
        w[pad_mask] = 0
        lists = w.tolist()
        return [lists[k] for k in pos_list]  # a position's two rows share one list, as in the reference

    hists: dict[str | None, list[list[int]]] = {None: hist(ev.items)}
    hists.update({c: hist(a) for c, a in ev.attrs.items()})
    target_attrs = {c: ev.item2attr[c][target] for c in ev.attrs}
    if own_attrs:
        target_attrs = {c: np.where(is_neg, a, ev.attrs[c][gi]) for c, a in target_attrs.items()}
    return _Rows((~is_neg).astype(np.int64), target, ev.uids[ev.uidx[gi]], hists, target_attrs)


def generate_seq_feature(
    data: pd.DataFrame,
    user_col: str,
    item_col: str,
    time_col: str,
    item_attribute_cols: Sequence[str] = (),
    min_item: int = 0,
    shuffle: bool = True,
    max_len: int = 50,
    seed: int | random.Random | None = None,
    inplace: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Sliding-window ranking samples with one sampled negative per positive.

    Ids are label-encoded to ``1..n`` (0 is padding). For every user with at least
    ``min_item`` events, sorted by time, each position ``i >= 1`` yields a positive
    row (the item clicked at ``i``, label 1) and a negative row (a random item the
    user never clicked, label 0), both with the history of the last ``min(i,
    max_len)`` items before ``i``. A user's last position goes to the test split,
    the one before to validation, the others to train.

    Args:
        data: raw interactions. With ``inplace`` (default, the reference's behaviour) every
            column of it is replaced by its 1-based codes, which Torch-RecHub's examples read
            the vocabulary sizes from (``data["user_id"].max() + 1``).
        user_col: user id column.
        item_col: item id column.
        time_col: timestamp column (any sortable type).
        item_attribute_cols: item attribute columns (e.g. ``["cate_id"]``) that get a
            history sequence ``hist_<col>`` and a target column ``target_<col>``.
        min_item: users with fewer events are dropped.
        shuffle: shuffle each split's rows.
        max_len: history length; longer histories keep the most recent items.
        seed: seed of a private ``random.Random`` (equal to ``random.seed(seed)``
            before the reference call); ``None`` consumes the global :mod:`random`.
        inplace: label-encode ``data``'s columns in place as the reference does;
            ``False`` leaves the caller's frame untouched.

    Returns:
        ``(train, val, test)`` frames with columns ``label, target_item_id, <user_col>,
        hist_item_id`` and ``hist_<col>, target_<col>`` per attribute column. History
        cells are lists of ``max_len`` ints, zero-padded on the right.

    Raises:
        ValueError: a column is missing, ``max_len < 1``, or a user clicked every item.
    """
    attrs = list(item_attribute_cols or [])
    _require_columns(data, [user_col, item_col, time_col, *attrs])
    _check_items(data, item_col)
    max_len = _check_max_len(max_len)
    rng = _py_rng(seed)
    ev = _user_events(data, user_col, item_col, time_col, attrs, int(min_item), rng)
    col_name = ["label", "target_item_id", user_col, "hist_item_id"]
    for c in attrs:
        col_name += ["hist_" + c, "target_" + c]
    frames = []
    for g, rows in _split_positions(ev, shuffle, rng, leaky_train=False):
        r = _window_rows(ev, g, rows, max_len)
        cols: dict[str, Any] = {"label": r.label, "target_item_id": r.target, user_col: r.user, "hist_item_id": r.hist[None]}
        for c in attrs:
            cols["hist_" + c] = r.hist[c]
            cols["target_" + c] = r.target_attrs[c]
        frames.append(pd.DataFrame(cols, columns=col_name))
    if inplace:  # after sampling: the codes above were computed from the raw values
        _encode_in_place(data)
    return frames[0], frames[1], frames[2]


_CSF_COLUMNS = ("user_id", "item_id", "cate_id", "time")


def create_seq_features(
    data: pd.DataFrame,
    seq_feature_col: Sequence[str] = ("item_id", "cate_id"),
    max_len: int = 50,
    drop_short: int = 3,
    shuffle: bool = True,
    seed: int | random.Random | None = None,
    inplace: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Sliding-window item and category histories, Torch-RecHub's ``create_seq_features``.

    Every column is label-encoded to ``1..n`` (0 is padding). Users with fewer than
    ``drop_short`` events are dropped; of each other user (by id), sorted by time, only the
    *first* ``max_len`` events are used, as in the reference. Each position ``i >= 1`` of them
    makes a positive row (the item and category at ``i``, label 1) and a negative row (a random
    item outside those events and the category of its last input row, label 0), both with the
    items and categories before ``i``, zero-padded on the right to ``max_len``. A user's last
    position goes to test, the one before to validation, the others to train. (Unlike
    :func:`generate_seq_feature`, a positive's category is the event's own.)

    Same rows, columns and random draws as the reference (Python's :mod:`random`: the
    negatives user after user, then ``shuffle`` of train, validation and test), except that
    the reference also appends every test row to train (its ``if i == last`` is followed by
    ``if i == last - 1 ... else``): here a user's last position is in test only. The train
    shuffle still draws as many numbers as the reference's, so after the same ``random.seed``
    the validation and test frames are the reference's and train is the reference's train
    without those rows, in the same order.

    Args:
        data: interactions with columns ``user_id``, ``item_id``, ``cate_id``, ``time``. With
            ``inplace`` (default, as the reference) every column of it is replaced by its
            1-based codes.
        seq_feature_col: accepted for compatibility: the reference ignores it and always
            builds the ``item_id`` and ``cate_id`` histories, and so does this function; its
            columns must exist.
        max_len: history length; only each user's first ``max_len`` events are used.
        drop_short: users with fewer events (before truncation) are dropped.
        shuffle: shuffle each split's rows.
        seed: seed of a private ``random.Random`` (equal to ``random.seed(seed)`` before the
            reference call); ``None`` consumes the global :mod:`random` state.
        inplace: label-encode ``data`` in place as the reference does; ``False`` leaves it alone.

    Returns:
        ``(train, val, test)`` frames with columns ``user_id, history_item, history_cate,
        target_item, target_cate, label``; history cells are lists of ``max_len`` ints.

    Raises:
        ValueError: a missing column, ``max_len < 1``, ``drop_short < 0``, or a user whose
            first ``max_len`` events hold every item (the reference loops forever there).
    """
    feats = [seq_feature_col] if isinstance(seq_feature_col, str) else list(seq_feature_col)
    _require_columns(data, dict.fromkeys([*_CSF_COLUMNS, *feats]))
    _check_items(data, "item_id")
    max_len = _check_max_len(max_len)
    if int(drop_short) < 0:
        raise ValueError(f"drop_short must be >= 0, got drop_short={drop_short}")
    rng = _py_rng(seed)
    ev = _user_events(data, "user_id", "item_id", "time", ["cate_id"], int(drop_short), rng, first_n=max_len)
    frames = []
    for g, rows in _split_positions(ev, shuffle, rng, leaky_train=True):
        r = _window_rows(ev, g, rows, max_len, own_attrs=True)
        cols = {
            "user_id": r.user,
            "history_item": r.hist[None],
            "history_cate": r.hist["cate_id"],
            "target_item": r.target,
            "target_cate": r.target_attrs["cate_id"],
            "label": r.label,
        }
        frames.append(pd.DataFrame(cols))
    if inplace:
        _encode_in_place(data)
    return frames[0], frames[1], frames[2]


# --------------------------------------------------------------------------- dict conversion


def _column_to_array(s: pd.Series) -> np.ndarray:
    """``np.array(column.to_list())`` as the reference builds it, without the round trip when possible."""
    dt = s.dtype
    if isinstance(dt, np.dtype):
        if dt.kind == "b":
            return s.to_numpy(dtype=bool, copy=True)
        if dt.kind == "i" or (dt.kind == "u" and dt.itemsize < 8):
            return s.to_numpy(dtype=np.int64, copy=True)
        if dt.kind == "f":
            return s.to_numpy(dtype=np.float64, copy=True)
    return np.array(s.to_list())


def df_to_dict(data: pd.DataFrame) -> dict[str, np.ndarray]:
    """Column name -> numpy array, the input dict the models take.

    Same arrays as the reference (``np.array(column values as a list)``: integer
    columns become int64, floats float64, columns of equal-length lists 2-D arrays),
    but numeric columns are converted without building Python lists.

    Args:
        data: the frame.

    Returns:
        Mapping of every column to an array with ``len(data)`` rows.
    """
    return {key: _column_to_array(data[key]) for key in data.columns}


def array_replace_with_dict(array: Any, dic: dict[Any, Any]) -> np.ndarray:
    """Every value of ``array`` replaced by ``dic[value]`` (any shape), vectorised.

    Torch-RecHub's helper of the same name maps a value missing from ``dic`` silently to
    another key's value; here it raises.

    Raises:
        KeyError: naming a value of ``array`` that ``dic`` has no entry for.
    """
    arr = np.asarray(array)
    if not dic:
        if arr.size:
            raise KeyError(f"value {arr.flat[0]!r} has no entry in the (empty) mapping")
        return arr.copy()
    keys = np.asarray(list(dic.keys()))
    values = np.asarray(list(dic.values()))
    order = keys.argsort(kind="stable")
    keys, values = keys[order], values[order]
    at = np.searchsorted(keys, arr).clip(max=len(keys) - 1)
    found = keys[at] == arr
    if not np.all(found):
        bad = arr[~found].flat[0]
        raise KeyError(f"value {bad.item() if hasattr(bad, 'item') else bad!r} has no entry in the mapping")
    return values[at]


# --------------------------------------------------------------------------- matching


def _popularity_negatives(
    items: Sequence[Any] | np.ndarray,
    counts: Sequence[Any],
    ratio: int,
    method_id: int,
    rs: Any,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw ``ratio`` items; returns the draws and the probabilities used (None: uniform)."""
    if method_id not in _SAMPLE_METHODS:
        raise ValueError(f"method_id should be in {_SAMPLE_METHODS}, got method_id={method_id!r}")
    ratio = int(ratio)
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got ratio={ratio}")
    # Exactly the reference's arithmetic (Python scalars, builtin sum) so draws match bit for bit.
    if method_id == 0:
        p = None
    elif method_id == 1:
        vals = [count**0.75 for count in counts]
        p = np.array(vals) / sum(vals)
    elif method_id == 2:
        vals = [np.log(count + 1) + 1e-6 for count in counts]
        p = np.array(vals) / sum(vals)
    else:  # log-uniform over popularity rank (RALM); items are sorted by decreasing count
        n = len(items)
        rank = np.arange(n, dtype=np.float64)
        p = (np.log(rank + 2) - np.log(rank + 1)) / np.log(n + 1)
        p = p / p.sum()
    arr = items if isinstance(items, np.ndarray) else np.array(list(items))
    if ratio == 0:
        return arr[:0], p
    return rs.choice(arr, size=ratio, replace=True, p=p), p


def negative_sample(
    items_cnt_order: Mapping[Any, int],
    ratio: int,
    method_id: int = 0,
    random_state: int | np.random.RandomState | np.random.Generator | None = None,
) -> np.ndarray:
    """Offline negative items for matching models.

    Args:
        items_cnt_order: item -> count, sorted by decreasing count.
        ratio: number of negatives to draw.
        method_id: ``0`` uniform; ``1`` ``count**0.75`` (word2vec); ``2``
            ``log(count + 1) + 1e-6``; ``3`` log-uniform over popularity rank (RALM,
            ``p(k) = log((k+2)/(k+1)) / log(N+1)``, k = 0 for the most frequent item).
        random_state: seed or generator; ``None`` uses numpy's global legacy state,
            like the reference. Methods 0-2 draw exactly the reference's items for
            the same state.

    Returns:
        Array of ``ratio`` items (drawn with replacement).

    Raises:
        ValueError: unknown ``method_id`` or negative ``ratio``.
    """
    items = list(items_cnt_order.keys())
    counts = list(items_cnt_order.values())
    return _popularity_negatives(items, counts, ratio, method_id, _np_rng(random_state))[0]


def _redraw_collisions(
    neg: np.ndarray, pos: np.ndarray, items: np.ndarray, p: np.ndarray | None, rs: Any
) -> np.ndarray:
    """Redraw (from the same distribution) every negative equal to its row's positive."""
    bad = np.flatnonzero(neg == pos)
    if len(bad) == 0:
        return neg
    if len(items) < 2:
        raise ValueError("only one item exists: no negative item different from the positive can be sampled")
    neg = neg.copy()
    for _ in range(64):
        neg[bad] = rs.choice(items, size=len(bad), replace=True, p=p)
        bad = bad[neg[bad] == pos[bad]]
        if len(bad) == 0:
            return neg
    # Positives that hold nearly all the mass: sample the conditional distribution directly.
    base = np.full(len(items), 1.0 / len(items)) if p is None else np.asarray(p, dtype=np.float64)
    for j in bad:
        q = np.where(items == pos[j], 0.0, base)
        if q.sum() <= 0:
            raise ValueError(f"no negative item different from the positive {pos[j]!r} has probability > 0")
        neg[j] = rs.choice(items, p=q / q.sum())
    return neg


class _Grouped(NamedTuple):
    users: np.ndarray  # user value per event, grouped
    items: np.ndarray
    attrs: dict[str, np.ndarray]
    starts: np.ndarray  # first event of each kept user
    lens: np.ndarray


def generate_seq_feature_match(
    data: pd.DataFrame,
    user_col: str,
    item_col: str,
    time_col: str,
    item_attribute_cols: Sequence[str] | None = None,
    sample_method: int = 0,
    mode: int = 0,
    neg_ratio: int = 0,
    min_item: int = 0,
    seed: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sequence features and offline negatives for matching (retrieval) models.

    For each user (sorted by time) every position ``i >= 1`` is a sample whose history
    is all items before ``i``; the last position goes to test, the others to train.

    Args:
        data: raw interactions (ids are kept as they are); not modified.
        user_col: user id column.
        item_col: item id column.
        time_col: timestamp column.
        item_attribute_cols: attribute columns that get a history ``hist_<col>``.
        sample_method: negative distribution, see :func:`negative_sample`.
        mode: ``0`` point-wise (a ``label`` column: each positive row followed by
            ``neg_ratio`` rows with a negative item and label 0); ``1`` pair-wise (one
            negative per row in ``neg_items``; ``neg_ratio`` is set to 1); ``2``
            list-wise (``neg_items`` holds an array of ``neg_ratio`` negatives).
        neg_ratio: negatives per positive (``> 0`` for list-wise).
        min_item: users with fewer events are dropped.
        seed: with a seed, negatives come from ``np.random.RandomState(seed)`` and the
            shuffle from ``random.Random(seed)`` (the reference after
            ``np.random.seed(seed); random.seed(seed)``); ``None`` consumes numpy's and
            Python's global states like the reference.

    Returns:
        ``(train, test)`` with columns ``<user_col>, <item_col>, hist_<item_col>,
        histlen_<item_col>``, ``hist_<attr>`` per attribute, then ``label`` (mode 0) or
        ``neg_items`` (modes 1 and 2; 1 in every test row, as in the reference).
        Negatives never equal the row's positive item.

    Raises:
        ValueError: unknown ``mode`` or ``sample_method``, ``neg_ratio <= 0`` in
            list-wise mode, or a missing column.
    """
    attrs = list(item_attribute_cols or [])
    if mode not in _MODES:
        raise ValueError(f"mode should be in {_MODES}, got mode={mode!r}")
    if sample_method not in _SAMPLE_METHODS:
        raise ValueError(f"sample_method should be in {_SAMPLE_METHODS}, got sample_method={sample_method!r}")
    neg_ratio = int(neg_ratio)
    if mode == 2 and neg_ratio <= 0:
        raise ValueError(f"neg_ratio must be greater than 0 for list-wise learning (mode=2), got neg_ratio={neg_ratio}")
    if mode == 1:
        neg_ratio = 1
    if neg_ratio < 0:
        raise ValueError(f"neg_ratio must be >= 0, got neg_ratio={neg_ratio}")
    _require_columns(data, [user_col, item_col, time_col, *attrs])
    _check_items(data, item_col)
    py_rng = _py_rng(seed)
    rs = _np_rng(seed)

    order = _stable_time_order(data[time_col])
    items_t = data[item_col].to_numpy()[order]
    # item -> count, by decreasing count, ties in order of first appearance (Counter + stable sort)
    codes, uniques = pd.factorize(items_t, use_na_sentinel=False)
    counts = np.bincount(codes, minlength=len(uniques)) if len(codes) else np.zeros(0, np.int64)
    by_count = np.argsort(-counts, kind="stable")
    cand_items = np.array(np.asarray(uniques, dtype=object)[by_count].tolist())
    neg_list, p = _popularity_negatives(
        cand_items, counts[by_count].tolist(), len(data) * neg_ratio, sample_method, rs
    )

    # groupby(user_col): sorted users (NaN users dropped), events in time order
    users_t = data[user_col].to_numpy()[order]
    ucode, _ = pd.factorize(users_t, sort=True)
    ok = ucode >= 0
    ev = np.flatnonzero(ok)
    ev = ev[np.argsort(ucode[ev], kind="stable")]
    _, starts, lens = np.unique(ucode[ev], return_index=True, return_counts=True)
    keep = lens >= min_item
    ev = ev[np.repeat(keep, lens)]
    lens = lens[keep]
    starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    g = _Grouped(
        users=users_t[ev],
        items=items_t[ev],
        attrs={c: data[c].to_numpy()[order][ev] for c in attrs},
        starts=starts,
        lens=lens,
    )

    pos_in_user = np.arange(len(ev), dtype=np.int64) - np.repeat(starts, lens)
    user_len = np.repeat(lens, lens)
    user_start = np.repeat(starts, lens)
    train_pos = np.flatnonzero((pos_in_user >= 1) & (pos_in_user != user_len - 1))
    test_pos = np.flatnonzero((pos_in_user >= 1) & (pos_in_user == user_len - 1))

    item_list = g.items.tolist()
    attr_lists = {c: g.attrs[c].tolist() for c in attrs}

    def hist_cells(positions: np.ndarray, seq: list[Any]) -> list[list[Any]]:
        return [seq[s:e] for s, e in zip(user_start[positions].tolist(), positions.tolist())]

    last_col = "label" if mode == 0 else "neg_items"
    columns = [user_col, item_col, "hist_" + item_col, "histlen_" + item_col] + ["hist_" + c for c in attrs] + [last_col]

    # negatives of train position t: neg_list[t * neg_ratio:(t + 1) * neg_ratio]
    n_train_pos = len(train_pos)
    negs = np.asarray(neg_list[: n_train_pos * neg_ratio])
    if neg_ratio > 0 and n_train_pos:
        negs = _redraw_collisions(negs, np.repeat(g.items[train_pos], neg_ratio), cand_items, p, rs)
    negs = negs.reshape(n_train_pos, neg_ratio)

    hist_train = hist_cells(train_pos, item_list)
    attr_train = {c: hist_cells(train_pos, attr_lists[c]) for c in attrs}
    if mode == 0:
        per = 1 + neg_ratio
        src = np.repeat(np.arange(n_train_pos), per)  # row -> train position
        is_pos = np.tile(np.arange(per) == 0, n_train_pos)
        item_vals = np.empty(n_train_pos * per, dtype=np.result_type(g.items.dtype, negs.dtype))
        item_vals[is_pos] = g.items[train_pos]
        item_vals[~is_pos] = negs.reshape(-1)
        last_vals: Any = is_pos.astype(np.int64)
    elif mode == 1:
        src = np.arange(n_train_pos)
        item_vals = g.items[train_pos]
        last_vals = negs[:, 0]
    else:
        src = np.arange(n_train_pos)
        item_vals = g.items[train_pos]
        last_vals = list(negs)  # one array of neg_ratio items per row, as the reference's slices
    perm = _shuffle_perm(py_rng, len(src))
    src_p = src[perm]
    train = {
        user_col: _infer_like_lists(g.users[train_pos][src_p]),
        item_col: _infer_like_lists(item_vals[perm]),
        "hist_" + item_col: [hist_train[j] for j in src_p.tolist()],
        "histlen_" + item_col: pos_in_user[train_pos][src_p],
    }
    for c in attrs:
        train["hist_" + c] = [attr_train[c][j] for j in src_p.tolist()]
    if mode == 2:
        train[last_col] = [last_vals[j] for j in perm.tolist()]
    else:
        train[last_col] = _infer_like_lists(np.asarray(last_vals)[perm])

    perm = _shuffle_perm(py_rng, len(test_pos))
    tp = test_pos[perm]
    test = {
        user_col: _infer_like_lists(g.users[tp]),
        item_col: _infer_like_lists(g.items[tp]),
        "hist_" + item_col: hist_cells(tp, item_list),
        "histlen_" + item_col: pos_in_user[tp],
    }
    for c in attrs:
        test["hist_" + c] = hist_cells(tp, attr_lists[c])
    test[last_col] = np.ones(len(tp), dtype=np.int64)
    return pd.DataFrame(train, columns=columns), pd.DataFrame(test, columns=columns)


def gen_model_input(
    df: pd.DataFrame,
    user_profile: pd.DataFrame,
    user_col: str,
    item_profile: pd.DataFrame,
    item_col: str,
    seq_max_len: int | None,
    padding: str = "pre",
    truncating: str = "pre",
) -> dict[str, np.ndarray]:
    """Joins user and item profiles to ``df`` and pads its sequence columns.

    Columns starting with ``hist_`` or ``tag_`` are padded/truncated to
    ``seq_max_len`` with 0 (int64 ``(N, seq_max_len)`` arrays); the other columns
    are converted as by :func:`df_to_dict`. Row order is ``df``'s.

    Args:
        df: samples with history columns (e.g. from :func:`generate_seq_feature_match`).
        user_profile: user features, joined on ``user_col`` (left join).
        user_col: user id column.
        item_profile: item features, joined on ``item_col`` (left join).
        item_col: item id column.
        seq_max_len: sequence length.
        padding: ``"pre"`` or ``"post"``.
        truncating: ``"pre"`` or ``"post"``.

    Returns:
        Feature name -> array, ready for the models.
    """
    if seq_max_len is not None:
        seq_max_len = check_int(seq_max_len, "seq_max_len")
    for name, profile, key in (("user_profile", user_profile, user_col), ("item_profile", item_profile, item_col)):
        dup = profile[key].duplicated()
        if dup.any():
            # a left join would repeat every sample of such a user/item (silently, in the reference)
            first = profile[key][dup].iloc[0]
            first = first.item() if hasattr(first, "item") else first
            raise ValueError(
                f"{name} lists {int(dup.sum())} {key!r} value(s) more than once (e.g. {first!r}); keep one row per {key!r}"
            )
    df = pd.merge(df, user_profile, on=user_col, how="left")
    df = pd.merge(df, item_profile, on=item_col, how="left")
    out: dict[str, np.ndarray] = {}
    for col in df.columns:
        if isinstance(col, str) and (col.startswith("hist_") or col.startswith("tag_")):
            try:
                out[col] = pad_sequences(
                    df[col], maxlen=seq_max_len, dtype="int64", value=0, padding=padding, truncating=truncating
                )
            except ValueError as e:
                raise ValueError(f"column {col!r}: {e}") from None
        else:
            out[col] = _column_to_array(df[col])
    return out
