"""Torch-RecHub's ``MatchTrainer`` API on top of ``lightning.Trainer``.

Re-exported by :mod:`rechub_lightning.trainers`. Training is :class:`~rechub_lightning.modules.match.MatchModule`
(temperature, logQ correction, accidental-hit masking and a vectorised in-batch sampler
on top of the reference's modes); ``fit`` keeps the best validation weights in the
user's model object and in ``model_path/model.pth``. Validation is top-K retrieval over
the item corpus when one is given (``val/recall@10``), else the reference's AUC on
point-wise labels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .data.match import SEEN_ITEMS_KEY
from .metrics import topk_metrics
from .models.base import returns_logits
from .modules.base import split_batch
from .modules.match import MatchModule
from .retrieval import topk_search
from ._facade import _FacadeBase, _to_device, exact_auc

__all__ = ["MatchTrainer"]


def _collect(loader: Iterable[Any]) -> dict[str, torch.Tensor]:
    """All batches of a loader of feature dicts (or ``(x, y)``) concatenated column-wise."""
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        x, _ = split_batch(batch)
        for k, v in x.items():
            parts.setdefault(k, []).append(torch.as_tensor(v))
    if not parts:
        raise ValueError("the item loader yielded no batch")
    return {k: torch.cat(v) for k, v in parts.items()}


class MatchTrainer(_FacadeBase):
    """Torch-RecHub's ``MatchTrainer`` API, trained by ``lightning.Trainer``.

    Args:
        model: a matching model (ours return logits; Torch-RecHub's also work).
        mode: ``0`` point-wise (BCE), ``1`` pair-wise (BPR), ``2`` list-wise (softmax).
        in_batch_neg: train with in-batch negatives (needs ``user_tower``/``item_tower``).
        in_batch_neg_ratio: in-batch negatives per row (``None``: all other rows).
        hard_negative: draw the hardest in-batch negatives.
        sampler_seed: seed of the in-batch sampler.
        optimizer_fn: optimizer class (default ``torch.optim.Adam``).
        optimizer_params: its arguments (default ``{"lr": 1e-3, "weight_decay": 1e-5}``).
        regularization_params: ``{"embedding_l1", "embedding_l2", "dense_l1", "dense_l2"}``.
        scheduler_fn: any LR scheduler class (stepped per epoch).
        scheduler_params: its arguments.
        n_epoch: maximum number of epochs.
        earlystop_patience: epochs without improvement of the validation metric before stopping.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        gpus: GPU ids; two or more train with DDP.
        model_path: where ``model.pth`` and the checkpoints go.
        model_logger: a Torch-RecHub-style logger (or list).
        trainer_kwargs: extra ``lightning.Trainer`` arguments (``callbacks`` join the trainer's, as
            in :class:`~rechub_lightning.CTRTrainer`).
        **module_kwargs: extra :class:`~rechub_lightning.modules.match.MatchModule` arguments
            (``temperature``, ``logq_correction``, ``item_log_q``, ``mask_accidental_hits``,
            ``item_id_feature``, ``topk``, ``exclude_seen``, ...).

    Example:
        >>> trainer = MatchTrainer(model, mode=2, n_epoch=5, model_path="runs/ydnn")  # doctest: +SKIP
        >>> trainer.fit(train_dl, val_dl, item_dataloader=item_dl)  # doctest: +SKIP
        >>> users = trainer.inference_embedding(model, "user", test_dl, "runs/ydnn")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        mode: int = 0,
        in_batch_neg: bool = False,
        in_batch_neg_ratio: int | None = None,
        hard_negative: bool = False,
        sampler_seed: int | None = None,
        optimizer_fn: Callable[..., torch.optim.Optimizer] | str = torch.optim.Adam,
        optimizer_params: dict[str, Any] | None = None,
        regularization_params: dict[str, float] | None = None,
        scheduler_fn: Callable[..., Any] | str | None = None,
        scheduler_params: dict[str, Any] | None = None,
        n_epoch: int = 10,
        earlystop_patience: int = 10,
        device: str = "cpu",
        gpus: Iterable[int] | None = None,
        model_path: str = "./",
        model_logger: Any = None,
        trainer_kwargs: dict[str, Any] | None = None,
        **module_kwargs: Any,
    ) -> None:
        super().__init__(model, n_epoch, earlystop_patience, device, gpus, model_path, model_logger, trainer_kwargs)
        self.mode = mode
        self.module = MatchModule(
            model,
            mode=mode,
            in_batch_neg=in_batch_neg,
            in_batch_neg_ratio=in_batch_neg_ratio,
            hard_negative=hard_negative,
            sampler_seed=sampler_seed,
            optimizer_fn=optimizer_fn,
            optimizer_params=optimizer_params,
            regularization_params=regularization_params,
            scheduler_fn=scheduler_fn,
            scheduler_params=scheduler_params,
            **module_kwargs,
        )
        self.model.to(self.device)

    @property
    def in_batch_neg(self) -> bool:
        return self.module.in_batch_neg

    @property
    def in_batch_neg_ratio(self) -> int | None:
        return self.module.in_batch_neg_ratio

    @property
    def hard_negative(self) -> bool:
        return self.module.hard_negative

    def export_onnx(self, output_path: str, mode: str | None = None, *args: Any, **kwargs: Any) -> bool:  # type: ignore[override]
        """Export the model, or with ``mode="user"``/``"item"`` one tower, to ONNX; the reference's
        argument order (``mode`` second), the other arguments as :meth:`CTRTrainer.export_onnx`."""
        return super().export_onnx(output_path, *args, mode=mode, **kwargs)

    # ------------------------------------------------------------------ training
    def fit(
        self,
        train_dataloader: Any,
        val_dataloader: Any = None,
        item_dataloader: Any = None,
        item_corpus: Mapping[str, Any] | None = None,
    ) -> None:
        """Train; when it returns, ``self.model`` holds the best validation weights.

        Args:
            train_dataloader: training batches ``(x, y)``.
            val_dataloader: validation batches. With an item corpus: users and their held-out
                item ids (``y``; ``-1`` = none), monitored by ``val/recall@10``. Without: labelled
                point-wise rows, monitored by ``val/auc`` (the reference's behaviour, mode 0 only).
            item_dataloader: the item corpus in batches (the reference's ``item_dl``).
            item_corpus: the item corpus as a dict of columns (instead of ``item_dataloader``).
        """
        if item_dataloader is not None and item_corpus is not None:
            raise ValueError("give item_dataloader or item_corpus, not both")
        corpus = _collect(item_dataloader) if item_dataloader is not None else item_corpus
        self.module.set_item_corpus(corpus)
        self.module.monitor = MatchModule.monitor if corpus is not None or val_dataloader is None else "val/auc"
        self._check_loader(item_dataloader, "predict", "item corpus")
        self._run_fit(train_dataloader, val_dataloader, "model.pth")

    def train_one_epoch(self, data_loader: Iterable[Any], log_interval: int = 10) -> float:
        """One pass over ``data_loader`` (the optimizer persists across calls); returns the mean loss."""
        self.module._train_labels = None  # nothing known about this loader's labels: check every batch
        return self._train_loop(data_loader, log_interval, self.module.compute_loss)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def _embed_loader(self, model: nn.Module, mode: str, data_loader: Iterable[Any]) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Embeddings of every batch (``model.mode = mode``) plus the batches' labels and seen items."""
        model.to(self.device)
        was_training, previous = model.training, getattr(model, "mode", None)
        model.eval()
        model.mode = mode
        out: list[torch.Tensor] = []
        extra: dict[str, list[torch.Tensor]] = {"y": [], "seen": []}
        try:
            for batch in data_loader:
                x, y = split_batch(_to_device(batch, self.device))
                x = dict(x)
                seen = x.pop(SEEN_ITEMS_KEY, None)
                out.append(model(x))
                if y is not None:
                    extra["y"].append(y)
                if seen is not None:
                    extra["seen"].append(seen)
        finally:
            model.mode = previous
            model.train(was_training)
        return (torch.cat(out) if out else torch.empty(0)), extra

    def inference_embedding(self, model: nn.Module, mode: str, data_loader: Iterable[Any], model_path: str | None) -> torch.Tensor:
        """Stacked user or item embeddings of ``data_loader`` (reference API).

        Loads ``model_path/model.pth`` first (as the reference does; ``None`` keeps the
        current weights), then runs the ``mode`` tower over every batch. The model's
        previous ``mode`` is restored afterwards.

        Returns:
            ``(N, D)``, or ``(N, K, D)`` for multi-interest user towers.
        """
        if mode not in ("user", "item"):
            raise ValueError(f"mode must be 'user' or 'item', got mode={mode!r}")
        if model_path is not None:
            path = os.path.join(model_path, "model.pth")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no trained weights at {path!r} (run fit first, or pass model_path=None)")
            model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        self._check_loader(data_loader, "predict", f"{mode} inference", model=model)
        emb, _ = self._embed_loader(model, mode, data_loader)
        return emb

    def evaluate(
        self,
        model: nn.Module,
        data_loader: Iterable[Any],
        item_loader: Iterable[Any] | None = None,
        ground_truth: Sequence[Any] | torch.Tensor | None = None,
        topk: int | Sequence[int] = 10,
        exclude: Sequence[Any] | None = None,
    ) -> dict[str, float] | float:
        """Top-K retrieval metrics, or (without ``item_loader``) the reference's AUC.

        With ``item_loader`` (the item corpus): users of ``data_loader`` are embedded and
        searched exactly over the corpus; ``{"recall@k", "hitrate@k", "precision@k", "ndcg@k",
        "mrr@k"}`` for each ``k`` in ``topk`` is returned. The held-out items are
        ``ground_truth`` (one id or list of ids per user) or the loader's labels; the
        already-seen items excluded are ``exclude`` (item ids per user) or those the
        loader's batches carry (:class:`~rechub_lightning.data.MatchDataModule`'s eval loaders).

        Without ``item_loader``: the ROC AUC of ``model(x)`` on the loader's 0/1 labels
        (point-wise data; undefined for list-wise labels, which are all 0).

        Raises:
            ValueError: missing labels / ground truth, or labels with a single class.
        """
        self._check_loader(data_loader, "val", "evaluation", labels=item_loader is None, model=model)
        self._check_loader(item_loader, "predict", "item corpus", model=model)
        if item_loader is None:
            preds, target = self._scores(model, data_loader)
            if target is None:
                raise ValueError("evaluate without item_loader needs a loader of (x, y) point-wise batches")
            if target.numel() and bool((target == target[0]).all()):
                raise ValueError(
                    "AUC is undefined: every label is the same (list-/pair-wise labels are all 0); pass item_loader= "
                    "to get Recall/NDCG@K over the item corpus"
                )
            return exact_auc(preds, target)
        ks = (topk,) if isinstance(topk, int) else tuple(topk)
        users, extra = self._embed_loader(model, "user", data_loader)
        corpus = _collect(item_loader)
        key = self.module.resolve_item_id_feature()
        if key not in corpus:
            raise KeyError(f"the item loader has no item id column {key!r} (columns: {sorted(corpus)})")
        item_ids = corpus[key].reshape(-1).long().to(self.device)
        n_items, chunk = item_ids.numel(), 4096
        items, _ = self._embed_loader(model, "item", [{k: v[s : s + chunk] for k, v in corpus.items()} for s in range(0, n_items, chunk)])
        if ground_truth is None:
            if not extra["y"]:
                raise ValueError("evaluate needs ground_truth= or a loader whose batches carry the held-out item ids")
            relevant: Any = torch.cat([y.reshape(y.shape[0], -1) for y in extra["y"]]).long()
        else:
            relevant = ground_truth if isinstance(ground_truth, torch.Tensor) else [
                [g] if isinstance(g, (int, float)) or (hasattr(g, "ndim") and g.ndim == 0) else g for g in ground_truth
            ]
        lookup = {int(i): r for r, i in enumerate(item_ids.tolist())}
        rows = None
        if exclude is not None:
            rows = [[lookup[int(i)] for i in seen if int(i) in lookup] for seen in exclude]
        elif extra["seen"] and self.module.exclude_seen:
            rows = [[lookup[i] for i in row if i > 0 and i in lookup] for part in extra["seen"] for row in part.tolist()]
        _, top = topk_search(users.to(items.dtype), items, max(ks), exclude=rows, item_ids=item_ids)
        return topk_metrics(top.cpu(), relevant if isinstance(relevant, list) else relevant.cpu(), ks=ks)

    @torch.no_grad()
    def _scores(self, model: nn.Module, data_loader: Iterable[Any], targets_too: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        model.to(self.device)
        was_training = model.training
        model.eval()
        logits = returns_logits(model)
        preds, targets = [], []
        try:
            for batch in data_loader:
                x, y = split_batch(_to_device(batch, self.device))
                out = model({k: v for k, v in x.items() if k != SEEN_ITEMS_KEY})
                if isinstance(out, (tuple, list)):
                    out = out[0]
                p = out.reshape(-1).float() if out.dim() <= 1 or out.shape[-1] == 1 else out.float()
                preds.append(torch.sigmoid(p) if logits and p.dim() == 1 else p)
                if y is not None and targets_too:
                    targets.append(y.reshape(-1).float())
        finally:
            model.train(was_training)
        p = torch.cat(preds) if preds else torch.empty(0)
        return p, (torch.cat(targets) if targets else None)

    def predict(self, model: nn.Module, data_loader: Iterable[Any]) -> list[Any]:
        """The model's scores for every row, in loader order (probabilities for point-wise logits)."""
        self._check_loader(data_loader, "predict", "prediction", model=model)
        preds, _ = self._scores(model, data_loader, targets_too=False)
        return preds.cpu().tolist()
