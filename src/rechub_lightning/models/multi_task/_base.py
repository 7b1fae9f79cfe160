"""What every multi-task model shares: output contract and the shared/task parameter split.

The multi-task LightningModule never asks *which* model it trains (no ``isinstance``;
DESIGN decision 7). It reads these attributes and methods instead:

* ``task_types``: ``"classification"`` or ``"regression"`` per output column.
* ``trained_tasks``: the output columns whose losses are trained (``None``: all).
  ESMM trains its CTR and CTCVR columns only.
* ``conditional_tasks``: ``{i: j}`` = task ``i``'s metric is computed on the rows where
  task ``j``'s label is 1 (ESMM: the CVR is evaluated on clicked impressions).
* :meth:`MultiTaskModel.shared_parameters`, :meth:`MultiTaskModel.task_parameters`: a
  parameter belongs to task ``i`` when only task ``i``'s (trained) loss reaches it;
  everything else is shared. Gradient-manipulating weightings (MetaBalance, PCGrad)
  rescale or project the shared gradients only.
* :meth:`MultiTaskModel.last_shared_layer`: where GradNorm measures task gradient norms.
* :meth:`MultiTaskModel.auxiliary_loss`: an extra loss term computed from the outputs
  (AITM's behavioural expectation calibrator), added to the weighted task losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import FeatureSchema
from ..base import RecModel
from ..ranking._common import mlp_kwargs

__all__ = [
    "MultiTaskModel",
    "TASK_TYPES",
    "check_task_types",
    "default_task_types",
    "last_linear",
    "tower_kwargs",
    "tower_param_list",
]

TASK_TYPES = ("classification", "regression")


def check_task_types(task_types: Sequence[str], arg: str = "task_types") -> list[str]:
    """Validate a list of task types.

    Raises:
        ValueError: on an empty list or an entry other than ``classification``/``regression``
            (the message names the entry and its index).
    """
    if isinstance(task_types, str):
        raise ValueError(f"{arg} must be a list of task types, got the string {task_types!r}")
    types = list(task_types)
    if not types:
        raise ValueError(f"{arg} is empty; give one of {TASK_TYPES} per task")
    for i, t in enumerate(types):
        if t not in TASK_TYPES:
            raise ValueError(f"{arg}[{i}]={t!r} is not a task type; choose one of {TASK_TYPES}")
    return types


def tower_kwargs(params: dict[str, Any] | None, arg: str, default: dict[str, Any]) -> dict[str, Any]:
    """Validated MLP keyword arguments (the reference's ``{"dims", "activation", "dropout"}`` dicts)."""
    return mlp_kwargs(default if params is None else params, arg)


def last_linear(module: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` inside ``module`` (in registration order)."""
    found = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(module).__name__} holds no nn.Linear layer")
    return found[-1]


def default_task_types(task_types: Sequence[str] | None, schema: FeatureSchema | None) -> list[str]:
    """``task_types``, or one classification task per schema label (two without a schema)."""
    if task_types is not None:
        return check_task_types(task_types)
    if isinstance(schema, dict):
        schema = FeatureSchema.from_dict(schema)
    n = len(schema.labels) if schema is not None and len(schema.labels) > 0 else 2
    return ["classification"] * n


def tower_param_list(tower_params_list: Sequence[dict[str, Any]] | None, n_task: int, default_dims: Sequence[int] = (8,)) -> list[dict[str, Any]]:
    """One validated tower MLP dict per task (the default: ``{"dims": [8]}`` each)."""
    if tower_params_list is None:
        return [tower_kwargs(None, "tower_params_list", {"dims": list(default_dims)}) for _ in range(n_task)]
    towers = list(tower_params_list)
    if len(towers) != n_task:
        raise ValueError(f"tower_params_list has {len(towers)} entries for {n_task} tasks; give one dict per task")
    out = []
    for i, t in enumerate(towers):
        kw = tower_kwargs(t, f"tower_params_list[{i}]", {})
        if kw.get("output_layer", True) is False:
            raise ValueError(f"tower_params_list[{i}] sets output_layer=False; a tower must end in one output unit")
        out.append({**kw, "output_layer": True})
    return out


class MultiTaskModel(RecModel):
    """Base class of the multi-task models (see the module docstring for the contract).

    Subclasses set ``task_types`` and implement :meth:`task_modules` and
    :meth:`last_shared_layer`; ``forward`` returns ``(B, n_tasks)``: logits for
    classification columns, raw values for regression columns.
    """

    returns_logits = True
    trained_tasks: tuple[int, ...] | None = None
    conditional_tasks: dict[int, int] = {}
    task_types: list[str]

    @property
    def n_task(self) -> int:
        """Number of output columns."""
        return len(self.task_types)

    def task_modules(self) -> list[list[nn.Module]]:  # pragma: no cover - abstract
        """Per output column, the submodules only that task's loss reaches."""
        raise NotImplementedError

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """Per output column, the parameters only that task's (trained) loss reaches."""
        out: list[list[nn.Parameter]] = []
        for modules in self.task_modules():
            seen: dict[int, nn.Parameter] = {}
            for m in modules:
                for p in m.parameters():
                    seen.setdefault(id(p), p)
            out.append(list(seen.values()))
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not task-specific (reached by two or more task losses)."""
        task_ids = {id(p) for ps in self.task_parameters() for p in ps}
        return [p for p in self.parameters() if id(p) not in task_ids]

    def last_shared_layer(self) -> nn.Module | list[nn.Parameter]:  # pragma: no cover - abstract
        """The last layer every trained task's loss passes through (GradNorm's ``W``)."""
        raise NotImplementedError

    def auxiliary_loss(self, outputs: torch.Tensor) -> torch.Tensor | None:
        """An extra training loss computed from ``forward``'s outputs, or ``None`` (default)."""
        return None
