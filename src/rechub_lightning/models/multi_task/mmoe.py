"""MMOE: Multi-gate Mixture-of-Experts (Ma et al., KDD'18, https://dl.acm.org/doi/10.1145/3219819.3220007)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import MLP, EmbeddingLayer
from ..ranking._common import total_dim
from ._base import MultiTaskModel, default_task_types, last_linear, tower_kwargs, tower_param_list

__all__ = ["MMOE"]


class MMOE(MultiTaskModel):
    """Shared experts mixed per task by a softmax gate, then one tower per task.

    Args:
        features: features of the experts and gates (list, or a selector resolved against
            ``schema``; default: all).
        task_types: ``"classification"`` or ``"regression"`` per task (default: one
            classification task per label of ``schema``, else two).
        n_expert: number of experts.
        expert_params: MLP arguments of every expert (``{"dims", "activation", "dropout"}``).
        tower_params_list: MLP arguments of each task tower (one dict per task).
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> ``(B, n_tasks)``: logits of classification tasks, values of regression tasks.

    Shared parameters: embeddings and experts; task ``i``: gate ``i`` and tower ``i``. GradNorm
    measures gradient norms on the experts' last linear layers.
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        task_types: Sequence[str] | None = None,
        n_expert: int = 8,
        expert_params: dict[str, Any] | None = None,
        tower_params_list: Sequence[dict[str, Any]] | None = None,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        if int(n_expert) < 1:
            raise ValueError(f"n_expert must be >= 1, got {n_expert}")
        self.features = resolve_features(features, schema, "all", "features")
        self.task_types = default_task_types(task_types, schema)
        self.n_expert = int(n_expert)
        expert = {**tower_kwargs(expert_params, "expert_params", {"dims": [16]}), "output_layer": False}
        towers = tower_param_list(tower_params_list, self.n_task)
        self.embedding = EmbeddingLayer(self.features)
        self.input_dims = total_dim(self.features)
        self.experts = nn.ModuleList(MLP(self.input_dims, **expert) for _ in range(self.n_expert))
        # Gate = Linear -> BatchNorm -> softmax over experts, as in the reference.
        self.gates = nn.ModuleList(
            MLP(self.input_dims, output_layer=False, dims=[self.n_expert], activation="softmax") for _ in range(self.n_task)
        )
        expert_dim = self.experts[0].output_dim
        self.towers = nn.ModuleList(MLP(expert_dim, **t) for t in towers)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        embed_x = self.embedding(x, self.features, squeeze_dim=True)
        expert_outs = torch.stack([expert(embed_x) for expert in self.experts], dim=1)  # (B, n_expert, D)
        ys = []
        for gate, tower in zip(self.gates, self.towers):
            weights = gate(embed_x).unsqueeze(-1)  # (B, n_expert, 1)
            ys.append(tower((weights * expert_outs).sum(dim=1)))
        return torch.cat(ys, dim=1)

    def task_modules(self) -> list[list[nn.Module]]:
        return [[gate, tower] for gate, tower in zip(self.gates, self.towers)]

    def last_shared_layer(self) -> list[nn.Parameter]:
        return [p for expert in self.experts for p in last_linear(expert).parameters()]
