"""Shared-Bottom multi-task model (Caruana, "Multitask Learning", Machine Learning 28, 1997)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import MLP, EmbeddingLayer
from ..ranking._common import total_dim
from ._base import MultiTaskModel, check_task_types, default_task_types, last_linear, tower_kwargs, tower_param_list

__all__ = ["SharedBottom"]


class SharedBottom(MultiTaskModel):
    """One shared MLP over the embedded features, then one tower per task.

    Args:
        features: features of the bottom (list of features, or a selector such as
            ``"dense+sparse"`` resolved against ``schema``; default: all).
        task_types: ``"classification"`` or ``"regression"`` per task (default: one
            classification task per label of ``schema``, else two).
        bottom_params: MLP arguments of the shared bottom (``{"dims", "activation",
            "dropout"}``; its output layer is always off).
        tower_params_list: MLP arguments of each task tower (one dict per task).
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> ``(B, n_tasks)``: logits of classification tasks, values of regression tasks.

    Shared parameters: embeddings and bottom; task ``i``: tower ``i``. GradNorm measures
    gradient norms on the bottom's last linear layer.
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        task_types: Sequence[str] | None = None,
        bottom_params: dict[str, Any] | None = None,
        tower_params_list: Sequence[dict[str, Any]] | None = None,
        *,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        self.features = resolve_features(features, schema, "all", "features")
        self.task_types = check_task_types(default_task_types(task_types, schema))
        bottom = {**tower_kwargs(bottom_params, "bottom_params", {"dims": [64]}), "output_layer": False}
        towers = tower_param_list(tower_params_list, self.n_task)
        self.embedding = EmbeddingLayer(self.features)
        self.bottom_dims = total_dim(self.features)
        self.bottom_mlp = MLP(self.bottom_dims, **bottom)
        self.towers = nn.ModuleList(MLP(self.bottom_mlp.output_dim, **t) for t in towers)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.bottom_mlp(self.embedding(x, self.features, squeeze_dim=True))
        return torch.cat([tower(h) for tower in self.towers], dim=1)

    def task_modules(self) -> list[list[nn.Module]]:
        return [[tower] for tower in self.towers]

    def last_shared_layer(self) -> nn.Module:
        return last_linear(self.bottom_mlp)

