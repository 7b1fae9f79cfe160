"""Evaluation metrics: AUC, log loss, group AUC, top-K retrieval metrics and beyond-accuracy
metrics of recommendation lists (intra-list diversity, catalog coverage, novelty).

Each metric has a stateless functional form (the truth, tested against sklearn or a
brute-force reference) and a :class:`torchmetrics.Metric` that accumulates state over
batches and synchronises it across processes, so a distributed evaluation gives the
numbers a single process would.

Differences from Torch-RecHub 0.9.0 (``basic/metric.py``):

* ``gauc_score`` skips groups with a single class instead of returning NaN for the
  whole data set;
* ``hitrate@k`` is the share of users with at least one hit (the reference divided the
  number of hits by the number of relevant items);
* top-K metrics are plain floats, not rounded strings;
* ``topk_metrics`` leaves users with no relevant item out of the average (the reference
  counts them as 0, so its values fall with the share of users no list can hit);
* ``topk_metrics`` counts a duplicate once: a relevant item listed twice is one item, a
  recommended one counts at its first position (the reference's recall and nDCG could pass 1);
* ``diversity_score`` and ``novelty_score`` are ``nan``, not 0.0, when no list can be
  measured (no user with two items, resp. one item): nothing was measured.

Example:
    >>> import torch
    >>> auc_score(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    tensor(0.7500)

The Metric classes live in :mod:`rechub_lightning._metric_states` and are loaded on first
use, so that the functional metrics import with torch, numpy and pandas alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import _TASK_TYPES

if TYPE_CHECKING:  # loaded on first use by __getattr__ below
    from ._metric_states import BinaryAUC, GroupAUC, LogLoss, RetrievalTopK

__all__ = [
    "auc_score",
    "log_loss",
    "gauc_score",
    "topk_metrics",
    "recall_score",
    "precision_score",
    "ndcg_score",
    "mrr_score",
    "hit_score",
    "diversity_score",
    "coverage_score",
    "novelty_score",
    "BinaryAUC",
    "LogLoss",
    "GroupAUC",
    "RetrievalTopK",
    "TOPK_METRIC_NAMES",
    "get_metric_func",
]

#: Names of the metrics returned by :func:`topk_metrics`, each suffixed ``@k``.
TOPK_METRIC_NAMES: tuple[str, ...] = ("recall", "hitrate", "precision", "ndcg", "mrr")

RelevantLike = Union[Tensor, Sequence[Any]]
GroupWeights = Union[Literal["count", "uniform"], Mapping[int, float]]


# --------------------------------------------------------------------------- helpers
def _check_binary(target: Tensor, what: str = "target") -> None:
    if target.numel() and bool(((target != 0) & (target != 1)).any()):
        bad = target[(target != 0) & (target != 1)][0].item()
        raise ValueError(f"{what} must contain only 0 and 1 (binary labels), found {bad}")


def _has_nan(preds: Tensor) -> bool:
    return preds.is_floating_point() and bool(torch.isnan(preds).any())


def _check_same_length(**tensors: Tensor) -> None:
    sizes = {name: t.numel() for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inputs must have the same number of elements, got {sizes}")


def _segment_sum(x: Tensor, is_start: Tensor) -> Tensor:
    """Sums of the contiguous segments of ``x`` that begin where ``is_start`` (``is_start[0]`` set).

    Differences of a cumulative sum: deterministic on every device, unlike scatter-adds.
    """
    is_end = torch.ones_like(is_start)
    is_end[:-1] = is_start[1:]
    at_end = torch.cumsum(x, 0)[is_end]
    return torch.diff(at_end, prepend=at_end.new_zeros(1))


def _group_auc_stats(
    preds: Tensor, target: Tensor, groups: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mann-Whitney statistics per group, fully vectorised.

    Rows are sorted by (group, score); runs of equal (group, score) are tie blocks. For a
    tie block with ``p`` positives and ``n`` negatives and ``b`` negatives of the same group
    scored below it, its positives win ``p * (b + n / 2)`` pairs. Everything is counted
    twice (``2 b + n``) so that it stays an exact integer.

    Returns:
        ``(group ids, twice the pairs won, positives, negatives)``, one entry per group in
        ascending group order (a single group when ``groups`` is None).
    """
    preds = preds.detach().flatten()
    target = target.detach().flatten() != 0
    n = preds.numel()
    device = preds.device
    order = torch.argsort(preds, stable=True)
    if groups is not None:
        g_by_pred = groups.detach().flatten().to(device)[order]
        by_group = torch.argsort(g_by_pred, stable=True)
        order = order[by_group]
        g = g_by_pred[by_group]
    else:
        g = torch.zeros(n, dtype=torch.long, device=device)
    p = preds[order]
    t = target[order].long()

    new_group = torch.ones(n, dtype=torch.bool, device=device)
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.clone()
    new_run[1:] |= p[1:] != p[:-1]

    pos_run = _segment_sum(t, new_run)
    neg_run = _segment_sum(1 - t, new_run)

    run_is_group_start = new_group[new_run]
    neg_before = torch.cumsum(neg_run, 0) - neg_run  # negatives in earlier runs, any group
    run_group = torch.cumsum(run_is_group_start.long(), 0) - 1
    neg_below = neg_before - neg_before[run_is_group_start][run_group]  # ... of the same group
    won2 = pos_run * (2 * neg_below + neg_run)

    group_ids = g[new_group]
    return (
        group_ids,
        _segment_sum(won2, run_is_group_start),
        _segment_sum(pos_run, run_is_group_start),
        _segment_sum(neg_run, run_is_group_start),
    )


# --------------------------------------------------------------------------- AUC
def auc_score(preds: Tensor, target: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Exact binary ROC AUC.

    Equal scores share their average rank, as in :func:`sklearn.metrics.roc_auc_score`.
    Counting is done in integers, so the result is exact up to the final division.

    Args:
        preds: scores of any shape (probabilities or logits: only the order matters).
        target: binary labels (0/1, bool, int or float) with as many elements as ``preds``.
        dtype: of the result; the ratio is computed in float64, so ``torch.float64`` gives
            sklearn's value to the last digit.

    Returns:
        A scalar tensor of ``dtype``; ``nan`` when ``target`` holds only one class (or is empty),
        or when a score is NaN (a diverged model has no ranking; sklearn raises there).

    Raises:
        ValueError: if the sizes differ or ``target`` is not binary.

    Example:
        >>> import torch
        >>> auc_score(torch.tensor([0.2, 0.2, 0.9]), torch.tensor([0, 1, 1]))
        tensor(0.7500)
    """
    _check_same_length(preds=preds, target=target)
    _check_binary(target)
    if preds.numel() == 0 or _has_nan(preds):
        return torch.tensor(float("nan"), dtype=dtype, device=preds.device)
    _, won2, pos, neg = _group_auc_stats(preds, target)
    denom = 2 * pos * neg
    if int(denom[0]) == 0:
        return torch.tensor(float("nan"), dtype=dtype, device=preds.device)
    return (won2[0].double() / denom[0].double()).to(dtype)


def gauc_score(
    preds: Tensor | None = None,
    target: Tensor | None = None,
    groups: Tensor | None = None,
    weights: GroupWeights | None = "count",
    *,
    y_true: Any = None,
    y_pred: Any = None,
    users: Any = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor | float:
    """Group AUC: the AUC of each group (usually a user), averaged with weights.

    Groups whose rows hold a single class have no AUC and are **skipped** (they do not
    count in the weights either); Torch-RecHub 0.9.0 returned NaN for the whole data set
    as soon as one such group existed.

    Args:
        preds: scores, any shape.
        target: binary labels with as many elements as ``preds``.
        groups: integer group (user) id of each row.
        weights: ``"count"``: a group weighs its number of rows (impressions), as in
            Torch-RecHub; ``"uniform"``: every group weighs 1; or a mapping
            ``{group id: weight}`` that must cover every group with both classes.
        y_true, y_pred, users: Torch-RecHub's call, ``gauc_score(y_true=..., y_pred=...,
            users=..., weights=None)`` (note its order: labels first), with arrays and any
            hashable user ids; it returns a Python float. Positional arguments are always
            ``(preds, target, groups)``.
        dtype: of the result (the average is computed in float64).

    Returns:
        A scalar tensor of ``dtype``; ``nan`` if no group has both classes or a score is NaN.

    Raises:
        ValueError: if the sizes differ, ``target`` is not binary or ``weights`` is unknown.
        KeyError: if a weight mapping misses a group that has both classes.

    Example:
        >>> import torch
        >>> preds = torch.tensor([0.9, 0.1, 0.3, 0.8, 0.5])
        >>> target = torch.tensor([1, 0, 1, 0, 1])
        >>> groups = torch.tensor([0, 0, 1, 1, 2])  # group 2 has one class: skipped
        >>> gauc_score(preds, target, groups)
        tensor(0.5000)
    """
    if y_true is not None or y_pred is not None or users is not None:
        if preds is not None or target is not None or groups is not None:
            raise TypeError("give either (preds, target, groups) or (y_true=, y_pred=, users=), not both")
        if y_true is None or y_pred is None or users is None:
            raise TypeError("the Torch-RecHub form needs y_true=, y_pred= and users=")
        uniq, codes = np.unique(np.asarray(users), return_inverse=True)
        if isinstance(weights, Mapping):
            weights = {int(i): weights[u] for i, u in enumerate(uniq.tolist()) if u in weights}
        value = gauc_score(
            torch.as_tensor(np.asarray(y_pred, dtype=np.float64)),
            torch.as_tensor(np.asarray(y_true, dtype=np.float64)),
            torch.as_tensor(codes.reshape(-1)),
            "count" if weights is None else weights,
            dtype=torch.float64,
        )
        return float(value)
    if preds is None or target is None or groups is None:
        raise TypeError("gauc_score needs preds, target and groups (or Torch-RecHub's y_true=, y_pred=, users=)")
    if not all(isinstance(t, Tensor) for t in (preds, target, groups)):
        # Torch-RecHub's positional order is (y_true, y_pred, users): arrays in that order here
        # would silently swap labels and scores.
        raise TypeError(
            "gauc_score(preds, target, groups) takes tensors; for Torch-RecHub's call with arrays use keywords: "
            "gauc_score(y_true=..., y_pred=..., users=...)"
        )
    if weights is None:
        weights = "count"
    _check_same_length(preds=preds, target=target, groups=groups)
    _check_binary(target)
    nan = torch.tensor(float("nan"), dtype=dtype, device=preds.device)
    if preds.numel() == 0 or _has_nan(preds):
        return nan
    group_ids, won2, pos, neg = _group_auc_stats(preds, target, groups)
    valid = (pos > 0) & (neg > 0)
    if not bool(valid.any()):
        return nan
    auc = won2[valid].double() / (2 * pos[valid] * neg[valid]).double()
    if isinstance(weights, Mapping):
        keys = torch.tensor(list(weights.keys()), dtype=torch.long, device=auc.device)
        vals = torch.tensor(list(weights.values()), dtype=torch.float64, device=auc.device)
        keys, order = keys.sort()
        vals = vals[order]
        wanted = group_ids[valid].long()
        at = torch.searchsorted(keys, wanted).clamp(max=max(len(keys) - 1, 0))
        found = (keys[at] == wanted) if len(keys) else torch.zeros_like(wanted, dtype=torch.bool)
        if not bool(found.all()):
            raise KeyError(f"weights has no entry for group {int(wanted[~found][0])}")
        w = vals[at]
    elif weights == "count":
        w = (pos[valid] + neg[valid]).double()
    elif weights == "uniform":
        w = torch.ones_like(auc)
    else:
        raise ValueError(f"weights must be 'count', 'uniform' or a mapping, got {weights!r}")
    total = w.sum()
    if float(total) == 0.0:
        return nan
    return ((w * auc).sum() / total).to(dtype)


def log_loss(preds: Tensor, target: Tensor, from_logits: bool = False) -> Tensor:
    """Mean binary cross-entropy, as :func:`sklearn.metrics.log_loss`.

    Probabilities are clipped to ``[eps, 1 - eps]`` with ``eps`` the machine epsilon of
    their dtype (as sklearn does); logits go through a numerically stable
    ``softplus`` form and need no clipping. Sums are taken in float64.

    Args:
        preds: probabilities in ``[0, 1]``, or logits when ``from_logits``.
        target: labels in ``[0, 1]`` with as many elements as ``preds``.
        from_logits: whether ``preds`` are logits.

    Returns:
        A float32 scalar tensor (``nan`` for empty input).

    Raises:
        ValueError: if the sizes differ, a label is outside ``[0, 1]`` or a probability is
            outside ``[0, 1]``.

    Example:
        >>> import torch
        >>> log_loss(torch.tensor([0.5, 0.5]), torch.tensor([0, 1]))
        tensor(0.6931)
    """
    total, count = _log_loss_sum(preds, target, from_logits, validate=True)
    if count == 0:
        return torch.tensor(float("nan"), device=preds.device)
    return (total / count).float()


def _log_loss_sum(preds: Tensor, target: Tensor, from_logits: bool, validate: bool) -> tuple[Tensor, int]:
    _check_same_length(preds=preds, target=target)
    preds = preds.detach().flatten()
    target = target.detach().flatten()
    if validate and target.numel() and bool(((target < 0) | (target > 1)).any()):
        raise ValueError("target must lie in [0, 1]")
    y = target.double()
    if from_logits:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(preds.double(), y, reduction="sum")
    else:
        if not preds.is_floating_point():
            preds = preds.float()
        if validate and preds.numel() and bool(((preds < 0) | (preds > 1)).any()):
            raise ValueError("preds must be probabilities in [0, 1]; pass from_logits=True for logits")
        eps = torch.finfo(preds.dtype).eps
        p = preds.clamp(eps, 1 - eps).double()
        loss = -(torch.xlogy(y, p) + torch.xlogy(1 - y, 1 - p)).sum()
    return loss, preds.numel()


# --------------------------------------------------------------------------- top-K
def _to_padded(rows: RelevantLike, name: str, device: torch.device | None = None) -> Tensor:
    """A (U, M) int64 tensor padded with -1 from a tensor or a ragged sequence of rows.

    Float ids are accepted when they are whole numbers (``3.0``); others (``3.7``, NaN, inf)
    raise a ``ValueError`` rather than being truncated to a different item.
    """
    if isinstance(rows, Tensor):
        if rows.dim() != 2:
            raise ValueError(f"{name} must be a 2-d tensor (users, items), got shape {tuple(rows.shape)}")
        if rows.is_floating_point():
            _check_whole(rows, name)
        return rows.long().to(device) if device is not None else rows.long()
    lists = [_as_list(r) for r in rows]
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    values = list(itertools.chain.from_iterable(lists))
    flat = np.asarray(values) if values else np.zeros(0, dtype=np.int64)
    if flat.ndim == 1 and flat.dtype.kind == "f":
        _check_whole(torch.from_numpy(flat), name)
    elif flat.ndim != 1 or flat.dtype.kind not in "iub" or (flat.dtype.kind == "u" and flat.size and flat.max() > _INT64_MAX):
        # nested rows, strings, objects numpy could not type, or ids beyond int64: int64 or an error
        try:
            flat = np.fromiter(values, dtype=np.int64, count=len(values))
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(
                f"{name} must hold integer item ids ({e}); for other ids use the {{user: items}} dict form"
            ) from e
    return _pad_flat(flat.astype(np.int64, copy=False), lengths, device)


_INT64_MAX = np.iinfo(np.int64).max


def _check_whole(ids: Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming the first float id of ``ids`` that is not a whole number."""
    bad = (ids != ids.floor()) | ~ids.isfinite()
    if bool(bad.any()):
        first = ids[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must hold integer item ids, got the float {first!r} ({int(bad.sum())} such id(s)); "
            "float ids are accepted only when whole (3.0)"
        )


def _integer_ids(*groups: list[list[Any]]) -> tuple[list[list[Any]], ...]:
    """Lists of item ids, with ids that are not integers (raw string ids, as Torch-RecHub's dict
    form allows) replaced by integer codes shared by all the lists."""
    flat = [item for lists in groups for items in lists for item in items]
    if all(isinstance(item, (int, np.integer)) and not isinstance(item, bool) for item in flat):
        return groups
    codes, _ = pd.factorize(pd.Series(flat, dtype=object))
    if (codes < 0).any():
        raise ValueError(f"item ids must not be missing, found {flat[int(np.argmax(codes < 0))]!r}")
    out, at = [], 0
    for lists in groups:
        coded = []
        for items in lists:
            coded.append(codes[at : at + len(items)].tolist())
            at += len(items)
        out.append(coded)
    return tuple(out)


def _as_list(items: Any) -> list[Any]:
    """One user's items as a flat list (lists pass through untouched)."""
    if isinstance(items, list):
        return items
    if isinstance(items, (Tensor, np.ndarray)):
        return items.reshape(-1).tolist()
    return list(items)


def _pad_flat(flat: np.ndarray, lengths: np.ndarray, device: torch.device | None = None) -> Tensor:
    """Rows of ``lengths`` items taken in order from ``flat``, padded with -1 into a (U, M) tensor."""
    width = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(lengths), width), -1, dtype=np.int64)
    out[np.arange(width) < lengths[:, None]] = flat  # row-major: each row's items in order
    t = torch.from_numpy(out)
    return t.to(device) if device is not None else t


def _check_ks(ks: Sequence[int] | int) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    if not ks or any((not isinstance(k, int)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _topk_sums(topk_items: RelevantLike, relevant: RelevantLike, ks: tuple[int, ...]) -> tuple[Tensor, int]:
    """Per-metric sums over users with at least one relevant item, and their number.

    The sums are ordered ``[name@k for k in ks for name in TOPK_METRIC_NAMES]`` (float64).
    """
    items = _to_padded(topk_items, "topk_items")
    rel = _to_padded(relevant, "relevant", device=items.device)
    if items.shape[0] != rel.shape[0]:
        raise ValueError(f"topk_items has {items.shape[0]} users but relevant has {rel.shape[0]}")
    n_users, width = items.shape
    device = items.device
    k_max = max(ks)

    rel_sorted = rel.sort(dim=1).values  # padding (-1) first
    distinct = rel_sorted >= 0
    distinct[:, 1:] &= rel_sorted[:, 1:] != rel_sorted[:, :-1]
    n_rel = distinct.sum(1)
    valid = n_rel > 0

    if rel.shape[1] == 0 or width == 0:
        hits = torch.zeros(n_users, width, dtype=torch.bool, device=device)
    else:
        at = torch.searchsorted(rel_sorted.contiguous(), items.contiguous()).clamp(max=rel.shape[1] - 1)
        hits = (rel_sorted.gather(1, at) == items) & (items >= 0)
        if width > 1:  # an item recommended twice counts once, at its first position
            sorted_items, perm = items.sort(dim=1, stable=True)
            dup_sorted = torch.zeros_like(hits)
            dup_sorted[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
            hits &= ~dup_sorted.gather(1, perm.argsort(dim=1))

    hits, n_rel = hits[valid], n_rel[valid]
    n_valid = int(valid.sum())
    discount = 1.0 / torch.log2(torch.arange(2, k_max + 2, dtype=torch.float64, device=device))
    ideal_dcg = discount.cumsum(0)
    hits_f = hits.double()
    cum_hits = hits_f.cumsum(1)
    cum_dcg = (hits_f * discount[:width]).cumsum(1) if width <= k_max else (hits_f[:, :k_max] * discount).cumsum(1)
    any_hit = hits.any(1)
    first_hit = hits.int().argmax(1) if width else torch.zeros(n_valid, dtype=torch.long, device=device)
    zeros = torch.zeros(n_valid, dtype=torch.float64, device=device)

    sums = []
    for k in ks:
        c = min(k, width)
        n_hit = cum_hits[:, c - 1] if c else zeros
        dcg = cum_dcg[:, c - 1] if c else zeros
        idcg = ideal_dcg[n_rel.clamp(max=k) - 1]
        rr = torch.where(any_hit & (first_hit < c), 1.0 / (first_hit + 1).double(), zeros)
        per_user = {
            "recall": n_hit / n_rel.double(),
            "hitrate": (n_hit > 0).double(),
            "precision": n_hit / k,
            "ndcg": dcg / idcg,
            "mrr": rr,
        }
        sums.extend(per_user[name].sum() for name in TOPK_METRIC_NAMES)
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64), n_valid


def _topk_dict(sums: Tensor, n_users: int, ks: tuple[int, ...]) -> dict[str, float]:
    names = [f"{name}@{k}" for k in ks for name in TOPK_METRIC_NAMES]
    if n_users == 0:
        return {name: math.nan for name in names}
    return {name: float(v) / n_users for name, v in zip(names, sums.tolist())}


def topk_metrics(
    topk_items: RelevantLike | Mapping[Any, Any] | None = None,
    relevant: RelevantLike | Mapping[Any, Any] | None = None,
    ks: Sequence[int] | int | None = None,
    *,
    y_true: Mapping[Any, Any] | None = None,
    y_pred: Mapping[Any, Any] | None = None,
    topKs: Sequence[int] | int | None = None,
) -> dict[str, float]:
    """Recall, hit rate, precision, nDCG and MRR at each cut-off ``k``.

    Per user, with ``hits`` the number of relevant items among the first ``k``
    recommendations and ``R`` the number of distinct relevant items:

    * ``recall@k = hits / R``;
    * ``hitrate@k`` = 1 if ``hits > 0`` else 0 (Torch-RecHub 0.9.0 divided the hits by
      the relevant items instead);
    * ``precision@k = hits / k`` (``k``, even when fewer than ``k`` items are ranked);
    * ``ndcg@k``: binary-relevance DCG over the ideal DCG of ``min(R, k)`` hits;
    * ``mrr@k``: ``1 / rank`` of the first hit, 0 without a hit in the first ``k``.

    Each is averaged over users. Users with no relevant item are **excluded** from the
    average; if no user has one, every value is ``nan``. ``topk_items`` may have fewer
    than ``k`` columns (a corpus smaller than ``k``): missing positions, and entries equal
    to ``-1``, are misses. An item listed twice for a user counts at its first position only.

    Args:
        topk_items: recommended item ids in rank order, a ``(U, K)`` integer tensor or a
            sequence of ``U`` ranked lists (padded with ``-1``).
        relevant: the held-out items of each user, a ``(U, M)`` integer tensor padded with
            ``-1`` or a sequence of ``U`` lists/sets/tensors of item ids (ids are >= 0; whole
            floats such as ``3.0`` are read as integers, other floats are refused).
        ks: cut-offs (default ``(5, 10, 20)``).
        y_true, y_pred, topKs: Torch-RecHub's call, ``topk_metrics(y_true, y_pred, topKs)``:
            ``{user: held-out items}`` and ``{user: ranked recommendations}`` dicts, users
            taken in ``y_true``'s order (default ``topKs=[5]``, as there). Two dicts passed
            positionally are read in that order too (the reverse of the tensor form).

    Returns:
        ``{"recall@5": ..., "hitrate@5": ..., "precision@5": ..., "ndcg@5": ..., "mrr@5": ..., ...}``
        as Python floats (also for the Torch-RecHub call, which returned rounded strings).

    Raises:
        ValueError: if the numbers of users differ, a cut-off is not a positive int, or an id
            of the tensor/list form is a float that is not a whole number (``3.7``, NaN).
        KeyError: if ``y_pred`` has no recommendations for a user of ``y_true``.

    Example:
        >>> import torch
        >>> out = topk_metrics(torch.tensor([[3, 1, 2], [0, 4, 5]]), [[1], [7, 8]], ks=(2,))
        >>> out["recall@2"], out["hitrate@2"], out["mrr@2"]
        (0.5, 0.5, 0.25)
    """
    if y_true is not None or y_pred is not None or isinstance(topk_items, Mapping) or isinstance(relevant, Mapping):
        if y_true is None and y_pred is None:
            y_true, y_pred = topk_items, relevant  # type: ignore[assignment]
        elif topk_items is not None or relevant is not None:
            raise TypeError("give either (topk_items, relevant) or (y_true=, y_pred=), not both")
        if not isinstance(y_true, Mapping) or not isinstance(y_pred, Mapping):
            raise TypeError(
                "the Torch-RecHub form needs y_true and y_pred as {user: items} dicts, got "
                f"{type(y_true).__name__} and {type(y_pred).__name__}"
            )
        missing = [u for u in y_true if u not in y_pred]
        if missing:
            raise KeyError(f"y_pred has no recommendations for user {missing[0]!r} of y_true ({len(missing)} user(s) missing)")
        topk_items = [_as_list(y_pred[u]) for u in y_true]
        relevant = [_as_list(y_true[u]) for u in y_true]
        topk_items, relevant = _integer_ids(topk_items, relevant)
        ks = topKs if topKs is not None else (ks if ks is not None else [5])
    elif topKs is not None:
        ks = topKs
    if topk_items is None or relevant is None:
        raise TypeError("topk_metrics needs topk_items and relevant (or Torch-RecHub's y_true= and y_pred=)")
    ks = _check_ks((5, 10, 20) if ks is None else ks)
    sums, n_users = _topk_sums(topk_items, relevant, ks)
    return _topk_dict(sums, n_users, ks)


def _one_topk_metric(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in topk_metrics(*args, **kwargs).items() if key.split("@")[0] == name}


def recall_score(*args: Any, **kwargs: Any) -> dict[str, float]:
    """``recall@k`` of :func:`topk_metrics` (same arguments), e.g. Torch-RecHub's
    ``recall_score(y_true, y_pred, topKs=[5])`` -> ``{"recall@5": ...}``."""
    return _one_topk_metric("recall", args, kwargs)


def precision_score(*args: Any, **kwargs: Any) -> dict[str, float]:
    """``precision@k`` of :func:`topk_metrics` (same arguments)."""
    return _one_topk_metric("precision", args, kwargs)


def ndcg_score(*args: Any, **kwargs: Any) -> dict[str, float]:
    """``ndcg@k`` of :func:`topk_metrics` (same arguments)."""
    return _one_topk_metric("ndcg", args, kwargs)


def mrr_score(*args: Any, **kwargs: Any) -> dict[str, float]:
    """``mrr@k`` of :func:`topk_metrics` (same arguments)."""
    return _one_topk_metric("mrr", args, kwargs)


def hit_score(*args: Any, **kwargs: Any) -> dict[str, float]:
    """``hitrate@k`` of :func:`topk_metrics` (same arguments): the share of users with a hit
    (Torch-RecHub's ``hit_score`` divided the hits by the relevant items: that is ``recall``
    summed over users)."""
    return _one_topk_metric("hitrate", args, kwargs)


# --------------------------------------------------------------------------- beyond accuracy
def _ranked_rows(
    y_pred: Any, index: Mapping[Any, int] | None, n_rows: int, what: str, unknown_row: int | None = None
) -> Tensor:
    """Recommendation lists as a ``(U, K)`` int64 tensor of rows of a per-item table (``-1``: padding).

    ``y_pred`` is a ``(U, K)`` tensor/array, a sequence of ranked lists or Torch-RecHub's
    ``{user: ranked items}`` dict. Without ``index`` item ids are the rows (``-1`` pads); with
    it (``{item: row}``, rows ``0..len(index)-1`` in order, from a table given as a dict) ids are
    looked up in it. Ids without a row are an error, or ``unknown_row`` when one is given.
    """
    if isinstance(y_pred, Mapping):
        lists: list[Any] | None = [_as_list(v) for v in y_pred.values()]
    elif isinstance(y_pred, (Tensor, np.ndarray)):
        t = torch.as_tensor(y_pred)
        if t.dim() != 2:
            raise ValueError(f"y_pred must be 2-d (users, items), got shape {tuple(t.shape)}")
        lists = t.tolist() if index is not None else None
        rows = None if index is not None else t.long()
    else:
        lists = [_as_list(r) for r in y_pred]
    if lists is not None:
        if index is not None:  # look every id up at once; -1 pads
            lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
            flat = list(itertools.chain.from_iterable(lists))
            codes = pd.Index(list(index)).get_indexer(np.asarray(flat)) if flat else np.zeros(0, dtype=np.int64)
            for j in np.flatnonzero(codes < 0):
                if isinstance(flat[j], (int, np.integer)) and flat[j] == -1:
                    continue  # padding
                if unknown_row is None:
                    raise ValueError(f"recommended item {flat[j]!r} has no entry in {what}")
                codes[j] = unknown_row
            rows = _pad_flat(codes.astype(np.int64), lengths)
        else:
            rows = _to_padded(lists, "y_pred")
    assert rows is not None
    bad = (rows >= n_rows) | (rows < -1)
    if bool(bad.any()):
        raise ValueError(f"recommended item {int(rows[bad][0])} has no row in {what} ({n_rows} rows)")
    return rows


def _beyond_ks(y_pred: Any, ks: Sequence[int] | int | None, topKs: Sequence[int] | int | None) -> tuple[int, ...]:
    if topKs is not None:
        ks = topKs
    return _check_ks(([5] if isinstance(y_pred, Mapping) else (5, 10, 20)) if ks is None else ks)


def _table(values: Any, what: str) -> tuple[Tensor, dict[Any, int] | None]:
    """A per-item table (rows indexed by item id) from a tensor/array or a ``{item: value}`` dict."""
    if isinstance(values, Mapping):
        keys = list(values)
        if not keys:
            raise ValueError(f"{what} is empty")
        table = torch.as_tensor(np.stack([np.asarray(values[k], dtype=np.float64) for k in keys]))
        return table, {k: i for i, k in enumerate(keys)}
    return torch.as_tensor(np.asarray(values, dtype=np.float64)), None


def diversity_score(
    y_pred: Any,
    item_embeddings: Any,
    ks: Sequence[int] | int | None = None,
    *,
    topKs: Sequence[int] | int | None = None,
    chunk_size: int = 16384,
) -> dict[str, float]:
    """Intra-list diversity: the mean pairwise cosine distance ``1 - cos(e_i, e_j)`` between the
    items of a user's top ``k``, averaged over users with at least two items there.

    Args:
        y_pred: ranked recommendations: a ``(U, K)`` tensor (``-1`` pads), a sequence of lists,
            or Torch-RecHub's ``{user: items}`` dict.
        item_embeddings: ``(N, D)`` tensor/array indexed by item id, or ``{item: vector}``.
        ks / topKs: cut-offs (default ``[5]`` for a dict, else ``(5, 10, 20)``).
        chunk_size: users scored at once (memory ``chunk_size * (k + D)``).

    Returns:
        ``{"diversity@k": float}``; ``nan`` when no user has two items, e.g. every list empty
        (Torch-RecHub 0.9.0 returns 0.0 there, the value of lists of identical items: without a
        pair nothing was measured). Computed as
        ``(k_u(k_u-1)/2 - (|sum v|^2 - sum |v|^2) / 2) / (k_u(k_u-1)/2)`` over unit vectors
        ``v`` (a zero embedding stays zero, as in Torch-RecHub 0.9.0), without the ``k x k``
        similarity matrix. An item listed twice counts twice (distance 0), as there.

    Raises:
        ValueError: a recommended item without an embedding (the reference skipped it).
    """
    ks = _beyond_ks(y_pred, ks, topKs)
    table, index = _table(item_embeddings, "item_embeddings")
    if table.dim() != 2:
        raise ValueError(f"item_embeddings must be 2-d (items, dim), got shape {tuple(table.shape)}")
    unit = table / table.norm(dim=1, keepdim=True).clamp(min=1e-10)
    sq_norm = unit.pow(2).sum(1)  # 1, or 0 for a zero embedding
    rows = _ranked_rows(y_pred, index, len(table), "item_embeddings")
    out = {}
    for k in ks:
        sel = rows[:, :k]
        if sel.shape[1] < 2:  # no list holds a pair (and embedding_bag rejects empty bags)
            out[f"diversity@{k}"] = math.nan
            continue
        total, users = 0.0, 0
        for s in range(0, len(sel), chunk_size):
            part = sel[s : s + chunk_size]
            mask = part >= 0
            idx, w = part.clamp(min=0), mask.to(unit.dtype)
            # sum of each list's unit vectors without a (users, k, dim) copy
            v_sum = F.embedding_bag(idx, unit, per_sample_weights=w, mode="sum")
            n = mask.sum(1).double()
            pairs = n * (n - 1) / 2
            sim = (v_sum.pow(2).sum(1) - (sq_norm[idx] * w).sum(1)) / 2
            keep = n >= 2
            total += float(((pairs - sim)[keep] / pairs[keep]).sum())
            users += int(keep.sum())
        out[f"diversity@{k}"] = total / users if users else math.nan
    return out


def coverage_score(
    y_pred: Any, all_items: Any, ks: Sequence[int] | int | None = None, *, topKs: Sequence[int] | int | None = None
) -> dict[str, float]:
    """Catalog coverage: the share of the catalog recommended to at least one user in a top ``k``.

    Args:
        y_pred: ranked recommendations (as :func:`diversity_score`).
        all_items: the catalog: its size ``N`` (item ids ``0..N-1``) or a collection of item ids.
        ks / topKs: cut-offs (default ``[5]`` for a dict, else ``(5, 10, 20)``).

    Returns:
        ``{"coverage@k": float}`` in ``[0, 1]``.

    Raises:
        ValueError: a recommended item outside the catalog (Torch-RecHub counted it, so its
            coverage could exceed 1).
    """
    ks = _beyond_ks(y_pred, ks, topKs)
    if isinstance(all_items, (int, np.integer)):
        n, index = int(all_items), None
    else:
        catalog = list(dict.fromkeys(np.asarray(list(all_items) if isinstance(all_items, (set, frozenset)) else all_items).reshape(-1).tolist()))
        n, index = len(catalog), {item: i for i, item in enumerate(catalog)}
    if n <= 0:
        raise ValueError(f"all_items must hold at least one item, got {all_items!r}")
    rows = _ranked_rows(y_pred, index, n, "all_items")
    out = {}
    for k in ks:
        sel = rows[:, :k]
        out[f"coverage@{k}"] = int(torch.unique(sel[sel >= 0]).numel()) / n
    return out


def novelty_score(
    y_pred: Any, item_popularity: Any, ks: Sequence[int] | int | None = None, *, topKs: Sequence[int] | int | None = None
) -> dict[str, float]:
    """Novelty as mean self-information: ``-log2(p_i)`` of the recommended items, averaged over
    a user's top ``k``, then over users (higher: more long-tail recommendations).

    Args:
        y_pred: ranked recommendations (as :func:`diversity_score`).
        item_popularity: interaction probability per item (e.g. count / total interactions),
            an ``(N,)`` tensor/array indexed by item id or ``{item: p}``; an item absent from
            the dict has probability 0. Probabilities are clamped below at ``1e-10`` (an item
            never interacted with scores ``log2(1e10)`` = 33.2 bits), as in Torch-RecHub.
        ks / topKs: cut-offs (default ``[5]`` for a dict, else ``(5, 10, 20)``).

    Returns:
        ``{"novelty@k": float}``; ``nan`` when no user has a recommendation.

    Raises:
        ValueError: probabilities outside ``[0, 1]`` (counts passed as probabilities), or an
            item id past the end of a popularity array.
    """
    ks = _beyond_ks(y_pred, ks, topKs)
    pop, index = _table(item_popularity, "item_popularity")
    pop = pop.reshape(-1)
    bad = ~((pop >= 0) & (pop <= 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        item = list(index)[i] if index is not None else i
        raise ValueError(
            f"item_popularity must hold probabilities in [0, 1] (e.g. count / total interactions), found {float(pop[i])} for item {item!r}"
        )
    unknown = None
    if index is not None:  # items missing from the dict have probability 0: one extra row
        unknown = len(pop)
        pop = torch.cat([pop, torch.zeros(1, dtype=pop.dtype)])
    info = -torch.log2(pop.clamp(min=1e-10))
    rows = _ranked_rows(y_pred, index, len(pop), "item_popularity", unknown_row=unknown)
    out = {}
    for k in ks:
        sel = rows[:, :k]
        mask = sel >= 0
        n = mask.sum(1)
        per_user = (info[sel.clamp(min=0)] * mask).sum(1) / n.clamp(min=1)
        keep = n > 0
        out[f"novelty@{k}"] = float(per_user[keep].mean()) if bool(keep.any()) else math.nan
    return out


def get_metric_func(task_type: str = "classification") -> Callable[..., Any]:
    """The default validation metric of a task type: sklearn's, as in Torch-RecHub.

    ``torch_rechub.utils.data.get_metric_func``: ``roc_auc_score`` for classification,
    ``mean_squared_error`` for regression, both called ``metric(y_true, y_score)`` on arrays.
    AUC is invariant under the sigmoid, so our models' logits give the same value as
    probabilities; sklearn is imported on the first call.

    Args:
        task_type: ``"classification"`` or ``"regression"``.

    Returns:
        :func:`sklearn.metrics.roc_auc_score` or :func:`sklearn.metrics.mean_squared_error`.

    Raises:
        ValueError: On any other ``task_type``.
    """
    if task_type not in _TASK_TYPES:
        raise ValueError(f"task_type must be one of {_TASK_TYPES}, got task_type={task_type!r}")
    from sklearn.metrics import mean_squared_error, roc_auc_score

    return roc_auc_score if task_type == "classification" else mean_squared_error


# --------------------------------------------------------------------------- Metric classes
_METRIC_CLASSES = ("BinaryAUC", "LogLoss", "GroupAUC", "RetrievalTopK")


def __getattr__(name: str) -> Any:
    """The torchmetrics-based classes, imported on first use (torchmetrics and Lightning
    weigh ~100 MB and seconds of start-up that a scoring script does not need)."""
    if name in _METRIC_CLASSES:
        from . import _metric_states

        return getattr(_metric_states, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
