"""What the three Torch-RecHub-style trainers share: device mapping, the reference's logger
adapter and :class:`_FacadeBase` (fit / evaluate / predict / export on ``lightning.Trainer``).
The trainers themselves are in :mod:`rechub_lightning.trainers`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn

from .checkpoint import AtomicCheckpointIO
from .data.datasets import check_int
from .export import export_onnx as _export_onnx
from .metrics import auc_score
from .modules.base import RecModule

__all__ = ["device_config", "ReferenceLoggerAdapter", "exact_auc"]


def device_config(device: str | torch.device = "cpu", gpus: Iterable[int] | None = None) -> dict[str, Any]:
    """Lightning ``accelerator``/``devices``/``strategy`` for the reference's ``device`` and ``gpus``.

    ``gpus`` with two or more ids -> DDP over those GPUs (the reference's ``DataParallel``).
    Otherwise ``device`` decides, as in the reference (which ignores a one-id ``gpus`` list;
    its examples pass ``gpus=[0]`` with ``device="cpu"``): ``"cuda:1"`` -> GPU 1, ``"cpu"`` -> CPU.
    """
    gpus = list(gpus or [])
    if len(gpus) > 1:
        return {"accelerator": "gpu", "devices": gpus, "strategy": "ddp"}
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device (use 'cpu', 'cuda', 'cuda:N' or 'mps')") from e
    if dev.type == "cuda":
        return {"accelerator": "gpu", "devices": [dev.index or 0], "strategy": "auto"}
    if dev.type == "mps":
        return {"accelerator": "mps", "devices": 1, "strategy": "auto"}
    if dev.type == "cpu":
        return {"accelerator": "cpu", "devices": 1, "strategy": "auto"}
    raise ValueError(f"device={device!r} is not supported (use 'cpu', 'cuda', 'cuda:N' or 'mps')")


class ReferenceLoggerAdapter(Logger):
    """Exposes Torch-RecHub-style loggers (``log_hyperparams``, ``log_metrics``, ``finish``) to Lightning.

    They receive what the reference's trainers sent them: per-epoch metrics at ``step=epoch``
    (``train/loss``, ``val/auc``, ``learning_rate``, ...). Lightning's per-step values
    (``*_step``) are left out and the ``_epoch`` suffix is dropped.
    """

    def __init__(self, loggers: Any) -> None:
        super().__init__()
        self._loggers = list(loggers) if isinstance(loggers, (list, tuple)) else [loggers]

    @property
    def name(self) -> str:
        return "rechub"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        params = dict(params) if isinstance(params, Mapping) else vars(params)
        for lg in self._loggers:
            lg.log_hyperparams(params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        epoch = metrics.get("epoch")
        out = {
            (k[: -len("_epoch")] if k.endswith("_epoch") else k): v
            for k, v in metrics.items()
            if k != "epoch" and not k.endswith("_step")
        }
        if not out:
            return
        at = int(epoch) if epoch is not None else step
        for lg in self._loggers:
            lg.log_metrics(out, step=at)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        for lg in self._loggers:
            if hasattr(lg, "finish"):
                lg.finish()


def exact_auc(preds: torch.Tensor, target: torch.Tensor) -> float:
    """ROC AUC as a Python float computed in float64 (sklearn's value to the last digit), with a
    warning when it is undefined."""
    value = float(auc_score(preds.cpu(), target.cpu(), dtype=torch.float64))
    if math.isnan(value):
        rank_zero_warn("AUC is undefined (the labels hold one class, or a score is NaN); returning NaN")
    return value


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class _FacadeBase:
    """What the three trainer facades share: device mapping, the Lightning run, best weights."""

    module: RecModule

    def __init__(
        self,
        model: nn.Module,
        n_epoch: int,
        earlystop_patience: int,
        device: str,
        gpus: Iterable[int] | None,
        model_path: str,
        model_logger: Any,
        trainer_kwargs: dict[str, Any] | None,
    ) -> None:
        self.model = model
        # n_epoch=-1 would be Lightning's "no limit" (the reference: no epoch at all)
        self.n_epoch = check_int(n_epoch, "n_epoch", 0)
        self.earlystop_patience = check_int(earlystop_patience, "earlystop_patience", 0)
        self.gpus = list(gpus or [])
        self._device_cfg = device_config(device, self.gpus)
        self.device = torch.device(f"cuda:{self.gpus[0]}" if len(self.gpus) > 1 else device)
        self.model_path = model_path
        self.model_logger = model_logger
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.trainer: L.Trainer | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ input checks
    def _check_loader(
        self, loader: Any, stage: str, where: str, labels: bool = True, model: nn.Module | None = None
    ) -> None:
        """Validate a loader's whole data before anything runs on it, as the module's Lightning
        hooks do (:meth:`RecModule.check_loader`), for the paths that run outside Lightning
        (``evaluate``, ``predict``, ``train_one_epoch``, embeddings)."""
        self.module.check_loader(loader, stage, where, model=model, labels=labels)

    def export_onnx(
        self,
        output_path: str,
        dummy_input: dict[str, torch.Tensor] | None = None,
        batch_size: int = 2,
        seq_length: int | None = None,
        opset_version: int = 17,
        dynamic_batch: bool = True,
        device: str | None = None,
        verbose: bool = False,
        onnx_export_kwargs: dict[str, Any] | None = None,
        mode: str | None = None,
    ) -> bool:
        """Export the trained model to ONNX (reference API; see :func:`rechub_lightning.export.export_onnx`).

        ``mode="user"``/``"item"`` exports one tower of a matching model; ``seq_length`` is the
        history length of the generated example input (default: the model's maximum). The graph's batch
        dimension is always dynamic, the export runs on the CPU and the outputs are
        probabilities for our logit models (scores as the model returns them otherwise).
        ``batch_size``, ``dynamic_batch``, ``device``, ``verbose`` and ``onnx_export_kwargs`` are
        accepted for compatibility and have no effect. Returns ``True`` once the file is written.
        """
        model = self.model.module if isinstance(self.model, nn.DataParallel) else self.model
        device_before = next((p.device for p in model.parameters()), torch.device("cpu"))
        model.to("cpu")
        try:
            _export_onnx(
                model,
                output_path,
                tower=mode,
                dummy_input=None if dummy_input is None else {k: torch.as_tensor(v).cpu() for k, v in dummy_input.items()},
                seq_length=seq_length,
                opset_version=opset_version,
            )
        finally:
            model.to(device_before)
        rank_zero_info(f"ONNX model written to {output_path}")
        return True

    def visualization(
        self,
        input_data: dict[str, torch.Tensor] | None = None,
        batch_size: int = 2,
        seq_length: int = 10,
        depth: int = 3,
        show_shapes: bool = True,
        expand_nested: bool = True,
        save_path: str | None = None,
        graph_name: str = "model",
        device: str | None = None,
        dpi: int = 300,
        **kwargs: Any,
    ) -> Any:
        """Draw the model's computation graph (reference API; needs the ``visualization`` extra).

        See :func:`rechub_lightning.visualization.visualize_model`; ``device=None`` runs on the CPU.
        """
        from .visualization import visualize_model

        return visualize_model(
            self.model, input_data=input_data, batch_size=batch_size, seq_length=seq_length, depth=depth,
            show_shapes=show_shapes, expand_nested=expand_nested, save_path=save_path, graph_name=graph_name,
            device=device or "cpu", dpi=dpi, **kwargs,
        )

    # ------------------------------------------------------------------ lightning run
    def trainer_config(self, monitor: str, mode: str, with_validation: bool) -> dict[str, Any]:
        """The ``lightning.Trainer`` arguments ``fit`` uses (exposed for inspection and tests)."""
        callbacks: list[Any] = []
        if with_validation:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=os.path.join(self.model_path, "checkpoints"),
                    filename="best",
                    monitor=monitor,
                    mode=mode,
                    save_top_k=1,
                    save_last=True,
                    enable_version_counter=False,
                )
            )
            # checked after each validation run (not at the training epoch end, which a max_steps run may
            # reach before any validation)
            callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=self.earlystop_patience, check_finite=False,
                                           check_on_train_epoch_end=False))
        cfg: dict[str, Any] = {
            **self._device_cfg,
            "max_epochs": self.n_epoch,
            "callbacks": callbacks,
            "default_root_dir": self.model_path,
            "logger": ReferenceLoggerAdapter(self.model_logger) if self.model_logger is not None else False,
            "enable_checkpointing": with_validation,
            "num_sanity_val_steps": 0,
            "plugins": [AtomicCheckpointIO()],
        }
        extra = self.trainer_kwargs.get("callbacks")
        cfg.update({k: v for k, v in self.trainer_kwargs.items() if k != "callbacks"})
        if extra is not None:
            # the user's callbacks join the trainer's; their own ModelCheckpoint / EarlyStopping
            # takes the place of the trainer's of that kind
            extra = list(extra) if isinstance(extra, (list, tuple)) else [extra]
            kinds = tuple(k for k in (ModelCheckpoint, EarlyStopping) if any(isinstance(c, k) for c in extra))
            cfg["callbacks"] = [c for c in callbacks if not isinstance(c, kinds)] + extra
        return cfg

    def _run_fit(self, train_dataloader: Any, val_dataloader: Any, model_file: str) -> None:
        # the module's on_train_start checks both loaders before the first step; the training loader
        # also here, as lightning.Trainer skips an empty one (and on_train_start) with a log line only
        if self.n_epoch < 1:
            raise ValueError(f"fit with n_epoch={self.n_epoch} trains nothing (and would save the untrained weights); give n_epoch >= 1")
        self._check_loader(train_dataloader, "train", "training")
        os.makedirs(self.model_path, exist_ok=True)
        module = self.module
        shown = self.trainer.optimizers[0] if self.trainer is not None and self.trainer.optimizers else self._optimizer
        if shown is not None:
            # settings changed on trainer.optimizer (what it returns now) carry into this fit, as
            # with the reference's one optimizer built in __init__
            module.__dict__["_handed_optimizer"] = shown
        cfg = self.trainer_config(module.monitor, module.monitor_mode, val_dataloader is not None)
        self.trainer = L.Trainer(**cfg)
        self.trainer.fit(module, train_dataloaders=train_dataloader, val_dataloaders=val_dataloader)
        ckpt_cb = self.trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if val_dataloader is not None else ""
        score = getattr(ckpt_cb, "best_model_score", None)
        if best and score is None:
            # the user's own ModelCheckpoint without a monitor: its file holds the last weights, as the model does
            rank_zero_info(f"The checkpoint callback monitors nothing; the model keeps the last epoch's weights ({best})")
        elif best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
            rank_zero_info(f"Restored best weights ({ckpt_cb.monitor}={float(score):.6f}) from {best}")  # type: ignore[union-attr]
            if not math.isfinite(float(score)):
                rank_zero_warn(
                    f"{ckpt_cb.monitor} was never a finite number (e.g. an AUC over labels of one class), so the "
                    f"restored weights {os.path.basename(best)} were not chosen by it; monitor another task or "
                    f"check the validation labels"
                )
        if self.trainer.is_global_zero:
            torch.save(self.model.state_dict(), os.path.join(self.model_path, model_file))
        self.model.to(self.device)

    @property
    def best_model_path(self) -> str | None:
        cb = self.trainer.checkpoint_callback if self.trainer is not None else None
        return getattr(cb, "best_model_path", None) or None

    # ------------------------------------------------------------------ the reference's attributes
    #: Torch-RecHub trainer attributes that have no object of their own here, and what to use.
    _NOT_HERE: dict[str, str] = {
        "criterion": "the loss is the module's (BCE on logits for CTR; a custom loss: subclass the module and "
        "override compute_loss)",
        "evaluate_fn": "evaluate() returns the AUC; other metrics: compute them from predict()",
        "reg_loss_fn": "regularization_params in the constructor (trainer.module.regularization)",
        "loss_fns": "the module's task losses (BCE for classification, MSE for regression, by task_types)",
        "evaluate_fns": "evaluate() returns one score per task (AUC or MSE, by task_types)",
    }

    def __getattr__(self, name: str) -> Any:
        hint = type(self)._NOT_HERE.get(name)
        if hint is not None:
            raise AttributeError(f"{type(self).__name__} has no {name!r} (Torch-RecHub's trainers do): {hint}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self)._NOT_HERE:
            # assigning it would be silently ignored: the run uses the module's own
            raise AttributeError(f"setting {type(self).__name__}.{name} has no effect here: {type(self)._NOT_HERE[name]}")
        super().__setattr__(name, value)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer: the last ``fit``'s (Lightning's), else the one ``train_one_epoch`` steps
        (built on first use, from ``optimizer_fn``/``optimizer_params``). Its settings carry into
        the next ``fit``'s optimizer (``trainer.optimizer.param_groups[0]["lr"] = 0.01`` before
        ``fit``; after a ``fit``, also the rate its scheduler left), as with the reference's one
        optimizer. The attribute is read-only: the constructor's arguments choose the class."""
        if self.trainer is not None and self.trainer.optimizers:
            return self.trainer.optimizers[0]
        return self._optimizer_for_epochs()

    @optimizer.setter
    def optimizer(self, value: Any) -> None:
        raise AttributeError("the optimizer is built from optimizer_fn / optimizer_params; give them to the constructor")

    @property
    def scheduler(self) -> Any:
        """The last ``fit``'s learning-rate scheduler (``None`` without ``scheduler_fn`` or before ``fit``)."""
        configs = self.trainer.lr_scheduler_configs if self.trainer is not None else []
        return configs[0].scheduler if configs else None

    @property
    def early_stopper(self) -> Any:
        """The last ``fit``'s ``EarlyStopping`` callback (``wait_count``, ``best_score``, ``stopped_epoch``),
        ``None`` before ``fit``: it plays the reference's ``EarlyStopper``; best weights are restored
        from ModelCheckpoint's best checkpoint."""
        return self.trainer.early_stopping_callback if self.trainer is not None else None

    # ------------------------------------------------------------------ plain loops
    def _optimizer_for_epochs(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = self.module.build_optimizer()
        return self._optimizer

    def _train_loop(self, data_loader: Iterable[Any], log_interval: int, loss_fn: Callable[[Any], torch.Tensor]) -> float:
        self._check_loader(data_loader, "train", "training")
        self.module.to(self.device)
        self.module.train()
        opt = self._optimizer_for_epochs()
        total, count, window = 0.0, 0, 0.0
        for i, batch in enumerate(data_loader):
            batch = _to_device(batch, self.device)
            loss = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            total += value
            window += value
            count += 1
            if log_interval and (i + 1) % log_interval == 0:
                rank_zero_info(f"train batch {i + 1}: loss {window / log_interval:.6f}")
                window = 0.0
        return total / count if count else 0.0
