"""Multi-task loss weighting, independent of Lightning.

Two families, told apart by :attr:`LossWeighting.requires_manual`:

* automatic (``requires_manual = False``): :class:`EqualWeighting`,
  :class:`UncertaintyWeighting` (UWL), :class:`DynamicWeightAverage` (DWA).
  ``total = weighting(task_losses)`` is an ordinary differentiable loss; call
  ``total.backward()`` (or let Lightning do it).
* manual (``requires_manual = True``): :class:`GradNorm`,
  :class:`MetaBalance`, :class:`PCGrad`. They need per-task gradients, so
  :meth:`LossWeighting.step` computes them with ``torch.autograd.grad`` and
  *sets* ``.grad`` of every parameter it is given; the caller then clips and
  calls ``optimizer.step()``.

Gradients from ``torch.autograd.grad`` bypass DDP's all-reduce hooks. Every
manual ``step`` therefore takes a ``reduce_fn`` that averages a tensor over
ranks; it is applied to every gradient (and every loss value a weight depends
on) before use, so all ranks compute identical weights and write identical
``.grad`` -- i.e. the weighting performs DDP's gradient averaging itself.

All state (learnable weights, moving statistics, optimizer moments of the
task weights) lives in parameters or registered buffers, so it travels with
``state_dict`` and Lightning checkpoints when the weighting is a submodule.

For hand-written loops ported from Torch-RecHub, :func:`shared_task_layers`,
:func:`gradnorm` and :class:`MetaBalanceOptimizer` are ``torch_rechub.utils.mtl``'s
functional API (``shared_task_layers``, ``gradnorm``, ``MetaBalance``) on the same
arithmetic (single process: they use plain ``backward`` and no ``reduce_fn``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .models.base import unwrap_model

__all__ = [
    "ReduceFn",
    "LossWeighting",
    "EqualWeighting",
    "UncertaintyWeighting",
    "DynamicWeightAverage",
    "GradNorm",
    "MetaBalance",
    "PCGrad",
    "WEIGHTING_METHODS",
    "build_weighting",
    "all_reduce_mean",
    "shared_task_layers",
    "gradnorm",
    "MetaBalanceOptimizer",
]

ReduceFn = Callable[[Tensor], Tensor]
"""Averages a tensor over data-parallel ranks and returns the result."""


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over the default ``torch.distributed`` group.

    A ready-made ``reduce_fn`` outside Lightning (inside Lightning prefer
    ``lambda t: self.trainer.strategy.reduce(t, reduce_op="mean")``).
    Identity when ``torch.distributed`` is not initialised or has one rank.

    Args:
        tensor: Any tensor; it is not modified.

    Returns:
        The element-wise mean over ranks (a new tensor).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def _reduce_tensors(tensors: Sequence[Tensor], reduce_fn: ReduceFn | None) -> list[Tensor]:
    """Apply ``reduce_fn`` to many tensors with one call per (dtype, device)."""
    if reduce_fn is None or not tensors:
        return list(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for k, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(k)
    for idx in groups.values():
        flat = torch.cat([tensors[k].reshape(-1) for k in idx])
        flat = reduce_fn(flat)
        for k, piece in zip(idx, flat.split([tensors[k].numel() for k in idx])):
            out[k] = piece.view_as(tensors[k])
    return out  # type: ignore[return-value]


def _check_dense(grads: Sequence[Tensor | None]) -> None:
    for g in grads:
        if g is not None and g.is_sparse:
            raise RuntimeError(
                "manual loss weighting does not support sparse gradients; use dense embeddings "
                "(nn.Embedding(sparse=False)) with GradNorm, MetaBalance or PCGrad"
            )


class LossWeighting(nn.Module):
    """Base class: combines ``T`` per-task losses into one training signal.

    Args:
        n_tasks: Number of tasks ``T`` (>= 1).

    Raises:
        ValueError: If ``n_tasks < 1``.
    """

    requires_manual: bool = False
    """True when the weighting must run :meth:`step` (manual optimization)."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        if int(n_tasks) < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        self.n_tasks = int(n_tasks)

    # -- helpers ---------------------------------------------------------
    def _loss_vector(self, task_losses: Tensor | Sequence[Tensor]) -> Tensor:
        losses = task_losses if isinstance(task_losses, Tensor) else torch.stack([torch.as_tensor(x) for x in task_losses])
        losses = losses.reshape(-1)
        if losses.shape[0] != self.n_tasks:
            raise ValueError(f"expected {self.n_tasks} task losses, got {losses.shape[0]}")
        return losses

    def _loss_list(self, task_losses: Tensor | Sequence[Tensor]) -> list[Tensor]:
        if isinstance(task_losses, Tensor):
            losses = list(task_losses.reshape(-1).unbind())
        else:
            losses = [x.reshape(()) for x in task_losses]
        if len(losses) != self.n_tasks:
            raise ValueError(f"expected {self.n_tasks} task losses, got {len(losses)}")
        return losses

    # -- API -------------------------------------------------------------
    def weights(self) -> Tensor:
        """Current effective task weights ``(T,)`` (detached), for logging.

        Returns:
            Weights such that the training loss is ``sum_i w_i * L_i`` (plus
            any regulariser the method adds).
        """
        raise NotImplementedError

    def forward(self, task_losses: Tensor | Sequence[Tensor]) -> Tensor:
        """Weighted total loss ``sum_i w_i * L_i``.

        For manual weightings this is only for logging/validation; training
        goes through :meth:`step`.

        Args:
            task_losses: ``(T,)`` tensor or list of ``T`` scalar tensors.

        Returns:
            A scalar tensor.
        """
        losses = self._loss_vector(task_losses)
        return (self.weights().to(losses) * losses).sum()

    def on_epoch_end(self, mean_task_losses: Tensor | Sequence[float]) -> None:  # noqa: B027 - optional hook
        """Hook called once per training epoch with the epoch-mean task losses.

        Under DDP pass the mean over all ranks. The default does nothing.

        Args:
            mean_task_losses: ``(T,)`` epoch-mean loss of each task.
        """

    def step(
        self,
        task_losses: Tensor | Sequence[Tensor],
        shared_params: Sequence[nn.Parameter],
        task_specific_params: Sequence[nn.Parameter] | None = None,
        last_shared_layer_params: Sequence[nn.Parameter] | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> Tensor:
        """Compute and *set* ``.grad`` of all given parameters (manual methods).

        Args:
            task_losses: ``(T,)`` tensor or list of ``T`` scalar losses, with graph.
            shared_params: Parameters shared by all tasks (embeddings, bottom,
                experts...).
            task_specific_params: Every other trainable parameter (towers,
                gates...); they receive the gradient of the method's total.
            last_shared_layer_params: Parameters of the last shared layer
                (GradNorm measures gradient norms there).
            reduce_fn: Averages a tensor over DDP ranks; identity if None.

        Returns:
            The weighted total loss, detached.

        Raises:
            RuntimeError: For automatic weightings (use ``forward``).
        """
        raise RuntimeError(f"{type(self).__name__} is automatic: call it on the losses and backpropagate the result")


class EqualWeighting(LossWeighting):
    """Plain mean of the task losses (Torch-RecHub's default MTL loss).

    Args:
        n_tasks: Number of tasks.
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)
        self.register_buffer("_weights", torch.full((self.n_tasks,), 1.0 / self.n_tasks), persistent=False)

    def weights(self) -> Tensor:
        """Returns ``1 / T`` for every task."""
        return self._weights.clone()

    def forward(self, task_losses: Tensor | Sequence[Tensor]) -> Tensor:
        """Mean over tasks."""
        return self._loss_vector(task_losses).mean()


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    Learns ``s_i = log(sigma_i^2)`` (unclamped, initialised to 0) and
    minimises::

        total = sum_i exp(-s_i) * L_i + s_i

    Convention: this is twice Kendall's regression objective
    ``L / (2 sigma^2) + log sigma`` for every task (no 0.5 factors, no
    separate classification form). For a fixed ``L_i`` the optimum is
    ``exp(s_i) = L_i``, so with MSE losses the learnt ``exp(s_i)`` tracks
    each task's MSE. (Torch-RecHub uses ``2 L exp(-s) + s`` with ``s``
    clamped at 0, which freezes the weight at 2 once ``L < 0.5``.)

    ``log_vars`` is an ``nn.Parameter``: it must be in the optimizer
    (preferably without weight decay).

    Args:
        n_tasks: Number of tasks.
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)
        self.log_vars = nn.Parameter(torch.zeros(self.n_tasks))

    def weights(self) -> Tensor:
        """Returns ``exp(-s_i)``, the factor multiplying each task loss."""
        return torch.exp(-self.log_vars.detach())

    def forward(self, task_losses: Tensor | Sequence[Tensor]) -> Tensor:
        """``sum_i exp(-s_i) L_i + s_i``."""
        losses = self._loss_vector(task_losses)
        s = self.log_vars.to(losses.dtype)
        return (torch.exp(-s) * losses + s).sum()


class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task
    Learning with Attention", CVPR 2019).

    ``w_i(t) = T * exp(r_i / temp) / sum_j exp(r_j / temp)`` with
    ``r_i = L_i(t-1) / L_i(t-2)`` on epoch-mean losses; ``w_i = 1`` for the
    first two epochs. The total is ``sum_i w_i L_i`` (weights sum to ``T``,
    as in the paper). Feed epoch means through :meth:`on_epoch_end`.

    Args:
        n_tasks: Number of tasks.
        temperature: Softmax temperature (default 2, the paper's value).

    Raises:
        ValueError: If ``temperature <= 0``.
    """

    def __init__(self, n_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(n_tasks)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("loss_history", torch.zeros(2, self.n_tasks))  # rows: L(t-2), L(t-1)
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("current_weights", torch.ones(self.n_tasks))

    def weights(self) -> Tensor:
        """Returns the weights of the current epoch (sum ``T``)."""
        return self.current_weights.clone()

    @torch.no_grad()
    def on_epoch_end(self, mean_task_losses: Tensor | Sequence[float]) -> None:
        """Record an epoch's mean losses and compute the next epoch's weights.

        Args:
            mean_task_losses: ``(T,)`` epoch-mean losses (global under DDP).

        Raises:
            ValueError: On a wrong number of tasks.
        """
        if isinstance(mean_task_losses, Tensor):
            losses = mean_task_losses.detach()
        else:
            losses = torch.stack([torch.as_tensor(x).detach().to(self.loss_history.device) for x in mean_task_losses])
        losses = losses.reshape(-1).to(self.loss_history)
        if losses.shape[0] != self.n_tasks:
            raise ValueError(f"expected {self.n_tasks} task losses, got {losses.shape[0]}")
        self.loss_history[0] = self.loss_history[1]
        self.loss_history[1] = losses
        self.epochs_seen += 1
        if int(self.epochs_seen) >= 2:
            ratio = self.loss_history[1] / self.loss_history[0].clamp_min(torch.finfo(torch.float32).tiny)
            self.current_weights.copy_(self.n_tasks * torch.softmax(ratio / self.temperature, dim=0))


class _ManualWeighting(LossWeighting):
    """Shared plumbing of gradient-manipulating weightings."""

    requires_manual = True

    @staticmethod
    def _param_lists(
        shared_params: Sequence[nn.Parameter], task_specific_params: Sequence[nn.Parameter] | None
    ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        shared = list(shared_params)
        task = list(task_specific_params or [])
        if not shared:
            raise ValueError("shared_params is empty")
        if {id(p) for p in shared} & {id(p) for p in task}:
            raise ValueError("shared_params and task_specific_params overlap")
        return shared, task

    @staticmethod
    def _grads(loss: Tensor, params: Sequence[Tensor], retain_graph: bool) -> list[Tensor | None]:
        if not params:
            return []
        grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
        _check_dense(grads)
        return list(grads)

    @staticmethod
    def _set_grads(params: Sequence[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
        """Set (not accumulate) ``.grad``; a parameter the losses do not reach gets zeros."""
        seen: set[int] = set()
        for p, g in zip(params, grads):
            if g is None:
                p.grad = torch.zeros_like(p)
                continue
            g = g.detach().to(p.dtype).view_as(p)
            # autograd may hand out expanded (stride-0) or shared tensors: copy those so that
            # in-place gradient clipping or optimizer updates touch exactly one parameter's grad.
            if g.numel() > 0 and (not g.is_contiguous() or g.data_ptr() in seen):
                g = g.clone(memory_format=torch.contiguous_format)
            if g.numel() > 0:
                seen.add(g.data_ptr())
            p.grad = g

    @staticmethod
    def _reduce_present(grads: list[Tensor | None], reduce_fn: ReduceFn | None) -> list[Tensor | None]:
        """Reduce the non-None gradients (None = parameter not in the graph, same on every rank)."""
        present = [k for k, g in enumerate(grads) if g is not None]
        reduced = _reduce_tensors([grads[k] for k in present], reduce_fn)  # type: ignore[misc]
        out = list(grads)
        for k, g in zip(present, reduced):
            out[k] = g
        return out

    def weights(self) -> Tensor:
        """Returns ones: the method rescales gradients, not losses."""
        return torch.ones(self.n_tasks)


def _task_grad_norms(losses: Sequence[Tensor], params: Sequence[Tensor], reduce_fn: ReduceFn | None = None) -> Tensor:
    """``(T,)`` norms ``||grad_W L_i||`` over all tensors ``W`` in ``params`` (graph retained).

    Computed in float32 at least (float64 stays float64); a tensor a loss does not reach
    contributes 0.
    """
    out = []
    for loss in losses:
        grads = _ManualWeighting._grads(loss, params, retain_graph=True)
        grads = _reduce_tensors([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], reduce_fn)
        sq = torch.stack([g.detach().to(torch.promote_types(g.dtype, torch.float32)).square().sum() for g in grads])
        out.append(sq.sum().sqrt())
    return torch.stack(out)


def _gradnorm_targets(weighted_norms: Tensor, loss_ratio: Tensor, alpha: float) -> Tensor:
    """GradNorm's per-task targets ``mean(G) * (L~_i / mean_j L~_j) ** alpha`` (Chen et al. 2018, eq. 1-2)."""
    return weighted_norms.mean() * (loss_ratio / loss_ratio.mean()).pow(alpha)


class GradNorm(_ManualWeighting):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

    Learnable task weights ``w_i`` (initialised to 1, kept in a buffer and
    updated by an internal Adam, so they never enter the model optimizer).
    Each :meth:`step`:

    1. ``G_i = || grad_W (w_i L_i) ||`` on the last shared layer's
       parameters ``W``;
    2. ``L~_i = L_i / L_i(0)`` (initial losses recorded on the first step),
       ``r_i = L~_i / mean_j L~_j``;
    3. ``target_i = mean(G) * r_i ** alpha``, held constant;
    4. ``L_grad = sum_i |G_i - target_i|``; its gradient
       ``sign(G_i - target_i) * ||grad_W L_i||`` updates ``w`` (Adam, ``lr``),
       then ``w`` is clamped to ``>= min_weight`` and renormalised so that
       ``sum_i w_i = T``;
    5. model gradients are those of ``sum_i w_i L_i`` with the weights of
       this step (before their update), detached.

    Under DDP, the per-task gradients on ``W`` and the loss values are
    averaged with ``reduce_fn`` before use.

    Args:
        n_tasks: Number of tasks.
        alpha: Restoring-force strength (default 0.16).
        lr: Adam learning rate of the task weights (default 0.025).
        betas: Adam betas of the task weights.
        eps: Adam epsilon.
        min_weight: Floor applied before renormalisation (keeps ``w > 0``).

    Raises:
        ValueError: On invalid hyper-parameters.
    """

    def __init__(
        self,
        n_tasks: int,
        alpha: float = 0.16,
        lr: float = 0.025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        min_weight: float = 1e-4,
    ) -> None:
        super().__init__(n_tasks)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not 0 < min_weight < 1:
            raise ValueError(f"min_weight must be in (0, 1), got {min_weight}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.min_weight = float(min_weight)
        self.register_buffer("task_weights", torch.ones(self.n_tasks))
        self.register_buffer("initial_losses", torch.zeros(self.n_tasks))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("exp_avg", torch.zeros(self.n_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(self.n_tasks))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))

    def weights(self) -> Tensor:
        """Returns the task weights ``w`` (sum ``T``)."""
        return self.task_weights.clone()

    def step(
        self,
        task_losses: Tensor | Sequence[Tensor],
        shared_params: Sequence[nn.Parameter],
        task_specific_params: Sequence[nn.Parameter] | None = None,
        last_shared_layer_params: Sequence[nn.Parameter] | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> Tensor:
        """See :meth:`LossWeighting.step`; ``last_shared_layer_params`` is required.

        Raises:
            ValueError: If ``last_shared_layer_params`` is missing or empty.
        """
        if not last_shared_layer_params:
            raise ValueError("GradNorm needs last_shared_layer_params (the last shared layer's parameters)")
        losses = self._loss_list(task_losses)
        shared, task = self._param_lists(shared_params, task_specific_params)
        last = list(last_shared_layer_params)

        with torch.no_grad():
            # Reduce where the losses live (NCCL needs CUDA tensors), keep the state on the buffers' device.
            values = torch.stack([x.detach().float() for x in losses])
            values = _reduce_tensors([values], reduce_fn)[0].to(self.task_weights.device)
            # first step: remember L_i(0); written without reading the flag on the host (a
            # device sync per step on a GPU)
            self.initial_losses.copy_(torch.where(self.initialized, self.initial_losses, values))
            self.initialized.fill_(True)

        norms = _task_grad_norms(losses, last, reduce_fn).to(self.task_weights)  # float32, on the buffers' device

        w = self.task_weights.clone()
        total = sum(w[i].to(loss.dtype).to(loss.device) * loss for i, loss in enumerate(losses))
        params = shared + task
        grads = _reduce_tensors(
            [torch.zeros_like(p) if g is None else g for p, g in zip(params, self._grads(total, params, False))],
            reduce_fn,
        )
        self._set_grads(params, grads)

        with torch.no_grad():
            weighted_norms = w * norms
            loss_ratio = values / self.initial_losses.clamp_min(torch.finfo(torch.float32).tiny)
            target = _gradnorm_targets(weighted_norms, loss_ratio, self.alpha)
            grad_w = torch.sign(weighted_norms - target) * norms
            self._adam_update(grad_w)
        return total.detach()

    def _adam_update(self, grad: Tensor) -> None:
        beta1, beta2 = self.betas
        self.adam_steps += 1
        t = self.adam_steps.to(torch.float32)  # bias corrections as tensors: no host sync
        self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bc1, bc2 = (1 - beta1**t).to(grad.dtype), (1 - beta2**t).to(grad.dtype)
        denom = (self.exp_avg_sq / bc2).sqrt_().add_(self.eps)
        new = self.task_weights - self.lr * (self.exp_avg / bc1) / denom
        new = new.clamp_min(self.min_weight)
        self.task_weights.copy_(new * (self.n_tasks / new.sum()))


class MetaBalance(_ManualWeighting):
    """MetaBalance (He et al., "MetaBalance: Improving Multi-Task Recommendations
    via Adapting Gradient Magnitudes of Auxiliary Tasks", WWW 2022), Algorithm 1.

    For every shared parameter tensor ``p`` and task ``i``, with
    ``g_i = grad_p L_i``:

    * ``m_i <- beta * m_i + (1 - beta) * ||g_i||_2`` (buffer ``norm_ema``,
      one row per shared parameter, one column per task, initialised to 0);
    * for auxiliary tasks ``i != target_task``:
      ``g_i <- g_i * (m_target / m_i) * r + g_i * (1 - r)``;
    * ``p.grad = sum_i g_i``.

    Task-specific parameters get the gradient of ``sum_i L_i``. A task that
    does not reach ``p`` (gradient None) is skipped for ``p`` (its moving
    average is not updated). While the target's moving average for ``p`` is
    still 0 (it has never reached ``p``, e.g. ``p`` feeds only auxiliary
    towers) the auxiliary gradients of ``p`` are left unscaled instead of
    shrunk to ``(1 - r) g``; this also makes a stacked ``(T,)`` loss tensor
    (zero gradients) behave like a list (None gradients). Under DDP every
    gradient is averaged with ``reduce_fn`` before its norm is taken.

    Differences from Torch-RecHub 0.9.0's optimizer: ``continue`` instead of
    ``break`` on a missing gradient, a configurable target task, moving
    averages in ``state_dict``, no ``1e-5`` in the denominator.

    Args:
        n_tasks: Number of tasks.
        relax_factor: ``r`` in ``[0, 1]`` (default 0.7).
        beta: Moving-average coefficient in ``[0, 1)`` (default 0.9).
        target_task: Index of the target task (default 0).

    Raises:
        ValueError: On invalid hyper-parameters.
    """

    def __init__(self, n_tasks: int, relax_factor: float = 0.7, beta: float = 0.9, target_task: int = 0) -> None:
        super().__init__(n_tasks)
        if not 0.0 <= relax_factor <= 1.0:
            raise ValueError(f"relax_factor must be in [0, 1], got {relax_factor}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not 0 <= target_task < self.n_tasks:
            raise ValueError(f"target_task must be in [0, {self.n_tasks}), got {target_task}")
        self.relax_factor = float(relax_factor)
        self.beta = float(beta)
        self.target_task = int(target_task)
        # Sized lazily on the first step (one row per shared parameter tensor).
        self.register_buffer("norm_ema", torch.zeros(0, self.n_tasks))

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "norm_ema")
        if isinstance(saved, Tensor) and saved.shape != self.norm_ema.shape:
            self.norm_ema = torch.zeros_like(saved, device=self.norm_ema.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def step(
        self,
        task_losses: Tensor | Sequence[Tensor],
        shared_params: Sequence[nn.Parameter],
        task_specific_params: Sequence[nn.Parameter] | None = None,
        last_shared_layer_params: Sequence[nn.Parameter] | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> Tensor:
        """See :meth:`LossWeighting.step` (``last_shared_layer_params`` is unused).

        Raises:
            ValueError: If the number of shared parameters changed since the
                moving averages were created.
        """
        losses = self._loss_list(task_losses)
        shared, task = self._param_lists(shared_params, task_specific_params)
        n_shared, n_tasks = len(shared), self.n_tasks
        self._check_ema_rows(n_shared)
        per_task: list[list[Tensor | None]] = []
        task_grads: list[Tensor | None] = [None] * len(task)
        params = shared + task
        for i, loss in enumerate(losses):
            grads = self._reduce_present(self._grads(loss, params, retain_graph=i < n_tasks - 1), reduce_fn)
            per_task.append(grads[:n_shared])
            for k, g in enumerate(grads[n_shared:]):
                if g is not None:
                    task_grads[k] = g if task_grads[k] is None else task_grads[k] + g

        self._set_grads(shared, self.balance(per_task))
        self._set_grads(task, task_grads)
        return torch.stack([x.detach() for x in losses]).sum()

    def _check_ema_rows(self, n_shared: int) -> None:
        """Create the moving averages on first use; refuse a changed number of shared parameters."""
        if self.norm_ema.shape[0] == 0:
            self.norm_ema = torch.zeros(n_shared, self.n_tasks, device=self.norm_ema.device)
        elif self.norm_ema.shape[0] != n_shared:
            raise ValueError(
                f"MetaBalance was set up for {self.norm_ema.shape[0]} shared parameters, got {n_shared}"
            )

    def balance(self, per_task: Sequence[Sequence[Tensor | None]]) -> list[Tensor | None]:
        """One MetaBalance update from given per-task gradients of the shared parameters.

        Updates the moving averages and returns the balanced sum; :meth:`step` calls it after
        computing (and reducing) the gradients, :class:`MetaBalanceOptimizer` after its
        ``backward`` passes.

        Args:
            per_task: ``per_task[i][k]``: gradient of task ``i``'s loss for shared parameter
                ``k`` (``None`` where the loss does not reach it).

        Returns:
            Per shared parameter, the balanced gradient sum (``None`` where no task reaches it).

        Raises:
            ValueError: On a wrong number of tasks or a changed number of shared parameters.
        """
        if len(per_task) != self.n_tasks:
            raise ValueError(f"expected gradients of {self.n_tasks} tasks, got {len(per_task)}")
        n_shared, n_tasks = len(per_task[0]), self.n_tasks
        self._check_ema_rows(n_shared)
        with torch.no_grad():
            device = self.norm_ema.device
            present = torch.tensor(
                [[per_task[i][k] is not None for i in range(n_tasks)] for k in range(n_shared)], device=device
            )
            norms = torch.zeros(n_shared, n_tasks, device=device)
            for i in range(n_tasks):
                for k in range(n_shared):
                    g = per_task[i][k]
                    if g is not None:
                        norms[k, i] = torch.linalg.vector_norm(g.detach().float()).to(device)
            ema = torch.where(present, self.beta * self.norm_ema + (1.0 - self.beta) * norms, self.norm_ema)
            self.norm_ema.copy_(ema)

            t = self.target_task
            r = self.relax_factor
            scalable = present & present[:, t : t + 1] & (ema > 0) & (ema[:, t : t + 1] > 0)
            factor = torch.where(scalable, ema[:, t : t + 1] / ema.where(ema > 0, torch.ones_like(ema)) * r + (1 - r), 1.0)
            factor[:, t] = 1.0

            shared_grads: list[Tensor | None] = []
            for k in range(n_shared):
                acc: Tensor | None = None
                for i in range(n_tasks):
                    g = per_task[i][k]
                    if g is None:
                        continue
                    g = g.detach() * factor[k, i].to(device=g.device, dtype=g.dtype)  # no host read of the factors
                    acc = g if acc is None else acc + g
                shared_grads.append(acc)
        return shared_grads


class PCGrad(_ManualWeighting):
    """Projecting Conflicting Gradients (Yu et al., "Gradient Surgery for
    Multi-Task Learning", NeurIPS 2020).

    Per task, the flattened gradient over all shared parameters ``g_i``; for
    each task ``i`` and each other task ``j`` in random order, if
    ``g_i^PC . g_j < 0`` then ``g_i^PC -= (g_i^PC . g_j) / ||g_j||^2 g_j``
    (projection against the *original* ``g_j``). Shared gradient:
    ``sum_i g_i^PC``; task-specific parameters: gradient of ``sum_i L_i``.

    The order comes from a CPU generator seeded with ``seed + steps``
    (``steps`` is a buffer), so it is identical on every rank and resumes
    from checkpoints. Projections are computed in float32 (float64 if the
    gradients are float64).

    Args:
        n_tasks: Number of tasks.
        seed: Seed of the task order.
    """

    def __init__(self, n_tasks: int, seed: int = 0) -> None:
        super().__init__(n_tasks)
        self.seed = int(seed)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @staticmethod
    def project(flat_grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Project conflicting task gradients (the PCGrad surgery).

        Args:
            flat_grads: ``(T, P)`` one flattened gradient per task.
            generator: Generator of the random task order.

        Returns:
            ``(T, P)`` projected gradients ``g_i^PC``.
        """
        n_tasks = flat_grads.shape[0]
        projected = flat_grads.clone()
        sq_norms = (flat_grads * flat_grads).sum(dim=1)
        for i in range(n_tasks):
            g = projected[i]
            for j in torch.randperm(n_tasks, generator=generator).tolist():
                if j == i:
                    continue
                dot = torch.dot(g, flat_grads[j])
                # project only on a conflict with a non-zero g_j; decided on the device (reading
                # dot or the norm on the host would synchronise a GPU at every pair)
                conflict = (dot < 0) & (sq_norms[j] > 0)
                coef = torch.where(conflict, dot / sq_norms[j].clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(dot))
                g.sub_(flat_grads[j] * coef)
        return projected

    def step(
        self,
        task_losses: Tensor | Sequence[Tensor],
        shared_params: Sequence[nn.Parameter],
        task_specific_params: Sequence[nn.Parameter] | None = None,
        last_shared_layer_params: Sequence[nn.Parameter] | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> Tensor:
        """See :meth:`LossWeighting.step` (``last_shared_layer_params`` is unused)."""
        losses = self._loss_list(task_losses)
        shared, task = self._param_lists(shared_params, task_specific_params)
        n_shared = len(shared)
        params = shared + task
        compute_dtype = torch.float64 if any(p.dtype == torch.float64 for p in shared) else torch.float32

        flat: list[Tensor] = []
        task_grads: list[Tensor | None] = [None] * len(task)
        for i, loss in enumerate(losses):
            grads = self._grads(loss, params, retain_graph=i < self.n_tasks - 1)
            shared_g = [torch.zeros_like(p) if g is None else g for p, g in zip(shared, grads[:n_shared])]
            reduced = _reduce_tensors(shared_g + [g for g in grads[n_shared:] if g is not None], reduce_fn)
            flat.append(torch.cat([g.detach().reshape(-1).to(compute_dtype) for g in reduced[:n_shared]]))
            rest = iter(reduced[n_shared:])
            for k, g in enumerate(grads[n_shared:]):
                if g is not None:
                    r = next(rest)
                    task_grads[k] = r if task_grads[k] is None else task_grads[k] + r

        with torch.no_grad():
            generator = torch.Generator().manual_seed(self.seed + int(self.steps))
            projected = self.project(torch.stack(flat), generator).sum(dim=0)
            self.steps += 1
            pieces = projected.split([p.numel() for p in shared])
        self._set_grads(shared, list(pieces))
        self._set_grads(task, task_grads)
        return torch.stack([x.detach() for x in losses]).sum()


WEIGHTING_METHODS: dict[str, type[LossWeighting]] = {
    "equal": EqualWeighting,
    "uwl": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "gradnorm": GradNorm,
    "metabalance": MetaBalance,
    "pcgrad": PCGrad,
}
"""``adaptive_params["method"]`` -> weighting class."""


def build_weighting(adaptive_params: Mapping[str, Any] | None, n_tasks: int) -> LossWeighting:
    """Build the weighting named by Torch-RecHub-style ``adaptive_params``.

    Args:
        adaptive_params: ``None`` (equal weights) or a dict with ``"method"``
            in ``{None, "equal", "uwl", "dwa", "gradnorm", "metabalance",
            "pcgrad"}`` and the method's keyword arguments, e.g.
            ``{"method": "gradnorm", "alpha": 0.16}``.
        n_tasks: Number of tasks (losses) combined.

    Returns:
        The weighting module.

    Raises:
        ValueError: On an unknown method or argument.

    Example:
        >>> build_weighting({"method": "uwl"}, 2).requires_manual
        False
        >>> build_weighting({"method": "gradnorm", "alpha": 0.5}, 3).alpha
        0.5
    """
    params = dict(adaptive_params or {})
    method = params.pop("method", None)
    key = "equal" if method is None else str(method).lower()
    if key not in WEIGHTING_METHODS:
        raise ValueError(f"unknown adaptive method {method!r}; choose one of {[None, *WEIGHTING_METHODS]}")
    cls = WEIGHTING_METHODS[key]
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "n_tasks")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for method {key!r}; accepted: {accepted}")
    return cls(n_tasks, **params)



# --------------------------------------------------------------------------- Torch-RecHub's functional API
# torch_rechub.utils.mtl: shared_task_layers, gradnorm, MetaBalance (an optimizer there), for
# hand-written training loops ported by changing imports.


def shared_task_layers(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split a multi-task model's parameters into shared and task-specific ones.

    Torch-RecHub's ``torch_rechub.utils.mtl.shared_task_layers``, for our multi-task models
    (``SharedBottom``, ``MMOE``, ``PLE``, ``AITM``, and also ``ESMM``, which the reference
    refused), read through ``DataParallel``/DDP/``torch.compile`` wrappers. The split is the
    model's own (``shared_parameters()`` and the flattened ``task_parameters()``): a parameter
    is task-specific when only one task's loss reaches it. For SharedBottom and MMOE that is
    the reference's split (embeddings and bottom/experts shared; towers, and MMOE's gates,
    task-specific). The reference's fixed module lists disagree with the graph elsewhere, and
    here the graph decides: PLE's last-level task experts and gates (and, with two or more
    levels, the task gates of the level before) reach one task only but are shared there;
    AITM's last bottom reaches only the last task, and its information gates and attentions
    other than the last ones reach two tasks, yet the reference calls the former shared and
    the latter task-specific.

    Args:
        model: one of our multi-task models, possibly wrapped.

    Returns:
        ``(shared, task)`` lists of parameters: disjoint, together all of the model's.

    Raises:
        ValueError: If the model has no ``shared_parameters``/``task_parameters`` methods (e.g. a
            Torch-RecHub model object: use ``torch_rechub.utils.mtl.shared_task_layers`` for it).
    """
    inner = unwrap_model(model)
    missing = [m for m in ("shared_parameters", "task_parameters") if not callable(getattr(inner, m, None))]
    if missing:
        raise ValueError(
            f"shared_task_layers needs a rechub_lightning multi-task model; {type(inner).__name__} has no "
            f"{' and no '.join(m + '()' for m in missing)}"
        )
    shared = list(inner.shared_parameters())
    seen = {id(p) for p in shared}
    task = []
    for p in (p for ps in inner.task_parameters() for p in ps):
        if id(p) not in seen:
            seen.add(id(p))
            task.append(p)
    return shared, task


def _tensor_list(share_layer: Tensor | nn.Module | Sequence[Tensor]) -> list[Tensor]:
    """``share_layer`` as a non-empty list of tensors that require grad."""
    if isinstance(share_layer, nn.Module):
        tensors = list(share_layer.parameters())
    elif isinstance(share_layer, Tensor):
        tensors = [share_layer]
    else:
        tensors = list(share_layer)
    if not tensors or not all(isinstance(t, Tensor) and t.requires_grad for t in tensors):
        raise ValueError(
            "share_layer must be a tensor, a list of tensors or a module, with at least one tensor and all "
            f"requiring grad; got {type(share_layer).__name__} holding {len(tensors)} item(s)"
        )
    return tensors


def _check_gradnorm_args(
    loss_list: Sequence[Tensor], loss_weight: Sequence[Tensor], initial_task_loss: Sequence[Any], alpha: float
) -> list[float]:
    """Validate :func:`gradnorm`'s arguments; returns the initial losses as floats."""
    lengths = {"loss_list": len(loss_list), "loss_weight": len(loss_weight), "initial_task_loss": len(initial_task_loss)}
    if len(set(lengths.values())) != 1 or lengths["loss_list"] == 0:
        raise ValueError(f"loss_list, loss_weight and initial_task_loss need the same non-zero length, got {lengths}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got alpha={alpha}")
    for i, w in enumerate(loss_weight):
        if not isinstance(w, Tensor) or w.numel() != 1 or not w.requires_grad:
            raise ValueError(f"loss_weight[{i}] must be a one-element tensor that requires grad, got {w!r}")
    init = [float(x) for x in initial_task_loss]
    bad = [(i, x) for i, x in enumerate(init) if not x > 0]
    if bad:
        raise ValueError(f"initial_task_loss must be > 0, got initial_task_loss[{bad[0][0]}]={bad[0][1]}")
    return init


def gradnorm(
    loss_list: Sequence[Tensor],
    loss_weight: Sequence[Tensor],
    share_layer: Tensor | nn.Module | Sequence[Tensor],
    initial_task_loss: Sequence[float | Tensor],
    alpha: float,
) -> Tensor:
    """One GradNorm gradient computation (Chen et al., ICML 2018), Torch-RecHub's functional API.

    As ``torch_rechub.utils.mtl.gradnorm``: backpropagates ``sum_i w_i L_i`` into the model's
    ``.grad`` (accumulating, graph retained), then *replaces* each ``w_i.grad`` by the
    gradient of the GradNorm loss ``sum_i |G_i - target_i|``, where
    ``G_i = ||grad_W (w_i L_i)||`` on the shared layer ``W`` and the targets are constants.
    The caller then steps its optimizer (and renormalises the weights).

    Difference from the reference: the target is the paper's
    ``target_i = mean(G) * r_i ** alpha`` with ``r_i = L~_i / mean_j L~_j`` and
    ``L~_i = L_i / L_i(0)``. The reference uses ``mean(G) * (mean_j L~_j) ** alpha``, one target
    for every task, which ignores which task trains slower. Both agree when all ``L~_i`` are
    equal to 1 (e.g. the first step) or ``alpha = 0``; the model gradients are always the same.

    ``share_layer`` may be a tensor (the reference's use), a list of tensors or a module; ``G_i``
    is the norm over all of them (for one tensor, the reference's ``gygw[0]``).

    Args:
        loss_list: the ``T`` task losses, with graph.
        loss_weight: ``T`` one-element weight tensors requiring grad (e.g. an
            ``nn.ParameterList`` of ``nn.Parameter(torch.ones(1))``).
        share_layer: the shared parameters ``W`` the norms are measured on.
        initial_task_loss: ``L_i(0)``, the losses of the first step (floats or tensors), > 0.
        alpha: the restoring-force strength, >= 0 (the reference's trainer uses 0.16).

    Returns:
        The GradNorm loss value (detached; the reference returns ``None``).

    Raises:
        ValueError: On lengths that differ, ``alpha < 0``, an initial loss ``<= 0``, a weight that
            is not a one-element tensor requiring grad or an empty ``share_layer``.
    """
    losses, weights = list(loss_list), list(loss_weight)
    init = _check_gradnorm_args(losses, weights, list(initial_task_loss), alpha)
    params = _tensor_list(share_layer)
    norms = _task_grad_norms(losses, params)  # ||grad_W L_i||
    total = sum(w * loss for w, loss in zip(weights, losses))
    total.backward(retain_graph=True)  # type: ignore[union-attr]
    with torch.no_grad():
        w = torch.stack([x.detach().reshape(()) for x in weights]).to(norms)
        values = torch.stack([x.detach().reshape(()) for x in losses]).to(norms)
        weighted = w.abs() * norms  # G_i = ||w_i grad_W L_i||
        target = _gradnorm_targets(weighted, values / torch.tensor(init).to(norms), alpha)
        grad_w = torch.sign(weighted - target) * torch.sign(w) * norms
        for x, g in zip(weights, grad_w):
            x.grad = torch.empty_like(x).copy_(g)  # x's own layout, so later backward passes accumulate in place
    return (weighted - target).abs().sum()


class MetaBalanceOptimizer(torch.optim.Optimizer):
    """Torch-RecHub's optimizer-style MetaBalance (``torch_rechub.utils.mtl.MetaBalance``).

    ``step(losses)`` backpropagates every task loss and writes into ``.grad`` of the
    parameters it was given (the shared ones) the MetaBalance sum: task 0's gradient plus each
    auxiliary gradient rescaled towards task 0's moving-average magnitude (see
    :class:`MetaBalance`, which does the arithmetic). It does not update parameters: step your
    own optimizer(s) afterwards, as the reference's trainer does. Every other parameter the
    losses reach accumulates the plain sum of the task gradients, as the reference's
    ``loss.backward()`` per task leaves it.

    Differences from the reference (its defects): a task that does not reach a parameter is
    skipped for that parameter instead of ``break`` ing out of the whole parameter group;
    the moving averages live in the optimizer state (``state_dict``), not in ad-hoc
    attributes of the parameters; no ``1e-5`` in the scaling denominator; the given parameters'
    ``.grad`` is replaced (the reference added a stale gradient left from before ``step`` into
    task 0's).

    Args:
        params: the shared parameters (or parameter groups, which may set their own
            ``relax_factor``/``beta``).
        relax_factor: ``r`` in ``[0, 1)`` (default 0.7).
        beta: moving-average coefficient in ``[0, 1)`` (default 0.9).

    Raises:
        ValueError: On ``relax_factor`` or ``beta`` outside ``[0, 1)``.
    """

    def __init__(self, params: Any, relax_factor: float = 0.7, beta: float = 0.9) -> None:
        if not 0.0 <= relax_factor < 1.0:
            raise ValueError(f"relax_factor must be in [0, 1), got relax_factor={relax_factor}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got beta={beta}")
        super().__init__(params, {"relax_factor": relax_factor, "beta": beta})

    def _balancer(self, group: dict[str, Any], n_tasks: int) -> MetaBalance:
        """A :class:`MetaBalance` holding this group's moving averages (from the optimizer state)."""
        params = group["params"]
        balancer = MetaBalance(n_tasks, group["relax_factor"], group["beta"])
        rows = [self.state[p].get("norm_ema") for p in params]
        if any(r is None for r in rows):
            balancer.norm_ema = torch.zeros(len(params), n_tasks, device=params[0].device)
        elif rows[0].shape[0] != n_tasks:
            raise ValueError(f"MetaBalanceOptimizer was stepped with {rows[0].shape[0]} losses before, got {n_tasks}")
        else:
            balancer.norm_ema = torch.stack(rows)
        return balancer

    def step(self, losses: Sequence[Tensor]) -> None:  # type: ignore[override]
        """Backpropagate each loss and write the balanced gradients (task 0 is the target).

        Args:
            losses: the task losses, with graph (retained, as in the reference).

        Raises:
            ValueError: On no losses or a changed number of losses.
            RuntimeError: On sparse gradients.
        """
        losses = list(losses)
        if not losses:
            raise ValueError("losses is empty: give one loss per task")
        params = [p for group in self.param_groups for p in group["params"]]
        per_task: list[list[Tensor | None]] = []
        for loss in losses:
            for p in params:
                p.grad = None  # each backward leaves task i's own gradient on the given parameters
            loss.backward(retain_graph=True)
            grads = [p.grad for p in params]
            _check_dense(grads)
            per_task.append(grads)
        start = 0
        for group in self.param_groups:
            n = len(group["params"])
            balancer = self._balancer(group, len(losses))
            balanced = balancer.balance([grads[start : start + n] for grads in per_task])
            for p, row, g in zip(group["params"], balancer.norm_ema.unbind(0), balanced):
                self.state[p]["norm_ema"] = row
                p.grad = None if g is None else g.detach()
            start += n
