"""AITM: Adaptive Information Transfer Multi-task framework (Xi et al., KDD'21,
https://arxiv.org/abs/2105.08489)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...features import Feature, FeatureSchema, resolve_features
from ...layers import MLP, EmbeddingLayer
from ..ranking._common import total_dim
from ._base import MultiTaskModel, last_linear, tower_kwargs, tower_param_list

__all__ = ["AITM", "AttentionLayer"]


class AttentionLayer(nn.Module):
    """AITM's attention over ``(task representation, transferred information)``.

    Args:
        dim: width of both inputs.

    Shape:
        ``(B, 2, dim) -> (B, dim)``.
    """

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.dim = dim
        self.q_layer = nn.Linear(dim, dim, bias=False)
        self.k_layer = nn.Linear(dim, dim, bias=False)
        self.v_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_layer(x), self.k_layer(x), self.v_layer(x)
        a = torch.softmax((q * k).sum(dim=-1) / math.sqrt(self.dim), dim=1)  # (B, 2)
        return (a.unsqueeze(-1) * v).sum(dim=1)


class AITM(MultiTaskModel):
    """Sequential conversion tasks (impression -> click -> conversion ...) with adaptive
    information transfer from each task to the next, and the paper's behavioural expectation
    calibrator on request.

    Every task is binary classification. Task ``t``'s representation attends over its own
    bottom output and the information transferred from task ``t - 1``. The calibrator
    penalises a later step being more likely than the one before it:
    ``calibrator_weight * mean_b sum_{t>=1} max(p_t - p_{t-1}, 0)`` (the paper's ``L_lc``),
    returned by :meth:`auxiliary_loss` and added to the task losses by the module. It is off
    by default, as in Torch-RecHub (which has none): it is right only when the labels are
    funnel steps in order (click before conversion), and fights the data otherwise -- the
    reference's own AITM examples list ``[conversion, click]`` or Census' two unrelated labels.
    ``configs/mtl/aitm.yaml`` turns it on (0.6, the authors' value) for funnel labels.

    Args:
        features: input features (list, or a selector resolved against ``schema``; default: all).
        n_task: number of steps (tasks), in funnel order.
        bottom_params: MLP arguments of each task's bottom (``{"dims", "activation", "dropout"}``).
        tower_params_list: MLP arguments of each task tower (one dict per task).
        calibrator_weight: ``alpha`` of the calibrator loss (0, the default, disables it; the
            authors use 0.6 with labels in funnel order).
        schema: the datamodule's feature schema (filled in by the CLI).

    Shape:
        ``x`` dict -> logits ``(B, n_task)``.

    Task ``t < n_task - 1`` owns its tower; the last task also owns its bottom, the last
    information gate and attention (nothing downstream reads them). Everything else
    reaches several tasks and is shared. GradNorm measures gradient norms on the first
    task's bottom (its last linear layer), the only bottom every task reads.
    """

    def __init__(
        self,
        features: Sequence[Feature] | Sequence[str] | str | None = None,
        n_task: int = 2,
        bottom_params: dict[str, Any] | None = None,
        tower_params_list: Sequence[dict[str, Any]] | None = None,
        *,
        calibrator_weight: float = 0.0,
        schema: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        if int(n_task) < 1:
            raise ValueError(f"n_task must be >= 1, got {n_task}")
        if calibrator_weight < 0:
            raise ValueError(f"calibrator_weight must be >= 0, got {calibrator_weight}")
        self.features = resolve_features(features, schema, "all", "features")
        self.task_types = ["classification"] * int(n_task)
        self.calibrator_weight = float(calibrator_weight)
        bottom = {**tower_kwargs(bottom_params, "bottom_params", {"dims": [32, 16]}), "output_layer": False}
        if not bottom.get("dims"):
            raise ValueError("bottom_params['dims'] must name at least one layer")
        towers = tower_param_list(tower_params_list, self.n_task)
        self.input_dims = total_dim(self.features)
        self.embedding = EmbeddingLayer(self.features)
        d = list(bottom["dims"])[-1]
        self.bottoms = nn.ModuleList(MLP(self.input_dims, **bottom) for _ in range(self.n_task))
        self.towers = nn.ModuleList(MLP(d, **t) for t in towers)
        self.info_gates = nn.ModuleList(MLP(d, output_layer=False, dims=[d]) for _ in range(self.n_task - 1))
        self.aits = nn.ModuleList(AttentionLayer(d) for _ in range(self.n_task - 1))

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        embed_x = self.embedding(x, self.features, squeeze_dim=True)
        reps = [bottom(embed_x) for bottom in self.bottoms]
        for t in range(1, self.n_task):
            info = self.info_gates[t - 1](reps[t - 1])
            reps[t] = self.aits[t - 1](torch.stack([reps[t], info], dim=1))
        return torch.cat([tower(r) for tower, r in zip(self.towers, reps)], dim=1)

    def auxiliary_loss(self, outputs: torch.Tensor) -> torch.Tensor | None:
        """The behavioural expectation calibrator ``alpha * mean_b sum_t max(p_t - p_{t-1}, 0)``."""
        if self.calibrator_weight == 0 or self.n_task < 2:
            return None
        p = torch.sigmoid(outputs.float())
        return self.calibrator_weight * torch.relu(p[:, 1:] - p[:, :-1]).sum(dim=1).mean()

    def task_modules(self) -> list[list[nn.Module]]:
        out: list[list[nn.Module]] = [[tower] for tower in self.towers]
        if self.n_task > 1:
            out[-1] += [self.bottoms[-1], self.info_gates[-1], self.aits[-1]]
        return out

    def last_shared_layer(self) -> nn.Module:
        return last_linear(self.bottoms[0])
