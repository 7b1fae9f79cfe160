"""MatchModule: training and exact full-corpus evaluation of retrieval (matching) models.

Training follows Torch-RecHub's ``MatchTrainer`` (``mode`` 0 point-wise, 1 pair-wise,
2 list-wise; optional in-batch negatives) and adds what it lacks (REFERENCE.md defect
8): a softmax temperature, logQ correction of popularity-biased in-batch negatives
(Yi et al., RecSys'19), masking of accidental hits, and a vectorised in-batch sampler.
Validation and test retrieve from the whole item corpus and report Recall, HitRate,
NDCG, MRR and Precision at K, which ``EarlyStopping``/``ModelCheckpoint`` can monitor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..data.datasets import check_int
from ..data.match import SEEN_ITEMS_KEY
from ..losses import bpr_loss, list_wise_loss, masked_fill_value, sampled_softmax_loss
from ..metrics import BinaryAUC, RetrievalTopK
from ..models.base import unwrap_model
from ..retrieval import topk_search
from .base import RecModule, split_batch

__all__ = ["MatchModule", "SEEN_ITEMS_KEY", "in_batch_logits", "score_matrix", "has_towers"]


_PROB_EPS = 1e-7
_MODES = (0, 1, 2)


def has_towers(model: nn.Module) -> bool:
    """Whether ``model`` has callable ``user_tower`` and ``item_tower`` (in-batch negatives need both)."""
    inner = unwrap_model(model)
    return callable(getattr(inner, "user_tower", None)) and callable(getattr(inner, "item_tower", None))


def score_matrix(user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """``S[i, j] = <user_i, item_j>``; a multi-interest user ``(B, K, D)`` scores by its best interest."""
    if user.dim() == 3 and user.shape[1] == 1:
        user = user.squeeze(1)
    if item.dim() == 3 and item.shape[1] == 1:
        item = item.squeeze(1)
    if item.dim() != 2:
        raise ValueError(f"item_tower must return (B, D) embeddings, got shape {tuple(item.shape)}")
    if user.dim() == 2:
        return user @ item.T
    if user.dim() == 3:
        return torch.einsum("bkd,nd->bkn", user, item).amax(dim=1)
    raise ValueError(f"user_tower must return (B, D) or (B, K, D) embeddings, got shape {tuple(user.shape)}")


def _gather_rows(t: torch.Tensor, sizes: Sequence[int], sync_grads: bool) -> torch.Tensor:
    """Concatenate every rank's ``t`` (rank order; ``sizes[r]`` rows on rank ``r``) along dim 0.

    Ranks may hold different row counts (a short final batch, point-wise batches filtered
    to their positives): rows are padded to the largest count for the collective and the
    padding is cut off again. With ``sync_grads`` the gradient of every rank's use of this
    rank's rows flows back to ``t`` (``torch.distributed.nn.functional.all_gather``: its
    backward sums the incoming gradients over ranks).
    """
    pad = max(sizes) - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
    t = t.contiguous()
    if sync_grads:
        from torch.distributed.nn.functional import all_gather as all_gather_with_grad

        with warnings.catch_warnings():
            # deprecated in favour of a private functional-collectives API; the autograd semantics we rely on are unchanged
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
            parts = list(all_gather_with_grad(t))
    else:
        parts = [torch.empty_like(t) for _ in sizes]
        dist.all_gather(parts, t)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def in_batch_logits(
    scores: torch.Tensor,
    ratio: int,
    hard_negative: bool = False,
    generator: torch.Generator | None = None,
    item_ids: torch.Tensor | None = None,
    positive: torch.Tensor | None = None,
    row_item_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positive and ``ratio`` in-batch negative logits per row, ``(B, 1 + ratio)``, vectorised.

    Row ``i``'s positive is ``scores[i, i]`` (or ``scores[i, positive[i]]``); its candidates
    are the other columns, minus accidental hits (columns holding row ``i``'s item again)
    when ``item_ids`` is given.
    Uniform draws take the top ``ratio`` of i.i.d. uniform keys (invalid columns keyed
    below every valid one), hard negatives the ``ratio`` highest-scoring candidates. Slots
    left without a valid candidate (tiny batches, many accidental hits) hold
    :func:`~rechub_lightning.losses.masked_fill_value`, which adds nothing to a softmax
    and (numerically) nothing to BPR. The positive is never drawn as a negative.

    Args:
        scores: ``(B, B)`` logits (temperature and logQ already applied), or ``(B, N)`` with
            ``positive`` (e.g. candidates gathered from every rank).
        ratio: negatives per row (``>= 1``).
        hard_negative: take the hardest candidates instead of uniform ones.
        generator: generator of the uniform keys (reproducibility).
        item_ids: ``(N,)`` item ids of the columns, for accidental-hit masking.
        positive: ``(B,)`` column of each row's positive (default: the diagonal).
        row_item_ids: ``(B,)`` item id of each row (default: ``item_ids[positive]``).

    Returns:
        ``(B, 1 + ratio)`` logits, the positive in column 0.
    """
    batch, n_cand = scores.shape
    if positive is None:
        if batch != n_cand:
            raise ValueError(f"scores of shape {tuple(scores.shape)} are not square: pass positive= (each row's column)")
        positive = torch.arange(batch, device=scores.device)
    positive = positive.reshape(-1).to(scores.device)
    columns = torch.arange(n_cand, device=scores.device)
    invalid = columns.unsqueeze(0) == positive.unsqueeze(1)
    if item_ids is not None:
        ids = item_ids.reshape(-1).to(scores.device)
        rows = ids[positive] if row_item_ids is None else row_item_ids.reshape(-1).to(scores.device)
        invalid = invalid | (ids.unsqueeze(0) == rows.unsqueeze(1))
    fill = masked_fill_value(scores.dtype)
    masked = scores.masked_fill(invalid, fill)
    k = min(int(ratio), n_cand - 1)
    if k > 0:
        if hard_negative:
            index = masked.detach().topk(k, dim=1).indices
        else:
            gen_device = generator.device if generator is not None else scores.device
            keys = torch.rand((batch, n_cand), generator=generator, device=gen_device).to(scores.device)
            index = keys.masked_fill(invalid, -1.0).topk(k, dim=1).indices
        neg = masked.gather(1, index)
    else:
        neg = scores.new_empty(batch, 0)
    if k < ratio:
        neg = torch.cat([neg, neg.new_full((batch, int(ratio) - k), fill)], dim=1)
    return torch.cat([scores.gather(1, positive.unsqueeze(1)), neg], dim=1)


class MatchModule(RecModule):
    """Trains a retrieval model and evaluates it by exact top-K search over the item corpus.

    **Losses.** ``mode=0``: binary cross-entropy on the model's logits ``(B,)`` and the
    0/1 labels. ``mode=1``: BPR (Rendle et al., UAI'09) on ``(pos, neg)`` or on a
    ``(B, 1 + N)`` tensor (column 0 positive). ``mode=2``: softmax cross-entropy over
    ``(B, C)`` logits, target = the batch label (0 = column 0, which is what
    :class:`~rechub_lightning.data.MatchDataModule` yields; a full-softmax model may use
    the item id), as in the reference.

    **In-batch negatives** (``in_batch_neg=True``): the model's ``user_tower`` and
    ``item_tower`` embed the batch, every other row's item is a candidate negative and
    ``logit = <u, v> / temperature - log q(item)`` (logQ with ``logq_correction``).
    Without ``in_batch_neg_ratio`` modes 0 and 2 use the full in-batch softmax and mode 1
    BPR against every other item; with it, ``ratio`` negatives per row are drawn without
    replacement (uniformly, or the hardest with ``hard_negative``) by a vectorised
    sampler that never returns the row's own column. ``mask_accidental_hits`` removes
    columns holding the row's item again. Point-wise batches (labels 0/1: the datamodule's
    ``mode`` is 0, or this module's without a datamodule) keep only their positive rows. Multi-interest users score an item by their best interest.

    **Negatives from every rank** (``gather_negatives=True``, off by default): under a
    distributed strategy the item embeddings (and their ids, for logQ and accidental-hit
    masking) are all-gathered from every rank, so each user scores against the
    ``world_size * B`` items of the global batch instead of its rank's ``B``; row ``i``'s
    positive is column ``offset + i`` (``offset`` = rows on lower ranks). The gather keeps
    the autograd graph (``torch.distributed.nn.functional.all_gather``): every rank's loss
    sends gradient to the rank that embedded the item, so after DDP averages gradients the
    item tower receives exactly the gradient of a single process training on the
    concatenated batch. It costs one all-gather of ``(B, D)`` embeddings per step plus its
    backward; with one process it changes nothing.

    **Evaluation.** At the start of validation/test the item corpus
    (``trainer.datamodule.item_corpus()``, or :meth:`set_item_corpus`) is embedded in
    chunks (model in ``"item"`` mode, no gradients); each batch of users is embedded
    (``"user"`` mode) and searched exactly (:func:`~rechub_lightning.retrieval.topk_search`,
    max over interests), optionally without the user's already-seen items, and
    :class:`~rechub_lightning.metrics.RetrievalTopK` accumulates against the batch's
    held-out item ids (``y``, ``-1`` = none). Logged: ``{val,test}/{recall,hitrate,ndcg,
    mrr,precision}@k`` for each ``k`` in ``topk`` (10 always included). Without a corpus,
    point-wise modules fall back to ``val/auc`` on labelled batches (the reference's
    metric). ``predict_step`` returns user embeddings for dataloader 0 and item embeddings
    for dataloader 1 (the datamodule's ``[users, items]`` predict loaders), or the tower
    named by :attr:`predict_tower`.

    Args:
        model: a retrieval model (ours return logits; Torch-RecHub's also work), or a spec dict.
        mode: ``0`` point-wise, ``1`` pair-wise, ``2`` list-wise.
        in_batch_neg: train with in-batch negatives (needs ``user_tower``/``item_tower``).
        in_batch_neg_ratio: negatives drawn per row; ``None`` = all other rows.
        hard_negative: draw the hardest in-batch negatives instead of uniform ones.
        sampler_seed: seed of the in-batch sampler.
        temperature: in-batch logits are divided by it; ``None``: the model's
            ``temperature`` attribute, else 1.
        logq_correction: subtract ``log q(item)`` from in-batch logits; ``q`` from
            ``item_log_q`` or the datamodule's ``item_log_q()``.
        item_log_q: log sampling probability per item id (index = id).
        mask_accidental_hits: mask in-batch negatives that are the row's own item.
        gather_negatives: with in-batch negatives under DDP/FSDP, score every user against
            the item embeddings of all ranks (see above). Ignored with one process.
        item_id_feature: batch key of the item id (logQ, masking, corpus ids); default:
            the datamodule's ``item_id_feature``, else the model's first item feature.
        topk: cut-offs of the retrieval metrics.
        exclude_seen: exclude each user's already-seen items from retrieval.
        eval_chunk_size: users (and corpus items) embedded/scored at once in evaluation.
        **RecModule options**: ``optimizer_fn``, ``optimizer_params``,
            ``regularization_params``, ``scheduler_*``, ``sparse_embeddings``, ``embedding_optimizer*``.

    Raises:
        ValueError: unknown ``mode``; in-batch negatives with a model lacking towers; a
            bad ``in_batch_neg_ratio``, ``temperature`` or ``topk``.

    Example:
        >>> import lightning as L
        >>> from rechub_lightning.data.match import MatchDataModule
        >>> from rechub_lightning.models.matching import YoutubeDNN
        >>> dm = MatchDataModule(mode=2, neg_ratio=3, synthetic_users=200, batch_size=256)  # doctest: +SKIP
        >>> module = MatchModule(YoutubeDNN(schema=dm.schema, temperature=0.05), mode=2)  # doctest: +SKIP
        >>> L.Trainer(max_epochs=1).fit(module, dm)  # doctest: +SKIP
    """

    monitor = "val/recall@10"
    monitor_mode = "max"

    def __init__(
        self,
        model: nn.Module | dict[str, Any],
        mode: int = 0,
        in_batch_neg: bool = False,
        in_batch_neg_ratio: int | None = None,
        hard_negative: bool = False,
        sampler_seed: int | None = None,
        temperature: float | None = None,
        logq_correction: bool = False,
        item_log_q: Sequence[float] | None = None,
        mask_accidental_hits: bool = False,
        item_id_feature: str | None = None,
        topk: Sequence[int] = (10, 50),
        exclude_seen: bool = True,
        eval_chunk_size: int = 1024,
        optimizer_fn: str | Callable[..., torch.optim.Optimizer] = "torch.optim.Adam",
        optimizer_params: dict[str, Any] | None = None,
        regularization_params: dict[str, float] | None = None,
        scheduler_fn: str | Callable[..., Any] | None = None,
        scheduler_params: dict[str, Any] | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str | None = None,
        sparse_embeddings: bool | None = None,
        embedding_optimizer: str = "sparse_adam",
        embedding_optimizer_params: dict[str, Any] | None = None,
        gather_negatives: bool = False,
    ) -> None:
        if isinstance(mode, bool) or mode not in _MODES:
            raise ValueError(f"mode must be 0 (point-wise), 1 (pair-wise) or 2 (list-wise), got mode={mode!r}")
        if in_batch_neg_ratio is not None:
            check_int(in_batch_neg_ratio, "in_batch_neg_ratio")  # 2.5 is an error, not 2
        if temperature is not None and not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got temperature={temperature}")
        ks = sorted({int(k) for k in topk} | {10})
        if any(k < 1 for k in ks):
            raise ValueError(f"topk cut-offs must be positive, got topk={list(topk)}")
        if int(eval_chunk_size) < 1:
            raise ValueError(f"eval_chunk_size must be >= 1, got {eval_chunk_size}")
        super().__init__(
            model,
            optimizer_fn=optimizer_fn,
            optimizer_params=optimizer_params,
            regularization_params=regularization_params,
            scheduler_fn=scheduler_fn,
            scheduler_params=scheduler_params,
            scheduler_interval=scheduler_interval,
            scheduler_monitor=scheduler_monitor,
            sparse_embeddings=sparse_embeddings,
            embedding_optimizer=embedding_optimizer,
            embedding_optimizer_params=embedding_optimizer_params,
        )
        if not isinstance(gather_negatives, bool):
            raise ValueError(f"gather_negatives must be True or False, got gather_negatives={gather_negatives!r}")
        if in_batch_neg and not has_towers(self.model):
            raise ValueError(
                f"in_batch_neg=True needs a two-tower model with user_tower() and item_tower() methods; "
                f"{type(unwrap_model(self.model)).__name__} has none (use offline negatives: mode 0/1/2 without in_batch_neg)"
            )
        self.mode = int(mode)
        self.in_batch_neg = bool(in_batch_neg)
        self.in_batch_neg_ratio = None if in_batch_neg_ratio is None else int(in_batch_neg_ratio)
        self.hard_negative = bool(hard_negative)
        self.sampler_seed = sampler_seed
        self._temperature = None if temperature is None else float(temperature)
        self.logq_correction = bool(logq_correction)
        self._log_q: torch.Tensor | None = (
            None if item_log_q is None else torch.as_tensor(list(item_log_q), dtype=torch.float32)
        )
        self.mask_accidental_hits = bool(mask_accidental_hits)
        self.gather_negatives = bool(gather_negatives)
        self.item_id_feature = item_id_feature
        self.topk = tuple(ks)
        self.exclude_seen = bool(exclude_seen)
        self.eval_chunk_size = int(eval_chunk_size)
        #: ``"user"``/``"item"`` forces the tower ``predict_step`` exports (``None``: by dataloader index).
        self.predict_tower: str | None = None
        self.val_topk = RetrievalTopK(ks=self.topk)
        self.test_topk = RetrievalTopK(ks=self.topk)
        self.val_auc = BinaryAUC(name="val/auc")
        self.test_auc = BinaryAUC(name="test/auc")
        self._generator: torch.Generator | None = None
        self._max_batch_seen = 0
        self._corpus_override: dict[str, torch.Tensor] | None = None
        self._corpus: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._eval_kind: dict[str, str] = {}
        #: what the whole training label column of the running fit holds ("positive": all > 0,
        #: "zeros": all 0, None: unknown or mixed): lets the steps skip per-batch label checks,
        #: each a host-device synchronisation on a GPU
        self._train_labels: str | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def temperature(self) -> float:
        """The in-batch softmax temperature (the model's own when none was given)."""
        if self._temperature is not None:
            return self._temperature
        return float(getattr(unwrap_model(self.model), "temperature", 1.0) or 1.0)

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def resolve_item_id_feature(self) -> str:
        """The batch key of the item id: the argument, the datamodule's, or the model's first item feature."""
        if self.item_id_feature:
            return self.item_id_feature
        name = getattr(self._datamodule(), "item_id_feature", None)
        if name:
            return str(name)
        model = unwrap_model(self.model)
        for attr in ("item_features", "pos_item_features", "item_feature"):
            feats = getattr(model, attr, None)
            if feats is None:
                continue
            first = feats[0] if isinstance(feats, (list, tuple)) and feats else feats
            if getattr(first, "name", None):
                return str(first.name)
        raise ValueError(
            "cannot tell which batch key holds the item id: pass item_id_feature= (needed for logQ correction, "
            "accidental-hit masking and the item corpus)"
        )

    def item_log_q(self) -> torch.Tensor:
        """Log sampling probability per item id, from ``item_log_q`` or the datamodule."""
        if self._log_q is None:
            source = getattr(self._datamodule(), "item_log_q", None)
            value = source() if callable(source) else source
            if value is None:
                raise ValueError(
                    "logq_correction=True needs item_log_q= (log sampling probability per item id) or a datamodule "
                    "with item_log_q() such as MatchDataModule"
                )
            self._log_q = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
        return self._log_q

    def set_item_corpus(self, corpus: Mapping[str, Any] | None) -> None:
        """Use ``corpus`` (item feature name -> values, one row per item) as the retrieval corpus
        instead of ``trainer.datamodule.item_corpus()``; ``None`` reverts to the datamodule."""
        self._corpus_override = None if corpus is None else {k: torch.as_tensor(v) for k, v in corpus.items()}

    def loader_checks(self, stage: str) -> dict[str, Any]:
        """Training rows feed both towers (all their features must be columns; 0/1 labels in
        point-wise mode, placeholders otherwise); evaluation rows hold the user tower's features
        (labels matter only for the AUC fallback without an item corpus); item loaders the item's."""
        if stage == "train":
            from ..export import _tower_features

            model = unwrap_model(self.model)
            required = [f.name for tower in ("user", "item") for f in _tower_features(model, tower)]
            labels = ["classification"] if self._point_wise_labels() else None
            return {"task_types": labels, "binary": False, "require_all": False, "required": required, "allow_empty": False}
        if stage in ("val", "test"):
            has_corpus = self._corpus_override is not None or getattr(self._datamodule(), "item_corpus", None) is not None
            auc_labels = not has_corpus and self._point_wise_labels()  # what the AUC fallback reads
            return {
                "task_types": ["classification"] if auc_labels else None, "binary": True, "require_all": False, "allow_empty": False,
            }
        return {"task_types": None, "require_all": False}

    def checked_features(self, stage: str, model: nn.Module) -> list[Any] | None:
        """Outside training only the towers' features: the negatives' columns (``neg_items`` of
        list-wise samples) feed the training loss alone, and evaluation or inference rows may hold
        anything under that name (the list-wise test rows of ``gen_model_input`` hold one id)."""
        if stage != "train":
            from ..export import _tower_features

            tower = {f.name: f for t in ("user", "item") for f in _tower_features(unwrap_model(model), t)}
            if tower:
                return list(tower.values())
        return super().checked_features(stage, model)

    def check_batch_sizes(self, batch_size: int, smallest: int, rows: int) -> None:
        """Also refuse in-batch negatives from batches of one row (no negative at all: the loss is
        0) or fewer rows than ``in_batch_neg_ratio`` + 1."""
        super().check_batch_sizes(batch_size, smallest, rows)
        if not self.in_batch_neg:
            return
        if batch_size < 2:
            raise ValueError(
                f"in_batch_neg=True draws each row's negatives from the other rows of its batch, but batch_size={batch_size}; "
                "use batch_size >= 2 (typically hundreds)"
            )
        self._check_ratio(batch_size)

    def on_fit_start(self) -> None:
        dm = self._datamodule()
        dm_mode = getattr(dm, "mode", None)
        if not self.in_batch_neg and dm_mode is not None and int(dm_mode) != self.mode:
            raise ValueError(
                f"MatchModule(mode={self.mode}) cannot train on samples built for mode={dm_mode} by "
                f"{type(dm).__name__}: set the same mode on both (or in_batch_neg=True)"
            )
        self._warn_point_wise_temperature()
        batch_size = getattr(dm, "batch_size", None)
        if self.in_batch_neg and self.in_batch_neg_ratio is not None and batch_size is not None:
            self._check_ratio(int(batch_size))
        if self.in_batch_neg and self.logq_correction:
            self.item_log_q()
        if self.gather_negatives:
            if not self.in_batch_neg:
                rank_zero_info("MatchModule: gather_negatives=True has no effect without in_batch_neg=True")
            elif self._world_size() > 1:
                rank_zero_info(
                    f"MatchModule: in-batch negatives gathered from {self._world_size()} ranks "
                    "(each user scores against the global batch's items)"
                )

    def on_train_start(self) -> None:
        super().on_train_start()
        from ..data.base import loader_columns

        self._train_labels = None
        loader = self.trainer.train_dataloader
        cols = loader_columns(loader, names=[]) if isinstance(loader, torch.utils.data.DataLoader) else None
        y = cols[1] if cols is not None else None
        if y is not None and y.numel():
            self._train_labels = "positive" if bool((y > 0).all()) else "zeros" if bool((y == 0).all()) else None

    def on_train_end(self) -> None:
        self._train_labels = None  # the facades' plain loops (train_one_epoch) check every batch

    def _warn_point_wise_temperature(self) -> None:
        """A small temperature saturates point-wise BCE: say so (Torch-RecHub's DSSM ignored its
        temperature, and its MovieLens example passes 0.02 with mode=0)."""
        t = getattr(unwrap_model(self.model), "temperature", None)
        if self.in_batch_neg or self.mode != 0 or not self.logits_out or not isinstance(t, (int, float)) or t >= 0.1:
            return
        rank_zero_warn(
            f"{type(unwrap_model(self.model)).__name__}(temperature={t}) trains point-wise (mode=0): its logits are "
            f"scores / {t}, up to +-{1 / t:.0f} for cosine scores, which saturates the sigmoid of BCE. Torch-RecHub's "
            "DSSM ignored its temperature. Use temperature ~1 for point-wise training, or a softmax loss "
            "(mode=2 or in_batch_neg=True), where a small temperature helps."
        )

    def _world_size(self) -> int:
        """Processes taking part in the in-batch gather (1 without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size()

    def _check_ratio(self, batch_size: int) -> None:
        if self.in_batch_neg_ratio is not None and self.in_batch_neg_ratio >= batch_size:
            raise ValueError(
                f"in_batch_neg_ratio={self.in_batch_neg_ratio} must be smaller than the batch size {batch_size}: "
                "a row has batch_size - 1 in-batch negatives; lower the ratio or raise the batch size"
            )

    # ------------------------------------------------------------------ training
    def _sampler(self, device: torch.device) -> torch.Generator | None:
        if self.sampler_seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(int(self.sampler_seed))
        return self._generator

    def _point_wise_labels(self) -> bool:
        """Whether batch labels are 0/1 point-wise labels (the datamodule's mode, else this module's)."""
        dm_mode = getattr(self._datamodule(), "mode", None)
        return int(dm_mode) == 0 if dm_mode is not None else self.mode == 0

    def in_batch_loss(self, x: dict[str, torch.Tensor], y: torch.Tensor | None = None) -> torch.Tensor:
        """The in-batch negative loss of a batch (see the class docstring)."""
        if y is not None and self._train_labels != "positive" and self._point_wise_labels():
            keep = y.reshape(-1) > 0
            if not bool(keep.all()):
                x = {k: v[keep] for k, v in x.items()}
        model = unwrap_model(self.model)
        if self.gather_negatives and self._world_size() > 1:
            return self._gathered_in_batch_loss(x, model)
        scores = score_matrix(model.user_tower(x), model.item_tower(x))
        batch = scores.shape[0]
        if batch == 0:
            return scores.sum()
        if self.in_batch_neg_ratio is not None and batch >= self._max_batch_seen:
            self._check_ratio(batch)  # a smaller final batch may have fewer candidates than the ratio
        self._max_batch_seen = max(self._max_batch_seen, batch)
        scores = scores.float() / self.temperature
        ids = None
        if self.logq_correction or self.mask_accidental_hits:
            ids = x[self.resolve_item_id_feature()].reshape(-1)
        if self.logq_correction:
            log_q = self.item_log_q().to(scores.device)
            scores = scores - log_q[ids].unsqueeze(0)
        hit_ids = ids if self.mask_accidental_hits else None
        if self.in_batch_neg_ratio is None and self.mode != 1:
            return sampled_softmax_loss(scores=scores, item_ids=hit_ids)
        ratio = batch - 1 if self.in_batch_neg_ratio is None else self.in_batch_neg_ratio
        logits = in_batch_logits(scores, max(ratio, 1), self.hard_negative, self._sampler(scores.device), hit_ids)
        if self.mode == 1:
            return bpr_loss(logits[:, 0], logits[:, 1:])
        return list_wise_loss(logits)

    def _gathered_in_batch_loss(self, x: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        """:meth:`in_batch_loss` against the item embeddings of every rank (``gather_negatives``).

        Every rank must call it the same number of times (it runs collectives), also with an
        empty local batch.
        """
        user = model.user_tower(x)
        item = model.item_tower(x)
        if item.dim() == 3 and item.shape[1] == 1:
            item = item.squeeze(1)
        if item.dim() != 2:
            raise ValueError(f"item_tower must return (B, D) embeddings, got shape {tuple(item.shape)}")
        batch = item.shape[0]
        rank, world = dist.get_rank(), dist.get_world_size()
        count = torch.tensor([batch], dtype=torch.long, device=item.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        offset = sum(sizes[:rank])
        all_items = _gather_rows(item, sizes, sync_grads=True)
        ids = all_ids = None
        if self.logq_correction or self.mask_accidental_hits:
            ids = x[self.resolve_item_id_feature()].reshape(-1).long().to(item.device)
            all_ids = _gather_rows(ids, sizes, sync_grads=False)
        n_cand = sum(sizes)
        if self.in_batch_neg_ratio is not None and n_cand >= self._max_batch_seen:
            self._check_ratio(n_cand)
        self._max_batch_seen = max(self._max_batch_seen, n_cand)
        scores = score_matrix(user, all_items)
        if batch == 0:
            return scores.sum() + 0.0 * all_items.sum()  # joins the backward collective with a zero gradient
        scores = scores.float() / self.temperature
        if self.logq_correction:
            log_q = self.item_log_q().to(scores.device)
            scores = scores - log_q[all_ids].unsqueeze(0)
        positive = torch.arange(offset, offset + batch, device=scores.device)
        hit_ids = all_ids if self.mask_accidental_hits else None
        if self.in_batch_neg_ratio is None and self.mode != 1:
            if hit_ids is not None:
                hits = (hit_ids.unsqueeze(0) == ids.unsqueeze(1)) & (positive.unsqueeze(1) != torch.arange(n_cand, device=scores.device))
                scores = scores.masked_fill(hits, masked_fill_value(scores.dtype))
            return F.cross_entropy(scores, positive)
        ratio = n_cand - 1 if self.in_batch_neg_ratio is None else self.in_batch_neg_ratio
        logits = in_batch_logits(
            scores, max(ratio, 1), self.hard_negative, self._sampler(scores.device), hit_ids,
            positive=positive, row_item_ids=ids if hit_ids is not None else None,
        )
        if self.mode == 1:
            return bpr_loss(logits[:, 0], logits[:, 1:])
        return list_wise_loss(logits)

    def mode_loss(self, out: Any, y: torch.Tensor | None) -> torch.Tensor:
        """The loss of ``model(x)``'s output for this module's ``mode``."""
        if self.mode == 0:
            if isinstance(out, (tuple, list)):
                raise TypeError("mode=0 (point-wise) expects one score per row, the model returned a tuple")
            if out.dim() == 2 and out.shape[1] > 1:
                raise ValueError(
                    f"mode=0 (point-wise) expects one score per row, the model returned shape {tuple(out.shape)}; "
                    "point-wise samples carry no neg_items"
                )
            if y is None:
                raise ValueError("mode=0 (point-wise) training batches must be (x, labels)")
            scores, target = out.reshape(-1).float(), y.reshape(-1).float()
            if self.logits_out:
                return F.binary_cross_entropy_with_logits(scores, target)
            return F.binary_cross_entropy(scores.clamp(_PROB_EPS, 1 - _PROB_EPS), target)
        if isinstance(out, (tuple, list)):
            pos, neg = out
            if self.mode == 1:
                return bpr_loss(pos.float(), neg.float())
            out = torch.cat([pos.reshape(-1, 1), neg.reshape(pos.reshape(-1).shape[0], -1)], dim=1)
        if out.dim() != 2 or out.shape[1] < 2:
            raise ValueError(
                f"mode={self.mode} expects (pos, neg) scores or (B, 1 + N) logits with the positive first, got shape "
                f"{tuple(out.shape)}; does the batch carry the neg_items feature?"
            )
        out = out.float()
        if self.mode == 1:
            return bpr_loss(out[:, 0], out[:, 1:])
        if y is None or self._train_labels == "zeros":  # the positive is column 0 (checked once per fit)
            return F.cross_entropy(out, torch.zeros(out.shape[0], dtype=torch.long, device=out.device))
        target = y.reshape(-1).long()
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= out.shape[1]):
            raise ValueError(
                f"mode=2 targets must index the {out.shape[1]} logits, got values in [{int(target.min())}, {int(target.max())}]"
            )
        return F.cross_entropy(out, target)

    def compute_loss(self, batch: Any) -> torch.Tensor:
        """Training loss of one batch (mode loss or in-batch loss) + regularisation."""
        x, y = split_batch(batch)
        loss = self.in_batch_loss(x, y) if self.in_batch_neg else self.mode_loss(self.model(x), y)
        return loss + self.regularization_loss()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        x, _ = split_batch(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=self.loss_on_progress_bar, batch_size=len(next(iter(x.values()))))
        return loss

    # ------------------------------------------------------------------ embeddings
    def embed(self, x: dict[str, torch.Tensor], tower: str) -> torch.Tensor:
        """Embeddings of a batch from the ``"user"`` or ``"item"`` tower (model ``mode`` switched and restored)."""
        if tower not in ("user", "item"):
            raise ValueError(f"tower must be 'user' or 'item', got {tower!r}")
        model = unwrap_model(self.model)
        previous = getattr(model, "mode", None)
        model.mode = tower
        try:
            return self.model(x)
        finally:
            model.mode = previous

    @torch.no_grad()
    def embed_items(self, corpus: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Item embeddings of a whole corpus, ``eval_chunk_size`` rows at a time, without gradients."""
        n = len(next(iter(corpus.values())))
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [
                self.embed({k: v[s : s + self.eval_chunk_size].to(self.device) for k, v in corpus.items()}, "item")
                for s in range(0, n, self.eval_chunk_size)
            ]
        finally:
            self.model.train(was_training)
        return torch.cat(parts) if parts else torch.empty(0)

    def _item_corpus(self) -> dict[str, torch.Tensor] | None:
        if self._corpus_override is not None:
            return self._corpus_override
        source = getattr(self._datamodule(), "item_corpus", None)
        return dict(source()) if callable(source) else None

    def _prepare_eval(self, stage: str) -> None:
        corpus = self._item_corpus()
        if corpus is None:
            if self.mode != 0:
                raise ValueError(
                    f"{stage}: top-K evaluation needs the item corpus: use MatchDataModule (item_corpus()) or "
                    "MatchModule.set_item_corpus(...)"
                )
            self._eval_kind[stage] = "auc"
            self._corpus = None
            return
        key = self.resolve_item_id_feature()
        if key not in corpus:
            raise KeyError(f"the item corpus has no item id column {key!r} (columns: {sorted(corpus)})")
        ids = corpus[key].reshape(-1).long().to(self.device)
        emb = self.embed_items(corpus)
        lookup = torch.full((int(ids.max()) + 2 if ids.numel() else 1,), -1, dtype=torch.long, device=self.device)
        lookup[ids] = torch.arange(ids.numel(), device=self.device)
        self._corpus = (emb, ids, lookup)
        self._eval_kind[stage] = "topk"

    def _exclusion(self, seen: torch.Tensor | None, lookup: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """CSR ``(indptr, corpus rows)`` of each user's seen items that are in the corpus."""
        if seen is None or not self.exclude_seen:
            return None
        seen = seen.to(lookup.device).long()
        if seen.dim() == 1:
            seen = seen.unsqueeze(1)
        valid = (seen > 0) & (seen < lookup.numel())
        rows = lookup[seen.clamp(0, lookup.numel() - 1)]
        valid &= rows >= 0
        indptr = torch.zeros(seen.shape[0] + 1, dtype=torch.long, device=lookup.device)
        indptr[1:] = valid.sum(dim=1).cumsum(0)
        return indptr, rows[valid]

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = split_batch(batch)
        x = dict(x)
        seen = x.pop(SEEN_ITEMS_KEY, None)
        if self._eval_kind.get(stage) == "auc":
            if y is None:
                raise ValueError(f"{stage} batches need labels for the AUC fallback (no item corpus was given)")
            out = self.model(x)
            scores = out.reshape(-1).float()
            probs = torch.sigmoid(scores) if self.logits_out else scores
            metric = self.val_auc if stage == "val" else self.test_auc
            metric.update(probs, y.reshape(-1).float())  # 0/1 labels, whatever dtype the loader gives
            self.log(f"{stage}/auc", metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
            return
        assert self._corpus is not None
        item_emb, item_ids, lookup = self._corpus
        user = self.embed(x, "user")
        _, top = topk_search(
            user.to(item_emb.dtype),
            item_emb,
            max(self.topk),
            chunk_size=self.eval_chunk_size,
            exclude=self._exclusion(seen, lookup),
            item_ids=item_ids,
        )
        if y is None:
            raise ValueError(f"{stage} batches must be (users, held-out item ids)")
        metric = self.val_topk if stage == "val" else self.test_topk
        target = y.reshape(top.shape[0], -1).long()
        metric.update(top, target)
        counts = self.__dict__.setdefault("_unscored", {}).setdefault(stage, [0, 0])
        counts[0] += int((target < 0).all(dim=1).sum())  # no held-out item in the corpus: not scored
        counts[1] += int(target.shape[0])

    def _log_topk(self, stage: str) -> None:
        if self._eval_kind.get(stage) != "topk":
            return
        metric = self.val_topk if stage == "val" else self.test_topk
        values = metric.compute()
        metric.reset()
        for name, value in values.items():
            self.log(f"{stage}/{name}", float(value), prog_bar=stage == "val" and name == "recall@10", sync_dist=False)
        self._corpus = None
        unscored, users = self.__dict__.get("_unscored", {}).pop(stage, (0, 0))
        reported = self.__dict__.setdefault("_unscored_reported", set())
        if unscored and stage not in reported:  # once per stage: the split does not change
            reported.add(stage)
            where = " (this process's users)" if self._world_size() > 1 else ""
            rank_zero_info(
                f"{stage}: {unscored} of {users} users{where} are not in the top-K metrics: their held-out item is "
                f"not in the item corpus (no training interaction)"
            )

    def on_validation_epoch_start(self) -> None:
        self._prepare_eval("val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_topk("val")

    def on_test_epoch_start(self) -> None:
        self._prepare_eval("test")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_topk("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x, _ = split_batch(batch)
        x = {k: v for k, v in x.items() if k != SEEN_ITEMS_KEY}
        tower = self.predict_tower or ("user" if dataloader_idx == 0 else "item")
        return self.embed(x, tower)

