"""Optimizer construction: import paths, and one optimizer over sparse + dense parameters.

``torch.optim.Adam`` refuses sparse gradients and ``SparseAdam`` refuses dense ones, so
with sparse embedding gradients the parameters need two optimizers. Lightning's
automatic optimization wants one, hence :class:`HybridOptimizer`: it steps both, exposes
their parameter groups (so any LR scheduler drives both learning rates) and checkpoints
both states.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["resolve_callable", "callable_path", "HybridOptimizer", "split_embedding_parameters"]


def resolve_callable(fn: str | Callable[..., Any] | None, arg: str) -> Callable[..., Any] | None:
    """An import path such as ``"torch.optim.AdamW"`` (or a bare ``"AdamW"``) -> the object."""
    if fn is None or callable(fn):
        return fn  # type: ignore[return-value]
    if not isinstance(fn, str):
        raise TypeError(f"{arg} must be a callable or an import path string, got {fn!r}")
    if "." not in fn:
        for mod in ("torch.optim", "torch.optim.lr_scheduler"):
            obj = getattr(importlib.import_module(mod), fn, None)
            if obj is not None:
                return obj
        raise ValueError(f"{arg}={fn!r}: not found in torch.optim or torch.optim.lr_scheduler")
    module, _, name = fn.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{arg}={fn!r} cannot be imported") from e


def callable_path(fn: str | Callable[..., Any] | None) -> str | None:
    """The import path of a callable (what goes into hyper-parameters), or the string itself."""
    if fn is None or isinstance(fn, str):
        return fn
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None)
    if module is None or name is None or "<" in name:
        return repr(fn)
    return f"{module}.{name}"


def split_embedding_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(sparse-gradient embedding weights, every other trainable parameter)``."""
    sparse_ids = set()
    sparse: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad:
            if id(m.weight) not in sparse_ids:
                sparse_ids.add(id(m.weight))
                sparse.append(m.weight)
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in sparse_ids]
    return sparse, dense


class HybridOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one (e.g. ``SparseAdam`` for embeddings + ``Adam`` for the rest).

    Args:
        optimizers: the inner optimizers; their parameter sets must be disjoint.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self.optimizers = [o for o in optimizers]
        if not self.optimizers:
            raise ValueError("HybridOptimizer needs at least one optimizer")
        self.defaults = dict(self.optimizers[-1].defaults)
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property  # type: ignore[override]
    def state(self) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        inner = state_dict["optimizers"]
        if len(inner) != len(self.optimizers):
            raise ValueError(f"state holds {len(inner)} optimizers, this HybridOptimizer has {len(self.optimizers)}")
        for o, s in zip(self.optimizers, inner):
            o.load_state_dict(s)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizers[-1].add_param_group(param_group)

    def __repr__(self) -> str:
        return "HybridOptimizer(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
