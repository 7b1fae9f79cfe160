"""Torch-RecHub's trainer API on top of ``lightning.Trainer`` (DESIGN decision 6).

A Torch-RecHub script moves over by changing its imports: the trainers keep the
reference's constructor arguments and methods. Underneath, ``fit`` runs a
``lightning.Trainer`` with ``EarlyStopping`` + ``ModelCheckpoint`` and, when it
returns, the user's model object holds the best validation weights (also when
patience never ran out) and ``model_path/model.pth`` holds the same state dict.
``gpus=[0, 1]`` means DDP, never ``nn.DataParallel``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ._facade import ReferenceLoggerAdapter, _FacadeBase, _to_device, device_config, exact_auc
from ._match_trainer import MatchTrainer
from ._mtl_trainer import MTLTrainer
from .models.base import returns_logits
from .modules.base import split_batch
from .modules.ctr import CTRModule

__all__ = ["CTRTrainer", "MatchTrainer", "MTLTrainer", "ReferenceLoggerAdapter", "device_config"]


class CTRTrainer(_FacadeBase):
    """Torch-RecHub's ``CTRTrainer`` API, trained by ``lightning.Trainer``.

    Args:
        model: any model taking the batch dict (ours return logits, Torch-RecHub's probabilities).
        optimizer_fn: optimizer class (default ``torch.optim.Adam``).
        optimizer_params: its arguments (default ``{"lr": 1e-3, "weight_decay": 1e-5}``).
        regularization_params: ``{"embedding_l1", "embedding_l2", "dense_l1", "dense_l2"}``.
        scheduler_fn: any LR scheduler class (stepped per epoch; ReduceLROnPlateau watches val/auc).
        scheduler_params: its arguments.
        n_epoch: maximum number of epochs.
        earlystop_patience: epochs without validation-AUC improvement before stopping.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        gpus: GPU ids; two or more train with DDP.
        loss_mode: ``False`` for models returning ``(scores, aux_loss)`` (DIEN).
        model_path: where ``model.pth`` and the checkpoints go.
        model_logger: a Torch-RecHub-style logger (or list), or Lightning loggers via ``trainer_kwargs``.
        trainer_kwargs: extra ``lightning.Trainer`` arguments (e.g. ``precision="bf16-mixed"``);
            ``callbacks`` are added to the trainer's early stopping and best checkpoint (a
            ``ModelCheckpoint`` / ``EarlyStopping`` of yours takes the place of the trainer's).
        **module_kwargs: extra :class:`~rechub_lightning.CTRModule` arguments (e.g. ``sparse_embeddings=True``).

    Example:
        >>> trainer = CTRTrainer(model, n_epoch=5, earlystop_patience=2, model_path="runs/deepfm")  # doctest: +SKIP
        >>> trainer.fit(train_dl, val_dl)  # doctest: +SKIP
        >>> auc = trainer.evaluate(trainer.model, test_dl)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_fn: Callable[..., torch.optim.Optimizer] | str = torch.optim.Adam,
        optimizer_params: dict[str, Any] | None = None,
        regularization_params: dict[str, float] | None = None,
        scheduler_fn: Callable[..., Any] | str | None = None,
        scheduler_params: dict[str, Any] | None = None,
        n_epoch: int = 10,
        earlystop_patience: int = 10,
        device: str = "cpu",
        gpus: Iterable[int] | None = None,
        loss_mode: bool = True,
        model_path: str = "./",
        model_logger: Any = None,
        trainer_kwargs: dict[str, Any] | None = None,
        **module_kwargs: Any,
    ) -> None:
        super().__init__(model, n_epoch, earlystop_patience, device, gpus, model_path, model_logger, trainer_kwargs)
        self.loss_mode = loss_mode
        self.module = CTRModule(
            model,
            optimizer_fn=optimizer_fn,
            optimizer_params=optimizer_params,
            regularization_params=regularization_params,
            scheduler_fn=scheduler_fn,
            scheduler_params=scheduler_params,
            loss_mode=loss_mode,
            **module_kwargs,
        )
        self.model.to(self.device)

    def fit(self, train_dataloader: Any, val_dataloader: Any = None) -> None:
        """Train; when it returns, ``self.model`` holds the best validation weights."""
        self._run_fit(train_dataloader, val_dataloader, "model.pth")

    def train_one_epoch(self, data_loader: Iterable[Any], log_interval: int = 10) -> float:
        """One pass over ``data_loader`` (the optimizer persists across calls); returns the mean loss."""
        return self._train_loop(data_loader, log_interval, self.module.compute_loss)

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
                out = model(x)
                if not self.loss_mode:
                    out = out[0]
                p = out.reshape(-1).float()
                preds.append(torch.sigmoid(p) if logits else p)
                if y is not None and targets_too:
                    targets.append(y.reshape(-1).float())
        finally:
            model.train(was_training)
        p = torch.cat(preds) if preds else torch.empty(0)
        return p, (torch.cat(targets) if targets else None)

    def evaluate(self, model: nn.Module, data_loader: Iterable[Any]) -> float:
        """Exact ROC AUC of ``model`` on ``data_loader``."""
        self._check_loader(data_loader, "val", "evaluation", model=model)
        preds, target = self._scores(model, data_loader)
        if target is None:
            raise ValueError("evaluate needs a loader of (x, y) batches")
        return exact_auc(preds, target)

    def predict(self, model: nn.Module, data_loader: Iterable[Any]) -> list[float]:
        """Click probabilities, one per row, in loader order."""
        self._check_loader(data_loader, "predict", "prediction", model=model)
        preds, _ = self._scores(model, data_loader, targets_too=False)
        return preds.cpu().tolist()
