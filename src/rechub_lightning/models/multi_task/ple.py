"""PLE: Progressive Layered Extraction (Tang et al., RecSys'20, https://dl.acm.org/doi/10.1145/3383313.3412236)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import MLP, EmbeddingLayer
from ..ranking._common import total_dim
from ._base import MultiTaskModel, default_task_types, last_linear, tower_kwargs, tower_param_list

__all__ = ["PLE", "CGC"]


class CGC(nn.Module):
    """Customized Gate Control: one extraction level of PLE.

    Each task has ``n_expert_specific`` own experts and a gate over its own plus the shared
    experts; below the last level a shared gate mixes every expert into the input of the
    next level's shared experts.

    Args:
        cur_level: this level, ``1..n_level``.
        n_level: number of levels.
        n_task: number of tasks.
        n_expert_specific: experts per task.
        n_expert_shared: shared experts.
        input_dims: input width of the first level (later levels read ``expert_params["dims"][-1]``).
        expert_params: MLP arguments of every expert.

    Shape:
        ``n_task + 1`` inputs ``(B, d)`` (one per task, then the shared one) -> ``n_task`` outputs,
        plus the shared one below the last level.
    """

    def __init__(
        self,
        cur_level: int,
        n_level: int,
        n_task: int,
        n_expert_specific: int,
        n_expert_shared: int,
        input_dims: int,
        expert_params: dict[str, Any],
    ) -> None:
        super().__init__()
        self.cur_level = cur_level
        self.n_level = n_level
        self.n_task = n_task
        self.n_expert_specific = n_expert_specific
        self.n_expert_shared = n_expert_shared
        self.n_expert_all = n_expert_specific * n_task + n_expert_shared
        expert_params = {**expert_params, "output_layer": False}
        dims = list(expert_params.get("dims") or [])
        if not dims:
            raise ValueError("expert_params['dims'] must name at least one layer")
        input_dims = input_dims if cur_level == 1 else dims[-1]
        self.experts_specific = nn.ModuleList(MLP(input_dims, **expert_params) for _ in range(n_task * n_expert_specific))
        self.experts_shared = nn.ModuleList(MLP(input_dims, **expert_params) for _ in range(n_expert_shared))
        n_gated = n_expert_specific + n_expert_shared
        self.gates_specific = nn.ModuleList(
            MLP(input_dims, output_layer=False, dims=[n_gated], activation="softmax") for _ in range(n_task)
        )
        if cur_level < n_level:
            self.gate_shared = MLP(input_dims, output_layer=False, dims=[self.n_expert_all], activation="softmax")

    def task_experts(self, i: int) -> list[nn.Module]:
        """Task ``i``'s own experts."""
        k = self.n_expert_specific
        return list(self.experts_specific[i * k : (i + 1) * k])

    def forward(self, x_list: list[torch.Tensor]) -> list[torch.Tensor]:
        specific = [[e(x_list[i]) for e in self.task_experts(i)] for i in range(self.n_task)]
        shared = [e(x_list[-1]) for e in self.experts_shared]
        outs = []
        for i, gate in enumerate(self.gates_specific):
            experts = torch.stack(specific[i] + shared, dim=1)  # (B, n_gated, D)
            outs.append((gate(x_list[i]).unsqueeze(-1) * experts).sum(dim=1))
        if self.cur_level < self.n_level:
            experts = torch.stack([e for task in specific for e in task] + shared, dim=1)
            outs.append((self.gate_shared(x_list[-1]).unsqueeze(-1) * experts).sum(dim=1))
        return outs


class PLE(MultiTaskModel):
    """Stacked CGC levels with task-specific and shared experts, then one tower per task.

    Args:
        features: features of the first level (list, or a selector resolved against
            ``schema``; default: all).
        task_types: ``"classification"`` or ``"regression"`` per task (default: one
            classification task per label of ``schema``, else two).
        n_level: number of CGC levels.
        n_expert_specific: experts per task and level.
        n_expert_shared: shared experts per level.
        expert_params: MLP arguments of every expert (``{"dims", "activation", "dropout"}``).
        tower_params_list: MLP arguments of each task tower (one dict per task).
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> ``(B, n_tasks)``: logits of classification tasks, values of regression tasks.

    Task ``i`` owns its tower, its experts and gate of the last level and its gate of the
    level before (which feeds only task ``i``'s last-level input); every other parameter
    reaches several tasks (below the last level a shared gate mixes all experts) and is
    shared. GradNorm measures gradient norms on the last linear layers of the last level's
    shared experts (on the embeddings when there is none).
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        task_types: Sequence[str] | None = None,
        n_level: int = 1,
        n_expert_specific: int = 2,
        n_expert_shared: int = 1,
        expert_params: dict[str, Any] | None = None,
        tower_params_list: Sequence[dict[str, Any]] | None = None,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("n_level", n_level, 1), ("n_expert_specific", n_expert_specific, 0), ("n_expert_shared", n_expert_shared, 0)):
            if int(value) < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.features = resolve_features(features, schema, "all", "features")
        self.task_types = default_task_types(task_types, schema)
        self.n_level = int(n_level)
        expert = tower_kwargs(expert_params, "expert_params", {"dims": [16]})
        towers = tower_param_list(tower_params_list, self.n_task)
        self.embedding = EmbeddingLayer(self.features)
        self.input_dims = total_dim(self.features)
        self.cgc_layers = nn.ModuleList(
            CGC(i + 1, self.n_level, self.n_task, int(n_expert_specific), int(n_expert_shared), self.input_dims, expert)
            for i in range(self.n_level)
        )
        self.towers = nn.ModuleList(MLP(list(expert["dims"])[-1], **t) for t in towers)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        embed_x = self.embedding(x, self.features, squeeze_dim=True)
        outs = [embed_x] * (self.n_task + 1)
        for cgc in self.cgc_layers:
            outs = cgc(outs)
        return torch.cat([tower(out) for tower, out in zip(self.towers, outs)], dim=1)

    def task_modules(self) -> list[list[nn.Module]]:
        last = self.cgc_layers[-1]
        before = self.cgc_layers[-2] if self.n_level > 1 else None
        out = []
        for i, tower in enumerate(self.towers):
            modules: list[nn.Module] = [tower, last.gates_specific[i], *last.task_experts(i)]
            if before is not None:
                modules.append(before.gates_specific[i])
            out.append(modules)
        return out

    def last_shared_layer(self) -> nn.Module | list[nn.Parameter]:
        shared = self.cgc_layers[-1].experts_shared
        if len(shared) == 0:  # no shared expert: only the embeddings reach every task
            return self.embedding
        return [p for expert in shared for p in last_linear(expert).parameters()]
