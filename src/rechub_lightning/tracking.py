"""Torch-RecHub's experiment-tracking loggers (``torch_rechub.basic.tracking``), same arguments.

Pass them to the trainers' ``model_logger`` (one logger or a list): each receives the
hyperparameters once, the epoch's metrics at ``step=epoch`` (``train/loss``, ``val/auc``,
``learning_rate``, ...) and ``finish()`` at the end of ``fit``, as in the reference. With
``lightning.Trainer`` use Lightning's own loggers instead (``lightning.pytorch.loggers``:
``WandbLogger``, ``TensorBoardLogger``, ``CSVLogger``, ...).

Each backend is imported when its logger is created: ``pip install wandb``, ``swanlab`` or
``tensorboardX`` (the ``tracking`` extra installs tensorboardX).
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

__all__ = ["BaseLogger", "WandbLogger", "SwanLabLogger", "TensorBoardXLogger"]


def _backend(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{package} is not installed; install it with: pip install {package}") from e


class BaseLogger(ABC):
    """The interface the trainers call: ``log_hyperparams``, ``log_metrics``, ``finish``."""

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record scalar metrics at ``step`` (the backend's own step when ``None``)."""

    @abstractmethod
    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record the run's hyperparameters."""

    @abstractmethod
    def finish(self) -> None:
        """Flush and close the run."""


class _RunLogger(BaseLogger):
    """wandb and SwanLab: module-level ``log``, a run whose ``config`` takes the hyperparameters."""

    _lib: Any
    run: Any

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if step is None:
            self._lib.log(dict(metrics))
        else:
            self._lib.log(dict(metrics), step=step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.config.update(dict(params))


class WandbLogger(_RunLogger):
    """Weights & Biases (``wandb.init(project=..., name=..., config=..., tags=..., notes=..., dir=..., **kwargs)``)."""

    def __init__(
        self,
        project: str,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._lib = _backend("wandb", "wandb")
        self.run = self._lib.init(project=project, name=name, config=config, tags=tags, notes=notes, dir=dir, **kwargs)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


class SwanLabLogger(_RunLogger):
    """SwanLab (``swanlab.init(project=..., experiment_name=..., description=..., config=..., logdir=..., **kwargs)``)."""

    def __init__(
        self,
        project: str | None = None,
        experiment_name: str | None = None,
        description: str | None = None,
        config: dict[str, Any] | None = None,
        logdir: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._lib = _backend("swanlab", "swanlab")
        self.run = self._lib.init(
            project=project, experiment_name=experiment_name, description=description, config=config, logdir=logdir, **kwargs
        )

    def finish(self) -> None:
        self._lib.finish()


def _scalar(key: str, value: Any) -> float:
    """``value`` as a float: a real number, or a one-element tensor / array; else TypeError naming ``key``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    size = getattr(value, "numel", getattr(value, "size", None))
    size = size() if callable(size) else size
    if size == 1 and hasattr(value, "item"):
        item = value.item()
        if isinstance(item, numbers.Real) and not isinstance(item, bool):
            return float(item)
    raise TypeError(f"metric {key!r}: TensorBoardXLogger logs numbers, got {type(value).__name__} {value!r}")


class TensorBoardXLogger(BaseLogger):
    """TensorBoard event files through tensorboardX (``SummaryWriter(log_dir=..., comment=..., **kwargs)``).

    Metrics are scalars (``add_scalar``); a metric of ``None`` is skipped, as in the reference.
    Unlike the reference, numpy and torch scalars (e.g. ``np.float32``, a 0-d tensor) are
    logged instead of silently left out, and a value that is not a number is a ``TypeError``.
    Without ``step`` the logger counts calls (0, 1, ...). Hyperparameters go to one
    ``hyperparameters`` text entry (``key: value`` lines).
    """

    def __init__(self, log_dir: str, comment: str = "", **kwargs: Any) -> None:
        summary_writer = _backend("tensorboardX", "tensorboardX").SummaryWriter
        self.writer = summary_writer(log_dir=log_dir, comment=comment, **kwargs)
        self._step = 0

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if step is None:
            step, self._step = self._step, self._step + 1
        values = {k: _scalar(k, v) for k, v in metrics.items() if v is not None}  # all checked before any is written
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self.writer.add_text("hyperparameters", "\n".join(f"{k}: {v}" for k, v in params.items()), 0)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
