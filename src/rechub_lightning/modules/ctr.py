"""CTRModule: single-task click-through-rate training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import BinaryAUC, LogLoss
from .base import RecModule, split_batch

__all__ = ["CTRModule"]

_PROB_EPS = 1e-7


class CTRModule(RecModule):
    """Trains any model that maps a batch dict to a click score.

    Our models return logits (loss: BCE with logits; autocast-safe). Foreign models without
    ``returns_logits = True`` (e.g. Torch-RecHub's) return probabilities and are trained with
    BCE on those, computed in float32.

    Args:
        model: the network, or a spec dict from a checkpoint.
        loss_mode: ``True``: ``model(x) -> scores``; ``False``: ``model(x) -> (scores, aux_loss)``
            and the loss is ``BCE + aux_loss`` (DIEN).
        auc_thresholds: ``None`` for exact AUC (keeps all validation predictions) or an
            int: constant memory, probabilities counted into that many equal-width bins and the
            exact AUC of the binned scores (scores sharing a bin tie; see ``BinaryAUC``).
        **kwargs: optimizer, scheduler, regularisation and sparse-embedding options of
            :class:`~rechub_lightning.modules.base.RecModule`.

    Logged: ``train/loss``, ``learning_rate``, ``val/auc``, ``val/logloss``, ``test/auc``,
    ``test/logloss``. ``predict_step`` returns probabilities ``(B,)``.

    Example:
        >>> import lightning as L
        >>> from rechub_lightning import CTRModule
        >>> from rechub_lightning.data import CTRDataModule
        >>> from rechub_lightning.models.ranking import DeepFM
        >>> dm = CTRDataModule(synthetic_rows=3000, batch_size=512)
        >>> module = CTRModule(DeepFM(schema=dm.schema, mlp_params={"dims": [32]}))
        >>> L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...           enable_progress_bar=False, enable_model_summary=False).fit(module, dm)
    """

    monitor = "val/auc"
    monitor_mode = "max"

    def __init__(
        self,
        model: nn.Module | dict[str, Any],
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
        loss_mode: bool = True,
        auc_thresholds: int | None = None,
    ) -> None:
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
        self.loss_mode = loss_mode
        self.val_auc = BinaryAUC(thresholds=auc_thresholds, name="val/auc")
        self.val_logloss = LogLoss(from_logits=False)
        self.test_auc = BinaryAUC(thresholds=auc_thresholds, name="test/auc")
        self.test_logloss = LogLoss(from_logits=False)

    # ------------------------------------------------------------------ core
    def scores(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(raw model scores (B,), auxiliary loss)``; scores are logits or probabilities."""
        out = self.model(x)
        if self.loss_mode:
            aux: torch.Tensor | float = 0.0
        else:
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise TypeError("loss_mode=False expects model(x) to return (scores, aux_loss)")
            out, aux = out
        return out.reshape(-1), aux

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(scores.float()) if self.logits_out else scores.float()

    def bce(self, scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.reshape(-1).float()
        if self.logits_out:
            return F.binary_cross_entropy_with_logits(scores.float(), y)
        with torch.autocast(device_type=scores.device.type, enabled=False):
            return F.binary_cross_entropy(scores.float().clamp(_PROB_EPS, 1 - _PROB_EPS), y)

    def compute_loss(self, batch: Any) -> torch.Tensor:
        """Training loss of one batch: BCE (+ auxiliary loss) + regularisation."""
        x, y = split_batch(batch)
        if y is None:
            raise ValueError("training batches must be (x, y) with labels")
        scores, aux = self.scores(x)
        return self.bce(scores, y) + aux + self.regularization_loss()

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=self.loss_on_progress_bar, batch_size=self._bs(batch))
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = split_batch(batch)
        scores, _ = self.scores(x)
        probs = self.probabilities(scores)
        target = y.reshape(-1)
        auc, logloss = (self.val_auc, self.val_logloss) if stage == "val" else (self.test_auc, self.test_logloss)
        auc.update(probs, target)
        logloss.update(probs, target)
        self.log(f"{stage}/auc", auc, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/logloss", logloss, on_step=False, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x, _ = split_batch(batch)
        scores, _ = self.scores(x)
        return self.probabilities(scores)

    @staticmethod
    def _bs(batch: Any) -> int:
        x, _ = split_batch(batch)
        return len(next(iter(x.values())))
