"""Early stopping for hand-written training loops (Torch-RecHub's ``basic.callback.EarlyStopper``).

Under Lightning use :class:`lightning.pytorch.callbacks.EarlyStopping` (the modules' ``monitor``
and ``monitor_mode`` say what to watch); the trainers and the CLI configs do.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["EarlyStopper"]


class EarlyStopper:
    """Stops a training loop when the validation score has not improved for ``patience`` checks,
    keeping a copy of the best weights.

    Call :meth:`stop_training` after every validation with the score and the model's
    ``state_dict()``; when it returns ``True``, load ``best_weights`` and stop.

    Args:
        patience: validations without improvement that stop training (``0`` acts as ``1``,
            as in Torch-RecHub).
        mode: ``"max"`` (AUC) or ``"min"`` (loss, MSE).
        min_delta: an improvement must exceed the best score by more than this.

    Differences from Torch-RecHub 0.9.0: the first score is always an improvement (there, the
    best score started at 0 in ``"max"`` mode, so negative scores never improved and
    ``best_weights`` stayed ``None``); a NaN score never improves; tensors in the weights are
    cloned, not deep-copied through Python.

    Example:
        >>> stopper = EarlyStopper(patience=2)
        >>> [stopper.stop_training(s, {"w": torch.tensor([s], dtype=torch.float64)}) for s in (0.70, 0.72, 0.71, 0.71)]
        [False, False, False, True]
        >>> stopper.best_auc, stopper.best_weights["w"].item()
        (0.72, 0.72)
    """

    def __init__(self, patience: int, mode: str = "max", min_delta: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got patience={patience!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got mode={mode!r}")
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got min_delta={min_delta!r}")
        self.patience = patience
        self.mode = mode
        self.min_delta = float(min_delta)
        self.trial_counter = 0
        #: the best score so far (the name is Torch-RecHub's; any metric works)
        self.best_auc = -math.inf if mode == "max" else math.inf
        self.best_weights: Any = None

    @property
    def best_score(self) -> float:
        return self.best_auc

    def _improved(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if self.mode == "max":
            return score > self.best_auc + self.min_delta
        return score < self.best_auc - self.min_delta

    def stop_training(self, val_auc: float, weights: Any) -> bool:
        """Record a validation score (``val_auc``: any metric, the name is the reference's) and the
        weights it was measured with; ``True`` when training should stop."""
        score = float(val_auc.item() if isinstance(val_auc, torch.Tensor) else val_auc)
        if self._improved(score):
            self.best_auc = score
            self.trial_counter = 0
            self.best_weights = _copy_weights(weights)
            return False
        if self.trial_counter + 1 < self.patience:
            self.trial_counter += 1
            return False
        return True


def _copy_weights(weights: Any) -> Any:
    if isinstance(weights, Mapping):
        return type(weights)((k, v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in weights.items())
    return copy.deepcopy(weights)
