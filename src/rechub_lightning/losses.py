"""Losses for matching (retrieval) models and L1/L2 regularization.

Pure PyTorch, no Lightning. The functions are the truth; the ``nn.Module``
classes are thin wrappers for code that wants a criterion object.

* :func:`bpr_loss` -- Bayesian Personalised Ranking (Rendle et al., UAI 2009),
  computed with ``softplus`` so that huge margins give no ``inf``/``NaN``.
* :func:`hinge_loss` -- pair-wise margin loss.
* :func:`list_wise_loss` -- softmax cross entropy with the positive at index 0
  (Torch-RecHub's ``mode=2``).
* :func:`sampled_softmax_loss` -- in-batch softmax with temperature, logQ
  correction (Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large
  Corpus Item Recommendations", RecSys 2019) and accidental-hit masking.
* :func:`nce_loss` / :func:`in_batch_nce_loss` -- softmax cross entropy over a
  vocabulary of items with a temperature and a padding target that is ignored
  (Torch-RecHub's ``NCELoss`` / ``InBatchNCELoss``, used by its generative models).
* :func:`in_batch_negative_scores` -- vectorised in-batch negative sampling
  (uniform or hardest), the replacement for the reference's per-row loop;
  :func:`inbatch_negative_sampling` / :func:`gather_inbatch_logits` are the
  reference's two-step API (indices, then logits) on the same sampler.
* :func:`get_loss_func` -- the default loss of a task type (logits in).
* :class:`RegularizationLoss` -- L1/L2 on embedding vs dense parameters,
  same formula as ``torch_rechub.basic.loss_func.RegularizationLoss``.
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "bpr_loss",
    "BPRLoss",
    "hinge_loss",
    "HingeLoss",
    "list_wise_loss",
    "sampled_softmax_loss",
    "in_batch_negative_scores",
    "inbatch_negative_sampling",
    "gather_inbatch_logits",
    "get_loss_func",
    "nce_loss",
    "NCELoss",
    "in_batch_nce_loss",
    "InBatchNCELoss",
    "masked_fill_value",
    "RegularizationLoss",
]

Reduction = Literal["mean", "sum", "none"]

_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORM_LAYERS = (*_NORM_LAYERS, nn.RMSNorm)


def masked_fill_value(dtype: torch.dtype) -> float:
    """Large negative *finite* score used for masked logits.

    ``-inf`` turns into ``NaN`` as soon as a whole row is masked or a
    difference of two masked scores is taken; a finite value a quarter of the
    dtype's range stays finite in float16/bfloat16/float32 through the usual
    ``pos - neg`` and ``logsumexp`` arithmetic, and gives ``exp(...) == 0``.

    Args:
        dtype: Floating dtype of the scores.

    Returns:
        The fill value, e.g. about ``-8.5e37`` for float32 and ``-16376`` for
        float16.
    """
    return torch.finfo(dtype).min / 4


def _reduce(loss: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _pair_difference(pos_score: Tensor, neg_score: Tensor) -> Tensor:
    """``pos - neg`` with ``pos`` broadcast over the negatives of its row."""
    pos = pos_score.reshape(-1)
    if neg_score.dim() <= 1:
        return pos - neg_score.reshape(-1)
    return pos.unsqueeze(-1) - neg_score.reshape(pos.shape[0], -1)


def bpr_loss(pos_score: Tensor, neg_score: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Bayesian Personalised Ranking loss (Rendle et al., UAI 2009).

    ``-log(sigmoid(pos - neg))``, written as ``softplus(neg - pos)`` so that a
    margin of ``-1e4`` gives ``1e4`` (not ``inf``) and ``+1e4`` gives ``0``.

    Args:
        pos_score: Positive scores, shape ``(B,)`` or ``(B, 1)``.
        neg_score: Negative scores, shape ``(B,)`` (one negative per row) or
            ``(B, N)`` (``pos`` is broadcast over the ``N`` negatives).
        reduction: ``"mean"`` (default, over all pairs), ``"sum"`` or
            ``"none"``.

    Returns:
        The loss (a scalar unless ``reduction="none"``).

    Example:
        >>> round(float(bpr_loss(torch.tensor([0.0]), torch.tensor([0.0]))), 4)  # log 2
        0.6931
    """
    return _reduce(F.softplus(-_pair_difference(pos_score, neg_score)), reduction)


class BPRLoss(nn.Module):
    """Module wrapper of :func:`bpr_loss`.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    def __init__(self, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.reduction: Reduction = reduction

    def forward(self, pos_score: Tensor, neg_score: Tensor) -> Tensor:
        """See :func:`bpr_loss`."""
        return bpr_loss(pos_score, neg_score, reduction=self.reduction)


def hinge_loss(
    pos_score: Tensor,
    neg_score: Tensor,
    margin: float = 2.0,
    *,
    hardest_negative: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    """Pair-wise hinge loss ``relu(margin - pos + neg)``.

    Args:
        pos_score: Positive scores, shape ``(B,)`` or ``(B, 1)``.
        neg_score: Negative scores, ``(B,)`` or ``(B, N)``.
        margin: Required gap between positive and negative scores
            (default 2, as in Torch-RecHub's ``HingeLoss``).
        hardest_negative: If True, only the highest negative of each row
            counts (``relu(margin - pos + max_j neg_j)``); this is what
            Torch-RecHub's ``HingeLoss`` does for ``(B, N)`` negatives. By
            default every (positive, negative) pair counts.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The loss.
    """
    if hardest_negative and neg_score.dim() > 1:
        neg_score = neg_score.reshape(pos_score.reshape(-1).shape[0], -1).amax(dim=-1)
    return _reduce(F.relu(margin - _pair_difference(pos_score, neg_score)), reduction)


class HingeLoss(nn.Module):
    """Module wrapper of :func:`hinge_loss`.

    Args:
        margin: Margin (default 2).
        hardest_negative: See :func:`hinge_loss`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    def __init__(self, margin: float = 2.0, hardest_negative: bool = False, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.margin = float(margin)
        self.hardest_negative = hardest_negative
        self.reduction: Reduction = reduction

    def forward(self, pos_score: Tensor, neg_score: Tensor) -> Tensor:
        """See :func:`hinge_loss`."""
        return hinge_loss(
            pos_score, neg_score, self.margin, hardest_negative=self.hardest_negative, reduction=self.reduction
        )


def list_wise_loss(scores: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Softmax cross entropy with the positive item in column 0.

    This is Torch-RecHub's list-wise ``mode=2`` (and its in-batch loss for
    modes 0 and 2). Point-wise training is plain
    ``binary_cross_entropy_with_logits`` and is left to callers.

    Args:
        scores: Logits ``(B, 1 + N)``: the positive first, then ``N``
            negatives.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The loss.

    Raises:
        ValueError: If ``scores`` is not 2-D with at least two columns.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"list_wise_loss expects scores of shape (B, 1 + N) with N >= 1, got {tuple(scores.shape)}")
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores, target, reduction=reduction)


def _accidental_hits(item_ids: Tensor, batch_size: int) -> Tensor:
    """``(B, B)`` bool: ``item_ids[j] == item_ids[i]`` and ``j != i``."""
    ids = item_ids.reshape(-1)
    if ids.shape[0] != batch_size:
        raise ValueError(f"item_ids has {ids.shape[0]} entries, expected the batch size {batch_size}")
    same = ids.unsqueeze(0) == ids.unsqueeze(1)
    return same & ~torch.eye(batch_size, dtype=torch.bool, device=same.device)


def _score_matrix(user_emb: Tensor, item_emb: Tensor) -> Tensor:
    if user_emb.dim() != 2 or item_emb.dim() != 2 or user_emb.shape != item_emb.shape:
        raise ValueError(
            "in-batch scoring needs user and item embeddings of the same shape (B, D), got "
            f"{tuple(user_emb.shape)} and {tuple(item_emb.shape)}"
        )
    return user_emb @ item_emb.transpose(0, 1)


def sampled_softmax_loss(
    user_emb: Tensor | None = None,
    item_emb: Tensor | None = None,
    *,
    scores: Tensor | None = None,
    temperature: float = 1.0,
    item_log_q: Tensor | None = None,
    item_ids: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """In-batch sampled softmax: every other item of the batch is a negative.

    ``logits[i, j] = <u_i, v_j> / temperature - log q_j`` with the target on
    the diagonal. The logQ term (Yi et al., RecSys 2019) removes the bias
    towards popular items, which appear as in-batch negatives in proportion
    to their sampling probability ``q_j``; it is applied to every column,
    the positive included, after the temperature (as TensorFlow
    Recommenders does). Accidental hits -- column ``j != i`` holding the same
    item as row ``i`` -- are masked with :func:`masked_fill_value`.

    Args:
        user_emb: ``(B, D)`` query embeddings.
        item_emb: ``(B, D)`` embeddings of each row's positive item.
        scores: Alternatively a precomputed ``(B, B)`` score matrix
            ``scores[i, j] = <u_i, v_j>`` (then omit the embeddings).
        temperature: Logits are divided by it (must be > 0).
        item_log_q: Optional ``(B,)`` log sampling probability of each
            in-batch item.
        item_ids: Optional ``(B,)`` item ids for accidental-hit masking.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The loss.

    Raises:
        ValueError: On inconsistent inputs or a non-positive temperature.
    """
    if scores is None:
        if user_emb is None or item_emb is None:
            raise ValueError("pass either user_emb and item_emb, or scores=")
        logits = _score_matrix(user_emb, item_emb)
    else:
        if user_emb is not None or item_emb is not None:
            raise ValueError("pass either user_emb and item_emb, or scores=, not both")
        if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
            raise ValueError(f"scores must be a square (B, B) matrix, got {tuple(scores.shape)}")
        logits = scores
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch_size = logits.shape[0]
    if temperature != 1.0:
        logits = logits / temperature
    if item_log_q is not None:
        logits = logits - item_log_q.reshape(1, -1).to(logits.dtype)
    if item_ids is not None:
        logits = logits.masked_fill(_accidental_hits(item_ids, batch_size), masked_fill_value(logits.dtype))
    target = torch.arange(batch_size, device=logits.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def in_batch_negative_scores(
    user_emb: Tensor,
    item_emb: Tensor,
    ratio: int,
    hard_negative: bool = False,
    generator: torch.Generator | None = None,
    item_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Positive and sampled in-batch negative scores, without a per-row loop.

    The score matrix is ``S = U @ I.T``; row ``i``'s positive is ``S[i, i]``
    and its candidates are the other columns, minus accidental hits
    (``item_ids[j] == item_ids[i]``) when ``item_ids`` is given.

    * uniform (default): ``ratio`` candidates drawn without replacement,
      uniformly (top-``ratio`` of i.i.d. uniform keys, invalid columns keyed
      below every valid one);
    * ``hard_negative=True``: the ``ratio`` highest-scoring candidates.

    A row with fewer than ``ratio`` valid candidates (many accidental hits)
    gets :func:`masked_fill_value` in the surplus slots: such a score adds
    exactly 0 to a softmax and (numerically) 0 to BPR and hinge terms.

    Args:
        user_emb: ``(B, D)`` user embeddings.
        item_emb: ``(B, D)`` item embeddings, row ``i`` the positive of user ``i``.
        ratio: Negatives per row, ``1 <= ratio < B``.
        hard_negative: Pick the hardest negatives instead of uniform ones.
        generator: Optional generator for the uniform draw (reproducibility).
        item_ids: Optional ``(B,)`` ids for accidental-hit masking.

    Returns:
        ``(pos_score (B,), neg_scores (B, ratio))``; gradients flow into both.

    Raises:
        ValueError: If ``in_batch_neg_ratio`` (``ratio``) is not in ``[1, B)``
            or the shapes do not match.
    """
    scores = _score_matrix(user_emb, item_emb)
    batch_size = scores.shape[0]
    ratio = int(ratio)
    if ratio < 1 or ratio >= batch_size:
        raise ValueError(
            f"in_batch_neg_ratio must be in [1, batch_size) = [1, {batch_size}), got {ratio}; "
            "lower in_batch_neg_ratio or raise the batch size"
        )
    invalid = torch.eye(batch_size, dtype=torch.bool, device=scores.device)
    if item_ids is not None:
        invalid = invalid | _accidental_hits(item_ids.to(scores.device), batch_size)
    masked = scores.masked_fill(invalid, masked_fill_value(scores.dtype))
    index = _negative_index(masked, ratio, hard_negative, generator, invalid)
    return torch.diagonal(scores), masked.gather(1, index)


def _negative_index(
    scores: Tensor, ratio: int, hard_negative: bool, generator: torch.Generator | None, invalid: Tensor | None = None
) -> Tensor:
    """``(B, ratio)`` column indices: the highest ``scores``, or a uniform draw without replacement.

    The uniform draw takes the top-``ratio`` of i.i.d. uniform keys; ``invalid`` columns (the
    hard path expects them already masked in ``scores``) are keyed below every valid one.
    """
    if hard_negative:
        return scores.detach().topk(ratio, dim=1).indices
    gen_device = generator.device if generator is not None else scores.device
    keys = torch.rand(scores.shape, generator=generator, device=gen_device).to(scores.device)
    if invalid is not None:
        keys = keys.masked_fill(invalid, -1.0)  # valid keys are in [0, 1)
    return keys.topk(ratio, dim=1).indices


def _off_diagonal(x: Tensor) -> Tensor:
    """``(B, B) -> (B, B - 1)``: row ``i`` without column ``i`` (a view when ``x`` is contiguous)."""
    b = x.shape[0]
    return x.flatten()[1:].view(b - 1, b + 1)[:, :-1].reshape(b, b - 1)


def _square_scores(scores: Tensor, fn: str) -> int:
    """The batch size of a ``(B, B)`` score matrix, ``B > 1``."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"{fn} expects scores as a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"{fn} expects square (B, B) scores, got shape {tuple(scores.shape)}")
    if scores.shape[0] <= 1:
        raise ValueError(f"{fn} requires batch_size > 1, got scores of shape {tuple(scores.shape)}")
    return scores.shape[0]


def inbatch_negative_sampling(
    scores: Tensor,
    neg_ratio: int | None = None,
    hard_negative: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """In-batch negative column indices from a ``(B, B)`` similarity matrix, without a per-row loop.

    Torch-RecHub's ``torch_rechub.utils.match.inbatch_negative_sampling`` with the same
    arguments, defaults and output; row ``i``'s positive is column ``i``, never returned.

    * uniform (default): ``neg_ratio`` distinct columns drawn uniformly without replacement
      (same distribution as the reference's per-row ``randperm``, other random numbers);
    * ``hard_negative=True``: the ``neg_ratio`` highest-scoring other columns (the
      reference's ``topk``).

    Args:
        scores: ``(B, B)`` scores, ``scores[i, j] = <user_i, item_j>``.
        neg_ratio: Negatives per row; ``None``, ``<= 0`` or ``> B - 1`` mean ``B - 1``, as in
            the reference.
        hard_negative: Pick the hardest negatives instead of uniform ones.
        generator: Optional generator of the uniform draw (reproducibility).

    Returns:
        ``(B, neg_ratio)`` int64 column indices, on ``scores``' device.

    Raises:
        TypeError: If ``scores`` is not a tensor.
        ValueError: If ``scores`` is not a square 2-D matrix or ``B <= 1``.
    """
    batch_size = _square_scores(scores, "inbatch_negative_sampling")
    max_neg = batch_size - 1
    ratio = max_neg if neg_ratio is None or neg_ratio <= 0 or neg_ratio > max_neg else int(neg_ratio)
    # Sampled among the B - 1 other columns, so the positive can never come back (not even for
    # -inf or NaN scores), then shifted back to column numbers.
    index = _negative_index(_off_diagonal(scores.detach()), ratio, hard_negative, generator)
    return index + (index >= torch.arange(batch_size, device=index.device).unsqueeze(1))


def gather_inbatch_logits(scores: Tensor, neg_indices: Tensor) -> Tensor:
    """``[positive, negatives]`` logits per row: ``scores[i, i]`` then ``scores[i, neg_indices[i]]``.

    Torch-RecHub's ``torch_rechub.utils.match.gather_inbatch_logits``; gradients flow into
    ``scores``.

    Args:
        scores: ``(B, B)`` scores.
        neg_indices: ``(B, K)`` integer column indices, e.g. from
            :func:`inbatch_negative_sampling`.

    Returns:
        ``(B, 1 + K)`` logits, the positive in column 0 (the layout :func:`list_wise_loss`
        expects).

    Raises:
        TypeError: If an argument is not a tensor or ``neg_indices`` is not integer.
        ValueError: On a non-square ``scores`` or ``neg_indices`` without one row per row of it.
    """
    batch_size = _square_scores(scores, "gather_inbatch_logits")
    if not isinstance(neg_indices, Tensor) or neg_indices.is_floating_point() or neg_indices.is_complex():
        raise TypeError(f"neg_indices must be an integer tensor, got {getattr(neg_indices, 'dtype', type(neg_indices).__name__)}")
    if neg_indices.dim() != 2 or neg_indices.shape[0] != batch_size:
        raise ValueError(f"neg_indices must have shape ({batch_size}, K), got {tuple(neg_indices.shape)}")
    negatives = scores.gather(1, neg_indices.to(device=scores.device, dtype=torch.long))
    return torch.cat([torch.diagonal(scores).unsqueeze(1), negatives], dim=1)


def nce_loss(
    logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    ignore_index: int | None = 0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Softmax cross entropy of the target item over the whole vocabulary, with a temperature.

    ``-log softmax(logits / temperature)[target]`` per position; positions whose target is
    ``ignore_index`` (the padding id of a sequence) add nothing. This is what Torch-RecHub
    0.9.0's ``NCELoss`` computes (its name notwithstanding: every item of the vocabulary is a
    negative, nothing is sampled), with two of its edge cases mended:

    * a batch whose targets are all ``ignore_index`` gives a zero loss (no gradient) under
      ``"mean"``/``"sum"``; the reference then averaged the padding positions' losses in;
    * ``reduction="none"`` keeps the targets' shape, with zeros at ignored positions (as
      :func:`torch.nn.functional.cross_entropy` does); the reference returned only the kept
      positions, so the shape depended on the data.

    Args:
        logits: ``(..., V)`` scores of every item (e.g. ``(B, V)`` or ``(B, L, V)``).
        targets: ``(...)`` integer item ids in ``[0, V)``.
        temperature: Logits are divided by it (must be > 0).
        ignore_index: Target id to ignore (``None``: none is).
        reduction: ``"mean"`` (over the positions not ignored), ``"sum"`` or ``"none"``.

    Raises:
        ValueError: On a non-positive temperature or mismatched shapes.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() < 2 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"nce_loss needs logits of shape (..., V) and targets of the leading shape, got logits "
            f"{tuple(logits.shape)} and targets {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer item ids, got dtype {targets.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    flat = logits.reshape(-1, logits.shape[-1])
    if temperature != 1.0:
        flat = flat / temperature
    t = targets.reshape(-1).long()
    ignore = -100 if ignore_index is None else int(ignore_index)
    per = F.cross_entropy(flat, t, ignore_index=ignore, reduction="none")  # 0 at ignored positions
    if reduction == "none":
        return per.reshape(targets.shape)
    if reduction == "sum":
        return per.sum()
    kept = (t != ignore).sum()
    return per.sum() / kept.clamp(min=1)


def in_batch_nce_loss(
    embeddings: Tensor,
    item_embeddings: Tensor,
    targets: Tensor,
    temperature: float = 0.1,
    ignore_index: int | None = 0,
    reduction: Reduction = "mean",
) -> Tensor:
    """:func:`nce_loss` of the scores ``embeddings @ item_embeddings.T``.

    Torch-RecHub 0.9.0's ``InBatchNCELoss``: ``embeddings`` ``(..., D)`` are the query (user
    or sequence position) vectors, ``item_embeddings`` ``(V, D)`` the candidate items,
    ``targets`` ``(...)`` each query's item id (row of ``item_embeddings``).
    """
    if item_embeddings.dim() != 2 or embeddings.shape[-1] != item_embeddings.shape[-1]:
        raise ValueError(
            f"in_batch_nce_loss needs embeddings (..., D) and item_embeddings (V, D), got "
            f"{tuple(embeddings.shape)} and {tuple(item_embeddings.shape)}"
        )
    return nce_loss(embeddings @ item_embeddings.transpose(0, 1), targets, temperature, ignore_index, reduction)


class _NCECriterion(nn.Module):
    def __init__(self, temperature: float, ignore_index: int | None, reduction: Reduction) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction: Reduction = reduction


class NCELoss(_NCECriterion):
    """Criterion form of :func:`nce_loss` (Torch-RecHub's ``NCELoss`` arguments)."""

    def __init__(self, temperature: float = 1.0, ignore_index: int | None = 0, reduction: Reduction = "mean") -> None:
        super().__init__(temperature, ignore_index, reduction)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return nce_loss(logits, targets, self.temperature, self.ignore_index, self.reduction)


class InBatchNCELoss(_NCECriterion):
    """Criterion form of :func:`in_batch_nce_loss` (Torch-RecHub's ``InBatchNCELoss`` arguments)."""

    def __init__(self, temperature: float = 0.1, ignore_index: int | None = 0, reduction: Reduction = "mean") -> None:
        super().__init__(temperature, ignore_index, reduction)

    def forward(self, embeddings: Tensor, item_embeddings: Tensor, targets: Tensor) -> Tensor:
        return in_batch_nce_loss(embeddings, item_embeddings, targets, self.temperature, self.ignore_index, self.reduction)


_TASK_TYPES = ("classification", "regression")


def get_loss_func(task_type: str = "classification") -> nn.Module:
    """The default training loss of a task type, for our logit-returning models.

    Torch-RecHub's ``torch_rechub.utils.data.get_loss_func``, except that classification gets
    ``BCEWithLogitsLoss``: our models return logits, where the reference's returned
    probabilities and got ``BCELoss`` (for a Torch-RecHub model object, which returns
    probabilities, use ``nn.BCELoss()``).

    Args:
        task_type: ``"classification"`` or ``"regression"``.

    Returns:
        ``nn.BCEWithLogitsLoss()`` or ``nn.MSELoss()`` (a new instance).

    Raises:
        ValueError: On any other ``task_type``.
    """
    if task_type == "classification":
        return nn.BCEWithLogitsLoss()
    if task_type == "regression":
        return nn.MSELoss()
    raise ValueError(f"task_type must be one of {_TASK_TYPES}, got task_type={task_type!r}")


class RegularizationLoss(nn.Module):
    """L1/L2 penalty on embedding and dense parameters.

    Same formula as ``torch_rechub.basic.loss_func.RegularizationLoss``
    (no 0.5 factor)::

        embedding_l1 * sum|e| + embedding_l2 * sum e**2
        + dense_l1 * sum|w| + dense_l2 * sum w**2

    where ``e`` runs over parameters of ``nn.Embedding``/``nn.EmbeddingBag``
    modules and ``w`` over every other parameter that requires grad, except
    those of normalization layers (BatchNorm*, LayerNorm, GroupNorm,
    InstanceNorm*, RMSNorm), which are skipped. A parameter shared between
    modules is counted once; if it belongs to an embedding module it counts
    as embedding. Note that with ``nn.Embedding(sparse=True)`` an embedding
    penalty produces a dense gradient for the whole table.

    The parameter partition is cached per model (weakly referenced); call
    :meth:`reset_cache` after adding or replacing modules of a model already
    seen. ``requires_grad`` is re-checked at every call.

    Args:
        embedding_l1: L1 coefficient for embedding parameters.
        embedding_l2: L2 coefficient for embedding parameters.
        dense_l1: L1 coefficient for the other parameters.
        dense_l2: L2 coefficient for the other parameters.

    Raises:
        ValueError: If a coefficient is negative.
    """

    def __init__(
        self, embedding_l1: float = 0.0, embedding_l2: float = 0.0, dense_l1: float = 0.0, dense_l2: float = 0.0
    ) -> None:
        super().__init__()
        for name, value in (
            ("embedding_l1", embedding_l1),
            ("embedding_l2", embedding_l2),
            ("dense_l1", dense_l1),
            ("dense_l2", dense_l2),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.embedding_l1 = float(embedding_l1)
        self.embedding_l2 = float(embedding_l2)
        self.dense_l1 = float(dense_l1)
        self.dense_l2 = float(dense_l2)
        self._partitions: weakref.WeakKeyDictionary[nn.Module, list[tuple[nn.Parameter, bool]]]
        self._partitions = weakref.WeakKeyDictionary()

    @property
    def active(self) -> bool:
        """Whether any coefficient is non-zero."""
        return any(c > 0 for c in (self.embedding_l1, self.embedding_l2, self.dense_l1, self.dense_l2))

    def reset_cache(self) -> None:
        """Forget the cached parameter partitions."""
        self._partitions = weakref.WeakKeyDictionary()

    @staticmethod
    def partition(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
        """Classify a model's parameters; normalization-layer parameters are dropped.

        Args:
            model: Any module.

        Returns:
            ``(parameter, is_embedding)`` pairs in ``model.parameters()`` order.
        """
        norm_ids: set[int] = set()
        emb_ids: set[int] = set()
        for module in model.modules():
            if isinstance(module, _NORM_LAYERS):
                norm_ids.update(id(p) for p in module.parameters())
            elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                emb_ids.update(id(p) for p in module.parameters())
        return [(p, id(p) in emb_ids) for p in model.parameters() if id(p) in emb_ids or id(p) not in norm_ids]

    def forward(self, model: nn.Module) -> Tensor:
        """Compute the penalty of ``model``.

        Args:
            model: The model to regularise.

        Returns:
            A scalar tensor (a 0 tensor, without touching the parameters,
            when every coefficient is 0).
        """
        if not self.active:
            return torch.zeros(())
        parts = self._partitions.get(model)
        if parts is None:
            parts = self.partition(model)
            self._partitions[model] = parts
        total: Tensor | None = None
        # Accumulate in parameter order, like the reference, so the sums agree to the last bits.
        for p, is_embedding in parts:
            if not p.requires_grad:
                continue
            l1, l2 = (self.embedding_l1, self.embedding_l2) if is_embedding else (self.dense_l1, self.dense_l2)
            if l1 > 0:
                term = l1 * p.abs().sum()
                total = term if total is None else total + term
            if l2 > 0:
                term = l2 * p.square().sum()
                total = term if total is None else total + term
        return torch.zeros(()) if total is None else total

    def __getstate__(self) -> dict:
        # The weak cache cannot be pickled (ddp_spawn, deepcopy); it is rebuilt on first use.
        state = self.__dict__.copy()
        state["_partitions"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._partitions = weakref.WeakKeyDictionary()

    def extra_repr(self) -> str:
        return (
            f"embedding_l1={self.embedding_l1}, embedding_l2={self.embedding_l2}, "
            f"dense_l1={self.dense_l1}, dense_l2={self.dense_l2}"
        )
