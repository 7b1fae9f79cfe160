"""What the CTR, matching and multi-task LightningModules share (DESIGN decision 3).

Optimizer and scheduler construction, L1/L2 regularisation, sparse-embedding
optimisation, hyper-parameters that load with ``weights_only=True``, the learning-rate
log and the prediction plumbing live here once; subclasses define the loss, the
metrics and (multi-task) the optimisation step.
"""

from __future__ import annotations

import atexit
import inspect
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..losses import RegularizationLoss
from ..models.base import build_model, model_spec, returns_logits, unwrap_model
from .optim import HybridOptimizer, callable_path, resolve_callable, split_embedding_parameters

_CLEANUP_REGISTERED = False


def _destroy_process_group_at_exit() -> None:
    """Destroy the default process group before the interpreter shuts down.

    Lightning leaves the process group alive after ``fit``/``validate``/``predict`` (later calls
    reuse it). If a process then exits with it alive, gloo's worker threads can still hold work
    objects whose tensors are freed during interpreter finalization, which aborts the process
    (``terminate called without an active exception``, exit status -6) after a successful run.
    An ``atexit`` handler runs while the interpreter is still intact; it is a no-op when the
    user destroyed the group already.
    """
    global _CLEANUP_REGISTERED
    if _CLEANUP_REGISTERED or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return

    def _cleanup() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001 - never turn a finished run into a failure at exit
                pass

    atexit.register(_cleanup)
    _CLEANUP_REGISTERED = True

__all__ = ["RecModule", "split_batch", "clip_sparse_aware_"]

_REG_KEYS = ("embedding_l1", "embedding_l2", "dense_l1", "dense_l2")
_EMBEDDING_OPTIMIZERS = ("sparse_adam", "adagrad", "sgd")


def split_batch(batch: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """``(x, y)`` from a batch that is ``(x, y)``, ``[x, y]`` or ``x`` alone (prediction)."""
    if isinstance(batch, Mapping):
        return dict(batch), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping):
        return batch[0], batch[1]
    raise TypeError(f"a batch must be (x_dict, y) or x_dict, got {type(batch).__name__}")


@torch.no_grad()
def clip_sparse_aware_(params: list[nn.Parameter], clip_val: float, algorithm: str = "norm") -> torch.Tensor | None:
    """Gradient clipping that also handles sparse (row-wise) embedding gradients.

    ``algorithm="norm"`` scales all gradients so their global L2 norm is at most ``clip_val``
    (returns the norm before clipping); ``"value"`` clamps every entry to ``[-clip_val, clip_val]``.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return None
    if algorithm == "value":
        for p in params:
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()
                p.grad._values().clamp_(-clip_val, clip_val)
            else:
                p.grad.clamp_(-clip_val, clip_val)
        return None
    grads = [p.grad for p in params]
    norms = [(g.coalesce()._values() if g.is_sparse else g).float().norm() for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = clip_val / (total + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)
    return total


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


_COMPILED_PREFIX = "model._orig_mod."


def _strip_compile_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _COMPILED_PREFIX)]:
        state_dict[prefix + "model." + key[len(prefix + _COMPILED_PREFIX):]] = state_dict.pop(key)


def _add_compile_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    plain = prefix + "model."
    for key in [k for k in state_dict if k.startswith(plain) and not k.startswith(prefix + _COMPILED_PREFIX)]:
        state_dict[prefix + _COMPILED_PREFIX + key[len(plain):]] = state_dict.pop(key)


def _copy_group_settings(source: torch.optim.Optimizer, target: torch.optim.Optimizer) -> None:
    """Copy the per-group settings (``lr``, ``weight_decay``...) of an optimizer built earlier
    for the same parameters into ``target``: the facades' ``trainer.optimizer`` before ``fit``,
    whose ``param_groups[0]["lr"] = ...`` the reference's scripts set. Nothing when the groups
    differ (another embedding mode chosen under the Trainer, say)."""
    old, new = source.param_groups, target.param_groups
    if len(old) != len(new) or any([id(p) for p in a["params"]] != [id(p) for p in b["params"]] for a, b in zip(old, new)):
        return
    for a, b in zip(old, new):
        for key, value in a.items():
            if key != "params" and key in b:
                b[key] = value


class RecModule(L.LightningModule):
    """Base LightningModule of rechub-lightning.

    Args:
        model: the network (``forward(x_dict)``), or a spec dict ``{"class_path", "init_args"}``
            as stored in our checkpoints.
        optimizer_fn: optimizer class or import path (default ``torch.optim.Adam``).
        optimizer_params: its keyword arguments (default ``{"lr": 1e-3, "weight_decay": 1e-5}``).
        regularization_params: ``{"embedding_l1", "embedding_l2", "dense_l1", "dense_l2"}``:
            penalties on embedding tables vs all other (non-normalisation) parameters, added to
            every step's loss (the reference's semantics).
        scheduler_fn: any ``torch.optim.lr_scheduler`` class or import path, ReduceLROnPlateau
            included (the reference only handled StepLR).
        scheduler_params: its keyword arguments.
        scheduler_interval: step the scheduler every ``"epoch"`` or ``"step"``.
        scheduler_monitor: metric ReduceLROnPlateau watches (default: the module's ``monitor``;
            its ``mode`` defaults to that metric's direction, e.g. ``"max"`` for an AUC);
            with ``check_val_every_n_epoch=n`` the plateau steps after every n-th epoch, when the
            metric is fresh.
        sparse_embeddings: give embedding tables row-sparse gradients and update them with
            ``embedding_optimizer`` (a lazy optimizer touching only the batch's rows, without
            weight decay), so a step's cost does not grow with the vocabulary. ``None`` (default)
            chooses: sparse on CPU (one process, or DDP over gloo); dense (the reference's
            semantics: ``optimizer_fn`` with weight decay on every row) on GPUs, where dense
            Adam is fast and NCCL has no sparse all-reduce, under FSDP, when an embedding
            L1/L2 penalty is set (it touches every row), and for models without our
            ``EmbeddingLayer`` (torch-rechub model objects: ``True`` makes all their
            ``nn.Embedding`` tables sparse, which fails for models that read ``.weight``).
        embedding_optimizer: ``"sparse_adam"`` (default), ``"adagrad"`` or ``"sgd"``; used only
            with ``sparse_embeddings``.
        embedding_optimizer_params: its keyword arguments (default: ``lr`` of ``optimizer_params``).
    """

    #: metric that early stopping / checkpointing watch, and its direction
    monitor: str = "val/loss"
    monitor_mode: str = "min"

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
    ) -> None:
        super().__init__()
        if isinstance(model, Mapping):
            model = build_model(dict(model))
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self._compiled = _is_compiled(model)
        if self._compiled:
            if sparse_embeddings:
                raise ValueError(
                    "sparse_embeddings=True with a torch.compile'd model: torch.compile does not support sparse "
                    "embedding gradients; use sparse_embeddings=False (or leave it unset)"
                )
            # checkpoints hold the model's own keys ("model.x", not "model._orig_mod.x"): they load
            # into the plain model (load_from_checkpoint, rechub export/predict) and into a compiled one
            self.register_state_dict_post_hook(_strip_compile_prefix)
            self.register_load_state_dict_pre_hook(_add_compile_prefix)
        self.optimizer_fn = resolve_callable(optimizer_fn, "optimizer_fn") or torch.optim.Adam
        self.optimizer_params = {"lr": 1e-3, "weight_decay": 1e-5} if optimizer_params is None else dict(optimizer_params)
        reg = dict(regularization_params or {})
        unknown = set(reg) - set(_REG_KEYS)
        if unknown:
            raise ValueError(f"regularization_params has unknown keys {sorted(unknown)}; allowed: {list(_REG_KEYS)}")
        self.regularization = RegularizationLoss(**{k: float(reg.get(k, 0.0)) for k in _REG_KEYS})
        self._has_reg = any(float(reg.get(k, 0.0)) > 0 for k in _REG_KEYS)
        self.scheduler_fn = resolve_callable(scheduler_fn, "scheduler_fn")
        self.scheduler_params = dict(scheduler_params or {})
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        if embedding_optimizer not in _EMBEDDING_OPTIMIZERS:
            raise ValueError(f"embedding_optimizer={embedding_optimizer!r} is not one of {_EMBEDDING_OPTIMIZERS}")
        self.embedding_optimizer = embedding_optimizer
        self.embedding_optimizer_params = dict(embedding_optimizer_params or {})
        emb_reg = any(float(reg.get(k, 0.0)) > 0 for k in ("embedding_l1", "embedding_l2"))
        if sparse_embeddings and emb_reg:
            raise ValueError(
                "sparse_embeddings=True cannot be combined with embedding_l1/embedding_l2 regularization "
                "(the penalty touches every row and makes the gradient dense); use sparse_embeddings=False"
            )
        self._sparse_request = sparse_embeddings
        self._emb_reg = emb_reg
        self.sparse_embeddings = False
        if sparse_embeddings:
            self.set_sparse_embeddings(True)
        self.logits_out = returns_logits(self.model)

        self.save_hyperparameters(ignore=["model"])
        self._clean_hparams(optimizer_fn=optimizer_fn, scheduler_fn=scheduler_fn)

    # ------------------------------------------------------------------ sparse embeddings
    def set_sparse_embeddings(self, sparse: bool) -> None:
        """Switch the model's feature embedding tables to sparse (row-wise) or dense gradients.

        In our models only the tables of :class:`~rechub_lightning.layers.EmbeddingLayer` (the
        vocabulary-sized ones) switch; a model's own small ``nn.Embedding`` modules (positions,
        SINE's concept pool) stay dense, since models read their ``.weight`` directly. A model
        without an ``EmbeddingLayer`` (e.g. a torch-rechub model object) has every
        ``nn.Embedding``/``nn.EmbeddingBag`` switched.
        """
        from ..layers.embedding import EmbeddingLayer

        self.sparse_embeddings = bool(sparse)
        layers = [m for m in self.model.modules() if isinstance(m, EmbeddingLayer)] or [self.model]
        for layer in layers:
            for m in layer.modules():
                if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                    m.sparse = self.sparse_embeddings

    def _resolve_sparse(self) -> None:
        if self._sparse_request is not None:
            return
        from ..layers.embedding import EmbeddingLayer

        # A model without our EmbeddingLayer (e.g. a torch-rechub model object) cannot tell its
        # vocabulary tables from embeddings it reads as ``.weight`` (NARM, STAMP, SINE, positions),
        # which SparseAdam cannot update: it keeps the reference's dense semantics unless asked.
        sparse = not self._emb_reg and any(isinstance(m, EmbeddingLayer) for m in self.model.modules())
        if sparse and self._compiled:
            # torch.compile's backends fail on sparse embedding gradients (the first backward raises)
            rank_zero_info(f"{type(self).__name__}: the model is compiled (torch.compile): dense embedding gradients")
            sparse = False
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else next(self.parameters()).device
        if device.type != "cpu":
            # On GPUs dense Adam over the tables is fast (measured: benchmarks/RESULTS.md) and
            # NCCL has no sparse all-reduce; lazy row-wise updates pay off on CPUs.
            sparse = False
        if sparse and trainer is not None and not isinstance(trainer.strategy, SingleDeviceStrategy):
            # Any wrapping strategy all-reduces gradients: only DDP over gloo handles sparse ones
            # (NCCL refuses them even with a single GPU; FSDP flattens parameters).
            strategy = trainer.strategy
            backend = getattr(strategy, "_process_group_backend", None) or getattr(strategy, "process_group_backend", None)
            sparse = isinstance(strategy, DDPStrategy) and backend == "gloo"
        self.set_sparse_embeddings(sparse)

    def setup(self, stage: str) -> None:
        _destroy_process_group_at_exit()
        if stage == "fit":
            self._resolve_sparse()
            self._refuse_overfit_batches()

    def _refuse_overfit_batches(self) -> None:
        """``Trainer(overfit_batches=N)`` rebuilds training loaders around a row-by-row sampler, which
        our batched loaders cannot use (:class:`BatchDataLoader` refuses to iterate then, but
        Lightning's teardown buries that error): refuse it here, before Lightning does that."""
        trainer = self._trainer
        if trainer is None or not trainer.overfit_batches:
            return
        from ..data.base import TabularDataModule
        from ..data.datasets import BatchDataLoader
        from ..data.match import MatchDataModule

        # what trainer.fit received: a datamodule, or loaders (e.g. DataGenerator's, from the trainers)
        source = getattr(getattr(trainer.fit_loop, "_data_source", None), "instance", None)
        loaders = source if isinstance(source, (list, tuple)) else [source]
        ours = isinstance(trainer.datamodule, (TabularDataModule, MatchDataModule)) or any(
            isinstance(dl, BatchDataLoader) for dl in loaders
        )
        if ours:
            raise ValueError(
                f"overfit_batches={trainer.overfit_batches!r} rebuilds the training loader row by row, which "
                "rechub-lightning's batched loaders do not support; use limit_train_batches=N and limit_val_batches=N instead"
            )

    def check_train_batches(self, loader: Any) -> None:
        """Refuse, before the first step, training batches the model cannot train on (any loader
        that tells its batch size and rows; :func:`~rechub_lightning.data.make_dataloader` and
        streamed data merge a 1-row tail into the batch before it, so with them only a data set of
        one row meets the check): see :meth:`check_batch_sizes`."""
        from ..data.datasets import batch_sizes

        sizes = batch_sizes(loader)
        if sizes is not None:
            self.check_batch_sizes(*sizes)

    def check_batch_sizes(self, batch_size: int, smallest: int, rows: int) -> None:
        """A batch of one row is refused when the model has BatchNorm layers."""
        if smallest != 1 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            return
        fix = "give more training rows" if rows == 1 else f"change batch_size (e.g. {batch_size + 1})"
        raise ValueError(
            f"the last training batch would hold 1 row ({rows} rows, batch_size={batch_size}) and the model has "
            f"BatchNorm layers, which cannot train on one row; {fix}"
        )

    @property
    def loss_on_progress_bar(self) -> bool:
        """Whether the step loss goes to the progress bar: only when there is one. Lightning turns
        progress-bar values into Python floats after every step, a host-device synchronisation
        that stalls an asynchronous GPU pipeline; without a bar (cluster jobs, benchmarks) the
        loss stays a tensor until a logger writes it (every ``log_every_n_steps``)."""
        trainer = self._trainer
        return trainer is not None and trainer.progress_bar_callback is not None

    # ------------------------------------------------------------------ input checks
    def loader_checks(self, stage: str) -> dict[str, Any]:
        """What :func:`~rechub_lightning.data.base.validate_loader` checks in ``stage``'s loaders.

        ``stage`` is ``"train"``, ``"val"``, ``"test"`` or ``"predict"``. The default suits a
        single binary task: training loaders hold every feature and labels in ``[0, 1]``;
        validation/test loaders the features they hold and 0/1 labels (what AUC needs);
        prediction loaders the features they hold.
        """
        if stage == "train":
            return {"task_types": ["classification"], "binary": False, "require_all": True, "allow_empty": False}
        if stage in ("val", "test"):
            return {"task_types": ["classification"], "binary": True, "require_all": False, "allow_empty": False}
        return {"task_types": None, "require_all": False}

    def check_loader(
        self, loader: Any, stage: str, where: str | None = None, model: nn.Module | None = None, labels: bool = True
    ) -> None:
        """Check the whole data behind ``loader`` against the model (ids inside each feature's
        vocabulary, columns present, finite dense values, labels that fit) before anything runs
        on it: with fused tables an id past its feature's block would read another feature's rows.

        Args:
            loader: a DataLoader; datasets that expose no columns (streams) are not checked here
                (they check each batch).
            stage: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``: what :meth:`loader_checks` requires.
            where: the split's name in error messages (default: from ``stage``).
            model: check against this model's features instead of the module's.
            labels: ``False`` leaves the labels unchecked (the caller does not read them).

        A dataset that passed the same checks is not read again.
        """
        from ..data.base import validate_loader

        if loader is None:
            return
        feats = self.checked_features(stage, self.model if model is None else model)
        checks = self.loader_checks(stage)
        if not labels:
            checks = {**checks, "task_types": None}
        where = where or {"train": "training", "val": "validation", "test": "test", "predict": "prediction"}[stage]
        validate_loader(loader, feats, where, **checks)
        if stage == "train":
            self.check_train_batches(loader)

    def checked_features(self, stage: str, model: nn.Module) -> list[Any] | None:
        """The features :meth:`check_loader` checks a ``stage`` loader against: every feature the
        model reads (``None`` for a foreign model, e.g. Torch-RecHub's: its own layers check ids)."""
        from ..export import model_features
        from ..features import Feature

        try:
            return [f for f in model_features(model) if isinstance(f, Feature)] or None
        except ValueError:
            return None

    def _check_loaders(self, stage: str, loaders: Any) -> None:
        """:meth:`check_loader` for each of a stage's loaders (a loader, a list or a dict of them):
        the hooks below cover loaders passed straight to ``lightning.Trainer``."""
        if loaders is None:
            return
        items = list(loaders.values() if isinstance(loaders, Mapping) else loaders if isinstance(loaders, (list, tuple)) else [loaders])
        if stage in ("val", "test") and len(items) > 1:
            # one metric state per stage: several loaders would be scored as one
            raise ValueError(
                f"{type(self).__name__} {'validates' if stage == 'val' else 'tests'} one loader at a time, got {len(items)}; "
                f"concatenate their data or run trainer.{'validate' if stage == 'val' else 'test'}() once per loader"
            )
        for loader in items:
            self.check_loader(loader, stage)
            if stage in ("val", "test"):
                self._warn_padded_sampler(loader, stage)

    def _warn_padded_sampler(self, loader: Any, stage: str) -> None:
        """Name the rows a plain ``DataLoader`` scores twice under DDP.

        Lightning gives such a loader a ``DistributedSampler``, which pads the rows to a
        multiple of the world size by repeating the first ones; the repeated rows count twice
        in the metrics. Our loaders (the datamodules', ``make_dataloader``'s) never pad.
        """
        from torch.utils.data import DistributedSampler

        from ..data.datasets import _BatchSamplerBase

        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or isinstance(sampler, _BatchSamplerBase):
            return
        try:
            padded = int(sampler.total_size) - len(sampler.dataset)  # type: ignore[arg-type]
        except (AttributeError, TypeError):
            return
        warned = self.__dict__.setdefault("_padding_warned", set())
        if padded > 0 and (stage, id(loader)) not in warned:
            warned.add((stage, id(loader)))
            rank_zero_warn(
                f"the {stage} loader ({type(loader).__name__}) runs under DDP with a DistributedSampler that repeats "
                f"{padded} of its {len(sampler.dataset)} rows to fill the last batch of each rank, so the {stage} "  # type: ignore[arg-type]
                "metrics count those rows twice; build the loader with rechub_lightning.data.make_dataloader (or a "
                "datamodule), whose ranks read disjoint slices, to score every row once"
            )

    def on_train_start(self) -> None:
        trainer = self.trainer
        self._check_loaders("train", trainer.train_dataloader)
        self._tell_loaders_epoch_length()
        self._take_pending_plateau_step()  # a resumed run: the step its checkpoint came before
        if trainer.val_dataloaders is None and trainer.enable_validation:
            # Without a sanity check the validation loaders load at the first validation, after
            # an epoch of training: load them now, as the sanity check would, and check them.
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        self._check_loaders("val", trainer.val_dataloaders)

    def on_validation_epoch_end(self) -> None:
        # counted here, before callbacks' on_validation_end (ModelCheckpoint) see the validation
        trainer = self.trainer
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._validations_done = getattr(self, "_validations_done", 0) + 1

    def on_validation_start(self) -> None:
        self._check_loaders("val", self.trainer.val_dataloaders)

    def on_test_start(self) -> None:
        self._check_loaders("test", self.trainer.test_dataloaders)

    def on_predict_start(self) -> None:
        self._check_loaders("predict", self.trainer.predict_dataloaders)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if not self.sparse_embeddings or not gradient_clip_val:
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        clip_sparse_aware_(
            [p for g in optimizer.param_groups for p in g["params"]], float(gradient_clip_val), gradient_clip_algorithm or "norm"
        )

    # ------------------------------------------------------------------ hyper-parameters
    def _clean_hparams(self, **callables: Any) -> None:
        """Keep hyper-parameters plain so checkpoints load with ``weights_only=True``."""
        hp = self._hparams
        for key in ("_instantiator", "_class_path"):
            hp.pop(key, None)
        for key, value in callables.items():
            if key in hp:
                hp[key] = callable_path(value)
        spec = model_spec(unwrap_model(self.model))  # a compiled model is described by the model it compiles
        if spec is not None:
            hp["model"] = spec
        else:
            hp.pop("model", None)
        self._hparams_initial = type(hp)(dict(hp))  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ forward helpers
    def forward(self, x: dict[str, torch.Tensor]) -> Any:
        return self.model(x)

    def regularization_loss(self) -> torch.Tensor | float:
        return self.regularization(self.model) if self._has_reg else 0.0

    # ------------------------------------------------------------------ optimizers
    def build_optimizer(self) -> torch.optim.Optimizer:
        if self._trainer is None:
            self._resolve_sparse()  # outside a Trainer (the facades' plain loops): one process
        params = [p for p in self.parameters() if p.requires_grad]
        if not self.sparse_embeddings:
            return self.optimizer_fn(params, **self.optimizer_params)
        sparse, dense = split_embedding_parameters(self)
        if not sparse:  # nothing embeds with sparse gradients: the dense optimizer alone
            return self.optimizer_fn(params, **self.optimizer_params)
        lr = self.embedding_optimizer_params.get("lr", self.optimizer_params.get("lr", 1e-3))
        kw = {**self.embedding_optimizer_params, "lr": lr}
        if self.embedding_optimizer == "sparse_adam":
            emb_opt = torch.optim.SparseAdam(sparse, **kw)
        elif self.embedding_optimizer == "adagrad":
            emb_opt = torch.optim.Adagrad(sparse, **kw)
        else:
            emb_opt = torch.optim.SGD(sparse, **kw)
        opts = [emb_opt] + ([self.optimizer_fn(dense, **self.optimizer_params)] if dense else [])
        return HybridOptimizer(opts)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        if self.scheduler_fn is None:
            return None
        params = dict(self.scheduler_params)
        plateau = isinstance(self.scheduler_fn, type) and issubclass(self.scheduler_fn, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if plateau and "mode" not in params:
            # ReduceLROnPlateau defaults to mode="min": watching an AUC it would cut the rate as the AUC rises
            params["mode"] = self.metric_mode(self.scheduler_monitor or self.monitor)
        scheduler = self.scheduler_fn(optimizer, **params)
        frequency, interval, strict = 1, self.scheduler_interval, True
        every = getattr(self._trainer, "check_val_every_n_epoch", 1)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and self.scheduler_interval == "epoch":
            # the plateau reads a validation metric: step it after the validations, never on a
            # missing or stale value
            if every:
                frequency = int(every)  # check_val_every_n_epoch=2: after every other epoch
            else:
                # check_val_every_n_epoch=None: validation every val_check_interval batches, across
                # epochs; Lightning offers the plateau a step after every batch and lr_scheduler_step
                # takes the ones that follow a validation (none before the first: not strict)
                interval, strict = "step", False
                warnings.filterwarnings(
                    "ignore", message=r"ReduceLROnPlateau conditioned on metric .* strict is set to `False`", category=RuntimeWarning
                )
        return {
            "scheduler": scheduler,
            "interval": interval,
            "frequency": frequency,
            "monitor": self.scheduler_monitor or self.monitor,
            "strict": strict,
        }

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            done = getattr(self, "_validations_done", 0)
            if done == getattr(self, "_plateau_stepped_after", 0) and not getattr(self._trainer, "check_val_every_n_epoch", 1):
                return  # no validation since the last step: the metric is stale
            self._plateau_stepped_after = done
            scheduler.step(metric)
        elif metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    @property
    def lr(self) -> float:
        """The dense optimizer's learning rate (``optimizer_params["lr"]``, else ``optimizer_fn``'s
        default); settable, e.g. by Lightning's ``Tuner.lr_find`` (the tables' rate follows it
        unless ``embedding_optimizer_params`` sets its own)."""
        if "lr" in self.optimizer_params:
            return float(self.optimizer_params["lr"])
        try:
            default = inspect.signature(self.optimizer_fn).parameters["lr"].default
        except (KeyError, TypeError, ValueError):
            default = inspect.Parameter.empty
        return float(default) if isinstance(default, (int, float)) else 1e-3

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer_params = {**self.optimizer_params, "lr": float(value)}
        if hasattr(self, "_hparams"):
            # a new dict (never the caller's): the checkpoint's hyper-parameters rebuild the tuned optimizer
            self._hparams["optimizer_params"] = dict(self.optimizer_params)

    def metric_mode(self, name: str) -> str:
        """``"max"`` or ``"min"``: the direction in which metric ``name`` improves."""
        if name == self.monitor:
            return self.monitor_mode
        leaf = name.rsplit("/", 1)[-1].lower()
        if any(k in leaf for k in ("loss", "mse", "mae", "rmse")):
            return "min"
        if any(k in leaf for k in ("auc", "recall", "ndcg", "mrr", "hit", "precision", "accuracy")):
            return "max"
        raise ValueError(
            f"cannot tell whether {name!r} improves upwards or downwards; give scheduler_params={{'mode': 'max'}} (or 'min')"
        )

    def configure_optimizers(self) -> Any:
        optimizer = self.build_optimizer()
        handed = self.__dict__.pop("_handed_optimizer", None)
        if handed is not None:
            _copy_group_settings(handed, optimizer)
        scheduler = self.build_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # RNG states make a resumed run draw the same dropout masks / negatives as an
        # uninterrupted one.
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["rechub_rng"] = dict(state)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # every rank draws its own dropout masks: keep each rank's state (rank 0 writes the
            # file). Lightning calls this hook on every rank of trainer.save_checkpoint, which
            # is itself collective (it ends in a barrier).
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, state)
            checkpoint["rechub_rng"]["per_rank"] = per_rank
        pending = self._pending_plateau_metric()
        if pending is not None:
            checkpoint["rechub_plateau_pending"] = pending

    def _pending_plateau_metric(self) -> float | None:
        """The metric of a validation whose ReduceLROnPlateau step is still to come (``None``: none).

        ModelCheckpoint writes at the end of validation, before Lightning (or, under manual
        optimisation, ``on_train_epoch_end``) steps the plateau with it; a run resumed from that
        checkpoint starts after that point, so the step is saved and taken at the restart."""
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return None
        if getattr(self, "_validations_done", 0) <= getattr(self, "_plateau_stepped_after", 0):
            return None
        plateaus = [c for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)]
        if not plateaus:
            return None
        if trainer.check_val_every_n_epoch:
            # epoch-interval plateaus step after the validation that ends an epoch they step on
            config = plateaus[0]
            ends_epoch = trainer.fit_loop.epoch_loop._num_ready_batches_reached()
            if config.interval != "epoch" or not ends_epoch or (trainer.current_epoch + 1) % config.frequency:
                return None
        value = trainer.callback_metrics.get(self.scheduler_monitor or self.monitor)
        return None if value is None else float(value)

    def _take_pending_plateau_step(self) -> None:
        pending, self._plateau_pending = getattr(self, "_plateau_pending", None), None
        if pending is None:
            return
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                config.scheduler.step(pending)
        self._plateau_stepped_after = getattr(self, "_validations_done", 0)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # called before the weights load: a checkpoint of another network would otherwise fail
        # with a list of missing and unexpected state-dict keys
        spec = (checkpoint.get("hyper_parameters") or {}).get("model")
        theirs = spec.get("class_path") if isinstance(spec, Mapping) else None
        ours = (model_spec(unwrap_model(self.model)) or {}).get("class_path")  # None for foreign models
        if theirs and ours and theirs != ours:
            raise ValueError(
                f"the checkpoint holds a {theirs.rpartition('.')[2]} model ({theirs}), but this {type(self).__name__}'s "
                f"model is a {ours.rpartition('.')[2]} ({ours}); use the config (or model) the checkpoint was trained with"
            )
        if theirs and ours:
            self._check_same_build(spec, checkpoint.get("state_dict") or {})
        self._plateau_pending = checkpoint.get("rechub_plateau_pending")
        rng = checkpoint.get("rechub_rng")
        if rng and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            per_rank = rng.get("per_rank")
            if per_rank and len(per_rank) == self.trainer.world_size:
                rng = per_rank[self.trainer.global_rank]  # the same world: each rank its own state
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def _check_same_build(self, spec: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        """The same model class built with other arguments (``--model...mlp_params``): name the
        arguments that differ instead of torch's list of missing keys and size mismatches."""
        own = self.state_dict()
        fits = set(own) == set(state) and all(
            tuple(getattr(state[k], "shape", ())) == tuple(getattr(v, "shape", ())) for k, v in own.items()
        )
        if fits:
            return
        theirs = dict(spec.get("init_args") or {})
        ours = dict((model_spec(unwrap_model(self.model)) or {}).get("init_args") or {})
        short = lambda v: (r if len(r := repr(v)) <= 120 else r[:117] + "...")  # noqa: E731
        diff = [f"{k}: checkpoint {short(theirs.get(k))}, here {short(ours.get(k))}"
                for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        if diff:
            name = str(spec.get("class_path", "")).rpartition(".")[2]
            raise ValueError(
                f"the checkpoint's {name} was built with other arguments than this one, so its weights do not fit: "
                + "; ".join(diff) + " (use the config the checkpoint was trained with, or the same --model... overrides)"
            )

    def _tell_loaders_epoch_length(self) -> None:
        """Our resumable loaders save whether their epoch was done in checkpoints; with
        ``limit_train_batches`` Lightning ends an epoch before the loader runs out, so they are
        told the trainer's batches per epoch (a checkpoint at the limited epoch's last batch then
        resumes at the next epoch's first batch, not that many batches into it)."""
        from ..data.datasets import _ResumableLoader

        loader = self.trainer.fit_loop._combined_loader
        n = self.trainer.num_training_batches
        for dl in loader.flattened if loader is not None else []:
            if isinstance(dl, _ResumableLoader):
                dl.epoch_batches = n

    def on_train_epoch_start(self) -> None:
        self._tell_loaders_epoch_length()  # loaders reloaded for this epoch too
        self._log_learning_rate()
        self._epoch_clock = (time.perf_counter(), 0)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning does not call on_train_epoch_start for an epoch resumed mid-way
        if getattr(self, "_lr_logged_epoch", None) != self.current_epoch:
            self._log_learning_rate()

    def _log_learning_rate(self) -> None:
        opts = self.optimizers()
        opt = opts[0] if isinstance(opts, list) else opts
        self.log("learning_rate", float(opt.param_groups[-1]["lr"]), on_step=False, on_epoch=True, sync_dist=True)
        self._lr_logged_epoch = self.current_epoch

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        t0, rows = getattr(self, "_epoch_clock", (time.perf_counter(), 0))
        x, _ = split_batch(batch)
        self._epoch_clock = (t0, rows + len(next(iter(x.values()))))

    def on_train_epoch_end(self) -> None:
        t0, rows = getattr(self, "_epoch_clock", (None, 0))
        if t0 is not None and rows:
            # training throughput of this process, whole epoch (data loading included)
            self.log("train/rows_per_sec", rows / (time.perf_counter() - t0), on_step=False, on_epoch=True, sync_dist=True)
