"""Multi-layer perceptron and logistic-regression heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .activation import activation_layer

__all__ = ["MLP", "LR", "PredictionLayer"]


class MLP(nn.Module):
    """``[Linear -> BatchNorm -> activation -> Dropout] * len(dims)`` then an optional ``Linear(., 1)``.

    Same arguments as Torch-RecHub's ``MLP``; ``batch_norm`` is new (default on, as there).

    Args:
        input_dim: input width.
        output_layer: append a final ``Linear(dims[-1], 1)``.
        dims: hidden widths.
        dropout: dropout probability after each hidden layer.
        activation: activation name (see :func:`activation_layer`).
        batch_norm: insert ``BatchNorm1d`` after each hidden linear layer.

    Shape:
        ``(B, input_dim) -> (B, 1)`` with an output layer, else ``(B, dims[-1])``.
    """

    def __init__(
        self,
        input_dim: int,
        output_layer: bool = True,
        dims: Sequence[int] | None = None,
        dropout: float = 0.0,
        activation: str = "relu",
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        dims = list(dims or [])
        layers: list[nn.Module] = []
        for d in dims:
            layers.append(nn.Linear(input_dim, d))
            if batch_norm:
                layers.append(nn.BatchNorm1d(d))
            layers.append(activation_layer(activation, d))
            if dropout > 0:
                layers.append(nn.Dropout(p=dropout))
            input_dim = d
        if output_layer:
            layers.append(nn.Linear(input_dim, 1))
        self.output_dim = 1 if output_layer else input_dim
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class LR(nn.Module):
    """Logistic-regression logit ``w.x + b`` (sigmoid optional, as in the reference)."""

    def __init__(self, input_dim: int, sigmoid: bool = False) -> None:
        super().__init__()
        self.sigmoid = sigmoid
        self.fc = nn.Linear(input_dim, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return torch.sigmoid(y) if self.sigmoid else y


class PredictionLayer(nn.Module):
    """Identity for logits. Kept for the reference's API: our models return logits and the
    LightningModule applies the link function (sigmoid for classification)."""

    def __init__(self, task_type: str = "classification") -> None:
        super().__init__()
        if task_type not in ("classification", "regression"):
            raise ValueError(f"task_type must be 'classification' or 'regression', got {task_type!r}")
        self.task_type = task_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
