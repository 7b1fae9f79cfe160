"""``MTLTrainer``: Torch-RecHub's multi-task trainer API on top of ``lightning.Trainer``.

Re-exported from :mod:`rechub_lightning.trainers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from .modules.base import clip_sparse_aware_, split_batch
from .modules.mtl import MTLModule
from ._facade import _FacadeBase, _to_device

__all__ = ["MTLTrainer"]


class _EpochLog(Callback):
    """Collects ``[train loss per task..., val score per task...]`` at the end of every epoch."""

    def __init__(self, module: MTLModule, sink: list[list[float]]) -> None:
        self.module = module
        self.sink = sink

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        m = self.module

        def value(key: str) -> float:
            v = metrics.get(key)
            return float(v) if v is not None else math.nan

        row = [value(f"train/task_{i}_loss") for i in range(m.n_task)]
        row += [value(f"val/task_{i}_{m.score_names[i]}") for i in range(m.n_task)]
        self.sink.append(row)


class MTLTrainer(_FacadeBase):
    """Torch-RecHub's ``MTLTrainer`` API, trained by ``lightning.Trainer`` through :class:`MTLModule`.

    Args:
        model: a multi-task model (ours return logits; Torch-RecHub's probabilities).
        task_types: ``"classification"`` or ``"regression"`` per task.
        optimizer_fn: optimizer class (default ``torch.optim.Adam``).
        optimizer_params: its arguments (default ``{"lr": 1e-3, "weight_decay": 1e-5}``).
        regularization_params: ``{"embedding_l1", "embedding_l2", "dense_l1", "dense_l2"}``.
        scheduler_fn: any LR scheduler class (stepped per epoch; ReduceLROnPlateau watches the
            early-stopping metric).
        scheduler_params: its arguments.
        adaptive_params: loss weighting: ``{"method": "uwl"}``, ``{"method": "gradnorm",
            "alpha": 0.16}``, ``{"method": "metabalance"}``, ``{"method": "dwa"}``,
            ``{"method": "pcgrad"}`` or ``None`` (mean of the task losses).
        n_epoch: maximum number of epochs.
        earlystop_taskid: task whose validation score selects the best epoch.
        earlystop_patience: epochs without improvement before stopping.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        gpus: GPU ids; two or more train with DDP.
        model_path: where ``model_{mode}_{seed}.pth`` and the checkpoints go.
        model_logger: a Torch-RecHub-style logger (or list).
        earlystop_mode: ``"max"`` or ``"min"``; default by task type (AUC up, MSE down).
        trainer_kwargs: extra ``lightning.Trainer`` arguments; ``gradient_clip_val`` and
            ``gradient_clip_algorithm`` are handed to the module (they work with every weighting);
            ``callbacks`` join the trainer's, as in :class:`~rechub_lightning.CTRTrainer`.
        **module_kwargs: extra :class:`~rechub_lightning.MTLModule` arguments.

    Example:
        >>> trainer = MTLTrainer(model, ["classification", "classification"],  # doctest: +SKIP
        ...                      adaptive_params={"method": "gradnorm"}, n_epoch=5, model_path="runs/mmoe")
        >>> log = trainer.fit(train_dl, val_dl)  # doctest: +SKIP
        >>> aucs = trainer.evaluate(trainer.model, test_dl)  # doctest: +SKIP
    """

    module: MTLModule

    def __init__(
        self,
        model: nn.Module,
        task_types: list[str],
        optimizer_fn: Callable[..., torch.optim.Optimizer] | str = torch.optim.Adam,
        optimizer_params: dict[str, Any] | None = None,
        regularization_params: dict[str, float] | None = None,
        scheduler_fn: Callable[..., Any] | str | None = None,
        scheduler_params: dict[str, Any] | None = None,
        adaptive_params: dict[str, Any] | None = None,
        n_epoch: int = 10,
        earlystop_taskid: int = 0,
        earlystop_patience: int = 10,
        device: str = "cpu",
        gpus: Iterable[int] | None = None,
        model_path: str = "./",
        model_logger: Any = None,
        earlystop_mode: str | None = None,
        trainer_kwargs: dict[str, Any] | None = None,
        **module_kwargs: Any,
    ) -> None:
        trainer_kwargs = dict(trainer_kwargs or {})
        for key in ("gradient_clip_val", "gradient_clip_algorithm"):
            if key in trainer_kwargs:
                module_kwargs.setdefault(key, trainer_kwargs.pop(key))
        if isinstance(task_types, str):
            raise TypeError(f"task_types must be a list with one entry per task, got the string {task_types!r}")
        super().__init__(model, n_epoch, earlystop_patience, device, gpus, model_path, model_logger, trainer_kwargs)
        self.task_types = list(task_types)
        self.n_task = len(self.task_types)
        self.module = MTLModule(
            model,
            task_types=self.task_types,
            optimizer_fn=optimizer_fn,
            optimizer_params=optimizer_params,
            regularization_params=regularization_params,
            scheduler_fn=scheduler_fn,
            scheduler_params=scheduler_params,
            adaptive_params=adaptive_params,
            earlystop_taskid=earlystop_taskid,
            **module_kwargs,
        )
        if earlystop_mode is not None:
            if earlystop_mode not in ("max", "min"):
                raise ValueError(f"earlystop_mode must be 'max' or 'min', got {earlystop_mode!r}")
            self.module.monitor_mode = earlystop_mode
        self.earlystop_taskid = self.module.earlystop_taskid
        self._epoch_log: list[list[float]] = []
        self.model.to(self.device)

    def trainer_config(self, monitor: str, mode: str, with_validation: bool) -> dict[str, Any]:
        cfg = super().trainer_config(monitor, mode, with_validation)
        cfg["callbacks"] = [*cfg["callbacks"], _EpochLog(self.module, self._epoch_log)]
        return cfg

    @property
    def adaptive_method(self) -> str | None:
        """The loss weighting's name (``"uwl"``, ``"gradnorm"``, ...), ``None`` for a plain sum."""
        from .weighting import WEIGHTING_METHODS

        name = next((k for k, cls in WEIGHTING_METHODS.items() if type(self.module.weighting) is cls), None)
        return None if name == "equal" else name

    @property
    def loss_weight(self) -> torch.Tensor | None:
        """The learned loss weights, as the reference's attribute of this name holds them: UWL's
        log-variances ``s_i`` (the loss is ``sum exp(-s_i) L_i + s_i``), GradNorm's task weights;
        ``None`` for the other methods. One tensor of ``n_task`` values (the reference: a
        ``ParameterList`` of one-element parameters)."""
        w = self.module.weighting
        if self.adaptive_method == "uwl":
            return w.log_vars
        if self.adaptive_method == "gradnorm":
            return w.task_weights
        return None

    def fit(self, train_dataloader: Any, val_dataloader: Any = None, mode: str = "base", seed: int = 0) -> list[list[float]]:
        """Train; returns one row per epoch, ``[train loss per task..., val score per task...]``.

        When it returns, ``self.model`` holds the best weights by ``earlystop_taskid``'s
        validation score, also saved as ``model_path/model_{mode}_{seed}.pth``.
        """
        self._epoch_log.clear()
        self._run_fit(train_dataloader, val_dataloader, f"model_{mode}_{seed}.pth")
        return [list(row) for row in self._epoch_log]

    def train_one_epoch(self, data_loader: Iterable[Any], log_interval: int = 10) -> list[float]:
        """One pass over ``data_loader`` outside Lightning (the optimizer persists across
        calls); returns the mean loss of every task."""
        self._check_loader(data_loader, "train", "training")
        module = self.module
        module.to(self.device)
        module.train()
        opt = self._optimizer_for_epochs()
        totals = torch.zeros(module.n_task, dtype=torch.float64)
        count = 0
        for i, batch in enumerate(data_loader):
            _, losses, extra = module.compute_losses(_to_device(batch, self.device))
            trained = module.trained_losses(losses)
            opt.zero_grad(set_to_none=True)
            if module.weighting.requires_manual:
                module.manual_gradients(trained, extra)
            else:
                (module.weighting(trained) + extra).backward()
            if module.gradient_clip_val is not None:  # sparse (row-wise) embedding gradients included
                params = [p for g in opt.param_groups for p in g["params"]]
                clip_sparse_aware_(params, float(module.gradient_clip_val), module.gradient_clip_algorithm)
            opt.step()
            totals += torch.tensor([float(x.detach()) for x in losses], dtype=torch.float64)
            count += 1
            if log_interval and (i + 1) % log_interval == 0:
                rank_zero_info(f"train batch {i + 1}: task losses {[round(float(v) / count, 6) for v in totals]}")
        means = totals / max(count, 1)
        if count:
            module.weighting.on_epoch_end(means[list(module.trained_tasks)].float())
        return means.tolist()

    @torch.no_grad()
    def _outputs(self, model: nn.Module, data_loader: Iterable[Any], targets_too: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        model.to(self.device)
        was_training = model.training
        model.eval()
        preds, targets = [], []
        try:
            for batch in data_loader:
                x, y = split_batch(_to_device(batch, self.device))
                preds.append(self.module.predictions(model(x)).cpu())
                if y is not None and targets_too:
                    targets.append(torch.as_tensor(y).float().cpu())
        finally:
            model.train(was_training)
        p = torch.cat(preds) if preds else torch.empty(0, self.n_task)
        return p, (torch.cat(targets) if targets else None)

    def evaluate(self, model: nn.Module, data_loader: Iterable[Any]) -> list[float]:
        """Score per task: exact AUC (classification) or MSE (regression); ESMM's CVR on clicked rows."""
        self._check_loader(data_loader, "val", "evaluation", model=model)
        preds, target = self._outputs(model, data_loader)
        if target is None:
            raise ValueError("evaluate needs a loader of (x, y) batches")
        return self.module.task_scores(preds, target)

    def predict(self, model: nn.Module, data_loader: Iterable[Any]) -> list[list[float]]:
        """Per row, the probability (classification) or value (regression) of every task."""
        self._check_loader(data_loader, "predict", "prediction", model=model)
        preds, _ = self._outputs(model, data_loader, targets_too=False)
        return preds.tolist()
