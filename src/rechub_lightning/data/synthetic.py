"""Deterministic synthetic data with planted signal (DESIGN decision 8).

``make_criteo_like`` is the default data set of the CTR datamodule: Criteo's shape (13
heavy-tailed count features ``I1..I13`` with missing values, 26 categorical fields
``C1..C26`` with Zipf-distributed ids and very different vocabulary sizes, a binary
``label``) and a click probability built from per-id effects, pairwise field
interactions (what FM/cross layers are for) and dense effects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["make_criteo_like", "criteo_vocab_sizes"]

# Relative vocabulary sizes of Criteo's 26 fields (log-spaced from tiny to the largest).
_CRITEO_SHAPE = [
    1.0, 0.05, 0.3, 0.1, 0.0003, 0.00002, 0.01, 0.0006, 0.000003, 0.03, 0.004, 0.2, 0.002,
    0.00003, 0.008, 0.15, 0.00001, 0.004, 0.0002, 0.000004, 0.25, 0.000015, 0.000015, 0.05, 0.00009, 0.03,
]


def criteo_vocab_sizes(max_vocab: int, n_sparse: int = 26) -> list[int]:
    """Per-field vocabulary sizes: the largest field has ``max_vocab`` values, the smallest a few."""
    shape = (_CRITEO_SHAPE * (n_sparse // len(_CRITEO_SHAPE) + 1))[:n_sparse]
    return [max(3, int(round(max_vocab * s))) for s in shape]


def _zipf_ids(rng: np.random.Generator, vocab: int, n: int, a: float) -> np.ndarray:
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = ranks**-a
    p /= p.sum()
    ids = rng.choice(vocab, size=n, p=p)
    # Scatter ranks over the id space so that frequent ids are not simply the small ones.
    return rng.permutation(vocab)[ids]


def make_criteo_like(
    n_rows: int = 100_000,
    n_dense: int = 13,
    n_sparse: int = 26,
    max_vocab: int = 10_000,
    vocab_sizes: Sequence[int] | None = None,
    zipf_a: float = 1.1,
    missing_rate: float = 0.05,
    hex_ids: bool = False,
    seed: int = 2022,
) -> pd.DataFrame:
    """A Criteo-shaped click data set with planted signal.

    Args:
        n_rows: number of rows.
        n_dense: number of count features ``I1..``.
        n_sparse: number of categorical fields ``C1..``.
        max_vocab: size of the largest field (the others scale with Criteo's proportions).
        vocab_sizes: explicit per-field sizes (overrides ``max_vocab``).
        zipf_a: Zipf exponent of id frequencies.
        missing_rate: base rate of missing values (dense NaN, categorical empty).
        hex_ids: write categories as 8-digit hex strings like the real data set (slower);
            otherwise as integers.
        seed: everything is a deterministic function of the seed.

    Returns:
        A frame with ``label, I1..I{n_dense}, C1..C{n_sparse}``; about half of the
        labels are 1 and a model that learns the planted effects reaches AUC above 0.8.
    """
    rng = np.random.default_rng(seed)
    sizes = list(vocab_sizes) if vocab_sizes is not None else criteo_vocab_sizes(max_vocab, n_sparse)
    if len(sizes) != n_sparse:
        raise ValueError(f"vocab_sizes has {len(sizes)} entries, n_sparse={n_sparse}")
    logit = np.full(n_rows, -1.6)

    data: dict[str, np.ndarray] = {}
    ids_by_field = []
    for j, vocab in enumerate(sizes):
        ids = _zipf_ids(rng, vocab, n_rows, zipf_a)
        ids_by_field.append(ids)
        # Half of the fields carry a per-id effect.
        if j % 2 == 0:
            effect = rng.normal(0.0, 0.6, size=vocab)
            logit += effect[ids]
    # Pairwise interactions between a few field pairs: u_a[id_a] . u_b[id_b].
    k = 4
    pairs = [(j, (j + 3) % n_sparse) for j in range(0, min(n_sparse, 12), 2)]
    for a, b in pairs:
        ua = rng.normal(0.0, 0.55, size=(sizes[a], k))
        ub = rng.normal(0.0, 0.55, size=(sizes[b], k))
        logit += (ua[ids_by_field[a]] * ub[ids_by_field[b]]).sum(axis=1)

    for i in range(n_dense):
        counts = np.floor(rng.lognormal(mean=1.0 + 0.2 * i, sigma=1.2, size=n_rows))
        coef = rng.normal(0.0, 0.35) if i % 3 != 2 else 0.0
        z = np.log1p(counts)
        logit += coef * (z - z.mean()) / (z.std() + 1e-9)
        miss = rng.random(n_rows) < missing_rate * (1 + i % 4)
        col = counts.astype(np.float64)
        col[miss] = np.nan
        data[f"I{i + 1}"] = col

    label = (rng.random(n_rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    frame = {"label": label, **data}
    for j, ids in enumerate(ids_by_field):
        miss = rng.random(n_rows) < missing_rate * (j % 3) / 2
        if hex_ids:
            # A fixed random 32-bit code per id, rendered like Criteo's hashed categories.
            codes = rng.integers(0, 2**32, size=sizes[j], dtype=np.uint64)
            col = pd.Series(codes[ids]).map("{:08x}".format).astype(object)
            col[miss] = ""
            frame[f"C{j + 1}"] = col.to_numpy()
        else:
            col = ids.astype(np.float64) if miss.any() else ids
            if miss.any():
                col[miss] = np.nan
            frame[f"C{j + 1}"] = col
    df = pd.DataFrame(frame)
    for j in range(n_sparse):
        c = f"C{j + 1}"
        if not hex_ids and df[c].dtype == np.float64:
            df[c] = df[c].astype("Int64")
    return df
