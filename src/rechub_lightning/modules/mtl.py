"""MTLModule: multi-task training with adaptive loss weighting (DESIGN decision 7).

Per-task losses (BCE for classification, MSE for regression) are combined by a
:mod:`~rechub_lightning.weighting` method chosen with ``adaptive_params``:

* ``None``/``equal``, ``uwl`` (Kendall et al., CVPR'18) and ``dwa`` (Liu et al.,
  CVPR'19) give one differentiable loss: Lightning's automatic optimization runs.
* ``gradnorm`` (Chen et al., ICML'18), ``metabalance`` (He et al., WWW'22) and
  ``pcgrad`` (Yu et al., NeurIPS'20) need per-task gradients: the module switches to
  manual optimization, lets the weighting write ``.grad`` (gradients averaged across
  DDP ranks by the weighting itself, since ``torch.autograd.grad`` bypasses DDP's
  hooks), clips with the module's ``gradient_clip_val`` and steps the optimizer and
  every scheduler (ReduceLROnPlateau included) itself.

Which parameters are shared and which belong to one task comes from the model
(``shared_parameters()``, ``task_parameters()``, ``last_shared_layer()``); how the
model is trained and scored comes from its attributes (``task_types``,
``trained_tasks``, ``conditional_tasks``, ``auxiliary_loss``), read through any
wrapper (``DataParallel``, ``torch.compile``), never from ``isinstance`` (the one
exception: Torch-RecHub's own ``ESMM`` objects, which carry no such attributes).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MeanMetric, MeanSquaredError

from ..data.datasets import check_int
from ..metrics import BinaryAUC, auc_score
from ..models.base import unwrap_model
from ..models.multi_task._base import check_task_types
from ..weighting import build_weighting
from .base import RecModule, split_batch

__all__ = ["MTLModule", "unwrap_model"]

_PROB_EPS = 1e-7
ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def _unique_trainable(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _task_roles(inner: nn.Module) -> tuple[Sequence[int] | None, dict[int, int]]:
    """``(trained_tasks, conditional_tasks)`` of a model, from its attributes.

    Torch-RecHub's ``ESMM`` declares neither: its trainer recognises the class and trains the
    CTR and CTCVR losses only. Its objects get our ESMM's roles (same output order: CVR, CTR,
    CTCVR), looked up without importing torch-rechub.
    """
    trained = getattr(inner, "trained_tasks", None)
    conditional = getattr(inner, "conditional_tasks", None)
    if trained is None and conditional is None:
        reference = getattr(sys.modules.get("torch_rechub.models.multi_task"), "ESMM", None)
        if isinstance(reference, type) and isinstance(inner, reference):
            from ..models.multi_task import ESMM

            trained, conditional = ESMM.trained_tasks, ESMM.conditional_tasks
    return trained, dict(conditional or {})


class MTLModule(RecModule):
    """Trains a multi-task model: one output column and one label column per task.

    Args:
        model: the network (``forward(x) -> (B, n_tasks)``), or a spec dict from a checkpoint.
        task_types: ``"classification"`` or ``"regression"`` per task (default: the model's
            ``task_types``).
        optimizer_fn: optimizer class or import path (default ``torch.optim.Adam``).
        optimizer_params: its arguments (default ``{"lr": 1e-3, "weight_decay": 1e-5}``).
            Learnable task weights (UWL) get their own parameter group without weight decay.
        regularization_params: ``{"embedding_l1", "embedding_l2", "dense_l1", "dense_l2"}``.
        scheduler_fn: any ``torch.optim.lr_scheduler`` class or import path (ReduceLROnPlateau
            watches ``scheduler_monitor``, default the early-stopping metric).
        scheduler_params: its arguments.
        scheduler_interval: step the scheduler every ``"epoch"`` or ``"step"``.
        scheduler_monitor: metric ReduceLROnPlateau watches.
        sparse_embeddings: row-sparse embedding gradients (automatic weightings only).
        embedding_optimizer: optimizer of sparse embeddings (see :class:`RecModule`).
        embedding_optimizer_params: its arguments.
        adaptive_params: loss weighting, Torch-RecHub style: ``None`` (mean of the task
            losses), ``{"method": "uwl"}``, ``{"method": "dwa", "temperature": 2.0}``,
            ``{"method": "gradnorm", "alpha": 0.16}``, ``{"method": "metabalance",
            "relax_factor": 0.7, "beta": 0.9, "target_task": 0}``, ``{"method": "pcgrad"}``
            (see :func:`~rechub_lightning.weighting.build_weighting`). With models that train
            a subset of their outputs (ESMM) the weighting sees the trained losses only, and
            ``target_task`` indexes them.
        earlystop_taskid: task whose validation score early stopping and checkpointing watch:
            ``val/task_{i}_auc`` (maximised) or ``val/task_{i}_mse`` (minimised).
        gradient_clip_val: clip gradients at this norm/value. Works with every weighting;
            with manual ones Lightning refuses ``Trainer(gradient_clip_val=...)``, so set it here.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        auc_thresholds: ``None`` for exact AUC or an int: the exact AUC of the scores counted
            into that many equal-width bins (constant memory; see ``BinaryAUC``).

    Logged: ``train/loss``, ``train/task_{i}_loss``, ``loss_weight/task_{i}``,
    ``learning_rate``, ``val/loss``, ``val/task_{i}_auc`` or ``val/task_{i}_mse`` (and
    ``test/...``). ``predict_step`` returns ``(B, n_tasks)``: probabilities for
    classification tasks, values for regression tasks.

    Raises:
        ValueError: for an unknown task type (named), a task count that does not match the
            model, an unknown weighting method or argument, an ``earlystop_taskid`` out of
            range, or a manual weighting with a model that does not say which parameters are
            shared or with sparse embeddings.

    Example:
        >>> import lightning as L
        >>> from rechub_lightning import MTLModule
        >>> from rechub_lightning.data import MTLDataModule
        >>> from rechub_lightning.models.multi_task import MMOE
        >>> dm = MTLDataModule(synthetic_rows=3000, batch_size=512)
        >>> module = MTLModule(MMOE(schema=dm.schema, n_expert=2), adaptive_params={"method": "gradnorm"})
        >>> L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...           enable_progress_bar=False, enable_model_summary=False).fit(module, dm)
    """

    def __init__(
        self,
        model: nn.Module | dict[str, Any],
        task_types: Sequence[str] | None = None,
        optimizer_fn: str | Callable[..., torch.optim.Optimizer] = "torch.optim.Adam",
        optimizer_params: dict[str, Any] | None = None,
        regularization_params: dict[str, float] | None = None,
        scheduler_fn: str | Callable[..., Any] | None = None,
        scheduler_params: dict[str, Any] | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str | None = None,
        sparse_embeddings: bool = False,
        embedding_optimizer: str = "sparse_adam",
        embedding_optimizer_params: dict[str, Any] | None = None,
        adaptive_params: dict[str, Any] | None = None,
        earlystop_taskid: int = 0,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
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
        inner = unwrap_model(self.model)
        model_types = getattr(inner, "task_types", None)
        if task_types is None and model_types is None:
            raise ValueError(
                f"task_types is required for a model without a `task_types` attribute ({type(inner).__name__})"
            )
        self.task_types = check_task_types(task_types if task_types is not None else model_types)
        if model_types is not None and list(model_types) != self.task_types:
            raise ValueError(
                f"task_types={self.task_types} does not match the model's task_types={list(model_types)}"
            )
        self.n_task = len(self.task_types)

        trained, conditional = _task_roles(inner)
        self.trained_tasks = tuple(range(self.n_task)) if trained is None else tuple(int(i) for i in trained)
        self.conditional_tasks = {int(k): int(v) for k, v in dict(conditional).items()}
        for i in (*self.trained_tasks, *self.conditional_tasks, *self.conditional_tasks.values()):
            if not 0 <= i < self.n_task:
                raise ValueError(f"the model names task {i}, but there are {self.n_task} tasks")

        self.weighting = build_weighting(adaptive_params, len(self.trained_tasks))
        self.automatic_optimization = not self.weighting.requires_manual
        if self.weighting.requires_manual:
            missing = [m for m in ("shared_parameters", "task_parameters", "last_shared_layer") if not callable(getattr(inner, m, None))]
            if missing:
                raise ValueError(
                    f"adaptive method {adaptive_params.get('method')!r} needs the model to say which parameters are "  # type: ignore[union-attr]
                    f"shared: {type(inner).__name__} lacks {missing} (see rechub_lightning.models.multi_task.MultiTaskModel)"
                )
            if self.sparse_embeddings:
                raise ValueError(
                    f"adaptive method {adaptive_params.get('method')!r} needs dense gradients; "  # type: ignore[union-attr]
                    "set sparse_embeddings=False"
                )

        check_int(earlystop_taskid, "earlystop_taskid", minimum=0)  # 1.7 is an error, not task 1
        if not 0 <= int(earlystop_taskid) < self.n_task:
            raise ValueError(f"earlystop_taskid={earlystop_taskid} is out of range for {self.n_task} tasks")
        self.earlystop_taskid = int(earlystop_taskid)
        self.score_names = ["auc" if t == "classification" else "mse" for t in self.task_types]
        self.monitor = f"val/task_{self.earlystop_taskid}_{self.score_names[self.earlystop_taskid]}"
        self.monitor_mode = "max" if self.task_types[self.earlystop_taskid] == "classification" else "min"

        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be > 0, got {gradient_clip_val}")
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm

        def metrics(stage: str) -> nn.ModuleList:
            return nn.ModuleList(
                BinaryAUC(thresholds=auc_thresholds, name=f"{stage}/task_{i}_auc") if t == "classification" else MeanSquaredError()
                for i, t in enumerate(self.task_types)
            )

        self.val_metrics = metrics("val")
        self.test_metrics = metrics("test")
        # row-weighted mean over all ranks' rows (``self.log(sync_dist=True)`` would average the
        # per-rank means, which is not the single-process value when ranks hold unequal rows)
        self.val_loss_mean, self.test_loss_mean = MeanMetric(), MeanMetric()
        self._epoch_loss_sum: torch.Tensor | None = None
        self._epoch_batches = 0
        self._sums_epoch = 0  # the epoch whose task losses _epoch_loss_sum holds
        self._sums_restored = False
        self._split: tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]] | None = None

    # ------------------------------------------------------------------ losses
    def _labels(self, y: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("training/validation batches must be (x, y) with a label column per task")
        y = torch.as_tensor(y)
        if y.dim() == 1 and self.n_task == 1:
            y = y.unsqueeze(1)
        if y.dim() != 2 or y.shape[1] != self.n_task:
            raise ValueError(f"labels must have shape (B, {self.n_task}) for tasks {self.task_types}, got {tuple(y.shape)}")
        return y.float()

    def _outputs(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(x)
        if out.dim() != 2 or out.shape[1] != self.n_task:
            raise ValueError(f"the model returned shape {tuple(out.shape)}; expected (B, {self.n_task}) for tasks {self.task_types}")
        return out

    def task_losses(self, out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Per-task losses (float32 scalars): BCE for classification, MSE for regression."""
        losses = []
        for i, t in enumerate(self.task_types):
            o, target = out[:, i].float(), y[:, i]
            if t == "regression":
                losses.append(F.mse_loss(o, target))
            elif self.logits_out:
                losses.append(F.binary_cross_entropy_with_logits(o, target))
            else:
                with torch.autocast(device_type=o.device.type, enabled=False):
                    losses.append(F.binary_cross_entropy(o.clamp(_PROB_EPS, 1 - _PROB_EPS), target))
        return losses

    def predictions(self, out: torch.Tensor) -> torch.Tensor:
        """Model outputs -> probabilities (classification columns) / values (regression columns)."""
        out = out.float()
        if not self.logits_out:
            return out
        cols = [torch.sigmoid(out[:, i]) if t == "classification" else out[:, i] for i, t in enumerate(self.task_types)]
        return torch.stack(cols, dim=1)

    def extra_loss(self, out: torch.Tensor) -> torch.Tensor | float:
        """The model's auxiliary loss (AITM's calibrator) plus the L1/L2 regularisation."""
        extra: torch.Tensor | float = self.regularization_loss()
        auxiliary_loss = getattr(unwrap_model(self.model), "auxiliary_loss", None)
        if callable(auxiliary_loss):
            aux = auxiliary_loss(out)
            if aux is not None:
                extra = extra + aux
        return extra

    def compute_losses(self, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | float]:
        """``(outputs, per-task losses, extra loss)`` of a labelled batch."""
        x, y = split_batch(batch)
        y = self._labels(y)
        out = self._outputs(x)
        return out, self.task_losses(out, y.to(out.device)), self.extra_loss(out)

    def trained_losses(self, losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The losses the weighting combines (all, or the model's ``trained_tasks``)."""
        return [losses[i] for i in self.trained_tasks]

    # ------------------------------------------------------------------ manual optimisation
    def parameter_split(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """``(shared, task-specific, last shared layer)`` trainable parameters, from the model.

        Raises:
            ValueError: if the model's split misses trainable parameters or overlaps.
        """
        inner = unwrap_model(self.model)
        shared = _unique_trainable(inner.shared_parameters())
        per_task = inner.task_parameters()
        flat = [p for ps in per_task for p in ps] if per_task and isinstance(per_task[0], (list, tuple)) else list(per_task)
        task = _unique_trainable(flat)
        last = inner.last_shared_layer()
        last_params = _unique_trainable(list(last.parameters()) if isinstance(last, nn.Module) else list(last))
        shared_ids, task_ids = {id(p) for p in shared}, {id(p) for p in task}
        if shared_ids & task_ids:
            raise ValueError(f"{type(inner).__name__}: shared_parameters() and task_parameters() overlap")
        names = {id(p): n for n, p in inner.named_parameters()}
        missing = [names[id(p)] for p in inner.parameters() if p.requires_grad and id(p) not in shared_ids | task_ids]
        if missing:
            raise ValueError(f"{type(inner).__name__}: parameters neither shared nor task-specific: {missing[:5]}")
        return shared, task, last_params

    def manual_gradients(
        self, trained: Sequence[torch.Tensor], extra: torch.Tensor | float, reduce_fn: ReduceFn | None = None
    ) -> torch.Tensor:
        """Write ``.grad`` of every model parameter for a manual weighting; returns the detached total.

        The weighting sets the gradients of the weighted task losses (averaged over ranks
        by ``reduce_fn``); the gradient of ``extra`` (auxiliary + regularisation) is added,
        averaged the same way.
        """
        if self._split is None:
            self._split = self.parameter_split()
        shared, task, last = self._split
        present: list[tuple[nn.Parameter, torch.Tensor]] = []
        if isinstance(extra, torch.Tensor) and extra.requires_grad:
            # Before the weighting's step, which frees the graph the extra loss shares with the task losses.
            params = shared + task
            grads = torch.autograd.grad(extra, params, retain_graph=True, allow_unused=True)
            present = [(p, g.detach()) for p, g in zip(params, grads) if g is not None]
            if present and reduce_fn is not None:
                flat = reduce_fn(torch.cat([g.reshape(-1) for _, g in present]))
                present = [(p, piece.view_as(p)) for (p, _), piece in zip(present, flat.split([p.numel() for p, _ in present]))]
        total = self.weighting.step(trained, shared, task, last, reduce_fn)
        for p, g in present:
            p.grad = g if p.grad is None else p.grad + g
        if isinstance(extra, torch.Tensor):
            total = total + extra.detach()
        else:
            total = total + float(extra)
        return total

    def _reduce_fn(self) -> ReduceFn | None:
        if self.trainer.world_size <= 1:
            return None
        strategy = self.trainer.strategy
        return lambda t: strategy.reduce(t.detach().clone(), reduce_op="mean")

    def _step_schedulers(self, interval: str) -> None:
        """Manual optimisation: Lightning leaves every scheduler to us (ReduceLROnPlateau included)."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            count = self.trainer.current_epoch + 1 if interval == "epoch" else self.trainer.global_step
            if count % config.frequency:
                continue
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if not self.trainer.check_val_every_n_epoch:
                    continue  # step-based validation: stepped after each validation (on_validation_end)
                monitor = self.scheduler_monitor or self.monitor
                metrics = self.trainer.callback_metrics
                if monitor not in metrics:
                    raise ValueError(
                        f"ReduceLROnPlateau monitors {monitor!r}, which was not logged (is there a validation loop?); "
                        f"available: {sorted(metrics)}; set scheduler_monitor"
                    )
                self.lr_scheduler_step(config.scheduler, metrics[monitor])
            else:
                config.scheduler.step()  # type: ignore[call-arg]

    def on_validation_end(self) -> None:
        trainer = self.trainer
        if self.automatic_optimization or trainer.sanity_checking or trainer.check_val_every_n_epoch:
            return
        # manual optimisation with validation every val_check_interval batches: the plateau reads
        # the validation that just ran (lr_scheduler_step steps once per validation)
        monitor = self.scheduler_monitor or self.monitor
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and monitor in trainer.callback_metrics:
                self.lr_scheduler_step(config.scheduler, trainer.callback_metrics[monitor])

    # ------------------------------------------------------------------ optimizers / clipping
    def build_optimizer(self) -> torch.optim.Optimizer:
        """The base optimizer; the weighting's own parameters (UWL's log-variances) in a
        separate group without weight decay."""
        optimizer = super().build_optimizer()
        own = {id(p) for p in self.weighting.parameters()}
        if own:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in own]
            optimizer.add_param_group({"params": [p for p in self.weighting.parameters() if p.requires_grad], "weight_decay": 0.0})
        return optimizer

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        config = super().build_scheduler(optimizer)
        if config is not None and not self.automatic_optimization:
            # Lightning ignores (and warns about) these keys with manual optimisation: _step_schedulers reads them.
            config.pop("monitor", None)
            config.pop("strict", None)
        return config

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if self.gradient_clip_val is not None:
            gradient_clip_val, gradient_clip_algorithm = self.gradient_clip_val, self.gradient_clip_algorithm
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)  # sparse-aware

    # ------------------------------------------------------------------ hooks and steps
    def loader_checks(self, stage: str) -> dict[str, Any]:
        checks = super().loader_checks(stage)
        if checks["task_types"] is not None:
            checks["task_types"] = list(self.task_types)  # one label column per task
        return checks

    def on_fit_start(self) -> None:
        if not self.automatic_optimization and str(self.trainer.precision) in ("16-mixed", "16"):
            raise ValueError(
                "manual loss weighting (gradnorm/metabalance/pcgrad) does not support fp16 loss scaling; "
                "use precision='bf16-mixed' or '32-true'"
            )
        self._split = None
        if not self._sums_restored:  # stale sums of an interrupted earlier fit
            self._epoch_loss_sum, self._epoch_batches = None, 0
        self._sums_restored = False
        dm = getattr(self.trainer, "datamodule", None)
        data_types = getattr(dm, "task_types", None)
        if data_types is not None and list(data_types) != self.task_types:
            raise ValueError(
                f"the datamodule's task_types {list(data_types)} (labels {getattr(dm, 'labels', '?')}) do not match "
                f"the module's task_types {self.task_types}"
            )
        self._check_monitors()

    def _check_monitors(self) -> None:
        """A callback watching ``val/task_<i>_<score>`` must name a score task ``i`` has: a config's
        ``val/task_0_auc`` with a regression task 0 (scored as ``val/task_0_mse``) failed only
        after the first epoch, in Lightning's "not available" error."""
        import re

        for cb in self.trainer.callbacks:
            monitor = getattr(cb, "monitor", None)
            m = re.fullmatch(r"val/task_(\d+)_(\w+)", monitor) if isinstance(monitor, str) else None
            if m is None:
                continue
            task, score = int(m.group(1)), m.group(2)
            names = [f"val/task_{i}_{n}" for i, n in enumerate(self.score_names)]
            if task >= len(self.score_names) or self.score_names[task] != score:
                what = (f"task {task} is a {self.task_types[task]} task, scored as {names[task]!r}" if task < len(names)
                        else f"there are {len(names)} tasks")
                raise ValueError(
                    f"{type(cb).__name__} monitors {monitor!r}, but {what}; the validation metrics are {names} "
                    f"(an MSE is minimised: mode='min')"
                )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # the running per-task loss sums of the current epoch: a run resumed mid-epoch gives the
        # same epoch means (DWA's input). Lightning does not call ``on_train_epoch_start`` for a
        # resumed epoch, and a checkpoint written during the last batch's validation precedes
        # ``on_train_epoch_end``: the sums carry their epoch, and sums of a finished epoch are
        # consumed at the first step of the next one.
        loss_sum = None if self._epoch_loss_sum is None else self._epoch_loss_sum.detach().cpu()
        checkpoint["rechub_mtl_epoch"] = {"loss_sum": loss_sum, "batches": self._epoch_batches, "epoch": self._sums_epoch}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        stats = checkpoint.get("rechub_mtl_epoch")
        if stats and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            loss_sum = stats.get("loss_sum")
            self._epoch_loss_sum = None if loss_sum is None else loss_sum.to(self.device)
            self._epoch_batches = int(stats.get("batches", 0))
            self._sums_epoch = int(stats.get("epoch", checkpoint.get("epoch", 0)))
            self._sums_restored = True

    def _consume_epoch_losses(self) -> None:
        """Hand the epoch's mean task losses (over all ranks' batches) to the weighting."""
        if self._epoch_loss_sum is not None:
            stats = torch.cat([self._epoch_loss_sum, self._epoch_loss_sum.new_tensor([float(self._epoch_batches)])])
            if self.trainer.world_size > 1:
                stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
            means = stats[:-1] / stats[-1]
            self.weighting.on_epoch_end(means[list(self.trained_tasks)])
        self._epoch_loss_sum, self._epoch_batches = None, 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self._epoch_loss_sum is not None and self._sums_epoch != self.current_epoch:
            self._consume_epoch_losses()  # resumed from a checkpoint written before that epoch's end
        self._sums_epoch = self.current_epoch
        out, losses, extra = self.compute_losses(batch)
        trained = self.trained_losses(losses)
        if self.automatic_optimization:
            total = self.weighting(trained) + extra
        else:
            optimizer = self.optimizers()
            optimizer.zero_grad()  # type: ignore[union-attr]
            total = self.manual_gradients(trained, extra, self._reduce_fn())
            if self.gradient_clip_val is not None:
                self.configure_gradient_clipping(optimizer)  # type: ignore[arg-type]
            optimizer.step()  # type: ignore[union-attr]
            self._step_schedulers("step")

        values = torch.stack([loss.detach() for loss in losses])
        self._epoch_loss_sum = values if self._epoch_loss_sum is None else self._epoch_loss_sum + values
        self._epoch_batches += 1
        bs = out.shape[0]
        self.log("train/loss", total.detach(), on_step=True, on_epoch=True, prog_bar=self.loss_on_progress_bar, batch_size=bs, sync_dist=True)
        for i, loss in enumerate(losses):
            self.log(f"train/task_{i}_loss", loss.detach(), on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return total

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # train/rows_per_sec
        weights = self.weighting.weights()
        for k, i in enumerate(self.trained_tasks):
            self.log(f"loss_weight/task_{i}", float(weights[k]), on_step=False, on_epoch=True, sync_dist=True)
        self._consume_epoch_losses()
        if not self.automatic_optimization:
            self._step_schedulers("epoch")

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = split_batch(batch)
        y = self._labels(y)
        out = self._outputs(x)
        y = y.to(out.device)
        losses = self.task_losses(out, y)
        loss_mean = self.val_loss_mean if stage == "val" else self.test_loss_mean
        loss_mean.update(torch.stack(self.trained_losses(losses)).mean().detach(), weight=out.shape[0])
        self.log(f"{stage}/loss", loss_mean, on_step=False, on_epoch=True)
        preds = self.predictions(out)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        for i, metric in enumerate(metrics):
            p, t = preds[:, i], y[:, i]
            j = self.conditional_tasks.get(i)
            if j is not None:  # e.g. ESMM's CVR: scored on clicked rows only
                keep = y[:, j] == 1
                p, t = p[keep], t[keep]
            metric.update(p, t)
            self.log(f"{stage}/task_{i}_{self.score_names[i]}", metric, on_step=False, on_epoch=True, prog_bar=stage == "val" and i == self.earlystop_taskid)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x, _ = split_batch(batch)
        return self.predictions(self._outputs(x))

    # ------------------------------------------------------------------ scores outside Lightning
    def task_scores(self, preds: torch.Tensor, y: torch.Tensor) -> list[float]:
        """Per-task score of stacked predictions: AUC (classification) or MSE (regression);
        tasks in ``conditional_tasks`` are scored on the rows where their condition's label is 1."""
        y = self._labels(y).to(preds.device)
        scores = []
        for i, t in enumerate(self.task_types):
            p, target = preds[:, i].float(), y[:, i]
            j = self.conditional_tasks.get(i)
            if j is not None:
                keep = y[:, j] == 1
                p, target = p[keep], target[keep]
            if t == "classification":
                scores.append(float(auc_score(p, target, dtype=torch.float64)))
            else:
                scores.append(float(F.mse_loss(p, target)) if p.numel() else math.nan)
        return scores
