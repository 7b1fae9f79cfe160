"""The :class:`torchmetrics.Metric` classes of :mod:`rechub_lightning.metrics`: state that
accumulates over batches and synchronises across processes, so a distributed evaluation
gives the numbers a single process would. Import them from :mod:`rechub_lightning.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .metrics import (
    TOPK_METRIC_NAMES,
    GroupWeights,
    RelevantLike,
    _check_binary,
    _check_ks,
    _check_same_length,
    _log_loss_sum,
    _topk_dict,
    _topk_sums,
    auc_score,
    gauc_score,
)

__all__ = ["BinaryAUC", "LogLoss", "GroupAUC", "RetrievalTopK"]


def _cat(state: Tensor | list[Tensor], dtype: torch.dtype) -> Tensor:
    """A list state as one tensor (it is one already after a distributed sync)."""
    if isinstance(state, list) and not state:
        return torch.empty(0, dtype=dtype)
    return dim_zero_cat(state)


class _CatStateMetric(Metric):
    """A Metric with concatenated list states that survive an empty rank under DDP.

    When a rank saw no batch, torchmetrics stands in an empty tensor of ``self.dtype``
    for its list states; gathering that next to another rank's integer state mixes
    dtypes. We put in an empty tensor of the right dtype first.
    """

    _list_state_dtypes: dict[str, torch.dtype | None]  # None: the metric's float dtype

    def sync(
        self,
        dist_sync_fn: Any = None,
        process_group: Any = None,
        should_sync: bool = True,
        distributed_available: Any = None,
    ) -> None:
        """Fill empty list states with a typed empty tensor, then :meth:`Metric.sync`."""
        for name, dtype in self._list_state_dtypes.items():
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                setattr(self, name, [torch.empty(0, dtype=dtype or self.dtype, device=self.device)])
        super().sync(
            dist_sync_fn=dist_sync_fn,
            process_group=process_group,
            should_sync=should_sync,
            distributed_available=distributed_available,
        )


class BinaryAUC(_CatStateMetric):
    """Binary ROC AUC accumulated over batches (see :func:`auc_score`).

    With ``thresholds=None`` (default) the value is exact: every score is kept (list
    states, concatenated across processes), in the metric's float dtype (float32; use
    ``metric.set_dtype(torch.float64)`` to keep float64 scores). With an int, scores must be
    probabilities and are counted into that many equal-width bins over ``[0, 1]``
    (constant memory, summed across processes); the value is then the exact AUC of the
    binned scores, scores sharing a bin counting as ties.

    Returns ``nan`` with a warning when only one class was seen or a score is NaN.

    Args:
        thresholds: ``None`` for the exact AUC or a number of bins (>= 2).
        name: what the warnings call this metric (e.g. ``"val/auc"``).
        validate_args: check that targets are binary (and, binned, that scores are in ``[0, 1]``).
        **kwargs: :class:`torchmetrics.Metric` options (``dist_sync_on_step``, ...).

    Raises:
        ValueError: if ``thresholds`` is not None nor an int >= 2.

    Example:
        >>> import torch
        >>> metric = BinaryAUC()
        >>> metric.update(torch.tensor([0.1, 0.4]), torch.tensor([0, 0]))
        >>> metric.update(torch.tensor([0.35, 0.8]), torch.tensor([1, 1]))
        >>> metric.compute()
        tensor(0.7500)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, thresholds: int | None = None, name: str | None = None, validate_args: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if thresholds is not None and (isinstance(thresholds, bool) or not isinstance(thresholds, int) or thresholds < 2):
            raise ValueError(f"thresholds must be None or an int >= 2, got {thresholds!r}")
        self.thresholds = thresholds
        self.name = name or type(self).__name__
        self.validate_args = validate_args
        if thresholds is None:
            self.add_state("preds", default=[], dist_reduce_fx="cat")
            self.add_state("target", default=[], dist_reduce_fx="cat")
            self._list_state_dtypes = {"preds": None, "target": None}
        else:
            self.add_state("pos_hist", default=torch.zeros(thresholds, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("neg_hist", default=torch.zeros(thresholds, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("nan_count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
            self._list_state_dtypes = {}

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of scores and binary labels."""
        _check_same_length(preds=preds, target=target)
        preds, target = preds.detach().flatten(), target.detach().flatten()
        if self.validate_args:
            _check_binary(target)
        if self.thresholds is None:
            self.preds.append(preds.to(self.dtype))
            self.target.append(target.to(self.dtype))
            return
        if self.validate_args and preds.numel() and bool(((preds < 0) | (preds > 1)).any()):
            raise ValueError(f"{self.name}: binned AUC needs probabilities in [0, 1]")
        nan = torch.isnan(preds)
        self.nan_count += nan.sum()
        bins = (preds.double() * self.thresholds).long().clamp(0, self.thresholds - 1)
        pos = (target != 0) & ~nan
        self.pos_hist += torch.bincount(bins[pos], minlength=self.thresholds)
        self.neg_hist += torch.bincount(bins[~pos & ~nan], minlength=self.thresholds)

    def compute(self) -> Tensor:
        """The AUC so far (``nan`` with a warning if only one class was seen or a score is NaN)."""
        if self.thresholds is None:
            preds, target = _cat(self.preds, self.dtype), _cat(self.target, self.dtype)
            n_pos = int((target != 0).sum())
            n_neg = target.numel() - n_pos
            n_nan = int(torch.isnan(preds).sum())
        else:
            n_pos, n_neg = int(self.pos_hist.sum()), int(self.neg_hist.sum())
            n_nan = int(self.nan_count)
        if n_nan:
            rank_zero_warn(f"{self.name}: {n_nan} score(s) are NaN (the model diverged?); returning NaN.")
            return torch.tensor(float("nan"), device=self.device)
        if n_pos == 0 or n_neg == 0:
            rank_zero_warn(
                f"{self.name}: AUC is undefined with {n_pos} positive and {n_neg} negative labels; returning NaN."
            )
            return torch.tensor(float("nan"), device=self.device)
        if self.thresholds is None:
            return auc_score(preds, target)
        neg_below = torch.cumsum(self.neg_hist, 0) - self.neg_hist
        won2 = (self.pos_hist * (2 * neg_below + self.neg_hist)).sum()
        return (won2.double() / (2.0 * n_pos * n_neg)).float()


class LogLoss(Metric):
    """Mean binary cross-entropy accumulated over batches (see :func:`log_loss`).

    Keeps a float64 sum and a row count, summed across processes: the value equals
    :func:`sklearn.metrics.log_loss` on all rows.

    Args:
        from_logits: whether the scores passed to ``update`` are logits (else probabilities).
        validate_args: check that labels, and probabilities, lie in ``[0, 1]``.
        **kwargs: :class:`torchmetrics.Metric` options.

    Example:
        >>> import torch
        >>> metric = LogLoss(from_logits=True)
        >>> metric.update(torch.tensor([0.0, 0.0]), torch.tensor([0, 1]))
        >>> metric.compute()
        tensor(0.6931)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, from_logits: bool = False, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.from_logits = from_logits
        self.validate_args = validate_args
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of scores (probabilities or logits) and labels."""
        total, count = _log_loss_sum(preds, target, self.from_logits, validate=self.validate_args)
        self.total += total.to(self.total.dtype)
        self.count += count

    def compute(self) -> Tensor:
        """The mean log loss so far (``nan`` before any row)."""
        if int(self.count) == 0:
            return torch.tensor(float("nan"), device=self.device)
        return (self.total.double() / self.count.double()).float()


class GroupAUC(_CatStateMetric):
    """Group (user) AUC accumulated over batches (see :func:`gauc_score`).

    Keeps every score, label and group id (list states, concatenated across processes),
    so rows of one group may arrive in different batches or on different processes.
    Groups with a single class are skipped; ``nan`` with a warning if none is left.

    Args:
        weights: ``"count"`` (rows per group), ``"uniform"`` or a ``{group: weight}`` mapping.
        name: what the warnings call this metric (e.g. ``"val/gauc"``).
        validate_args: check that targets are binary.
        **kwargs: :class:`torchmetrics.Metric` options.

    Example:
        >>> import torch
        >>> metric = GroupAUC()
        >>> metric.update(torch.tensor([0.9, 0.1]), torch.tensor([1, 0]), torch.tensor([0, 0]))
        >>> metric.update(torch.tensor([0.3, 0.8]), torch.tensor([1, 0]), torch.tensor([1, 1]))
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, weights: GroupWeights = "count", name: str | None = None, validate_args: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(weights, Mapping) and weights not in ("count", "uniform"):
            raise ValueError(f"weights must be 'count', 'uniform' or a mapping, got {weights!r}")
        self.weights = weights
        self.name = name or type(self).__name__
        self.validate_args = validate_args
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        self._list_state_dtypes = {"preds": None, "target": None, "groups": torch.long}

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Add a batch of scores, binary labels and integer group ids."""
        _check_same_length(preds=preds, target=target, groups=groups)
        if self.validate_args:
            _check_binary(target)
        self.preds.append(preds.detach().flatten().to(self.dtype))
        self.target.append(target.detach().flatten().to(self.dtype))
        self.groups.append(groups.detach().flatten().long())

    def compute(self) -> Tensor:
        """The group AUC so far (``nan`` with a warning if no group has both classes)."""
        preds, target = _cat(self.preds, self.dtype), _cat(self.target, self.dtype)
        value = gauc_score(preds, target, _cat(self.groups, torch.long), self.weights)
        if torch.isnan(value):
            rank_zero_warn(f"{self.name}: no group has both positive and negative labels; returning NaN.")
        return value


class RetrievalTopK(Metric):
    """Top-K retrieval metrics accumulated over batches of users (see :func:`topk_metrics`).

    Each ``update`` scores its users at once; the state is the per-metric sum over users
    with a relevant item and their count (summed across processes). A user must appear in
    one batch only. The result equals :func:`topk_metrics` on all users, on one process or
    many, up to float64 summation order.

    Args:
        ks: cut-offs.
        **kwargs: :class:`torchmetrics.Metric` options.

    Raises:
        ValueError: if a cut-off is not a positive int.

    Example:
        >>> import torch
        >>> metric = RetrievalTopK(ks=(2,))
        >>> metric.update(torch.tensor([[3, 1, 2]]), [[1]])
        >>> metric.update(torch.tensor([[0, 4, 5]]), [[7, 8]])
        >>> metric.compute()["recall@2"]
        0.5
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] | int = (5, 10, 20), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = _check_ks(ks)
        n = len(self.ks) * len(TOPK_METRIC_NAMES)
        self.add_state("sums", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_users", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, topk_items: RelevantLike, relevant: RelevantLike) -> None:
        """Add a batch of users: their ranked items ``(B, K)`` and held-out items ``(B, M)`` or lists."""
        sums, n_users = _topk_sums(topk_items, relevant, self.ks)
        self.sums += sums.to(self.sums)
        self.n_users += n_users

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        """``{"recall@k": ..., "hitrate@k": ..., "precision@k": ..., "ndcg@k": ..., "mrr@k": ...}``."""
        return _topk_dict(self.sums, int(self.n_users), self.ks)
